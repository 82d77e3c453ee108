"""MLflow: one parent run per experiment, a nested run per committed shard, summary and report as artifacts.

The tracking URI is $MLFLOW_TRACKING_URI when set, else a local file store in DIR/mlruns (no
server). A shard's nested run holds, per step, the seed mean of every metric per PLR (and FLR),
keyed `<metric>/plr_<PLR>[/flr_<FLR>]`; per model (`.../seed_D.T`) on request. Non-finite values are left out
(MLflow's UI cannot plot them). The parent run holds the config as parameters, the count of
shards logged so far (`shards_logged`), the final test accuracy per stage and PLR from
evaluations.parquet, and summary.json and report.html as artifacts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import to_dict
from .feed import ShardTables, flat_params, group_curves, group_label, model_curves

BATCH = 1000  # MLflow's limit of metrics per log_batch call
PARAM_BATCH = 100  # ... and of parameters


def tracking_uri(root: Path) -> str:
    """$MLFLOW_TRACKING_URI, else the file store DIR/mlruns."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    # MLflow 3 keeps the file store only on request; it is the one that needs no server.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (Path(root).absolute() / "mlruns").as_uri()


class MlflowLogger:
    """Logs the committed shards as nested runs of one parent run."""

    name = "mlflow"

    def __init__(self, root: Path, cfg: Any, per_model: bool = False):
        from mlflow.tracking import MlflowClient

        self.root, self.cfg, self.per_model = Path(root), cfg, per_model
        self.client = MlflowClient(tracking_uri=tracking_uri(root))
        name = str(getattr(cfg, "name", self.root.name))
        found = self.client.get_experiment_by_name(name)
        self.experiment = found.experiment_id if found else self.client.create_experiment(name)
        self.parent = self.client.create_run(self.experiment, tags={
            "mlflow.runName": name, "lrfeatures.kind": str(getattr(cfg, "kind", "")),
            "lrfeatures.dir": str(self.root.absolute())}).info.run_id
        self.log_params(self.parent, flat_params(to_dict(cfg)))
        self.logged = 0

    def log_params(self, run: str, params: dict[str, str]) -> None:
        """Parameters in batches of MLflow's size (values cut to its length limit)."""
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(run, params=items[i:i + PARAM_BATCH])

    def log_metrics(self, run: str, rows: list[tuple[str, float, int]]) -> None:
        """(key, value, step) metrics in batches."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(s)) for k, v, s in rows]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(run, metrics=metrics[i:i + BATCH])

    def shards(self, batch: list[ShardTables]) -> None:
        """One nested run per shard with metrics; the parent's shard count."""
        for shard in batch:
            if shard.metrics.empty:
                continue
            run = self.client.create_run(self.experiment, tags={
                "mlflow.parentRunId": self.parent, "mlflow.runName": shard.name,
                "lrfeatures.stage": shard.stage}).info.run_id
            self.log_params(run, {"stage": shard.stage, "shard": shard.name})
            self.log_metrics(run, shard_rows(shard.metrics, self.per_model))
            self.client.set_terminated(run)
            self.logged += 1
        self.log_metrics(self.parent, [("shards_logged", float(self.logged), self.logged)])

    def finish(self, summary: dict | None, report: Path | None) -> None:
        """Final accuracies, summary.json and report.html on the parent run, which then ends."""
        evaluations = self.root / "evaluations.parquet"
        if evaluations.is_file():
            self.log_metrics(self.parent, final_rows(pd.read_parquet(evaluations)))
        for path in (self.root / "summary.json", report):
            if summary is not None and path is not None and Path(path).is_file():
                self.client.log_artifact(self.parent, str(path))
        self.client.set_terminated(self.parent, "FINISHED" if summary is not None else "KILLED")


def safe_key(key: str) -> str:
    """A key MLflow accepts (no '=' or ','): 'test_acc/plr=0.1,flr=0.01' -> 'test_acc/plr_0.1/flr_0.01'."""
    return key.replace("=", "_").replace(",", "/")


def shard_rows(metrics: pd.DataFrame, per_model: bool) -> list[tuple[str, float, int]]:
    """(key, value, step) of a shard: per group seed means, or per model values."""
    curves = model_curves(metrics) if per_model else \
        ((group_label(*key), curve) for key, curve in group_curves(metrics))
    rows = []
    for label, curve in curves:
        where = label.split("/", 1)[1]  # the stage is the run's
        for step, values in curve.rows():
            rows += [(safe_key(f"{name.removesuffix('/mean')}/{where}"), value, step) for name, value in values.items()
                     if per_model or name.endswith("/mean")]
    return rows


def final_rows(evaluations: pd.DataFrame) -> list[tuple[str, float, int]]:
    """`final_test_acc/<stage>/plr_<PLR>[/flr_<FLR>][/k_<K>]`: seed means of the final evaluations."""
    rows = []
    table = evaluations.assign(flr=evaluations["flr"].astype(float).fillna(-1.0))
    finite = table["test_acc"].where(~table.get("diverged", pd.Series(False, index=table.index)).astype(bool))
    for (stage, plr, flr, k), acc in finite.groupby([table["stage"], table["plr"], table["flr"], table["swa_k"]]):
        label = group_label(stage, plr, float("nan") if flr == -1.0 else flr) + (f",k={int(k)}" if k else "")
        if acc.notna().any():
            rows.append((safe_key(f"final_test_acc/{label}"), float(acc.mean()), 0))
    return rows
