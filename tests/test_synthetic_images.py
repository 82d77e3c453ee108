"""Ground-truth band-signal images: determinism, balance, the class lives in its band, end to end."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrfeatures.fourier import Band, BandFilter, band_accuracy, band_energy, default_bands
from lrfeatures.data.synthetic_images import (
    BandSignalConfig,
    class_patterns,
    ground_truth_table,
    make_band_signal_images,
    noise_amplitude,
    signal_band,
    train_linear_classifier,
)
from lrfeatures.errors import ConfigError

SMALL = BandSignalConfig(n_train=300, n_test=100)


def test_deterministic_in_seed_and_seed_override():
    a = make_band_signal_images(SMALL)
    b = make_band_signal_images(SMALL)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    c = make_band_signal_images(SMALL, seed=1)
    assert not torch.equal(a[0], c[0])
    d = make_band_signal_images(replace(SMALL, seed=1))
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])


def test_shapes_range_dtypes_and_uint8():
    x_train, y_train, x_test, y_test = make_band_signal_images(SMALL)
    assert x_train.shape == (300, 3, 32, 32) and x_test.shape == (100, 3, 32, 32)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0 <= x_train.min() and x_train.max() <= 1
    assert 0.3 < x_train.mean() < 0.7 and 0.1 < x_train.std() < 0.2  # the fixed map targets std 0.15
    assert (x_train == 0).float().mean() + (x_train == 1).float().mean() < 0.01  # little clamping
    u_train, uy, _, _ = make_band_signal_images(SMALL, dtype="uint8")
    assert u_train.dtype == torch.uint8 and torch.equal(uy, y_train)
    assert (u_train.float() / 255 - x_train).abs().max() <= 0.5 / 255 + 1e-6


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(2, 12))
def test_labels_balanced(n, k):
    cfg = BandSignalConfig(num_classes=k, size=8, channels=1, n_train=n, n_test=1)
    _, y, _, _ = make_band_signal_images(cfg)
    counts = torch.bincount(y, minlength=k)
    assert counts.max() - counts.min() <= 1 and counts.sum() == n


@pytest.mark.parametrize("band", ["background", "low", "mid", "high", (5, 7)])
def test_class_patterns_lie_exactly_in_the_band(band):
    cfg = replace(SMALL, band=band)
    patterns = class_patterns(cfg).reshape(-1, 3, 32, 32)
    assert torch.allclose(patterns.square().mean((1, 2, 3)), torch.ones(len(patterns)), rtol=1e-4)
    b = signal_band(cfg)
    inside = band_energy(patterns, [b])[:, 0]
    assert torch.allclose(inside, patterns.square().sum((1, 2, 3)), rtol=1e-4)


@pytest.mark.parametrize("band", ["low", "mid", "high"])
def test_class_mean_differences_live_in_the_band(band):
    cfg = BandSignalConfig(band=band, n_train=2000, n_test=10)
    x, y, _, _ = make_band_signal_images(cfg)
    class_means = torch.stack([x[y == c].mean(0) for c in range(cfg.num_classes)])
    differences = class_means - class_means.mean(0)
    energy = band_energy(differences.double()).sum(0)
    names = [b.name for b in default_bands(32)]
    fraction = energy / energy.sum()
    assert fraction[names.index(band)] > 0.9, dict(zip(names, fraction.tolist()))


def test_without_signal_classes_are_indistinguishable():
    cfg = BandSignalConfig(band="mid", n_train=2000, n_test=10, signal_strength=0.0)
    x, y, _, _ = make_band_signal_images(cfg)
    class_means = torch.stack([x[y == c].mean(0) for c in range(cfg.num_classes)])
    with_signal, _, _, _ = make_band_signal_images(replace(cfg, signal_strength=0.3))
    signal_means = torch.stack([with_signal[y == c].mean(0) for c in range(cfg.num_classes)])
    assert (class_means - class_means.mean(0)).std() < 0.3 * (signal_means - signal_means.mean(0)).std()


def test_noise_has_unit_variance_and_a_falling_spectrum():
    amplitude = noise_amplitude(32, 1.0)
    white = torch.randn(400, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    noise = torch.fft.irfft2(torch.fft.rfft2(white) * amplitude, s=(32, 32))
    assert noise.var().item() == pytest.approx(1.0, rel=0.05)
    bands = BandFilter(32).masks().sum((1, 2))  # coefficients per band
    power = band_energy(noise).mean(0) / bands
    assert power[1] > 3 * power[2] > 3 * power[3]  # low > mid > high per coefficient
    assert noise_amplitude(16, 0.0).allclose(torch.ones(16, 9))


def test_bad_configs_raise():
    for bad in (dict(num_classes=1), dict(size=31), dict(band="ultra"), dict(band=(3, 99)),
                dict(contrast=0.0), dict(channel_correlation=1.5), dict(signal_strength=-1.0)):
        with pytest.raises(ConfigError):
            make_band_signal_images(replace(SMALL, **bad))
    with pytest.raises(ConfigError):
        make_band_signal_images(SMALL, dtype="float16")


def test_other_sizes_and_custom_band():
    cfg = BandSignalConfig(size=16, channels=1, band=(2, 3), n_train=50, n_test=5, num_classes=3)
    x, y, _, _ = make_band_signal_images(cfg)
    assert x.shape == (50, 1, 16, 16)
    assert signal_band(cfg) == Band("d2-3", 2, 3)


@pytest.mark.slow
def test_end_to_end_ground_truth_table():
    """A linear model trained on full images scores well above chance (0.1) only on the signal band."""
    table = ground_truth_table(("low", "mid", "high"), BandSignalConfig(n_train=1500, n_test=500), steps=150)
    for signal, row in table.items():
        assert row["full"] > 0.9, table
        assert row[signal] > 0.35, table
        for other in ("background", "low", "mid", "high"):
            if other != signal:
                assert row[other] < 0.2, table


def test_end_to_end_normalization_changes_the_answer():
    """Signal in mid: keep-mid is far above chance, keep-low/high near chance, and the DC-free band
    image under "train" normalization (shifted by -mean/std) scores lower than with DC kept or raw."""
    x_train, y_train, x_test, y_test = make_band_signal_images(BandSignalConfig(n_train=1000, n_test=400))
    mean, std = x_train.mean((0, 2, 3)), x_train.std((0, 2, 3))
    model = train_linear_classifier(x_train, y_train, 10, mean, std, steps=100)
    band_filter = BandFilter(32)
    plain = band_accuracy(model, x_test, y_test, band_filter, "keep", "train", mean, std)
    with_dc = band_accuracy(model, x_test, y_test, band_filter, "keep", "train", mean, std, keep_dc=True)
    raw = band_accuracy(model, x_test, y_test, band_filter, "keep", "none")
    assert plain["mid"] > 0.3 and with_dc["mid"] > 0.9 and raw["mid"] > 0.9, (plain, with_dc, raw)
    assert with_dc["mid"] > plain["mid"] + 0.1
    assert max(acc[b] for acc in (plain, with_dc, raw) for b in ("background", "low", "high")) < 0.2
