"""The image experiment (SPEC §4, §6): pretrain a PLR grid -> fine-tune -> SWA -> geometry.

Shards per (data seed, training seed, PLR), each a unit of work in the store:
    pretrain   train from the seed's initial point at the PLR; final state, last checkpoints
               and the SWA averages of the last K epoch checkpoints (accumulated online)
    finetune   every FLR from the pretrained final state
    swa        each SWA average, rescaled to rho, BN recomputed on the training set, evaluated
    analyze    angles and error barriers of FT-low, FT-high and SWA (BN recomputed at every
               interpolation point); needs finetune and swa
All PLRs of a training seed share the initial point and the batch order (as in the synthetic
protocol), so the LR is the only difference between them. A finished shard is never
recomputed: running the same experiment again resumes it. Tables follow notes/tables.md;
pretrain rows of evaluations also carry `epochs_to_convergence`.

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
part is put back at norm rho. Angles are measured over the SI group when there is one, else over
ALL trainable parameters; barriers of a model without SI group interpolate its raw parameters
(nothing to rescale) and always recompute BN. Training regimes (SPEC §1) are defined for a
fixed effective LR on the sphere: for a model without SI group summary.json says regime = null
and "regimes": {"defined": false, ...}, and the figures draw no boundaries.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

from .analysis.geometry import angular_distance, linear_barrier
from .analysis.probes import GEOMETRY_PAIRS, geometry_swa_k
from .analysis.summary import write_summary
from .config import (ModelConfig, SeedsConfig, SphereConfig, SWAConfig, check_lrs, check_positive, get_field,
                     load_config, preset_names, read_toml, register_config_kind)
from .data.augment import Augment
from .data.images import CIFAR, first_per_class, load_image_dataset
from .data.randaugment import MAX_MAGNITUDE, RandAugment
from .engine.images import (DeviceImages, ImageTask, ImageTrainResult, evaluate, load_si_, load_tracked_,
                            recompute_bn, tracked_parameters, train_image_model)
from .errors import ConfigError
from .models.registry import build_model, si_parameters
from .models.vit import ViT
from .optim import OPTIMIZERS, OptimizerConfig, ScheduleConfig, build_optimizer
from .protocol import KEY_COLUMNS, resolve_device
from .seeding import derive_seed, generator
from .sphere import flatten
from .store import ExperimentStore, ShardWriter, write_json

# Image models and whether they have an SI group (trained on the sphere).
IMAGE_MODELS = {"convnet-si": True, "resnet18-si": True, "vit-si": True, "resnet18": False, "vit": False}
TABLES = ("metrics", "evaluations", "geometry")


# ---------------------------------------------------------------- config

@dataclass
class ImageDataConfig:
    """Which images: CIFAR archives or an image folder, how many, and how they are fed."""

    dataset: str = "cifar10"          # "cifar10" | "cifar100" | "folder:PATH"
    root: str = ""                    # where the archive is (default: $LRFEATURES_DATA)
    max_per_class: int = 0            # first N images of each class per split (0 = all)
    max_test_per_class: int = 0       # a smaller test set (0 = as max_per_class)
    val_fraction: float = 0.0         # seeded, stratified part of train held out as val
    test_fraction: float = 0.2        # test part of a folder without train/ and test/
    augment: bool = False             # random crop (pad crop_padding) + flip; off in the paper's SI setup
    crop_padding: int = 4             # zero padding of the random crop
    randaugment: list[int] = field(default_factory=list)  # [N, M]: RandAugment(N, M) after crop/flip; [] = off
    normalization: str = "cifar"      # "cifar" (SPEC mean/std) | "dataset" (from the training images)
    classes: list[str] = field(default_factory=list)  # label order of a folder (default: sorted names)
    sha256: str = ""                  # checksum of your own copy instead of the official MD5


@dataclass
class ImagePretrainConfig:
    """Pre-training over a grid of effective LRs, counted in epochs."""

    lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1])
    epochs: int = 200
    batch_size: int = 128
    ckpt_every_epochs: int = 1
    log_every_epochs: int = 1
    keep_checkpoints: int = 0         # checkpoints stored (0: the largest SWA K); SWA itself is online


@dataclass
class ImageFinetuneConfig:
    """Fine-tuning each PLR's final state over a grid of FLRs."""

    lrs: list[float] = field(default_factory=lambda: [1e-5, 3e-4])
    epochs: int = 200
    log_every_epochs: int = 1


