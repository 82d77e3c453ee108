"""The curvature figures, from curvature.parquet (drawn only when the experiment measured curvature).

Values are those at unit norm (the `*_unit` columns, comparable across ρ; see
lrfeatures.analysis.curvature), seed mean ± std per model kind, on the PLR axis with the regimes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import pandas as pd

from .load import Experiment, has_table, measurement_table, model_kinds, over_seeds
from .style import draw_regimes, legend_outside, plot_mean_std, plr_axis, save, title

KIND_COLORS = ["k", "#1f77b4", "#d62728", "#2ca02c"]  # PT, FT lowest FLR, FT highest FLR, SWA
PANELS = [("sharpness_unit", "sharpness λ₁ of P H P"), ("hessian_trace_unit", "Hessian trace (Hutchinson)"),
          ("fisher_trace_empirical_unit", "empirical Fisher trace"), ("fisher_trace_true_unit", "true Fisher trace")]


def curvature_table(exp: Experiment) -> pd.DataFrame:
    """curvature.parquet of the experiment (DataError when it was not measured)."""
    return measurement_table(exp, "curvature", "run with --set curvature.enabled=true")


def has_curvature(exp: Experiment) -> bool:
    """Whether the experiment has a non-empty curvature table."""
    return has_table(exp, "curvature")


def plot_by_kind(ax, exp: Experiment, table: pd.DataFrame, column: str, log: bool) -> None:
    """One line per model kind (PT, FT lowest / highest FLR, SWA) of `column` vs PLR, with the regimes."""
    for kind, color in zip(model_kinds(table), KIND_COLORS):
        stats = over_seeds(kind.select(table), ["plr"], column)
        if log:  # a log axis shows only positive means (a Hutchinson trace may be negative)
            stats = stats.assign(mean=stats["mean"].where(stats["mean"] > 0))
        plot_mean_std(ax, stats, color=color, linewidth=1.5, label=kind.name)
    plr_axis(ax, exp)
    if log:
        ax.set_yscale("log")
    draw_regimes(ax, exp.regimes)


def plot_curvature(exp: Experiment, path: str | Path) -> Path:
    """Sharpness, Hessian trace and both Fisher traces (at unit norm) vs PLR for PT, FT and SWA."""
    table = curvature_table(exp)
    fig, axes = plt.subplots(2, 2, figsize=(12.5, 8.4), layout="constrained")
    for ax, (column, label) in zip(axes.flat, PANELS):
        plot_by_kind(ax, exp, table, column, log=True)
        ax.set_ylabel(f"{label} at ‖θ‖ = 1")
        title(ax, label)
    legend_outside(axes[0, 1])
    space = ", ".join(sorted(table["space"].unique())) if "space" in table else "tangent"
    fig.suptitle(f"Curvature of the final models ({space} space; mean ± std over seeds)", fontsize=12)
    return save(fig, path)


def plot_grad_noise(exp: Experiment, path: str | Path) -> Path:
    """Gradient-noise ratio (mean minibatch ‖g_b‖² / full-batch ‖g‖²) vs PLR for PT, FT and SWA."""
    table = curvature_table(exp)
    fig, ax = plt.subplots(figsize=(8, 4.6), layout="constrained")
    plot_by_kind(ax, exp, table, "grad_noise_ratio", log=True)
    ax.set_ylabel("mean ‖g_batch‖² / ‖g_full‖²")
    title(ax, "Gradient-noise ratio (mean ± std over seeds)")
    legend_outside(ax)
    return save(fig, path)


CAPTIONS = {
    "curvature": "Curvature along the sphere (tangent-space Hessian P H P, P = I − θθᵀ/‖θ‖²) at unit norm "
                 "(value × ‖θ‖²): top eigenvalue by Lanczos, Hutchinson trace, empirical and true Fisher "
                 "traces, on the fixed training subset of curvature.samples points.",
    "grad_noise": "Gradient-noise ratio: mean squared norm of minibatch gradients (training batch size) over "
                  "the squared norm of the full-subset gradient; 1 = no noise.",
}
CURVATURE_FIGURES: list[tuple[str, Callable[[Experiment, Path], Path], str]] = [
    (key, draw, CAPTIONS[key]) for key, draw in (("curvature", plot_curvature), ("grad_noise", plot_grad_noise))]
