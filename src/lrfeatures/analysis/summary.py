"""summary.json: per-PLR numbers averaged over seeds, regimes and geometry, for scripts and plots.

Its schema is documented in the README ("summary.json"). Every number is a plain float,
NaN is written as null.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from ..config import to_dict
from ..models.registry import model_entry
from ..store import ExperimentStore, write_json
from .curvature import add_curvature_blocks
from .features import SUMMARY_TOL, feature_table_summary, noise_floor
from .findings import build_findings
from .measurements import MEASUREMENTS, measurement_blocks
from .regimes import CONVERGED_LOSS, NO_REGIME_REASON, RegimeCriteria, detect_regimes, steps_to_convergence
from .tables import clean, mean_std


def quantiles(values: pd.Series) -> dict[str, float | None]:
    """Median, quartiles, mean and std (for barriers, which are skewed)."""
    values = values.astype(float).dropna()
    if values.empty:
        return {"median": None, "q25": None, "q75": None, **mean_std(values)}
    return {"median": clean(values.median()), "q25": clean(values.quantile(0.25)),
            "q75": clean(values.quantile(0.75)), **mean_std(values)}


def stage_block(evaluations: pd.DataFrame, feature_stats: pd.DataFrame | None) -> dict[str, Any]:
    """Seed statistics of one group of models (one stage at one PLR/FLR/K)."""
    block = {name: mean_std(evaluations[name]) for name in ("train_loss", "train_acc", "test_loss", "test_acc")}
    block["diverged_fraction"] = clean(evaluations["diverged"].mean())
    if feature_stats is not None and len(feature_stats):
        row = feature_stats.iloc[0]
        ranks = sorted(int(c[5:-5]) for c in feature_stats.columns if c.startswith("rank_") and c.endswith("_mean"))
        block["sorted_feature_acc"] = {"mean": [clean(row[f"rank_{r}_mean"]) for r in ranks],
                                       "std": [clean(row[f"rank_{r}_std"]) for r in ranks]}
        block["sparsity_index"] = {"mean": clean(row["sparsity_mean"]), "std": clean(row["sparsity_std"]),
                                   "basis": row["basis"]}
        block["effective_features"] = {"mean": clean(row["n_eff_mean"]), "std": clean(row["n_eff_std"])}
    return block


def convergence_unit(cfg: Any) -> str:
    """What a logged step counts: iterations (synthetic) or epochs (image experiments)."""
    return "iterations" if getattr(cfg, "kind", "synthetic") == "synthetic" else "epochs"


def convergence_block(times: pd.Series, unit: str) -> dict[str, Any]:
    """Median and quartiles over seeds of a PLR's times to convergence (+inf = not converged: null when it decides)."""
    times = times.to_numpy(float)

    def finite(q: float) -> float | None:
        with np.errstate(invalid="ignore"):  # inf - inf between two censored seeds: NaN, i.e. null
            return clean(np.quantile(times, q)) if len(times) else None

    return {"unit": unit, "threshold": CONVERGED_LOSS, "median": finite(0.5), "q25": finite(0.25),
            "q75": finite(0.75), "n_converged": int(np.isfinite(times).sum()), "n": int(len(times))}


def dataset_info(store: ExperimentStore, cfg: Any) -> dict[str, Any] | None:
    """dataset.json of an image experiment (classes, sizes), None for the synthetic one."""
    path = store.root / "dataset.json"
    if getattr(cfg, "kind", "synthetic") == "synthetic" or not path.is_file():
        return None
    return json.loads(path.read_text())


def measurement_tables(store: ExperimentStore) -> dict[str, pd.DataFrame]:
    """The merged table DIR/<name>.parquet of every registered measurement that has one and a summary block."""
    return {name: store.table(name) for name, measurement in MEASUREMENTS.items()
            if measurement.summarize is not None and (store.root / f"{name}.parquet").is_file()}


def has_si_group(cfg: Any) -> bool:
    """Whether the experiment's model trains an SI group on the sphere (regimes are defined)."""
    return model_entry(cfg.model.name).has_si_group


