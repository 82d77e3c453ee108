"""Curvature of image models: the synthetic curvature measurement (analysis/curvature.py) for kind "images".

The same table `curvature`, the same columns and estimators (Lanczos top-k, Hutchinson trace with
its standard error, Fisher traces, gradient-noise ratio), on a fixed seeded subset of
`curvature.samples` training images (the same for every model of a data seed), with:

- BatchNorm in eval mode: the running statistics the model was evaluated with are held fixed,
  so the loss is a function of the weights alone (column `bn = "eval"`). In eval mode the loss
  is not exactly scale-invariant in θ; scaling θ by c together with the running statistics it
  would produce (mean × c, var × c²) is, which gives H(cθ) = H(θ)/c² for that model, and the
  `*_unit` columns (value × ‖θ‖²) are the values at unit norm.
- the space: for a model with an SI group (si_group "all", or "partial" with its other
  parameters held fixed), the tangent space of the SI group, P H P with P = I − θθᵀ/‖θ‖²
  (`space = "tangent"`); for a practical model (si_group "none"), all trainable parameters
  (`space = "full"`, no unit-norm values).
- the true Fisher with labels sampled from the model (one seeded draw per image: an unbiased
  estimate of E_x Σ_c p_c ‖P ∇ log p_c‖²); the empirical Fisher with the observed labels is exact.
- one model at a time (autograd's double backward; one warning per shard): the fused image
  engine has no batched Hessian-vector product yet.
"""

from __future__ import annotations

import warnings
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..engine.images import prepare_input
from ..errors import ConfigError
from ..models.registry import model_entry, si_parameters
from ..sphere import flatten, split, tangent
from .curvature import measure_curvature, seeded_subset
from .measurements import register_measurement

ONE_AT_A_TIME = ("image curvature runs one model at a time (autograd Hessian-vector products, BN in eval "
                 "mode); the fused image engine has no batched curvature yet")


def curvature_parameters(model: nn.Module, on_sphere: bool) -> list[nn.Parameter]:
    """The parameters curvature is measured in: the SI group on the sphere, else every trainable one."""
    return si_parameters(model) if on_sphere else [p for p in model.parameters() if p.requires_grad]


def check_image_curvature_model(model: nn.Module, top_k: int, on_sphere: bool) -> None:
    """One-line error when k exceeds the dimension the eigenvalues live in (tangent space: P − 1)."""
    dim = sum(p.numel() for p in curvature_parameters(model, on_sphere)) - int(on_sphere)
    if top_k > dim:
        raise ConfigError(f"curvature.top_k={top_k} exceeds the {dim} dimensions of the model's "
                          f"{'tangent space' if on_sphere else 'parameters'}; lower it")


class ModuleProblem:
    """One image model (M = 1) on a subset, with CurvatureProblem's interface: theta [1, P], hvp, gradient, fisher.

    The model must be in eval mode (BN uses its running statistics); its other parameters and
    buffers are held fixed.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, on_sphere: bool,
                 per_sample_bytes: float = 2e8):
        params = curvature_parameters(model, on_sphere)
        name_of = {id(p): n for n, p in model.named_parameters()}
        self.model, self.on_sphere = model, on_sphere
        self.names, self.shapes = [name_of[id(p)] for p in params], [p.shape for p in params]
        self.theta = flatten([p.detach() for p in params])[None]                     # [1, P]
        self.fixed = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]
                      if n not in self.names}
        self.x, self.y = x, y                                                         # [N, C, H, W], [N]
        self.chunk = max(1, int(per_sample_bytes // (self.theta.element_size() * self.theta.shape[1])))
        self._leaf = self._grad = None

    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits [n, C] of the model with weights theta [P] on normalized images x [n, C, H, W]."""
        return functional_call(self.model, {**self.fixed, **dict(zip(self.names, split(theta, self.shapes)))}, (x,))

    def project(self, v: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
        """P v for vectors [..., P] (identity off the sphere)."""
        theta = self.theta if theta is None else theta
        return tangent(theta, v) if self.on_sphere else v

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """P H P v: v [1, P], or [1, S, P] (one product per vector; the gradient's graph is built once)."""
        if v.dim() == 3:
            return torch.stack([self.hvp(v[:, s]) for s in range(v.shape[1])], 1)
        if self._grad is None:
            self._leaf = self.theta[0].detach().requires_grad_()
            loss = F.cross_entropy(self.logits(self._leaf, self.x), self.y)
            self._grad = torch.autograd.grad(loss, self._leaf, create_graph=True)[0]   # [P], differentiable
        hv = torch.autograd.grad(self._grad, self._leaf, self.project(v)[0], retain_graph=True)[0]
        return self.project(hv[None].detach())

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """P ∇L [1, P] on (x, y)."""
        theta = self.theta[0].detach().requires_grad_()
        return self.project(torch.autograd.grad(F.cross_entropy(self.logits(theta, x), y), theta)[0][None])

    def per_sample_sq_norms(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """‖P ∇ log p(label_i | x_i)‖² [n], per-sample gradients in chunks that fit `per_sample_bytes`."""
        def nll(theta, xi, yi):
            return F.cross_entropy(self.logits(theta, xi[None]), yi[None])

        out = []
        for lo in range(0, len(x), self.chunk):
            grads = vmap(grad(nll), in_dims=(None, 0, 0))(self.theta[0], x[lo:lo + self.chunk],
                                                        labels[lo:lo + self.chunk])   # [n, P]
            out.append(self.project(grads, self.theta).square().sum(1))
        return torch.cat(out)

    def fisher(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Empirical Fisher trace (observed labels) and true Fisher trace (labels drawn from the model), [1] each."""
        with torch.no_grad():
            probs = torch.softmax(self.logits(self.theta[0], self.x).double(), -1).cpu()
        sampled = torch.multinomial(probs, 1, generator=gen)[:, 0].to(self.y.device)
        return (self.per_sample_sq_norms(self.x, self.y).mean()[None],
                self.per_sample_sq_norms(self.x, sampled).mean()[None])


@register_measurement("curvature", kinds=("images",), summarize=None)
def image_curvature(ctx: Any) -> pd.DataFrame | None:
    """Tangent-space (SI) or full-space Hessian top-k and trace, Fisher traces, gradient noise of every final model."""
    cfg = ctx.cfg.curvature
    if not cfg.enabled:
        return None
    keys, models = ctx.models()
    chosen = [(key, model) for key, model in zip(keys, models) if key["stage"] in cfg.stages]
    if not chosen:
        return None
    warnings.warn(ONE_AT_A_TIME, stacklevel=2)
    on_sphere = model_entry(ctx.cfg.model.name).has_si_group
    rows = []
    for i, (key, model) in enumerate(chosen):
        check_image_curvature_model(model, cfg.top_k, on_sphere)
        x, y = seeded_subset(ctx.data.train_x, ctx.data.train_y, cfg.samples, cfg.seed, key["data_seed"])
        problem = ModuleProblem(model.eval(), prepare_input(x, ctx.data.normalization), y, on_sphere)
        values: dict[str, float] = {}
        if torch.isfinite(problem.theta).all():
            out = measure_curvature(problem, cfg.top_k, cfg.iterations, cfg.probes, ctx.cfg.pretrain.batch_size,
                                    (cfg.seed, key["data_seed"], key["train_seed"], i))
            values = {name: float(v[0]) for name, v in out.items()}
        rows.append({**key, **values})
    table = pd.DataFrame(rows)
    return table.assign(space="tangent" if on_sphere else "full", bn="eval",
                        samples=min(cfg.samples, len(ctx.data.train_x)))
