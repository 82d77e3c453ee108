"""The filter-norm histogram figure, from filter_norms.parquet (analysis/filter_norms.py).

One panel per regime (columns) and pre-training checkpoint (rows: the end of each earlier stage
of two-stage pre-training, then the end of pre-training): the histogram of every filter's norm
over its layer's mean, pooled over the layers, PLRs and seeds of the regime (a sum of the
table's fixed-bin counts, drawn as a density).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..analysis.filter_norms import BIN_COLUMNS, BIN_WIDTH, N_BINS
from ..errors import DataError
from .load import Experiment, has_table, measurement_table
from .style import REGIME_COLORS, save

EDGES = np.arange(N_BINS + 2) * BIN_WIDTH  # the last bin (ratios >= 3) is drawn as [3, 3.1)


def filter_norm_table(exp: Experiment) -> pd.DataFrame:
    """filter_norms.parquet of the experiment (DataError when it was not measured)."""
    return measurement_table(exp, "filter_norms", "the analyze stage writes it")


def has_filter_norms(exp: Experiment) -> bool:
    """Whether the experiment has a non-empty filter-norm table."""
    return has_table(exp, "filter_norms")


def regime_labels(exp: Experiment, plrs: pd.Series) -> pd.Series:
    """The regime name of each PLR (\"all PLRs\" where the experiment has no regimes)."""
    table = exp.regimes.table
    known = table.dropna(subset=["plr"])
    labels = []
    for plr in plrs.to_numpy(float):
        match = known[np.isclose(known["plr"].to_numpy(float), plr, rtol=1e-4)]
        name = match["regime"].iloc[0] if len(match) else None
        labels.append(name if isinstance(name, str) and name else "all PLRs")
    return pd.Series(labels, index=plrs.index)


def checkpoint_names(stages: list[int]) -> dict[int, str]:
    """Row titles: 'end of stage i' for earlier stages, 'end of pre-training' for the last."""
    last = max(stages)
    return {s: "end of pre-training" if s == last else f"end of stage {s + 1}" for s in stages}


def plot_filter_norms(exp: Experiment, path: str | Path) -> Path:
    """Histograms of mean-normalized filter norms per regime, at the end of each pre-training stage."""
    table = filter_norm_table(exp)
    table = table[table["stage"] == "pretrain"]
    if table.empty:
        raise DataError("filter_norms.parquet has no pre-trained models")
    table = table.assign(regime=regime_labels(exp, table["plr"]),
                         pretrain_stage=table.get("pretrain_stage", pd.Series(0, index=table.index)).fillna(0))
    order = [name for name, _, _ in exp.regimes.runs()]
    regimes = list(dict.fromkeys([r for r in order if r in set(table["regime"])] + sorted(set(table["regime"]))))
    stages = sorted(int(s) for s in table["pretrain_stage"].unique())
    names = checkpoint_names(stages)
    fig, axes = plt.subplots(len(stages), len(regimes), figsize=(3.2 * len(regimes) + 0.6, 2.6 * len(stages) + 0.6),
                             layout="constrained", squeeze=False, sharex=True)
    for i, stage in enumerate(stages):
        for j, regime in enumerate(regimes):
            ax, rows = axes[i, j], table[(table["pretrain_stage"] == stage) & (table["regime"] == regime)]
            counts = rows[BIN_COLUMNS].to_numpy(float).sum(0)
            if counts.sum() > 0:
                density = counts / (counts.sum() * BIN_WIDTH)
                ax.stairs(density, EDGES, fill=True, alpha=0.35, color=REGIME_COLORS.get(regime, "0.4"))
                ax.stairs(density, EDGES, color=REGIME_COLORS.get(regime, "0.2"), linewidth=1.2)
                models = rows.drop_duplicates(["plr", "data_seed", "train_seed"]).shape[0]
                ax.text(0.97, 0.93, f"{models} models, {rows['layer'].nunique()} layers", transform=ax.transAxes,
                        ha="right", va="top", fontsize=8)
            ax.axvline(1.0, color="0.3", linestyle=":", linewidth=1)
            ax.set_title(f"regime {regime}" if regime != "all PLRs" else regime, fontsize=10,
                         color=REGIME_COLORS.get(regime, "k"))
            if j == 0:
                ax.set_ylabel(f"{names[stage]}\ndensity")
            if i == len(stages) - 1:
                ax.set_xlabel("filter norm / layer mean (last bin: ≥ 3)")
    fig.suptitle("Filter norms over their layer's mean, pre-trained models", fontsize=12)
    return save(fig, path)


CAPTION = ("Filter-norm histograms: each filter's L2 norm (a convolution's output-channel kernel; for the MLP a "
           "hidden neuron's weight row) over its layer's mean filter norm, pooled over the layers, PLRs and seeds "
           "of each regime, at the end of pre-training and, with two-stage pre-training, at the end of each "
           "earlier stage. 1 (dotted) = every filter of the layer has the same norm.")
FILTER_NORM_FIGURES: list[tuple[str, Callable[[Experiment, Path], Path], str]] = [
    ("filter_norms", plot_filter_norms, CAPTION)]
