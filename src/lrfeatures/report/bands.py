"""The band figures of an image experiment, from bands.parquet (`lrfeatures fourier`).

Each figure shows one normalization: the default one when it was computed, else the first stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from ..errors import DataError
from ..store import ExperimentStore
from .load import Experiment, model_kinds, over_seeds
from .style import REGIME_COLORS, draw_regimes, finish_kind_panel, kind_panels, plot_mean_std, plr_axis, save

BAND_COLORS = {"background": "0.35", "low": "#1f77b4", "mid": "#2ca02c", "high": "#d62728"}
BAND_MODE_TEXT = {"keep": "only this band kept", "remove": "this band removed"}


def band_normalization(exp: Experiment) -> str:
    """The normalization the band figures show: the default one when it was computed, else the first stored."""
    from ..analysis.bands import BandsConfig

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
    fig, axes = kind_panels(kinds, 6.4, 4.3)
    for ax, kind in zip(axes.flat, kinds):
        selected = kind.select(rows)
        for name, lo, hi in band_order(bands):
            stats = over_seeds(selected[selected["band"] == name], ["plr"], "accuracy")
            plot_mean_std(ax, stats, color=BAND_COLORS.get(name), linewidth=1.6, label=band_label(name, lo, hi))
        finish_kind_panel(ax, axes, exp, kind, "test accuracy", chance_level(exp), linewidth=1.4,
                          label="all bands (test acc)")
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


def _show_image(ax, x: torch.Tensor, heading: str) -> None:
    """An image [C, H, W] in [0, 1] (grey for one channel), without ticks."""
    pixels = x.permute(1, 2, 0).numpy()
    one_channel = x.shape[0] == 1
    ax.imshow(pixels[..., 0] if one_channel else pixels, cmap="gray" if one_channel else None,
              interpolation="nearest")
    ax.set_title(heading, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_band_example(exp: Experiment, path: str | Path) -> Path:
    """One test image, each band's image (rescaled for display) and its log-magnitude spectrum with the bands."""
    from ..fourier import BandFilter, band_energy, l1_distance_grid, log_magnitude_spectrum

    if exp.bands is None:
        raise DataError("bands.parquet is missing; run `lrfeatures fourier DIR` to compute band accuracies")
    example = band_example(exp)
    image = example["image"].float() / 255 if example["image"].dtype == torch.uint8 else example["image"].float()
    _, height, width = image.shape
    band_filter = BandFilter(height, width)
    kept = band_filter(image[None])[:, 0]
    energy = band_energy(image, band_filter)
    share = (energy / energy.sum()).tolist()
    classes = (exp.summary.get("dataset") or {}).get("classes") or []
    label = int(example["label"][0]) if "label" in example else -1
    name = classes[label] if 0 <= label < len(classes) else f"class {label}"

    n = band_filter.n_bands
    fig, axes = plt.subplots(1, n + 2, figsize=(2.3 * (n + 2), 2.9), layout="constrained")
    _show_image(axes[0], image.clamp(0, 1), f"test image ({name})")
    for ax, band, x, part in zip(axes[1:], band_filter.bands, kept, share):
        if band.lo > 0:  # zero-mean: grey is 0, the largest deviation reaches black or white
            x = 0.5 + 0.5 * x / x.abs().max().clamp(min=1e-12)
        _show_image(ax, x.clamp(0, 1), f"{band_label(band.name, band.lo, band.hi)}\n{100 * part:.3g}% of energy")
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
     "whole images."),
    ("band_remove", plot_band_removal, "Test accuracy with one band removed (zeroed) and the others kept, per "
     "band, against the PLR."),
    ("band_heatmap", plot_band_heatmap, "Pre-trained models: keep-band (top) and remove-band (bottom) test "
     "accuracy per PLR and band, seed mean ± std; regime of each PLR above its column."),
    ("band_example", plot_band_example, "How bands are formed: one test image, its keep-band images (each "
     "rescaled around grey = 0 for display) and its log-magnitude spectrum with the band edges (diamonds: "
     "d = |kx| + |ky| is an L1 distance)."),
]


# ---------------------------------------------------------------- band importance (bands-redundant)

