"""Synthetic 2-D feature data: shape geometry, margins, boundaries, splits and probe sets."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrfeatures.config import SyntheticDataConfig
from lrfeatures.data.synthetic import SHAPES, SyntheticData, make_synthetic
from lrfeatures.errors import ConfigError, DataError

SHAPE_NAMES = list(SHAPES)
ON_BOUNDARY = 1e-6
SMALL = SyntheticDataConfig(n_features=5, n_train=200, n_test=150, n_probe=60)

# (point, class, distance to the nearest boundary or None): hand-computed from each docstring.
GEOMETRY = {
    "tick": [((0, 1), 1, 1 / math.sqrt(2)), ((0, -0.5), 0, 0.5), ((1, 0), 0, 1 / math.sqrt(2)),
             ((1.5, 0), 0, None), ((1.9, -1.9), 1, None), ((-1.5, -1), 1, None), ((-1, 1.5), 1, None)],
    "circles": [((0, 0), 0, 0.8), ((1.3, 0), 1, 0.5), ((0, -1.3), 1, 0.5), ((1.9, 1.9), 0, None),
                ((2, 2), 0, 2 * math.sqrt(2) - 1.8), ((0.5, 0.5), 0, None)],
    "sectors": [((1, 0.3), 0, 0.3), ((0, 1), 1, 0.5), ((-1, 0.3), 0, None), ((-1, -0.3), 1, None),
                ((0, -1), 0, 0.5), ((1, -0.3), 1, 0.3)],
    "stripe": [((0, 0), 1, 1.2 / math.sqrt(2)), ((1, 1), 1, None), ((1, 0), 1, 0.2 / math.sqrt(2)),
               ((1.5, -0.5), 0, 0.8 / math.sqrt(2)), ((-1.5, 0.5), 0, None)],
    "diamond": [((0, 0), 1, math.sqrt(2)), ((0.9, 0.9), 1, None), ((1.1, 1.1), 0, 0.2 / math.sqrt(2)),
                ((-1.9, 0.5), 0, None), ((0, -1.9), 1, None), ((2, 2), 0, math.sqrt(2))],
    "peaks": [((1, 0.9), 1, None), ((0, -0.9), 0, None), ((0, -1.5), 1, None), ((-1, 0.5), 1, None),
              ((0.5, 0.5), 0, 0.5 / math.sqrt(5)), ((1, 1.5), 0, 0.5), ((0, -2), 1, 1.0)],
    "cross": [((0, 0), 1, 0.6 * math.sqrt(2)), ((0, 1.5), 1, 0.6), ((1.5, 0), 1, None), ((1, 1), 0, 0.4),
              ((-1.5, -1.5), 0, 0.9), ((0.5, -1.8), 1, 0.1)],
    "union-jack": [((0, 1.5), 1, None), ((1, 1), 1, 0.3 / math.sqrt(2)), ((1.2, 0.5), 0, 0.2),
                   ((0.5, 1.2), 0, 0.2), ((-1.2, 0.5), 0, None), ((1.5, -1.5), 1, None),
                   ((0.2, 1.8), 1, None), ((0, 0), 1, math.hypot(0.6, 0.3))],
}


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator for the tests."""
    return torch.Generator().manual_seed(seed)


def features(x: torch.Tensor) -> torch.Tensor:
    """[..., 2F] -> [..., F, 2]."""
    return x.view(*x.shape[:-1], -1, 2)


def test_every_shape_has_a_geometry_table():
    assert set(GEOMETRY) == set(SHAPES)


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_class_geometry_matches_docstring(name):
    shape = SHAPES[name]
    points = torch.tensor([p for p, _, _ in GEOMETRY[name]], dtype=torch.float32)
    assert shape.label_of(points).tolist() == [float(c) for _, c, _ in GEOMETRY[name]]
    dist = shape.distance_to_boundary(points)
    for (point, _, expected), got in zip(GEOMETRY[name], dist.tolist()):
        if expected is not None:
            assert got == pytest.approx(expected, abs=1e-5), point


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_distance_is_distance_to_nearest_label_change(name):
    # Brute force: no label change strictly inside the distance, one just beyond it.
    shape = SHAPES[name]
    points = (torch.rand(150, 2, generator=gen(1), dtype=torch.float64) * 4 - 2)
    dist = shape.distance_to_boundary(points)
    keep = dist > 0.05
    points, dist = points[keep], dist[keep]
    angle = torch.linspace(0, 2 * math.pi, 4001, dtype=torch.float64)[:-1]
    ring = torch.stack([angle.cos(), angle.sin()], dim=-1)  # [A, 2]
    own = shape.label_of(points)[:, None]
    inner = shape.label_of(points[:, None] + 0.98 * dist[:, None, None] * ring)
    outer = shape.label_of(points[:, None] + (dist[:, None, None] + 0.02) * ring)
    assert (inner == own).all()
    assert (outer != own).any(dim=1).all()


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_classes_are_roughly_balanced_in_the_square(name):
    points = torch.rand(100_000, 2, generator=gen(2)) * 4 - 2
    assert 0.45 < SHAPES[name].label_of(points).mean().item() < 0.55


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_label_needs_both_coordinates(name):
    grid = torch.linspace(-1.95, 1.95, 79)
    x1, x2 = torch.meshgrid(grid, grid, indexing="ij")
    labels = SHAPES[name].label_of(torch.stack([x1, x2], dim=-1))  # [x1, x2]
    varies_along_x2 = (labels.amax(1) != labels.amin(1)).any()  # some fixed x1 sees both classes
    varies_along_x1 = (labels.amax(0) != labels.amin(0)).any()
    assert varies_along_x2 and varies_along_x1


