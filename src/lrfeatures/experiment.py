"""A whole synthetic experiment: its shards, their order, and the final summary.

Shards per (data seed, chunk of training seeds):
    pretrain -> finetune -> (after pretrain) swa -> (after all three) analyze
`analyze` measures the single-feature probes of every solution and the geometry of the
minima. A finished shard is never recomputed; running the same experiment again resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from .analysis.probes import feature_table, geometry_swa_k, geometry_table
from .analysis.summary import write_summary
from .config import SyntheticConfig
from .data.synthetic import get_shape
from .models import build_model
from .protocol import Shard, SyntheticRunner, resolve_device, seed_chunks
from .store import ExperimentStore

DEPENDS_ON = {"pretrain": (), "finetune": ("pretrain",), "swa": ("pretrain",),
              "analyze": ("pretrain", "finetune", "swa")}
TABLES = ("metrics", "evaluations", "features", "geometry")


def stages(cfg: SyntheticConfig) -> list[str]:
    """The stages this config needs, in dependency order."""
    return [s for s in DEPENDS_ON if s != "finetune" or cfg.finetune.lrs]


def dependencies(cfg: SyntheticConfig, shard: Shard) -> list[Shard]:
    """The shards that must be complete before `shard` can run."""
    return [shard.upstream(s) for s in DEPENDS_ON[shard.stage] if s in stages(cfg)]


def plan_shards(cfg: SyntheticConfig) -> list[Shard]:
    """All shards of an experiment, each listed after the shards it depends on."""
    return [Shard(stage, d, chunk) for d in cfg.seeds.data for chunk in seed_chunks(cfg) for stage in stages(cfg)]


def shard_cost(cfg: SyntheticConfig, shard: Shard) -> int:
    """Model-steps a shard trains (0 for evaluation-only shards); used for progress."""
    seeds, plrs = len(shard.train_seeds), len(cfg.pretrain.lrs)
    if shard.stage == "pretrain":
        return seeds * plrs * cfg.pretrain.iterations
    if shard.stage == "finetune":
        return seeds * plrs * len(cfg.finetune.lrs) * cfg.finetune.iterations
    return 0


def check_buildable(cfg: SyntheticConfig) -> None:
    """Raise the user-facing error if the device, data shape or model cannot be built."""
    resolve_device(cfg.engine.device)
    get_shape(cfg.data.shape)
    build_model(cfg.model, (2 * cfg.data.n_features,), 1, seed=0)


class SyntheticExperiment:
    """Runs shards of one experiment (training through protocol, measurements through analysis)."""

    def __init__(self, cfg: SyntheticConfig, root: str | Path, progress: Callable[[int], None] | None = None):
        self.cfg = cfg
        check_buildable(cfg)  # before anything is written: a typo must not leave a directory behind
        self.store = ExperimentStore.create(root, cfg)
        self.runner = SyntheticRunner(cfg, self.store, progress)

    def run_shard(self, shard: Shard) -> bool:
        """Run one shard unless it is complete; True if it ran."""
        names = tuple(d.stage for d in dependencies(self.cfg, shard))
        if shard.stage == "analyze":
            return self.runner.run(shard, names, self.analyze)
        return self.runner.run(shard, names)

    def analyze(self, shard: Shard, writer) -> None:
        """Probe accuracies of every solution, and geometry of FT-low / FT-high / SWA."""
        cfg, runner = self.cfg, self.runner
        data = runner.data(shard.data_seed)
        solutions = runner.solutions(shard)
        tables = [feature_table(runner.evaluate, keys, weights, frozen, data.x_probe, data.y_probe)
                  for keys, weights, frozen in solutions]
        writer.table("features", pd.concat(tables, ignore_index=True))
        if cfg.finetune.lrs:
            # solutions: pretrain, then SWA per K in cfg.swa.ks order, then finetune (see SyntheticRunner).
            pretrain_keys, _, frozen = solutions[0]
            finetuned = solutions[-1][1].view(len(pretrain_keys), len(cfg.finetune.lrs), -1)
            low = finetuned[:, cfg.finetune.lrs.index(min(cfg.finetune.lrs))]
            high = finetuned[:, cfg.finetune.lrs.index(max(cfg.finetune.lrs))]
            k = geometry_swa_k(cfg.swa.ks)
            swa = solutions[1 + cfg.swa.ks.index(k)][1]
            model_rows = pretrain_keys[["data_seed", "train_seed", "plr"]].assign(swa_k=k)
            table = geometry_table(runner.evaluate, model_rows, low, high, swa, frozen,
                                   {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)})
            writer.table("geometry", table)

    def run(self) -> dict:
        """Run every pending shard in order, then merge the tables and write summary.json."""
        self.store.clean_partial()
        for shard in plan_shards(self.cfg):
            self.run_shard(shard)
        return self.finalize()

    def finalize(self) -> dict:
        """Merge shard tables into the experiment's tables and write its summary."""
        for name in TABLES:
            self.store.merge_table(name)
        return write_summary(self.store)


def pending_cost(cfg: SyntheticConfig, store: ExperimentStore) -> int:
    """Model-steps still to train."""
    return sum(shard_cost(cfg, s) for s in plan_shards(cfg) if not store.is_done(s.name))
