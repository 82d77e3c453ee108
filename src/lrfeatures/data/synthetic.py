"""The synthetic feature data of SPEC §3: 2-D shapes, stacked into one input, plus probe sets.

A sample has `n_features` two-dimensional features on the coordinate pairs (0,1), (2,3), ...
Given its label y ~ Bernoulli(1/2), every feature is drawn independently from a `Shape`: a
partition of the square [-2, 2]^2 into class 0 and class 1. An informative feature is uniform
in its class region, at least `margin` (perpendicular, i.e. Euclidean distance) from every
class boundary. An uninformative feature sits exactly on a boundary, where it says nothing
about y.

Distances are Euclidean distances to the boundary curves, extended beyond the square where
the label function extends them. Away from corners of a boundary this equals the SPEC's
"perpendicular half-width"; at the tick's kinks it is the exact distance to the kink point.

Every random draw comes from an explicit torch.Generator; tensors are created on that
generator's device. `make_synthetic` draws on the CPU, so its result does not depend on
the device the data later moves to.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import seeding
from ..config import SyntheticDataConfig
from ..errors import ConfigError, DataError

HALF = 2.0  # features live in [-HALF, HALF]^2
FAR = 8.0  # boundary rays are extended this far so distances near the square are exact
TRIES = 2  # candidates per pending point per rejection round: few, as distances are costly
MAX_ROUNDS = 200


def uniform_square(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Float32 points uniform in [-2, 2]^2, with trailing dimension 2."""
    return torch.rand(*shape, 2, generator=gen, device=gen.device) * (2 * HALF) - HALF


def segment_distance(points: Tensor, segments: Tensor) -> Tensor:
    """Euclidean distance from each point [..., 2] to the nearest of `segments` [m, 2, 2]."""
    start, delta = segments[:, 0], segments[:, 1] - segments[:, 0]
    rel = points.unsqueeze(-2) - start  # [..., m, 2]
    t = ((rel * delta).sum(-1) / (delta * delta).sum(-1)).clamp(0.0, 1.0)
    return (rel - t.unsqueeze(-1) * delta).norm(dim=-1).amin(-1)


def clip_to_square(a: tuple[float, float], b: tuple[float, float]) -> list[tuple[float, float]] | None:
    """The part of segment a-b inside [-2, 2]^2 (Liang-Barsky), or None if it misses the square."""
    t0, t1 = 0.0, 1.0
    for k in range(2):
        d = b[k] - a[k]
        if d == 0:
            if not -HALF <= a[k] <= HALF:
                return None
            continue
        ta, tb = (-HALF - a[k]) / d, (HALF - a[k]) / d
        t0, t1 = max(t0, min(ta, tb)), min(t1, max(ta, tb))
    if t0 >= t1:
        return None
    return [tuple(a[k] + t * (b[k] - a[k]) for k in range(2)) for t in (t0, t1)]


class Shape:
    """A partition of the plane into class 0 and class 1, seen through the square [-2, 2]^2."""

    name = "shape"

    def label_of(self, points: Tensor) -> Tensor:
        """The class (0. or 1., dtype of `points`) of each point [..., 2]."""
        raise NotImplementedError

    def distance_to_boundary(self, points: Tensor) -> Tensor:
        """Euclidean distance from each point [..., 2] to the nearest class boundary."""
        raise NotImplementedError

    def boundary(self, n: int, gen: torch.Generator) -> Tensor:
        """`n` float32 points exactly on a class boundary, uniform by length inside the square."""
        raise NotImplementedError

    def sample(self, labels: Tensor, margin: float, gen: torch.Generator) -> Tensor:
        """Per label (0/1), a float32 point uniform in that class's region minus the margin strip."""
        want = (labels != 0).to(gen.device)
        out = torch.empty(len(want), 2, device=gen.device)
        pending = torch.arange(len(want), device=gen.device)
        for _ in range(MAX_ROUNDS):
            if len(pending) == 0:
                return out
            cand = uniform_square((len(pending), TRIES), gen)
            match = self.label_of(cand) == want[pending, None]
            ok = match.clone()
            ok[match] = self.distance_to_boundary(cand[match]) >= margin  # distances only where needed
            hit = ok.any(1)
            first = ok.int().argmax(1)  # index of the first accepted candidate
            out[pending[hit]] = cand[hit, first[hit]]
            pending = pending[~hit]
        if len(pending) == 0:
            return out
        raise DataError(f"shape {self.name!r} leaves (almost) no room for a class at margin {margin}; "
                        f"lower data.margin")


