"""Quiet vs loaded rates of one workload, interleaved in one run (a shared helper for benchmarks).

A "loaded" measurement runs while one controlled competitor is busy: a separate Python
process spinning a busy loop that stops by itself after `seconds` (and is also ended by its
pid as soon as the measurement is done), i.e. one more runnable thread than the machine had.
Quiet and loaded timings alternate, so slow drift of a shared machine hits both alike.

    from contention import load_ratio
    result = load_ratio(lambda: items_per_second(), repeats=5)
    print(f"... load_ratio={result['ratio']:.2f}")

`fn()` does one timed piece of work and returns its rate (higher is better). The result is
dict(quiet=median quiet rate, loaded=median loaded rate, ratio=median of the per-pair
loaded/quiet ratios, pairs=[(quiet, loaded), ...]). A fair share for a workload using all
C cores against one competitor is C / (C + 1) of the quiet rate (2/3 on 2 cores).

Run directly for a self-test of the helper on a pure-Python workload:
    python benchmarks/contention.py
Last line: load_ratio=<r> quiet=<q> loaded=<l>
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Callable

SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def start_competitor(seconds: float = 60.0) -> subprocess.Popen:
    """One busy-looping process that exits by itself after `seconds`; returned once it runs."""
    proc = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=float(seconds))])
    time.sleep(0.1)  # let it start spinning before the measurement begins
    return proc


def stop_competitor(proc: subprocess.Popen) -> None:
    """End the competitor (by its own pid) if it has not stopped by itself yet."""
    if proc.poll() is None:
        proc.terminate()
    proc.wait(timeout=10)


def load_ratio(fn: Callable[[], float], repeats: int = 5, seconds: float = 60.0) -> dict:
    """Median quiet and loaded rates of fn() (one competitor while loaded), timed in alternation."""
    fn()  # warm-up: caches, compiled kernels, thread pools
    pairs = []
    for _ in range(repeats):
        quiet = fn()
        proc = start_competitor(seconds)
        try:
            loaded = fn()
        finally:
            stop_competitor(proc)
        pairs.append((quiet, loaded))
    return dict(quiet=statistics.median(q for q, _ in pairs), loaded=statistics.median(l for _, l in pairs),
                ratio=statistics.median(l / q for q, l in pairs), pairs=pairs)


def _spin_rate(seconds: float = 0.5) -> float:
    """Loop iterations per second of this (single) thread: the self-test's workload."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += 1
    return count / seconds


if __name__ == "__main__":
    result = load_ratio(_spin_rate, repeats=3)
    print(f"load_ratio={result['ratio']:.3f} quiet={result['quiet']:.0f} loaded={result['loaded']:.0f}")