@dataclass
class ImageOptimizerConfig:
    """The optimizer of every trainable parameter outside the SI group (see the module docstring)."""

    name: str = "sgd"                 # "sgd" | "adam" | "adamw"
    momentum: float = 0.0             # sgd only
    weight_decay: float = 0.0         # L2 for sgd/adam, decoupled for adamw; never on the SI group
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw
    eps: float = 1e-8
    lr_scale: float = 1.0             # their LR = lr_scale x the grid LR (PLR / FLR)

    def at(self, lr: float) -> OptimizerConfig:
        """The optimizer for grid LR `lr`."""
        return OptimizerConfig(self.name, lr * self.lr_scale, self.momentum, self.weight_decay,
                               tuple(self.betas), self.eps)


@dataclass
class ViTOptionsConfig:
    """ViT sizes besides model.width (= dim) and model.depth; SPEC §4 values by default."""

    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 512
    patch: int = 4
    dropout: float = 0.1
    emb_dropout: float = 0.1


@dataclass
class ImageEngineConfig:
    """Where and how models train."""

    device: str = "cpu"
    bf16: bool = False                # bf16 autocast (CUDA only; ignored with a warning on CPU)
    channels_last: bool = False       # NHWC convolutions (CUDA only; ignored with a warning on CPU)
    memory_budget_gb: float = 4.0     # kept checkpoints stay on the device when they fit in this
    eval_batch_size: int = 1000
    threads: int = 0                  # CPU threads for torch while the experiment runs (0 = torch's default)


@dataclass
class ImageAnalysisConfig:
    """Geometry of the reached minima (SPEC §6)."""

    geometry_points: int = 21         # points on each linear path
    geometry_train_samples: int = 0   # training images for BN recompute and train error on paths (0 = all)


