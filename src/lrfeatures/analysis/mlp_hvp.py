"""Hand-written Hessian-vector products of the SI MLP (binary head), M models at once.

Pearlmutter's R-operator applied to the grid engine's hand-written backward pass
(engine/kernels.py `MLPKernel`): the forward and backward intermediates of the M models
(`MLPPrimal`) are computed once and reused by every product, and a product is one tangent
forward and one tangent backward: a few bmm and elementwise ops on [M, N, width] tensors, with
no autograd graph. This is what makes curvature over a whole grid cheap: autograd's double
backward through LayerNorm costs several times more (see benchmarks/curvature.py).

Per layer l (a_0 = x, shared by all models):
    h = a W^T,   x̂ = (h − mean h) r,   r = (var h + eps)^(-1/2),   a' = act(x̂)
LayerNorm's backward is g_h = r (g_c − x̂ mean(g x̂)) (g_c: g minus its mean), and its
derivative along dh, with k = r mean(x̂ dh) and dx̂ = r dh_c − x̂ k, is
    d g_h = r((dg)_c − x̂ mean(dg x̂)) − k g_h − r (m dx̂ + x̂ mean(g dx̂)),   m = mean(g x̂).
The tests check every product against the explicit Hessian (torch.func.hessian, float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.kernels import MLPKernel


def _mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over the feature (last) axis, kept for broadcasting."""
    return t.mean(-1, keepdim=True)


@dataclass
class MLPPrimal:
    """Forward and backward intermediates of B models on shared inputs x [N, D], labels y [N]."""

    weights: list[torch.Tensor]   # [B, out, in] per layer
    head: torch.Tensor            # [B, 1, H]
    x: torch.Tensor               # [N, D]
    inputs: list[torch.Tensor]    # a_{l-1} [B, N, in] per layer (layer 0: x, stride-0 expanded)
    xhat: list[torch.Tensor]      # normalized pre-activations [B, N, out]
    rstd: list[torch.Tensor]      # [B, N, 1]
    slope: list[torch.Tensor]     # act'(x̂) [B, N, out]
    acts: list[torch.Tensor]      # act(x̂) [B, N, out]
    curv_z: torch.Tensor          # σ(z)(1 − σ(z)) / N: the loss's second derivative in z [B, N]
    g_n: list[torch.Tensor]       # ∂loss/∂x̂ [B, N, out] per layer
    g_a: list[torch.Tensor]       # ∂loss/∂act [B, N, out] per layer (tanh's second-order term)
    g_h: list[torch.Tensor]       # ∂loss/∂h [B, N, out] per layer
    relu: bool

    def __post_init__(self):
        # −r mean(g_n x̂) [B, N, 1]: the constant of LayerNorm's second-order term
        self.neg_rstd_m = [-r * (g * xh).mean(-1, keepdim=True) for r, g, xh in zip(self.rstd, self.g_n, self.xhat)]


