"""The Fourier band recipe of image experiments (SPEC §5): keep/remove-band test accuracy of every model.

Runs over a finished image experiment's store, after its training stages, with the same runtime
as every other stage: one shard per (data seed, training seed, PLR), named
`bands-<normalization>-d<D>-s<S>-plr<III>`, each needing that model's pretrain, finetune and
swa shards. The band settings (`BandsConfig`) are not part of the experiment's identity, so
several normalizations can live side by side in one store. What a shard computes is the
`bands` measurement (analysis/bands.py); this file only says which shards there are.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from ..analysis.bands import BandsConfig, update_summary
from ..analysis.measurements import MEASUREMENTS
from ..errors import ConfigError, DataError
from ..store import ExperimentStore, ShardWriter
from .images import ImageAnalysis, ImageRunner
from .runtime import Shard, plan_shards, recipe_for, run_shard, run_until_done, torch_threads

TABLE = "bands"


def open_image_experiment(root: str | Path) -> tuple[ExperimentStore, Any]:
    """The store and config of an image experiment; ConfigError for any other kind."""
    store = ExperimentStore(root)
    cfg = store.config()
    if getattr(cfg, "kind", None) != "images":
        raise ConfigError(f"{store.root} is a {getattr(cfg, 'kind', 'unknown')} experiment; band accuracy "
                          "needs an image experiment (run `lrfeatures images` first)")
    return store, cfg


def band_shards(cfg: Any, bands_cfg: BandsConfig) -> list[Shard]:
    """One band shard per model of the experiment (its pretrain units), for this normalization."""
    return [Shard(f"bands-{bands_cfg.normalization}", s.unit) for s in plan_shards(cfg) if s.stage == "pretrain"]


def training_needs(cfg: Any, shard: Shard) -> list[Shard]:
    """The experiment's shards a band shard reads: pretrain, finetune and swa of its model."""
    return [shard.upstream(s) for s in recipe_for(cfg.kind).active_stages(cfg) if s in ("pretrain", "finetune", "swa")]


def pending_shards(root: str | Path, bands_cfg: BandsConfig | None = None) -> list[str]:
    """Band shards not yet computed under this normalization."""
    bands_cfg = bands_cfg or BandsConfig()
    store, cfg = open_image_experiment(root)
    return [s.name for s in band_shards(cfg, bands_cfg) if not store.is_done(s.name)]


def run_bands(root: str | Path, bands_cfg: BandsConfig | None = None,
              progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Compute every missing band shard of an image experiment, merge bands.parquet, update summary.json."""
    bands_cfg = bands_cfg or BandsConfig()
    bands_cfg.validate()
    store, cfg = open_image_experiment(root)
    store.clean_partial(prefix="bands-")  # only temp dirs whose owner's lease is stale or gone
    if bands_cfg.device:  # the device is not the experiment's identity: config.toml is not rewritten
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, device=bands_cfg.device))
    runner = ImageRunner(cfg, store)
    measurement = MEASUREMENTS[TABLE]

    def compute(shard: Shard, writer: ShardWriter) -> dict:
        data = runner.data(shard.data_seed)
        writer.table(TABLE, measurement.measure(ImageAnalysis(cfg, shard, data, runner, bands_cfg)))
        writer.tensors("example", {"image": data.test_x[0].cpu(), "label": data.test_y[0:1].cpu()})
        return {"normalization": bands_cfg.normalization}

    def run_one(shard: Shard) -> bool | None:
        ran = run_shard(store, shard, compute, training_needs(cfg, shard), {"device": str(runner.device)})
        if ran and progress:
            progress(shard.name)
        return ran

    shards = band_shards(cfg, bands_cfg)
    for shard in shards:  # the training shards must be finished (and intact) before any band shard runs
        missing = [s.name for s in training_needs(cfg, shard) if not store.is_done(s.name)]
        if missing:
            raise DataError(f"{store.root}: shard {missing[0]} is not finished or is damaged; run the "
                            "`lrfeatures images` command of this experiment again (same --out) to finish it first")
    with torch_threads(cfg.engine.threads):
        run_until_done(shards, run_one)
    table = store.merge_table(TABLE)
    update_summary(store)
    return table


def print_progress(name: str) -> None:
    """Default progress line for the CLI."""
    print(f"bands: {name} done", file=sys.stderr, flush=True)
