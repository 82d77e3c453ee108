"""What image measurements see: a shard's models by reference, and the analysis context that rebuilds them.

A shard of the images recipe holds every PLR of its training seeds; `ModelRef` names one
pre-trained model in it (its tensors in the shard's weights file start with `ref.tag`), and
`ImageAnalysis` is the context every image measurement gets (see analysis/measurements.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..config import ImageConfig
from ..engine.images import DeviceImages
from .runtime import Shard

if TYPE_CHECKING:
    from .images import ImageRunner


@dataclass(frozen=True)
class ModelRef:
    """One pre-trained model of a shard: (data seed, training seed, PLR index)."""

    data_seed: int
    train_seed: int
    plr_index: int

    @property
    def tag(self) -> str:
        """Its part of tensor names in a shard's weights file."""
        return f"s{self.train_seed}-plr{self.plr_index:03d}"


def model_refs(cfg: ImageConfig, shard: Shard) -> list[ModelRef]:
    """The pre-trained models of a shard: every PLR of every training seed of its unit."""
    return [ModelRef(shard.data_seed, s, i) for s in shard.train_seeds for i in range(len(cfg.pretrain.lrs))]


def key_row(stage: str, ref: ModelRef, plr: float, flr: float = math.nan, swa_k: int = 0) -> dict[str, Any]:
    """Key columns of one model."""
    return {"stage": stage, "data_seed": ref.data_seed, "train_seed": ref.train_seed, "plr": plr,
            "flr": flr, "swa_k": swa_k}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix`, with it removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@dataclass
class ImageAnalysis:
    """What an image measurement gets: the config, the shard, its data and the runner that rebuilds models."""

    cfg: ImageConfig
    shard: Shard
    data: DeviceImages
    runner: "ImageRunner"
    options: Any = None     # a measurement's own settings (the bands' BandsConfig)
    kind: str = "images"
    _models: Any = field(default=None, init=False, repr=False)

    @property
    def refs(self) -> list[ModelRef]:
        """The shard's pre-trained models."""
        return model_refs(self.cfg, self.shard)

    def models(self) -> tuple[list[dict[str, Any]], list[nn.Module]]:
        """Key rows (with each model's `diverged` flag) and eval-mode models: PT, FT per FLR, SWA per K.

        For every PLR and training seed of the shard, rebuilt as the experiment evaluates them: the
        stored final state (BN buffers included) for PT and FT; for SWA the stored average at norm
        rho with BN recomputed on the training set. Built once per context (measurements only read them).
        """
        if self._models is None:
            self._models = self._build_models()
        return self._models

    def _build_models(self) -> tuple[list[dict[str, Any]], list[nn.Module]]:
        cfg, runner, shard = self.cfg, self.runner, self.shard
        keys, models = [], []
        pretrained = runner.weights(shard, "pretrain")
        for ref in self.refs:
            plr = cfg.pretrain.lrs[ref.plr_index]
            keys.append(key_row("pretrain", ref, plr))
            models.append(runner.trained_model(ref, "pretrain", shard=shard)[0])
            for j, flr in enumerate(cfg.finetune.lrs):
                keys.append(key_row("finetune", ref, plr, flr))
                models.append(runner.trained_model(ref, "finetune", j, shard=shard)[0])
            for k in cfg.swa.ks:
                keys.append(key_row("swa", ref, plr, swa_k=k))
                models.append(runner.swa_model(ref, k, pretrained))
        stages = ["pretrain", "swa"] + (["finetune"] if cfg.finetune.lrs else [])
        flags = pd.concat([runner.store.shard_table(shard.upstream(s).name, "evaluations") for s in stages],
                          ignore_index=True)
        for row in keys:
            match = flags[(flags["stage"] == row["stage"]) & (flags["swa_k"] == row["swa_k"])
                          & (flags["train_seed"] == row["train_seed"]) & np.isclose(flags["plr"], row["plr"])
                          & (flags["flr"].isna() if math.isnan(row["flr"]) else flags["flr"] == row["flr"])]
            row["diverged"] = bool(match["diverged"].any())
        return keys, [model.eval() for model in models]

    def stage_models(self) -> tuple[list[dict[str, Any]], list[nn.Module]]:
        """With `pretrain.stages`: every model at the end of each earlier pre-training stage (key `pretrain_stage`)."""
        keys, models = [], []
        tensors = self.runner.weights(self.shard, "pretrain")
        for ref in self.refs:
            for i in range(len(self.cfg.pretrain.stages)):
                model, _ = self.runner.make_model(ref.data_seed, ref.train_seed)
                model.load_state_dict(unprefixed(f"{ref.tag}.stage{i}.", tensors))
                keys.append({**key_row("pretrain", ref, self.cfg.pretrain.lrs[ref.plr_index]), "pretrain_stage": i})
                models.append(model.eval())
        return keys, models
