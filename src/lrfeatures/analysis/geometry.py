"""Geometry of the reached minima (SPEC §6): angles between solutions and linear error barriers.

All weights are flat vectors of the scale-invariant group ([P], or batches [..., P]). For SI
weights only the direction matters, so the angle is taken between *normalized* vectors. This
matters in practice: an SWA average of unit vectors is shorter than 1, and a formula such as
arccos(<u, v>) that assumes unit norms would then report a wrong (too large) angle (SPEC §7).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from lrfeatures.errors import ConfigError, DataError


def _check_pair(u: torch.Tensor, v: torch.Tensor) -> None:
    if u.shape != v.shape:
        raise DataError(f"weight vectors differ in shape {tuple(u.shape)} vs {tuple(v.shape)}; "
                        "compare flattened SI groups of the same model architecture")
    if u.ndim == 0 or u.shape[-1] == 0:
        raise DataError("weight vectors are empty; pass flat SI weight vectors [..., P] with P > 0")


def angular_distance(u, v) -> torch.Tensor:
    """Angle in radians, in [0, π], between u and v along the last axis (shape [...]).

    Equal to arccos of the clamped cosine of the normalized vectors, but computed as
    2·atan2(|û − v̂|, |û + v̂|): arccos loses half the digits near 0 and π (in float32 the
    angle of a vector with itself would come out ~3e-4 rad instead of 0).
    """
    u, v = torch.as_tensor(u), torch.as_tensor(v)
    _check_pair(u, v)
    u_norm, v_norm = u.norm(dim=-1, keepdim=True), v.norm(dim=-1, keepdim=True)
    if bool((u_norm == 0).any() | (v_norm == 0).any()):
        raise DataError("a weight vector has zero norm, so it has no direction; "
                        "check that the SI weights were saved and loaded correctly")
    u_hat, v_hat = u / u_norm, v / v_norm
    return 2 * torch.atan2((u_hat - v_hat).norm(dim=-1), (u_hat + v_hat).norm(dim=-1))


def interpolation_path(w1, w2, n_points: int = 21) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas [n], weights [n, ..., P]) on the segment w(α) = (1 − α)·w1 + α·w2, α from 0 to 1."""
    if n_points < 2:
        raise ConfigError(f"n_points={n_points} leaves no segment; use n_points >= 2 (the SPEC uses 21)")
    w1, w2 = torch.as_tensor(w1), torch.as_tensor(w2)
    _check_pair(w1, w2)
    alphas = torch.linspace(0.0, 1.0, n_points, dtype=w1.dtype, device=w1.device)
    a = alphas.reshape((n_points,) + (1,) * w1.ndim)
    return alphas, (1 - a) * w1 + a * w2  # endpoints are w1 and w2 exactly


def error_barrier(errors: Sequence[float], alphas: Sequence[float]) -> float:
    """max over α of err(α) − [(1 − α)·err(0) + α·err(1)], in the units of `errors`.

    The SPEC reports errors in %; fractions work the same (the barrier is then a fraction).
    alphas must increase from 0 to 1. The barrier is >= 0 (the endpoints contribute 0);
    a NaN error anywhere gives NaN, since the path then holds a broken model.
    """
    err = np.asarray(errors, dtype=np.float64)
    alpha = np.asarray(alphas, dtype=np.float64)
    if err.ndim != 1 or err.shape != alpha.shape or len(err) < 2:
        raise DataError(f"errors {err.shape} and alphas {alpha.shape} must be matching 1-D "
                        "sequences of length >= 2; pass one error per interpolation point")
    if abs(alpha[0]) > 1e-6 or abs(alpha[-1] - 1) > 1e-6 or np.any(np.diff(alpha) <= 0):
        raise DataError("alphas must increase from 0 to 1; use the alphas of interpolation_path")
    chord = (1 - alpha) * err[0] + alpha * err[-1]
    return float(np.max(err - chord))


def linear_barrier(evaluate_error: Callable[[torch.Tensor], object], w1, w2, n_points: int = 21,
                   prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Evaluate the error along the segment w1 → w2 and measure its barrier.

    evaluate_error(w) returns one error (float or 0-d tensor) or a mapping split -> error
    (e.g. {"train": ..., "test": ...}) to measure several splits in one pass.
    prepare(w) -> w, if given, is called on every point *including both endpoints* before
    evaluation, so that endpoints and interior points are treated alike. Image models plug in
    there the rescaling of the SI part to ρ and the BN-statistics recomputation (interpolated
    BN buffers are meaningless, SPEC §6-7); their evaluate_error then uses that same BN mode
    for train and test.

    Returns {"alphas": ndarray [n], "errors": ndarray [n] or {split: ndarray},
    "barrier": float or {split: float}}.
    """
    alphas, path = interpolation_path(w1, w2, n_points)
    results = []
    for w in path:  # one full model evaluation per point: the loop is over models, not samples
        results.append(evaluate_error(prepare(w) if prepare is not None else w))
    alphas_np = alphas.detach().cpu().double().numpy()
    if isinstance(results[0], Mapping):
        splits = list(results[0])
        if any(not isinstance(r, Mapping) or list(r) != splits for r in results):
            raise DataError("evaluate_error returned different splits along the path; "
                            "return the same mapping keys at every point")
        errors = {s: np.array([float(r[s]) for r in results]) for s in splits}
        barrier = {s: error_barrier(e, alphas_np) for s, e in errors.items()}
        return {"alphas": alphas_np, "errors": errors, "barrier": barrier}
    errors = np.array([float(r) for r in results])
    return {"alphas": alphas_np, "errors": errors, "barrier": error_barrier(errors, alphas_np)}
