"""Drawing helpers every figure shares: the PLR axis, regime marks, colours, bands, saving.

Every figure marks the regimes of summary.json on its PLR axis: a dashed line at each
boundary's estimate, a grey band over its margin (the gap between the two PLRs it lies
between), and the regime names 1 / 2A / 2B / 3 written above the bands.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.transforms import blended_transform_factory

from ..analysis.summary import convergence_unit
from .load import Experiment, ModelKind, Regimes, over_seeds

REGIME_COLORS = {"1": "#1f77b4", "2": "#9467bd", "2A": "#2ca02c", "2B": "#ff7f0e", "3": "#d62728"}
REGIME_CMAPS = {"1": "Blues", "2": "Purples", "2A": "Greens", "2B": "Oranges", "3": "Reds"}
DPI = 120


def plot_band(ax, x, center, low, high, **line_kw):
    """A line through `center` with a shaded band from `low` to `high` in the same colour."""
    line_kw = {"marker": "o", "markersize": 3, **line_kw}
    (line,) = ax.plot(x, center, **line_kw)
    ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    return line


def plot_mean_std(ax, stats: pd.DataFrame, x: str = "plr", **line_kw):
    """Seed mean ± std of an `over_seeds` table."""
    return plot_band(ax, stats[x], stats["mean"], stats["mean"] - stats["std"],
                     stats["mean"] + stats["std"], **line_kw)


def plot_median_iqr(ax, stats: pd.DataFrame, x: str = "plr", **line_kw):
    """Seed median with its interquartile band, from an `over_seeds` table."""
    return plot_band(ax, stats[x], stats["median"], stats["q25"], stats["q75"], **line_kw)


def sequential_colors(cmap: str, n: int, low: float = 0.0, high: float = 0.85) -> list:
    """`n` colours along a colormap (the light end is cut so every line stays visible on white)."""
    return list(plt.get_cmap(cmap)(np.linspace(low, high, n))) if n else []


PLR_AXIS_RANGE = (1e-30, 1e30)


def plr_limits(exp: Experiment) -> tuple[float, float]:
    """The PLR axis range of every figure: the grid plus a little room on a log scale."""
    plrs = np.concatenate([exp.regimes.table["plr"].to_numpy(float),
                           exp.evaluations["plr"].to_numpy(float)])
    plrs = plrs[np.isfinite(plrs) & (plrs > 0)]
    if not len(plrs):
        return 1e-4, 1.0
    return padded_plr_range(plrs.min(), plrs.max())


def padded_plr_range(lo: float, hi: float) -> tuple[float, float]:
    """[lo, hi] with a little room on a log axis, clipped to PLR_AXIS_RANGE.

    matplotlib's log ticks overflow near 1e308: PLRs beyond the range stay in the tables, off the axis.
    """
    return max(float(lo) / 10 ** 0.15, PLR_AXIS_RANGE[0]), min(float(hi) * 10 ** 0.15, PLR_AXIS_RANGE[1])


def log_midpoint(a: float, b: float) -> float:
    """The geometric mean of two positive values, through logs (a product of two huge PLRs overflows)."""
    return float(np.exp((np.log(a) + np.log(b)) / 2))


def cadence_unit(exp: Experiment) -> str:
    """What one logged `step` of the metrics counts: 'step' (synthetic iterations) or 'epoch' (image runs)."""
    return {"iterations": "step", "epochs": "epoch"}.get(convergence_unit(exp.config), "step")


def plr_axis(ax, exp: Experiment) -> None:
    """Log-scale PLR x axis with the common limits and a light grid."""
    ax.set_xscale("log")
    ax.set_xlim(*plr_limits(exp))
    ax.set_xlabel("pre-training learning rate (PLR)")
    ax.grid(True, which="major", alpha=0.3)


def draw_regimes(ax, regimes: Regimes) -> None:
    """Boundaries as dashed lines with their margin shaded; regime names above the axes, in their bands."""
    lo, hi = ax.get_xlim()
    for boundary in regimes.boundaries.values():
        if not boundary or boundary.get("estimate") is None:
            continue
        estimate, margin = boundary["estimate"], boundary.get("margin") or 0.0
        ax.axvspan(estimate / 10 ** margin, estimate * 10 ** margin, color="0.5", alpha=0.15,
                   linewidth=0, zorder=0)
        ax.axvline(estimate, color="0.25", linestyle="--", linewidth=1, zorder=1)
    # A run's band reaches halfway (geometrically) to the neighbouring PLRs: its boundaries.
    plrs = regimes.table["plr"].to_numpy(float)
    transform = blended_transform_factory(ax.transData, ax.transAxes)
    renderer, previous = ax.figure.canvas.get_renderer(), None
    for name, first, last in regimes.runs():
        below, above = plrs[plrs < first], plrs[plrs > last]
        left = log_midpoint(below.max(), first) if len(below) else lo
        right = log_midpoint(last, above.min()) if len(above) else hi
        left, right = max(left, lo), min(right, hi)
        if left >= right:
            continue
        text = ax.text(log_midpoint(left, right), 1.01, name, transform=transform, ha="center",
                       va="bottom", fontsize=10, fontweight="bold",
                       color=REGIME_COLORS.get(name, "0.2"), clip_on=False)
        # Narrow neighbouring bands: shrink the name, then lift it, rather than overlap.
        if previous is not None and text.get_window_extent(renderer).x0 < previous.x1 + 2:
            text.set_fontsize(7)
            if text.get_window_extent(renderer).x0 < previous.x1 + 2:
                text.set_y(1.07)
        previous = text.get_window_extent(renderer)
    ax.set_xlim(lo, hi)


def legend_outside(ax, **kw) -> None:
    """A legend to the right of the axes, where it cannot hide data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small",
              frameon=False, **kw)


