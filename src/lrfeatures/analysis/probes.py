"""The synthetic experiment's measurements: single-feature probe accuracies and minima geometry.

Both read the shard's solutions through a `SyntheticAnalysis` context (lrfeatures.experiments)
and its `evaluate(theta, frozen, x, y) -> (loss [M], accuracy [M])`, so they work for any model
family the engine can evaluate; they never train.
"""

from __future__ import annotations

from typing import Any, Callable

import pandas as pd
import torch

from .geometry import angular_distance, error_barrier, interpolation_path
from .measurements import register_measurement
from .tables import GEOMETRY_PAIRS, GEOMETRY_POINTS, swa_k_of_choice

Evaluate = Callable[[torch.Tensor, dict, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def signed_margin(evaluate: Evaluate, weights: torch.Tensor, frozen: dict, x: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    """Class-balanced mean signed logit (E[z | y=1] - E[z | y=0]) / 2 [M] of binary models.

    BCE(z, y) = softplus(-(2y-1)z) and softplus(a) - softplus(-a) = a, so on one class the loss
    on the flipped labels minus the loss on the true ones is exactly E[(2y-1)z]: any model the
    engine can evaluate gives it, without exposing its logits. Balancing the two classes makes
    a constant logit score exactly 0, whatever the probe set's class counts.
    """
    halves = []
    for label in (0.0, 1.0):
        rows = y == label
        xs, ys = x[rows], y[rows]
        halves.append(evaluate(weights, frozen, xs, 1 - ys)[0] - evaluate(weights, frozen, xs, ys)[0])
    return (halves[0] + halves[1]) / 2


def feature_table(evaluate: Evaluate, keys: pd.DataFrame, weights: torch.Tensor, frozen: dict,
                  x_probe: torch.Tensor, y_probe: torch.Tensor) -> pd.DataFrame:
    """Accuracy and signed margin of every model on each single-feature probe set (one row per model and feature)."""
    tables = []
    for feature in range(x_probe.shape[0]):
        x, y = x_probe[feature], y_probe[feature]
        accuracy = evaluate(weights, frozen, x, y)[1]
        margin = signed_margin(evaluate, weights, frozen, x, y)
        tables.append(keys.assign(feature=feature, accuracy=accuracy.cpu().numpy(),
                                  margin=margin.double().cpu().numpy()))
    return pd.concat(tables, ignore_index=True)


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


@register_measurement("features", kinds=("synthetic",), summarize=None)
def single_feature_accuracy(ctx: Any) -> pd.DataFrame:
    """Accuracy and mean signed margin of every final model on each single-feature probe set."""
    return pd.concat([feature_table(ctx.evaluate, keys, weights, frozen, ctx.data.x_probe, ctx.data.y_probe)
                      for keys, weights, frozen in ctx.solutions], ignore_index=True)


@register_measurement("geometry", kinds=("synthetic",), summarize=None)
def synthetic_geometry(ctx: Any) -> pd.DataFrame | None:
    """Angles and error barriers of FT-low, FT-high and SWA (SPEC §6); None without fine-tuning."""
    cfg, data, solutions = ctx.cfg, ctx.data, ctx.solutions
    flrs = cfg.finetune.lrs
    if not flrs:
        return None
    pretrain_keys, _, frozen = solutions[0]
    finetuned = solutions[-1][1].view(len(pretrain_keys), len(flrs), -1)
    low, high = finetuned[:, flrs.index(min(flrs))], finetuned[:, flrs.index(max(flrs))]
    k = swa_k_of_choice(cfg.swa.ks)
    swa = solutions[1 + cfg.swa.ks.index(k)][1]
    model_rows = pretrain_keys[["data_seed", "train_seed", "plr"]].assign(swa_k=k)
    return geometry_table(ctx.evaluate, model_rows, low, high, swa, frozen,
                          {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)})
