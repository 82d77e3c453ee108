"""The synthetic protocol: pretrain a PLR x seed grid -> fine-tune over FLRs -> SWA.

Work is cut into shards that talk only through the store:
    pretrain-<data seed>-<seed chunk>   trains every PLR of those training seeds
    finetune-...                        fine-tunes each PLR's final weights over every FLR
    swa-...                             averages of the last K checkpoints, evaluated
A finished shard is never recomputed, so re-running an experiment resumes it.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
from torch import nn

from .config import SyntheticConfig
from .data.synthetic import SyntheticData, make_synthetic
from .engine.common import LOG_FIELDS, GridResult, GridTask
from .engine.grid import GridTrainer, evaluate_models
from .engine.reference import train_reference
from .errors import ConfigError
from .models.registry import build_model, si_parameters
from .seeding import derive_seed
from .sphere import flatten, project, unflatten_into_
from .store import ExperimentStore

KEY_COLUMNS = ["stage", "data_seed", "train_seed", "plr", "flr", "swa_k"]



@dataclass(frozen=True)
class Shard:
    """One unit of work: a stage for one data seed and a chunk of training seeds."""

    stage: str
    data_seed: int
    train_seeds: tuple[int, ...]

    @property
    def name(self) -> str:
        """Directory name in the store (unique within an experiment)."""
        seeds = self.train_seeds
        return f"{self.stage}-d{self.data_seed}-s{seeds[0]}-{seeds[-1]}-n{len(seeds)}"

    def upstream(self, stage: str) -> "Shard":
        """The shard of another stage over the same seeds."""
        return Shard(stage, self.data_seed, self.train_seeds)


STAGES = ("pretrain", "finetune", "swa")
DEPENDS_ON = {"pretrain": (), "finetune": ("pretrain",), "swa": ("pretrain",)}


def seed_chunks(cfg: SyntheticConfig) -> list[tuple[int, ...]]:
    """Training seeds split into shard-sized chunks."""
    size = cfg.engine.train_seeds_per_shard or len(cfg.seeds.train)
    return [tuple(cfg.seeds.train[i:i + size]) for i in range(0, len(cfg.seeds.train), size)]


def resolve_device(name: str) -> torch.device:
    """The training device, checked to exist."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"engine.device={name!r} but CUDA is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"engine.device={name!r} is not a device; use cpu or cuda[:N]") from None


