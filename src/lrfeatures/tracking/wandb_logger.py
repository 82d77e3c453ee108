"""Weights & Biases: offline runs under DIR/wandb/ unless the user configured W&B otherwise.

The grouping is MLflow's: the experiment's name is the W&B group; each committed shard with
metrics is a run in it (job type = its stage) holding the seed means per PLR, or per model on
request; one more run, `<name>/summary` (job type `summary`), holds the config, the final test
accuracies in its W&B summary, and summary.json and report.html among its files. Mode: $WANDB_MODE
when set (e.g. `online`), else `offline` (`wandb sync DIR/wandb/offline-run-*` uploads later).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import to_dict
from .feed import ShardTables, group_curves, group_label, model_curves
from .mlflow_logger import final_rows


class WandbLogger:
    """Logs the committed shards as W&B runs of one group."""

    name = "wandb"

    def __init__(self, root: Path, cfg: Any, per_model: bool = False):
        import wandb

        self.wandb, self.root, self.cfg, self.per_model = wandb, Path(root), cfg, per_model
        self.group = str(getattr(cfg, "name", self.root.name))
        self.mode = os.environ.get("WANDB_MODE") or "offline"
        self.config = to_dict(cfg)

    def init(self, name: str, job_type: str, config: dict):
        """A new run of the experiment's group (quiet: the CLI's output stays the CLI's)."""
        settings = self.wandb.Settings(silent=True, console="off", save_code=False, disable_git=True,
                                       x_disable_stats=True, x_disable_meta=True)
        return self.wandb.init(project=os.environ.get("WANDB_PROJECT") or "lrfeatures", group=self.group,
                               name=name, job_type=job_type, config=config, dir=str(self.root), mode=self.mode,
                               reinit="create_new", settings=settings)

    def shards(self, batch: list[ShardTables]) -> None:
        """One run per shard with metrics: per step, every group's (or model's) values."""
        for shard in batch:
            if shard.metrics.empty:
                continue
            run = self.init(shard.name, shard.stage, {"experiment": self.config, "shard": shard.name})
            try:
                for step, values in sorted(shard_steps(shard.metrics, self.per_model).items()):
                    run.log(values, step=step)
            finally:
                run.finish()

    def finish(self, summary: dict | None, report: Path | None) -> None:
        """The summary run: final accuracies as its W&B summary, summary.json and report.html as files."""
        if summary is None:
            return
        run = self.init(f"{self.group}/summary", "summary", self.config)
        try:
            evaluations = self.root / "evaluations.parquet"
            if evaluations.is_file():
                for key, value, _ in final_rows(pd.read_parquet(evaluations)):
                    run.summary[key] = value
            for path in (self.root / "summary.json", report):
                if path is not None and Path(path).is_file():
                    shutil.copy(path, Path(run.dir) / Path(path).name)  # files in run.dir are the run's files
        finally:
            run.finish()


def shard_steps(metrics: pd.DataFrame, per_model: bool) -> dict[int, dict[str, float]]:
    """step -> {'<metric>/<group or model>': value} of one shard (seed means per group by default)."""
    steps: dict[int, dict[str, float]] = {}
    curves = model_curves(metrics) if per_model else \
        ((group_label(*key), curve) for key, curve in group_curves(metrics))
    for label, curve in curves:
        where = label.split("/", 1)[1]
        for step, values in curve.rows():
            logged = steps.setdefault(step, {})
            for name, value in values.items():
                if per_model or name.endswith("/mean"):
                    logged[f"{name.removesuffix('/mean')}/{where}"] = value
    return steps
