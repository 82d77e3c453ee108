"""Images whose class is carried by several Fourier bands at once, each band enough on its own.

The image analogue of the synthetic tick task (SPEC §3): a task with redundant cues whose
single-cue probes have a known answer. A sample of class c is, before the pixel map,

    x = noise + sum_b s * a_b * (cos(phi_b) A_{b,c} + sin(phi_b) B_{b,c})     b in `bands`

  - bands: by default low, mid and high of the SPEC §5 partition (lrfeatures/fourier.py), for
    16x16 images d = 1-4, 5-12, 13-16;
  - A_{b,c}, B_{b,c}: fixed patterns drawn once from the seed as band-b projections of white
    noise, B orthogonalised against A, both of unit pixel RMS: every band's class signal has
    exactly the energy s^2 a_b^2 per image (Parseval), the same for every band;
  - a_b ~ U[1 - amplitude_jitter, 1 + amplitude_jitter], phi_b ~ U[-phase_jitter, phase_jitter],
    drawn independently per band and image;
  - noise: class-independent white noise (a flat spectrum: the same power on every DFT
    coefficient, so every band has the same background spectrum), unit pixel variance, channels
    correlated by channel_correlation. With a flat noise spectrum the class signal of every band
    has the same squared Mahalanobis size s^2 a_b^2 HW C: for an ideal linear reader every band
    is equally informative, whatever its number of coefficients;
  - the pixel map is fixed, 0.5 + x * contrast / sqrt(1 + n_bands s^2 E[a^2]), clamped to
    [0, 1] (about 0.1% of pixels at the default contrast) and quantised to uint8 like any image set.

Single-band probe sets (`make_probe_sets`): in probe set i, band i carries the label and every
other band b carries the pattern of an independent, uniformly drawn class with fresh jitter
(and fresh noise). Each band's content then has exactly its training distribution, so every
per-band spectrum and energy, the pixel statistics, and BatchNorm's statistics are those of
the task; only the agreement between bands is gone. A model that reads band j != i is at
chance on probe set i in expectation, as a tick-task model is on a probe set whose feature it
ignores.

Registered as the image data set `bands-redundant` (`load_bands_redundant`), with
BandRedundantConfig() and the data seed as its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import ConfigError, DataError
from ..fourier import Band, BandFilter, default_bands
from ..seeding import generator
from .imageset import ImageDataset, LoadOptions, keep_first_per_class
from .synthetic_images import check_signal_fields

CHUNK = 4096  # images generated per chunk (bounds memory; part of what a seed means)
NAME = "bands-redundant"


@dataclass
class BandRedundantConfig:
    """The redundant-band task: the class in every band of `bands`, white class-independent noise."""

    num_classes: int = 10
    size: int = 16
    channels: int = 3
    bands: tuple[str, ...] = ("low", "mid", "high")
    n_train: int = 2000
    n_test: int = 1000
    n_probe: int = 1000
    signal_strength: float = 0.1     # per band: pixel RMS of its class signal over the noise's
    amplitude_jitter: float = 0.5
    phase_jitter: float = math.pi / 4
    channel_correlation: float = 0.5
    contrast: float = 0.15
    seed: int = 0

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        check_signal_fields(self, [(len(self.bands) >= 2, "bands must name at least 2 bands"),
                                   (min(self.n_train, self.n_test, self.n_probe) >= 1,
                                    "n_train, n_test and n_probe must be >= 1")])
        signal_bands(self)


def signal_bands(cfg: BandRedundantConfig) -> tuple[Band, ...]:
    """The Bands that carry the class (names of the default partition for cfg.size, no d = 0)."""
    by_name = {b.name: b for b in default_bands(cfg.size)}
    unknown = [name for name in cfg.bands if name not in by_name or by_name[name].lo == 0]
    if unknown or len(set(cfg.bands)) != len(cfg.bands):
        raise ConfigError(f"BandRedundantConfig: bands {list(cfg.bands)} must be distinct names among "
                          f"{[b.name for b in by_name.values() if b.lo > 0]}; fix that field")
    return tuple(by_name[name] for name in cfg.bands)


def band_filter(cfg: BandRedundantConfig) -> BandFilter:
    """The filter onto the signal bands, in cfg.bands order."""
    return BandFilter(cfg.size, bands=signal_bands(cfg))


def class_patterns(cfg: BandRedundantConfig) -> torch.Tensor:
    """Fixed patterns [n_bands, 2, num_classes, C, H, W]: A and B (orthogonal to A) per class, unit RMS, in-band."""
    gen = generator(cfg.seed, NAME, "patterns")
    n_bands = len(cfg.bands)
    white = torch.randn(2 * cfg.num_classes, cfg.channels, cfg.size, cfg.size, generator=gen, dtype=torch.float64)
    parts = band_filter(cfg)(white)  # [n_bands, 2K, C, H, W]: one white draw split over disjoint bands
    parts = parts.reshape(n_bands, 2, cfg.num_classes, -1)
    a = parts[:, 0] / parts[:, 0].norm(dim=-1, keepdim=True)
    b = parts[:, 1] - (parts[:, 1] * a).sum(-1, keepdim=True) * a  # still in band: a linear combination
    b = b / b.norm(dim=-1, keepdim=True)
    unit_rms = math.sqrt(a.shape[-1])  # norm sqrt(C H W) = pixel RMS 1
    patterns = torch.stack([a, b], dim=1) * unit_rms
    return patterns.reshape(n_bands, 2, cfg.num_classes, cfg.channels, cfg.size, cfg.size).float()


def pixel_scale(cfg: BandRedundantConfig) -> float:
    """The fixed factor of the pixel map: contrast / (pixel std of x)."""
    mean_sq_jitter = 1 + cfg.amplitude_jitter ** 2 / 3  # E[a^2] for a ~ U[1-j, 1+j]
    return cfg.contrast / math.sqrt(1 + len(cfg.bands) * cfg.signal_strength ** 2 * mean_sq_jitter)


def components(cfg: BandRedundantConfig, n: int, tag: str, probe_band: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise [N, C, H, W], signals [n_bands, N, C, H, W], labels [N], band classes [n_bands, N]) of one split.

    band classes[b] is the class whose pattern band b carries: the label for every band, or with
    `probe_band` = i only for band i, every other band an independent uniform class.
    """
    cfg.validate()
    n_bands = len(cfg.bands)
    if probe_band is not None and not 0 <= probe_band < n_bands:
        raise DataError(f"probe_band={probe_band} is not a band index; use 0..{n_bands - 1}")
    patterns = class_patterns(cfg)
    gen = generator(cfg.seed, NAME, tag, "labels")
    labels = (torch.arange(n) % cfg.num_classes)[torch.randperm(n, generator=gen)]
    rho = cfg.channel_correlation
    shape = (cfg.channels, cfg.size, cfg.size)
    noise = torch.empty(n, *shape)
    signals = torch.empty(n_bands, n, *shape)
    carried = labels.repeat(n_bands, 1)
    for chunk, start in enumerate(range(0, n, CHUNK)):
        m = min(CHUNK, n - start)
        gen = generator(cfg.seed, NAME, tag, chunk)
        a = 1 + cfg.amplitude_jitter * (2 * torch.rand(n_bands, m, 1, 1, 1, generator=gen) - 1)
        phi = cfg.phase_jitter * (2 * torch.rand(n_bands, m, 1, 1, 1, generator=gen) - 1)
        others = torch.randint(cfg.num_classes, (n_bands, m), generator=gen)
        shared = torch.randn(m, 1, cfg.size, cfg.size, generator=gen)
        own = torch.randn(m, *shape, generator=gen)
        noise[start:start + m] = math.sqrt(rho) * shared + math.sqrt(1 - rho) * own
        if probe_band is not None:
            rows = [b for b in range(n_bands) if b != probe_band]
            carried[rows, start:start + m] = others[rows]
        for b in range(n_bands):
            y = carried[b, start:start + m]
            signals[b, start:start + m] = cfg.signal_strength * a[b] * (
                phi[b].cos() * patterns[b, 0, y] + phi[b].sin() * patterns[b, 1, y])
    return noise, signals, labels, carried


