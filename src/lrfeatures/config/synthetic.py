"""The synthetic experiment's config (SPEC §3): the tick data, an SI MLP grid, fixed-ELR training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError
from .sections import CurvatureConfig, ExperimentSections, FinetuneGrid, PretrainGrid, check_curvature, check_shared


@dataclass
class SyntheticDataConfig:
    """The 2-D feature data set of SPEC §3."""

    shape: str = "tick"
    n_features: int = 16
    n_train: int = 512
    n_test: int = 2000
    n_probe: int = 1000
    margin: float = 0.1
    informative_prob: float = 1.0
    label_noise: float = 0.0


@dataclass
class StageRate:
    """The ELR of a pre-training stage before the last: a fixed ELR (`lr`) or a multiple of the grid PLR."""

    lr: float = 0.0          # this stage's effective LR for every grid PLR (0: use lr_scale)
    lr_scale: float = 0.0    # or lr_scale x the grid PLR (0: use lr)

    def rate(self, plr: float) -> float:
        """This stage's ELR for the model of grid PLR `plr`."""
        return self.lr or self.lr_scale * plr


@dataclass
class PretrainStage(StageRate):
    """A synthetic pre-training stage: its rate and length in iterations."""

    iterations: int = 0


@dataclass
class PretrainConfig(PretrainGrid):
    """Pre-training over a grid of effective learning rates (PLRs), counted in iterations.

    `stages` run first, in order, each from the previous one's weights; the last stage is always
    `iterations` steps at the grid PLR, and its checkpoints feed SWA and its weights fine-tuning.
    """

    iterations: int = 1000
    ckpt_every: int = 100
    log_every: int = 100
    stages: list[PretrainStage] = field(default_factory=list)  # [] = one stage at the grid PLR


def check_stages(stages: list, length: str = "iterations") -> None:
    """Each earlier stage needs `length` > 0 (iterations or epochs) and exactly one of lr > 0 or lr_scale > 0."""
    for i, stage in enumerate(stages):
        where = f"pretrain.stages[{i}]"
        if stage.lr == 0 and stage.lr_scale == 0 and getattr(stage, length) == 0:
            raise ConfigError(f"{where} is empty; give e.g. {{lr = 0.03, {length} = 20}} or remove it")
        for name in ("lr", "lr_scale"):
            value = getattr(stage, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{where}.{name}={value} must be > 0 (a learning rate)")
        if (stage.lr > 0) == (stage.lr_scale > 0):
            raise ConfigError(f"{where} must set exactly one of lr (an ELR) or lr_scale (x the grid PLR), "
                              "each > 0")
        if getattr(stage, length) <= 0:
            raise ConfigError(f"{where}.{length}={getattr(stage, length)} must be > 0")


@dataclass
class FinetuneConfig(FinetuneGrid):
    """Fine-tuning every PLR's final weights over a grid of FLRs, counted in iterations."""

    iterations: int = 500
    log_every: int = 100


@dataclass
class EngineConfig:
    """How to run the grid: engine, device and memory budget."""

    name: str = "grid"  # "grid" or "reference"
    device: str = "cpu"
    memory_budget_gb: float = 4.0
    train_seeds_per_shard: int = 0  # 0: all training seeds of a data seed in one shard
    compile: bool = False  # torch.compile the grid step (~2x on CPU; a few seconds to compile)
    native: bool = True  # SI MLPs on CPU: the compiled C kernel (engine/native.py), ~5x the torch kernels


@dataclass
class SyntheticConfig(ExperimentSections):
    """A full synthetic experiment: pretrain -> finetune -> SWA -> feature importance."""

    kind: str = "synthetic"
    name: str = "synthetic"
    data: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field and how to fix it."""
        check_shared(self, ("pretrain.iterations", "pretrain.batch_size", "pretrain.ckpt_every",
                            "pretrain.log_every", "finetune.iterations", "finetune.log_every",
                            "data.n_features", "data.n_train", "data.n_test", "data.n_probe"),
                     self.pretrain.iterations // self.pretrain.ckpt_every, "iterations")
        if self.pretrain.batch_size > self.data.n_train:
            raise ConfigError(f"pretrain.batch_size={self.pretrain.batch_size} exceeds data.n_train="
                              f"{self.data.n_train}; lower the batch size or add training samples")
        if not 0.0 <= self.data.label_noise < 0.5:
            raise ConfigError(f"data.label_noise={self.data.label_noise} must be in [0, 0.5)")
        if not 0.0 <= self.data.informative_prob <= 1.0:
            raise ConfigError(f"data.informative_prob={self.data.informative_prob} must be in [0, 1]")
        if self.data.margin < 0:
            raise ConfigError(f"data.margin={self.data.margin} must be >= 0")
        if self.engine.name not in ("grid", "reference"):
            raise ConfigError(f"engine.name={self.engine.name!r} is unknown; use 'grid' or 'reference'")
        if self.engine.train_seeds_per_shard < 0:
            raise ConfigError("engine.train_seeds_per_shard must be >= 0 (0 = all seeds in one shard)")
        check_stages(self.pretrain.stages)
        check_curvature(self.curvature)

    @property
    def checkpoints_kept(self) -> int:
        """How many of the most recent pre-training checkpoints are stored per model."""
        return self.pretrain.keep_checkpoints or max(self.swa.ks, default=1)
