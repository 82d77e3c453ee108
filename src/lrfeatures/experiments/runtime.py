"""One experiment runtime: stages, shards, the shard loop, resume, merge, summary and report hooks.

An experiment kind is a `Recipe`: its config class, its stages (each naming the stages it
needs), the units a stage is cut into (e.g. one data seed and chunk of training seeds), and a
worker whose `run_<stage>(shard, writer)` methods compute one shard. Everything else happens
here, once for every kind:

    plan        every (unit, stage) shard, each after the shards it needs
    run_shard   skip if done; check upstream; compute into a private directory; commit or abort
    resume      a finished shard is never recomputed, so re-running an experiment resumes it
    finalize    merge each table over the shards, write summary.json (the report reads the store)

`KINDS` is the single table of experiment kinds that the CLI, the store's users and the Ray
executor read. Register a new kind with `register_kind(MyRecipe())`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..analysis.measurements import measurements_for
from ..analysis.summary import write_summary
from ..config import load_config
from ..errors import ConfigError
from ..models.registry import model_entry, model_names
from ..store import ExperimentStore, ShardWriter

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Stage:
    """A stage of a recipe and the stages whose shards (of the same unit) it needs."""

    name: str
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Shard:
    """One unit of work: a stage over one unit of a recipe (e.g. a data seed and its training seeds)."""

    stage: str
    unit: Any            # hashable, recipe-defined, with a `label` used in the shard's name

    @property
    def name(self) -> str:
        """Directory name in the store (unique within an experiment)."""
        return f"{self.stage}-{self.unit.label}"

    def upstream(self, stage: str) -> "Shard":
        """The shard of another stage over the same unit."""
        return Shard(stage, self.unit)

    def __getattr__(self, name: str) -> Any:
        # Recipes read their unit's fields straight off the shard (shard.data_seed, ...).
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "unit"), name)


class Recipe:
    """What one experiment kind computes. Subclasses set the class attributes and `units`, `open`."""

    kind: str = ""
    config_class: type = object
    unit_name: str = "model-step"            # what `cost` counts, for the progress bar
    stages: tuple[Stage, ...] = ()
    tables: tuple[str, ...] = ()             # merged into DIR/<table>.parquet (measurement tables are added)

    def active_stages(self, cfg: Any) -> list[str]:
        """The stages this config needs, in dependency order."""
        return [s.name for s in self.stages]

    def units(self, cfg: Any) -> list[Any]:
        """The units each stage is cut into, in plan order."""
        raise NotImplementedError

    def cost(self, cfg: Any, shard: Shard) -> int:
        """Training work of a shard (0 for evaluation-only shards); used for progress."""
        return 0

    def check(self, cfg: Any) -> None:
        """Raise the user-facing error for anything the config's own validation cannot see."""

    def threads(self, cfg: Any) -> int:
        """torch CPU threads while shards run (0: leave torch's setting)."""
        return 0

    def open(self, cfg: Any, store: ExperimentStore, progress: Progress | None) -> Any:
        """The worker that computes shards: `run_<stage>(shard, writer)` methods and a `device`."""
        raise NotImplementedError

    def before_finalize(self, worker: Any) -> None:
        """Anything the summary needs that the shards did not write (e.g. dataset.json)."""

    def summarize(self, store: ExperimentStore) -> dict:
        """Write and return summary.json from the merged tables (the standard summary by default)."""
        return write_summary(store)

    def report(self, root: Path) -> Path:
        """Draw the figures and report.html of a finished experiment; returns the page's path."""
        from ..report import write_report

        return write_report(root)

    def all_tables(self, cfg: Any) -> tuple[str, ...]:
        """The recipe's tables plus those of its automatic measurements."""
        extra = tuple(m.name for m in measurements_for(self.kind) if m.name not in self.tables)
        return self.tables + extra


KINDS: dict[str, Recipe] = {}


def register_kind(recipe: Recipe) -> Recipe:
    """Make an experiment kind known to the CLI, the executors and `load_experiment_config`."""
    from ..config import register_config_kind

    KINDS[recipe.kind] = recipe
    register_config_kind(recipe.kind, recipe.config_class)
    return recipe


def recipe_for(kind: str) -> Recipe:
    """The recipe of an experiment kind (one-line error naming the known kinds)."""
    if kind not in KINDS:
        raise ConfigError(f"experiment kind {kind!r} cannot run here; use one of: {', '.join(KINDS)}")
    return KINDS[kind]