def to_pixels(cfg: BandRedundantConfig, x: torch.Tensor, dtype: str = "uint8") -> torch.Tensor:
    """The fixed pixel map of the module docstring: float [0, 1] images or their uint8 quantisation."""
    if dtype not in ("float32", "uint8"):
        raise ConfigError(f"dtype {dtype!r} is not offered; use 'float32' or 'uint8'")
    images = (0.5 + pixel_scale(cfg) * x).clamp_(0.0, 1.0)
    return images.mul(255).round_().to(torch.uint8) if dtype == "uint8" else images


def _split(cfg: BandRedundantConfig, n: int, tag: str, probe_band: int | None, dtype: str):
    noise, signals, labels, _ = components(cfg, n, tag, probe_band)
    return to_pixels(cfg, noise + signals.sum(0), dtype), labels


def make_bands_redundant_images(cfg: BandRedundantConfig, seed: int | None = None, dtype: str = "uint8"
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images [N, C, H, W] (uint8 or float32 in [0, 1]), labels int64."""
    cfg = cfg if seed is None else replace(cfg, seed=seed)
    x_train, y_train = _split(cfg, cfg.n_train, "train", None, dtype)
    x_test, y_test = _split(cfg, cfg.n_test, "test", None, dtype)
    return x_train, y_train, x_test, y_test


def make_probe_sets(cfg: BandRedundantConfig, seed: int | None = None, dtype: str = "uint8", split: str = "probe",
                    n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-band probe sets: images [n_bands, n, C, H, W] and labels [n_bands, n] (n = cfg.n_probe).

    Probe set i (in cfg.bands order) carries the label in band i only (module docstring). Another
    `split` name draws other images of the same task (e.g. single-band training sets).
    """
    cfg = cfg if seed is None else replace(cfg, seed=seed)
    n = cfg.n_probe if n is None else n
    sets = [_split(cfg, n, f"{split}-{name}", i, dtype) for i, name in enumerate(cfg.bands)]
    return torch.stack([x for x, _ in sets]), torch.stack([y for _, y in sets])


def load_bands_redundant(arg: str, opts: LoadOptions) -> ImageDataset:
    """The registry loader of `bands-redundant`: BandRedundantConfig() as uint8 images, seeded by the data seed."""
    cfg = BandRedundantConfig(seed=opts.seed)
    if opts.classes is not None:
        raise DataError(f"{NAME} has fixed classes class0..class{cfg.num_classes - 1}; "
                        "leave classes= (data.classes) empty")
    x_train, y_train, x_test, y_test = make_bands_redundant_images(cfg)
    classes = [f"class{c}" for c in range(cfg.num_classes)]
    dataset = ImageDataset(x_train, y_train, x_test, y_test, classes, NAME)
    return keep_first_per_class(dataset, opts.max_per_class)
