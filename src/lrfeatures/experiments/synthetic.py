"""The synthetic recipe (SPEC §3): pretrain a PLR x seed grid -> fine-tune over FLRs -> SWA -> analyze.

Shards per (data seed, chunk of training seeds):
    pretrain   trains every PLR of those training seeds from one initial point per seed; with
               `pretrain.stages`, those stages run first (stage i on batch stream
               "pretrain-stage{i}"), then the last stage at the grid PLR on the "pretrain" stream
    finetune   fine-tunes each PLR's final weights over every FLR
    swa        averages of the last K checkpoints, evaluated
    analyze    every registered synthetic measurement (single-feature probes, geometry, ...)
How shards run, commit and resume is the runtime's (runtime.py); this file says what they compute.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
import torch
from torch import nn

from ..analysis import curvature, probes  # noqa: F401  (registers the synthetic measurements)
from ..analysis.curvature import check_curvature_model
from ..analysis.tables import KEY_COLUMNS
from ..config import SyntheticConfig
from ..data.synthetic import SyntheticData, get_shape, make_synthetic
from ..engine.common import LOG_FIELDS, GridResult, GridTask
from ..engine.grid import GridTrainer, evaluate_models
from ..engine.reference import train_reference
from ..models.registry import build_model, model_entry, si_parameters
from ..seeding import derive_seed
from ..sphere import flatten, project, unflatten_into_
from ..store import ExperimentStore, ShardWriter
from .runtime import Recipe, Shard, Stage, check_model_input, register_kind, resolve_device, run_measurements


@dataclass(frozen=True)
class SeedChunk:
    """The unit of the synthetic recipe: one data seed and a chunk of its training seeds."""

    data_seed: int
    train_seeds: tuple[int, ...]

    @property
    def label(self) -> str:
        """This unit's part of a shard name."""
        seeds = self.train_seeds
        return f"d{self.data_seed}-s{seeds[0]}-{seeds[-1]}-n{len(seeds)}"


def seed_chunks(cfg: SyntheticConfig) -> list[tuple[int, ...]]:
    """Training seeds split into shard-sized chunks."""
    size = cfg.engine.train_seeds_per_shard or len(cfg.seeds.train)
    return [tuple(cfg.seeds.train[i:i + size]) for i in range(0, len(cfg.seeds.train), size)]


def to_numpy(t: torch.Tensor):
    """A CPU numpy copy."""
    return t.detach().cpu().numpy()


def model_keys(stage: str, shard: Shard, plrs: list[float], flrs: list[float] | None = None,
               swa_k: int = 0) -> pd.DataFrame:
    """Key columns of the shard's models, in the order the tasks lay them out (seed-major)."""
    combos = list(itertools.product(shard.train_seeds, plrs, flrs or [math.nan]))
    return pd.DataFrame({"stage": stage, "data_seed": shard.data_seed,
                         "train_seed": [c[0] for c in combos], "plr": [c[1] for c in combos],
                         "flr": [c[2] for c in combos], "swa_k": swa_k})


def chain_results(results: list[GridResult], lengths: list[int]) -> GridResult:
    """One pre-training result from consecutive stages: logs joined on one step axis, the last stage's weights.

    A later stage's step-0 log repeats the previous stage's last one, so it is dropped; steps
    (logs and checkpoints) count from the start of the first stage.
    """
    if len(results) == 1:
        return results[0]
    offsets = [sum(lengths[:i]) for i in range(len(results))]
    log_steps = results[0].log_steps + [o + s for r, o in zip(results[1:], offsets[1:]) for s in r.log_steps[1:]]
    logs = {k: torch.cat([results[0].logs[k]] + [r.logs[k][1:] for r in results[1:]]) for k in results[0].logs}
    last = results[-1]
    return GridResult(last.final, last.checkpoints, [offsets[-1] + s for s in last.checkpoint_steps], log_steps, logs)


def write_training(writer: ShardWriter, keys: pd.DataFrame, result: GridResult) -> None:
    """Metrics (one row per model and logged step) and final evaluations of a trained grid."""
    steps = len(result.log_steps)
    metrics = keys.loc[keys.index.repeat(steps)].reset_index(drop=True)
    metrics["step"] = result.log_steps * len(keys)
    for name in LOG_FIELDS:
        metrics[name] = to_numpy(result.logs[name].T.reshape(-1))
    metrics["diverged"] = metrics["diverged"] > 0.5
    writer.table("metrics", metrics)
    final = metrics[metrics["step"] == result.log_steps[-1]]
    writer.table("evaluations", final[KEY_COLUMNS + ["train_loss", "train_acc", "test_loss", "test_acc",
                                                     "diverged"]].reset_index(drop=True))


