"""The images recipe (SPEC §4, §6): pretrain a PLR grid -> fine-tune -> SWA -> analyze.

Shards per (data seed, chunk of training seeds), each a unit of work in the store holding every
PLR of its seeds (`engine.train_seeds_per_shard`, 0 = all seeds of a data seed in one shard):
    pretrain   train every PLR from its seed's initial point (after any `pretrain.stages`); final
               states, last checkpoints and the SWA averages of the last K epoch checkpoints
    finetune   every FLR from every PLR's pretrained final state
    swa        each SWA average, rescaled to rho, BN recomputed on the training set, evaluated
    analyze    every registered image measurement (geometry: angles and error barriers of
               FT-low, FT-high and SWA, BN recomputed at every interpolation point); needs
               finetune and swa
All PLRs of a training seed share the initial point and the batch order (as in the synthetic
recipe), so the LR is the only difference between them. With engine.name = "fused" (the
default on CUDA via "auto") the models of a stage train as one program (engine/fused.py), in
chunks that fit engine.memory_budget_gb; "single" (what "auto" picks on a CPU, where it measured
faster: small convolutions are compute-bound there, and oneDNN's grouped convolution is slower
than one convolution per model) trains them one at a time (engine/images.py). Both give the
same numbers. Two-stage pre-training: each `pretrain.stages` entry trains every model at its
own ELR (`lr`, or `lr_scale` x the grid PLR) for its epochs on batch stream "pretrain-stage{i}",
then the last stage runs at the grid PLR; logs join on one epoch axis, SWA and fine-tuning
follow the last stage, and each earlier stage's end state is kept for `ImageAnalysis.stage_models`.
Pretrain rows of evaluations also carry
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
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

from ..analysis import band_features, filter_norms, image_curvature, image_geometry  # noqa: F401  (registers them)
from ..analysis.bands import update_summary
from ..analysis.summary import write_summary
from ..config import ImageConfig, preset_names, read_toml
from ..data.augment import AugmentPipeline
from ..data.images import first_per_class, load_image_dataset
from ..data.randaugment import MAX_MAGNITUDE
from ..data.registry import dataset_entry
from ..engine.fused import (StackedModels, evaluate_stack, fusable, model_bytes, plan_chunks, recompute_bn_stack,
                            train_image_models, warn_fallback)
from ..engine.images import (CONVERGED_LOSS, DeviceImages, ImageTask, ImageTrainResult, evaluate, load_si_,
                            load_tracked_, recompute_bn, train_image_model)
from ..errors import ConfigError, StoreError
from ..models.registry import build_model, model_entry, resolve_options, si_parameters
from ..seeding import derive_seed
from ..sphere import flatten
from ..store import ExperimentStore, ShardWriter, write_json
from .image_analysis import ImageAnalysis, ModelRef, key_row, model_refs, unprefixed
from .synthetic import SeedChunk, seed_chunks
from .runtime import (Recipe, Shard, Stage, check_model_input, load_experiment_config, register_kind,
                      resolve_device, run_measurements)


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


def training_tables(keys: dict[str, Any], result: ImageTrainResult) -> tuple[pd.DataFrame, pd.DataFrame]:
    """metrics rows (one per logged epoch) and the evaluations row of one trained model."""
    metrics = pd.DataFrame({**{k: [v] * len(result.metrics["step"]) for k, v in keys.items()}, **result.metrics})
    metrics["diverged"] = metrics["diverged"].astype(bool)
    evaluation = pd.DataFrame([{**keys, **result.final, "diverged": result.diverged}])
    return metrics, evaluation


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with `prefix` on their names."""
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def joined_stages(results: list[ImageTrainResult]) -> ImageTrainResult:
    """One pre-training result from consecutive stages: logs on one epoch axis, the last stage's weights.

    Epochs (logs and checkpoints) count from the start of the first stage.
    """
    if len(results) == 1:
        return results[0]
    last, metrics, offset = results[-1], {name: [] for name in results[-1].metrics}, 0
    for result in results:
        for name, values in result.metrics.items():
            metrics[name] += [v + offset for v in values] if name == "step" else list(values)
        if result is not last:
            offset += result.metrics["step"][-1]
    converged = [e for e, loss in zip(metrics["step"], metrics["train_loss"]) if loss < CONVERGED_LOSS]
    return ImageTrainResult(state=last.state, checkpoints=last.checkpoints,
                            checkpoint_buffers=last.checkpoint_buffers,
                            checkpoint_epochs=[e + offset for e in last.checkpoint_epochs], swa=last.swa,
                            metrics=metrics, final=last.final, diverged=any(r.diverged for r in results),
                            epochs_to_convergence=float(converged[0]) if converged else math.nan)


