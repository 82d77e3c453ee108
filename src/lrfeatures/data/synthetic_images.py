"""Ground-truth images whose class is carried ONLY by one Fourier band (checks SPEC §5 analysis).

A sample of class c is  s * a * (cos(phi) A_c + sin(phi) B_c) + noise,  mapped into [0, 1]:
  - A_c, B_c: fixed random patterns of unit RMS, drawn once from the seed as band projections
    of white noise, so they lie exactly in the chosen band b (see lrfeatures/fourier.py);
  - a ~ U[1 - amplitude_jitter, 1 + amplitude_jitter] and phi ~ U[-phase_jitter, phase_jitter]
    per sample: the class signal varies but never leaves band b;
  - noise: class-independent, in all bands, with a 1/f^noise_exponent amplitude spectrum and
    random phases (coloured white noise), unit pixel variance, channels correlated by
    channel_correlation (a shared component, like luminance);
  - s = signal_strength is the pixel-space RMS ratio of class signal to noise;
  - the map into [0, 1] is FIXED: 0.5 + x * contrast / sqrt(1 + s^2 E[a^2]), clamped, the same
    for every image (a per-image min-max would leak the label into other bands). Clamping
    touches about 0.1% of pixels at the default contrast.

As the registered image data set `band-signal` (`load_band_signal`) the images are the uint8
quantisation round(255 x) of the default config's float images, like any other ImageDataset:
a step of 1/255 against a pixel std of `contrast` (0.15) adds a rounding error of RMS
1/(255 sqrt(12)) ~ 0.0011, about 0.75% of the pixel std, spread over all bands.

`python -m lrfeatures.data.synthetic_images --check` trains a linear classifier on data with
the signal in low / mid / high and prints its keep-band accuracy table (`ground_truth_table`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace

import torch

from ..errors import ConfigError, DataError
from ..fourier import Band, BandFilter, band_accuracy, check_bands, default_bands
from ..seeding import generator
from .imageset import ImageDataset, LoadOptions, keep_first_per_class

CHUNK = 4096  # images generated per chunk (bounds memory; part of what a seed means)


@dataclass
class BandSignalConfig:
    """A ground-truth data set: the class lives in one band, everything else is shared noise."""

    num_classes: int = 10
    size: int = 32
    channels: int = 3
    band: str | tuple[int, int] = "mid"  # a default band name or an inclusive (lo, hi) d range
    n_train: int = 2000
    n_test: int = 1000
    signal_strength: float = 0.3
    amplitude_jitter: float = 0.5
    phase_jitter: float = math.pi / 4
    noise_exponent: float = 1.0
    channel_correlation: float = 0.5
    contrast: float = 0.15
    seed: int = 0

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        check_signal_fields(self, [(self.n_train >= 1 and self.n_test >= 1, "n_train and n_test must be >= 1"),
                                   (self.noise_exponent >= 0, "noise_exponent must be >= 0")])
        signal_band(self)


def check_signal_fields(cfg, extra: list[tuple[bool, str]]) -> None:
    """The checks every class-signal image config shares, then `extra`: one-line ConfigError on the first failure."""
    checks = [
        (cfg.num_classes >= 2, "num_classes must be >= 2"),
        (cfg.size >= 4 and cfg.size % 2 == 0, "size must be even and >= 4"),
        (cfg.channels >= 1, "channels must be >= 1"),
        (cfg.signal_strength >= 0, "signal_strength must be >= 0"),
        (0 <= cfg.amplitude_jitter <= 1, "amplitude_jitter must be in [0, 1]"),
        (0 <= cfg.phase_jitter <= math.pi, "phase_jitter must be in [0, pi]"),
        (0 <= cfg.channel_correlation <= 1, "channel_correlation must be in [0, 1]"),
        (0 < cfg.contrast <= 0.5, "contrast must be in (0, 0.5]"),
    ] + extra
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{type(cfg).__name__}: {message}; fix that field")


def signal_band(cfg: BandSignalConfig) -> Band:
    """The Band that carries the class signal (a default band name or a (lo, hi) range)."""
    if isinstance(cfg.band, str):
        by_name = {b.name: b for b in default_bands(cfg.size)}
        if cfg.band not in by_name:
            raise ConfigError(f"band {cfg.band!r} is unknown; use one of {list(by_name)} or a (lo, hi) range")
        return by_name[cfg.band]
    lo, hi = cfg.band
    return check_bands([Band(f"d{lo}-{hi}", int(lo), int(hi))], cfg.size, cfg.size)[0]


def noise_amplitude(size: int, exponent: float) -> torch.Tensor:
    """rfft2-layout amplitude 1/max(|f|, 1)^exponent, scaled so the coloured noise has unit variance."""
    kx = torch.fft.fftfreq(size, d=1.0 / size)
    ky = torch.fft.rfftfreq(size, d=1.0 / size)
    radius = torch.sqrt(kx[:, None] ** 2 + ky[None, :] ** 2).clamp(min=1.0)
    amplitude = radius ** (-exponent)
    # pixel variance of irfft2(rfft2(w) * A) for white w is the mean of A^2 over the FULL spectrum
    full = torch.cat([amplitude, amplitude[:, 1 : size - size // 2].flip(-1)], dim=-1)
    return amplitude / full.square().mean().sqrt()


def class_patterns(cfg: BandSignalConfig) -> torch.Tensor:
    """Fixed patterns [2, num_classes, C, H, W] (A and B per class), unit RMS, inside the signal band."""
    gen = generator(cfg.seed, "band-signal", "patterns")
    white = torch.randn(2 * cfg.num_classes, cfg.channels, cfg.size, cfg.size, generator=gen)
    band_filter = BandFilter(cfg.size, bands=[signal_band(cfg)])
    patterns = band_filter(white)[0]
    patterns = patterns / patterns.square().mean((1, 2, 3), keepdim=True).sqrt()
    return patterns.reshape(2, cfg.num_classes, cfg.channels, cfg.size, cfg.size)


def _split(cfg: BandSignalConfig, patterns: torch.Tensor, n: int, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = generator(cfg.seed, "band-signal", tag, "labels")
    labels = (torch.arange(n) % cfg.num_classes)[torch.randperm(n, generator=gen)]
    amplitude = noise_amplitude(cfg.size, cfg.noise_exponent)
    mean_sq_jitter = 1 + cfg.amplitude_jitter**2 / 3  # E[a^2] for a ~ U[1-j, 1+j]
    scale = cfg.contrast / math.sqrt(1 + cfg.signal_strength**2 * mean_sq_jitter)
    rho = cfg.channel_correlation
    images = torch.empty(n, cfg.channels, cfg.size, cfg.size)
    for chunk, start in enumerate(range(0, n, CHUNK)):
        y = labels[start : start + CHUNK]
        m = y.shape[0]
        gen = generator(cfg.seed, "band-signal", tag, chunk)
        a = 1 + cfg.amplitude_jitter * (2 * torch.rand(m, 1, 1, 1, generator=gen) - 1)
        phi = cfg.phase_jitter * (2 * torch.rand(m, 1, 1, 1, generator=gen) - 1)
        signal = a * (phi.cos() * patterns[0, y] + phi.sin() * patterns[1, y])
        shared = torch.randn(m, 1, cfg.size, cfg.size, generator=gen)
        own = torch.randn(m, cfg.channels, cfg.size, cfg.size, generator=gen)
        white = math.sqrt(rho) * shared + math.sqrt(1 - rho) * own
        noise = torch.fft.irfft2(torch.fft.rfft2(white) * amplitude, s=(cfg.size, cfg.size))
        x = cfg.signal_strength * signal + noise
        images[start : start + m] = (0.5 + scale * x).clamp_(0.0, 1.0)
    return images, labels


def make_band_signal_images(
    cfg: BandSignalConfig, seed: int | None = None, dtype: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images [N, C, H, W] float32 in [0, 1] or uint8, labels int64.

    `seed` overrides cfg.seed. Deterministic in the seed; labels are balanced (counts differ by <= 1).
    """
    cfg = cfg if seed is None else replace(cfg, seed=seed)
    cfg.validate()
    if dtype not in ("float32", "uint8"):
        raise ConfigError(f"dtype {dtype!r} is not offered; use 'float32' or 'uint8'")
    patterns = class_patterns(cfg)
    x_train, y_train = _split(cfg, patterns, cfg.n_train, "train")
    x_test, y_test = _split(cfg, patterns, cfg.n_test, "test")
    if dtype == "uint8":
        x_train, x_test = (x.mul(255).round_().to(torch.uint8) for x in (x_train, x_test))
    return x_train, y_train, x_test, y_test