def ln_backward(g: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine) vector-Jacobian product: r (g_c − x̂ mean(g x̂)) [B, N, W]."""
    return rstd * (g - _mean(g) - xhat * _mean(g * xhat))


def mlp_forward(kernel: MLPKernel, weights: list[torch.Tensor], head: torch.Tensor, x: torch.Tensor):
    """Logits z [B, N] and the per-layer (input, x̂, rstd, act', act) of B models on shared x [N, D]."""
    a = x.expand(len(weights[0]), *x.shape)  # a stride-0 batch: no copy
    layers = []
    for w in weights:
        h = torch.bmm(a, w.transpose(1, 2))
        xhat, _, rstd = torch.native_layer_norm(h, (h.shape[-1],), None, None, kernel.eps)
        if kernel.relu:
            act = torch.relu(xhat)
            slope = (xhat > 0).to(xhat.dtype)
        else:
            act = torch.tanh(xhat)
            slope = 1 - act.square()
        layers.append((a, xhat, rstd, slope, act))
        a = act
    return torch.bmm(a, head.transpose(1, 2)).squeeze(2), layers


def mlp_backward(weights: list[torch.Tensor], head: torch.Tensor, layers: list, g_z: torch.Tensor):
    """Per layer (g_a, g_n, g_h) [B, N, out] of a backward pass seeded with ∂/∂z = g_z [B, N]."""
    g_a = g_z.unsqueeze(2) * head                               # [B, N, H]
    out = [None] * len(weights)
    for i in range(len(weights) - 1, -1, -1):
        _, xhat, rstd, slope, _ = layers[i]
        g_n = g_a * slope
        g_h = ln_backward(g_n, xhat, rstd)
        out[i] = (g_a, g_n, g_h)
        if i > 0:
            g_a = torch.bmm(g_h, weights[i])
    return out


def mlp_primal(kernel: MLPKernel, weights: list[torch.Tensor], head: torch.Tensor, x: torch.Tensor,
               y: torch.Tensor) -> MLPPrimal:
    """The intermediates every Hessian-vector product of the mean BCE loss reuses."""
    z, layers = mlp_forward(kernel, weights, head, x)
    p = torch.sigmoid(z)
    n = z.shape[1]
    grads = mlp_backward(weights, head, layers, (p - y) / n)
    return MLPPrimal(weights, head, x, [lay[0] for lay in layers], [lay[1] for lay in layers],
                     [lay[2] for lay in layers], [lay[3] for lay in layers], [lay[4] for lay in layers],
                     p * (1 - p) / n, [g[1] for g in grads], [g[0] for g in grads], [g[2] for g in grads],
                     kernel.relu)


def mlp_hvp(pr: MLPPrimal, vs: list[torch.Tensor]) -> list[torch.Tensor]:
    """H v of every model for S directions each: per layer [B, S, out, in] -> products [B, S, out, in].

    Tangents are laid out [B, N, S, width] so that the primal intermediates [B, N, width]
    broadcast over the S directions (computed once, not per direction) and every product is a
    bmm on a view. The elementwise work is fused into addcmul chains and vecdot reductions:
    on CPU these passes, not the bmm, bound the cost.
    """
    b, s = vs[0].shape[:2]
    n = pr.x.shape[0]
    d_in = None                                                  # d a_{l-1} [B, N, S, in]; x is fixed
    tangents = []
    for i, (w, v) in enumerate(zip(pr.weights, vs)):
        out_dim, in_dim = v.shape[2:]
        # a V^T for every direction: [B, N, in] @ [B, in, S*out] -> [B, N, S, out]
        dh = torch.bmm(pr.inputs[i], v.reshape(b, s * out_dim, in_dim).transpose(1, 2)).view(b, n, s, out_dim)
        if d_in is not None:
            dh.view(b, n * s, out_dim).baddbmm_(d_in.view(b, n * s, in_dim), w.transpose(1, 2))
        xhat, rstd = pr.xhat[i].unsqueeze(2), pr.rstd[i].unsqueeze(2)       # [B, N, 1, out], [B, N, 1, 1]
        k = rstd * (torch.linalg.vecdot(xhat, dh) / out_dim).unsqueeze(-1)  # [B, N, S, 1]
        # dx̂ = r dh − r mean(dh) − x̂ k
        dxhat = torch.addcmul(-rstd * dh.mean(-1, keepdim=True), xhat, k, value=-1).addcmul_(rstd, dh)
        d_act = pr.slope[i].unsqueeze(2) * dxhat
        tangents.append((k, dxhat, d_act))
        d_in = d_act
    width = d_in.shape[-1]
    dz = torch.bmm(d_in.view(b, n * s, width), pr.head.transpose(1, 2)).view(b, n, s)
    dg_a = (pr.curv_z.unsqueeze(2) * dz).unsqueeze(-1) * pr.head.unsqueeze(1)  # [B, N, S, H]
    out = [None] * len(vs)
    for i in range(len(vs) - 1, -1, -1):
        k, dxhat, d_act = tangents[i]
        out_dim, in_dim = vs[i].shape[2:]
        xhat, rstd = pr.xhat[i].unsqueeze(2), pr.rstd[i].unsqueeze(2)
        g_n, g_h = pr.g_n[i].unsqueeze(2), pr.g_h[i]
        dg_n = dg_a * pr.slope[i].unsqueeze(2)
        if not pr.relu:  # tanh: act'' = −2 act act', so d(act') = −2 act d_act
            dg_n = dg_n.addcmul_(pr.acts[i].unsqueeze(2) * d_act, pr.g_a[i].unsqueeze(2), value=-2)
        # d g_h = r dg_n − r mean(dg_n) − r x̂ (mean(dg_n x̂) + mean(g_n dx̂)) − r m dx̂ − k g_h
        c = -rstd * dg_n.mean(-1, keepdim=True)
        e = -rstd * ((torch.linalg.vecdot(dg_n, xhat) + torch.linalg.vecdot(g_n, dxhat)) / out_dim).unsqueeze(-1)
        dg_h = (torch.addcmul(c, rstd, dg_n).addcmul_(xhat, e).addcmul_(dxhat, pr.neg_rstd_m[i].unsqueeze(2))
                .addcmul_(g_h.unsqueeze(2), k, value=-1))                  # [B, N, S, out]
        # Σ_n dg_h[n, s, o] a[n, i] -> [B, S, out, in]
        hv = torch.bmm(dg_h.view(b, n, s * out_dim).transpose(1, 2), pr.inputs[i]).view(b, s, out_dim, in_dim)
        if i > 0:
            below = tangents[i - 1][2].view(b, n, s * in_dim)
            hv = hv + torch.bmm(g_h.transpose(1, 2), below).view(b, out_dim, s, in_dim).transpose(1, 2)
            dg_a = torch.bmm(dg_h.view(b, n * s, out_dim), pr.weights[i]).view(b, n, s, in_dim)
            dg_a += torch.bmm(g_h, vs[i].transpose(1, 2).reshape(b, out_dim, s * in_dim)).view(b, n, s, in_dim)
        out[i] = hv
    return out


def logit_grad_norms(kernel: MLPKernel, weights: list[torch.Tensor], head: torch.Tensor,
                     x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z [B, n] and ‖∇_θ z(x_i)‖² [B, n], without per-sample gradients.

    Each hidden weight's per-sample gradient is the outer product of the signal at its output
    (before the LayerNorm) and its input, so its squared norm is ‖δ_i‖² ‖a_i‖²; LayerNorm acts
    per sample, so one backward pass seeded with ∂/∂z = 1 gives every δ_i.
    """
    z, layers = mlp_forward(kernel, weights, head, x)
    grads = mlp_backward(weights, head, layers, torch.ones_like(z))
    return z, sum(g[2].square().sum(-1) * lay[0].square().sum(-1) for g, lay in zip(grads, layers))
