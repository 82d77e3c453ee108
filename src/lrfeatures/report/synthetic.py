"""The figures of every experiment: feature shape, accuracies, features, sparsity, geometry, training.

Curves are seed means with a ± one std band; geometry uses the median and the interquartile
range. A figure whose data are missing raises DataError, which `write_report` turns into a note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .. import seeding
from ..analysis.regimes import steps_to_convergence
from ..analysis.summary import convergence_block, convergence_unit
from ..analysis.tables import GEOMETRY_PAIRS
from ..data.synthetic import get_shape
from ..errors import DataError
from .load import Experiment, feature_summary, model_kinds, over_seeds
from .style import (REGIME_COLORS, cadence_unit, draw_regimes, log_midpoint, padded_plr_range, finish_kind_panel, kind_panels, legend_outside,
                    plot_band, plot_mean_std, plot_median_iqr, plr_axis, plr_colors, plr_limits, save,
                    sequential_colors, title)


def plot_tick(exp: Experiment, path: str | Path, n_points: int = 400, n_boundary: int = 150) -> Path:
    """One synthetic feature: samples by class, the class boundaries, the margin strips, boundary points."""
    data_cfg = getattr(exp.config, "data", None)
    if getattr(exp.config, "kind", None) != "synthetic" or not hasattr(data_cfg, "shape"):
        raise DataError("the feature-shape figure needs a synthetic experiment (data.shape)")
    shape, margin = get_shape(data_cfg.shape), data_cfg.margin
    gen = seeding.generator(exp.config.seeds.data[0], "report", "shape")
    labels = (torch.arange(n_points) % 2).float()  # balanced, so both classes show equally
    points, on_boundary = shape.sample(labels, margin, gen).numpy(), shape.boundary(n_boundary, gen).numpy()

    axis = np.linspace(-2, 2, 401)
    grid = torch.tensor(np.stack(np.meshgrid(axis, axis), -1), dtype=torch.float32)
    strip = (shape.distance_to_boundary(grid) < margin).numpy()
    fig, ax = plt.subplots(figsize=(6.2, 5))
    ax.contourf(axis, axis, strip.astype(float), levels=[0.5, 1.5], colors=["0.85"])
    for y, color, name in ((0, "#1f77b4", "class 0"), (1, "#d62728", "class 1")):
        chosen = labels.numpy() == y
        ax.scatter(points[chosen, 0], points[chosen, 1], s=9, color=color, label=f"{name} (train points)")
    ax.scatter(on_boundary[:, 0], on_boundary[:, 1], s=9, color="0.45", marker="x", linewidths=0.8,
               label="uninformative (on a boundary)")
    if hasattr(shape, "inside"):  # polyline shapes: draw the exact boundary segments
        for (x0, y0), (x1, y1) in shape.inside.tolist():
            ax.plot([x0, x1], [y0, y1], color="k", linewidth=1.2)
    else:
        ax.contour(axis, axis, shape.label_of(grid).numpy(), levels=[0.5], colors="k", linewidths=1.2)
    if shape.name == "tick":
        style = {"rotation": 45, "fontsize": 9, "ha": "center", "va": "center", "zorder": 5,
                 "bbox": {"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5}}
        ax.text(1.45, 1.05, r"$x_2=|x_1|$", **style)
        ax.text(1.2, -1.3, r"$x_2=|x_1|-2$", **style)
    handles, names = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="k"), Patch(color="0.85")]
    names += ["class boundary", f"empty margin strip (±{margin:g})"]
    ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    ax.set(xlim=(-2, 2), ylim=(-2, 2), aspect="equal", xlabel="$x_1$", ylabel="$x_2$")
    ax.set_title(f"One '{shape.name}' feature: {n_points} samples, margin {margin:g}", fontsize=11)
    return save(fig, path)


def plot_accuracy_lines(exp: Experiment, path: str | Path, lines: list[tuple[str, pd.DataFrame]], cmap: str,
                        heading: str) -> Path:
    """Test accuracy vs PLR, one mean ± std line per group of models, with pre-training as reference."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for (label, rows), color in zip(lines, sequential_colors(cmap, len(lines))):
        plot_mean_std(ax, over_seeds(rows, ["plr"], "test_acc"), color=color, linewidth=1.3, label=label)
    plot_mean_std(ax, over_seeds(exp.stage("pretrain"), ["plr"], "test_acc"), color="k",
                  linewidth=2.2, label="pre-training")
    plr_axis(ax, exp)
    ax.set_ylabel("test accuracy")
    draw_regimes(ax, exp.regimes)
    title(ax, heading)
    legend_outside(ax)
    return save(fig, path)