def load_band_signal(arg: str, opts: LoadOptions) -> ImageDataset:
    """The registry loader of `band-signal`: BandSignalConfig() as uint8 images, seeded by the data seed."""
    cfg = BandSignalConfig(seed=opts.seed)
    if opts.classes is not None:
        raise DataError(f"band-signal has fixed classes class0..class{cfg.num_classes - 1}; "
                        "leave classes= (data.classes) empty")
    x_train, y_train, x_test, y_test = make_band_signal_images(cfg, dtype="uint8")
    classes = [f"class{c}" for c in range(cfg.num_classes)]
    dataset = ImageDataset(x_train, y_train, x_test, y_test, classes, "band-signal")
    return keep_first_per_class(dataset, opts.max_per_class)


def train_linear_classifier(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, mean: torch.Tensor, std: torch.Tensor,
    steps: int = 200, lr: float = 1e-2, weight_decay: float = 1e-3,
) -> torch.nn.Module:
    """Full-batch Adam logistic regression on normalized, flattened images (a tiny ground-truth model)."""
    # zero init: the loss is convex, full batch has no data order, so no random stream is needed
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), num_classes))
    for parameter in model.parameters():
        torch.nn.init.zeros_(parameter)
    inputs = (x - mean[:, None, None]) / std[:, None, None]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(inputs), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def ground_truth_tables(
    signal_bands: tuple[str, ...] = ("low", "mid", "high"),
    cfg: BandSignalConfig | None = None,
    steps: int = 200,
    settings: tuple[tuple[str, bool], ...] = (("train", False),),
) -> dict[tuple[str, bool], dict[str, dict[str, float]]]:
    """One `ground_truth_table` per (normalization, keep_dc) setting, training each model once."""
    cfg = cfg or BandSignalConfig()
    tables: dict[tuple[str, bool], dict[str, dict[str, float]]] = {setting: {} for setting in settings}
    for name in signal_bands:
        x_train, y_train, x_test, y_test = make_band_signal_images(replace(cfg, band=name))
        mean, std = x_train.mean((0, 2, 3)), x_train.std((0, 2, 3))
        model = train_linear_classifier(x_train, y_train, cfg.num_classes, mean, std, steps)
        with torch.no_grad():
            inputs = (x_test - mean[:, None, None]) / std[:, None, None]
            full = (model(inputs).argmax(-1) == y_test).double().mean().item()
        for normalization, keep_dc in settings:
            per_band = band_accuracy(model, x_test, y_test, BandFilter(cfg.size), "keep", normalization, mean, std,
                                     keep_dc=keep_dc)
            tables[(normalization, keep_dc)][name] = {"full": full} | per_band
    return tables


