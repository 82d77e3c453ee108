"""Figures and a one-page HTML summary, rebuilt from an experiment's store (no retraining).

Every figure reads the store's tables (metrics, evaluations, features, geometry) and marks
the regimes of summary.json on its PLR axis: a dashed line at each boundary's estimate, a
grey band over its margin (the gap between the two PLRs it lies between), and the regime
names 1 / 2A / 2B / 3 written above the bands. Curves are seed means with a ± one std band;
geometry uses the median and the interquartile range. Diverged runs (diverged flag, or a
non-finite value) are left out of every statistic, so a PLR whose runs all diverged leaves
a gap in its line; the regime table counts them.

A figure whose data are missing (e.g. no geometry.parquet in an older run) raises DataError;
`write_report` catches it and says on the page why that figure is absent.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, work on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from . import __version__, seeding  # noqa: E402
from .analysis.features import MODEL_KEYS, SUMMARY_TOL, feature_table_summary, noise_floor  # noqa: E402
from .analysis.regimes import detect_regimes  # noqa: E402
from .config import dump_toml  # noqa: E402
from .data.synthetic import get_shape  # noqa: E402
from .errors import DataError, StoreError  # noqa: E402
from .store import ExperimentStore, atomic_write_bytes  # noqa: E402

REGIME_COLORS = {"1": "#1f77b4", "2": "#9467bd", "2A": "#2ca02c", "2B": "#ff7f0e", "3": "#d62728"}
REGIME_CMAPS = {"1": "Blues", "2": "Purples", "2A": "Greens", "2B": "Oranges", "3": "Reds"}
GEOMETRY_PAIRS = ("ft_low-ft_high", "swa-ft_high", "swa-ft_low")
DPI = 120


# ---------------------------------------------------------------- loading

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


# ---------------------------------------------------------------- statistics

def _clean(table: pd.DataFrame, column: str) -> pd.Series:
    """Values of `column` as floats, NaN for diverged rows and non-finite values."""
    values = table[column].astype(float).replace([np.inf, -np.inf], np.nan)
    if "diverged" in table:
        values = values.where(~table["diverged"].astype(bool))
    return values


def over_seeds(table: pd.DataFrame, by: list[str], column: str) -> pd.DataFrame:
    """Per `by` group: mean, std (ddof=1), median, q25, q75 of `column` over seeds (NaN-skipping)."""
    grouped = table.assign(_value=_clean(table, column)).groupby(by, sort=True)["_value"]
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


def swa_k_of_choice(ks) -> int | None:
    """K = 5 (the paper's SWA) if present, else the largest K."""
    ks = sorted(int(k) for k in ks)
    return None if not ks else 5 if 5 in ks else ks[-1]


def model_kinds(table: pd.DataFrame) -> list[ModelKind]:
    """PT, FT at the lowest and highest FLR, and SWA (K=5 or largest), as far as `table` has them."""
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
    """Seed mean/std of sorted feature accuracies and sparsity per model group (see analysis.features)."""
    if exp.features is None:
        raise DataError("features.parquet is missing or empty; run the feature probes of this "
                        "(synthetic) experiment to draw feature figures")
    features = exp.features
    if "diverged" in exp.evaluations and "diverged" not in features:
        # A diverged model's probe accuracies mean nothing: drop them like its test accuracy.
        flags = exp.evaluations[MODEL_KEYS + ["diverged"]].drop_duplicates(MODEL_KEYS, keep="last")
        features = features.merge(flags, on=MODEL_KEYS, how="left")  # NaN keys match NaN
        features["diverged"] = features["diverged"].fillna(False).astype(bool)
    features = features.assign(accuracy=_clean(features, "accuracy"))
    floor = noise_floor(exp.config.data.n_probe)  # the same convention as summary.json
    return feature_table_summary(features[list(exp.features.columns)], None, floor=floor, tol=SUMMARY_TOL)


# ---------------------------------------------------------------- drawing helpers

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


def plr_limits(exp: Experiment) -> tuple[float, float]:
    """The PLR axis range of every figure: the grid plus a little room on a log scale."""
    plrs = np.concatenate([exp.regimes.table["plr"].to_numpy(float),
                           exp.evaluations["plr"].to_numpy(float)])
    plrs = plrs[np.isfinite(plrs) & (plrs > 0)]
    if not len(plrs):
        return 1e-4, 1.0
    return float(plrs.min()) / 10 ** 0.15, float(plrs.max()) * 10 ** 0.15


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
        left = np.sqrt(below.max() * first) if len(below) else lo
        right = np.sqrt(last * above.min()) if len(above) else hi
        left, right = max(left, lo), min(right, hi)
        if left >= right:
            continue
        text = ax.text(np.sqrt(left * right), 1.01, name, transform=transform, ha="center",
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


# ---------------------------------------------------------------- figures

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


def _stage(exp: Experiment, stage: str) -> pd.DataFrame:
    return exp.evaluations[exp.evaluations["stage"] == stage]


def plot_accuracy_lines(exp: Experiment, path: str | Path, lines: list[tuple[str, pd.DataFrame]], cmap: str,
                        heading: str) -> Path:
    """Test accuracy vs PLR, one mean ± std line per group of models, with pre-training as reference."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for (label, rows), color in zip(lines, sequential_colors(cmap, len(lines))):
        plot_mean_std(ax, over_seeds(rows, ["plr"], "test_acc"), color=color, linewidth=1.3, label=label)
    plot_mean_std(ax, over_seeds(_stage(exp, "pretrain"), ["plr"], "test_acc"), color="k",
                  linewidth=2.2, label="pre-training")
    plr_axis(ax, exp)
    ax.set_ylabel("test accuracy")
    draw_regimes(ax, exp.regimes)
    title(ax, heading)
    legend_outside(ax)
    return save(fig, path)


def plot_test_acc_finetune(exp: Experiment, path: str | Path) -> Path:
    """Test accuracy vs PLR after fine-tuning, one line per FLR, with pre-training as reference."""
    finetune = _stage(exp, "finetune")
    if finetune.empty:
        raise DataError("evaluations hold no fine-tuned models; run fine-tuning to draw this figure")
    lines = [(f"FLR {flr:.3g}", finetune[np.isclose(finetune["flr"], flr)])
             for flr in sorted(finetune["flr"].dropna().unique())]
    return plot_accuracy_lines(exp, path, lines, "viridis", "Test accuracy after fine-tuning (mean ± std over seeds)")


def plot_swa_acc(exp: Experiment, path: str | Path) -> Path:
    """Test accuracy vs PLR of SWA over the last K checkpoints, one line per K, pre-training as reference."""
    swa = _stage(exp, "swa")
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
    ncols = 2 if len(kinds) > 1 else 1
    nrows = -(-len(kinds) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.6 * nrows), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, kind in zip(axes.flat, kinds):
        rows = kind.select(summary).sort_values("plr")
        for rank in range(n_features):
            mean, std = rows[f"rank_{rank}_mean"], rows[f"rank_{rank}_std"]
            plot_band(ax, rows["plr"], mean, mean - std, mean + std, color=colors[rank], linewidth=1,
                      markersize=2)
        test = over_seeds(kind.select(exp.evaluations), ["plr"], "test_acc")
        ax.plot(test["plr"], test["mean"], color="k", linestyle="--", linewidth=1.8)
        ax.axhline(0.5, color="0.5", linewidth=0.8, linestyle=":")
        plr_axis(ax, exp)
        ax.set_ylim(0.45, 1.0)
        ax.set_ylabel("accuracy")
        if ax not in list(axes[-1]):
            ax.set_xlabel("")  # the bottom row names the shared axis; keeps titles clear of it
        draw_regimes(ax, exp.regimes)
        title(ax, kind.name)
    for ax in list(axes.flat)[len(kinds):]:
        ax.set_visible(False)
    scale = plt.cm.ScalarMappable(cmap=matplotlib.colors.ListedColormap(colors),
                                  norm=matplotlib.colors.Normalize(0.5, n_features + 0.5))
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
    ax.set_ylabel("sparsity index")
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


def plot_training_curves(exp: Experiment, path: str | Path) -> Path:
    """Pre-training train loss and stochastic grad norm vs step, one curve per PLR coloured by regime."""
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
        ax.set_xlabel("pre-training step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{label.split(' (')[0]} (mean over seeds)", fontsize=11)
    present = [name for name, _, _ in exp.regimes.runs()]
    handles = [Line2D([], [], color=REGIME_COLORS.get(n, "0.5"), linewidth=2) for n in dict.fromkeys(present)]
    if handles:
        panels[1][0].legend(handles, [f"regime {n}" for n in dict.fromkeys(present)], loc="upper left",
                            bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    key = fig.add_subplot(grid[1, :])  # the PLR colour key, on the same log axis as other figures
    edges = np.sqrt(np.array(plrs[:-1]) * np.array(plrs[1:])) if len(plrs) > 1 else np.array([])
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


FIGURES: list[tuple[str, Callable[[Experiment, Path], Path], str]] = [
    ("tick", plot_tick, "One synthetic feature. Each class fills its region except a strip of the "
     "margin's width around the boundaries; an uninformative feature sits exactly on a boundary."),
    ("test_acc_finetune", plot_test_acc_finetune, "Test accuracy after fine-tuning each pre-trained "
     "model with every FLR (sequential colours), and after pre-training alone (black)."),
    ("swa_acc", plot_swa_acc, "Test accuracy of the average of the last K pre-training checkpoints, "
     "per K, with pre-training alone in black."),
    ("features", plot_features, "Each run's single-feature accuracies (one per feature), sorted in "
     "descending order, then averaged over seeds: rank 1 is the most important feature of each run. "
     "Dashed: test accuracy with all features. Sparse feature use shows as one high curve and the "
     "rest near chance (0.5)."),
    ("sparsity", plot_sparsity, "Sparsity index of the feature accuracies: 1 when one feature carries "
     "all the above-chance accuracy, 0 when all features are equally useful (NaN when none beats chance)."),
    ("geometry", plot_geometry, "Angular distance and linear-path error barriers between the solutions "
     "fine-tuned with the lowest and the highest FLR and the SWA model (median and interquartile "
     "range over seeds). Near-zero barriers: one basin."),
    ("training_curves", plot_training_curves, "Pre-training traces, one curve per PLR, coloured by "
     "the PLR's regime (darker = larger PLR within a regime; see the colour key)."),
]


# ---------------------------------------------------------------- band figures (image experiments)

BAND_COLORS = {"background": "0.35", "low": "#1f77b4", "mid": "#2ca02c", "high": "#d62728"}
BAND_MODE_TEXT = {"keep": "only this band kept", "remove": "this band removed"}


def band_normalization(exp: Experiment) -> str:
    """The normalization the band figures show: the default one when it was computed, else the first stored."""
    from .analysis.bands import BandsConfig

    if exp.bands is None:
        raise DataError("bands.parquet is missing; run `lrfeatures fourier DIR` to compute band accuracies")
    names = sorted(exp.bands["normalization"].unique())
    default = BandsConfig().normalization
    return default if default in names else names[0]


def band_rows(exp: Experiment) -> pd.DataFrame:
    """Rows of bands.parquet under the shown normalization."""
    return exp.bands[exp.bands["normalization"] == band_normalization(exp)]


def band_order(bands: pd.DataFrame) -> list[tuple[str, int, int]]:
    """(name, lo, hi) of each band, lowest frequencies first."""
    ranges = bands[["band", "band_lo", "band_hi"]].drop_duplicates("band").sort_values("band_lo")
    return [(r.band, int(r.band_lo), int(r.band_hi)) for r in ranges.itertuples()]


def band_label(name: str, lo: int, hi: int) -> str:
    """'mid (d 9–24)'."""
    return f"{name} (d {lo})" if lo == hi else f"{name} (d {lo}–{hi})"


def chance_level(exp: Experiment) -> float | None:
    """1 / number of classes of an image experiment (None if unknown)."""
    if exp.summary.get("chance"):
        return float(exp.summary["chance"])
    classes = (exp.summary.get("dataset") or {}).get("num_classes")
    return 1.0 / classes if classes else None


def plot_band_accuracy(exp: Experiment, path: str | Path, mode: str = "keep") -> Path:
    """Band accuracy vs PLR (one line per band) for PT, FT at the lowest / highest FLR and SWA."""
    bands = band_rows(exp)
    rows = bands[bands["mode"] == mode]
    kinds = model_kinds(rows)
    ncols = 2 if len(kinds) > 1 else 1
    nrows = -(-len(kinds) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.3 * nrows), squeeze=False,
                             sharey=True, layout="constrained")
    chance = chance_level(exp)
    for ax, kind in zip(axes.flat, kinds):
        selected = kind.select(rows)
        for name, lo, hi in band_order(bands):
            stats = over_seeds(selected[selected["band"] == name], ["plr"], "accuracy")
            plot_mean_std(ax, stats, color=BAND_COLORS.get(name), linewidth=1.6, label=band_label(name, lo, hi))
        test = over_seeds(kind.select(exp.evaluations), ["plr"], "test_acc")
        ax.plot(test["plr"], test["mean"], color="k", linestyle="--", linewidth=1.4, label="all bands (test acc)")
        if chance:
            ax.axhline(chance, color="0.5", linewidth=0.8, linestyle=":", label="chance")
        plr_axis(ax, exp)
        ax.set_ylabel("test accuracy")
        if ax not in list(axes[-1]):
            ax.set_xlabel("")
        draw_regimes(ax, exp.regimes)
        title(ax, kind.name)
    for ax in list(axes.flat)[len(kinds):]:
        ax.set_visible(False)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 6), frameon=False,
               fontsize="small")
    fig.suptitle(f"Test accuracy with {BAND_MODE_TEXT[mode]} (normalization: {band_normalization(exp)}; "
                 "mean ± std over seeds)", fontsize=12)
    return save(fig, path)


def plot_band_removal(exp: Experiment, path: str | Path) -> Path:
    """Remove-band accuracy vs PLR (one line per band) for PT, FT low / high and SWA."""
    return plot_band_accuracy(exp, path, mode="remove")


def plot_band_heatmap(exp: Experiment, path: str | Path) -> Path:
    """PLR x band heatmaps of pre-trained models' accuracy, keep-band and remove-band, values written in."""
    bands = band_rows(exp)
    pre = bands[bands["stage"] == "pretrain"]
    if pre.empty:
        raise DataError("bands.parquet holds no pre-trained models; run `lrfeatures fourier DIR` again")
    order = band_order(bands)
    plrs = sorted(pre["plr"].unique())
    chance = chance_level(exp) or 0.0
    fig, axes = plt.subplots(2, 1, figsize=(max(6.5, 0.95 * len(plrs) + 3), 2 * (0.55 * len(order) + 1.5)),
                             layout="constrained")
    regime_of = dict(zip(exp.regimes.table["plr"], exp.regimes.table["regime"]))
    vmax = max(float(np.nanmax(over_seeds(pre, ["mode", "band", "plr"], "accuracy")["mean"])), chance + 0.05)
    for ax, mode in zip(axes, ("keep", "remove")):
        stats = over_seeds(pre[pre["mode"] == mode], ["band", "plr"], "accuracy")
        mean = stats.pivot(index="band", columns="plr", values="mean").reindex(index=[b[0] for b in order],
                                                                              columns=plrs)
        std = stats.pivot(index="band", columns="plr", values="std").reindex_like(mean)
        image = ax.imshow(mean.to_numpy(float), cmap="viridis", vmin=chance, vmax=vmax, aspect="auto")
        for (i, j), value in np.ndenumerate(mean.to_numpy(float)):
            if not np.isfinite(value):
                continue
            spread = std.iat[i, j]
            text = f"{value:.2f}" + (f"\n±{spread:.2f}" if np.isfinite(spread) else "")
            dark = (value - chance) / max(vmax - chance, 1e-9) < 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(len(plrs)), [f"{p:.3g}" for p in plrs], rotation=45, ha="right")
        ax.set_yticks(range(len(order)), [band_label(*b) for b in order])
        ax.set_xlabel("pre-training learning rate (PLR)")
        for j, plr in enumerate(plrs):
            regime = next((r for p, r in regime_of.items() if np.isclose(p, plr)), None)
            if isinstance(regime, str) and regime:
                ax.text(j, -0.6, regime, ha="center", va="bottom", fontsize=9, fontweight="bold",
                        color=REGIME_COLORS.get(regime, "0.2"), clip_on=False)
        ax.set_title(f"pre-trained models, {BAND_MODE_TEXT[mode]}", pad=16, fontsize=11)
        fig.colorbar(image, ax=ax, pad=0.01, label="test accuracy")
    fig.suptitle(f"Band accuracy per PLR (normalization: {band_normalization(exp)}; mean ± std over seeds; "
                 f"colour scale starts at chance {chance:.2f})", fontsize=11)
    return save(fig, path)


def band_example(exp: Experiment) -> dict[str, torch.Tensor]:
    """The example test image stored by the band shards (`lrfeatures fourier`)."""
    from safetensors.torch import load_file

    for shard in ExperimentStore(exp.root).done_shards():
        path = exp.root / "shards" / shard / "example.safetensors"
        if shard.startswith("bands-") and path.is_file():
            return load_file(str(path))
    raise DataError("no band shard holds an example image; run `lrfeatures fourier DIR`")


def plot_band_example(exp: Experiment, path: str | Path) -> Path:
    """One test image, each band's image (rescaled for display) and its log-magnitude spectrum with the bands."""
    from .analysis.fourier import BandFilter, band_energy, l1_distance_grid, log_magnitude_spectrum

    if exp.bands is None:
        raise DataError("bands.parquet is missing; run `lrfeatures fourier DIR` to compute band accuracies")
    example = band_example(exp)
    image = example["image"].float() / 255 if example["image"].dtype == torch.uint8 else example["image"].float()
    channels, height, width = image.shape
    band_filter = BandFilter(height, width)
    kept = band_filter(image[None])[:, 0]
    energy = band_energy(image, band_filter)
    share = (energy / energy.sum()).tolist()
    classes = (exp.summary.get("dataset") or {}).get("classes") or []
    label = int(example["label"][0]) if "label" in example else -1
    name = classes[label] if 0 <= label < len(classes) else f"class {label}"

    def show(ax, x: torch.Tensor, heading: str) -> None:
        pixels = x.permute(1, 2, 0).numpy()
        ax.imshow(pixels[..., 0] if channels == 1 else pixels, cmap="gray" if channels == 1 else None,
                  interpolation="nearest")
        ax.set_title(heading, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])

    n = band_filter.n_bands
    fig, axes = plt.subplots(1, n + 2, figsize=(2.3 * (n + 2), 2.9), layout="constrained")
    show(axes[0], image.clamp(0, 1), f"test image ({name})")
    for ax, band, x, part in zip(axes[1:], band_filter.bands, kept, share):
        if band.lo > 0:  # zero-mean: grey is 0, the largest deviation reaches black or white
            x = 0.5 + 0.5 * x / x.abs().max().clamp(min=1e-12)
        show(ax, x.clamp(0, 1), f"{band_label(band.name, band.lo, band.hi)}\n{100 * part:.3g}% of energy")
    ax = axes[-1]
    ax.imshow(log_magnitude_spectrum(image).numpy(), cmap="magma", interpolation="nearest")
    distance = l1_distance_grid(height, width, shifted=True).numpy()
    edges = [band.hi + 0.5 for band in band_filter.bands[:-1]]
    ax.contour(distance, levels=edges, colors="white", linewidths=0.9)
    for band in band_filter.bands[1:]:  # each name on the diagonal, inside its ring
        d = (band.lo + band.hi) / 2
        ax.text(width // 2 + d / 2, height // 2 - d / 2, band.name, color="white", fontsize=8, ha="center",
                va="center", rotation=-45)
    ax.set_title("log(1+|DFT|), centred;\nband edges (L1 rings)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.suptitle("A test image split into its frequency bands (the background as it is; each other band "
                 "rescaled around grey = 0 for display)", fontsize=11)
    return save(fig, path)


BAND_FIGURES: list[tuple[str, Callable[[Experiment, Path], Path], str]] = [
    ("band_keep", plot_band_accuracy, "Test accuracy of each model on test images reduced to one frequency "
     "band (all other DFT coefficients zeroed), per band, against the PLR; black dashed: the same models on "
     "whole images. SPEC §5: regime 2A models rely on mid frequencies."),
    ("band_remove", plot_band_removal, "Test accuracy with one band removed (zeroed) and the others kept: a "
     "band the model relies on costs accuracy when removed."),
    ("band_heatmap", plot_band_heatmap, "Pre-trained models: keep-band (top) and remove-band (bottom) test "
     "accuracy per PLR and band, seed mean ± std; regime of each PLR above its column."),
    ("band_example", plot_band_example, "How bands are formed: one test image, its keep-band images (each "
     "rescaled around grey = 0 for display) and its log-magnitude spectrum with the band edges (diamonds: "
     "d = |kx| + |ky| is an L1 distance)."),
]


def band_table(exp: Experiment) -> pd.DataFrame:
    """Per PLR: regime and the pre-trained models' keep- and remove-band accuracy (mean ± std) per band."""
    bands = band_rows(exp)
    pre = bands[bands["stage"] == "pretrain"]
    regimes = exp.regimes.table
    rows = []
    for plr in sorted(pre["plr"].unique()):
        match = regimes[np.isclose(regimes["plr"], plr)]
        regime = match["regime"].iloc[0] if len(match) else None
        row = {"PLR": f"{plr:.3g}", "regime": regime if isinstance(regime, str) and regime else "–"}
        for mode in ("keep", "remove"):
            for name, _, _ in band_order(bands):
                stats = over_seeds(pre[(pre["mode"] == mode) & (pre["band"] == name)], ["plr"], "accuracy")
                row[f"{mode} {name}"] = _mean_std(stats, plr)
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- HTML page

def _format(value: float, digits: int = 3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _mean_std(stats: pd.DataFrame, plr: float) -> str:
    row = stats[np.isclose(stats["plr"], plr)]
    if row.empty or not np.isfinite(row["mean"].iloc[0]):
        return "–"
    std = row["std"].iloc[0]
    return _format(row["mean"].iloc[0]) + ("" if not np.isfinite(std) else f" ± {_format(std)}")


def regime_table(exp: Experiment) -> pd.DataFrame:
    """Per PLR: regime, confidence, diverged runs, test accuracy after PT / best FT / SWA, PT sparsity."""
    table = exp.regimes.table.set_index("plr")
    plrs = sorted(set(table.index) | set(exp.evaluations["plr"].unique()))
    pre = over_seeds(_stage(exp, "pretrain"), ["plr"], "test_acc")
    finetune = _stage(exp, "finetune")
    best_ft = (over_seeds(finetune, ["plr", "flr"], "test_acc").sort_values("mean", ascending=False)
               .drop_duplicates("plr") if not finetune.empty else None)
    k = swa_k_of_choice(_stage(exp, "swa")["swa_k"].unique())
    swa = over_seeds(_stage(exp, "swa").query("swa_k == @k"), ["plr"], "test_acc") if k else None
    try:
        sparsity = feature_summary(exp).query("stage == 'pretrain'")
        sparsity = sparsity.rename(columns={"sparsity_mean": "mean", "sparsity_std": "std"})
    except DataError:
        sparsity = None
    rows = []
    for plr in plrs:
        info = table.loc[plr] if plr in table.index else pd.Series(dtype=object)
        regime = info.get("regime")
        n_seeds, n_div = info.get("n_seeds"), info.get("n_diverged")
        best = "–"
        if best_ft is not None:
            match = best_ft[np.isclose(best_ft["plr"], plr)]
            if len(match) and np.isfinite(match["mean"].iloc[0]):
                best = f"{_format(match['mean'].iloc[0])} (FLR {match['flr'].iloc[0]:.3g})"
        rows.append({
            "PLR": f"{plr:.3g}",
            "regime": regime if isinstance(regime, str) and regime else "–",
            "confidence": _format(info.get("confidence", np.nan), 2),
            "diverged runs": "–" if n_seeds is None or pd.isna(n_seeds) else f"{int(n_div)}/{int(n_seeds)}",
            "test acc after PT": _mean_std(pre, plr),
            "best FT (max over FLRs)": best,
            f"SWA K={k}" if k else "SWA": _mean_std(swa, plr) if swa is not None else "–",
            "sparsity after PT": _mean_std(sparsity, plr) if sparsity is not None else "–",
        })
    return pd.DataFrame(rows)


def boundary_table(exp: Experiment) -> pd.DataFrame:
    """One row per boundary name: estimate, lower/upper PLR, margin (decades), confidence."""
    rows = []
    for name, b in exp.regimes.boundaries.items():
        b = b or {}
        cell = lambda key, fmt: "–" if b.get(key) is None else format(b[key], fmt)  # noqa: E731
        rows.append({"boundary": name, "estimate": cell("estimate", ".3g"),
                     "lower PLR": cell("lower_plr", ".3g"), "upper PLR": cell("upper_plr", ".3g"),
                     "margin (decades)": cell("margin", ".2f"), "confidence": cell("confidence", ".2f")})
    return pd.DataFrame(rows, columns=["boundary", "estimate", "lower PLR", "upper PLR",
                                       "margin (decades)", "confidence"])


def html_table(table: pd.DataFrame, regime_column: str | None = None) -> str:
    """An escaped HTML table; cells of `regime_column` get their regime colour."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = []
    for _, row in table.iterrows():
        cells = []
        for column, value in row.items():
            style = ""
            if column == regime_column and value in REGIME_COLORS:
                style = f' style="color:{REGIME_COLORS[value]};font-weight:bold"'
            cells.append(f"<td{style}>{html.escape(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1320px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } .meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1.5em 0 2.5em; } figure img { max-width: 100%; height: auto; }
figcaption { color: #444; font-size: 0.95em; margin-top: 0.4em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.note { color: #8a5300; }
"""


def render_html(exp: Experiment, figures: dict[str, Path | str]) -> str:
    """The self-contained page (figures as PNG data URIs); `figures` maps name -> PNG path or skip reason."""
    esc = html.escape
    name = exp.summary.get("name") or getattr(exp.config, "name", exp.root.name)
    parts = [f"<h1>lrfeatures report: {esc(str(name))}</h1>",
             f"<p class='meta'>report by lrfeatures {esc(__version__)}; summary.json by lrfeatures "
             f"{esc(str(exp.summary.get('version') or '– (none)'))}; directory {esc(str(exp.root))}</p>",
             "<p>Figures rebuilt from the stored tables, without retraining. Dashed lines mark the detected "
             "regime boundaries (grey: the PLR gap each lies in); the regimes are 1 (convergence), 2A/2B "
             "(chaotic equilibrium, sparse / not sparse) and 3 (divergence).</p>"]
    parts += [f"<p class='note'>{esc(note)}</p>" for note in exp.notes]
    parts += ["<h2>Regimes per PLR</h2>", html_table(regime_table(exp), regime_column="regime"),
              "<h2>Regime boundaries</h2>", html_table(boundary_table(exp))]
    if exp.bands is not None:
        parts += [f"<h2>Band accuracy after pre-training (normalization: {esc(band_normalization(exp))})</h2>",
                  "<p>Test accuracy with only one frequency band kept, and with one band removed "
                  "(mean ± std over seeds); see <code>bands.parquet</code>.</p>",
                  html_table(band_table(exp), regime_column="regime")]
    parts.append("<h2>Figures</h2>")
    captions = {key: caption for key, _, caption in FIGURES + BAND_FIGURES}
    for key, result in figures.items():
        if isinstance(result, Path):
            data = base64.b64encode(result.read_bytes()).decode("ascii")
            parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{esc(key)}'><figcaption>"
                         f"<b>{esc(key)}.png</b>: {esc(captions.get(key, ''))}</figcaption></figure>")
        else:
            parts.append(f"<p class='note'><b>{esc(key)}.png</b> not drawn: {esc(str(result))}</p>")
    parts += ["<h2>Resolved config</h2>", f"<pre>{esc(dump_toml(exp.config))}</pre>"]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(str(name))}: lrfeatures report</title><style>{CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def write_report(root: str | Path) -> Path:
    """Write DIR/figures/*.png and the self-contained DIR/report.html; return the HTML path."""
    exp = load_experiment(root)
    figures: dict[str, Path | str] = {}
    for key, draw, _ in FIGURES + (BAND_FIGURES if exp.bands is not None else []):
        try:
            figures[key] = draw(exp, exp.root / "figures" / f"{key}.png")
        except DataError as err:
            figures[key] = str(err)
            plt.close("all")
    path = exp.root / "report.html"
    atomic_write_bytes(path, render_html(exp, figures).encode("utf-8"))
    return path
