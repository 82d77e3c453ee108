"""Unconstrained optimizers and learning-rate schedules for the practical setting (SPEC §4).

Optimizers are torch.optim classes built through `build_optimizer`:
- "sgd":   SGD with momentum; weight decay is L2 (added to the gradient).
- "adam":  Adam with L2 weight decay added to the gradient before the moment estimates,
           as torch.optim.Adam(weight_decay=...) does and as the paper trains the ViT.
- "adamw": Adam with decoupled weight decay: p <- p * (1 - lr * wd) before the Adam step.
Schedules are multipliers of the base LR in a LambdaLR, stepped once per optimizer step:
"constant" (the paper's choice for pre-training and fine-tuning), "cosine", "step".
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")


@dataclass
class OptimizerConfig:
    """An unconstrained optimizer: name, LR and its regularization."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def build(self, params: Iterable) -> torch.optim.Optimizer:
        """The optimizer over `params`."""
        return build_optimizer(params, self.name, self.lr, self.momentum, self.weight_decay,
                               self.betas, self.eps)


@dataclass
class ScheduleConfig:
    """A learning-rate schedule: its name and options (see `build_schedule`)."""

    name: str = "constant"
    warmup_steps: int = 0
    final_factor: float = 0.0
    step_size: int = 0
    gamma: float = 0.1

    def build(self, optimizer: torch.optim.Optimizer, total_steps: int
              ) -> torch.optim.lr_scheduler.LambdaLR:
        """The schedule for `optimizer` over `total_steps` steps."""
        opts = {"warmup_steps": self.warmup_steps}
        if self.name == "cosine":
            opts["final_factor"] = self.final_factor
        if self.name == "step":
            opts.update(step_size=self.step_size, gamma=self.gamma)
        return build_schedule(self.name, optimizer, total_steps, **opts)


def _finite(value: float) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)


def build_optimizer(params: Iterable, name: str, lr: float, momentum: float = 0.0,
                    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """A torch optimizer "sgd" | "adam" | "adamw" over `params` (tensors or param groups)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if not _finite(lr) or lr <= 0:
        raise ConfigError(f"optimizer lr must be a finite number > 0, got {lr!r}; fix the lr")
    if not _finite(weight_decay) or weight_decay < 0:
        raise ConfigError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}; "
                          "use 0 for none")
    if not _finite(momentum) or not 0 <= momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}; e.g. 0.9 for sgd")
    if name != "sgd" and momentum != 0:
        raise ConfigError(f"momentum is an sgd setting but the optimizer is {name!r}; "
                          "set momentum = 0 and use betas for adam/adamw")
    if len(betas) != 2 or not all(_finite(b) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"betas must be two numbers in [0, 1), got {betas!r}; e.g. (0.9, 0.999)")
    if not _finite(eps) or eps <= 0:
        raise ConfigError(f"eps must be a finite number > 0, got {eps!r}; e.g. 1e-8")
    params = list(params)
    if not params:
        raise ConfigError("the optimizer got no parameters; check that the model has trainable ones")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps,
                                weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps,
                             weight_decay=weight_decay)


def _warmed(factor: Callable[[int], float], warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up from 1/warmup to 1 over the first `warmup_steps`, then `factor`."""
    if warmup_steps == 0:
        return factor
    return lambda step: (step + 1) / warmup_steps if step < warmup_steps else factor(step)


def build_schedule(name: str, optimizer: torch.optim.Optimizer, total_steps: int,
                   **opts: float) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR multiplying the base LR at step t (0-based), after an optional linear warm-up.

    constant: 1.
    cosine:   final + (1 - final) * (1 + cos(pi * u)) / 2, u = (t - warmup) / (total - warmup)
              clipped to [0, 1]; option final_factor (default 0).
    step:     gamma ** (t // step_size); options step_size (required), gamma (default 0.1).
    Every schedule takes warmup_steps (default 0).
    """
    allowed = {"constant": {"warmup_steps"}, "cosine": {"warmup_steps", "final_factor"},
               "step": {"warmup_steps", "step_size", "gamma"}}
    if name not in allowed:
        raise ConfigError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    unknown = set(opts) - allowed[name]
    if unknown:
        raise ConfigError(f"schedule {name!r} takes no option(s) {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(sorted(allowed[name]))}")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ConfigError(f"schedule total_steps must be an integer >= 1, got {total_steps!r}")
    warmup = opts.get("warmup_steps", 0)
    if not isinstance(warmup, int) or not 0 <= warmup < total_steps:
        raise ConfigError(f"warmup_steps must be an integer in [0, total_steps={total_steps}), "
                          f"got {warmup!r}")

    if name == "constant":
        factor: Callable[[int], float] = lambda step: 1.0
    elif name == "cosine":
        final = opts.get("final_factor", 0.0)
        if not _finite(final) or not 0 <= final <= 1:
            raise ConfigError(f"cosine final_factor must be in [0, 1], got {final!r}")
        span = total_steps - warmup

        def factor(step: int) -> float:
            u = min(max((step - warmup) / span, 0.0), 1.0)
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * u))
    else:
        step_size, gamma = opts.get("step_size", 0), opts.get("gamma", 0.1)
        if not isinstance(step_size, int) or step_size < 1:
            raise ConfigError(f"step schedule needs step_size, an integer >= 1, got {step_size!r}")
        if not _finite(gamma) or not 0 < gamma <= 1:
            raise ConfigError(f"step gamma must be in (0, 1], got {gamma!r}; e.g. 0.1")
        factor = lambda step: gamma ** (step // step_size)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _warmed(factor, warmup))
