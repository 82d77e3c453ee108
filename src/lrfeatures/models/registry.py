"""Model registry: name -> builder. Every model declares its scale-invariant (SI) group.

A model is an `nn.Module` with a method `si_parameters()` returning the list of parameters
that together form one scale-invariant group: f(c·θ) = f(θ) for all c > 0 when θ is their
concatenation. Other trainable parameters (none in the SI models) are trained without a
sphere constraint. Frozen parameters have requires_grad=False.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError

ModelBuilder = Callable[[ModelConfig, tuple[int, ...], int], nn.Module]
MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: make `build_model` know a builder under `name`."""

    def wrap(builder: ModelBuilder) -> ModelBuilder:
        MODELS[name] = builder
        return builder

    return wrap


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int,
                seed: int) -> nn.Module:
    """Build model `cfg.name` with its weights drawn from `seed` (global RNG untouched)."""
    if cfg.name not in MODELS:
        raise ConfigError(f"unknown model {cfg.name!r}; choose one of: {', '.join(sorted(MODELS))}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[cfg.name](cfg, input_shape, num_outputs)


def si_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's declared scale-invariant group."""
    if not hasattr(model, "si_parameters"):
        raise ConfigError(f"{type(model).__name__} does not declare si_parameters(); "
                          "add that method to train it on the sphere")
    return list(model.si_parameters())


def freeze_to_norm_(weight: nn.Parameter, norm: float) -> None:
    """Rescale a last-layer weight to Frobenius norm `norm` and freeze it."""
    with torch.no_grad():
        weight.mul_(norm / weight.norm())
    weight.requires_grad_(False)