def plot_test_acc_finetune(exp: Experiment, path: str | Path) -> Path:
    """Test accuracy vs PLR after fine-tuning, one line per FLR, with pre-training as reference."""
    finetune = exp.stage("finetune")
    if finetune.empty:
        raise DataError("evaluations hold no fine-tuned models; run fine-tuning to draw this figure")
    lines = [(f"FLR {flr:.3g}", finetune[np.isclose(finetune["flr"], flr)])
             for flr in sorted(finetune["flr"].dropna().unique())]
    return plot_accuracy_lines(exp, path, lines, "viridis", "Test accuracy after fine-tuning (mean ± std over seeds)")


def plot_swa_acc(exp: Experiment, path: str | Path) -> Path:
    """Test accuracy vs PLR of SWA over the last K checkpoints, one line per K, pre-training as reference."""
    swa = exp.stage("swa")
    if swa.empty:
        raise DataError("evaluations hold no SWA models; set swa.ks and run SWA to draw this figure")
    lines = [(f"SWA, K={k}", swa[swa["swa_k"] == k]) for k in sorted(int(k) for k in swa["swa_k"].unique())]
    return plot_accuracy_lines(exp, path, lines, "plasma",
                               "Test accuracy of SWA over the last K checkpoints (mean ± std over seeds)")


def plot_features(exp: Experiment, path: str | Path) -> Path:
    """Sorted single-feature accuracies (rank 1 darkest) vs PLR per model kind, and the test accuracy."""
    summary = feature_summary(exp)
    kinds = model_kinds(summary)
    n_features = sum(c.startswith("rank_") and c.endswith("_mean") for c in summary.columns)
    colors = sequential_colors("viridis", n_features)
    fig, axes = kind_panels(kinds, 6.2, 4.6)
    for ax, kind in zip(axes.flat, kinds):
        rows = kind.select(summary).sort_values("plr")
        for rank in range(n_features):
            mean, std = rows[f"rank_{rank}_mean"], rows[f"rank_{rank}_std"]
            plot_band(ax, rows["plr"], mean, mean - std, mean + std, color=colors[rank], linewidth=1,
                      markersize=2)
        finish_kind_panel(ax, axes, exp, kind, "accuracy", 0.5, linewidth=1.8)
        ax.set_ylim(0.45, 1.0)
    scale = plt.cm.ScalarMappable(cmap=ListedColormap(colors), norm=Normalize(0.5, n_features + 0.5))
    bar = fig.colorbar(scale, ax=axes, shrink=0.6, pad=0.02, ticks=sorted({1, *range(4, n_features + 1, 4)}))
    bar.set_label("feature rank (1 = most important)")
    bar.ax.invert_yaxis()
    fig.legend([Line2D([], [], color="k", linestyle="--"), Line2D([], [], color="0.5", linestyle=":")],
               ["test accuracy of the model (all features)", "chance"], loc="outside lower center",
               ncol=2, frameon=False, fontsize="small")
    fig.suptitle("Single-feature test accuracies, sorted per run (mean ± std over seeds)", fontsize=12)
    return save(fig, path)


def plot_sparsity(exp: Experiment, path: str | Path) -> Path:
    """Sparsity index (1 = one feature, 0 = all equal) vs PLR for PT, FT low/high FLR and SWA."""
    summary = feature_summary(exp)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind, color in zip(model_kinds(summary), ["k", "#1f77b4", "#ff7f0e", "#2ca02c"]):
        rows = kind.select(summary).sort_values("plr")
        mean, std = rows["sparsity_mean"], rows["sparsity_std"]
        plot_band(ax, rows["plr"], mean, mean - std, mean + std, color=color, linewidth=1.5, label=kind.name)
    plr_axis(ax, exp)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel(f"sparsity index ({summary['basis'].iloc[0]} basis)")
    draw_regimes(ax, exp.regimes)
    title(ax, "Sparsity of feature use (mean ± std over seeds)")
    legend_outside(ax)
    return save(fig, path)


