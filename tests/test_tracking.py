"""Live logging: TensorBoard, MLflow and W&B files read back with each tool's own reader, against the store."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lrfeatures.cli import main
from lrfeatures.experiments import Experiment, plan_shards
from lrfeatures.experiments.runtime import COMMIT_LISTENERS, export_experiment, tracking_session
from lrfeatures.store import ExperimentStore
from lrfeatures.tracking import Tracker, check_loggers
from lrfeatures.engine.common import LOG_FIELDS

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def store_copy(tiny_run, tmp_path):
    """A private copy of the shared tiny run (exports write into the store's folder)."""
    root = tmp_path / "run"
    shutil.copytree(tiny_run, root)
    return root


def seed_stats(metrics: pd.DataFrame, stage: str, plr: float, flr: float | None = None) -> pd.DataFrame:
    """Per step: mean, std and count over seeds of every metric, non-finite and diverged values left out."""
    rows = metrics[(metrics["stage"] == stage) & np.isclose(metrics["plr"], plr)]
    if flr is not None:
        rows = rows[np.isclose(rows["flr"], flr)]
    columns = [c for c in LOG_FIELDS if c != "diverged"]
    values = rows[columns].astype(float).replace([np.inf, -np.inf], np.nan)
    values[rows["diverged"].to_numpy()] = np.nan  # as the report: a diverged model is left out
    return values.assign(step=rows["step"].to_numpy()).groupby("step").agg(["mean", "std", "count"])


def accumulator(path: Path):
    """TensorBoard's own event reader over a run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    reader.Reload()
    return reader


def scalar_series(reader, tag: str) -> pd.Series:
    """A scalar tag as a step-indexed series."""
    events = reader.Scalars(tag)
    return pd.Series([e.value for e in events], index=[e.step for e in events], dtype=float)


# ---------------------------------------------------------------- off by default, missing extras

def test_loggers_are_off_by_default(tiny_run):
    assert not any((tiny_run / name).exists() for name in ("tensorboard", "mlruns", "wandb"))
    tracker = Tracker(tiny_run, None, [])
    assert not tracker.thread.is_alive()  # no loggers: no thread, nothing read
    tracker.close()


@pytest.mark.parametrize("name", ["tensorboard", "mlflow", "wandb"])
def test_a_missing_extra_is_a_one_line_error_before_anything_is_written(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, name, None)  # as if the package were not installed
    monkeypatch.chdir(tmp_path)
    code = main(["synthetic", "--out", str(tmp_path / "out"), "--quiet", "--log", name])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("lrfeatures: error:") and f"pip install 'lrfeatures[{name}]'" in err[0]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(Exception, match=rf"lrfeatures\[{name}\]"):
        check_loggers([name])


def test_an_unknown_logger_is_refused():
    with pytest.raises(Exception, match="use one of: tensorboard, mlflow, wandb"):
        check_loggers(["neptune"])


# ---------------------------------------------------------------- TensorBoard

def test_tensorboard_runs_hold_the_seed_statistics_of_the_store(store_copy):
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.hparams import plugin_data_pb2

    export_experiment(store_copy, ["tensorboard"])
    metrics = pd.read_parquet(store_copy / "metrics.parquet")
    cfg = ExperimentStore(store_copy).config()
    groups = [("pretrain", plr, None) for plr in cfg.pretrain.lrs] + \
             [("finetune", plr, flr) for plr in cfg.pretrain.lrs for flr in cfg.finetune.lrs]
    runs = sorted(p.relative_to(store_copy / "tensorboard").as_posix()
                  for p in (store_copy / "tensorboard").glob("*/*"))
    assert len(runs) == len(groups)  # one run per (stage, PLR, FLR): a big grid stays readable
    checked = 0
    for stage, plr, flr in groups:
        run = f"{stage}/plr={plr:.6g}" + ("" if flr is None else f",flr={flr:.6g}")
        reader = accumulator(store_copy / "tensorboard" / run)
        expected = seed_stats(metrics, stage, plr, flr)
        for metric in ("train_loss", "test_acc", "grad_norm"):
            for stat, column in (("mean", "mean"), ("std", "std"), ("n", "count")):
                want = expected[(metric, column)].dropna()
                got = scalar_series(reader, f"{metric}/{stat}")
                assert list(got.index) == list(want.index), (run, metric, stat)
                np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-6, atol=1e-7)
                checked += len(want)
        final = scalar_series(reader, "final/test_acc/mean")
        assert final.iloc[-1] == pytest.approx(expected[("test_acc", "mean")].dropna().iloc[-1], rel=1e-6)
        content = reader.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        assert hparams["stage"].string_value == stage
        assert hparams["plr"].number_value == pytest.approx(plr)
        assert (flr is None) == ("flr" not in hparams)
    assert checked > 100


def test_tensorboard_per_model_runs_hold_each_models_values(store_copy):
    pytest.importorskip("tensorboard")
    export_experiment(store_copy, ["tensorboard"], per_model=True)
    metrics = pd.read_parquet(store_copy / "metrics.parquet")
    rows = metrics[(metrics["stage"] == "pretrain") & np.isclose(metrics["plr"], 1e-2)
                   & (metrics["train_seed"] == 1)].sort_values("step")
    reader = accumulator(store_copy / "tensorboard" / "models" / "pretrain" / "plr=0.01" / "seed=0.1")
    got = scalar_series(reader, "train_loss")
    assert list(got.index) == rows["step"].tolist()
    np.testing.assert_allclose(got.to_numpy(), rows["train_loss"].to_numpy(), rtol=1e-6)
    n_models = len(metrics.drop_duplicates(["stage", "data_seed", "train_seed", "plr", "flr"]))
    assert len(list((store_copy / "tensorboard" / "models").glob("*/*/*"))) == n_models


# ---------------------------------------------------------------- MLflow

def test_mlflow_file_store_holds_a_parent_run_and_a_nested_run_per_shard(store_copy):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    (store_copy / "report.html").write_text("<html>report</html>")
    export_experiment(store_copy, ["mlflow"])
    client = MlflowClient(tracking_uri=(store_copy / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.data.tags["mlflow.runName"]: r for r in runs if r is not parent}
    metric_shards = [s.name for s in plan_shards(ExperimentStore(store_copy).config())
                     if s.stage in ("pretrain", "finetune")]
    assert sorted(children) == sorted(metric_shards)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    assert parent.data.params["pretrain.iterations"] == "200"
    assert parent.data.params["pretrain.lrs"] == "[0.001, 0.01, 0.3]"
    metrics = pd.read_parquet(store_copy / "metrics.parquet")
    pretrain = next(r for name, r in children.items() if name.startswith("pretrain-"))
    history = client.get_metric_history(pretrain.info.run_id, "train_loss/plr_0.01")
    want = seed_stats(metrics, "pretrain", 1e-2)[("train_loss", "mean")].dropna()
    assert [m.step for m in history] == list(want.index)
    np.testing.assert_allclose([m.value for m in history], want.to_numpy(), rtol=1e-9)
    evaluations = pd.read_parquet(store_copy / "evaluations.parquet")
    pre = evaluations[(evaluations["stage"] == "pretrain") & np.isclose(evaluations["plr"], 1e-3)]
    assert parent.data.metrics["final_test_acc/pretrain/plr_0.001"] == pytest.approx(pre["test_acc"].mean())
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "report.html"} <= artifacts
    assert parent.info.status == "FINISHED"


# ---------------------------------------------------------------- W&B

def test_wandb_offline_runs_hold_the_summary(store_copy, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    export_experiment(store_copy, ["wandb"])
    runs = sorted((store_copy / "wandb").glob("offline-run-*"))
    metric_shards = [s for s in plan_shards(ExperimentStore(store_copy).config())
                     if s.stage in ("pretrain", "finetune")]
    assert len(runs) == len(metric_shards) + 1  # a run per shard with metrics, and the summary run
    with_summary = [r for r in runs if (r / "files" / "summary.json").is_file()]
    assert len(with_summary) == 1
    stored = json.loads((store_copy / "summary.json").read_text())
    assert json.loads((with_summary[0] / "files" / "summary.json").read_text()) == stored
    record = next(with_summary[0].glob("run-*.wandb")).read_bytes()
    assert b"final_test_acc/pretrain/plr_0.001" in record  # the final accuracies are the run's W&B summary
    assert all(next(r.glob("run-*.wandb")).stat().st_size > 0 for r in runs)


# ---------------------------------------------------------------- live, from the runtime

def test_the_session_logs_shards_as_they_commit(tmp_path, tiny_config):
    pytest.importorskip("tensorboard")
    root = tmp_path / "live"
    with tracking_session(tiny_config, root, ["tensorboard"]) as tracker:
        assert tracker.wake in COMMIT_LISTENERS
        Experiment(tiny_config, root).run()
        deadline = time.time() + 120  # the thread picks the commits up while the session is open
        planned = {s.name for s in plan_shards(tiny_config)}
        while tracker.seen != planned and time.time() < deadline:
            time.sleep(0.1)
        assert tracker.seen == planned
    assert tracker.wake not in COMMIT_LISTENERS
    metrics = pd.read_parquet(root / "metrics.parquet")
    got = scalar_series(accumulator(root / "tensorboard" / "pretrain" / "plr=0.3"), "train_loss/mean")
    want = seed_stats(metrics, "pretrain", 0.3)[("train_loss", "mean")].dropna()
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-6)


@pytest.mark.slow
def test_cli_logs_to_all_three_while_it_runs(tmp_path, tiny_overrides, monkeypatch, capsys):
    for name in ("tensorboard", "mlflow", "wandb"):
        pytest.importorskip(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "out"
    args = ["synthetic", "--out", str(out), "--quiet"] + [a for o in tiny_overrides for a in ("--set", o)]
    assert main(args + ["--log", "tensorboard", "--log", "mlflow", "--log", "wandb"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err, captured.err
    metrics = pd.read_parquet(out / "metrics.parquet")
    got = scalar_series(accumulator(out / "tensorboard" / "finetune" / "plr=0.01,flr=0.001"), "test_loss/mean")
    want = seed_stats(metrics, "finetune", 1e-2, 1e-3)[("test_loss", "mean")].dropna()
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-6)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    parent = [r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
              if "mlflow.parentRunId" not in r.data.tags][0]
    assert {"summary.json", "report.html"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert any((r / "files" / "report.html").is_file() for r in (out / "wandb").glob("offline-run-*"))
    assert math.isfinite(parent.data.metrics["shards_logged"])
