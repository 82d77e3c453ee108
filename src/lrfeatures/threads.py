"""How many threads to use, from the cores this process may actually run on, and how they wait.

Two kinds of parallel work behave differently when another process competes for the cores:

- dynamic hand-out (the C kernel's model ranges, taken by whichever worker is free): a worker
  that loses its core simply takes fewer ranges, so using every available core is right;
  the OS then gives this process its fair share (C / (C + k) with k busy neighbours).
- barrier-synchronized work (torch's OpenMP ops: each op splits statically and waits for its
  slowest thread): a thread that loses its core stalls the whole op. Such work uses the cores
  not already taken by other runnable processes (at least one).

"Available" is the CPU affinity mask (os.sched_getaffinity: taskset, cgroup cpusets), capped
by a cgroup v2 CPU quota (cpu.max) where one is set. "Taken by others" is the instantaneous
count of runnable tasks in /proc/loadavg (not the lagging 1-minute average), minus this
process's own running threads, sampled a few times.

Importing this module sets OMP_WAIT_POLICY=PASSIVE unless the user set it: idle OpenMP
workers then sleep instead of spinning on a core a neighbour could use. libgomp reads it when
it is loaded, so it only takes effect if this module is imported before torch.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

LOADAVG = "/proc/loadavg"
CPU_MAX = "/sys/fs/cgroup/cpu.max"


def affinity_cores() -> int:
    """Cores in this process's CPU affinity mask (os.cpu_count() where affinity is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def quota_cores(path: str | None = None) -> int | None:
    """The cgroup v2 CPU quota in whole cores (rounded up), or None where there is none."""
    try:
        quota, period = open(path or CPU_MAX).read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cores() -> int:
    """Cores this process may run on: the affinity mask, capped by a cgroup CPU quota."""
    quota = quota_cores()
    return min(affinity_cores(), quota) if quota else affinity_cores()


def runnable_tasks(path: str | None = None) -> int | None:
    """Tasks runnable right now, system-wide (the 4th field of /proc/loadavg), or None."""
    try:
        return int(open(path or LOADAVG).read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def busy_neighbours(own_running: int = 1, samples: int = 5, interval: float = 0.002) -> int:
    """Runnable tasks that are not this process's (median of a few samples; 0 if unknown).

    own_running: this process's threads running while sampling (the caller itself: 1)."""
    counts = []
    for i in range(samples):
        count = runnable_tasks()
        if count is None:
            return 0
        counts.append(count)
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, round(statistics.median(counts)) - own_running)


def dynamic_threads(requested: int = 0) -> int:
    """Threads for work handed out dynamically (the C kernel): requested, else every available core."""
    return requested if requested > 0 else available_cores()


def barrier_threads(requested: int = 0) -> int:
    """Threads for barrier-synchronized work (torch ops): requested, else the available cores
    that other runnable processes leave free (at least one)."""
    if requested > 0:
        return requested
    cores = available_cores()
    return max(1, cores - min(cores, busy_neighbours()))


@contextmanager
def torch_threads(n: int = 0) -> Iterator[int]:
    """torch's intra-op thread count set to n (0: barrier_threads()) for the block, then restored;
    yields the count used."""
    import torch  # lazily: this module must be importable before torch (see the docstring)

    before = torch.get_num_threads()
    chosen = barrier_threads(n)
    if chosen != before:
        torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