def band_feature_table(exp: Experiment) -> pd.DataFrame | None:
    """band_features.parquet of a bands-redundant experiment, or None when it has none."""
    from ..analysis.band_features import TABLE

    path = Path(exp.root) / f"{TABLE}.parquet"
    if not path.is_file():
        return None
    table = ExperimentStore(exp.root).table(TABLE)
    return None if table.empty else table


def has_band_features(exp: Experiment) -> bool:
    """Whether the experiment has single-band probe results (the band_features measurement)."""
    return band_feature_table(exp) is not None


def _band_feature_models(exp: Experiment) -> tuple[pd.DataFrame, list[str]]:
    """Per final model (diverged ones left out): keys, rank_r, winner, sparsity; and the band names."""
    from ..analysis.band_features import band_names, per_model_summary

    table = band_feature_table(exp)
    if table is None:
        raise DataError("band_features.parquet is missing; run a bands-redundant experiment "
                        "(e.g. the images-bands-quick preset) to measure band importance")
    per_model = per_model_summary(table)
    return per_model[~per_model["diverged"].astype(bool)], band_names(table)


def plot_band_importance(exp: Experiment, path: str | Path) -> Path:
    """Sorted single-band probe accuracies (rank 1 darkest) vs PLR per model kind, and the test accuracy."""
    from ..analysis.band_features import CHANCE

    per_model, names = _band_feature_models(exp)
    kinds = model_kinds(per_model)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.8, len(names)))
    fig, axes = kind_panels(kinds, 6.2, 4.4)
    for ax, kind in zip(axes.flat, kinds):
        rows = kind.select(per_model)
        for rank in range(len(names)):
            stats = over_seeds(rows, ["plr"], f"rank_{rank}")
            plot_mean_std(ax, stats, color=colors[rank], linewidth=1.4, label=f"rank {rank + 1}")
        finish_kind_panel(ax, axes, exp, kind, "probe accuracy", CHANCE, linewidth=1.4,
                          label="test accuracy (all bands)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), frameon=False,
               fontsize="small")
    fig.suptitle("Single-band probe accuracies, sorted per model (rank 1 = its most important band; "
                 "mean ± std over seeds)", fontsize=12)
    return save(fig, path)


def plot_band_winner(exp: Experiment, path: str | Path) -> Path:
    """Per PLR and model kind: the share of seeds whose most important band is each band (stacked bars)."""
    per_model, names = _band_feature_models(exp)
    kinds = model_kinds(per_model)
    fig, axes = kind_panels(kinds, 6.2, 3.8)
    for ax, kind in zip(axes.flat, kinds):
        rows = kind.select(per_model)
        share = pd.crosstab(rows["plr"], rows["winner"], normalize="index").reindex(columns=names, fill_value=0.0)
        plrs = share.index.to_numpy(float)
        # Bars a fixed fraction of a decade wide, so they stay apart on the log axis.
        left, right = plrs * 10 ** -0.12, plrs * 10 ** 0.12
        bottom = np.zeros(len(plrs))
        for name in names:
            ax.bar(left, share[name].to_numpy(), width=right - left, bottom=bottom, align="edge",
                   color=BAND_COLORS.get(name), label=name)
            bottom += share[name].to_numpy()
        plr_axis(ax, exp)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share of seeds")
        draw_regimes(ax, exp.regimes)
        ax.set_title(kind.name, pad=18, fontsize=11)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False, fontsize="small",
               title="band with the highest single-band probe accuracy")
    fig.suptitle("Which band each model relies on most, per PLR", fontsize=12)
    return save(fig, path)


BAND_FEATURE_FIGURES: list[tuple[str, Callable[[Experiment, Path], Path], str]] = [
    ("band_features", plot_band_importance, "Band importance on the bands-redundant task: each model's accuracy "
     "on the single-band probe sets (band i carries the class, the other bands an independent class), "
     "sorted per model, against the PLR, per model kind; black dashed: the same models on the task's test "
     "images; dotted: chance."),
    ("band_winner", plot_band_winner, "For each PLR and model kind, the share of seeds whose highest "
     "single-band probe accuracy is on each band (ties go to the lower band). For models at chance accuracy the "
     "winning band is decided by probe noise."),
]
