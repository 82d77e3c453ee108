"""The images recipe (SPEC §4, §6): pretrain a PLR grid -> fine-tune -> SWA -> analyze.

Shards per (data seed, training seed, PLR), each a unit of work in the store:
    pretrain   train from the seed's initial point at the PLR; final state, last checkpoints
               and the SWA averages of the last K epoch checkpoints (accumulated online)
    finetune   every FLR from the pretrained final state
    swa        each SWA average, rescaled to rho, BN recomputed on the training set, evaluated
    analyze    every registered image measurement (geometry: angles and error barriers of
               FT-low, FT-high and SWA, BN recomputed at every interpolation point); needs
               finetune and swa
All PLRs of a training seed share the initial point and the batch order (as in the synthetic
recipe), so the LR is the only difference between them. Pretrain rows of evaluations also carry
`epochs_to_convergence`. How shards run, commit and resume is the runtime's (runtime.py).

Practical setting (SPEC §4): models with trainable parameters outside an SI group train split.
    SI group (convnet-si, resnet18-si, vit-si)   on the sphere at the fixed effective LR = the
                                                 grid LR (PLR or FLR); `optimizer` and
                                                 `schedule` do not apply to it
    every other trainable parameter (all of      the `optimizer` section (sgd | adam | adamw,
    resnet18 and vit, the rest of vit-si)        momentum, betas, weight decay) at LR =
                                                 optimizer.lr_scale x the grid LR, under the
                                                 `schedule` (constant as in the paper; cosine,
                                                 step), restarted with a fresh optimizer state
                                                 for every fine-tuning run (our choice)
Weight decay therefore never touches the SI group. Checkpoints, SWA averages and linear paths
use the tracked vector (SI group, then every other trainable parameter); on loading, only the SI
part is put back at norm rho. Training regimes (SPEC §1) are defined for a fixed effective LR on
the sphere: for a model without SI group summary.json says regime = null and
"regimes": {"defined": false, ...}, and the figures draw no boundaries.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

from ..analysis import image_geometry  # noqa: F401  (registers the image measurements)
from ..analysis.bands import update_summary
from ..analysis.summary import write_summary
from ..config import ImageConfig, preset_names, read_toml
from ..data.augment import AugmentPipeline
from ..data.images import first_per_class, load_image_dataset
from ..data.randaugment import MAX_MAGNITUDE
from ..data.registry import dataset_entry
from ..engine.images import (DeviceImages, ImageTask, ImageTrainResult, evaluate, load_si_, load_tracked_,
                            recompute_bn, train_image_model)
from ..errors import ConfigError
from ..models.registry import build_model, resolve_options, si_parameters
from ..seeding import derive_seed
from ..sphere import flatten
from ..store import ExperimentStore, ShardWriter, write_json
from .runtime import (Recipe, Shard, Stage, check_model_input, load_experiment_config, register_kind,
                      resolve_device, run_measurements)


@dataclass(frozen=True)
class ImageUnit:
    """The unit of the images recipe: one model, i.e. a (data seed, training seed, PLR)."""

    data_seed: int
    train_seed: int
    plr_index: int

    @property
    def label(self) -> str:
        """This unit's part of a shard name."""
        return f"d{self.data_seed}-s{self.train_seed}-plr{self.plr_index:03d}"


def image_config(preset: str, overrides: list[str] | tuple[str, ...] = (), dataset: str | None = None,
                 model: str | None = None, device: str | None = None, data_root: str | None = None) -> ImageConfig:
    """Load an image preset ('cpu-small', 'paper', a full name or a TOML path) with CLI choices applied.

    With `model`, a preset variant for that model family is preferred ('paper' + convnet-si ->
    images-paper-convnet; 'cpu-small' + resnet18 -> practical-resnet18-cpu-small; 'paper' +
    vit or vit-si -> vit-small-paper). If the preset was written for another model, its rho no
    longer fits, so rho falls back to the norm at initialization (sphere.rho = 0) unless overridden.
    """
    source = preset
    if not (preset.endswith(".toml") or Path(preset).exists()):
        family = (model or "").removesuffix("-si")
        practical = {"resnet18": "practical-resnet18", "vit": "vit-small", "vit-si": "vit-small"}.get(model or "")
        names = preset_names()
        candidates = ([f"{practical}-{preset}"] if practical else []) + \
            ([f"images-{preset}-{family}"] if family else []) + [f"images-{preset}", preset]
        for candidate in candidates:
            if candidate in names:
                source = candidate
                break
    data = read_toml(source)
    data.setdefault("kind", "images")
    if model is not None:
        section = data.setdefault("model", {})
        preset_rho = data.get("sphere", {}).get("rho", 0.0)
        if section.get("name", model) != model:
            section.pop("options", None)  # the preset model's own options do not fit another model
        if section.get("name", model) != model and preset_rho:
            if not any(o.startswith("sphere.rho") for o in overrides):
                data.setdefault("sphere", {})["rho"] = 0.0
                warnings.warn(f"preset {source} is for another model; using {model} with rho = its norm at "
                              "initialization (set sphere.rho to choose)", stacklevel=2)
        section["name"] = model
    for value, section, key in ((dataset, "data", "dataset"), (data_root, "data", "root"),
                                (device, "engine", "device")):
        if value is not None:
            data.setdefault(section, {})[key] = value
    return load_experiment_config(data, list(overrides), kind="images")


