"""Training on the sphere at a fixed effective learning rate (SPEC §2).

The SI group θ is held at joint norm ρ. A plain SGD step with rate η = ELR·ρ² moves the
direction θ/ρ exactly as SGD with rate ELR moves a unit vector, so all rates here are
effective learning rates. Everything works on flat vectors with any leading batch
dimensions ([..., P]): one model or a whole grid of models in one call, with no host sync.
"""

from __future__ import annotations

import torch
from torch import nn

STEP_RULES = ("projected", "riemannian")


def flatten(params: list[nn.Parameter] | list[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector (a copy)."""
    return torch.cat([p.reshape(-1) for p in params])


def unflatten_into_(vector: torch.Tensor, params: list[nn.Parameter]) -> None:
    """Copy a flat vector back into the parameters it was flattened from."""
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(vector[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def project(theta: torch.Tensor, rho: float) -> torch.Tensor:
    """Rescale each vector (last dim) to norm rho."""
    return theta * (rho / theta.norm(dim=-1, keepdim=True))


def sphere_step(theta: torch.Tensor, grad: torch.Tensor, effective_lr: torch.Tensor | float,
                rho: float, rule: str = "projected") -> torch.Tensor:
    """One step on the sphere of radius rho; returns the new weights.

    theta, grad: [..., P]; effective_lr: a float or a tensor broadcastable to [..., 1].
    "projected": SGD with η = ELR·ρ², then rescale to ρ.
    "riemannian": move along the great circle by angle η‖g‖/‖θ‖ (SPEC §2).
    """
    lr = effective_lr * rho * rho
    if rule == "projected":
        return project(theta - lr * grad, rho)
    if rule == "riemannian":
        theta_norm = theta.norm(dim=-1, keepdim=True)
        grad_norm = grad.norm(dim=-1, keepdim=True)
        angle = lr * grad_norm / theta_norm
        # A zero gradient means no move; clamp avoids 0/0 without a data-dependent branch.
        direction = grad / grad_norm.clamp_min(torch.finfo(grad.dtype).tiny)
        moved = torch.cos(angle) * theta - torch.sin(angle) * theta_norm * direction
        return project(moved, rho)  # removes float drift; the rotation keeps the norm exactly
    raise ValueError(f"unknown sphere step rule {rule!r}; use one of {STEP_RULES}")


def tangent(theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The component of grad orthogonal to theta (the Riemannian gradient)."""
    coef = (theta * grad).sum(-1, keepdim=True) / (theta * theta).sum(-1, keepdim=True)
    return grad - coef * theta
