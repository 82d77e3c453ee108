"""Thread counts from the cores actually available (lrfeatures.threads) and where they are used."""

from __future__ import annotations

import os

import pytest
import torch

from lrfeatures import threads
from lrfeatures.fourier import BandFilter


def test_affinity_and_quota_bound_the_available_cores(monkeypatch, tmp_path):
    """Affinity mask first, then a cgroup v2 quota rounded up to whole cores; 'max' is no quota."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert threads.quota_cores(str(quota)) == 2
    monkeypatch.setattr(threads, "CPU_MAX", str(quota))
    assert threads.available_cores() == 2
    quota.write_text("max 100000\n")
    assert threads.quota_cores(str(quota)) is None and threads.available_cores() == 4
    assert threads.quota_cores(str(tmp_path / "missing")) is None


def test_runnable_tasks_are_read_from_loadavg(tmp_path):
    """The instantaneous runnable count (4th field), not the 1-minute average."""
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("7.50 3.00 1.00 3/412 9999\n")
    assert threads.runnable_tasks(str(loadavg)) == 3
    loadavg.write_text("garbage\n")
    assert threads.runnable_tasks(str(loadavg)) is None


@pytest.mark.parametrize("runnable, expected", [(1, 4), (2, 3), (4, 1), (9, 1)])
def test_barrier_threads_leave_busy_cores_alone(monkeypatch, runnable, expected):
    """4 cores, `runnable` tasks including the caller: the others' cores are not used (at least 1)."""
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setattr(threads, "runnable_tasks", lambda path=None: runnable)
    assert threads.barrier_threads() == expected
    assert threads.barrier_threads(3) == 3  # an explicit request wins
    assert threads.dynamic_threads() == 4 and threads.dynamic_threads(2) == 2


def test_torch_threads_restores_the_count(monkeypatch):
    """The block runs with the chosen count; torch's own count is back afterwards, even on error."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "barrier_threads", lambda n=0: n or 1)
    with pytest.raises(RuntimeError):
        with threads.torch_threads(0) as used:
            assert used == 1 and torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_band_filter_chooses_threads_per_pass(monkeypatch):
    """A CPU pass runs under barrier_threads(); threads=None leaves torch's count alone; results agree."""
    seen = []

    def choose(n=0):
        seen.append(n)
        return 1

    monkeypatch.setattr(threads, "barrier_threads", choose)
    before = torch.get_num_threads()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    chosen = BandFilter(32)(images, chunk_size=4)
    assert seen == [0] and torch.get_num_threads() == before
    assert [start for start, _ in BandFilter(32).iter_chunks(images, chunk_size=4)] == [0, 4]
    assert seen == [0, 0] and torch.get_num_threads() == before
    untouched = BandFilter(32, threads=None)(images, chunk_size=4)
    assert seen == [0, 0]
    torch.testing.assert_close(chosen, untouched, rtol=0, atol=1e-6)
    torch.testing.assert_close(chosen.sum(0), images, rtol=0, atol=1e-5)  # the default bands partition x


def test_passive_waiting_is_the_default():
    """Importing lrfeatures.threads asks OpenMP workers to sleep when idle (unless the user chose)."""
    assert os.environ.get("OMP_WAIT_POLICY")