class SyntheticRunner:
    """Runs the shards of one synthetic experiment against a store."""

    def __init__(self, cfg: SyntheticConfig, store: ExperimentStore,
                 progress: Callable[[int], None] | None = None):
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
        make_model = self.make_model
        if self.cfg.engine.name == "reference":
            result = train_reference(make_model, task, data.x_train, data.y_train, data.x_test, data.y_test)
            self.progress(task.iterations * task.num_models)
            return result
        trainer = GridTrainer(make_model, self.cfg.engine.memory_budget_gb, self.progress, self.cfg.engine.compile,
                              native=self.cfg.engine.native)
        return trainer.train(task, data.x_train, data.y_train, data.x_test, data.y_test)

    def evaluate(self, theta: torch.Tensor, frozen: dict[str, torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and accuracy [M] of flat weights on a set."""
        return evaluate_models(self.make_model, theta.to(self.device),
                               {k: v.to(self.device) for k, v in frozen.items()}, x, y,
                               self.cfg.engine.memory_budget_gb, self.cfg.engine.native)

    # ----- stages ----------------------------------------------------------------------
    def run(self, shard: Shard, depends_on: tuple[str, ...] | None = None,
            compute: Callable | None = None) -> bool:
        """Run a shard unless it is done; True if it ran.

        `compute(shard, writer)` defaults to this stage's method; layers above pass their own.
        """
        if self.store.is_done(shard.name):
            return False
        for stage in DEPENDS_ON[shard.stage] if depends_on is None else depends_on:
            if not self.store.is_done(shard.upstream(stage).name):
                raise RuntimeError(f"shard {shard.name} needs {shard.upstream(stage).name} first")
        started = time.time()
        writer = self.store.writer(shard.name)
        try:
            (compute or self.stage_function(shard.stage))(shard, writer)
            writer.commit({"seconds": time.time() - started, "device": str(self.device)})
        except BaseException:
            writer.abort()
            raise
        return True

    def stage_function(self, stage: str) -> Callable:
        """The method that computes a stage's shard."""
        return {"pretrain": self.run_pretrain, "finetune": self.run_finetune, "swa": self.run_swa}[stage]

    def run_pretrain(self, shard: Shard, writer) -> None:
        """Train every PLR of the shard's seeds from one initial point per seed."""
        cfg, plrs = self.cfg, self.cfg.pretrain.lrs
        states = [self.initial_state(shard.data_seed, s) for s in shard.train_seeds]
        task = GridTask(
            init=torch.stack([st[0] for st in states]).repeat_interleave(len(plrs), 0),
            frozen=self.frozen_of(shard, len(plrs)),
            effective_lrs=torch.tensor(plrs * len(states), dtype=torch.float64),
            stream_of_model=torch.arange(len(states)).repeat_interleave(len(plrs)),
            streams=[("order", "pretrain", shard.data_seed, s) for s in shard.train_seeds],
            iterations=cfg.pretrain.iterations, batch_size=cfg.pretrain.batch_size, rho=cfg.sphere.rho,
            rule=cfg.sphere.step, log_every=cfg.pretrain.log_every, ckpt_every=cfg.pretrain.ckpt_every,
            keep_checkpoints=cfg.checkpoints_kept)
        result = self.train(task, self.data(shard.data_seed))
        keys = model_keys("pretrain", shard, plrs)
        write_training(writer, keys, result)
        writer.tensors("weights", {"final": result.final, "checkpoints": result.checkpoints,
                                   "checkpoint_steps": torch.tensor(result.checkpoint_steps)})

    def run_finetune(self, shard: Shard, writer) -> None:
        """Fine-tune each PLR's final weights over every FLR (one batch stream per seed)."""
        cfg, plrs, flrs = self.cfg, self.cfg.pretrain.lrs, self.cfg.finetune.lrs
        pretrained = self.store.shard_tensors(shard.upstream("pretrain").name, "weights")["final"]
        task = GridTask(
            init=pretrained.repeat_interleave(len(flrs), 0),
            frozen=self.frozen_of(shard, len(plrs) * len(flrs)),
            effective_lrs=torch.tensor(flrs * (len(plrs) * len(shard.train_seeds)), dtype=torch.float64),
            stream_of_model=torch.arange(len(shard.train_seeds)).repeat_interleave(len(plrs) * len(flrs)),
            streams=[("order", "finetune", shard.data_seed, s) for s in shard.train_seeds],
            iterations=cfg.finetune.iterations, batch_size=cfg.pretrain.batch_size, rho=cfg.sphere.rho,
            rule=cfg.sphere.step, log_every=cfg.finetune.log_every)
        result = self.train(task, self.data(shard.data_seed))
        keys = model_keys("finetune", shard, plrs, flrs)
        write_training(writer, keys, result)
        writer.tensors("weights", {"final": result.final})

    def run_swa(self, shard: Shard, writer) -> None:
        """Average the last K pre-training checkpoints for each K, and evaluate the averages."""
        cfg, plrs = self.cfg, self.cfg.pretrain.lrs
        data = self.data(shard.data_seed)
        checkpoints = self.store.shard_tensors(shard.upstream("pretrain").name, "weights")["checkpoints"]
        swa = {k: checkpoints[-k:].mean(0) for k in cfg.swa.ks}
        frozen = self.frozen_of(shard, len(plrs))
        rows = []
        for k, weights in swa.items():
            row = model_keys("swa", shard, plrs, swa_k=k)
            row["train_loss"], row["train_acc"] = map(to_numpy, self.evaluate(weights, frozen, data.x_train,
                                                                             data.y_train))
            row["test_loss"], row["test_acc"] = map(to_numpy, self.evaluate(weights, frozen, data.x_test,
                                                                           data.y_test))
            row["diverged"] = ~torch.isfinite(weights).all(1).numpy()
            rows.append(row)
        writer.table("evaluations", pd.concat(rows, ignore_index=True))
        writer.tensors("weights", {f"k{k}": w for k, w in swa.items()})

    def solutions(self, shard: Shard) -> list[tuple[pd.DataFrame, torch.Tensor, dict[str, torch.Tensor]]]:
        """Every final model of a shard: (keys, flat weights, frozen tensors) per stage."""
        cfg, plrs = self.cfg, self.cfg.pretrain.lrs
        frozen = self.frozen_of(shard, len(plrs))
        pretrained = self.store.shard_tensors(shard.upstream("pretrain").name, "weights")["final"]
        swa = self.store.shard_tensors(shard.upstream("swa").name, "weights")
        out = [(model_keys("pretrain", shard, plrs), pretrained, frozen)]
        out += [(model_keys("swa", shard, plrs, swa_k=k), swa[f"k{k}"], frozen) for k in cfg.swa.ks]
        if cfg.finetune.lrs:
            finetuned = self.store.shard_tensors(shard.upstream("finetune").name, "weights")["final"]
            out.append((model_keys("finetune", shard, plrs, cfg.finetune.lrs), finetuned,
                        self.frozen_of(shard, len(plrs) * len(cfg.finetune.lrs))))
        return out


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


def write_training(writer, keys: pd.DataFrame, result: GridResult) -> None:
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