class PolylineShape(Shape):
    """A shape whose class boundary is a union of polylines (given as vertex lists)."""

    def __init__(self, polylines: list[list[tuple[float, float]]]):
        pairs = [(a, b) for line in polylines for a, b in zip(line[:-1], line[1:])]
        self.segments = torch.tensor(pairs, dtype=torch.float64)  # [m, 2, 2], for distances
        inside = [seg for a, b in pairs if (seg := clip_to_square(a, b)) is not None]
        self.inside = torch.tensor(inside, dtype=torch.float64)  # the boundary within the square

    def distance_to_boundary(self, points: Tensor) -> Tensor:
        """Euclidean distance from each point [..., 2] to the nearest boundary segment."""
        segs = self.segments.to(points.device)
        return segment_distance(points.double(), segs).to(points.dtype)

    def boundary(self, n: int, gen: torch.Generator) -> Tensor:
        """`n` float32 points on the boundary segments, uniform by length inside the square."""
        segs = self.inside.to(gen.device)
        delta = segs[:, 1] - segs[:, 0]
        which = torch.multinomial(delta.norm(dim=-1), n, replacement=True, generator=gen)
        t = torch.rand(n, 1, generator=gen, device=gen.device, dtype=torch.float64)
        points = segs[which, 0] + t * delta[which]
        return points.clamp(-HALF, HALF).float()


def as_label(mask: Tensor, like: Tensor) -> Tensor:
    """A boolean class-1 mask as 0./1. in the dtype of `like`."""
    return mask.to(like.dtype)


class Tick(PolylineShape):
    """SPEC §3's tick. Class 0: the V-band |x1| - 2 < x2 < |x1|. Class 1: x2 > |x1| or x2 < |x1| - 2.

    The boundary is the two V's x2 = |x1| and x2 = |x1| - 2. Boundary points follow the SPEC:
    x1 ~ U[-2, 2], x2 = |x1| + s with s uniform in {0, -2}.
    """

    name = "tick"

    def __init__(self):
        super().__init__([[(-FAR, FAR), (0.0, 0.0), (FAR, FAR)],
                          [(-FAR, FAR - 2), (0.0, -2.0), (FAR, FAR - 2)]])

    def label_of(self, points: Tensor) -> Tensor:
        """Class 1 above the upper V or below the lower V."""
        v = points[..., 1].double() - points[..., 0].double().abs()
        return as_label((v > 0) | (v < -2), points)

    def boundary(self, n: int, gen: torch.Generator) -> Tensor:
        """x1 ~ U[-2, 2], x2 = |x1| + s, s uniform in {0, -2} (SPEC §3)."""
        x1 = torch.rand(n, generator=gen, device=gen.device) * (2 * HALF) - HALF
        s = -2.0 * torch.randint(0, 2, (n,), generator=gen, device=gen.device).float()
        return torch.stack([x1, x1.abs() + s], dim=-1)


class Circles(Shape):
    """Two concentric circles. Class 1: the annulus 0.8 < r < 1.8. Class 0: r < 0.8 or r > 1.8.

    Areas in the square: class 1 8.17, class 0 7.83 (of 16).
    """

    name = "circles"
    radii = (0.8, 1.8)

    def label_of(self, points: Tensor) -> Tensor:
        """Class 1 inside the annulus."""
        r = points.double().norm(dim=-1)
        return as_label((r > self.radii[0]) & (r < self.radii[1]), points)

    def distance_to_boundary(self, points: Tensor) -> Tensor:
        """Distance to the nearer circle."""
        r = points.double().norm(dim=-1)
        return torch.minimum((r - self.radii[0]).abs(), (r - self.radii[1]).abs()).to(points.dtype)

    def boundary(self, n: int, gen: torch.Generator) -> Tensor:
        """Points on either circle, chosen in proportion to its length."""
        radii = torch.tensor(self.radii, dtype=torch.float64, device=gen.device)
        r = radii[torch.multinomial(radii, n, replacement=True, generator=gen)]
        angle = torch.rand(n, generator=gen, device=gen.device, dtype=torch.float64) * (2 * math.pi)
        return torch.stack([r * angle.cos(), r * angle.sin()], dim=-1).float()


