"""Curvature of the reached minima: Hessian spectrum and trace, Fisher traces, gradient noise.

Every number is measured on a fixed, seeded subset of the training set (`curvature.samples`
images or points, the same for every model of a data seed), for every final model of a shard
at once. For the SI MLP the Hessian-vector products of all M models are hand-written
(analysis/mlp_hvp.py: the R-operator of the grid engine's backward, the forward/backward
intermediates computed once and shared by all products, S probe vectors per model in one
call); other models use autograd's double backward. The measurement runs in float32 (the
products are exact in float64 too: the tests compare them with explicit Hessians there).
Image models: analysis/image_curvature.py (one model at a time, BN in eval mode).

Definitions (SPEC §9). For an SI group θ, f(cθ) = f(θ), so the gradient is orthogonal to θ and
H(cθ) = H(θ)/c². Curvature *along the sphere* is that of the tangent-space Hessian

    H_T = P H P,   P = I − θθᵀ/‖θ‖²          (H_T θ = 0: the radial direction is flat)

and every curvature number here is H_T's (column `space = "tangent"`); a model without an SI
group is measured in its full parameter space (`space = "full"`, no unit-norm columns). Since
H_T(cθ) = H_T(θ)/c², the value of an eigenvalue or trace at unit norm, comparable across ρ,
is value × ‖θ‖² (the `*_unit` columns; equal to the value itself at ρ = 1).

    top-k eigenvalues   Lanczos with full reorthogonalization, `curvature.iterations` steps from a
                        seeded tangent start vector: the k largest Ritz values (eig_1 ≥ ... ≥ eig_k)
    Hessian trace       Hutchinson: mean of zᵀ H_T z over `curvature.probes` Rademacher z, with its
                        standard error std/√probes (hessian_trace, hessian_trace_se)
    Fisher traces       (1/N) Σᵢ E‖P ∇ log p(ŷ|xᵢ)‖²: empirical with ŷ = the observed label,
                        true with ŷ drawn from the model (binary head: the expectation is exact)
    gradient noise      mean over minibatches (training batch size, a partition of the subset)
                        of ‖P g_b‖², over ‖P g‖² of the full subset gradient (scale-free; NaN
                        when the subset holds fewer than two minibatches)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call

from ..engine.common import loss_and_correct
from ..engine.kernels import MLPKernel, kernel_for
from ..errors import ConfigError
from ..models.registry import model_entry, si_parameters
from ..seeding import generator
from ..sphere import flatten, split, tangent
from ..store import ExperimentStore
from .measurements import register_measurement
from .mlp_hvp import MLPPrimal, logit_grad_norms, mlp_hvp, mlp_primal
from .tables import mean_std

Logits = Callable[[torch.Tensor, dict, torch.Tensor], torch.Tensor]


def functional_logits(template: nn.Module) -> Logits:
    """(theta [P], frozen row, x [N, ...]) -> logits [N] or [N, C] of the template with SI weights theta."""
    si = {id(p) for p in si_parameters(template)}
    names = [n for n, p in template.named_parameters() if id(p) in si]
    shapes = [p.shape for p in si_parameters(template)]

    def logits(theta, frozen_row, x):
        return functional_call(template, {**frozen_row, **dict(zip(names, split(theta, shapes)))}, (x,))

    return logits


def check_curvature_model(model: nn.Module, top_k: int, on_sphere: bool = True) -> None:
    """One-line errors for a model curvature cannot measure, or k above the dimension eigenvalues live in."""
    if not isinstance(kernel_for(model), MLPKernel) or model.head.out_features != 1:
        raise ConfigError(f"curvature measures SI MLPs with a binary head (mlp-si), not {type(model).__name__}; "
                          "set curvature.enabled = false")
    dim = sum(p.numel() for p in si_parameters(model)) - int(on_sphere)  # the tangent space: one fewer
    if top_k > dim:
        raise ConfigError(f"curvature.top_k={top_k} exceeds the {dim} dimensions of the model's "
                          f"{'tangent space' if on_sphere else 'parameters'}; lower it")


@dataclass
class CurvatureProblem:
    """M models (flat SI weights [M, P] and frozen tensors [M, ...]) on one shared subset (x, y).

    `kernel` is the grid engine's batched model (engine/kernels.py): the loss of all M models is
    one program, so H v for all of them is one double-backward through it (the gradient's graph
    is built once and reused by every product).
    """

    kernel: Any                      # MLPKernel of the template (FuncKernel: all but the Fisher traces)
    theta: torch.Tensor              # [M, P]
    frozen: dict[str, torch.Tensor]  # name -> [M, ...]
    x: torch.Tensor                  # [N, ...]
    y: torch.Tensor                  # [N]
    on_sphere: bool = True           # project onto the tangent space of theta

    def __post_init__(self):
        self.stacked = self.kernel.stack_frozen(self.frozen)
        self.handwritten = isinstance(self.kernel, MLPKernel)  # analysis/mlp_hvp.py: no autograd graph
        self._primal: MLPPrimal | None = None
        self._leaf = self._grad = None

    def losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss [M] of every model on (x, y)."""
        logits = self.kernel.forward(split(theta, self.kernel.shapes), self.stacked, x, True)
        return loss_and_correct(logits, y)[0].mean(1)

    def project(self, v: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
        """P v for vectors [..., P] of models with weights [..., P] (identity off the sphere)."""
        theta = self.theta if theta is None else theta
        return tangent(theta, v) if self.on_sphere else v

    def primal(self) -> MLPPrimal:
        """The MLP intermediates of every model, shared by all products (cached)."""
        if self._primal is None:
            self._primal = mlp_primal(self.kernel, split(self.theta.detach(), self.kernel.shapes),
                                      self.stacked.detach(), self.x, self.y)
        return self._primal

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """P H P v for every model at once: v [M, P], or [M, S, P] for S vectors per model (one product)."""
        if self.handwritten:
            many = v if v.dim() == 3 else v[:, None]                         # [M, S, P]
            many = self.project(many, self.theta[:, None])
            hv = flatten(mlp_hvp(self.primal(), split(many, self.kernel.shapes)), 2)
            hv = self.project(hv, self.theta[:, None])
            return hv if v.dim() == 3 else hv[:, 0]
        if v.dim() == 3:
            return torch.stack([self.hvp(v[:, s]) for s in range(v.shape[1])], 1)
        if self._grad is None:
            self._leaf = self.theta.detach().requires_grad_()
            self._grad = torch.autograd.grad(self.losses(self._leaf, self.x, self.y).sum(), self._leaf,
                                             create_graph=True)[0]   # [M, P], differentiable
        # H is symmetric, so the vector-Jacobian product of the gradient is H v.
        hv = torch.autograd.grad(self._grad, self._leaf, self.project(v), retain_graph=True)[0]
        return self.project(hv).detach()

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """P ∇L [M, P] of every model on (x, y)."""
        if self.handwritten:  # the grid engine's hand-written backward
            grads = self.kernel.loss_and_grad(split(self.theta.detach(), self.kernel.shapes), self.stacked,
                                              x, y, True)[1]
            return self.project(flatten(grads, 1))
        theta = self.theta.detach().requires_grad_()
        return self.project(torch.autograd.grad(self.losses(theta, x, y).sum(), theta)[0])

    def fisher(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Empirical and true Fisher traces [M] (exact for the binary head; `gen` is not needed)."""
        return fisher_traces(self)


def per_sample_logit_grad_norms(problem: CurvatureProblem, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z [M, n] and ‖∇θ z(x_i)‖² [M, n] of an SI MLP (MLPKernel), without per-sample gradients."""
    return logit_grad_norms(problem.kernel, split(problem.theta.detach(), problem.kernel.shapes),
                            problem.stacked, x)


def fisher_traces(problem: CurvatureProblem, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical and true Fisher traces [M] on the problem's subset (binary head: exact, see module doc).

    Per-sample losses of an SI model are SI themselves, so their gradients are already tangent.
    """
    emp = torch.zeros(problem.theta.shape[0], dtype=problem.theta.dtype, device=problem.theta.device)
    true = torch.zeros_like(emp)
    for lo in range(0, len(problem.x), chunk):
        x, y = problem.x[lo:lo + chunk], problem.y[lo:lo + chunk]
        z, sq = per_sample_logit_grad_norms(problem, x)           # ‖∇z_i‖² [M, n]
        p = torch.sigmoid(z)                                      # ∇ log p(ŷ) = (ŷ − σ(z)) ∇z
        emp += ((y - p).square() * sq).sum(1)
        true += (p * (1 - p) * sq).sum(1)                        # E_ŷ~p (ŷ − σ)² = σ(1 − σ)
    return emp / len(problem.x), true / len(problem.x)


def explicit_tangent_hessian(template: nn.Module, theta: torch.Tensor, frozen_row: dict[str, torch.Tensor],
                             x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """P H P [P, P] of one model by torch.func.hessian (the tests' oracle; O(P²) memory)."""
    logits = functional_logits(template)
    hessian = torch.func.hessian(lambda t: loss_and_correct(logits(t, frozen_row, x), y)[0].mean())(theta)
    proj = torch.eye(len(theta), dtype=theta.dtype) - torch.outer(theta, theta) / theta.dot(theta)
    return proj @ hessian @ proj


def orthogonalize(w: torch.Tensor, basis: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """w [M, P] minus its components along the orthonormal rows of basis [M, j, P].

    Classical Gram-Schmidt, repeated while a pass removes more than 30% of some model's norm
    (Kahan-Parlett's "twice is enough"), at most `passes` times.
    """
    for _ in range(passes):  # two bmm per pass, on the model-major basis as it lies in memory
        before = w.norm(dim=1)
        coef = torch.bmm(basis, w.unsqueeze(2))                              # [M, j, 1]
        w = w - torch.bmm(coef.transpose(1, 2), basis).squeeze(1)
        if not (w.norm(dim=1) < 0.7 * before).any():
            break
    return w


def lanczos(hvp: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, steps: int,
            project: Callable[[torch.Tensor], torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Ritz values [M, steps] (descending) of `hvp` from start vectors [M, P], full reorthogonalization.

    The three-term recurrence removes the two latest basis vectors first, so reorthogonalizing
    against the whole basis removes only rounding errors and one pass is mostly enough. A model
    whose Krylov space closes early (beta ≈ 0) restarts from a fresh random vector orthogonal
    to its basis, so the tridiagonal matrix stays that of an orthonormal basis.
    """
    m, p = start.shape
    steps = min(steps, p)
    like = {"dtype": start.dtype, "device": start.device}
    basis = torch.zeros(m, steps, p, **like)      # [M, j, P]
    alpha = torch.zeros(m, steps, **like)
    beta = torch.zeros(m, max(steps - 1, 0), **like)
    q = start / start.norm(dim=1, keepdim=True)
    for j in range(steps):
        basis[:, j] = q
        w = hvp(q)
        alpha[:, j] = (w * q).sum(1)
        w = w - alpha[:, j, None] * q
        if j > 0:
            w = w - beta[:, j - 1, None] * basis[:, j - 1]
        w = orthogonalize(w, basis[:, :j + 1])
        if j == steps - 1:
            break
        b = w.norm(dim=1)
        scale = alpha[:, :j + 1].abs().amax(1).clamp_min(1e-300)
        closed = b <= 1e-10 * scale  # an invariant subspace: continue in a fresh direction
        if closed.any():
            fresh = orthogonalize(project(torch.randn(m, p, generator=gen, dtype=start.dtype).to(start.device)),
                                  basis[:, :j + 1])
            w = torch.where(closed[:, None], fresh, w)
            b = torch.where(closed, torch.zeros_like(b), b)
        beta[:, j] = b
        q = w / w.norm(dim=1, keepdim=True)
    tridiagonal = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    return torch.linalg.eigvalsh(tridiagonal).flip(-1)


def hutchinson(hvp: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, int], probes: int,
               gen: torch.Generator, dtype: torch.dtype, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Trace estimate [M] and its standard error [M] from `probes` Rademacher vectors per model (one product)."""
    m, p = shape
    z = torch.randint(0, 2, (m, probes, p), generator=gen).to(device, dtype) * 2 - 1  # [M, S, P]
    quad = (z * hvp(z)).sum(-1)                                              # [M, S]
    se = quad.std(1) / probes ** 0.5 if probes > 1 else torch.full((m,), float("nan"), dtype=dtype, device=device)
    return quad.mean(1), se


def gradient_noise_ratio(problem: CurvatureProblem, batch_size: int) -> torch.Tensor:
    """Mean minibatch ‖P g_b‖² over ‖P g‖² [M], minibatches partitioning the subset (NaN for fewer than 2)."""
    groups = len(problem.x) // batch_size
    if groups < 2:  # one minibatch is the full subset: the ratio would be 1 by construction
        return torch.full((problem.theta.shape[0],), float("nan"), dtype=problem.theta.dtype,
                          device=problem.theta.device)
    grads = torch.stack([problem.gradient(problem.x[i * batch_size:(i + 1) * batch_size],
                                          problem.y[i * batch_size:(i + 1) * batch_size])
                         for i in range(groups)], 1)                          # [M, G, P]
    # Equal-sized batches that partition the subset: the full gradient is their mean.
    return grads.square().sum(-1).mean(1) / grads.mean(1).square().sum(-1)


def measure_curvature(problem: CurvatureProblem, top_k: int, iterations: int, probes: int, batch_size: int,
                      seed: tuple) -> dict[str, torch.Tensor]:
    """Every curvature column [M] of the problem's models (see the module docstring)."""
    m, p = problem.theta.shape
    dtype = problem.theta.dtype
    gen = generator("curvature", *seed)
    device = problem.theta.device
    start = problem.project(torch.randn(m, p, generator=gen, dtype=dtype).to(device))
    ritz = lanczos(problem.hvp, start, min(iterations, p - int(problem.on_sphere)), problem.project, gen)
    trace, trace_se = hutchinson(problem.hvp, (m, p), probes, gen, dtype, device)
    emp, true = problem.fisher(gen)
    out = {f"eig_{i + 1}": ritz[:, i] for i in range(top_k)}
    out.update(sharpness=ritz[:, 0], hessian_trace=trace, hessian_trace_se=trace_se, fisher_trace_empirical=emp,
               fisher_trace_true=true, grad_noise_ratio=gradient_noise_ratio(problem, batch_size))
    norm2 = problem.theta.square().sum(1)
    scale = norm2 if problem.on_sphere else torch.full_like(norm2, float("nan"))
    for name in ("sharpness", "hessian_trace", "fisher_trace_empirical", "fisher_trace_true"):
        out[f"{name}_unit"] = out[name] * scale  # H(cθ) = H(θ)/c²: the value at ‖θ‖ = 1
    out["theta_norm"] = norm2.sqrt()
    return out


def curvature_columns(problem: CurvatureProblem, top_k: int, iterations: int, probes: int, batch_size: int,
                      seed: tuple, chunk: int = 256) -> dict[str, torch.Tensor]:
    """`measure_curvature` for finite models only, in chunks of models; NaN for diverged ones."""
    finite = torch.isfinite(problem.theta).all(1)
    index = finite.nonzero().squeeze(1)
    columns: dict[str, torch.Tensor] = {}
    for lo in range(0, len(index), chunk):
        rows = index[lo:lo + chunk]
        part = CurvatureProblem(problem.kernel, problem.theta[rows],
                                {k: v[rows] for k, v in problem.frozen.items()}, problem.x, problem.y,
                                problem.on_sphere)
        for name, values in measure_curvature(part, top_k, iterations, probes, batch_size, seed + (lo,)).items():
            columns.setdefault(name, torch.full((len(finite),), float("nan"), dtype=values.dtype))[rows] = \
                values.detach()
    return columns


# ---------------------------------------------------------------- the measurement and its summary

VALUE_COLUMNS = ("sharpness", "sharpness_unit", "hessian_trace", "hessian_trace_unit", "hessian_trace_se",
                 "fisher_trace_empirical", "fisher_trace_empirical_unit", "fisher_trace_true",
                 "fisher_trace_true_unit", "grad_noise_ratio")


def seeded_subset(x: torch.Tensor, y: torch.Tensor, n: int, *seed: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n of a seeded permutation of (x, y): the same subset for every model of a data seed."""
    index = torch.randperm(len(x), generator=generator("curvature-subset", *seed))[:n].to(x.device)
    return x[index], y[index]


@register_measurement("curvature", kinds=("synthetic",), summarize=None)
def synthetic_curvature(ctx: Any) -> pd.DataFrame | None:
    """Tangent-space Hessian top-k and trace, Fisher traces and gradient noise of every final model."""
    cfg = ctx.cfg.curvature
    if not cfg.enabled:
        return None
    chosen = [(keys, theta, frozen) for keys, theta, frozen in ctx.solutions if keys["stage"].iloc[0] in cfg.stages]
    if not chosen:
        return None
    # float32: the hand-written products are exact in float64 too (the tests compare them with
    # explicit Hessians there), but float32 halves the memory traffic that bounds their cost
    template = ctx.make_model().float()
    on_sphere = model_entry(ctx.cfg.model.name).has_si_group
    check_curvature_model(template, cfg.top_k, on_sphere)
    x, y = seeded_subset(ctx.data.x_train.cpu(), ctx.data.y_train.cpu(), cfg.samples, cfg.seed, ctx.shard.data_seed)
    problem = CurvatureProblem(kernel_for(template), torch.cat([c[1] for c in chosen]).float().cpu(),
                               {k: torch.cat([c[2][k] for c in chosen]).float().cpu() for k in chosen[0][2]},
                               x.float(), y.float(), on_sphere)
    columns = curvature_columns(problem, cfg.top_k, cfg.iterations, cfg.probes, ctx.cfg.pretrain.batch_size,
                                (cfg.seed, ctx.shard.data_seed, *ctx.shard.train_seeds))
    table = pd.concat([c[0] for c in chosen], ignore_index=True)
    for name, values in columns.items():
        table[name] = values.numpy()
    return table.assign(space="tangent" if on_sphere else "full", samples=len(x))


def curvature_block(rows: pd.DataFrame) -> dict[str, Any]:
    """Seed mean/std of every curvature value of one model group."""
    return {name: mean_std(rows[name]) for name in VALUE_COLUMNS if name in rows}


def add_curvature_blocks(store: ExperimentStore, per_plr: list[dict[str, Any]]) -> None:
    """Add a `curvature` block (pretrain; finetune per FLR; swa per K) to each per-PLR entry, when measured."""
    path = store.root / "curvature.parquet"
    table = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
    if table.empty:
        return
    for entry in per_plr:
        at = table[np.isclose(table["plr"], entry["plr"])]
        block = {}
        for stage, rows in at.groupby("stage"):
            if stage == "pretrain":
                block[stage] = curvature_block(rows)
            elif stage == "finetune":
                block[stage] = {repr(float(flr)): curvature_block(g) for flr, g in rows.groupby("flr")}
            else:
                block[stage] = {str(int(k)): curvature_block(g) for k, g in rows.groupby("swa_k")}
        entry["curvature"] = block


# The experiments import this module to register the curvature measurement; these register the image
# curvature and the filter-norm histograms alongside it (they import from here, hence at the end).
from . import filter_norms, image_curvature  # noqa: E402, F401