def title(ax, text: str) -> None:
    """Axes title, lifted above the regime names."""
    ax.set_title(text, pad=18, fontsize=11)


def save(fig, path: str | Path) -> Path:
    """Save a figure as PNG and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plr_colors(regimes: Regimes, plrs) -> list:
    """A colour per PLR: the hue of its regime, darker for larger PLRs inside the regime."""
    colors = {}
    for name, first, last in regimes.runs():
        inside = [p for p in plrs if first <= p <= last]
        for plr, color in zip(inside, sequential_colors(REGIME_CMAPS.get(name, "Greys"), len(inside),
                                                        0.4, 0.85)):
            colors[plr] = color
    return [colors.get(plr, "0.5") for plr in plrs]


def kind_panels(kinds: list[ModelKind], width: float, height: float):
    """(figure, axes): one panel per model kind, two per row, sharing the y axis; spare panels hidden."""
    ncols = 2 if len(kinds) > 1 else 1
    nrows = -(-len(kinds) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                             sharey=True, layout="constrained")
    for ax in list(axes.flat)[len(kinds):]:
        ax.set_visible(False)
    return fig, axes


def finish_kind_panel(ax, axes, exp: Experiment, kind: ModelKind, ylabel: str, chance: float | None,
                      **test_kw) -> None:
    """A `kind_panels` panel's test accuracy (dashed), chance (dotted), PLR axis, regimes and title."""
    test = over_seeds(kind.select(exp.evaluations), ["plr"], "test_acc")
    ax.plot(test["plr"], test["mean"], color="k", linestyle="--", **test_kw)
    if chance:
        ax.axhline(chance, color="0.5", linewidth=0.8, linestyle=":", label="chance")
    plr_axis(ax, exp)
    ax.set_ylabel(ylabel)
    if ax not in list(axes[-1]):
        ax.set_xlabel("")  # the bottom row names the shared axis; keeps titles clear of it
    draw_regimes(ax, exp.regimes)
    title(ax, kind.name)
