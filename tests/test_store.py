"""The experiment store: config round trip, all-or-nothing shards, atomic files, safe loading."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lrfeatures
from lrfeatures.config import load_config
from lrfeatures.errors import StoreError
from lrfeatures.experiments import Shard, run_shard
from lrfeatures.experiments.synthetic import SeedChunk
from lrfeatures.store import HOST, LEASE_TTL_ENV, ExperimentStore, atomic_write_bytes, write_json, write_table


def small_table(tag: int, rows: int = 3) -> pd.DataFrame:
    return pd.DataFrame({"shard": [tag] * rows, "value": [tag + 0.5 * i for i in range(rows)],
                         "name": [f"s{tag}-{i}" for i in range(rows)]})


def tmp_dirs(store: ExperimentStore) -> list[Path]:
    return sorted(store.shards_dir.glob(".tmp-*"))


# ----- config.toml --------------------------------------------------------------------------

def test_create_writes_config_that_round_trips(tmp_path, tiny_config):
    store = ExperimentStore.create(tmp_path / "exp", tiny_config)
    text = (tmp_path / "exp" / "config.toml").read_text()
    assert lrfeatures.__version__ in text
    assert store.config() == tiny_config
    # A fresh handle on the same directory reads the same config.
    assert ExperimentStore(tmp_path / "exp").config() == tiny_config


def test_create_again_with_same_config_is_allowed(tmp_path, tiny_config, make_tiny_config):
    ExperimentStore.create(tmp_path, tiny_config)
    same = make_tiny_config()
    assert ExperimentStore.create(tmp_path, same).config() == tiny_config


def test_create_with_different_config_raises(tmp_path, tiny_config, make_tiny_config):
    ExperimentStore.create(tmp_path, tiny_config)
    before = (tmp_path / "config.toml").read_bytes()
    other = make_tiny_config(pretrain={"iterations": 400})
    with pytest.raises(StoreError, match="different config"):
        ExperimentStore.create(tmp_path, other)
    assert (tmp_path / "config.toml").read_bytes() == before


def test_non_experiment_dir_raises_store_error(tmp_path):
    with pytest.raises(StoreError, match="not an lrfeatures experiment"):
        ExperimentStore(tmp_path).config()
    with pytest.raises(StoreError, match="missing"):
        ExperimentStore(tmp_path).table("metrics")


# ----- shards -------------------------------------------------------------------------------

def test_shard_is_invisible_until_commit(tmp_path, tiny_config):
    store = ExperimentStore.create(tmp_path, tiny_config)
    writer = store.writer("pretrain-x")
    writer.table("metrics", small_table(1))
    writer.tensors("weights", {"final": torch.ones(2, 3)})
    assert not store.shard_dir("pretrain-x").exists()
    assert not store.is_done("pretrain-x")
    assert store.done_shards() == []
    assert store.merge_table("metrics").empty  # partial shards are never merged
    writer.commit({"seconds": 1.0})
    assert store.is_done("pretrain-x")
    assert store.done_shards() == ["pretrain-x"]
    assert sorted(p.name for p in store.shard_dir("pretrain-x").iterdir()) == [
        "done.json", "metrics.parquet", "weights.safetensors"]
    done = json.loads((store.shard_dir("pretrain-x") / "done.json").read_text())
    assert done["shard"] == "pretrain-x" and done["seconds"] == 1.0
    assert done["version"] == lrfeatures.__version__
    assert tmp_dirs(store) == []


def test_abort_removes_partial_shard(tmp_path, tiny_config):
    store = ExperimentStore.create(tmp_path, tiny_config)
    writer = store.writer("s")
    writer.table("metrics", small_table(1))
    assert len(tmp_dirs(store)) == 1
    writer.abort()
    assert tmp_dirs(store) == [] and not store.shard_dir("s").exists() and not store.is_done("s")


def test_exception_inside_a_shard_leaves_nothing(tmp_path, tiny_config):
    """run_shard: an error mid-shard publishes nothing and cleans its temp dir."""
    store = ExperimentStore.create(tmp_path, tiny_config)
    shard = Shard("pretrain", SeedChunk(0, (0, 1)))

    def half_done(shard_, writer):
        writer.table("metrics", small_table(1))
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        run_shard(store, shard, half_done)
    assert not store.shard_dir(shard.name).exists()
    assert not store.is_done(shard.name)
    assert tmp_dirs(store) == []
    assert list(store.shards_dir.iterdir()) == []

    def complete(shard_, writer):
        writer.table("metrics", small_table(2))

    assert run_shard(store, shard, complete) is True
    assert store.is_done(shard.name)
    assert run_shard(store, shard, half_done) is False  # a done shard is never recomputed


def test_second_commit_of_same_shard_keeps_the_first(tmp_path, tiny_config):
    store = ExperimentStore.create(tmp_path, tiny_config)
    first, second = store.writer("s"), store.writer("s")
    first.table("metrics", small_table(1))
    second.table("metrics", small_table(2))
    first.commit({})
    second.commit({})
    pd.testing.assert_frame_equal(store.shard_table("s", "metrics"), small_table(1))
    assert tmp_dirs(store) == []


def test_clean_partial_removes_only_temp_dirs_whose_lease_is_gone(tmp_path, tiny_config, monkeypatch):
    """Age never matters: a live lease protects an hour-old temp dir; a stale or absent lease does not."""
    monkeypatch.setenv(LEASE_TTL_ENV, "0.5")
    store = ExperimentStore.create(tmp_path, tiny_config)
    live = store.claim("live")
    working, orphan = store.writer("live", live), store.writer("orphan")
    past = time.time() - 3600
    for writer in (working, orphan):
        os.utime(writer.tmp, (past, past))
    store.clean_partial()
    assert working.tmp.exists() and not orphan.tmp.exists()
    live._stop.set()  # the owner stalls: no more heartbeats
    time.sleep(0.8)
    assert not store.claimed("live")
    store.clean_partial()
    assert not working.tmp.exists()


def test_lease_is_exclusive_and_stale_only_after_its_ttl(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv(LEASE_TTL_ENV, "0.6")
    store = ExperimentStore.create(tmp_path, tiny_config)
    first = store.claim("s")
    assert first is not None and store.claim("s") is None
    time.sleep(0.9)  # the heartbeat (every TTL/4) keeps it live past its TTL
    assert store.claim("s") is None
    lease = json.loads(store.lease_path("s").read_text())
    assert lease["pid"] == os.getpid() and lease["host"] and lease["time"] <= time.time()
    first._stop.set()
    time.sleep(0.9)
    second = store.claim("s")
    assert second is not None and not first.held() and second.held()
    first.release()  # the stalled owner must not delete its successor's lease
    assert store.lease_path("s").exists()
    second.release()
    assert not store.lease_path("s").exists()


def test_files_follow_the_umask(tmp_path, tiny_config):
    old = os.umask(0o022)
    try:
        store = ExperimentStore.create(tmp_path / "exp", tiny_config)
        writer = store.writer("s")
        writer.table("metrics", small_table(1))
        writer.commit({})
        store.merge_table("metrics")
    finally:
        os.umask(old)
    for path in [store.root / "config.toml", store.root / "metrics.parquet", store.shard_dir("s") / "done.json",
                 store.shard_dir("s") / "metrics.parquet"]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert store.shard_dir("s").stat().st_mode & 0o777 == 0o755


def test_done_json_lists_every_file_with_size_and_hash(tmp_path, tiny_config):
    store = ExperimentStore.create(tmp_path, tiny_config)
    writer = store.writer("s")
    writer.table("metrics", small_table(1))
    writer.tensors("weights", {"final": torch.ones(3)})
    writer.commit({})
    files = json.loads((store.shard_dir("s") / "done.json").read_text())["files"]
    assert sorted(files) == ["metrics.parquet", "weights.safetensors"]
    for name, entry in files.items():
        data = (store.shard_dir("s") / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_killed_atomic_write_leaves_no_temp_file_behind(tmp_path, tiny_config):
    ExperimentStore.create(tmp_path, tiny_config)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".summary.json.~{HOST}~{dead.stdout.strip()}~abc"  # what a kill mid-write leaves
    mine = tmp_path / f".summary.json.~{HOST}~{os.getpid()}~def"              # a live writer's
    leftover.write_text("{")
    mine.write_text("{")
    ExperimentStore.create(tmp_path, tiny_config)
    assert not leftover.exists() and mine.exists()


def test_merge_table_equals_concatenation(tmp_path, tiny_config):
    store = ExperimentStore.create(tmp_path, tiny_config)
    names = ["b-shard", "a-shard", "c-shard"]
    for i, name in enumerate(names):
        writer = store.writer(name)
        writer.table("metrics", small_table(i, rows=i + 1))
        writer.commit({})
    unfinished = store.writer("d-shard")
    unfinished.table("metrics", small_table(99))
    merged = store.merge_table("metrics")
    expected = pd.concat([small_table(names.index(n), rows=names.index(n) + 1) for n in sorted(names)],
                         ignore_index=True)
    pd.testing.assert_frame_equal(merged, expected)
    pd.testing.assert_frame_equal(store.table("metrics"), expected)
    assert store.merge_table("not-a-table").empty


# ----- atomic files -------------------------------------------------------------------------

def test_atomic_write_bytes_failure_keeps_original(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_bytes(path, b"original")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new content that never lands")
    monkeypatch.undo()
    assert path.read_bytes() == b"original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]  # no stray temp files
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"


def test_write_table_failure_keeps_original(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    write_table(path, small_table(1))
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_table(path, small_table(2))
    monkeypatch.undo()
    pd.testing.assert_frame_equal(pd.read_parquet(path), small_table(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


def test_write_json_turns_nan_into_null(tmp_path):
    path = tmp_path / "s.json"
    write_json(path, {"a": math.nan, "b": [1.0, math.nan], "c": {"d": 2.5}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": 2.5}}
    # Strict JSON: no NaN token a non-Python reader would choke on.
    json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))


@settings(max_examples=25, deadline=None)
@given(text=st.text(max_size=20), number=st.floats(allow_nan=False, allow_infinity=False))
def test_write_json_round_trips_strings_and_numbers(tmp_path_factory, text, number):
    path = tmp_path_factory.mktemp("json") / "s.json"
    data = {"name": text, "values": [text, number], text: number}
    write_json(path, data)
    assert json.loads(path.read_text()) == data


def test_write_json_keeps_strings_that_contain_nan(tmp_path):
    """A config name or dict key containing 'NaN' must survive (only NaN numbers become null)."""
    path = tmp_path / "s.json"
    data = {"name": "NaN-study", "flrs": {"NaNo": 1.0}, "value": math.nan}
    write_json(path, data)
    assert json.loads(path.read_text()) == {"name": "NaN-study", "flrs": {"NaNo": 1.0}, "value": None}


# ----- safe loading -------------------------------------------------------------------------

def test_shard_tensors_are_safetensors_not_pickles(tmp_path, tiny_config):
    store = ExperimentStore.create(tmp_path, tiny_config)
    tensors = {"final": torch.randn(4, 7), "steps": torch.tensor([20, 40])}
    writer = store.writer("s")
    writer.tensors("weights", tensors)
    writer.commit({})
    raw = (store.shard_dir("s") / "weights.safetensors").read_bytes()
    # safetensors: 8-byte little-endian header length, then a JSON header; a pickle starts with 0x80.
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    assert set(header) - {"__metadata__"} == {"final", "steps"}
    assert header["final"]["shape"] == [4, 7]
    assert raw[8:9] == b"{"  # not a pickle (0x80 ...) nor a torch.save zip (PK ...)
    loaded = store.shard_tensors("s", "weights")
    assert torch.equal(loaded["final"], tensors["final"]) and torch.equal(loaded["steps"], tensors["steps"])


# ----- several processes --------------------------------------------------------------------

def write_shard_in_process(root: str, shard: str, tag: int, barrier) -> None:
    """Worker: open the experiment and publish one shard (used with the spawn start method)."""
    store = ExperimentStore(root)
    store.config()
    writer = store.writer(shard)
    barrier.wait(timeout=60)  # both processes are mid-shard at the same time
    writer.table("metrics", small_table(tag, rows=tag + 2))
    writer.tensors("weights", {"final": torch.full((2, 2), float(tag))})
    writer.commit({"tag": tag})


def test_two_processes_write_different_shards(tmp_path, tiny_config):
    ExperimentStore.create(tmp_path, tiny_config)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=write_shard_in_process, args=(str(tmp_path), f"shard-{tag}", tag, barrier))
             for tag in (1, 2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    store = ExperimentStore(tmp_path)
    assert store.done_shards() == ["shard-1", "shard-2"]
    assert tmp_dirs(store) == []
    merged = store.merge_table("metrics")
    pd.testing.assert_frame_equal(merged, pd.concat([small_table(1, 3), small_table(2, 4)], ignore_index=True))
    assert store.shard_tensors("shard-2", "weights")["final"].eq(2.0).all()
    assert load_config(str(tmp_path / "config.toml")) == tiny_config