def load_experiment_config(source: str | dict, overrides: list[str] | tuple[str, ...] = (),
                           kind: str | None = None) -> Any:
    """Load, override and validate a config, then run its recipe's edge checks (nothing is written)."""
    cfg = load_config(source, overrides, kind=kind)
    recipe_for(cfg.kind).check(cfg)
    return cfg


# ---------------------------------------------------------------- plan

def plan_shards(cfg: Any) -> list[Shard]:
    """All shards of an experiment, each listed after the shards it needs."""
    recipe = recipe_for(cfg.kind)
    active = recipe.active_stages(cfg)
    return [Shard(stage, unit) for unit in recipe.units(cfg) for stage in active]


def dependencies(cfg: Any, shard: Shard) -> list[Shard]:
    """The shards that must be complete before `shard` can run."""
    recipe = recipe_for(cfg.kind)
    active = recipe.active_stages(cfg)
    needs = next(s.needs for s in recipe.stages if s.name == shard.stage)
    return [shard.upstream(s) for s in needs if s in active]


def shard_cost(cfg: Any, shard: Shard) -> int:
    """Training work of one shard in the recipe's unit."""
    return recipe_for(cfg.kind).cost(cfg, shard)


def pending_cost(cfg: Any, store: ExperimentStore) -> int:
    """Training work still to do."""
    return sum(shard_cost(cfg, s) for s in plan_shards(cfg) if not store.is_done(s.name))


# ---------------------------------------------------------------- the shard loop

def run_shard(store: ExperimentStore, shard: Shard, compute: Callable[[Shard, ShardWriter], Any],
              needs: list[Shard] = (), info: dict[str, Any] | None = None) -> bool:
    """Run a shard unless it is done; True if it ran. The one place shards commit or abort."""
    if store.is_done(shard.name):
        return False
    for upstream in needs:
        if not store.is_done(upstream.name):
            raise RuntimeError(f"shard {shard.name} needs {upstream.name} first")
    started = time.time()
    writer = store.writer(shard.name)
    try:
        extra = compute(shard, writer) or {}
        writer.commit({"seconds": time.time() - started, **(info or {}), **extra})
    except BaseException:
        writer.abort()
        raise
    return True


def run_measurements(ctx: Any, writer: ShardWriter) -> None:
    """An analyze shard: every automatic measurement of `ctx.kind`, each writing its own table."""
    for measurement in measurements_for(ctx.kind):
        table = measurement.measure(ctx)
        if table is not None:
            writer.table(measurement.name, table)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU thread count set to n (0: unchanged) for the block, then restored."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Experiment:
    """One experiment of any kind: its store, its recipe's worker, and the runtime around them."""

    def __init__(self, cfg: Any, root: str | Path, progress: Progress | None = None):
        self.cfg = cfg
        self.recipe = recipe_for(cfg.kind)
        self.recipe.check(cfg)  # before anything is written: a typo must not leave a directory behind
        if hasattr(cfg, "engine"):  # the device must exist here (a config may be written elsewhere)
            resolve_device(cfg.engine.device)
        self.store = ExperimentStore.create(root, cfg)
        self.worker = self.recipe.open(cfg, self.store, progress)

    def plan(self) -> list[Shard]:
        """All shards, each after the shards it needs."""
        return plan_shards(self.cfg)

    def run_shard(self, shard: Shard) -> bool:
        """Run one shard unless it is complete; True if it ran."""
        compute = getattr(self.worker, f"run_{shard.stage}")
        return run_shard(self.store, shard, compute, dependencies(self.cfg, shard),
                         {"device": str(getattr(self.worker, "device", "cpu"))})

    def run(self) -> dict:
        """Run every pending shard in order, then merge the tables and write summary.json."""
        self.store.clean_partial()
        with torch_threads(self.recipe.threads(self.cfg)):
            for shard in self.plan():
                self.run_shard(shard)
        return self.finalize()

    def finalize(self) -> dict:
        """Merge shard tables into the experiment's tables and write its summary."""
        self.recipe.before_finalize(self.worker)
        for name in self.recipe.all_tables(self.cfg):
            self.store.merge_table(name)
        return self.recipe.summarize(self.store)


def resolve_device(name: str) -> torch.device:
    """The training device, checked to exist."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"engine.device={name!r} but CUDA is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"engine.device={name!r} is not a device; use cpu or cuda[:N]") from None


def check_model_input(name: str, input_kind: str, kind: str) -> None:
    """One-line error unless model `name` is registered and takes `input_kind` inputs."""
    if model_entry(name).input_kind != input_kind:
        raise ConfigError(f"model.name={name!r} does not take {input_kind} inputs, so it cannot run a {kind} "
                          f"experiment; use one of: {', '.join(model_names(input_kind))}")