@pytest.mark.parametrize("name", SHAPE_NAMES)
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31), margin=st.floats(0.0, 0.15), n=st.integers(1, 400))
def test_sample_lies_in_its_class_outside_the_margin(name, seed, margin, n):
    shape = SHAPES[name]
    g = gen(seed)
    labels = torch.randint(0, 2, (n,), generator=g).float()
    x = shape.sample(labels, margin, g)
    assert x.shape == (n, 2) and x.dtype == torch.float32
    assert (x.abs() <= 2).all()
    assert torch.equal(shape.label_of(x), labels)
    assert (shape.distance_to_boundary(x) >= margin).all()


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_sample_is_uniform_within_its_region(name):
    # Fraction in the quadrant x1, x2 > 0 must match that of plain rejection sampling.
    shape, margin = SHAPES[name], 0.1
    for label in (0.0, 1.0):
        x = shape.sample(torch.full((20_000,), label), margin, gen(3))
        ref = torch.rand(200_000, 2, generator=gen(4)) * 4 - 2
        ref = ref[(shape.label_of(ref) == label) & (shape.distance_to_boundary(ref) >= margin)]
        in_quadrant = lambda p: ((p[:, 0] > 0) & (p[:, 1] > 0)).float().mean().item()  # noqa: E731
        assert in_quadrant(x) == pytest.approx(in_quadrant(ref), abs=0.02)


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_boundary_points_lie_on_a_boundary_inside_the_square(name):
    shape = SHAPES[name]
    b = shape.boundary(5000, gen(5))
    assert b.shape == (5000, 2) and b.dtype == torch.float32
    assert (b.abs() <= 2).all()
    assert (shape.distance_to_boundary(b) <= ON_BOUNDARY).all()
    assert b[:, 0].std() > 0.5 and b[:, 1].std() > 0.5  # spread out, not one point


def test_tick_boundary_follows_the_spec():
    b = SHAPES["tick"].boundary(4000, gen(6))
    s = b[:, 1] - b[:, 0].abs()
    upper = s.abs() <= ON_BOUNDARY
    lower = (s + 2).abs() <= ON_BOUNDARY
    assert (upper | lower).all()
    assert 0.45 < upper.float().mean().item() < 0.55
    assert b[:, 0].min() < -1.9 and b[:, 0].max() > 1.9


def test_too_large_margin_is_a_data_error():
    with pytest.raises(DataError, match="margin"):
        SHAPES["tick"].sample(torch.zeros(10), 0.8, gen())  # the class-0 band is only 0.71 half-wide


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_every_feature_is_informative_and_agrees_with_its_label(name):
    cfg = dataclasses.replace(SMALL, shape=name)
    data = make_synthetic(cfg, seed=3)
    shape = SHAPES[name]
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        f = features(x)
        assert torch.equal(shape.label_of(f), y[:, None].expand(-1, cfg.n_features))
        assert (shape.distance_to_boundary(f) >= cfg.margin).all()


def test_shapes_and_dtypes():
    data = make_synthetic(SMALL, seed=0)
    f = SMALL.n_features
    assert data.x_train.shape == (SMALL.n_train, 2 * f)
    assert data.x_test.shape == (SMALL.n_test, 2 * f)
    assert data.x_probe.shape == (f, SMALL.n_probe, 2 * f)
    assert data.y_train.shape == (SMALL.n_train,) and data.y_probe.shape == (f, SMALL.n_probe)
    for t in dataclasses.asdict(data).values():
        assert t.dtype == torch.float32
    for y in (data.y_train, data.y_test, data.y_probe):
        assert set(y.unique().tolist()) == {0.0, 1.0}


