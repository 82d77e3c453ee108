"""Benchmark the Fourier band filter (SPEC §5) against a naive per-image loop.

Definitions (all printed):
  gb_per_s = N * 3 * 32 * 32 * 4 bytes of float32 input images (N = 10,000 by default)
             / seconds of ONE full pass producing the keep-band images of all 4 default bands
             for every input image. The pass streams over chunks (BandFilter.iter_chunks, which
             is how band_accuracy consumes it). The best of --repeats passes is reported, and
             the median too, because the machine may be shared.
  speedup  = naive seconds per image / fast seconds per image, where "naive" is numpy, one
             image at a time (fft2, fftshift, 4 masks, ifftshift, ifft2, real), timed on
             --naive-images images and scaled. Both are checked to give the same band images.
The "materialized" line times BandFilter.__call__, which also writes the whole
[4, N, 3, 32, 32] output (4x the input) to memory; the "fft backend" line times the
rfft2/irfft2 path for comparison with the default (real Fourier basis matmuls on CPU).
On a CPU shared with other busy processes, torch's per-op thread barriers stall; the filter
therefore picks its thread count per pass from the cores left free (--threads 0, the default),
and idle OpenMP workers sleep (OMP_WAIT_POLICY=PASSIVE, set by lrfeatures.threads).

--contention also measures the streamed pass quiet and with one competing busy process
(benchmarks/contention.py), interleaved, and appends `load_ratio=<loaded / quiet>`.

The last line printed is exactly `gb_per_s=<x> speedup=<y>` (plus ` load_ratio=<r>` with --contention).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import lrfeatures.threads  # noqa: F401  first: it sets OMP_WAIT_POLICY before torch loads OpenMP
import numpy as np
import torch

from contention import load_ratio
from lrfeatures.fourier import BandFilter


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_passes(fn, repeats: int, device: torch.device) -> list[float]:
    """Seconds per call of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def naive_band_images(images: np.ndarray, masks_shifted: np.ndarray) -> np.ndarray:
    """The textbook recipe, one image at a time: [n_bands, N, C, H, W] float32."""
    out = np.empty((masks_shifted.shape[0], *images.shape), dtype=np.float32)
    for n, image in enumerate(images):
        spectrum = np.fft.fftshift(np.fft.fft2(image), axes=(-2, -1))
        for b, mask in enumerate(masks_shifted):
            out[b, n] = np.fft.ifft2(np.fft.ifftshift(spectrum * mask, axes=(-2, -1))).real
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--naive-images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="filter threads (0: chosen per pass from free cores; -1: torch's setting)")
    parser.add_argument("--contention", action="store_true", help="also time the pass against a busy competitor")
    args = parser.parse_args()
    device = torch.device(args.device)
    images = torch.rand(args.n, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    n_bytes = images.numel() * images.element_size()
    band_filter = BandFilter(32, threads=None if args.threads < 0 else args.threads)
    print(f"device={device} threads={args.threads} (torch {torch.get_num_threads()}) OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')} images={tuple(images.shape)} "
          f"bands={[(b.name, b.lo, b.hi) for b in band_filter.bands]}")

    def streamed_pass(bf=band_filter):
        for _ in bf.iter_chunks(images, "keep", chunk_size=args.chunk_size):
            pass

    fast = time_passes(streamed_pass, args.repeats, device)
    best, median = min(fast), statistics.median(fast)
    print(f"streamed pass: best {best:.4f} s ({n_bytes / best / 1e9:.3f} GB/s), "
          f"median {median:.4f} s ({n_bytes / median / 1e9:.3f} GB/s)")
    materialized = min(time_passes(lambda: band_filter(images, chunk_size=args.chunk_size), 3, device))
    print(f"materialized [4, N, 3, 32, 32]: {materialized:.4f} s ({n_bytes / materialized / 1e9:.3f} GB/s)")
    fft_filter = BandFilter(32, backend="fft", threads=band_filter.threads)
    fft_time = min(time_passes(lambda: streamed_pass(fft_filter), 3, device))
    print(f"fft backend streamed: {fft_time:.4f} s ({n_bytes / fft_time / 1e9:.3f} GB/s)")

    subset = images[: args.naive_images].cpu().numpy()
    masks = band_filter.masks("keep").numpy()
    start = time.perf_counter()
    naive = naive_band_images(subset, masks)
    naive_per_image = (time.perf_counter() - start) / len(subset)
    print(f"naive numpy loop: {naive_per_image * 1e6:.1f} us/image -> {naive_per_image * args.n:.2f} s for N")

    fast_subset = band_filter(images[: args.naive_images]).cpu().numpy()
    error = float(np.abs(fast_subset - naive).max())
    fft_error = float((fft_filter(images[: args.naive_images]).cpu().numpy() - naive).__abs__().max())
    print(f"max |fast - naive| = {error:.2e}, max |fft backend - naive| = {fft_error:.2e}")
    if max(error, fft_error) > 1e-5:
        raise SystemExit(f"band images differ from the naive loop by {max(error, fft_error):.2e} > 1e-5")

    speedup = naive_per_image / (best / args.n)
    last = f"gb_per_s={n_bytes / best / 1e9:.3f} speedup={speedup:.1f}"
    if args.contention:
        def rate() -> float:
            return n_bytes / min(time_passes(streamed_pass, 1, device)) / 1e9
        result = load_ratio(rate, repeats=args.repeats)
        print(f"contention: quiet {result['quiet']:.3f} GB/s, with one busy competitor {result['loaded']:.3f} GB/s "
              f"(median of {args.repeats} interleaved pairs)")
        last += f" load_ratio={result['ratio']:.3f}"
    print(last)


if __name__ == "__main__":
    main()
