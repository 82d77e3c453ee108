"""Which figures a report draws: lists of (key, draw, caption), each with its kinds and availability.

A list belongs to some experiment kinds (None: every kind) and may need data that only some
runs hold (e.g. bands.parquet, written by `lrfeatures fourier`). A report draws only the lists of
its own kind whose data are available, so an image report never mentions the synthetic feature
figures. Inside a drawn list, a figure whose data are missing still says why on the page (that is
news about this run). Add a list with one line in FIGURE_SETS, or `register_figures` from a plugin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .bands import BAND_FEATURE_FIGURES, BAND_FIGURES, has_band_features
from .curvature import CURVATURE_FIGURES, has_curvature
from .filter_norms import FILTER_NORM_FIGURES, has_filter_norms
from .load import Experiment
from .synthetic import ACCURACY_FIGURES, FEATURE_FIGURES, SHAPE_FIGURES, TRAINING_FIGURES, Figure


def always(exp: Experiment) -> bool:
    """Available in every run of the set's kinds."""
    return True


def has_bands(exp: Experiment) -> bool:
    """Whether `lrfeatures fourier` wrote band accuracies (bands.parquet)."""
    return exp.bands is not None


@dataclass(frozen=True)
class FigureSet:
    """A list of figures, the experiment kinds it belongs to (None: all), and when its data exist."""

    figures: list[Figure]
    kinds: tuple[str, ...] | None = None
    available: Callable[[Experiment], bool] = always

    def applies(self, exp: Experiment) -> bool:
        """Whether a report of `exp` draws this set."""
        kind = getattr(exp.config, "kind", "synthetic")
        return (self.kinds is None or kind in self.kinds) and self.available(exp)


FIGURE_SETS: list[FigureSet] = [
    FigureSet(SHAPE_FIGURES, ("synthetic",)),
    FigureSet(ACCURACY_FIGURES),
    FigureSet(FEATURE_FIGURES, ("synthetic",)),
    FigureSet(TRAINING_FIGURES),
    FigureSet(BAND_FIGURES, ("images",), has_bands),
    FigureSet(BAND_FEATURE_FIGURES, ("images",), has_band_features),
    FigureSet(CURVATURE_FIGURES, None, has_curvature),
    FigureSet(FILTER_NORM_FIGURES, None, has_filter_norms),
]


def register_figures(figure_set: FigureSet) -> FigureSet:
    """Add a set of figures to every report it applies to (e.g. a plugin's experiment kind)."""
    FIGURE_SETS.append(figure_set)
    return figure_set


def figures_for(exp: Experiment) -> list[Figure]:
    """The figures a report of `exp` draws, in page order."""
    return [figure for figure_set in FIGURE_SETS if figure_set.applies(exp) for figure in figure_set.figures]


def all_captions() -> dict[str, str]:
    """Every registered figure's caption, by key."""
    return {key: caption for figure_set in FIGURE_SETS for key, _, caption in figure_set.figures}
