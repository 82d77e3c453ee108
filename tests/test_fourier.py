"""Band filtering (SPEC §5): exactness against a numpy oracle, partitions, Parseval, realness."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrfeatures.fourier import (
    Band,
    BandFilter,
    band_accuracy,
    band_energy,
    default_bands,
    l1_distance_grid,
    log_magnitude_spectrum,
    normalize_band_images,
    real_fourier_basis,
)
from lrfeatures.errors import ConfigError, DataError

BACKENDS = ["fft", "matmul"]
SIZES = [(32, 32), (16, 16), (8, 12), (4, 4)]


def numpy_oracle(x: torch.Tensor, masks_shifted: torch.Tensor) -> np.ndarray:
    """One image at a time: shifted fft2, mask, unshift, ifft2, real part (float64)."""
    out = np.zeros((masks_shifted.shape[0], *x.shape))
    for n, image in enumerate(x.double().numpy()):
        spectrum = np.fft.fftshift(np.fft.fft2(image), axes=(-2, -1))
        for b, mask in enumerate(masks_shifted.numpy()):
            out[b, n] = np.fft.ifft2(np.fft.ifftshift(spectrum * mask, axes=(-2, -1))).real
    return out


def random_images(n, h, w, seed=0, channels=3):
    return torch.rand(n, channels, h, w, generator=torch.Generator().manual_seed(seed))


def test_default_bands_match_spec_and_scale():
    assert default_bands(32) == (Band("background", 0, 0), Band("low", 1, 8), Band("mid", 9, 24), Band("high", 25, 32))
    assert [(b.lo, b.hi) for b in default_bands(64)] == [(0, 0), (1, 16), (17, 48), (49, 64)]
    assert [(b.lo, b.hi) for b in default_bands(16)] == [(0, 0), (1, 4), (5, 12), (13, 16)]
    assert [(b.lo, b.hi) for b in default_bands(4)] == [(0, 0), (1, 1), (2, 3), (4, 4)]


@pytest.mark.parametrize("size", [4, 6, 8, 10, 16, 24, 32, 48, 64, 128])
def test_default_bands_partition_every_even_size(size):
    band_filter = BandFilter(size)
    assert band_filter.is_partition()
    counts = band_filter.masks().sum((1, 2))
    assert int(counts.sum()) == size * size and bool((counts > 0).all())


@pytest.mark.parametrize("bad", [2, 3, 15, 33])
def test_unsupported_sizes_raise(bad):
    with pytest.raises(DataError):
        BandFilter(bad)


def test_bad_bands_raise():
    with pytest.raises(ConfigError):
        BandFilter(32, bands=[Band("a", 0, 10), Band("b", 10, 12)])
    with pytest.raises(ConfigError):
        BandFilter(32, bands=[Band("a", 0, 33)])
    with pytest.raises(ConfigError):
        BandFilter(32, backend="cufft")


@pytest.mark.parametrize("n", [4, 10, 32])
def test_real_fourier_basis_is_orthonormal_and_sorted(n):
    basis, magnitudes = real_fourier_basis(n, dtype=torch.float64)
    torch.testing.assert_close(basis @ basis.T, torch.eye(n, dtype=torch.float64))
    assert magnitudes.tolist() == sorted(magnitudes.tolist()) and magnitudes[-1] == n // 2
    spectra = torch.fft.fft(basis).abs()  # each row only holds the frequencies +-|k|
    k = torch.fft.fftfreq(n, d=1.0 / n).round().abs()
    assert bool(((spectra > 1e-9) <= (k[None] == magnitudes[:, None])).all())


def test_distance_grid_centre_and_corners():
    d = l1_distance_grid(32)
    assert d[16, 16] == 0 and d[0, 0] == 32 and d[16, 0] == 16 and d.max() == 32
    assert torch.equal(torch.fft.ifftshift(d), l1_distance_grid(32, shifted=False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("mode", ["keep", "remove"])
@pytest.mark.parametrize("keep_dc", [False, True])
def test_filter_matches_numpy_oracle(backend, h, w, mode, keep_dc):
    x = random_images(5, h, w)
    band_filter = BandFilter(h, w, backend=backend)
    got = band_filter(x, mode, keep_dc, chunk_size=2)
    want = numpy_oracle(x, band_filter.masks(mode, keep_dc))
    assert got.shape == (band_filter.n_bands, *x.shape) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, atol=2e-6)


def test_non_partition_bands_match_oracle():
    bands = [Band("ring", 3, 5), Band("outer", 20, 32)]  # gaps: no residual shortcut
    x = random_images(4, 32, 32)
    for backend in BACKENDS:
        band_filter = BandFilter(32, bands=bands, backend=backend)
        np.testing.assert_allclose(band_filter(x).numpy(), numpy_oracle(x, band_filter.masks()), atol=2e-6)


@settings(max_examples=25, deadline=None)
@given(size=st.sampled_from([4, 8, 16, 32, 64]), seed=st.integers(0, 2**16), backend=st.sampled_from(BACKENDS))
def test_keep_bands_of_a_partition_sum_to_image(size, seed, backend):
    x = random_images(3, size, size, seed)
    band_images = BandFilter(size, backend=backend)(x, "keep")
    torch.testing.assert_close(band_images.sum(0), x, atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), backend=st.sampled_from(BACKENDS), lo=st.integers(0, 32), width=st.integers(0, 8))
def test_keep_and_remove_are_complementary(seed, backend, lo, width):
    x = random_images(2, 32, 32, seed)
    band_filter = BandFilter(32, bands=[Band("b", lo, min(lo + width, 32))], backend=backend)
    torch.testing.assert_close(band_filter(x, "keep") + band_filter(x, "remove"), x[None], atol=1e-5, rtol=0)


def test_keep_dc_adds_only_the_per_channel_mean():
    x = random_images(4, 32, 32)
    band_filter = BandFilter(32)
    mean = x.mean((-2, -1), keepdim=True)
    plain, with_dc = band_filter(x, "keep"), band_filter(x, "keep", keep_dc=True)
    torch.testing.assert_close(with_dc[1:], plain[1:] + mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(with_dc[0], plain[0])  # background already is the DC term
    torch.testing.assert_close(plain[0], mean.expand_as(x), atol=1e-6, rtol=0)
    removed = band_filter(x, "remove", keep_dc=True)
    torch.testing.assert_close(removed[0], x, atol=1e-6, rtol=0)  # removing DC but keeping DC: no-op


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), h=st.sampled_from([8, 16, 32]), w=st.sampled_from([8, 16, 32]))
def test_parseval_band_energy(seed, h, w):
    x = random_images(3, h, w, seed)
    band_filter = BandFilter(h, w)
    energy = band_energy(x, band_filter)
    assert energy.shape == (3, band_filter.n_bands)
    torch.testing.assert_close(energy.sum(1), x.square().sum((1, 2, 3)), rtol=1e-5, atol=1e-4)
    pixel_energy = band_filter(x).square().sum((2, 3, 4)).T
    torch.testing.assert_close(energy, pixel_energy, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(band_energy(x[0]), energy[0])


def cosine_image(size, kx, ky, phase):
    t = torch.arange(size, dtype=torch.float64)
    return torch.cos(2 * math.pi * (kx * t[:, None] + ky * t[None, :]) / size + phase)


@settings(max_examples=25, deadline=None)
@given(
    size=st.sampled_from([8, 16, 32]),
    kx=st.integers(-16, 16), ky=st.integers(-16, 16),
    phase=st.floats(0, 2 * math.pi), backend=st.sampled_from(BACKENDS),
)
def test_pure_sinusoid_lands_in_exactly_its_band(size, kx, ky, phase, backend):
    kx, ky = max(-size // 2, min(kx, size // 2)), max(-size // 2, min(ky, size // 2))  # includes Nyquist
    image = cosine_image(size, kx, ky, phase).float()[None, None]
    d = abs(kx) + abs(ky)
    per_distance = BandFilter(size, bands=[Band(f"d{i}", i, i) for i in range(size + 1)], backend=backend)
    band_images = per_distance(image)
    torch.testing.assert_close(band_images[d], image, atol=1e-5, rtol=0)
    others = torch.cat([band_images[:d], band_images[d + 1 :]])
    assert others.abs().max() < 1e-5
    energy = band_energy(image, default_bands(size))
    in_default = [i for i, b in enumerate(default_bands(size)) if b.lo <= d <= b.hi][0]
    assert energy[0, in_default] == pytest.approx(image.square().sum().item(), rel=1e-4)
    assert energy[0].sum() - energy[0, in_default] < 1e-4


@pytest.mark.parametrize("h,w", [(32, 32), (16, 8), (6, 10)])
def test_masks_are_hermitian_so_inverse_is_real(h, w):
    band_filter = BandFilter(h, w)
    x = random_images(4, h, w).double()
    for mode in ("keep", "remove"):
        masks = band_filter.masks(mode, shifted=False)
        partner = masks[:, (-torch.arange(h)) % h][:, :, (-torch.arange(w)) % w]
        assert torch.equal(masks, partner)
        inverse = torch.fft.ifft2(torch.fft.fft2(x)[None] * masks[:, None, None])
        assert inverse.imag.abs().max() < 1e-12
        assert inverse.real.abs().max() > 1e-3  # the test would pass trivially on zeros
    # the centred grid's Nyquist row (index 0 after fftshift) has no +N/2 partner, and still matches
    shifted = band_filter.masks("keep")
    assert torch.equal(shifted[:, 0, 1:], shifted[:, 0, 1:].flip(-1))


def test_normalization_modes_differ_as_documented():
    x = random_images(2, 8, 8)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    background, low = default_bands(8)[:2]
    assert normalize_band_images(x, "none", mean, std) is x
    torch.testing.assert_close(normalize_band_images(x, "train", mean, std), (x - m) / s)
    torch.testing.assert_close(normalize_band_images(x, "train_background_only", mean, std, background), (x - m) / s)
    assert normalize_band_images(x, "train_background_only", mean, std, low) is x
    torch.testing.assert_close(normalize_band_images(x, "train", 0.5, 0.25), (x - 0.5) / 0.25)
    with pytest.raises(ConfigError):
        normalize_band_images(x, "imagenet", mean, std)
    with pytest.raises(ConfigError):
        normalize_band_images(x, "train")
    with pytest.raises(ConfigError):
        normalize_band_images(x, "train", [0.5, 0.5], std)
    with pytest.raises(ConfigError):
        normalize_band_images(x, "train_background_only", mean, std)


def band_labelled_images(size=16, per_band=6):
    """Images whose label is the default band holding all their energy (band 0: constants)."""
    bands = default_bands(size)
    images, labels = [], []
    gen = torch.Generator().manual_seed(1)
    for label, band in enumerate(bands):
        for _ in range(per_band):
            if band.lo == 0:
                image = torch.full((size, size), 0.3, dtype=torch.float64)
            else:
                kx = int(torch.randint(max(0, band.lo - size // 2), min(band.hi, size // 2) + 1, (1,), generator=gen))
                ky = int(torch.randint(max(0, band.lo - kx), min(band.hi - kx, size // 2) + 1, (1,), generator=gen))
                image = cosine_image(size, kx, ky, 0.3)
            images.append(image.float().expand(3, size, size))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels), BandFilter(size, bands=bands)


def energy_classifier(x):
    # "logits" = band energies: predicts the band holding the most energy; an all-zero image
    # (rounding noise only) -> band 0 thanks to the small head start
    return band_energy(x) + torch.tensor([1e-3, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_band_accuracy_exact_on_band_labelled_images(batch_size):
    images, labels, band_filter = band_labelled_images()
    keep = band_accuracy(energy_classifier, images, labels, band_filter, "keep", "none", batch_size=batch_size)
    # keep band b: its own images are right, every other image becomes 0 and is called band 0
    assert keep == pytest.approx({"background": 0.25, "low": 0.5, "mid": 0.5, "high": 0.5})
    remove = band_accuracy(energy_classifier, images, labels, band_filter, "remove", "none", batch_size=batch_size)
    # remove band b: images of b become 0 (called band 0: right only for b = 0), others untouched
    assert remove == pytest.approx({"background": 1.0, "low": 0.75, "mid": 0.75, "high": 0.75})
    as_uint8 = ((images + 1) / 2 * 255).round().to(torch.uint8)
    for mode in ("keep", "remove"):
        from_uint8 = band_accuracy(energy_classifier, as_uint8, labels, band_filter, mode, "none", batch_size=batch_size)
        assert from_uint8 == band_accuracy(energy_classifier, as_uint8.float() / 255, labels, band_filter, mode, "none")


def test_band_accuracy_applies_the_normalization():
    images, labels, band_filter = band_labelled_images()
    seen = []
    band_accuracy(lambda x: seen.append(x.mean().item()) or torch.zeros(len(x), 4), images, labels, band_filter,
                  "keep", "train", mean=[10.0] * 3, std=[1.0] * 3, batch_size=1000)
    assert all(v < -9 for v in seen)  # every band image was shifted by -mean/std
    with pytest.raises(DataError):
        band_accuracy(energy_classifier, images, labels[:-1], band_filter)


def test_log_magnitude_spectrum_peaks_at_the_frequency():
    image = cosine_image(32, 3, -5, 0.0).float()
    spectrum = log_magnitude_spectrum(torch.stack([image, image, image]))
    assert spectrum.shape == (32, 32)
    peaks = {tuple(i) for i in (spectrum > spectrum.max() - 1e-4).nonzero().tolist()}
    assert peaks == {(16 + 3, 16 - 5), (16 - 3, 16 + 5)}
    flat = log_magnitude_spectrum(torch.ones(32, 32))
    assert flat.argmax() == 16 * 32 + 16


def test_bad_inputs_raise():
    band_filter = BandFilter(32)
    with pytest.raises(DataError):
        band_filter(torch.rand(2, 3, 16, 16))
    with pytest.raises(DataError):
        band_filter(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ConfigError):
        band_filter(torch.rand(2, 3, 32, 32), mode="only")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = random_images(64, 32, 32)
    for backend in ("auto", "fft", "matmul"):
        band_filter = BandFilter(32, backend=backend)
        for mode in ("keep", "remove"):
            on_gpu = band_filter(x.cuda(), mode, keep_dc=True)
            assert on_gpu.device.type == "cuda"
            torch.testing.assert_close(on_gpu.cpu(), band_filter(x, mode, keep_dc=True), atol=1e-3, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_iter_chunks_and_float64_agree_with_call(backend):
    x = random_images(11, 16, 16)
    band_filter = BandFilter(16, backend=backend)
    chunks = list(band_filter.iter_chunks(x, "remove", chunk_size=4))
    assert [start for start, _ in chunks] == [0, 4, 8]
    torch.testing.assert_close(torch.cat([c for _, c in chunks], dim=1), band_filter(x, "remove"))
    as_double = band_filter(x.double())
    assert as_double.dtype == torch.float64
    np.testing.assert_allclose(as_double.numpy(), numpy_oracle(x, band_filter.masks()), atol=1e-12)
