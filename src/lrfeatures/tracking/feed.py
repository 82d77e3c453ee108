"""What the loggers log, computed from the store's own tables (nothing the store does not hold).

A metrics table has the key columns, `step` (an iteration for synthetic runs, an epoch for image
runs) and one column per logged quantity. Loggers see it in two shapes:
    group curves   per (stage, PLR, FLR): mean, std and count over seeds at every step
    model curves   per model: the raw values, for per-model logging on request
Diverged rows and non-finite values are left out of every statistic, as in the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd

from ..analysis.tables import KEY_COLUMNS

GROUP_KEYS = ["stage", "plr", "flr"]
NOT_METRICS = set(KEY_COLUMNS) | {"step", "diverged"}


@dataclass
class ShardTables:
    """One committed shard as the loggers see it: its name and its tables (empty when absent)."""

    name: str
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)
    evaluations: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def stage(self) -> str:
        """The shard's stage (the part of its name before the first '-')."""
        return self.name.split("-", 1)[0]


def metric_columns(metrics: pd.DataFrame) -> list[str]:
    """The logged quantities of a metrics table (numeric columns that are not keys)."""
    return [c for c in metrics.columns if c not in NOT_METRICS and pd.api.types.is_numeric_dtype(metrics[c])
            and not pd.api.types.is_bool_dtype(metrics[c])]


def number(value: float) -> str:
    """A learning rate as it appears in run names and keys (6 significant digits)."""
    return f"{float(value):.6g}"


def group_label(stage: str, plr: float, flr: float) -> str:
    """'pretrain/plr=0.01' or 'finetune/plr=0.01,flr=0.001' (a run name / key part)."""
    label = f"{stage}/plr={number(plr)}"
    return label if flr is None or not math.isfinite(flr) else f"{label},flr={number(flr)}"


def model_label(row: Any) -> str:
    """A model's run name: its group label and 'seed=<data seed>.<train seed>'."""
    return f"{group_label(row.stage, row.plr, row.flr)}/seed={int(row.data_seed)}.{int(row.train_seed)}"


def masked(metrics: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The metric columns as floats, NaN where the row diverged or the value is not finite."""
    values = metrics[columns].astype(float).replace([np.inf, -np.inf], np.nan)
    if "diverged" in metrics:
        values.loc[metrics["diverged"].astype(bool).to_numpy(), :] = np.nan
    return values


@dataclass
class Curve:
    """Values over steps: `values[i, j]` is quantity `names[j]` at `steps[i]` (NaN where undefined)."""

    steps: np.ndarray            # [T] int, increasing
    names: list[str]
    values: np.ndarray           # [T, K] float

    def rows(self) -> Iterator[tuple[int, dict[str, float]]]:
        """(step, {name: value}) per step, finite values only."""
        finite = np.isfinite(self.values)
        for i, step in enumerate(self.steps.tolist()):
            yield step, {n: v for n, v, ok in zip(self.names, self.values[i].tolist(), finite[i]) if ok}

    def final(self) -> dict[str, float]:
        """The finite values at the last step, each named 'final/<name>'."""
        if not len(self.steps):
            return {}
        return {f"final/{n}": v for n, v in zip(self.names, self.values[-1].tolist()) if math.isfinite(v)}


def grouped(metrics: pd.DataFrame, keys: list[str]) -> Iterator[tuple[tuple, np.ndarray]]:
    """(key values, row positions sorted by step) per group of `keys` (NaN keys form their own group)."""
    codes = [pd.factorize(metrics[k], use_na_sentinel=False) for k in keys]
    combined = np.zeros(len(metrics), dtype=np.int64)
    for labels, uniques in codes:
        combined = combined * (len(uniques) + 1) + labels
    order = np.lexsort((metrics["step"].to_numpy(), combined))
    _, starts = np.unique(combined[order], return_index=True)
    for rows in np.split(order, starts[1:]):
        first = rows[0]
        yield tuple(uniques[labels[first]] for labels, uniques in codes), rows


def step_stats(steps: np.ndarray, values: np.ndarray, names: list[str],
               diverged: np.ndarray | None) -> Curve:
    """Per step over the rows: `<name>/mean`, `<name>/std` (sample; NaN for one value), `<name>/n`."""
    unique, index = np.unique(steps, return_inverse=True)
    present = np.isfinite(values)
    n = np.zeros((len(unique), values.shape[1]))
    total = np.zeros_like(n)
    np.add.at(n, index, present)
    np.add.at(total, index, np.where(present, values, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, total / n, np.nan)
        squares = np.zeros_like(n)
        np.add.at(squares, index, np.where(present, (values - mean[index]) ** 2, 0.0))
        std = np.where(n > 1, np.sqrt(squares / (n - 1)), np.nan)
    columns = [mean, std, n]
    out_names = [f"{name}/{stat}" for stat in ("mean", "std", "n") for name in names]
    if diverged is not None:
        fraction = np.zeros(len(unique))
        np.add.at(fraction, index, diverged.astype(float))
        columns.append((fraction / np.bincount(index))[:, None])
        out_names.append("diverged_fraction")
    return Curve(unique, out_names, np.concatenate(columns, axis=1))


def group_curves(metrics: pd.DataFrame) -> Iterator[tuple[tuple[str, float, float], Curve]]:
    """Per (stage, PLR, FLR): mean, std and count over seeds of every metric at every step.

    std is the sample std (NaN with one seed); `diverged_fraction` is the share of models flagged diverged.
    """
    if metrics.empty:
        return
    columns = metric_columns(metrics)
    values = masked(metrics, columns).to_numpy(float)
    steps = metrics["step"].to_numpy()
    diverged = metrics["diverged"].astype(bool).to_numpy() if "diverged" in metrics else None
    for (stage, plr, flr), rows in grouped(metrics, GROUP_KEYS):
        curve = step_stats(steps[rows], values[rows], columns, None if diverged is None else diverged[rows])
        yield (stage, float(plr), float(flr)), curve


def model_curves(metrics: pd.DataFrame) -> Iterator[tuple[str, Curve]]:
    """Per model: its label and its values over steps."""
    if metrics.empty:
        return
    columns = metric_columns(metrics)
    values = masked(metrics, columns).to_numpy(float)
    steps = metrics["step"].to_numpy()
    for key, rows in grouped(metrics, KEY_COLUMNS):
        row = pd.Series(dict(zip(KEY_COLUMNS, key)))
        yield model_label(row), Curve(steps[rows], list(columns), values[rows])


def flat_params(data: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as 'section.field' -> text (lists as their TOML-like text), for run parameters."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flat_params(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(data)}


def hparams_of(stage: str, plr: float, flr: float) -> dict[str, Any]:
    """The hyper-parameters of a group: its stage, PLR and (fine-tuning) FLR."""
    out: dict[str, Any] = {"stage": stage, "plr": float(plr)}
    if math.isfinite(flr):
        out["flr"] = float(flr)
    return out