class ImageRunner:
    """Data, models and the four stages of one image experiment, against a store."""

    def __init__(self, cfg: ImageConfig, store: ExperimentStore,
                 progress: Callable[[int], None] | None = None):
        self.cfg, self.store = cfg, store
        check_layout(store)
        self.device = resolve_device(cfg.engine.device)
        on_cuda = self.device.type == "cuda"
        self.precision = cfg.engine.precision
        self.bf16, self.channels_last = self.precision == "bf16", cfg.engine.channels_last
        if self.bf16 and not on_cuda and not cpu_has_bf16():
            warnings.warn("engine.precision='bf16' on a CPU without bf16 matrix units (no amx_bf16 or "
                          "avx512_bf16 in /proc/cpuinfo): bf16 is emulated and far slower than fp32 here",
                          stacklevel=2)
        self.augment = AugmentPipeline.from_config(cfg.data)
        self.progress = progress or (lambda n: None)
        self._data: dict[int, DeviceImages] = {}
        self._info: dict[str, Any] | None = None
        self._warned = False

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

    def fused_reason(self, model: nn.Module) -> str:
        """'' when this experiment's models train fused, else why not."""
        name = self.cfg.engine.name
        if name == "single" or (name == "auto" and self.device.type != "cuda"):
            return f"engine.name={name!r} on {self.device.type}"
        if "fused" not in model_entry(self.cfg.model.name).engines:
            return f"model {self.cfg.model.name} does not list the fused engine in its registry entry"
        return fusable(model)

    def train_all(self, models: list[nn.Module], data: DeviceImages, tasks: list[ImageTask]) -> list[ImageTrainResult]:
        """Train every (model, task): fused in chunks that fit the memory budget, or one at a time."""
        reason = self.fused_reason(models[0])
        if not reason:
            return train_image_models(models, data, tasks, self.augment, self.precision,
                                      self.cfg.engine.memory_budget_gb, self.progress)
        if self.cfg.engine.name == "fused" and not self._warned:
            warn_fallback(reason)
            self._warned = True
        results = []
        for model, task in zip(models, tasks):
            ckpt_bytes = 4 * task.keep_checkpoints * sum(p.numel() for p in model.parameters())
            on_device = ckpt_bytes <= self.cfg.engine.memory_budget_gb * 2**30
            results.append(train_image_model(model, data, task, self.augment, self.bf16, self.channels_last,
                                             None if on_device else "cpu", self.progress))
        return results

    def stacks(self, models: list[nn.Module], data: DeviceImages) -> list[tuple[range, StackedModels]] | None:
        """The models as stacks that fit the memory budget (None: they do not fuse)."""
        if not models or self.fused_reason(models[0]):
            return None
        task = ImageTask(0.0, 1, self.cfg.pretrain.batch_size, 0.0, ())
        chunks = plan_chunks(len(models), model_bytes(models[0], data, task), self.cfg.engine.memory_budget_gb)
        return [(chunk, StackedModels([models[i] for i in chunk])) for chunk in chunks]

    def evaluate_all(self, models: list[nn.Module], data: DeviceImages,
                     stacks: list[tuple[range, StackedModels]] | None = None) -> list[dict[str, float]]:
        """Per model, eval-mode loss and accuracy on train, test (and val); fused when the models allow it.

        `stacks`: the models already stacked (as `stacks` returns them), so they are not copied again.
        """
        out: list[dict[str, float]] = [dict() for _ in models]
        stacks = stacks if stacks is not None else self.stacks(models, data)
        for split, (x, y) in {"train": (data.train_x, data.train_y), **data.eval_splits()}.items():
            if stacks is not None:
                pairs = []
                for _, stack in stacks:
                    losses, accs = evaluate_stack(stack, x, y, data.normalization, self.cfg.engine.eval_batch_size,
                                                  self.precision)
                    pairs += list(zip(losses.tolist(), accs.tolist()))
            else:
                pairs = [evaluate(m, x, y, data.normalization, self.cfg.engine.eval_batch_size, self.bf16,
                                  self.channels_last) for m in models]
            for row, (loss, acc) in zip(out, pairs):
                row[f"{split}_loss"], row[f"{split}_acc"] = float(loss), float(acc)
        return out

    def task(self, lr: float, epochs: int, rho: float, stage: str, ref: ModelRef, log_every: int,
             ckpt_every: int, keep: int, swa_ks: tuple[int, ...]) -> ImageTask:
        """A training task at grid LR `lr`: the SI group's ELR, and the optimizer of the other parameters."""
        cfg, d, s = self.cfg, ref.data_seed, ref.train_seed
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

    def shard_of(self, ref: ModelRef) -> Shard:
        """The pretrain shard that holds a model."""
        size = self.cfg.engine.train_seeds_per_shard or len(self.cfg.seeds.train)
        seeds = self.cfg.seeds.train
        i = seeds.index(ref.train_seed) // size * size
        return Shard("pretrain", SeedChunk(ref.data_seed, tuple(seeds[i:i + size])))

    def trained_model(self, ref: ModelRef, stage: str, flr_index: int = 0,
                      shard: Shard | None = None) -> tuple[nn.Module, float]:
        """A stored pretrain (or finetune at FLR index j) final state in a fresh network, and its rho."""
        model, rho = self.make_model(ref.data_seed, ref.train_seed)
        prefix = f"{ref.tag}.final." if stage == "pretrain" else f"{ref.tag}.flr{flr_index}."
        model.load_state_dict(unprefixed(prefix, self.weights(shard or self.shard_of(ref), stage)))
        return model, rho

    # ----- stages ----------------------------------------------------------------------
    def run_pretrain(self, shard: Shard, writer: ShardWriter) -> None:
        """Train every PLR of the shard's seeds from each seed's initial point (after any earlier stages)."""
        cfg, refs = self.cfg, model_refs(self.cfg, shard)
        data = self.data(shard.data_seed)
        built = [self.make_model(r.data_seed, r.train_seed) for r in refs]
        models, rhos = [m for m, _ in built], [rho for _, rho in built]
        stage_results, stage_states = [[] for _ in refs], {}
        for i, stage in enumerate(cfg.pretrain.stages):
            lrs = [stage.rate(cfg.pretrain.lrs[r.plr_index]) for r in refs]
            tasks = [self.task(lr, stage.epochs, rho, f"pretrain-stage{i}", r, cfg.pretrain.log_every_epochs,
                               stage.epochs, 0, ()) for lr, rho, r in zip(lrs, rhos, refs)]
            for j, (model, result) in enumerate(zip(models, self.train_all(models, data, tasks))):
                model.load_state_dict(result.state)  # the next stage starts where this one ended
                stage_results[j].append(result)
                stage_states.update(prefixed(f"{refs[j].tag}.stage{i}.", result.state))
        tasks = [self.task(cfg.pretrain.lrs[r.plr_index], cfg.pretrain.epochs, rho, "pretrain", r,
                           cfg.pretrain.log_every_epochs, cfg.pretrain.ckpt_every_epochs, cfg.checkpoints_kept,
                           tuple(cfg.swa.ks)) for r, rho in zip(refs, rhos)]
        metrics, evaluations, tensors = [], [], dict(stage_states)
        for ref, rho, earlier, result in zip(refs, rhos, stage_results, self.train_all(models, data, tasks)):
            result = joined_stages(earlier + [result])
            m, e = training_tables(key_row("pretrain", ref, cfg.pretrain.lrs[ref.plr_index]), result)
            e["epochs_to_convergence"] = result.epochs_to_convergence
            metrics.append(m)
            evaluations.append(e)
            tensors.update(prefixed(f"{ref.tag}.", {
                **prefixed("final.", result.state), "checkpoints": result.checkpoints,
                "checkpoint_buffers": result.checkpoint_buffers,
                "checkpoint_epochs": torch.tensor(result.checkpoint_epochs, dtype=torch.int64),
                "rho": torch.tensor(rho, dtype=torch.float64), **{f"swa.k{k}": v for k, v in result.swa.items()}}))
        writer.table("metrics", pd.concat(metrics, ignore_index=True))
        writer.table("evaluations", pd.concat(evaluations, ignore_index=True))
        writer.tensors("weights", tensors)

    def run_finetune(self, shard: Shard, writer: ShardWriter) -> None:
        """Fine-tune every PLR's final state at every FLR (one shared batch order per seed)."""
        cfg, refs = self.cfg, model_refs(self.cfg, shard)
        pretrained = self.weights(shard, "pretrain")
        jobs, models, tasks = [], [], []
        for ref in refs:
            for j, flr in enumerate(cfg.finetune.lrs):
                model, rho = self.make_model(ref.data_seed, ref.train_seed)
                model.load_state_dict(unprefixed(f"{ref.tag}.final.", pretrained))
                jobs.append((ref, j, flr))
                models.append(model)
                tasks.append(self.task(flr, cfg.finetune.epochs, rho, "finetune", ref, cfg.finetune.log_every_epochs,
                                       cfg.finetune.epochs, 0, ()))
        metrics, evaluations, tensors = [], [], {}
        for (ref, j, flr), result in zip(jobs, self.train_all(models, self.data(shard.data_seed), tasks)):
            m, e = training_tables(key_row("finetune", ref, cfg.pretrain.lrs[ref.plr_index], flr), result)
            metrics.append(m)
            evaluations.append(e)
            tensors.update(prefixed(f"{ref.tag}.flr{j}.", result.state))
        writer.table("metrics", pd.concat(metrics, ignore_index=True))
        writer.table("evaluations", pd.concat(evaluations, ignore_index=True))
        writer.tensors("weights", tensors)

    def swa_model(self, ref: ModelRef, k: int, pretrained: dict[str, torch.Tensor],
                  recompute: bool = True) -> nn.Module:
        """The average of the last K checkpoints (SI part at norm rho), BN recomputed on the training set."""
        model, rho = self.make_model(ref.data_seed, ref.train_seed)
        model.load_state_dict(unprefixed(f"{ref.tag}.final.", pretrained))
        load_tracked_(model, pretrained[f"{ref.tag}.swa.k{k}"], rho)
        if not recompute:
            return model
        data = self.data(ref.data_seed)
        return self.recompute_bn(model, data.train_x, data)

    def run_swa(self, shard: Shard, writer: ShardWriter) -> None:
        """Evaluate every SWA average (BN recomputed per model; train and test in eval mode), fused when possible."""
        cfg, refs = self.cfg, model_refs(self.cfg, shard)
        pretrained = self.weights(shard, "pretrain")
        flags = self.store.shard_table(shard.upstream("pretrain").name, "evaluations")
        data = self.data(shard.data_seed)
        jobs = [(ref, k) for ref in refs for k in cfg.swa.ks]
        models = [self.swa_model(ref, k, pretrained, recompute=False) for ref, k in jobs]
        stacks = self.stacks(models, data)
        for chunk, stack in stacks or []:
            recompute_bn_stack(stack, data.train_x, cfg.pretrain.batch_size, data.normalization, self.precision)
            for j, i in enumerate(chunk):
                models[i] = stack.load_into(j, models[i]).eval()
        if stacks is None:
            models = [self.recompute_bn(model, data.train_x, data) for model in models]
        rows = []
        for (ref, k), scores in zip(jobs, self.evaluate_all(models, data, stacks)):
            diverged = bool(flags[(flags["train_seed"] == ref.train_seed)
                                  & (flags["plr"] == cfg.pretrain.lrs[ref.plr_index])]["diverged"].any())
            finite = bool(torch.isfinite(pretrained[f"{ref.tag}.swa.k{k}"]).all())
            rows.append({**key_row("swa", ref, cfg.pretrain.lrs[ref.plr_index], swa_k=k), **scores,
                         "diverged": diverged or not finite})
        writer.table("evaluations", pd.DataFrame(rows))

    def run_analyze(self, shard: Shard, writer: ShardWriter) -> None:
        """Every registered image measurement of the shard's models (geometry, ...)."""
        run_measurements(ImageAnalysis(self.cfg, shard, self.data(shard.data_seed), self), writer)


