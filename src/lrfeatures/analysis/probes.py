"""Measurements on trained weights: single-feature probe accuracies and minima geometry.

Both take an `evaluate(theta, frozen, x, y) -> (loss [M], accuracy [M])` function, so they
work for any model family the engine can evaluate; they never train.
"""

from __future__ import annotations

from typing import Callable

import pandas as pd
import torch

from .geometry import angular_distance, error_barrier, interpolation_path

Evaluate = Callable[[torch.Tensor, dict, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
GEOMETRY_POINTS = 21  # points on each linear interpolation path (SPEC §6)
GEOMETRY_PAIRS = ("ft_low-ft_high", "swa-ft_high", "swa-ft_low")


def feature_table(evaluate: Evaluate, keys: pd.DataFrame, weights: torch.Tensor, frozen: dict,
                  x_probe: torch.Tensor, y_probe: torch.Tensor) -> pd.DataFrame:
    """Accuracy of every model on each single-feature probe set (one row per model and feature)."""
    tables = []
    for feature in range(x_probe.shape[0]):
        accuracy = evaluate(weights, frozen, x_probe[feature], y_probe[feature])[1]
        tables.append(keys.assign(feature=feature, accuracy=accuracy.cpu().numpy()))
    return pd.concat(tables, ignore_index=True)


def geometry_swa_k(ks: list[int]) -> int:
    """The SWA K used for geometry: 5 as in the paper, else the nearest available."""
    return min(ks, key=lambda k: (abs(k - 5), k))


def geometry_table(evaluate: Evaluate, keys: pd.DataFrame, ft_low: torch.Tensor, ft_high: torch.Tensor,
                   swa: torch.Tensor, frozen: dict, splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   n_points: int = GEOMETRY_POINTS) -> pd.DataFrame:
    """Angle and train/test error barrier (in %) of the three solution pairs of every model row."""
    pairs = dict(zip(GEOMETRY_PAIRS, [(ft_low, ft_high), (swa, ft_high), (swa, ft_low)]))
    rows = []
    for pair, (first, second) in pairs.items():
        alphas, path = interpolation_path(first, second, n_points)  # [A, Q, P]
        path_frozen = {name: t.repeat(n_points, *[1] * (t.dim() - 1)) for name, t in frozen.items()}
        row = keys.assign(pair=pair, angle=angular_distance(first, second).cpu().numpy())
        for split, (x, y) in splits.items():
            accuracy = evaluate(path.flatten(0, 1), path_frozen, x, y)[1]
            errors = (100 * (1 - accuracy)).view(n_points, -1).cpu().double().numpy()
            row[f"{split}_barrier"] = [error_barrier(errors[:, q], alphas.cpu().numpy())
                                       for q in range(errors.shape[1])]
        rows.append(row)
    return pd.concat(rows, ignore_index=True)