def plot_geometry(exp: Experiment, path: str | Path) -> Path:
    """Angle and train/test error barriers vs PLR for the three solution pairs (median and IQR)."""
    if exp.geometry is None:
        raise DataError("geometry.parquet is missing (older run); run the geometry analysis to add it")
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.2), layout="constrained")
    pairs = [p for p in GEOMETRY_PAIRS if p in set(exp.geometry["pair"])]
    pairs += sorted(set(exp.geometry["pair"]) - set(pairs))
    columns = [("angle", "angular distance (rad)"), ("train_barrier", "train error barrier (%)"),
               ("test_barrier", "test error barrier (%)")]
    for ax, (column, label) in zip(axes, columns):
        for pair, color in zip(pairs, ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]):
            stats = over_seeds(exp.geometry[exp.geometry["pair"] == pair], ["plr"], column)
            plot_median_iqr(ax, stats, color=color, linewidth=1.5, label=pair)
        plr_axis(ax, exp)
        ax.set_ylabel(label)
        draw_regimes(ax, exp.regimes)
        title(ax, label.split(" (")[0])
    legend_outside(axes[-1], title="pair")
    fig.suptitle("Geometry of the reached solutions (median and interquartile range over seeds)",
                 fontsize=12)
    return save(fig, path)


def convergence_table(exp: Experiment) -> pd.DataFrame:
    """Per PLR: the summary's convergence block (median, quartiles, n_converged, n), from the metrics."""
    times, unit = steps_to_convergence(exp.metrics), convergence_unit(exp.config)
    rows = [{"plr": plr, **convergence_block(group["steps_to_convergence"], unit)}
            for plr, group in times.groupby("plr", sort=True)]
    return pd.DataFrame(rows).astype({"median": float, "q25": float, "q75": float})


def plot_convergence(exp: Experiment, path: str | Path) -> Path:
    """Pre-training time to convergence (median and IQR over seeds) vs PLR, up to just past the 1/2 boundary."""
    table = convergence_table(exp)
    if not table["n_converged"].any():
        raise DataError("no pre-training run reached the convergence loss; no PLR is in regime 1 here")
    boundary = (exp.regimes.boundaries.get("1/2") or {}).get("upper_plr")
    if boundary is not None:  # the figure is about the approach to the boundary
        table = table[table["plr"] <= boundary * 10 ** 0.5]
    if not table["n_converged"].any():
        raise DataError("no pre-training run below the 1/2 boundary reached the convergence loss")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    plot_band(ax, table["plr"], table["median"], table["q25"], table["q75"], color="#1f77b4", linewidth=1.5,
              label="median over seeds (band: interquartile range)")
    for _, row in table.iterrows():
        y = row["median"] if np.isfinite(row["median"]) else np.nanmax(table["q75"].to_numpy(float), initial=1.0)
        ax.annotate(f"{row['n_converged']}/{row['n']}", (row["plr"], y), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=7, color="0.3")
    plr_axis(ax, exp)
    ax.set_xlim(*padded_plr_range(table["plr"].min(), table["plr"].max()))
    values = table[["median", "q25", "q75"]].to_numpy(float)
    values = values[np.isfinite(values)]
    if values.size and (values > 0).all():  # nothing to draw, or a run converged at step 0: a linear axis
        ax.set_yscale("log")
    unit = table["unit"].iloc[0]
    ax.set_ylabel(f"{unit} to train loss < {table['threshold'].iloc[0]:g}")
    draw_regimes(ax, exp.regimes)
    title(ax, f"Pre-training {unit} to convergence (labels: seeds converged / seeds)")
    legend_outside(ax)
    return save(fig, path)


