"""Training on the sphere at a fixed effective learning rate (SPEC §2).

The SI group θ is the concatenation of several tensors (the "parts": a model's SI
parameters) held at joint norm ρ. A plain SGD step with rate η = ELR·ρ² moves the direction
θ/ρ exactly as SGD with rate ELR moves a unit vector, so all rates here are effective
learning rates. The parts may carry leading batch dimensions (a grid of M models: every part
is [M, ...]); the norm is then taken per model. Updates are in place, with no host sync.
"""

from __future__ import annotations

import torch
from torch import nn

STEP_RULES = ("projected", "riemannian")


def flatten(params: list[nn.Parameter] | list[torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
    """Concatenate parts into one vector per batch index ([*batch, P], a copy)."""
    return torch.cat([p.flatten(batch_dims) for p in params], dim=batch_dims)


def split(vector: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Cut flat vectors [*batch, P] into contiguous parts of the given (unbatched) shapes."""
    batch = vector.shape[:-1]
    sizes = [s.numel() for s in shapes]
    return [chunk.reshape(tuple(batch) + tuple(shape)) for chunk, shape in zip(vector.split(sizes, dim=-1), shapes)]


def unflatten_into_(vector: torch.Tensor, params: list[nn.Parameter]) -> None:
    """Copy a flat vector back into the parameters it was flattened from."""
    with torch.no_grad():
        for p, part in zip(params, split(vector, [p.shape for p in params])):
            p.copy_(part)


def joint_norm(parts: list[torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
    """Norm of the concatenation of parts, per batch index ([*batch])."""
    total = sum(torch.linalg.vector_norm(p.flatten(batch_dims), dim=-1).square() for p in parts)
    return total.sqrt()


def per_batch(values: torch.Tensor | float, part: torch.Tensor, batch_dims: int) -> torch.Tensor | float:
    """Broadcast per-model values [*batch] against a part [*batch, ...]."""
    if not torch.is_tensor(values):
        return values
    return values.reshape(values.shape + (1,) * (part.dim() - batch_dims))


def project_(parts: list[torch.Tensor], rho: float, batch_dims: int = 0) -> None:
    """Rescale each model's parts jointly to norm rho, in place."""
    scale = rho / joint_norm(parts, batch_dims)
    for p in parts:
        p.mul_(per_batch(scale, p, batch_dims))


def project(theta: torch.Tensor, rho: float) -> torch.Tensor:
    """Flat vectors [..., P] rescaled to norm rho (a copy)."""
    return theta * (rho / theta.norm(dim=-1, keepdim=True))


@torch.no_grad()
def sphere_step_(parts: list[torch.Tensor], grads: list[torch.Tensor], effective_lr: torch.Tensor | float,
                 rho: float, rule: str = "projected", batch_dims: int = 0) -> None:
    """One step on the sphere of radius rho, in place.

    effective_lr: a float, or a tensor [*batch] (one rate per model).
    "projected": SGD with η = ELR·ρ², then rescale the joint norm to ρ.
    "riemannian": move along the great circle by angle η‖g‖/‖θ‖ (SPEC §2).
    """
    lr = effective_lr * rho * rho
    if rule == "projected":
        for p, g in zip(parts, grads):
            if torch.is_tensor(lr):
                p.addcmul_(g, per_batch(lr, p, batch_dims), value=-1.0)
            else:
                p.add_(g, alpha=-lr)
    elif rule == "riemannian":
        theta_norm, grad_norm = joint_norm(parts, batch_dims), joint_norm(grads, batch_dims)
        angle = lr * grad_norm / theta_norm
        # A zero gradient means no move; clamping avoids 0/0 without a data-dependent branch.
        along = -torch.sin(angle) * theta_norm / grad_norm.clamp_min(torch.finfo(grad_norm.dtype).tiny)
        for p, g in zip(parts, grads):
            p.mul_(per_batch(torch.cos(angle), p, batch_dims)).add_(g * per_batch(along, p, batch_dims))
    else:
        raise ValueError(f"unknown sphere step rule {rule!r}; use one of {STEP_RULES}")
    project_(parts, rho, batch_dims)  # for "riemannian" this only removes float drift


def sphere_step(theta: torch.Tensor, grad: torch.Tensor, effective_lr: torch.Tensor | float,
                rho: float, rule: str = "projected") -> torch.Tensor:
    """Out-of-place step for flat vectors [..., P]; effective_lr is a float or [...]-shaped."""
    new = theta.clone()
    lr = effective_lr
    if torch.is_tensor(lr) and theta.dim() > 1:
        lr = lr.reshape(-1).expand(theta.shape[:-1])
    sphere_step_([new], [grad], lr, rho, rule, batch_dims=theta.dim() - 1)
    return new


def tangent(theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The component of grad orthogonal to theta (the Riemannian gradient)."""
    coef = (theta * grad).sum(-1, keepdim=True) / (theta * theta).sum(-1, keepdim=True)
    return grad - coef * theta
