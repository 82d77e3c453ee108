"""Angles between SI weight vectors and linear-path error barriers."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrfeatures.analysis.geometry import (angular_distance, error_barrier, interpolation_path,
                                          linear_barrier)
from lrfeatures.errors import ConfigError, DataError


def _vector(seed: int, size: int = 64, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(1e-3, 1e3))
def test_angle_ignores_scale(seed, scale):
    u = _vector(seed)
    assert angular_distance(u, u).item() == 0
    assert angular_distance(u, scale * u).item() == pytest.approx(0, abs=1e-6)


def test_orthogonal_and_opposite():
    e = torch.eye(3, dtype=torch.float64)
    assert angular_distance(e[0], e[1]).item() == pytest.approx(math.pi / 2)
    assert angular_distance(e[0], -3 * e[0]).item() == pytest.approx(math.pi)


def test_batched_angles_match_arccos_of_cosine():
    u = torch.randn(5, 7, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = torch.randn(5, 7, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.arccos(torch.nn.functional.cosine_similarity(u, v, dim=-1))
    assert torch.allclose(angular_distance(u, v), expected, atol=1e-10)


def test_swa_average_is_shorter_but_angle_uses_direction():
    # Two unit vectors at 90 degrees: their average is shorter than 1 and sits at 45 degrees
    # from each; the raw dot product with the short average would give arccos(0.5) = 60 degrees.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mean = (a + b) / 2
    assert mean.norm() < 1
    assert angular_distance(a, mean).item() == pytest.approx(math.pi / 4)


def test_zero_or_mismatched_vectors_raise():
    with pytest.raises(DataError):
        angular_distance(torch.zeros(4), torch.ones(4))
    with pytest.raises(DataError):
        angular_distance(torch.ones(4), torch.ones(5))


def test_interpolation_path_endpoints_and_shape():
    w1, w2 = _vector(0, 10), _vector(1, 10)
    alphas, path = interpolation_path(w1, w2, 21)
    assert path.shape == (21, 10) and alphas[10].item() == pytest.approx(0.5)
    assert torch.equal(path[0], w1) and torch.equal(path[-1], w2)
    assert torch.allclose(path[10], (w1 + w2) / 2)
    with pytest.raises(ConfigError):
        interpolation_path(w1, w2, 1)


def test_barrier_of_linear_path_is_zero_and_bump_is_measured():
    alphas = np.linspace(0, 1, 21)
    line = 10 + 5 * alphas
    assert error_barrier(line, alphas) == pytest.approx(0, abs=1e-12)
    bump = line + 0.3 * 4 * alphas * (1 - alphas)
    assert error_barrier(bump, alphas) == pytest.approx(0.3)
    dip = line - 2 * alphas * (1 - alphas)  # a convex path has no barrier
    assert error_barrier(dip, alphas) == pytest.approx(0, abs=1e-12)
    with pytest.raises(DataError):
        error_barrier(line, alphas[::-1])


def test_linear_barrier_calls_prepare_at_every_point():
    w1, w2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    prepared = []

    def prepare(w):
        prepared.append(w.clone())
        return w / w.norm()  # SI models: back on the sphere before evaluating

    def evaluate(w):
        assert w.norm().item() == pytest.approx(1)
        # 0 at both ends, 45 degrees away from the segment's ends at the middle
        angle_to_nearest = min(angular_distance(w, w1).item(), angular_distance(w, w2).item())
        return {"train": angle_to_nearest, "test": 2 * angle_to_nearest}

    out = linear_barrier(evaluate, w1, w2, n_points=5, prepare=prepare)
    assert len(prepared) == 5 and torch.equal(prepared[0], w1) and torch.equal(prepared[-1], w2)
    assert out["alphas"].tolist() == [0, 0.25, 0.5, 0.75, 1]
    assert out["barrier"]["train"] == pytest.approx(math.pi / 4)
    assert out["barrier"]["test"] == pytest.approx(math.pi / 2)
    assert out["errors"]["test"].shape == (5,)


def test_linear_barrier_with_scalar_errors():
    w1, w2 = torch.zeros(3), torch.ones(3)
    out = linear_barrier(lambda w: torch.tensor(float(w[0]) ** 2), w1, w2, n_points=11)
    # err(α) = α² lies below its chord: no barrier
    assert out["barrier"] == pytest.approx(0, abs=1e-7)
    out = linear_barrier(lambda w: float(w[0]) * (1 - float(w[0])), w1, w2, n_points=11)
    assert out["barrier"] == pytest.approx(0.25, abs=1e-6)
