"""Filter-norm histograms: how unevenly a layer's norm is spread over its filters (or neurons).

For every convolution of an image model (ConvNet, ResNet: each output channel's kernel
W[o, :, :, :] is a filter) and every hidden weight matrix of the synthetic MLP (each row W[o, :]
is a neuron's filter), the filter norms ‖W[o]‖₂ are divided by the layer's mean filter norm, so
a layer whose filters all share one norm gives ratios of exactly 1 and the histogram is
comparable across layers, widths and ρ (the ratio is scale-invariant). A sparse, feature-
selective layer (regime 2A in the 2024 paper) shows a spread with a heavy tail and many near-zero
filters; a dense one a narrow peak at 1.

Table `filter_norms`: one row per model × layer, with the key columns (plus `pretrain_stage`:
0, 1, ... for the end of each earlier stage of two-stage pre-training, and the number of earlier
stages for the final models, which follow the last stage), `layer`, `filters`, `mean_norm` (the
normalizer), the ratios' `ratio_std`, `ratio_min`, `ratio_max`, and the histogram as counts in
fixed bins: `bin_00` .. `bin_29` count ratios in [i/10, (i+1)/10), `bin_over` those ≥ 3.
Fixed bins instead of per-filter rows keep the table at one row per layer and model (a ResNet-18
has ~4,800 filters; a grid thousands of models), and make histograms of any group of models a
plain sum of counts. Models with non-finite weights (diverged) get no rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..models.registry import si_parameters
from ..sphere import split
from .measurements import register_measurement

BIN_WIDTH = 0.1
N_BINS = 30                                         # [0, 3) in steps of 0.1, then one overflow bin
BIN_COLUMNS = [f"bin_{i:02d}" for i in range(N_BINS)] + ["bin_over"]
STAT_COLUMNS = ["filters", "mean_norm", "ratio_std", "ratio_min", "ratio_max"]


def filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each filter [M, out] of a layer's weights [M, out, ...] (over everything but out)."""
    return weight.detach().flatten(2).norm(dim=2)


def histogram(norms: torch.Tensor) -> dict[str, np.ndarray]:
    """Statistics [M] and fixed-bin counts of the mean-normalized filter norms [M, F] of M models."""
    norms = norms.double()
    mean = norms.mean(1, keepdim=True)
    ratio = norms / mean                                                    # [M, F], mean 1
    # 1e-9: a ratio on an edge (0.3 / 0.1 = 2.9999...) falls in the bin it starts; N_BINS: the overflow bin
    index = (ratio / BIN_WIDTH + 1e-9).floor().clamp(0, N_BINS).long()
    counts = torch.zeros(len(norms), N_BINS + 1, dtype=torch.long).scatter_add_(1, index, torch.ones_like(index))
    out = {"filters": np.full(len(norms), norms.shape[1]), "mean_norm": mean[:, 0].numpy(),
           "ratio_std": ratio.std(1, correction=0).numpy(), "ratio_min": ratio.amin(1).numpy(),
           "ratio_max": ratio.amax(1).numpy()}
    out.update({name: counts[:, i].numpy() for i, name in enumerate(BIN_COLUMNS)})
    return out


def layer_rows(keys: pd.DataFrame, layers: list[tuple[str, torch.Tensor]]) -> pd.DataFrame:
    """Rows (model × layer) of M models: key rows [M] and (layer name, weights [M, out, ...]) per layer."""
    finite = torch.ones(len(keys), dtype=torch.bool)
    for _, weight in layers:
        finite &= torch.isfinite(weight.detach().flatten(1)).all(1).cpu()
    keep = keys[finite.numpy()].reset_index(drop=True)
    if keep.empty:
        return pd.DataFrame()
    parts = []
    for name, weight in layers:
        stats = histogram(filter_norms(weight.cpu()[finite]))
        parts.append(keep.assign(layer=name, **stats))
    return pd.concat(parts, ignore_index=True)


def module_layers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, weight [1, out, ...]) of every convolution of a model; an MLP without any: its SI weight matrices."""
    convs = [(name, m.weight[None]) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs
    si = {id(p) for p in si_parameters(model)}
    return [(name, p[None]) for name, p in model.named_parameters() if id(p) in si and p.dim() >= 2]


def earlier_stage_count(cfg: Any) -> int:
    """How many earlier pre-training stages the config runs (0 without `pretrain.stages`)."""
    return len(getattr(cfg.pretrain, "stages", None) or [])


# ---------------------------------------------------------------- the measurements

@register_measurement("filter_norms", kinds=("synthetic",), summarize=None)
def synthetic_filter_norms(ctx: Any) -> pd.DataFrame | None:
    """Mean-normalized row-norm histograms of every hidden weight matrix of every final (and stage-end) model."""
    template = ctx.make_model()
    names = [n for n, p in template.named_parameters() if id(p) in {id(q) for q in si_parameters(template)}]
    shapes = [p.shape for p in si_parameters(template)]
    final = earlier_stage_count(ctx.cfg)
    solutions = [(keys.assign(pretrain_stage=final), theta) for keys, theta, _ in ctx.solutions]
    # Two-stage pre-training: (keys with pretrain_stage, flat weights [M, P], frozen) per earlier stage
    stage_solutions = getattr(ctx, "stage_solutions", None)
    if stage_solutions:
        solutions += [(keys, theta) for keys, theta, _ in stage_solutions]
    tables = [layer_rows(keys, list(zip(names, split(theta.detach().cpu(), shapes)))) for keys, theta in solutions]
    tables = [t for t in tables if not t.empty]
    return pd.concat(tables, ignore_index=True) if tables else None


def image_model_rows(keys: list[dict[str, Any]], models: list[nn.Module], stage: int | None) -> list[pd.DataFrame]:
    """Rows of image models one at a time (their layers differ in shape); `stage` fills pretrain_stage if absent."""
    out = []
    for row, model in zip(keys, models):
        key = pd.DataFrame([{**row, **({} if stage is None else {"pretrain_stage": stage})}])
        table = layer_rows(key, module_layers(model))
        if not table.empty:
            out.append(table)
    return out


@register_measurement("filter_norms", kinds=("images",), summarize=None)
def image_filter_norms(ctx: Any) -> pd.DataFrame | None:
    """Mean-normalized filter-norm histograms of every convolution of every final (and stage-end) model."""
    keys, models = ctx.models()
    tables = image_model_rows(keys, models, earlier_stage_count(ctx.cfg))
    stage_models = getattr(ctx, "stage_models", None)
    if stage_models is not None:
        stage_keys, stage_nets = stage_models()
        tables += image_model_rows(stage_keys, stage_nets, None)
    return pd.concat(tables, ignore_index=True) if tables else None
