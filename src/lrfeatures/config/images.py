"""The image experiment's config (SPEC §4, §6): data, model, sphere, practical optimizer, grids, engine.

Fields that need a registry (data.dataset, model.name and its options, data.randaugment's
magnitude) are checked by the images recipe at the edge (lrfeatures.experiments.images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..optim import OPTIMIZERS, OptimizerConfig, ScheduleConfig, build_optimizer
from .base import get_field
from .synthetic import StageRate, check_stages
from .sections import (CurvatureConfig, ExperimentSections, FinetuneGrid, ModelConfig, PretrainGrid, SphereConfig,
                       check_curvature, check_shared)


@dataclass
class ImageDataConfig:
    """Which images: CIFAR archives or an image folder, how many, and how they are fed."""

    dataset: str = "cifar10"          # a registered data set: cifar10, cifar100, folder:PATH, tinyimagenet:PATH, ...
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
class ImagePretrainStage(StageRate):
    """An image pre-training stage: its rate (see StageRate) and length in epochs."""

    epochs: int = 0


@dataclass
class ImagePretrainConfig(PretrainGrid):
    """Pre-training over a grid of effective LRs, counted in epochs (SWA itself is accumulated online).

    `stages` run first, in order, each from the previous one's weights; the last stage is always
    `epochs` epochs at the grid PLR, and its checkpoints feed SWA and its weights fine-tuning.
    """

    batch_size: int = 128
    epochs: int = 200
    ckpt_every_epochs: int = 1
    log_every_epochs: int = 1
    stages: list[ImagePretrainStage] = field(default_factory=list)  # [] = one stage at the grid PLR


@dataclass
class ImageFinetuneConfig(FinetuneGrid):
    """Fine-tuning each PLR's final state over a grid of FLRs, counted in epochs."""

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


PRECISIONS = ("fp32", "bf16")  # engine.precision values (engine.images.amp_context says what bf16 means)


def check_precision(precision: str) -> None:
    """A one-line error for a precision the engines do not know."""
    if precision not in PRECISIONS:
        raise ConfigError(f"engine.precision={precision!r} is unknown; use {' or '.join(map(repr, PRECISIONS))}")


@dataclass
class ImageEngineConfig:
    """Where and how models train."""

    name: str = "auto"                # "fused": a stage's models as one program (engine/fused.py) | "single":
                                      # one at a time | "auto": fused on CUDA, single on CPU (faster there, measured)
    device: str = "cpu"
    precision: str = "fp32"           # "fp32" | "bf16" (convs and linears in bf16, the rest fp32; both engines)
    channels_last: bool = False       # NHWC convolutions (one-model engine; CPU and CUDA)
    memory_budget_gb: float = 4.0     # fused: models per chunk; single: kept checkpoints stay on the device
    train_seeds_per_shard: int = 0    # 0: all training seeds of a data seed (and all their PLRs) in one shard
    eval_batch_size: int = 1000
    threads: int = 0                  # CPU threads for torch while the experiment runs (0 = torch's default)


@dataclass
class ImageAnalysisConfig:
    """Geometry of the reached minima (SPEC §6)."""

    geometry_points: int = 21         # points on each linear path
    geometry_train_samples: int = 0   # training images for BN recompute and train error on paths (0 = all)


@dataclass
class ImageConfig(ExperimentSections):
    """A full image experiment: pretrain -> finetune -> SWA -> geometry."""

    kind: str = "images"
    name: str = "images"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="convnet-si", width=32, depth=3))
    sphere: SphereConfig = field(default_factory=lambda: SphereConfig(rho=0.0))  # 0: the norm at init
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    optimizer: ImageOptimizerConfig = field(default_factory=ImageOptimizerConfig)  # non-SI parameters only
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # their LR per step; SI ELR stays fixed
    pretrain: ImagePretrainConfig = field(default_factory=ImagePretrainConfig)
    finetune: ImageFinetuneConfig = field(default_factory=ImageFinetuneConfig)
    engine: ImageEngineConfig = field(default_factory=ImageEngineConfig)
    analysis: ImageAnalysisConfig = field(default_factory=ImageAnalysisConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field (the data set and model are checked by the recipe)."""
        check_shared(self, ("pretrain.epochs", "pretrain.batch_size", "pretrain.ckpt_every_epochs",
                            "pretrain.log_every_epochs", "finetune.epochs", "finetune.log_every_epochs",
                            "engine.eval_batch_size"),
                     self.pretrain.epochs // self.pretrain.ckpt_every_epochs, "epochs", rho_may_be_zero=True)
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
        if self.analysis.geometry_points < 2:
            raise ConfigError(f"analysis.geometry_points={self.analysis.geometry_points} must be >= 2 "
                              "(the SPEC uses 21)")
        if not self.swa.ks:
            raise ConfigError("swa.ks is empty; give at least one K, e.g. --set swa.ks=[2]")
        check_curvature(self.curvature)
        check_stages(self.pretrain.stages, "epochs")
        if self.engine.name not in ("auto", "fused", "single"):
            raise ConfigError(f"engine.name={self.engine.name!r} is unknown; use 'auto', 'fused' or 'single'")
        check_precision(self.engine.precision)
        if self.engine.train_seeds_per_shard < 0:
            raise ConfigError("engine.train_seeds_per_shard must be >= 0 (0 = all seeds in one shard)")

    def validate_practical(self) -> None:
        """The optimizer, schedule and augmentation fields of the practical setting."""
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
        if self.data.crop_padding < 0:
            raise ConfigError(f"data.crop_padding={self.data.crop_padding} must be >= 0")

    @property
    def checkpoints_kept(self) -> int:
        """How many of the most recent epoch checkpoints are stored per model."""
        n_ckpts = self.pretrain.epochs // self.pretrain.ckpt_every_epochs
        return min(self.pretrain.keep_checkpoints or max(self.swa.ks), n_ckpts)