def test_labels_are_balanced():
    data = make_synthetic(SyntheticDataConfig(), seed=1)
    for y in (data.y_train, data.y_test, data.y_probe):
        assert 0.42 < y.mean().item() < 0.58


def test_same_seed_is_bit_identical_and_seeds_differ():
    a, b, c = make_synthetic(SMALL, 7), make_synthetic(SMALL, 7), make_synthetic(SMALL, 8)
    for name, t in dataclasses.asdict(a).items():
        assert torch.equal(t, getattr(b, name)), name
        assert not torch.equal(t, getattr(c, name)), name


def test_splits_have_independent_streams():
    base = make_synthetic(SMALL, 2)
    more_test = make_synthetic(dataclasses.replace(SMALL, n_test=500, n_probe=30), 2)
    more_train = make_synthetic(dataclasses.replace(SMALL, n_train=300), 2)
    assert torch.equal(base.x_train, more_test.x_train) and torch.equal(base.y_train, more_test.y_train)
    assert torch.equal(base.x_test, more_train.x_test) and torch.equal(base.x_probe, more_train.x_probe)
    n = SMALL.n_probe  # each split has its own stream, not a replay of another split's
    labels = [base.y_train[:n], base.y_test[:n], base.y_probe[0]]
    assert all(not torch.equal(a, b) for i, a in enumerate(labels) for b in labels[i + 1:])


@pytest.mark.parametrize("name", ["tick", "union-jack"])
def test_probe_set_i_has_only_feature_i_informative(name):
    cfg = dataclasses.replace(SMALL, shape=name)
    data = make_synthetic(cfg, seed=4)
    shape = SHAPES[name]
    f = features(data.x_probe)  # [F, n_probe, F, 2]
    dist = shape.distance_to_boundary(f)
    for i in range(cfg.n_features):
        assert torch.equal(shape.label_of(f[i, :, i]), data.y_probe[i])
        assert (dist[i, :, i] >= cfg.margin).all()
        others = [j for j in range(cfg.n_features) if j != i]
        assert (dist[i][:, others] <= ON_BOUNDARY).all()


def test_informative_prob_puts_that_fraction_off_the_boundary():
    shape = SHAPES["tick"]
    half = make_synthetic(dataclasses.replace(SyntheticDataConfig(), informative_prob=0.5), seed=5)
    f = features(half.x_train)
    on = shape.distance_to_boundary(f) <= ON_BOUNDARY
    assert 0.47 < on.float().mean().item() < 0.53
    informative = ~on
    assert (shape.distance_to_boundary(f)[informative] >= 0.1).all()
    assert torch.equal(shape.label_of(f)[informative], half.y_train[:, None].expand_as(on)[informative])
    none = make_synthetic(dataclasses.replace(SMALL, informative_prob=0.0), seed=5)
    assert (shape.distance_to_boundary(features(none.x_test)) <= ON_BOUNDARY).all()


def test_label_noise_flips_that_fraction_of_train_labels_only():
    cfg = SyntheticDataConfig(n_features=4, n_train=500, n_test=200, n_probe=50)
    clean = make_synthetic(cfg, seed=9)
    noisy = make_synthetic(dataclasses.replace(cfg, label_noise=0.2), seed=9)
    assert torch.equal(clean.x_train, noisy.x_train)
    flipped = clean.y_train != noisy.y_train
    assert flipped.sum().item() == 100
    # A flipped label disagrees with every feature; a kept one agrees.
    feature_label = SHAPES["tick"].label_of(features(noisy.x_train)[:, 0])
    assert torch.equal(feature_label != noisy.y_train, flipped)
    for name in ("x_test", "y_test", "x_probe", "y_probe"):
        assert torch.equal(getattr(clean, name), getattr(noisy, name)), name


def test_unknown_shape_is_a_config_error_listing_the_shapes():
    with pytest.raises(ConfigError) as err:
        make_synthetic(SyntheticDataConfig(shape="hexagon"), seed=0)
    assert "hexagon" in str(err.value) and all(name in str(err.value) for name in SHAPES)


@pytest.mark.parametrize("field,value", [("label_noise", 0.5), ("informative_prob", 1.5),
                                         ("margin", -0.1), ("n_probe", 0)])
def test_bad_config_is_a_config_error(field, value):
    with pytest.raises(ConfigError, match=field):
        make_synthetic(dataclasses.replace(SMALL, **{field: value}), seed=0)


def test_to_moves_every_tensor():
    data = make_synthetic(SMALL, seed=0)
    moved = data.to("cpu")
    assert isinstance(moved, SyntheticData)
    for name, t in dataclasses.asdict(data).items():
        assert torch.equal(t, getattr(moved, name))
