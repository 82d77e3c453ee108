"""Batched loss-and-gradient kernels: M models at once, SI weights as per-part tensors [M, ...].

`MLPKernel` is hand-batched for the SI MLP: activations are [M, N, width], every layer is
one bmm with fused LayerNorm kernels; an input shared by all models (evaluation, or one
batch stream) enters as a stride-0 batch, without copies. Its backward pass is
written out by hand; tests check it against autograd and the reference engine.
`FuncKernel` handles any stateless model through torch.func (vmap over functional_call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ..models.mlp import SIMLP
from ..models.registry import si_parameters
from .common import loss_and_correct


class MLPKernel:
    """Hand-batched forward/backward of the SI MLP (binary or multi-class head)."""

    def __init__(self, template: SIMLP):
        self.shapes = [p.shape for p in template.si_parameters()]  # (out, in) per layer
        self.eps = template.norm_eps
        self.relu = template.activation == "relu"

    def forward(self, weights: list[torch.Tensor], head: torch.Tensor, x: torch.Tensor, shared: bool,
                cache: list | None = None) -> torch.Tensor:
        """Logits [M, N] (binary) or [M, N, C] of per-layer weights [M, out, in];
        x is shared [N, D] or per-model [M, N, D]."""
        h = x.expand(len(weights[0]), *x.shape) if shared else x  # a stride-0 batch: no copy
        for w in weights:
            h = torch.bmm(h, w.transpose(1, 2))
            normed, mean, rstd = torch.native_layer_norm(h, (h.shape[-1],), None, None, self.eps)
            act = torch.relu(normed) if self.relu else torch.tanh(normed)
            if cache is not None:
                cache.append((h, mean, rstd, act))
            h = act
        logits = torch.bmm(h, head.transpose(1, 2))  # head [M, C, H] -> [M, N, C]
        return logits.squeeze(2) if head.shape[1] == 1 else logits

    def loss_and_grad(self, weights: list[torch.Tensor], head: torch.Tensor, x: torch.Tensor,
                      y: torch.Tensor, shared: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mean minibatch loss [M] and its gradient w.r.t. each weight [M, out, in]."""
        cache: list = []
        logits = self.forward(weights, head, x, shared, cache)
        n = logits.shape[1]
        if head.shape[1] == 1:
            target = y.expand_as(logits)
            loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
            dlogits = ((torch.sigmoid(logits) - target) / n).unsqueeze(2)  # [M, N, 1]
        else:
            labels = y.expand(logits.shape[:2])
            loss = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)
            probs = torch.softmax(logits, -1)
            probs.scatter_add_(-1, labels.unsqueeze(-1), -torch.ones_like(probs[..., :1]))
            dlogits = probs / n  # [M, N, C]
        grads = [None] * len(weights)
        upstream = torch.bmm(dlogits, head)  # d loss / d act [M, N, H]
        for i in range(len(weights) - 1, -1, -1):
            pre, mean, rstd, act = cache[i]
            dnormed = (torch.ops.aten.threshold_backward(upstream, act, 0) if self.relu
                       else upstream * (1 - act.square()))
            dpre = torch.ops.aten.native_layer_norm_backward(dnormed, pre, (pre.shape[-1],), mean, rstd,
                                                             None, None, (True, False, False))[0]
            below = cache[i - 1][3] if i > 0 else (x.expand(len(dpre), *x.shape) if shared else x)
            grads[i] = torch.bmm(dpre.transpose(1, 2), below)
            if i > 0:
                upstream = torch.bmm(dpre, weights[i])
        return loss, grads

    @staticmethod
    def stack_frozen(frozen: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen head [M, C, H] from the task's frozen tensors."""
        return frozen["head.weight"]


class FuncKernel:
    """Any stateless model (no buffers) through torch.func: vmap over models."""

    def __init__(self, template: nn.Module):
        self.template = template
        si = {id(p) for p in si_parameters(template)}
        self.si_names = [n for n, p in template.named_parameters() if id(p) in si]
        self.shapes = [p.shape for p in si_parameters(template)]
        if any(p.requires_grad and id(p) not in si for p in template.parameters()) or list(template.buffers()):
            raise ValueError("the grid engine trains only SI parameters of stateless models; "
                             "use the reference engine for this model")

    def _logits(self, parts, frozen_row, x):
        return functional_call(self.template, {**frozen_row, **dict(zip(self.si_names, parts))}, (x,))

    def forward(self, weights: list[torch.Tensor], frozen: dict[str, torch.Tensor], x: torch.Tensor,
                shared: bool) -> torch.Tensor:
        """Logits of every model: x shared [N, ...] or per-model [M, N, ...]."""
        return vmap(self._logits, in_dims=(0, 0, None if shared else 0))(weights, frozen, x)

    def loss_and_grad(self, weights: list[torch.Tensor], frozen: dict[str, torch.Tensor], x: torch.Tensor,
                      y: torch.Tensor, shared: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mean minibatch loss [M] and its gradient w.r.t. each SI part."""
        def loss_fn(parts, frozen_row, xb, yb):
            return loss_and_correct(self._logits(parts, frozen_row, xb), yb)[0].mean()

        data_dim = None if shared else 0
        grads, loss = vmap(grad_and_value(loss_fn), in_dims=(0, 0, data_dim, data_dim))(weights, frozen, x, y)
        return loss, list(grads)

    @staticmethod
    def stack_frozen(frozen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Frozen tensors are passed to functional_call as they are."""
        return frozen


def kernel_for(template: nn.Module) -> MLPKernel | FuncKernel:
    """The fastest kernel that can run this model."""
    return MLPKernel(template) if isinstance(template, SIMLP) else FuncKernel(template)
