"""TensorBoard: event files under DIR/tensorboard/, one run per (stage, PLR, FLR) or per model.

By default each run holds the seed mean, std and count of every metric (`train_loss/mean`, ...),
so a grid of a thousand models stays a few dozen readable runs; per-model runs (under
`models/`) on request. Each run also carries an HParams session (stage, PLR, FLR) whose metrics
are the final values (`final/<metric>/mean`). When a new shard brings more seeds of a group, the
group's run is written anew in a hidden folder and swapped in, so a run always holds exactly
the statistics of the shards committed so far (TensorBoard reloads it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .feed import (GROUP_KEYS, Curve, ShardTables, group_label, grouped, hparams_of, masked, metric_columns,
                   model_curves, step_stats)


class TensorBoardLogger:
    """Writes the committed shards' metrics as TensorBoard runs."""

    name = "tensorboard"

    def __init__(self, root: Path, cfg: Any, per_model: bool = False):
        self.base = Path(root) / "tensorboard"
        self.cfg, self.per_model = cfg, per_model
        # group label -> (stage, plr, flr), its metric names, and its rows from each shard so far
        self.keys: dict[str, tuple[str, float, float]] = {}
        self.names: dict[str, list[str]] = {}
        self.parts: dict[str, list[tuple[pd.DataFrame | None, np.ndarray, np.ndarray, np.ndarray]]] = {}

    def shards(self, batch: list[ShardTables]) -> None:
        """Rewrite every run the new shards touch (groups by default, models on request)."""
        touched = set()
        for shard in batch:
            metrics = shard.metrics
            if metrics.empty:
                continue
            names = metric_columns(metrics)
            values = masked(metrics, names).to_numpy(float)  # [rows, metrics]
            steps = metrics["step"].to_numpy()
            diverged = metrics["diverged"].astype(bool).to_numpy() if "diverged" in metrics else \
                np.zeros(len(metrics), bool)
            for (stage, plr, flr), rows in grouped(metrics, GROUP_KEYS):
                label = group_label(stage, plr, flr)
                self.keys[label], self.names[label] = (stage, float(plr), float(flr)), names
                self.parts.setdefault(label, []).append(
                    (metrics.iloc[rows] if self.per_model else None, steps[rows], values[rows], diverged[rows]))
                touched.add(label)
        for label in sorted(touched):
            parts, hparams = self.parts[label], hparams_of(*self.keys[label])
            if self.per_model:
                for model, curve in model_curves(pd.concat([p[0] for p in parts], ignore_index=True)):
                    self.write_run(f"models/{model}", curve, {**hparams, "seed": model.rsplit("=", 1)[1]})
            else:
                curve = step_stats(*(np.concatenate([p[i] for p in parts]) for i in (1, 2)), self.names[label],
                                   np.concatenate([p[3] for p in parts]))
                self.write_run(label, curve, hparams)

    def write_run(self, label: str, curve: Curve, hparams: dict[str, Any]) -> None:
        """One run: an event per step holding all its scalars, the HParams session, then swapped into place."""
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        def summary(values: dict[str, float]) -> Summary:
            return Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()])

        # Staged beside tensorboard/, not in it: TensorBoard would show a half-written run.
        tmp = self.base.parent / ".tensorboard-staging" / secrets.token_hex(6)
        tmp.mkdir(parents=True)
        now = time.time()
        # One file written synchronously (the writer's own thread would only add work here).
        with open(tmp / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.lrf", "wb") as handle:
            records = RecordWriter(handle)
            records.write(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
            for step, values in curve.rows():
                records.write(Event(wall_time=now, step=step, summary=summary(values)).SerializeToString())
            final = curve.final()
            for part in hparams_summaries(hparams, final):
                records.write(Event(wall_time=now, summary=part).SerializeToString())
            last = int(curve.steps[-1]) if len(curve.steps) else 0
            records.write(Event(wall_time=now, step=last, summary=summary(final)).SerializeToString())
        replace_dir(tmp, self.base / label)

    def finish(self, summary: dict | None, report: Path | None) -> None:
        """Nothing left to write: every run is complete once its shards are in."""


def replace_dir(new: Path, target: Path) -> None:
    """Put folder `new` where `target` is, the old one (if any) removed after the swap."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = new.parent / f"old-{secrets.token_hex(6)}"
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