def ground_truth_table(
    signal_bands: tuple[str, ...] = ("low", "mid", "high"),
    cfg: BandSignalConfig | None = None,
    steps: int = 200,
    normalization: str = "train",
    keep_dc: bool = False,
) -> dict[str, dict[str, float]]:
    """{signal band: {"full": acc, band name: keep-band acc}} of a linear model per ground-truth set.

    "full" is the accuracy on unfiltered test images; the band columns use `band_accuracy` in
    keep mode with the given normalization and keep_dc.
    """
    setting = (normalization, keep_dc)
    return ground_truth_tables(signal_bands, cfg, steps, (setting,))[setting]


def format_table(table: dict[str, dict[str, float]]) -> str:
    """Plain-text table: one row per signal band, one column per evaluated band."""
    columns = list(next(iter(table.values())))
    lines = ["signal\\eval " + " ".join(f"{c:>10}" for c in columns)]
    for name, row in table.items():
        lines.append(f"{name:<11} " + " ".join(f"{row[c]:>10.3f}" for c in columns))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """`--check`: print the ground-truth keep-band accuracy table."""
    parser = argparse.ArgumentParser(prog="python -m lrfeatures.data.synthetic_images")
    parser.add_argument("--check", action="store_true", help="train on low/mid/high signal sets, print the table")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.check:
        parser.print_help()
        return
    settings = (("train", False), ("train", True), ("none", False))
    tables = ground_truth_tables(cfg=BandSignalConfig(seed=args.seed), steps=args.steps, settings=settings)
    for (normalization, keep_dc), table in tables.items():
        print(f"keep-band accuracy, normalization={normalization}, keep_dc={keep_dc} (chance 0.1):")
        print(format_table(table))

if __name__ == "__main__":
    main()