def key_row(stage: str, shard: Shard, plr: float, flr: float = math.nan, swa_k: int = 0) -> dict[str, Any]:
    """Key columns of one model."""
    return {"stage": stage, "data_seed": shard.data_seed, "train_seed": shard.train_seed, "plr": plr,
            "flr": flr, "swa_k": swa_k}


def training_tables(keys: dict[str, Any], result: ImageTrainResult) -> tuple[pd.DataFrame, pd.DataFrame]:
    """metrics rows (one per logged epoch) and the evaluations row of one trained model."""
    metrics = pd.DataFrame({**{k: [v] * len(result.metrics["step"]) for k, v in keys.items()}, **result.metrics})
    metrics["diverged"] = metrics["diverged"].astype(bool)
    evaluation = pd.DataFrame([{**keys, **result.final, "diverged": result.diverged}])
    return metrics, evaluation


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with `prefix` on their names."""
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix`, with it removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@dataclass
class ImageAnalysis:
    """What an image measurement gets: the config, the shard, its data and the runner that rebuilds models."""

    cfg: ImageConfig
    shard: Shard
    data: DeviceImages
    runner: "ImageRunner"
    options: Any = None     # a measurement's own settings (the bands' BandsConfig)
    kind: str = "images"

    def models(self) -> tuple[list[dict[str, Any]], list[nn.Module]]:
        """Key rows (with each model's `diverged` flag) and eval-mode models: PT, FT per FLR, SWA per K.

        Rebuilt as the experiment evaluates them: the stored final state (BN buffers included) for
        PT and FT; for SWA the stored average at norm rho with BN recomputed on the training set.
        """
        cfg, shard, runner = self.cfg, self.shard, self.runner
        plr = cfg.pretrain.lrs[shard.plr_index]
        keys = [key_row("pretrain", shard, plr)]
        models = [runner.trained_model(shard, "pretrain")[0]]
        if cfg.finetune.lrs:
            for j, flr in enumerate(cfg.finetune.lrs):
                keys.append(key_row("finetune", shard, plr, flr))
                models.append(runner.trained_model(shard, "finetune", j)[0])
        pretrained = runner.weights(shard, "pretrain")
        for k in cfg.swa.ks:
            keys.append(key_row("swa", shard, plr, swa_k=k))
            models.append(runner.swa_model(shard, k, pretrained))
        stages = ["pretrain", "swa"] + (["finetune"] if cfg.finetune.lrs else [])
        flags = pd.concat([runner.store.shard_table(shard.upstream(s).name, "evaluations") for s in stages],
                          ignore_index=True)
        for row in keys:
            match = flags[(flags["stage"] == row["stage"]) & (flags["swa_k"] == row["swa_k"])
                          & (flags["flr"].isna() if math.isnan(row["flr"]) else flags["flr"] == row["flr"])]
            row["diverged"] = bool(match["diverged"].any())
        return keys, [model.eval() for model in models]


class ImageRunner:
    """Data, models and the four stages of one image experiment, against a store."""

    def __init__(self, cfg: ImageConfig, store: ExperimentStore,
                 progress: Callable[[int], None] | None = None):
        self.cfg, self.store = cfg, store
        self.device = resolve_device(cfg.engine.device)
        on_cuda = self.device.type == "cuda"
        for flag in ("bf16", "channels_last"):
            if getattr(cfg.engine, flag) and not on_cuda:
                warnings.warn(f"engine.{flag} only applies on CUDA; ignored on {self.device}", stacklevel=2)
        self.bf16, self.channels_last = cfg.engine.bf16 and on_cuda, cfg.engine.channels_last and on_cuda
        self.augment = AugmentPipeline.from_config(cfg.data)
        self.progress = progress or (lambda n: None)
        self._data: dict[int, DeviceImages] = {}
        self._info: dict[str, Any] | None = None

    # ----- data and models -------------------------------------------------------------
    def data(self, data_seed: int) -> DeviceImages:
        """The data set of a data seed (split and val drawn from it), on the device (cached)."""
        if data_seed not in self._data:
            d = self.cfg.data
            dataset = load_image_dataset(d.dataset, d.root or None, d.max_per_class or None, d.val_fraction,
                                         seed=data_seed, classes=d.classes or None, sha256=d.sha256 or None,
                                         test_fraction=d.test_fraction)
            if d.max_test_per_class:
                keep = first_per_class(dataset.test_y, d.max_test_per_class)
                dataset.test_x, dataset.test_y = dataset.test_x[keep], dataset.test_y[keep]
            self._data[data_seed] = DeviceImages.from_dataset(dataset, self.device, d.normalization)
            self._info = {"name": dataset.name, "classes": dataset.classes, "num_classes": dataset.num_classes,
                          "input_shape": list(dataset.input_shape), "n_train": len(dataset.train_x),
                          "n_test": len(dataset.test_x),
                          "n_val": 0 if dataset.val_x is None else len(dataset.val_x),
                          "mean": self._data[data_seed].mean.tolist(), "std": self._data[data_seed].std.tolist()}
            write_json(self.store.root / "dataset.json", self._info)
        return self._data[data_seed]

    def info(self, data_seed: int | None = None) -> dict[str, Any]:
        """Classes, sizes and normalization of the data (dataset.json)."""
        if self._info is None:
            self.data(self.cfg.seeds.data[0] if data_seed is None else data_seed)
        return self._info

    def make_model(self, data_seed: int, train_seed: int) -> tuple[nn.Module, float]:
        """The network of a training seed on the device, and its rho (SI group already at norm rho).

        rho is 0.0 for a model without SI group (nothing is on the sphere).
        """
        info = self.info(data_seed)
        model = build_model(self.cfg.model, tuple(info["input_shape"]), info["num_classes"],
                            derive_seed("init", data_seed, train_seed))
        rho = 0.0
        if si_parameters(model):
            rho = self.cfg.sphere.rho or float(flatten(si_parameters(model)).detach().norm())
            load_si_(model, flatten(si_parameters(model)).detach(), rho)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model, rho

    def train(self, model: nn.Module, data: DeviceImages, task: ImageTask) -> ImageTrainResult:
        """Run one training task with the engine settings."""
        ckpt_bytes = 4 * task.keep_checkpoints * sum(p.numel() for p in model.parameters())
        on_device = ckpt_bytes <= self.cfg.engine.memory_budget_gb * 2**30
        return train_image_model(model, data, task, self.augment, self.bf16, self.channels_last,
                                 None if on_device else "cpu", self.progress)

    def evaluate_all(self, model: nn.Module, data: DeviceImages) -> dict[str, float]:
        """Eval-mode loss and accuracy on train, test (and val)."""
        out = {}
        for split, (x, y) in {"train": (data.train_x, data.train_y), **data.eval_splits()}.items():
            loss, acc = evaluate(model, x, y, data.normalization, self.cfg.engine.eval_batch_size,
                                 self.bf16, self.channels_last)
            out[f"{split}_loss"], out[f"{split}_acc"] = float(loss), float(acc)
        return out

    def task(self, lr: float, epochs: int, rho: float, stage: str, shard: Shard, log_every: int,
             ckpt_every: int, keep: int, swa_ks: tuple[int, ...]) -> ImageTask:
        """A training task at grid LR `lr`: the SI group's ELR, and the optimizer of the other parameters."""
        cfg, d, s = self.cfg, shard.data_seed, shard.train_seed
        return ImageTask(lr, epochs, cfg.pretrain.batch_size, rho, ("order", stage, d, s), ("augment", stage, d, s),
                         cfg.sphere.step, log_every, ckpt_every, keep, swa_ks, cfg.engine.eval_batch_size,
                         optimizer=cfg.optimizer.at(lr), schedule=cfg.schedule)

    def recompute_bn(self, model: nn.Module, x: torch.Tensor, data: DeviceImages) -> nn.Module:
        """BN statistics recomputed on x at the training batch size."""
        return recompute_bn(model, x, self.cfg.pretrain.batch_size, data.normalization, self.bf16,
                            self.channels_last)

    def weights(self, shard: Shard, stage: str) -> dict[str, torch.Tensor]:
        """The tensors a finished upstream shard stored."""
        return self.store.shard_tensors(shard.upstream(stage).name, "weights")

    def trained_model(self, shard: Shard, stage: str, flr_index: int = 0) -> tuple[nn.Module, float]:
        """A stored pretrain (or finetune at FLR index j) final state in a fresh network, and its rho."""
        model, rho = self.make_model(shard.data_seed, shard.train_seed)
        prefix = "final." if stage == "pretrain" else f"flr{flr_index}."
        model.load_state_dict(unprefixed(prefix, self.weights(shard, stage)))
        return model, rho

    # ----- stages ----------------------------------------------------------------------
    def run_pretrain(self, shard: Shard, writer: ShardWriter) -> None:
        """Train one PLR from the seed's initial point; keep the final state, checkpoints and SWA means."""
        cfg, d, s = self.cfg, shard.data_seed, shard.train_seed
        plr = cfg.pretrain.lrs[shard.plr_index]
        model, rho = self.make_model(d, s)
        task = self.task(plr, cfg.pretrain.epochs, rho, "pretrain", shard, cfg.pretrain.log_every_epochs,
                         cfg.pretrain.ckpt_every_epochs, cfg.checkpoints_kept, tuple(cfg.swa.ks))
        result = self.train(model, self.data(d), task)
        metrics, evaluation = training_tables(key_row("pretrain", shard, plr), result)
        evaluation["epochs_to_convergence"] = result.epochs_to_convergence
        writer.table("metrics", metrics)
        writer.table("evaluations", evaluation)
        writer.tensors("weights", {**prefixed("final.", result.state), "checkpoints": result.checkpoints,
                                   "checkpoint_buffers": result.checkpoint_buffers,
                                   "checkpoint_epochs": torch.tensor(result.checkpoint_epochs, dtype=torch.int64),
                                   "rho": torch.tensor(rho, dtype=torch.float64),
                                   **{f"swa.k{k}": v for k, v in result.swa.items()}})

    def run_finetune(self, shard: Shard, writer: ShardWriter) -> None:
        """Fine-tune the PLR's final state at every FLR (one shared batch order per seed)."""
        cfg, d, s = self.cfg, shard.data_seed, shard.train_seed
        plr = cfg.pretrain.lrs[shard.plr_index]
        pretrained = unprefixed("final.", self.weights(shard, "pretrain"))
        metrics, evaluations, tensors = [], [], {}
        for j, flr in enumerate(cfg.finetune.lrs):
            model, rho = self.make_model(d, s)
            model.load_state_dict(pretrained)
            task = self.task(flr, cfg.finetune.epochs, rho, "finetune", shard, cfg.finetune.log_every_epochs,
                             cfg.finetune.epochs, 0, ())
            result = self.train(model, self.data(d), task)
            m, e = training_tables(key_row("finetune", shard, plr, flr), result)
            metrics.append(m)
            evaluations.append(e)
            tensors.update(prefixed(f"flr{j}.", result.state))
        writer.table("metrics", pd.concat(metrics, ignore_index=True))
        writer.table("evaluations", pd.concat(evaluations, ignore_index=True))
        writer.tensors("weights", tensors)

    def swa_model(self, shard: Shard, k: int, pretrained: dict[str, torch.Tensor]) -> nn.Module:
        """The average of the last K checkpoints (SI part at norm rho), BN recomputed on the training set."""
        model, rho = self.make_model(shard.data_seed, shard.train_seed)
        model.load_state_dict(unprefixed("final.", pretrained))
        load_tracked_(model, pretrained[f"swa.k{k}"], rho)
        data = self.data(shard.data_seed)
        return self.recompute_bn(model, data.train_x, data)

    def run_swa(self, shard: Shard, writer: ShardWriter) -> None:
        """Evaluate every SWA average (BN recomputed; train and test in eval mode)."""
        cfg = self.cfg
        plr = cfg.pretrain.lrs[shard.plr_index]
        pretrained = self.weights(shard, "pretrain")
        pre_diverged = bool(self.store.shard_table(shard.upstream("pretrain").name, "evaluations")["diverged"].iloc[0])
        rows = []
        for k in cfg.swa.ks:
            model = self.swa_model(shard, k, pretrained)
            finite = bool(torch.isfinite(pretrained[f"swa.k{k}"]).all())
            rows.append({**key_row("swa", shard, plr, swa_k=k), **self.evaluate_all(model, self.data(shard.data_seed)),
                         "diverged": pre_diverged or not finite})
        writer.table("evaluations", pd.DataFrame(rows))

    def run_analyze(self, shard: Shard, writer: ShardWriter) -> None:
        """Every registered image measurement of the shard's models (geometry, ...)."""
        run_measurements(ImageAnalysis(self.cfg, shard, self.data(shard.data_seed), self), writer)


class ImageRecipe(Recipe):
    """The images experiment kind."""

    kind = "images"
    config_class = ImageConfig
    unit_name = "model-epoch"
    stages = (Stage("pretrain"), Stage("finetune", ("pretrain",)), Stage("swa", ("pretrain",)),
              Stage("analyze", ("finetune", "swa")))
    tables = ("metrics", "evaluations")

    def active_stages(self, cfg: ImageConfig) -> list[str]:
        """No FLRs: no fine-tuning and no geometry."""
        return [s.name for s in self.stages if cfg.finetune.lrs or s.name not in ("finetune", "analyze")]

    def units(self, cfg: ImageConfig) -> list[ImageUnit]:
        """One unit per model, PLR by PLR."""
        return [ImageUnit(d, s, i) for d in cfg.seeds.data for s in cfg.seeds.train
                for i in range(len(cfg.pretrain.lrs))]

    def cost(self, cfg: ImageConfig, shard: Shard) -> int:
        """Model-epochs a shard trains."""
        if shard.stage == "pretrain":
            return cfg.pretrain.epochs
        if shard.stage == "finetune":
            return len(cfg.finetune.lrs) * cfg.finetune.epochs
        return 0

    def check(self, cfg: ImageConfig) -> None:
        """The data set, model, its options and RandAugment's magnitude, against their registries."""
        entry, _ = dataset_entry(cfg.data.dataset)
        if entry.input_kind != "image":
            raise ConfigError(f"data.dataset={cfg.data.dataset!r} is not an image data set; use one of: "
                              "cifar10, cifar100, folder:PATH, tinyimagenet:PATH, band-signal")
        check_model_input(cfg.model.name, "image", self.kind)
        try:
            cfg.model.options = resolve_options(cfg.model.name, cfg.model.options)
        except ConfigError as err:
            raise ConfigError(f"model.options: {err}") from None
        d = cfg.data
        if d.randaugment and (len(d.randaugment) != 2 or d.randaugment[0] < 0
                              or not 0 <= d.randaugment[1] <= MAX_MAGNITUDE):
            raise ConfigError(f"data.randaugment={d.randaugment} must be [N, M] with N >= 0 and M in 0..30 "
                              "(the paper's ViT: [2, 14]), or [] for none")

    def threads(self, cfg: ImageConfig) -> int:
        """engine.threads (0: torch's default)."""
        return cfg.engine.threads

    def open(self, cfg: ImageConfig, store: ExperimentStore, progress=None) -> "ImageRunner":
        """The runner that computes this experiment's shards."""
        return ImageRunner(cfg, store, progress)

    def summarize(self, store: ExperimentStore) -> dict:
        """The standard summary, keeping the band blocks of `lrfeatures fourier` if it ran before."""
        summary = write_summary(store)
        return update_summary(store) if (store.root / "bands.parquet").is_file() else summary

    def before_finalize(self, worker: "ImageRunner") -> None:
        """The summary's chance level needs the number of classes (dataset.json)."""
        if not (worker.store.root / "dataset.json").is_file():
            worker.info()

    def fingerprint(self, cfg: ImageConfig) -> str:
        """The data set, loaded and checked before anything is written, and the identity of its files."""
        from ..data.registry import dataset_fingerprint
        from ..errors import DataError

        d = cfg.data
        classes = load_image_dataset(d.dataset, d.root or None, d.max_per_class or None, seed=cfg.seeds.data[0],
                                     classes=d.classes or None, sha256=d.sha256 or None,
                                     test_fraction=d.test_fraction).classes
        if len(classes) < 2:
            raise DataError(f"data.dataset={d.dataset!r} holds one class ({classes[0]!r}); a classifier needs "
                            "at least two class folders")
        return dataset_fingerprint(d.dataset, d.root or None, d.sha256 or None) or super().fingerprint(cfg)


IMAGES = register_kind(ImageRecipe())
