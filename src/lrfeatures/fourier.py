"""Fourier frequency bands as features (SPEC §5): band filtering, energies, band accuracy.

Geometry. For an image of even size H x W, the 2-D DFT frequencies are taken in their
centred form kx in [-H/2, H/2 - 1], ky in [-W/2, W/2 - 1]; after `fftshift` the zero
frequency sits at (H/2, W/2), e.g. (16, 16) for 32x32. The band index of a coefficient is
its L1 distance to the centre, d = |kx| + |ky|, from 0 to D = H/2 + W/2 (32 for 32x32).

Default bands (SPEC §5), for 32x32: background d = 0, low 1..8, mid 9..24, high 25..32.
Other even sizes scale the upper edges (0, 8, 24, 32) by D / 32 and round half up, so
64x64 gives 0 / 1-16 / 17-48 / 49-64 and 16x16 gives 0 / 1-4 / 5-12 / 13-16.

Nyquist and realness. With even N the Nyquist frequency -N/2 has no +N/2 partner inside the
centred grid; its conjugate partner, -(-N/2) mod N, is itself, and |-N/2| = N/2 either way.
Hence d(k) = d(-k mod N) for EVERY coefficient, Nyquist row and column included: each mask
is Hermitian-symmetric (a coefficient and its conjugate partner are always in the same band),
so the inverse DFT of a masked real image is real up to rounding. The Nyquist row/column
coefficients simply belong to the band of their d, like any other coefficient. We still take
the real part at the end (`irfft2` does so implicitly).

Two exact ways to project onto a band (both are tested against a numpy fftshift oracle):
  "fft"     rfft2 once per chunk, multiply the half spectrum by every band mask at once
            (broadcast over bands), one batched irfft2. Since the masks are Hermitian this
            equals real(ifft2(fft2(x) * mask)).
  "matmul"  a real orthonormal 1-D Fourier basis Q (constant, cos/sin for 0 < k < N/2, the
            Nyquist cosine), rows sorted by |k|. The products Q_a(x) Q_b(y) with |kx| = a, |ky| = b
            span exactly the DFT coefficients (+-a, +-b), which all have d = a + b, so
            x_band = Qh^T ((Qh x Qw^T) * M) Qw with a 0/1 mask M on (a, b). Each band only needs
            the contiguous block of rows/cols with a, b that can reach its d range, and when the
            bands partition 0..D the costliest band is x minus the others. On a 2-core CPU this
            is several times faster than small FFTs; on GPUs the default stays "fft".

Normalization of band images is an explicit choice (it changes the answer):
  "train"                  (x_band - mean) / std with the training statistics, after filtering;
  "none"                   the raw filtered values;
  "train_background_only"  "train" for a band containing d = 0 and "none" for the others,
                           which is what the authors' ViT code did (SPEC §5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .errors import ConfigError, DataError
from .threads import torch_threads

NORMALIZATIONS = ("train", "none", "train_background_only")
MODES = ("keep", "remove")
BACKENDS = ("auto", "fft", "matmul")
DEFAULT_EDGES_32 = (0, 8, 24, 32)  # upper edges of the default bands for 32x32 (D = 32)
DEFAULT_NAMES = ("background", "low", "mid", "high")


@dataclass(frozen=True)
class Band:
    """A named, inclusive range lo..hi of L1 frequency distances d = |kx| + |ky|."""

    name: str
    lo: int
    hi: int


def _check_size(height: int, width: int) -> None:
    if height < 4 or width < 4 or height % 2 or width % 2:
        raise DataError(
            f"image size {height}x{width} is not supported by the band filter; "
            "use even sizes of at least 4x4 (pad or resize the images)"
        )


def max_distance(height: int, width: int | None = None) -> int:
    """Largest band index D = H/2 + W/2 (32 for 32x32)."""
    width = height if width is None else width
    _check_size(height, width)
    return height // 2 + width // 2


def default_bands(height: int = 32, width: int | None = None) -> tuple[Band, ...]:
    """SPEC §5 bands 0 / 1-8 / 9-24 / 25-32, edges scaled by D/32 and rounded half up."""
    d_max = max_distance(height, width)
    edges = [int(e * d_max / 32 + 0.5) for e in DEFAULT_EDGES_32]
    bands, lo = [], 0
    for name, hi in zip(DEFAULT_NAMES, edges):
        bands.append(Band(name, lo, hi))
        lo = hi + 1
    return tuple(bands)


def check_bands(bands: Sequence[Band], height: int, width: int) -> tuple[Band, ...]:
    """Validate bands: unique names, 0 <= lo <= hi <= D, no overlaps. Returns them as a tuple."""
    d_max = max_distance(height, width)
    bands = tuple(bands)
    if not bands:
        raise ConfigError("no frequency bands given; pass at least one Band(name, lo, hi)")
    if len({b.name for b in bands}) != len(bands):
        raise ConfigError(f"band names repeat in {[b.name for b in bands]}; give each band a unique name")
    for b in bands:
        if not (0 <= b.lo <= b.hi <= d_max):
            raise ConfigError(
                f"band {b.name!r} = {b.lo}..{b.hi} is outside 0..{d_max} for {height}x{width}; "
                "use 0 <= lo <= hi <= H/2 + W/2"
            )
    ordered = sorted(bands, key=lambda b: b.lo)
    for a, b in zip(ordered, ordered[1:]):
        if b.lo <= a.hi:
            raise ConfigError(f"bands {a.name!r} and {b.name!r} overlap; make the d ranges disjoint")
    return bands


def l1_distance_grid(
    height: int, width: int | None = None, shifted: bool = True, device: torch.device | str | None = None
) -> torch.Tensor:
    """[H, W] long tensor of d = |kx| + |ky|; `shifted` gives the fftshift layout, else fft2's."""
    width = height if width is None else width
    _check_size(height, width)
    kx = torch.fft.fftfreq(height, d=1.0 / height, device=device).round().long().abs()
    ky = torch.fft.fftfreq(width, d=1.0 / width, device=device).round().long().abs()
    if shifted:
        kx, ky = torch.fft.fftshift(kx), torch.fft.fftshift(ky)
    return kx[:, None] + ky[None, :]


