"""Config sections both experiment kinds share, and the rules that check them (written once)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .base import check_lrs, check_positive, get_field

SPHERE_STEPS = ("projected", "riemannian")


@dataclass
class ModelConfig:
    """Which network to build; fields a model does not use are ignored by it."""

    name: str = "mlp-si"
    width: int = 32
    depth: int = 2
    activation: str = "relu"
    last_layer_norm: float = 10.0
    norm_eps: float = 1e-7
    options: dict[str, Any] = field(default_factory=dict)  # the model's own options (see its registry entry)


@dataclass
class SphereConfig:
    """Training on the sphere: the joint norm rho of the SI group and the step rule."""

    rho: float = 1.0
    step: str = "projected"  # "projected" or "riemannian"


@dataclass
class SWAConfig:
    """Stochastic weight averaging of the last K pre-training checkpoints."""

    ks: list[int] = field(default_factory=lambda: [2, 5])


@dataclass
class SeedsConfig:
    """Data seeds (one data set each) and training seeds (init and batch order)."""

    data: list[int] = field(default_factory=lambda: [0])
    train: list[int] = field(default_factory=lambda: [0])


@dataclass
class PretrainGrid:
    """What both kinds' pre-training sections share: the PLR grid, the batch size, kept checkpoints."""

    lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1])
    batch_size: int = 16
    keep_checkpoints: int = 0  # checkpoints stored (0: as many as the largest SWA K needs)


@dataclass
class FinetuneGrid:
    """What both kinds' fine-tuning sections share: the FLR grid (empty: no fine-tuning)."""

    lrs: list[float] = field(default_factory=lambda: [1e-4, 1e-3])


CURVATURE_STAGES = ("pretrain", "finetune", "swa")


@dataclass
class CurvatureConfig:
    """Curvature of the final models (lrfeatures.analysis.curvature), on a seeded training subset."""

    enabled: bool = False     # off: no curvature table (it costs HVPs for every model)
    samples: int = 128        # training samples of the fixed, seeded subset (all, if there are fewer)
    top_k: int = 5            # Hessian eigenvalues reported (Lanczos)
    iterations: int = 20      # Lanczos steps (>= top_k; more: more accurate lower eigenvalues)
    probes: int = 8           # Rademacher probes of the Hutchinson trace
    stages: list[str] = field(default_factory=lambda: list(CURVATURE_STAGES))  # which final models
    seed: int = 0             # subset, start vectors and probes


def check_curvature(cfg: CurvatureConfig) -> None:
    """Counts > 0, k <= iterations, known stages (one-line errors)."""
    for name in ("samples", "top_k", "iterations", "probes"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"curvature.{name}={getattr(cfg, name)} must be > 0")
    if cfg.iterations < cfg.top_k:
        raise ConfigError(f"curvature.iterations={cfg.iterations} must be >= curvature.top_k={cfg.top_k} "
                          "(Lanczos finds at most one eigenvalue per step)")
    unknown = [s for s in cfg.stages if s not in CURVATURE_STAGES]
    if unknown or not cfg.stages:
        raise ConfigError(f"curvature.stages={cfg.stages} must list some of: {', '.join(CURVATURE_STAGES)}")


@dataclass
class ExperimentSections:
    """The sections every experiment config has; a kind adds its data, grids and engine."""

    kind: str = ""
    name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    sphere: SphereConfig = field(default_factory=SphereConfig)
    swa: SWAConfig = field(default_factory=SWAConfig)
    seeds: SeedsConfig = field(default_factory=SeedsConfig)


def check_shared(cfg: Any, counts: tuple[str, ...], n_checkpoints: int, length_unit: str,
                 rho_may_be_zero: bool = False) -> None:
    """The rules every kind shares: LR grids, counts, sphere, seeds, repeats, SWA K, memory budget."""
    check_lrs("pretrain.lrs", cfg.pretrain.lrs)
    check_lrs("finetune.lrs", cfg.finetune.lrs, allow_empty=True)
    for name in counts + ("model.width", "model.depth", "engine.memory_budget_gb"):
        check_positive(name, get_field(cfg, name))
    if cfg.sphere.step not in SPHERE_STEPS:
        raise ConfigError(f"sphere.step={cfg.sphere.step!r} is unknown; use 'projected' or 'riemannian'")
    if rho_may_be_zero:
        if not (math.isfinite(cfg.sphere.rho) and cfg.sphere.rho >= 0):
            raise ConfigError(f"sphere.rho={cfg.sphere.rho} must be > 0, or 0 for the norm at initialization")
    else:
        check_positive("sphere.rho", cfg.sphere.rho)
    if not cfg.seeds.data or not cfg.seeds.train:
        raise ConfigError("seeds.data and seeds.train must each list at least one seed")
    for name in ("seeds.data", "seeds.train", "pretrain.lrs", "finetune.lrs", "swa.ks"):
        values = get_field(cfg, name)
        if len(set(values)) != len(values):
            raise ConfigError(f"{name} has repeated values {values}; list each once")
    for k in cfg.swa.ks:
        if not 1 <= k <= n_checkpoints:
            raise ConfigError(f"swa.ks holds {k} but pre-training saves only {n_checkpoints} checkpoints; "
                              f"use K in 1..{n_checkpoints} or more {length_unit}")
