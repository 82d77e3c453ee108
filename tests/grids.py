"""Grid tasks for the engine tests: LRs x seeds, each seed with its own init, head and batch stream."""

from __future__ import annotations

import torch

from lrfeatures.config import ModelConfig
from lrfeatures.engine.common import GridTask
from lrfeatures.models import build_model, si_parameters
from lrfeatures.sphere import flatten, project


def make_task(lrs, seeds=(0, 1), iterations=200, dtype=torch.float32, log_every=50, ckpt_every=0, keep=0,
              model_cfg=ModelConfig(), num_outputs=1, batch=16, rule="projected") -> GridTask:
    """A grid over lrs x seeds where each seed has its own init and batch stream."""
    inits, heads, rates, streams = [], [], [], []
    for s, seed in enumerate(seeds):
        model = build_model(model_cfg, (32,), num_outputs, seed)
        theta = project(flatten(si_parameters(model)).detach(), 1.0)
        for lr in lrs:
            inits.append(theta)
            heads.append(model.head.weight.detach())
            rates.append(lr)
            streams.append(s)
    return GridTask(torch.stack(inits).to(dtype), {"head.weight": torch.stack(heads).to(dtype)},
                    torch.tensor(rates, dtype=torch.float64), torch.tensor(streams),
                    [("test-order", seed) for seed in seeds], iterations, batch, 1.0, rule=rule,
                    log_every=log_every, ckpt_every=ckpt_every, keep_checkpoints=keep)