@dataclass
class SyntheticAnalysis:
    """What a synthetic measurement gets: the shard's data, its final models and an evaluate function.

    `solutions` lists (keys, flat SI weights [M, P], frozen tensors) for pretrain, then SWA per K
    in cfg.swa.ks order, then finetune (PLR-major, FLR-minor); `evaluate(theta, frozen, x, y)`
    returns (loss [M], accuracy [M]).
    """

    cfg: SyntheticConfig
    shard: Shard
    data: SyntheticData
    solutions: list[tuple[pd.DataFrame, torch.Tensor, dict[str, torch.Tensor]]]
    evaluate: Callable
    kind: str = "synthetic"
    make_model: Callable[..., nn.Module] | None = None  # the network template (curvature rebuilds it)
    stage_solutions: list = field(default_factory=list)  # (keys with pretrain_stage, weights, frozen) per earlier stage


class SyntheticRunner:
    """Data, models and the stages of one synthetic experiment, against a store."""

    def __init__(self, cfg: SyntheticConfig, store: ExperimentStore, progress: Callable[[int], None] | None = None):
        self.cfg, self.store = cfg, store
        self.device = resolve_device(cfg.engine.device)
        self.progress = progress or (lambda steps: None)
        self._data: dict[int, SyntheticData] = {}

    # ----- building blocks -------------------------------------------------------------
    def data(self, data_seed: int) -> SyntheticData:
        """The data set of a data seed, on the device (cached)."""
        if data_seed not in self._data:
            self._data[data_seed] = make_synthetic(self.cfg.data, data_seed).to(self.device)
        return self._data[data_seed]

    def make_model(self, data_seed: int = 0, train_seed: int = 0) -> nn.Module:
        """The network of a training seed, SI group on the sphere of radius rho."""
        model = build_model(self.cfg.model, (2 * self.cfg.data.n_features,), 1,
                            derive_seed("init", data_seed, train_seed))
        params = si_parameters(model)
        unflatten_into_(project(flatten(params).detach(), self.cfg.sphere.rho), params)
        return model

    def initial_state(self, data_seed: int, train_seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Flat SI weights and the frozen tensors (head, buffers) of a training seed."""
        model = self.make_model(data_seed, train_seed)
        si = {id(p) for p in si_parameters(model)}
        si_names = {n for n, p in model.named_parameters() if id(p) in si}
        frozen = {n: t.detach().clone() for n, t in model.state_dict().items() if n not in si_names}
        return flatten(si_parameters(model)).detach(), frozen

    def frozen_of(self, shard: Shard, repeat: int) -> dict[str, torch.Tensor]:
        """Frozen tensors of the shard's seeds, each repeated `repeat` times (seed-major)."""
        states = [self.initial_state(shard.data_seed, s)[1] for s in shard.train_seeds]
        return {k: torch.stack([st[k] for st in states]).repeat_interleave(repeat, 0) for k in states[0]}

    def train(self, task: GridTask, data: SyntheticData) -> GridResult:
        """Run a task on the configured engine."""
        if self.cfg.engine.name == "reference":
            result = train_reference(self.make_model, task, data.x_train, data.y_train, data.x_test, data.y_test)
            self.progress(task.iterations * task.num_models)
            return result
        trainer = GridTrainer(self.make_model, self.cfg.engine.memory_budget_gb, self.progress,
                              self.cfg.engine.compile, native=self.cfg.engine.native)
        return trainer.train(task, data.x_train, data.y_train, data.x_test, data.y_test)

    def evaluate(self, theta: torch.Tensor, frozen: dict[str, torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and accuracy [M] of flat weights on a set."""
        return evaluate_models(self.make_model, theta.to(self.device),
                               {k: v.to(self.device) for k, v in frozen.items()}, x, y,
                               self.cfg.engine.memory_budget_gb, self.cfg.engine.native)

    def task(self, shard: Shard, stage: str, init: torch.Tensor, lrs: list[float], per_seed: int,
             iterations: int, log_every: int, **checkpoints: int) -> GridTask:
        """A grid task over the shard's seeds: `per_seed` models each, seed-major, at `lrs` (cycled)."""
        seeds = shard.train_seeds
        return GridTask(
            init=init, frozen=self.frozen_of(shard, per_seed),
            effective_lrs=torch.tensor(lrs * (per_seed // len(lrs) * len(seeds)), dtype=torch.float64),
            stream_of_model=torch.arange(len(seeds)).repeat_interleave(per_seed),
            streams=[("order", stage, shard.data_seed, s) for s in seeds],
            iterations=iterations, batch_size=self.cfg.pretrain.batch_size, rho=self.cfg.sphere.rho,
            rule=self.cfg.sphere.step, log_every=log_every, **checkpoints)

    def pretrained(self, shard: Shard) -> dict[str, torch.Tensor]:
        """The weights the shard's pretrain shard stored."""
        return self.store.shard_tensors(shard.upstream("pretrain").name, "weights")

    # ----- stages ----------------------------------------------------------------------
    def earlier_stages(self, shard: Shard, init: torch.Tensor) -> tuple[torch.Tensor, list[GridResult]]:
        """Run `pretrain.stages` from init [M, P]; the weights they end at and their results."""
        cfg, plrs, results = self.cfg, self.cfg.pretrain.lrs, []
        for i, stage in enumerate(cfg.pretrain.stages):
            lrs = [stage.rate(plr) for plr in plrs]
            task = self.task(shard, f"pretrain-stage{i}", init, lrs, len(plrs), stage.iterations,
                             cfg.pretrain.log_every)
            results.append(self.train(task, self.data(shard.data_seed)))
            init = results[-1].final
        return init, results

    def run_pretrain(self, shard: Shard, writer: ShardWriter) -> None:
        """Train every PLR of the shard's seeds from one initial point per seed (after any earlier stages)."""
        cfg, plrs = self.cfg, self.cfg.pretrain.lrs
        init = torch.stack([self.initial_state(shard.data_seed, s)[0] for s in shard.train_seeds])
        init, earlier = self.earlier_stages(shard, init.repeat_interleave(len(plrs), 0))
        task = self.task(shard, "pretrain", init, plrs, len(plrs),
                         cfg.pretrain.iterations, cfg.pretrain.log_every, ckpt_every=cfg.pretrain.ckpt_every,
                         keep_checkpoints=cfg.checkpoints_kept)
        result = chain_results(earlier + [self.train(task, self.data(shard.data_seed))],
                               [s.iterations for s in cfg.pretrain.stages] + [cfg.pretrain.iterations])
        write_training(writer, model_keys("pretrain", shard, plrs), result)
        writer.tensors("weights", {"final": result.final, "checkpoints": result.checkpoints,
                                   "checkpoint_steps": torch.tensor(result.checkpoint_steps),
                                   **{f"stage{i}": r.final for i, r in enumerate(earlier)}})

    def run_finetune(self, shard: Shard, writer: ShardWriter) -> None:
        """Fine-tune each PLR's final weights over every FLR (one batch stream per seed)."""
        cfg, plrs, flrs = self.cfg, self.cfg.pretrain.lrs, self.cfg.finetune.lrs
        init = self.pretrained(shard)["final"].repeat_interleave(len(flrs), 0)
        task = self.task(shard, "finetune", init, flrs, len(plrs) * len(flrs), cfg.finetune.iterations,
                         cfg.finetune.log_every)
        result = self.train(task, self.data(shard.data_seed))
        write_training(writer, model_keys("finetune", shard, plrs, flrs), result)
        writer.tensors("weights", {"final": result.final})

    def run_swa(self, shard: Shard, writer: ShardWriter) -> None:
        """Average the last K pre-training checkpoints for each K, and evaluate the averages."""
        cfg, plrs = self.cfg, self.cfg.pretrain.lrs
        data = self.data(shard.data_seed)
        checkpoints = self.pretrained(shard)["checkpoints"]
        swa = {k: checkpoints[-k:].mean(0) for k in cfg.swa.ks}
        frozen = self.frozen_of(shard, len(plrs))
        rows = []
        for k, weights in swa.items():
            row = model_keys("swa", shard, plrs, swa_k=k)
            for split, (x, y) in {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}.items():
                row[f"{split}_loss"], row[f"{split}_acc"] = map(to_numpy, self.evaluate(weights, frozen, x, y))
            row["diverged"] = ~torch.isfinite(weights).all(1).numpy()
            rows.append(row)
        writer.table("evaluations", pd.concat(rows, ignore_index=True))
        writer.tensors("weights", {f"k{k}": w for k, w in swa.items()})

    def solutions(self, shard: Shard) -> list[tuple[pd.DataFrame, torch.Tensor, dict[str, torch.Tensor]]]:
        """Every final model of a shard: (keys, flat weights, frozen tensors) per stage (see SyntheticAnalysis)."""
        cfg, plrs = self.cfg, self.cfg.pretrain.lrs
        frozen = self.frozen_of(shard, len(plrs))
        swa = self.store.shard_tensors(shard.upstream("swa").name, "weights")
        out = [(model_keys("pretrain", shard, plrs), self.pretrained(shard)["final"], frozen)]
        out += [(model_keys("swa", shard, plrs, swa_k=k), swa[f"k{k}"], frozen) for k in cfg.swa.ks]
        if cfg.finetune.lrs:
            finetuned = self.store.shard_tensors(shard.upstream("finetune").name, "weights")["final"]
            out.append((model_keys("finetune", shard, plrs, cfg.finetune.lrs), finetuned,
                        self.frozen_of(shard, len(plrs) * len(cfg.finetune.lrs))))
        return out

    def run_analyze(self, shard: Shard, writer: ShardWriter) -> None:
        """Every registered synthetic measurement of the shard's final models."""
        cfg, plrs = self.cfg, self.cfg.pretrain.lrs
        stored = self.pretrained(shard)
        stages = [(model_keys("pretrain", shard, plrs).assign(pretrain_stage=i), stored[f"stage{i}"],
                   self.frozen_of(shard, len(plrs))) for i in range(len(cfg.pretrain.stages)) if f"stage{i}" in stored]
        run_measurements(SyntheticAnalysis(cfg, shard, self.data(shard.data_seed), self.solutions(shard),
                                           self.evaluate, make_model=self.make_model, stage_solutions=stages), writer)


class SyntheticRecipe(Recipe):
    """The synthetic experiment kind."""

    kind = "synthetic"
    config_class = SyntheticConfig
    unit_name = "model-step"
    stages = (Stage("pretrain"), Stage("finetune", ("pretrain",)), Stage("swa", ("pretrain",)),
              Stage("analyze", ("pretrain", "finetune", "swa")))
    tables = ("metrics", "evaluations")

    def active_stages(self, cfg: SyntheticConfig) -> list[str]:
        """No FLRs: no fine-tuning stage."""
        return [s.name for s in self.stages if s.name != "finetune" or cfg.finetune.lrs]

    def units(self, cfg: SyntheticConfig) -> list[SeedChunk]:
        """One unit per data seed and chunk of training seeds."""
        return [SeedChunk(d, chunk) for d in cfg.seeds.data for chunk in seed_chunks(cfg)]

    def cost(self, cfg: SyntheticConfig, shard: Shard) -> int:
        """Model-steps a shard trains."""
        seeds, plrs = len(shard.train_seeds), len(cfg.pretrain.lrs)
        if shard.stage == "pretrain":
            return seeds * plrs * (cfg.pretrain.iterations + sum(s.iterations for s in cfg.pretrain.stages))
        if shard.stage == "finetune":
            return seeds * plrs * len(cfg.finetune.lrs) * cfg.finetune.iterations
        return 0

    def check(self, cfg: SyntheticConfig) -> None:
        """The data shape and model must exist, and the model must take vector inputs."""
        get_shape(cfg.data.shape)
        check_model_input(cfg.model.name, "vector", self.kind)
        model = build_model(cfg.model, (2 * cfg.data.n_features,), 1, seed=0)
        if cfg.curvature.enabled:
            check_curvature_model(model, cfg.curvature.top_k, model_entry(cfg.model.name).has_si_group)

    def open(self, cfg: SyntheticConfig, store: ExperimentStore, progress=None) -> SyntheticRunner:
        """The runner that computes this experiment's shards."""
        return SyntheticRunner(cfg, store, progress)


SYNTHETIC = register_kind(SyntheticRecipe())