def build_summary(store: ExperimentStore) -> dict[str, Any]:
    """The summary of a finished experiment, from its merged tables."""
    cfg = store.config()
    metrics, evaluations = store.table("metrics"), store.table("evaluations")
    features = store.table("features") if (store.root / "features.parquet").is_file() else None
    geometry = store.table("geometry") if (store.root / "geometry.parquet").is_file() else None
    floor = noise_floor(getattr(cfg.data, "n_probe", 0) or 1)
    feature_stats = (feature_table_summary(features, evaluations, floor=floor, tol=SUMMARY_TOL)
                     if features is not None and len(features) else None)
    info = dataset_info(store, cfg)
    # Chance is 0.5 for the binary synthetic task, 1/classes for images.
    criteria = RegimeCriteria(chance=1.0 / info["num_classes"]) if info else RegimeCriteria()
    if has_si_group(cfg):
        report = detect_regimes(metrics[metrics["stage"] == "pretrain"], evaluations, criteria)
        regimes, regime_of = report.to_json(), dict(zip(report.per_plr["plr"], report.per_plr["regime"]))
    else:  # regimes exist only on the sphere: a model without an SI group gets none
        regimes, regime_of = {"defined": False, "reason": NO_REGIME_REASON}, {}

    def stats_for(stage: str, plr: float, flr: float = math.nan, k: int = 0):
        """The feature statistics of one model group (None when the experiment has no features)."""
        if feature_stats is None:
            return None
        mask = (feature_stats["stage"] == stage) & np.isclose(feature_stats["plr"], plr) & (feature_stats["swa_k"] == k)
        mask &= feature_stats["flr"].isna() if math.isnan(flr) else np.isclose(feature_stats["flr"], flr)
        return feature_stats[mask]

    convergence = steps_to_convergence(metrics)
    unit = convergence_unit(cfg)
    per_plr = []
    for plr in cfg.pretrain.lrs:
        at_plr = evaluations[np.isclose(evaluations["plr"], plr)]
        entry: dict[str, Any] = {"plr": plr, "regime": regime_of.get(plr)}
        entry["pretrain"] = stage_block(at_plr[at_plr["stage"] == "pretrain"], stats_for("pretrain", plr))
        entry["finetune"] = {repr(flr): stage_block(at_plr[(at_plr["stage"] == "finetune")
                                                           & np.isclose(at_plr["flr"], flr)],
                                                    stats_for("finetune", plr, flr))
                             for flr in cfg.finetune.lrs}
        entry["swa"] = {str(k): stage_block(at_plr[(at_plr["stage"] == "swa") & (at_plr["swa_k"] == k)],
                                            stats_for("swa", plr, k=k)) for k in cfg.swa.ks}
        if geometry is not None and len(geometry):
            at = geometry[np.isclose(geometry["plr"], plr)]
            entry["geometry"] = {pair: {name: quantiles(group[name])
                                        for name in ("angle", "train_barrier", "test_barrier")}
                                 for pair, group in at.groupby("pair")}
        entry["convergence"] = convergence_block(
            convergence.loc[np.isclose(convergence["plr"], plr), "steps_to_convergence"], unit)
        per_plr.append(entry)
    add_curvature_blocks(store, per_plr)  # curvature per PLR (analysis/curvature.py), only when measured
    summary = {"version": __version__, "name": cfg.name, "config": to_dict(cfg),
               "plrs": list(cfg.pretrain.lrs), "flrs": list(cfg.finetune.lrs), "swa_ks": list(cfg.swa.ks),
               "regimes": regimes, "per_plr": per_plr,
               "measurements": measurement_blocks(measurement_tables(store))}
    summary["findings"] = build_findings(summary)
    if info:
        summary["dataset"] = info
        summary["chance"] = criteria.chance
    return summary


def write_summary(store: ExperimentStore) -> dict[str, Any]:
    """Build summary.json and write it into the experiment directory."""
    summary = build_summary(store)
    write_json(store.root / "summary.json", summary)
    return summary
