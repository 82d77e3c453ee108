"""Figures and a one-page HTML summary, rebuilt from an experiment's store (no retraining).

    load.py       the experiment, its regimes, statistics over seeds
    style.py      what every figure shares: PLR axis, regime marks, colours, saving
    synthetic.py  the figures of every experiment (feature shape, accuracies, features, geometry, ...)
    bands.py      the band figures of an image experiment
    curvature.py  the curvature figures, when the experiment measured curvature
    figures.py    which figures a report draws: each list with its experiment kinds and availability
    html.py       the tables and the self-contained page

A figure whose data are missing (e.g. no geometry.parquet in an older run) raises DataError;
`write_report` catches it and says on the page why that figure is absent.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

# Before any submodule imports pyplot: files only, never a window, so headless machines work.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..analysis.tables import swa_k_of_choice  # noqa: E402
from ..errors import DataError  # noqa: E402
from ..store import atomic_write_bytes  # noqa: E402
from .bands import (BAND_FIGURES, plot_band_accuracy, plot_band_example, plot_band_heatmap,  # noqa: E402
                    plot_band_removal)
from .curvature import CURVATURE_FIGURES, has_curvature, plot_curvature, plot_grad_noise  # noqa: E402
from .figures import FIGURE_SETS, FigureSet, figures_for, register_figures  # noqa: E402
from .html import band_table, boundary_table, html_table, regime_table, render_html  # noqa: E402
from .load import (Experiment, ModelKind, Regimes, feature_summary, load_experiment, model_kinds,  # noqa: E402
                   over_seeds)
from .synthetic import (FIGURES, plot_features, plot_geometry, plot_sparsity, plot_swa_acc,  # noqa: E402
                        plot_test_acc_finetune, plot_tick, plot_training_curves)

__all__ = ["BAND_FIGURES", "CURVATURE_FIGURES", "FIGURES", "FIGURE_SETS", "Experiment", "FigureSet", "ModelKind",
           "Regimes", "band_table", "boundary_table", "feature_summary", "figures_for", "has_curvature", "html_table",
           "load_experiment", "model_kinds", "over_seeds", "plot_band_accuracy", "plot_band_example",
           "plot_band_heatmap", "plot_band_removal", "plot_curvature", "plot_features", "plot_geometry",
           "plot_grad_noise", "plot_sparsity", "plot_swa_acc", "plot_test_acc_finetune", "plot_tick",
           "plot_training_curves", "regime_table", "register_figures", "render_html", "swa_k_of_choice", "write_report"]


def write_report(root: str | Path) -> Path:
    """Write DIR/figures/*.png and the self-contained DIR/report.html; return the HTML path."""
    exp = load_experiment(root)
    figures: dict[str, Path | str] = {}
    for key, draw, _ in figures_for(exp):  # only this kind's figures whose data exist
        try:
            figures[key] = draw(exp, exp.root / "figures" / f"{key}.png")
        except DataError as err:
            figures[key] = str(err)
            plt.close("all")  # a figure abandoned half-drawn would otherwise stay open
    path = exp.root / "report.html"
    atomic_write_bytes(path, render_html(exp, figures).encode("utf-8"))
    return path