def real_fourier_basis(
    n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal real 1-D Fourier basis [n, n] (rows sorted by |k|) and the |k| of each row.

    Rows: constant, then cos and sin for k = 1 .. n/2 - 1, then the Nyquist cosine (-1)^t.
    """
    t = torch.arange(n, dtype=torch.float64)
    rows, magnitudes = [torch.full((n,), 1.0, dtype=torch.float64)], [0]
    for k in range(1, n // 2):
        rows += [math.sqrt(2) * torch.cos(2 * math.pi * k * t / n), math.sqrt(2) * torch.sin(2 * math.pi * k * t / n)]
        magnitudes += [k, k]
    rows.append(torch.cos(math.pi * t))
    magnitudes.append(n // 2)
    basis = torch.stack(rows) / math.sqrt(n)
    return basis.to(device=device, dtype=dtype), torch.tensor(magnitudes, device=device)


class BandFilter:
    """Precomputed band masks for one (H, W, bands); filters batches of images on their device.

    `mode="keep"` keeps only the band, `mode="remove"` zeroes it. `keep_dc=True` also keeps the
    DC term (d = 0, the per-channel mean) in either mode, i.e. it is added to the kept set.

    Backends compute the same projections: "fft" (rfft2, half-spectrum masks, irfft2) and
    "matmul" (the real Fourier basis, see the module docstring); "auto" = "matmul" on CPU,
    "fft" elsewhere (GPU matmuls may run in TF32, FFTs do not).

    `threads` (CPU only): torch threads while a pass runs. 0 picks them per pass from the cores
    that other runnable processes leave free (threads.barrier_threads): every product here is
    a short OpenMP region whose barrier waits for its slowest thread, so one thread that loses
    its core to a neighbour stalls them all. None leaves torch's setting alone.
    """

    def __init__(
        self, height: int = 32, width: int | None = None, bands: Sequence[Band] | None = None,
        backend: str = "auto", threads: int | None = 0,
    ):
        self.height = height
        self.width = height if width is None else width
        self.bands = check_bands(bands if bands is not None else default_bands(height, self.width),
                                 self.height, self.width)
        self.names = tuple(b.name for b in self.bands)
        if backend not in BACKENDS:
            raise ConfigError(f"band filter backend {backend!r} is unknown; use one of {BACKENDS}")
        self.backend = backend
        self.threads = threads
        self._cache: dict[tuple, object] = {}

    def _threads(self, images: torch.Tensor):
        """The thread-count context of one pass (a no-op off the CPU or with threads=None)."""
        if images.device.type != "cpu" or self.threads is None:
            return nullcontext()
        return torch_threads(self.threads)  # one choice per pass: changing it costs milliseconds

    @property
    def n_bands(self) -> int:
        """Number of bands."""
        return len(self.bands)

    def is_partition(self) -> bool:
        """True when the bands cover every d in 0..D exactly once."""
        covered = sorted(d for b in self.bands for d in range(b.lo, b.hi + 1))
        return covered == list(range(max_distance(self.height, self.width) + 1))

    def masks(
        self, mode: str = "keep", keep_dc: bool = False, shifted: bool = True,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Bool [n_bands, H, W] masks of kept DFT coefficients (fftshift layout unless shifted=False)."""
        if mode not in MODES:
            raise ConfigError(f"band filter mode {mode!r} is unknown; use one of {MODES}")
        d = l1_distance_grid(self.height, self.width, shifted=shifted, device=device)
        lo = torch.tensor([b.lo for b in self.bands], device=d.device)[:, None, None]
        hi = torch.tensor([b.hi for b in self.bands], device=d.device)[:, None, None]
        in_band = (d >= lo) & (d <= hi)
        kept = in_band if mode == "keep" else ~in_band
        return kept | (d == 0) if keep_dc else kept

    # --- projections onto each band (keep mode, no DC): the two backends ---

    def _project_fft(self, x: torch.Tensor, out: torch.Tensor) -> None:
        key = ("fft", str(x.device))
        if key not in self._cache:  # float [n_bands, 1, 1, H, W//2+1] in rfft2 layout
            full = self.masks("keep", shifted=False, device=x.device)
            self._cache[key] = full[..., : self.width // 2 + 1].float()[:, None, None]
        spectrum = torch.fft.rfft2(x)
        out.copy_(torch.fft.irfft2(spectrum * self._cache[key], s=(self.height, self.width)))

    def _matmul_plan(self, device: torch.device, dtype: torch.dtype) -> tuple:
        key = ("matmul", str(device), dtype)
        if key in self._cache:
            return self._cache[key]
        basis_h, mag_h = real_fourier_basis(self.height, device, dtype)
        basis_w, mag_w = real_fourier_basis(self.width, device, dtype)
        blocks = []  # per band: (row slice, col slice, transposed mask) of the coefficient block
        for b in self.bands:
            rows = ((mag_h >= b.lo - self.width // 2) & (mag_h <= b.hi)).nonzero().flatten().tolist()
            cols = ((mag_w >= b.lo - self.height // 2) & (mag_w <= b.hi)).nonzero().flatten().tolist()
            rs, cs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
            d = mag_h[rs, None] + mag_w[None, cs]
            blocks.append((rs, cs, ((d >= b.lo) & (d <= b.hi)).T.to(dtype).contiguous()))
        # a partition lets the costliest band be the residual x - sum(others): exact in exact arithmetic
        cost = [(bl[0].stop - bl[0].start) * (bl[1].stop - bl[1].start) for bl in blocks]
        residual = max(range(len(cost)), key=cost.__getitem__) if self.is_partition() and len(cost) > 1 else None
        plan = (basis_h, basis_w, basis_h.T.contiguous(), basis_w.T.contiguous(), blocks, residual)
        self._cache[key] = plan
        return plan

    def _project_matmul(self, x: torch.Tensor, out: torch.Tensor) -> None:
        basis_h, basis_w, basis_h_t, basis_w_t, blocks, residual = self._matmul_plan(x.device, x.dtype)
        h, w = self.height, self.width
        m = x.shape[0] * x.shape[1]  # images x channels, each transformed separately
        coeffs_t = (x.reshape(m * h, w) @ basis_w_t).reshape(m, h, w).transpose(1, 2)
        coeffs_t = (coeffs_t.reshape(m * w, h) @ basis_h_t).reshape(m, w, h)  # C^T: [m, kw, kh]
        for b, (rs, cs, mask_t) in enumerate(blocks):
            if b == residual:
                continue
            nr, nc = rs.stop - rs.start, cs.stop - cs.start
            block = coeffs_t[:, cs, rs] * mask_t  # [m, nc, nr]
            z = (block.reshape(m * nc, nr) @ basis_h[rs]).reshape(m, nc, h).transpose(1, 2)
            torch.matmul(z.reshape(m * h, nc), basis_w[cs], out=out[b].view(m * h, w))
        if residual is not None:
            rest = [b for b in range(len(blocks)) if b != residual]
            torch.sub(x, out[rest[0]], out=out[residual])
            for b in rest[1:]:
                out[residual].sub_(out[b])

    def _filter_into(self, x: torch.Tensor, mode: str, keep_dc: bool, out: torch.Tensor) -> None:
        backend = self.backend if self.backend != "auto" else ("matmul" if x.device.type == "cpu" else "fft")
        (self._project_matmul if backend == "matmul" else self._project_fft)(x, out)
        if mode == "remove":
            torch.sub(x, out, out=out)
        if keep_dc:  # add the DC term back where the output lacks it
            mean = x.mean((-2, -1), keepdim=True)
            for b, band in enumerate(self.bands):
                if (band.lo > 0) == (mode == "keep"):
                    out[b].add_(mean)

    def _check_call(self, images: torch.Tensor, mode: str) -> torch.Tensor:
        if mode not in MODES:
            raise ConfigError(f"band filter mode {mode!r} is unknown; use one of {MODES}")
        if images.ndim != 4 or images.shape[-2:] != (self.height, self.width):
            raise DataError(
                f"images of shape {tuple(images.shape)} do not fit this band filter; "
                f"pass a float tensor [N, C, {self.height}, {self.width}]"
            )
        if images.dtype not in (torch.float32, torch.float64):
            raise DataError(f"images have dtype {images.dtype}; convert to float32 (e.g. x.float() / 255)")
        return images.contiguous()

    def iter_chunks(
        self, images: torch.Tensor, mode: str = "keep", keep_dc: bool = False, chunk_size: int = 256
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start, band images [n_bands, B, C, H, W]) for consecutive chunks of B images."""
        images = self._check_call(images, mode)
        with self._threads(images):  # the consumer's work between chunks runs under it too
            for start in range(0, images.shape[0], chunk_size):
                x = images[start : start + chunk_size]
                out = x.new_empty((self.n_bands, *x.shape))
                self._filter_into(x, mode, keep_dc, out)
                yield start, out

    def __call__(
        self, images: torch.Tensor, mode: str = "keep", keep_dc: bool = False, chunk_size: int = 256
    ) -> torch.Tensor:
        """Band images [n_bands, N, C, H, W] of float images [N, C, H, W] (computed in chunks of N)."""
        images = self._check_call(images, mode)
        out = images.new_empty((self.n_bands, *images.shape))
        with self._threads(images):
            for start in range(0, images.shape[0], chunk_size):
                stop = min(start + chunk_size, images.shape[0])
                self._filter_into(images[start:stop], mode, keep_dc, out[:, start:stop])
        return out


def band_energy(images: torch.Tensor, bands: BandFilter | Sequence[Band] | None = None) -> torch.Tensor:
    """Pixel-space energy sum(x_band^2) per band via Parseval: [N, n_bands] (or [n_bands] for one image).

    Summed over channels. For a partition of bands the energies add up to sum(x^2).
    """
    single = images.ndim == 3
    x = images[None] if single else images
    if x.ndim != 4 or not x.is_floating_point():
        raise DataError(f"images of shape {tuple(images.shape)}, dtype {images.dtype}: pass float [N, C, H, W]")
    band_filter = bands if isinstance(bands, BandFilter) else BandFilter(x.shape[-2], x.shape[-1], bands)
    power = torch.fft.fft2(x.double()).abs().square().sum(1) / (x.shape[-2] * x.shape[-1])  # [N, H, W]
    masks = band_filter.masks("keep", shifted=False, device=x.device).double()  # [n_bands, H, W]
    energy = torch.einsum("nhw,bhw->nb", power, masks).to(x.dtype)
    return energy[0] if single else energy


def log_magnitude_spectrum(image: torch.Tensor) -> torch.Tensor:
    """log(1 + |DFT|) of one image [C, H, W] or [H, W], fftshifted, averaged over channels: [H, W]."""
    if image.ndim not in (2, 3) or not image.is_floating_point():
        raise DataError(f"image of shape {tuple(image.shape)}: pass one float image [C, H, W] or [H, W]")
    x = image if image.ndim == 3 else image[None]
    magnitude = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1)).abs()
    return torch.log1p(magnitude).mean(0)


def _channel_stats(value, channels: int, like: torch.Tensor, what: str) -> torch.Tensor:
    stat = torch.as_tensor(value, dtype=like.dtype, device=like.device).flatten()
    if stat.numel() == 1:
        stat = stat.expand(channels)
    if stat.numel() != channels:
        raise ConfigError(f"{what} has {stat.numel()} values for {channels} channels; give one per channel")
    return stat[:, None, None]


def normalize_band_images(
    images: torch.Tensor, normalization: str, mean=None, std=None, band: Band | None = None
) -> torch.Tensor:
    """Apply the documented normalization ("train", "none", "train_background_only") to [..., C, H, W].

    `band` is needed only by "train_background_only" (normalizes iff the band contains d = 0).
    """
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"band normalization {normalization!r} is unknown; use one of {NORMALIZATIONS}")
    if normalization == "none":
        return images
    if normalization == "train_background_only":
        if band is None:
            raise ConfigError("normalization 'train_background_only' needs the band; pass band=...")
        if band.lo > 0:
            return images
    if mean is None or std is None:
        raise ConfigError(f"normalization {normalization!r} needs the training mean and std; pass mean=, std=")
    channels = images.shape[-3]
    mean_t = _channel_stats(mean, channels, images, "mean")
    std_t = _channel_stats(std, channels, images, "std")
    if bool((std_t <= 0).any()):
        raise ConfigError("std must be positive for every channel; check the training statistics")
    return (images - mean_t) / std_t


@torch.no_grad()
def band_accuracy(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    images_0_1: torch.Tensor,
    labels: torch.Tensor,
    band_filter: BandFilter | None = None,
    mode: str = "keep",
    normalization: str = "train",
    mean=None,
    std=None,
    batch_size: int = 500,
    keep_dc: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Accuracy of predict_fn (normalized images -> logits) on band-filtered images, per band name.

    Images are in [0, 1] (uint8 is divided by 255), filtered in batches on `device` (default:
    the images' device), normalized with `normalization`, then classified.
    """
    if images_0_1.ndim != 4 or labels.ndim != 1 or not 0 < labels.shape[0] == images_0_1.shape[0]:
        raise DataError(
            f"images {tuple(images_0_1.shape)} and labels {tuple(labels.shape)} do not match; "
            "pass images [N, C, H, W] and labels [N] with N > 0"
        )
    band_filter = band_filter or BandFilter(images_0_1.shape[-2], images_0_1.shape[-1])
    device = torch.device(device) if device is not None else images_0_1.device
    correct = torch.zeros(band_filter.n_bands, dtype=torch.long, device=device)
    for start in range(0, images_0_1.shape[0], batch_size):
        x = images_0_1[start : start + batch_size].to(device)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        y = labels[start : start + batch_size].to(device)
        band_images = band_filter(x, mode, keep_dc)
        for b, band in enumerate(band_filter.bands):
            inputs = normalize_band_images(band_images[b], normalization, mean, std, band)
            correct[b] += (predict_fn(inputs).argmax(-1) == y).sum()
    accuracy = (correct.double() / images_0_1.shape[0]).tolist()
    return dict(zip(band_filter.names, accuracy))
