"""The image experiment's geometry measurement (SPEC §6): angles and error barriers of FT-low, FT-high, SWA.

One model at a time: every interpolation point gets its SI part put back at norm rho and its BN
statistics recomputed on the training set (interpolated BN buffers are meaningless, SPEC §6-7),
then train and test error are measured in eval mode. The three solutions each end two of the
three paths, so their errors are measured once. Angles are over the SI group when there is
one, else over every trainable parameter.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from ..engine.images import evaluate, load_tracked_, tracked_parameters
from ..models.registry import si_parameters
from ..seeding import generator
from ..sphere import flatten
from .geometry import angular_distance, linear_barrier
from .measurements import register_measurement
from .tables import GEOMETRY_PAIRS, swa_k_of_choice


def training_subset(ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images used for BN recompute and train error (a seeded subset if configured)."""
    data, n = ctx.data, ctx.cfg.analysis.geometry_train_samples
    x, y = data.train_x, data.train_y
    if n and n < len(x):
        subset = torch.randperm(len(x), generator=generator("geometry-subset", ctx.shard.data_seed))[:n]
        x, y = x[subset.to(x.device)], y[subset.to(x.device)]
    return x, y


@register_measurement("geometry", kinds=("images",), summarize=None)
def image_geometry(ctx: Any) -> pd.DataFrame:
    """Angles and train/test error barriers (in %) of FT-low, FT-high and SWA, for every model of the shard."""
    return pd.DataFrame([row for ref in ctx.refs for row in model_geometry(ctx, ref)])


def model_geometry(ctx: Any, ref: Any) -> list[dict[str, Any]]:
    """The three geometry pairs of one pre-trained model (ref: its data seed, training seed, PLR index)."""
    cfg, shard, data, runner = ctx.cfg, ctx.shard, ctx.data, ctx.runner
    flrs = cfg.finetune.lrs
    work, rho = runner.trained_model(ref, "pretrain", shard=shard)
    n_angle = sum(p.numel() for p in si_parameters(work)) or None

    def tracked(flr_index: int) -> torch.Tensor:
        model, _ = runner.trained_model(ref, "finetune", flr_index, shard=shard)
        return flatten(tracked_parameters(model)).detach().clone()

    ft_low, ft_high = tracked(flrs.index(min(flrs))), tracked(flrs.index(max(flrs)))
    k = swa_k_of_choice(cfg.swa.ks)
    swa = runner.weights(shard, "pretrain")[f"{ref.tag}.swa.k{k}"].to(ft_low)
    x_train, y_train = training_subset(ctx)
    solutions, known, current = (ft_low, ft_high, swa), {}, [None]

    def prepare(w: torch.Tensor) -> torch.Tensor:
        current[0] = next((i for i, sol in enumerate(solutions) if torch.equal(w, sol)), None)
        if current[0] not in known:
            load_tracked_(work, w, rho)
            runner.recompute_bn(work, x_train, data)
        return w

    def error(_: torch.Tensor) -> dict[str, float]:
        if current[0] in known:
            return known[current[0]]
        splits = {"train": (x_train, y_train), "test": (data.test_x, data.test_y)}
        errors = {split: 100 * (1 - float(evaluate(work, x, y, data.normalization, cfg.engine.eval_batch_size,
                                                   runner.bf16, runner.channels_last)[1]))
                  for split, (x, y) in splits.items()}
        if current[0] is not None:
            known[current[0]] = errors
        return errors

    rows = []
    plr = cfg.pretrain.lrs[ref.plr_index]
    for pair, (first, second) in zip(GEOMETRY_PAIRS, [(ft_low, ft_high), (swa, ft_high), (swa, ft_low)]):
        result = linear_barrier(error, first, second, cfg.analysis.geometry_points, prepare)
        rows.append({"data_seed": ref.data_seed, "train_seed": ref.train_seed, "plr": plr, "pair": pair,
                     "angle": float(angular_distance(first[:n_angle], second[:n_angle])),
                     "train_barrier": result["barrier"]["train"], "test_barrier": result["barrier"]["test"],
                     "swa_k": k})
    return rows
