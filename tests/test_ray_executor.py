"""Shards as Ray tasks: same tables as local, a worker killed mid-shard, a driver killed and restarted.

Runs on a private local Ray instance (2 CPUs, no dashboard, loopback only). Tests that need
Ray are skipped without it; the "Ray is missing" error is tested either way.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from lrfeatures.cli import main
from lrfeatures.config import load_config
from lrfeatures.errors import ConfigError
from lrfeatures.experiments.executor import (FAULT_ENV, INSTALL_HINT, ExecutorConfig, ExperimentFactory, LocalExecutor,
                                 RayExecutor, attempts, executor_config, run_experiment)
from lrfeatures.experiments import Experiment
from lrfeatures.store import ExperimentStore

TINY = {
    "name": "tiny-ray",
    "data": {"n_train": 64, "n_test": 64, "n_probe": 20},
    "pretrain": {"lrs": [1e-3, 1e-2, 0.3], "iterations": 100, "ckpt_every": 20, "log_every": 50},
    "finetune": {"lrs": [1e-4, 1e-3], "iterations": 50, "log_every": 50},
    "swa": {"ks": [2, 5]},
    "seeds": {"data": [0], "train": [0, 1]},
    "engine": {"memory_budget_gb": 1, "train_seeds_per_shard": 1, "compile": False},
}
STAGES = ("pretrain", "finetune", "swa", "analyze")
UPSTREAM = {"finetune": ("pretrain",), "swa": ("pretrain",), "analyze": ("pretrain", "finetune", "swa")}


def tiny_config(train_seeds=(0, 1), **engine):
    """The tiny sweep: 3 PLRs x 2 FLRs, one shard chunk per training seed."""
    data = json.loads(json.dumps(TINY))
    data["seeds"]["train"] = list(train_seeds)
    data["engine"].update(engine)
    return load_config(data)


def as_overrides(train_seeds) -> list[str]:
    """The tiny config as CLI --set flags."""
    flat = {"name": TINY["name"], "seeds.train": list(train_seeds)}
    for section, fields in TINY.items():
        if isinstance(fields, dict):
            flat.update({f"{section}.{k}": v for k, v in fields.items() if f"{section}.{k}" not in flat})
    return [x for key, value in flat.items() for x in ("--set", f"{key}={json.dumps(value)}")]


def assert_same_tables(a: Path, b: Path) -> None:
    for name in ("metrics", "evaluations", "features", "geometry"):  # the synthetic tables
        pd.testing.assert_frame_equal(pd.read_parquet(Path(a) / f"{name}.parquet"),
                                      pd.read_parquet(Path(b) / f"{name}.parquet"), check_exact=True, obj=name)


def done_json(root: Path, shard: str) -> str:
    return (Path(root) / "shards" / shard / "done.json").read_text()


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray workers get 1 thread per reserved CPU: compare like with like
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_address():
    """A private Ray instance for this module; yields its address for subprocess drivers."""
    with pytest.MonkeyPatch.context() as patch:
        # Ray binds every port to loopback only when it believes it runs alone (read at import).
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        patch.delenv("RAY_ADDRESS", raising=False)
        ray = pytest.importorskip("ray")
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, logging_level=logging.WARNING)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, one_thread):
    """The tiny sweep run by the local executor (the reference)."""
    root = tmp_path_factory.mktemp("local")
    run_experiment(ExperimentFactory(tiny_config(), root), LocalExecutor())
    return root


def ray_executor(**config) -> RayExecutor:
    return RayExecutor(ExecutorConfig(**config), log_to_driver=False)


# ----- plan and config (no Ray needed) ------------------------------------------------------

def test_local_executor_is_experiment_run(local_run, tmp_path, one_thread):
    Experiment(tiny_config(), tmp_path).run()
    assert_same_tables(local_run, tmp_path)


def test_local_workers_share_the_shards_and_give_the_same_tables(local_run, tmp_path, one_thread):
    """--workers 2: two processes claim shards through the leases; the tables are the one-process ones."""
    run_experiment(ExperimentFactory(tiny_config(), tmp_path), LocalExecutor(workers=2))
    assert_same_tables(local_run, tmp_path)  # (which process ran which shard depends on start-up times)
    with pytest.raises(ConfigError, match="--workers=0 must be >= 1"):
        LocalExecutor(workers=0)


@pytest.mark.parametrize("kind", ["synthetic", "images"])
def test_every_dependency_is_planned_before_its_shard(kind, tmp_path):
    if kind == "images":
        from lrfeatures.experiments.images import image_config
        cfg = image_config("cpu-small", ["seeds.train=[0, 1]"])
    else:
        cfg = tiny_config(train_seeds=(0, 1, 2))
    factory = ExperimentFactory(cfg, tmp_path)
    plan = [s.name for s in factory.plan_shards()]
    assert len(plan) == len(set(plan))
    for i, shard in enumerate(factory.plan_shards()):
        deps = [d.name for d in factory.dependencies(shard)]
        assert all(d in plan[:i] for d in deps), (shard.name, deps)
        assert (deps == []) == (shard.stage == "pretrain")


def test_resources_default_from_device_and_reject_bad_values():
    assert executor_config(tiny_config()) == ExecutorConfig(1.0, 0.0, 3)
    assert executor_config(tiny_config(device="cuda")).gpus_per_shard == 1.0
    assert executor_config(tiny_config(device="cuda"), 4, 0.25) == ExecutorConfig(4.0, 0.25, 3)
    with pytest.raises(ConfigError, match="--gpus-per-shard"):
        executor_config(tiny_config(device="cuda:0"), gpus_per_shard=0)
    with pytest.raises(ConfigError, match="--cpus-per-shard"):
        executor_config(tiny_config(), cpus_per_shard=-1)


def test_ray_flags_without_ray_executor_are_an_error(tmp_path, capsys):
    code = main(["synthetic", "--out", str(tmp_path / "run"), "--gpus-per-shard", "1", *as_overrides((0, 1))])
    assert code == 2 and "--gpus-per-shard only applies to Ray" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [(["--workers", "0"], "--workers=0 must be >= 1"),
                                             (["--workers", "2", "--executor", "ray"],
                                              "--workers only applies to --executor local")])
def test_bad_workers_flag_is_one_line_and_writes_nothing(tmp_path, capsys, flags, message):
    code = main(["synthetic", "--out", str(tmp_path / "run"), *flags, *as_overrides((0, 1))])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_missing_ray_is_one_line_with_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code = main(["synthetic", "--executor", "ray", "--out", str(tmp_path / "run"), "--quiet", "--no-report",
                 *as_overrides((0, 1))])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and INSTALL_HINT in err
    assert not (tmp_path / "run").exists()


# ----- on Ray ---------------------------------------------------------------------------------

def test_ray_sweep_matches_local(ray_address, local_run, tmp_path):
    root = tmp_path / "ray"
    summary = run_experiment(ExperimentFactory(tiny_config(), root), ray_executor())
    assert_same_tables(local_run, root)
    assert summary == json.loads((local_run / "summary.json").read_text())
    tried = attempts(root)
    store = ExperimentStore(root)
    assert sorted(tried) == store.done_shards() and len(tried) == 2 * len(STAGES)
    for name, shard_attempts in tried.items():
        assert len(shard_attempts) == 1, name
        stage, rest = name.split("-", 1)
        for up in UPSTREAM.get(stage, ()):  # started only once its upstream shards were published
            assert shard_attempts[0]["started"] >= json.loads(done_json(root, f"{up}-{rest}"))["finished"]


def test_worker_killed_mid_shard_is_retried(ray_address, local_run, tmp_path, monkeypatch):
    root, marker = tmp_path / "ray", tmp_path / "kill-once"
    marker.touch()
    monkeypatch.setenv(FAULT_ENV, str(marker))
    run_experiment(ExperimentFactory(tiny_config(), root), ray_executor())
    assert not marker.exists(), "the fault never fired"
    assert_same_tables(local_run, root)
    counts = {name: len(a) for name, a in attempts(root).items()}
    assert sorted(counts.values()) == [1] * (len(counts) - 1) + [2]  # exactly one shard ran twice
    # The killed attempt left only a hidden temporary directory, never a shard that looks done.
    shards = root / "shards"
    leftovers = [p for p in shards.iterdir() if not (p / "done.json").is_file()]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-")
    assert len(ExperimentStore(root).done_shards()) == len(counts) == 2 * len(STAGES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA to fail on purpose")
def test_user_error_in_worker_is_not_retried(ray_address, tmp_path):
    root = tmp_path / "ray"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        run_experiment(ExperimentFactory(tiny_config(device="cuda"), root), ray_executor(gpus_per_shard=0))
    tried = attempts(root)
    assert sorted(tried) == ["pretrain-d0-s0-0-n1", "pretrain-d0-s1-1-n1"]  # dependents never started
    assert all(len(a) == 1 for a in tried.values())
    assert ExperimentStore(root).done_shards() == []


def test_unschedulable_shard_fails_fast(ray_address, tmp_path):
    with pytest.raises(ConfigError, match="--gpus-per-shard=1 but no node"):
        run_experiment(ExperimentFactory(tiny_config(), tmp_path), ray_executor(gpus_per_shard=1))


def test_driver_killed_and_restarted_resumes(ray_address, tmp_path, one_thread):
    seeds = tuple(range(6))  # 24 shards: plenty still pending when the first one is done
    root = tmp_path / "ray"
    command = [sys.executable, "-m", "lrfeatures", "synthetic", "--executor", "ray", "--ray-address", ray_address,
               "--out", str(root), "--quiet", "--no-report", *as_overrides(seeds)]
    store = ExperimentStore(root)
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not store.done_shards():
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no shard finished in 120 s"
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    driver.stderr.close()
    finished = {name: done_json(root, name) for name in store.done_shards()}
    tried_before = attempts(root)
    assert 0 < len(finished) < 4 * len(seeds), "the driver must die with work left, or nothing is tested"

    restarted = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert restarted.returncode == 0, restarted.stderr[-2000:]

    assert len(store.done_shards()) == 4 * len(seeds)
    tried_after = attempts(root)
    for name, info in finished.items():  # not recomputed: not re-published, not even re-attempted
        assert done_json(root, name) == info
        assert tried_after[name] == tried_before[name]
    reference = tmp_path / "local"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray workers (1 CPU each): the chaotic PLR 0.3 amplifies any
    try:                      # difference in reduction order between thread counts
        run_experiment(ExperimentFactory(tiny_config(train_seeds=seeds), reference), LocalExecutor())
    finally:
        torch.set_num_threads(threads)
    assert_same_tables(reference, root)


def test_plugins_reach_worker_processes_through_the_environment(monkeypatch):
    """--workers starts fresh processes: the parent's --plugin modules travel in $LRFEATURES_PLUGINS."""
    from lrfeatures.plugins import ENV, load_plugins

    monkeypatch.setenv(ENV, "")
    load_plugins(["json", "json"])
    assert os.environ[ENV] == "json"
    load_plugins([])  # what a worker does: the names come back from the environment
    assert os.environ[ENV] == "json"