@dataclass
class ImageConfig:
    """A full image experiment: pretrain -> finetune -> SWA -> geometry."""

    kind: str = "images"
    name: str = "images"
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="convnet-si", width=32, depth=3))
    sphere: SphereConfig = field(default_factory=lambda: SphereConfig(rho=0.0))  # 0: the norm at init
    optimizer: ImageOptimizerConfig = field(default_factory=ImageOptimizerConfig)  # non-SI parameters only
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # their LR per step; SI ELR stays fixed
    vit: ViTOptionsConfig = field(default_factory=ViTOptionsConfig)   # used by vit / vit-si only
    pretrain: ImagePretrainConfig = field(default_factory=ImagePretrainConfig)
    finetune: ImageFinetuneConfig = field(default_factory=ImageFinetuneConfig)
    swa: SWAConfig = field(default_factory=SWAConfig)
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    engine: ImageEngineConfig = field(default_factory=ImageEngineConfig)
    analysis: ImageAnalysisConfig = field(default_factory=ImageAnalysisConfig)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field and how to fix it."""
        check_lrs("pretrain.lrs", self.pretrain.lrs)
        check_lrs("finetune.lrs", self.finetune.lrs, allow_empty=True)
        for name in ("pretrain.epochs", "pretrain.batch_size", "pretrain.ckpt_every_epochs",
                     "pretrain.log_every_epochs", "finetune.epochs", "finetune.log_every_epochs",
                     "model.width", "model.depth", "engine.memory_budget_gb", "engine.eval_batch_size"):
            check_positive(name, get_field(self, name))
        spec = self.data.dataset
        if spec not in CIFAR and not (spec.startswith("folder:") and spec[len("folder:"):]):
            raise ConfigError(f"data.dataset={spec!r} is unknown; use cifar10, cifar100 or folder:PATH")
        if self.model.name not in IMAGE_MODELS:
            raise ConfigError(f"model.name={self.model.name!r} is not an image model here; "
                              f"use one of: {', '.join(IMAGE_MODELS)}")
        self.validate_practical()
        if self.data.normalization not in ("cifar", "dataset"):
            raise ConfigError(f"data.normalization={self.data.normalization!r} is unknown; use 'cifar' or 'dataset'")
        for name in ("data.max_per_class", "data.max_test_per_class", "pretrain.keep_checkpoints",
                     "analysis.geometry_train_samples", "engine.threads"):
            if get_field(self, name) < 0:
                raise ConfigError(f"{name}={get_field(self, name)} must be >= 0 (0 = all)")
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.data.val_fraction} must be in [0, 1)")
        if not 0.0 < self.data.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction={self.data.test_fraction} must be in (0, 1)")
        if self.sphere.step not in ("projected", "riemannian"):
            raise ConfigError(f"sphere.step={self.sphere.step!r} is unknown; use 'projected' or 'riemannian'")
        if not (math.isfinite(self.sphere.rho) and self.sphere.rho >= 0):
            raise ConfigError(f"sphere.rho={self.sphere.rho} must be > 0, or 0 for the norm at initialization")
        if self.analysis.geometry_points < 2:
            raise ConfigError(f"analysis.geometry_points={self.analysis.geometry_points} must be >= 2 "
                              "(the SPEC uses 21)")
        if not self.seeds.data or not self.seeds.train:
            raise ConfigError("seeds.data and seeds.train must each list at least one seed")
        for name in ("seeds.data", "seeds.train", "pretrain.lrs", "finetune.lrs", "swa.ks"):
            values = get_field(self, name)
            if len(set(values)) != len(values):
                raise ConfigError(f"{name} has repeated values {values}; list each once")
        if not self.swa.ks:
            raise ConfigError("swa.ks is empty; give at least one K, e.g. --set swa.ks=[2]")
        n_ckpts = self.pretrain.epochs // self.pretrain.ckpt_every_epochs
        for k in self.swa.ks:
            if not 1 <= k <= n_ckpts:
                raise ConfigError(f"swa.ks holds {k} but pre-training saves only {n_ckpts} checkpoints; "
                                  f"use K in 1..{n_ckpts} or more epochs")

    def validate_practical(self) -> None:
        """The optimizer, schedule, augmentation and ViT fields of the practical setting."""
        o = self.optimizer
        if o.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer.name={o.name!r} is unknown; use one of: {', '.join(OPTIMIZERS)}")
        if not (math.isfinite(o.lr_scale) and o.lr_scale > 0):
            raise ConfigError(f"optimizer.lr_scale={o.lr_scale} must be > 0 (1 = the grid LR)")
        if len(o.betas) != 2:
            raise ConfigError(f"optimizer.betas={o.betas} must be two numbers, e.g. [0.9, 0.999]")
        probe = torch.zeros(1, requires_grad=True)
        try:  # the optimizer and schedule builders check every field; name the section on failure
            optimizer = build_optimizer([probe], o.name, 1.0, o.momentum, o.weight_decay, tuple(o.betas), o.eps)
        except ConfigError as err:
            raise ConfigError(f"optimizer: {err}") from None
        try:
            self.schedule.build(optimizer, self.schedule.warmup_steps + 1)
        except ConfigError as err:
            raise ConfigError(f"schedule: {err}") from None
        d = self.data
        if d.crop_padding < 0:
            raise ConfigError(f"data.crop_padding={d.crop_padding} must be >= 0")
        if d.randaugment and (len(d.randaugment) != 2 or d.randaugment[0] < 0
                              or not 0 <= d.randaugment[1] <= MAX_MAGNITUDE):
            raise ConfigError(f"data.randaugment={d.randaugment} must be [N, M] with N >= 0 and M in 0..30 "
                              "(the paper's ViT: [2, 14]), or [] for none")
        v = self.vit
        if min(v.heads, v.dim_head, v.mlp_dim, v.patch) < 1:
            raise ConfigError("vit.heads, vit.dim_head, vit.mlp_dim and vit.patch must be >= 1")
        for name in ("vit.dropout", "vit.emb_dropout"):
            if not 0.0 <= get_field(self, name) < 1.0:
                raise ConfigError(f"{name}={get_field(self, name)} must be in [0, 1)")

    @property
    def has_si_group(self) -> bool:
        """Whether the model trains an SI group on the sphere (regimes are defined)."""
        return IMAGE_MODELS[self.model.name]

    @property
    def checkpoints_kept(self) -> int:
        """How many of the most recent epoch checkpoints are stored per model."""
        n_ckpts = self.pretrain.epochs // self.pretrain.ckpt_every_epochs
        return min(self.pretrain.keep_checkpoints or max(self.swa.ks), n_ckpts)


register_config_kind("images", ImageConfig)


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
    return load_config(data, list(overrides), kind="images")


# ---------------------------------------------------------------- shards

@dataclass(frozen=True)
class ImageShard:
    """One unit of work: a stage for one (data seed, training seed, PLR)."""

    stage: str
    data_seed: int
    train_seed: int
    plr_index: int

    @property
    def name(self) -> str:
        """Directory name in the store."""
        return f"{self.stage}-d{self.data_seed}-s{self.train_seed}-plr{self.plr_index:03d}"

    def upstream(self, stage: str) -> "ImageShard":
        """The shard of another stage for the same model."""
        return ImageShard(stage, self.data_seed, self.train_seed, self.plr_index)


DEPENDS_ON = {"pretrain": (), "finetune": ("pretrain",), "swa": ("pretrain",), "analyze": ("finetune", "swa")}


def stages(cfg: ImageConfig) -> list[str]:
    """The stages this config needs, in dependency order (no FLRs: no finetune, no geometry)."""
    return [s for s in DEPENDS_ON if cfg.finetune.lrs or s not in ("finetune", "analyze")]


def dependencies(cfg: ImageConfig, shard: ImageShard) -> list[ImageShard]:
    """The shards that must be complete before `shard` can run."""
    return [shard.upstream(s) for s in DEPENDS_ON[shard.stage] if s in stages(cfg)]


def plan_shards(cfg: ImageConfig) -> list[ImageShard]:
    """All shards, PLR by PLR, each after the shards it depends on."""
    return [ImageShard(stage, d, s, i) for d in cfg.seeds.data for s in cfg.seeds.train
            for i in range(len(cfg.pretrain.lrs)) for stage in stages(cfg)]


def shard_cost(cfg: ImageConfig, shard: ImageShard) -> int:
    """Model-epochs a shard trains (0 for evaluation-only shards); used for progress."""
    if shard.stage == "pretrain":
        return cfg.pretrain.epochs
    if shard.stage == "finetune":
        return len(cfg.finetune.lrs) * cfg.finetune.epochs
    return 0


def pending_cost(cfg: ImageConfig, store: ExperimentStore) -> int:
    """Model-epochs still to train."""
    return sum(shard_cost(cfg, s) for s in plan_shards(cfg) if not store.is_done(s.name))


def key_row(stage: str, shard: ImageShard, plr: float, flr: float = math.nan, swa_k: int = 0) -> dict[str, Any]:
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


# ---------------------------------------------------------------- models and augmentation

def build_image_model(cfg: ImageConfig, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """The experiment's network (CPU), weights drawn from `seed`; the ViT takes its sizes from cfg.vit."""
    if cfg.model.name not in ("vit", "vit-si"):
        return build_model(cfg.model, input_shape, num_classes, seed)
    if len(input_shape) != 3:
        raise ConfigError(f"the ViT needs image inputs (C, H, W), got {tuple(input_shape)}")
    c, h, w = input_shape
    v = cfg.vit
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViT((h, w), c, num_classes, dim=cfg.model.width, depth=cfg.model.depth, heads=v.heads,
                   dim_head=v.dim_head, mlp_dim=v.mlp_dim, patch=v.patch, dropout=v.dropout,
                   emb_dropout=v.emb_dropout, scale_invariant=cfg.model.name == "vit-si",
                   norm_eps=cfg.model.norm_eps)