class Sectors(PolylineShape):
    """Six 60-degree pie slices around the origin, alternating classes.

    With angle a in [0, 360) degrees from the +x1 axis: class 0 for a in [0,60), [120,180),
    [240,300); class 1 for [60,120), [180,240), [300,360). The boundary is the three lines
    through the origin at 0, 60 and 120 degrees. Exactly balanced in the square (8 and 8).
    """

    name = "sectors"
    count = 6

    def __init__(self):
        lines = []
        for k in range(self.count // 2):
            c, s = math.cos(2 * math.pi * k / self.count), math.sin(2 * math.pi * k / self.count)
            lines.append([(-FAR * c, -FAR * s), (FAR * c, FAR * s)])
        super().__init__(lines)

    def label_of(self, points: Tensor) -> Tensor:
        """Class = index of the slice, mod 2."""
        p = points.double()
        angle = torch.remainder(torch.atan2(p[..., 1], p[..., 0]), 2 * math.pi)
        return as_label(torch.floor(angle / (2 * math.pi / self.count)) % 2 == 1, points)


class Stripe(PolylineShape):
    """A diagonal stripe. Class 1: |x2 - x1| < 1.2 (perpendicular half-width 0.85); class 0: the two corners.

    Tilted by 45 degrees so that, like every other shape, it needs both coordinates (an
    axis-aligned stripe would depend on one). Areas in the square: class 1 8.16, class 0 7.84.
    """

    name = "stripe"
    offset = 1.2

    def __init__(self):
        c = self.offset
        super().__init__([[(-FAR, -FAR + c), (FAR, FAR + c)], [(-FAR, -FAR - c), (FAR, FAR - c)]])

    def label_of(self, points: Tensor) -> Tensor:
        """Class 1 inside the band."""
        p = points.double()
        return as_label((p[..., 1] - p[..., 0]).abs() < self.offset, points)


class Diamond(PolylineShape):
    """Class 1 inside the diamond |x1| + |x2| < 2; class 0 in the four corners of the square.

    The diamond touches the square's edge midpoints. Exactly balanced in the square (8 and 8).
    """

    name = "diamond"

    def __init__(self):
        super().__init__([[(2.0, 0.0), (0.0, 2.0), (-2.0, 0.0), (0.0, -2.0), (2.0, 0.0)]])

    def label_of(self, points: Tensor) -> Tensor:
        """Class 1 inside the diamond."""
        p = points.double()
        return as_label(p[..., 0].abs() + p[..., 1].abs() < 2.0, points)


class Peaks(PolylineShape):
    """Mountains: class 1 below the zigzag x2 = g(x1), class 0 above it.

    g is a triangle wave of period 2 between -1 and 1 with peaks (g = 1) at odd x1 and
    valleys (g = -1) at even x1, so two peaks at x1 = -1 and 1. Exactly balanced (8 and 8).
    """

    name = "peaks"

    def __init__(self):
        # Beyond |x1| = 4 the zigzag is farther from every point of the square than its part inside.
        super().__init__([[(float(k), 1.0 if k % 2 else -1.0) for k in range(-4, 5)]])

    def label_of(self, points: Tensor) -> Tensor:
        """Class 1 below the zigzag."""
        p = points.double()
        g = 1.0 - 2.0 * (torch.remainder(p[..., 0], 2.0) - 1.0).abs()
        return as_label(p[..., 1] < g, points)


def symmetric_copies(line: list[tuple[float, float]], swap: bool) -> list[list[tuple[float, float]]]:
    """`line` under the sign flips of x1 and x2 (and, if `swap`, also with x1 and x2 exchanged)."""
    variants = [line] + ([[(y, x) for x, y in line]] if swap else [])
    return [[(sx * x, sy * y) for x, y in v] for v in variants for sx in (1, -1) for sy in (1, -1)]


class Cross(PolylineShape):
    """A plus sign. Class 1: |x1| < 0.6 or |x2| < 0.6; class 0: the four corner squares.

    The boundary is four L's with corners at (+-0.6, +-0.6). Areas: class 1 8.16, class 0 7.84.
    """

    name = "cross"
    half_width = 0.6

    def __init__(self):
        w = self.half_width
        super().__init__(symmetric_copies([(FAR, w), (w, w), (w, FAR)], swap=False))

    def label_of(self, points: Tensor) -> Tensor:
        """Class 1 on either bar of the plus."""
        p = points.double().abs()
        return as_label((p[..., 0] < self.half_width) | (p[..., 1] < self.half_width), points)


class UnionJack(PolylineShape):
    """The flag's crosses. Class 1: |x1| < 0.3 or |x2| < 0.3 or |x1 - x2| < 0.3 or |x1 + x2| < 0.3.

    Class 0 is the eight triangles between the bars (e.g. x2 > 0.3 and x1 - x2 > 0.3). Each
    triangle's boundary is two rays from its corner. Areas: class 1 8.16, class 0 7.84.
    """

    name = "union-jack"
    bar = 0.3  # half-width of the straight bars; vertical half-width of the diagonal ones

    def __init__(self):
        a = c = self.bar
        super().__init__(symmetric_copies([(FAR, a), (a + c, a), (a + c + FAR, a + FAR)], swap=True))

    def label_of(self, points: Tensor) -> Tensor:
        """Class 1 on any of the four bars."""
        p = points.double()
        x1, x2 = p[..., 0], p[..., 1]
        on_bar = ((x1.abs() < self.bar) | (x2.abs() < self.bar)
                  | ((x1 - x2).abs() < self.bar) | ((x1 + x2).abs() < self.bar))
        return as_label(on_bar, points)


SHAPES: dict[str, Shape] = {s.name: s for s in (Tick(), Circles(), Sectors(), Stripe(), Diamond(),
                                                 Peaks(), Cross(), UnionJack())}


def get_shape(name: str) -> Shape:
    """The registered shape called `name`."""
    if name not in SHAPES:
        raise ConfigError(f"unknown synthetic shape {name!r}; set data.shape to one of: {', '.join(SHAPES)}")
    return SHAPES[name]


@dataclass
class SyntheticData:
    """Train/test sets [n, 2F] with float 0/1 labels, and one probe set per feature [F, n_probe, 2F]."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_probe: Tensor  # probe set i: only feature i informative, all others on the boundary
    y_probe: Tensor

    def to(self, device: str | torch.device) -> SyntheticData:
        """A copy with every tensor on `device`."""
        return SyntheticData(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def draw_labels(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Float32 labels, Bernoulli(1/2)."""
    return torch.randint(0, 2, shape, generator=gen, device=gen.device).float()


def draw_split(shape: Shape, cfg: SyntheticDataConfig, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """`n` samples: each feature informative with probability cfg.informative_prob, else on the boundary."""
    f = cfg.n_features
    y = draw_labels((n,), gen)
    informative = torch.rand(n, f, generator=gen, device=gen.device) < cfg.informative_prob
    points = shape.sample(y.repeat_interleave(f), cfg.margin, gen).view(n, f, 2)
    on_boundary = shape.boundary(n * f, gen).view(n, f, 2)
    x = torch.where(informative.unsqueeze(-1), points, on_boundary)
    return x.reshape(n, 2 * f), y


def draw_probes(shape: Shape, cfg: SyntheticDataConfig, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Probe set i: `n_probe` samples with only feature i informative, the rest on the boundary."""
    f, n = cfg.n_features, cfg.n_probe
    y = draw_labels((f, n), gen)
    points = shape.sample(y.reshape(-1), cfg.margin, gen).view(f, n, 2)
    x = shape.boundary(f * n * f, gen).view(f, n, f, 2)
    feature = torch.arange(f, device=gen.device)
    x[feature, :, feature] = points  # probe set i, feature i
    return x.reshape(f, n, 2 * f), y


def flip_labels(y: Tensor, fraction: float, gen: torch.Generator) -> Tensor:
    """`y` with exactly round(fraction * len(y)) labels, chosen uniformly, flipped."""
    flipped = torch.randperm(len(y), generator=gen, device=gen.device)[: round(fraction * len(y))]
    y = y.clone()
    y[flipped] = 1.0 - y[flipped]
    return y


def check_config(cfg: SyntheticDataConfig) -> None:
    """Raise ConfigError for a data config that cannot produce a data set."""
    for name in ("n_features", "n_train", "n_test", "n_probe"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"data.{name}={getattr(cfg, name)} must be > 0")
    if not cfg.margin >= 0:
        raise ConfigError(f"data.margin={cfg.margin} must be >= 0")
    if not 0.0 <= cfg.informative_prob <= 1.0:
        raise ConfigError(f"data.informative_prob={cfg.informative_prob} must be in [0, 1]")
    if not 0.0 <= cfg.label_noise < 0.5:
        raise ConfigError(f"data.label_noise={cfg.label_noise} must be in [0, 0.5)")


def make_synthetic(cfg: SyntheticDataConfig, seed: int) -> SyntheticData:
    """The data set of data seed `seed`; each split has its own random stream.

    Label noise flips exactly round(label_noise * n_train) TRAIN labels after the features are
    drawn from the clean labels; test and probe labels stay clean, so they measure the true task.
    """
    shape = get_shape(cfg.shape)
    check_config(cfg)
    x_train, y_train = draw_split(shape, cfg, cfg.n_train, seeding.generator(seed, "synthetic", "train"))
    if cfg.label_noise > 0:
        y_train = flip_labels(y_train, cfg.label_noise, seeding.generator(seed, "synthetic", "label-noise"))
    x_test, y_test = draw_split(shape, cfg, cfg.n_test, seeding.generator(seed, "synthetic", "test"))
    x_probe, y_probe = draw_probes(shape, cfg, seeding.generator(seed, "synthetic", "probe"))
    return SyntheticData(x_train, y_train, x_test, y_test, x_probe, y_probe)
