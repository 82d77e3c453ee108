"""What the report reads from a store: the experiment, its regimes, and statistics over seeds.

Diverged runs (diverged flag, or a non-finite value) are left out of every statistic, so a
PLR whose runs all diverged leaves a gap in a figure's line; the regime table counts them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..analysis.features import SUMMARY_TOL, feature_table_summary, noise_floor
from ..analysis.regimes import detect_regimes
from ..analysis.tables import KEY_COLUMNS, swa_k_of_choice
from ..errors import DataError, StoreError
from ..store import ExperimentStore


@dataclass
class Regimes:
    """Per-PLR regime labels (sorted by PLR) and the boundaries of summary.json."""

    table: pd.DataFrame                 # plr, regime, confidence, n_seeds, n_diverged (as available)
    boundaries: dict[str, dict | None]  # name -> {lower_plr, upper_plr, estimate, margin, confidence}

    @classmethod
    def from_summary(cls, summary: dict) -> "Regimes":
        """Read summary["regimes"] (falling back to the labels in summary["per_plr"])."""
        report = summary.get("regimes") or {}
        rows = report.get("per_plr") or [{"plr": r["plr"], "regime": r.get("regime")}
                                         for r in summary.get("per_plr", [])]
        table = pd.DataFrame(rows)
        for column in ("plr", "regime", "confidence"):
            if column not in table:
                table[column] = np.nan if column != "regime" else None
        table = table.sort_values("plr", ignore_index=True)
        return cls(table=table, boundaries=dict(report.get("boundaries") or {}))

    def runs(self) -> list[tuple[str, float, float]]:
        """Maximal runs of one regime along the PLR grid: (name, first PLR, last PLR)."""
        runs: list[tuple[str, float, float]] = []
        for plr, name in zip(self.table["plr"], self.table["regime"]):
            name = name if isinstance(name, str) and name else None
            if runs and runs[-1][0] == name:
                runs[-1] = (name, runs[-1][1], plr)
            else:
                runs.append((name, plr, plr))
        return [run for run in runs if run[0] is not None]

    def snap_to(self, grid) -> "Regimes":
        """Replace each PLR by the grid PLR it rounds to (JSON may shorten floats), so lookups are exact."""
        grid = np.unique(np.asarray(grid, float))
        plrs = self.table["plr"].to_numpy(float)
        if len(grid):
            nearest = grid[np.abs(np.log(grid)[None, :] - np.log(plrs)[:, None]).argmin(1)]
            plrs = np.where(np.isclose(nearest, plrs, rtol=1e-4), nearest, plrs)
        return Regimes(table=self.table.assign(plr=plrs), boundaries=self.boundaries)


@dataclass
class Experiment:
    """Everything the report reads from one experiment directory."""

    root: Path
    config: Any
    summary: dict
    regimes: Regimes
    metrics: pd.DataFrame
    evaluations: pd.DataFrame
    features: pd.DataFrame | None
    geometry: pd.DataFrame | None
    notes: list[str]  # things the reader should know (e.g. regimes recomputed)
    bands: pd.DataFrame | None = None  # bands.parquet of an image experiment (`lrfeatures fourier`)

    def stage(self, stage: str) -> pd.DataFrame:
        """The evaluations of one stage (pretrain, finetune, swa)."""
        return self.evaluations[self.evaluations["stage"] == stage]


def measurement_table(exp: "Experiment", name: str, missing: str) -> pd.DataFrame:
    """DIR/<name>.parquet of the experiment; DataError(`missing`) when it is absent or empty."""
    table = _optional_table(ExperimentStore(exp.root), name)
    if table is None:
        raise DataError(f"{name}.parquet is missing or empty; {missing}")
    return table


def has_table(exp: "Experiment", name: str) -> bool:
    """Whether the experiment holds a non-empty DIR/<name>.parquet."""
    return _optional_table(ExperimentStore(exp.root), name) is not None


def _optional_table(store: ExperimentStore, name: str) -> pd.DataFrame | None:
    try:
        table = store.table(name)
    except StoreError:
        return None
    return None if table.empty else table


def load_experiment(root: str | Path) -> Experiment:
    """Read config, tables and summary.json of an experiment (regimes are recomputed if it lacks one)."""
    store = ExperimentStore(root)
    config = store.config()
    metrics, evaluations = store.table("metrics"), store.table("evaluations")
    notes = []
    summary_path = store.root / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    else:
        # Regime detection only reads tables, so the report can still show them.
        summary = {"version": None, "name": getattr(config, "name", store.root.name)}
        try:
            summary["regimes"] = detect_regimes(metrics, evaluations).to_json()
            notes.append("summary.json is missing: regimes were detected now with the default criteria.")
        except DataError as err:
            notes.append(f"summary.json is missing and regimes could not be detected: {err}")
    return Experiment(root=store.root, config=config, summary=summary,
                      regimes=Regimes.from_summary(summary).snap_to(evaluations["plr"]), metrics=metrics,
                      evaluations=evaluations, features=_optional_table(store, "features"),
                      geometry=_optional_table(store, "geometry"), notes=notes,
                      bands=_optional_table(store, "bands"))


def finite_values(table: pd.DataFrame, column: str) -> pd.Series:
    """Values of `column` as floats, NaN for diverged rows and non-finite values."""
    values = table[column].astype(float).replace([np.inf, -np.inf], np.nan)
    if "diverged" in table:
        values = values.where(~table["diverged"].astype(bool))
    return values


def over_seeds(table: pd.DataFrame, by: list[str], column: str) -> pd.DataFrame:
    """Per `by` group: mean, std (ddof=1), median, q25, q75 of `column` over seeds (NaN-skipping)."""
    grouped = table.assign(_value=finite_values(table, column)).groupby(by, sort=True)["_value"]
    stats = pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(), "median": grouped.median(),
                          "q25": grouped.quantile(0.25), "q75": grouped.quantile(0.75),
                          "n": grouped.count()})
    return stats.reset_index()


@dataclass(frozen=True)
class ModelKind:
    """One kind of final model: pre-trained, fine-tuned with one FLR, or SWA with one K."""

    name: str
    stage: str
    flr: float | None = None
    swa_k: int | None = None

    def select(self, table: pd.DataFrame) -> pd.DataFrame:
        """Rows of `table` that belong to this kind."""
        rows = table["stage"] == self.stage
        if self.flr is not None:
            rows &= np.isclose(table["flr"].astype(float), self.flr, rtol=1e-9)
        if self.swa_k is not None:
            rows &= table["swa_k"] == self.swa_k
        return table[rows]


def model_kinds(table: pd.DataFrame) -> list[ModelKind]:
    """PT, FT at the lowest and highest FLR, and SWA (the K of `swa_k_of_choice`), as far as `table` has them."""
    kinds = [ModelKind("pre-training", "pretrain")]
    flrs = sorted(table.loc[table["stage"] == "finetune", "flr"].dropna().unique())
    if flrs:
        kinds.append(ModelKind(f"fine-tuned, lowest FLR {flrs[0]:.3g}", "finetune", flr=float(flrs[0])))
    if len(flrs) > 1:
        kinds.append(ModelKind(f"fine-tuned, highest FLR {flrs[-1]:.3g}", "finetune", flr=float(flrs[-1])))
    k = swa_k_of_choice(table.loc[table["stage"] == "swa", "swa_k"].unique())
    if k is not None:
        kinds.append(ModelKind(f"SWA, K={k}", "swa", swa_k=k))
    return [kind for kind in kinds if not kind.select(table).empty]


def feature_summary(exp: Experiment) -> pd.DataFrame:
    """Seed mean/std of sorted feature accuracies and sparsity per model group (see analysis.features).

    Its `basis` column says which index it holds: "margin", or "accuracy" for a features table
    written before the margin column (lrfeatures 0.1), whose index is the earlier one.
    """
    if exp.features is None:
        raise DataError("features.parquet is missing or empty; run the feature probes of this "
                        "(synthetic) experiment to draw feature figures")
    features = exp.features
    if "diverged" in exp.evaluations and "diverged" not in features:
        # A diverged model's probe accuracies mean nothing: drop them like its test accuracy.
        flags = exp.evaluations[KEY_COLUMNS + ["diverged"]].drop_duplicates(KEY_COLUMNS, keep="last")
        features = features.merge(flags, on=KEY_COLUMNS, how="left")  # NaN keys match NaN
        features["diverged"] = features["diverged"].fillna(False).astype(bool)
    features = features.assign(**{column: finite_values(features, column)
                                  for column in ("accuracy", "margin") if column in features})
    floor = noise_floor(exp.config.data.n_probe)  # the same convention as summary.json
    return feature_table_summary(features[list(exp.features.columns)], None, floor=floor, tol=SUMMARY_TOL)
