"""The scale-invariant MLP of SPEC §3.

Linear(no bias) -> LayerNorm(no affine) -> activation, `depth` times, then a frozen
Linear(no bias) head at Frobenius norm `last_layer_norm`. All hidden weights form one
SI group: each is followed by a normalization, so scaling the whole group changes nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .registry import freeze_to_norm_, register_model

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


class SIMLP(nn.Module):
    """MLP whose hidden weights are scale-invariant (LayerNorm without affine, no biases)."""

    def __init__(self, in_dim: int, width: int, depth: int, num_outputs: int,
                 activation: str = "relu", last_layer_norm: float = 10.0, norm_eps: float = 1e-7):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; choose one of: {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.norm_eps = norm_eps
        dims = [in_dim] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(width, num_outputs, bias=False)
        # A Gaussian draw is a uniformly random direction; the norm is set by the trainer.
        for layer in self.hidden:
            nn.init.normal_(layer.weight)
        nn.init.normal_(self.head.weight)
        freeze_to_norm_(self.head.weight, last_layer_norm)
        self.squeeze = num_outputs == 1

    def si_parameters(self) -> list[nn.Parameter]:
        """All hidden weights: one joint SI group."""
        return [layer.weight for layer in self.hidden]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden representation (after normalization and activation)."""
        act = ACTIVATIONS[self.activation]
        for layer in self.hidden:
            x = act(F.layer_norm(layer(x), (layer.out_features,), eps=self.norm_eps))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: shape [N] for one output, [N, C] otherwise."""
        out = self.head(self.features(x))
        return out.squeeze(-1) if self.squeeze else out


# The compiled kernel ("native") takes only ReLU MLPs with a binary head on CPU (NativeMLP.supports);
# the grid engine falls back to its torch kernel for the rest.
@register_model("mlp-si", input_kind="vector", si_group="all", engines=("native", "grid", "reference"))
def build_mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> SIMLP:
    """SI MLP on flat inputs of size prod(input_shape)."""
    return SIMLP(math.prod(input_shape), cfg.width, cfg.depth, num_outputs, cfg.activation,
                 cfg.last_layer_norm, cfg.norm_eps)