class AugmentPipeline:
    """Random crop + flip, then RandAugment(N, M), on uint8 batches; one generator feeds both."""

    def __init__(self, crop_flip: Augment | None, randaugment: RandAugment | None):
        self.crop_flip, self.randaugment = crop_flip, randaugment

    @classmethod
    def from_config(cls, d: ImageDataConfig) -> "AugmentPipeline | None":
        """The pipeline a data config asks for (None: no augmentation)."""
        crop_flip = Augment(d.crop_padding) if d.augment else None
        randaugment = RandAugment(d.randaugment[0], d.randaugment[1]) if d.randaugment else None
        return cls(crop_flip, randaugment) if crop_flip or randaugment else None

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Augmented copy of the batch x [B, C, H, W]."""
        if self.crop_flip is not None:
            x = self.crop_flip(x, gen)
        if self.randaugment is not None:
            x = self.randaugment(x, gen)
        return x


# ---------------------------------------------------------------- runner

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
        model = build_image_model(self.cfg, tuple(info["input_shape"]), info["num_classes"],
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

    def task(self, lr: float, epochs: int, rho: float, stage: str, shard: ImageShard, log_every: int,
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

    def weights(self, shard: ImageShard, stage: str) -> dict[str, torch.Tensor]:
        """The tensors a finished upstream shard stored."""
        return self.store.shard_tensors(shard.upstream(stage).name, "weights")

    # ----- shards ----------------------------------------------------------------------
    def run(self, shard: ImageShard) -> bool:
        """Run a shard unless it is done; True if it ran."""
        if self.store.is_done(shard.name):
            return False
        for upstream in dependencies(self.cfg, shard):
            if not self.store.is_done(upstream.name):
                raise RuntimeError(f"shard {shard.name} needs {upstream.name} first")
        started = time.time()
        writer = self.store.writer(shard.name)
        try:
            getattr(self, f"run_{shard.stage}")(shard, writer)
            writer.commit({"seconds": time.time() - started, "device": str(self.device)})
        except BaseException:
            writer.abort()
            raise
        return True

    def run_pretrain(self, shard: ImageShard, writer: ShardWriter) -> None:
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

    def run_finetune(self, shard: ImageShard, writer: ShardWriter) -> None:
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

    def swa_model(self, shard: ImageShard, k: int, pretrained: dict[str, torch.Tensor]) -> nn.Module:
        """The average of the last K checkpoints (SI part at norm rho), BN recomputed on the training set."""
        model, rho = self.make_model(shard.data_seed, shard.train_seed)
        model.load_state_dict(unprefixed("final.", pretrained))
        load_tracked_(model, pretrained[f"swa.k{k}"], rho)
        data = self.data(shard.data_seed)
        return self.recompute_bn(model, data.train_x, data)

    def run_swa(self, shard: ImageShard, writer: ShardWriter) -> None:
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

    def run_analyze(self, shard: ImageShard, writer: ShardWriter) -> None:
        """Angles and train/test error barriers (in %) of FT-low, FT-high and SWA (SPEC §6)."""
        cfg, d = self.cfg, shard.data_seed
        data = self.data(d)
        plr = cfg.pretrain.lrs[shard.plr_index]
        pretrained = self.weights(shard, "pretrain")
        finetuned = self.weights(shard, "finetune")
        work, rho = self.make_model(d, shard.train_seed)
        work.load_state_dict(unprefixed("final.", pretrained))
        # Angles over the SI group when there is one, else over every trainable parameter.
        n_angle = sum(p.numel() for p in si_parameters(work)) or None

        def tracked_of(state: dict[str, torch.Tensor]) -> torch.Tensor:
            work.load_state_dict(state)
            return flatten(tracked_parameters(work)).detach().clone()

        flrs = cfg.finetune.lrs
        ft_low = tracked_of(unprefixed(f"flr{flrs.index(min(flrs))}.", finetuned))
        ft_high = tracked_of(unprefixed(f"flr{flrs.index(max(flrs))}.", finetuned))
        k = geometry_swa_k(cfg.swa.ks)
        swa = pretrained[f"swa.k{k}"].to(ft_low)
        x_train, y_train = data.train_x, data.train_y
        n = cfg.analysis.geometry_train_samples
        if n and n < len(x_train):
            subset = torch.randperm(len(x_train), generator=generator("geometry-subset", d))[:n].to(x_train.device)
            x_train, y_train = x_train[subset], y_train[subset]

        # Each solution ends two of the three paths; its errors are measured once.
        solutions, known, current = (ft_low, ft_high, swa), {}, [None]

        def prepare(w: torch.Tensor) -> torch.Tensor:
            current[0] = next((i for i, sol in enumerate(solutions) if torch.equal(w, sol)), None)
            if current[0] not in known:
                load_tracked_(work, w, rho)
                self.recompute_bn(work, x_train, data)
            return w

        def error(_: torch.Tensor) -> dict[str, float]:
            if current[0] in known:
                return known[current[0]]
            # Both splits in eval mode with the statistics `prepare` just recomputed.
            splits = {"train": (x_train, y_train), "test": (data.test_x, data.test_y)}
            errors = {split: 100 * (1 - float(evaluate(work, x, y, data.normalization, cfg.engine.eval_batch_size,
                                                       self.bf16, self.channels_last)[1]))
                      for split, (x, y) in splits.items()}
            if current[0] is not None:
                known[current[0]] = errors
            return errors

        rows = []
        for pair, (first, second) in zip(GEOMETRY_PAIRS, [(ft_low, ft_high), (swa, ft_high), (swa, ft_low)]):
            result = linear_barrier(error, first, second, cfg.analysis.geometry_points, prepare)
            rows.append({"data_seed": d, "train_seed": shard.train_seed, "plr": plr, "pair": pair,
                         "angle": float(angular_distance(first[:n_angle], second[:n_angle])),
                         "train_barrier": result["barrier"]["train"], "test_barrier": result["barrier"]["test"],
                         "swa_k": k})
        writer.table("geometry", pd.DataFrame(rows))


# ---------------------------------------------------------------- experiment

class ImageExperiment:
    """Runs the shards of one image experiment and writes its merged tables and summary."""

    def __init__(self, cfg: ImageConfig, root: str | Path, progress: Callable[[int], None] | None = None):
        self.cfg = cfg
        self.store = ExperimentStore.create(root, cfg)
        self.runner = ImageRunner(cfg, self.store, progress)

    def run_shard(self, shard: ImageShard) -> bool:
        """Run one shard unless it is complete; True if it ran."""
        return self.runner.run(shard)

    def run(self) -> dict:
        """Run every pending shard in order, then merge the tables and write summary.json."""
        self.store.clean_partial()
        threads = torch.get_num_threads()
        if self.cfg.engine.threads:
            torch.set_num_threads(self.cfg.engine.threads)
        try:
            for shard in plan_shards(self.cfg):
                self.run_shard(shard)
        finally:
            torch.set_num_threads(threads)
        return self.finalize()

    def finalize(self) -> dict:
        """Merge shard tables into the experiment's tables and write its summary."""
        if not (self.store.root / "dataset.json").is_file():
            self.runner.info()  # the summary's chance level needs the number of classes
        for name in TABLES:
            self.store.merge_table(name)
        return write_summary(self.store)