def check_curvature_fits(cfg: ImageConfig) -> None:
    """curvature.top_k must fit the model's (tangent) dimension: checked on a model built on the meta device."""
    from ..analysis.image_curvature import check_image_curvature_model

    shape, classes = dataset_shape(cfg)
    with torch.device("meta"):
        model = build_model(cfg.model, shape, classes, 0)
    check_image_curvature_model(model, cfg.curvature.top_k, model_entry(cfg.model.name).has_si_group)


def dataset_shape(cfg: ImageConfig) -> tuple[tuple[int, ...], int]:
    """(input shape, classes) of the configured data set (loaded as the experiment loads it)."""
    d = cfg.data
    dataset = load_image_dataset(d.dataset, d.root or None, d.max_per_class or None, seed=cfg.seeds.data[0],
                                 classes=d.classes or None, sha256=d.sha256 or None, test_fraction=d.test_fraction)
    return tuple(dataset.input_shape), dataset.num_classes


OLD_LAYOUT = re.compile(r"^(pretrain|finetune|swa|analyze)-d\d+-s\d+-plr\d{3}$")


def check_layout(store: ExperimentStore) -> None:
    """Refuse a store written one model per shard (lrfeatures < 0.3): its shards cannot be resumed here."""
    old = [p.name for p in store.shards_dir.glob("*") if OLD_LAYOUT.match(p.name)] if store.shards_dir.is_dir() else []
    if old:
        raise StoreError(f"{store.root} holds one image model per shard ({old[0]}, ...), written by lrfeatures < 0.3; "
                         "this release keeps every PLR of a seed in one shard, so it cannot resume it: run the "
                         "experiment into a new --out (`lrfeatures report` still reads this one)")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX or AVX-512 BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


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

    def units(self, cfg: ImageConfig) -> list[SeedChunk]:
        """One unit per data seed and chunk of training seeds (every PLR of them in one shard)."""
        return [SeedChunk(d, chunk) for d in cfg.seeds.data for chunk in seed_chunks(cfg)]

    def cost(self, cfg: ImageConfig, shard: Shard) -> int:
        """Model-epochs a shard trains."""
        models = len(shard.train_seeds) * len(cfg.pretrain.lrs)
        if shard.stage == "pretrain":
            return models * (cfg.pretrain.epochs + sum(s.epochs for s in cfg.pretrain.stages))
        if shard.stage == "finetune":
            return models * len(cfg.finetune.lrs) * cfg.finetune.epochs
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
        if cfg.curvature.enabled:
            check_curvature_fits(cfg)
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