def plot_training_curves(exp: Experiment, path: str | Path) -> Path:
    """Pre-training train loss and stochastic grad norm vs step or epoch, one curve per PLR coloured by regime."""
    pre = exp.metrics[exp.metrics["stage"] == "pretrain"]
    if pre.empty:
        raise DataError("metrics hold no pre-training rows; run pre-training to draw this figure")
    grad_column = "grad_norm_mean" if "grad_norm_mean" in pre and pre["grad_norm_mean"].notna().any() \
        else "grad_norm"
    plrs = sorted(pre["plr"].unique())
    colors = plr_colors(exp.regimes, plrs)
    fig = plt.figure(figsize=(13, 5.6))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 0.07], hspace=0.55, wspace=0.22)
    panels = [(fig.add_subplot(grid[0, 0]), "train_loss", "train loss"),
              (fig.add_subplot(grid[0, 1]), grad_column, "stochastic grad norm (mean since last log)")]
    for ax, column, label in panels:
        for plr, color in zip(plrs, colors):
            stats = over_seeds(pre[pre["plr"] == plr], ["step"], column)
            positive = stats["mean"].where(stats["mean"] > 0)  # log scale
            ax.plot(stats["step"], positive, color=color, linewidth=1.1)
        ax.set_yscale("log")
        ax.set_xlabel(f"pre-training {cadence_unit(exp)}")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{label.split(' (')[0]} (mean over seeds)", fontsize=11)
    present = [name for name, _, _ in exp.regimes.runs()]
    handles = [Line2D([], [], color=REGIME_COLORS.get(n, "0.5"), linewidth=2) for n in dict.fromkeys(present)]
    if handles:
        panels[1][0].legend(handles, [f"regime {n}" for n in dict.fromkeys(present)], loc="upper left",
                            bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    key = fig.add_subplot(grid[1, :])  # the PLR colour key, on the same log axis as other figures
    edges = np.array([log_midpoint(a, b) for a, b in zip(plrs[:-1], plrs[1:])])
    lo, hi = plr_limits(exp)
    edges = np.concatenate([[lo], edges, [hi]])
    for left, right, color in zip(edges[:-1], edges[1:], colors):
        key.axvspan(left, right, color=color, linewidth=0)
    key.set_xscale("log")
    key.set_xlim(lo, hi)
    key.set_yticks([])
    key.set_xlabel("colour key: pre-training learning rate (PLR) of each curve")
    draw_regimes(key, exp.regimes)
    return save(fig, path)


Figure = tuple[str, Callable[[Experiment, Path], Path], str]  # (key, draw, caption)

SHAPE_FIGURES: list[Figure] = [
    ("tick", plot_tick, "One synthetic feature. Each class fills its region except a strip of the "
     "margin's width around the boundaries; an uninformative feature sits exactly on a boundary."),
]
ACCURACY_FIGURES: list[Figure] = [
    ("test_acc_finetune", plot_test_acc_finetune, "Test accuracy after fine-tuning each pre-trained "
     "model with every FLR (sequential colours), and after pre-training alone (black)."),
    ("swa_acc", plot_swa_acc, "Test accuracy of the average of the last K pre-training checkpoints, "
     "per K, with pre-training alone in black."),
]
FEATURE_FIGURES: list[Figure] = [
    ("features", plot_features, "Each run's single-feature accuracies (one per feature), sorted in "
     "descending order, then averaged over seeds: rank 1 is the most important feature of each run. "
     "Dashed: test accuracy with all features. Sparse feature use shows as one high curve and the "
     "rest near chance (0.5)."),
    ("sparsity", plot_sparsity, "Sparsity index of each model's single-feature probe margins (mean over "
     "seeds ± std): 1 when one feature carries the model, 0 when its use is no more concentrated than "
     "probe noise (dense use reads 0 too); missing for a dead model. Tables written before the margin "
     "column show the earlier accuracy-based index (the axis label says which)."),
]
TRAINING_FIGURES: list[Figure] = [
    ("geometry", plot_geometry, "Angular distance and linear-path error barriers between the solutions "
     "fine-tuned with the lowest and the highest FLR and the SWA model (median and interquartile "
     "range over seeds); a barrier is the largest rise of the error along the straight path between two "
     "solutions above the line joining their errors."),
    ("convergence", plot_convergence, "Pre-training time to convergence, the first logged step or epoch "
     "(the axis says which) with a train loss below the threshold, per PLR up to just past the 1/2 boundary: "
     "median and "
     "interquartile range over seeds, a seed that never converged counting as longer than the run "
     "(so the median is missing where half of the seeds or more did not converge)."),
    ("training_curves", plot_training_curves, "Pre-training train loss and stochastic gradient norm "
     "(seed means) against the logged step or epoch (the axis says which), one curve per PLR, coloured by "
     "the PLR's regime (darker = larger PLR within a regime; see the colour key)."),
]
# Every figure of this module, in page order (which kinds draw which: report/figures.py).
FIGURES: list[Figure] = SHAPE_FIGURES + ACCURACY_FIGURES + FEATURE_FIGURES + TRAINING_FIGURES
