"""One experiment runtime: stages, shards, the shard loop, resume, merge, summary and report hooks.

An experiment kind is a `Recipe`: its config class, its stages (each naming the stages it
needs), the units a stage is cut into (e.g. one data seed and chunk of training seeds), and a
worker whose `run_<stage>(shard, writer)` methods compute one shard. Everything else happens
here, once for every kind:

    plan        every (unit, stage) shard, each after the shards it needs
    run_shard   skip if current (intact, built on today's upstream); claim a lease; compute into a
                private directory; commit or abort. Shards held by another worker are come back to.
    resume      a finished shard is never recomputed, so re-running an experiment resumes it
    finalize    merge each table over the shards, write summary.json (the report reads the store)
    tracking    loggers (TensorBoard, MLflow, W&B) fed each shard's tables as it commits, off the
                shard loop's thread (`tracking_session`); `export_experiment` does it for a finished store

`KINDS` is the single table of experiment kinds that the CLI, the store's users and the Ray
executor read. Register a new kind with `register_kind(MyRecipe())`.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..analysis.measurements import measurements_for
from ..analysis.summary import write_summary
from ..config import dump_toml, load_config
from ..errors import ConfigError, LrfError
from ..models.registry import model_entry, model_names
from ..store import HOST, ExperimentStore, ShardWriter, lease_ttl
from ..tracking import Tracker, check_loggers

Progress = Callable[[int], None]
SLOW_ENV = "LRFEATURES_SLOW_SHARD"
# Called with (store, shard name) after every commit in this process; the tracking session's wake-up.
COMMIT_LISTENERS: list[Callable[[ExperimentStore, str], None]] = []


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

    def fingerprint(self, cfg: Any) -> str:
        """The data's identity, read and checked before anything is written (default: the config's hash)."""
        return "config-sha256:" + hashlib.sha256(dump_toml(cfg).encode()).hexdigest()

    def memory_estimate(self, cfg: Any) -> float:
        """Bytes the largest shard's models need at once (default: a dense estimate from model.width/depth)."""
        return dense_memory_estimate(cfg)

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
    check_recipe(cfg)
    return cfg


def check_recipe(cfg: Any) -> Recipe:
    """The memory bound (before any model is built), then the recipe's own edge checks."""
    recipe = recipe_for(cfg.kind)
    check_seeds(cfg)
    check_memory(cfg, recipe.memory_estimate(cfg))
    recipe.check(cfg)
    return recipe


def check_seeds(cfg: Any) -> None:
    """Seeds must be whole numbers in 0..2**63-1 (they become int64 table columns and torch seeds)."""
    section = getattr(cfg, "seeds", None)
    for name, seeds in (vars(section) if hasattr(section, "__dict__") else {}).items():
        for seed in seeds if isinstance(seeds, list) else ():
            if not (isinstance(seed, int) and 0 <= seed < 2**63):
                raise ConfigError(f"seeds.{name} holds {seed}; seeds must be whole numbers in 0..2**63-1")


def dense_memory_estimate(cfg: Any) -> float:
    """Bytes of one shard's models: (depth x width^2 + width) weights x models x (kept checkpoints + 3) x 4.

    An upper-bound style estimate for MLP-like widths; recipes with a better one override
    `Recipe.memory_estimate`. Models: every (training seed, PLR, FLR) a shard may hold at once.
    """
    model = getattr(cfg, "model", None)
    if model is None or not hasattr(model, "width") or not hasattr(model, "depth"):
        return 0.0
    weights = float(model.depth) * float(model.width) ** 2 + float(model.width)
    grids = [getattr(getattr(cfg, s, None), "lrs", None) or [0] for s in ("pretrain", "finetune")]
    models = len(getattr(getattr(cfg, "seeds", None), "train", None) or [0]) * len(grids[0]) * len(grids[1])
    copies = int(getattr(cfg, "checkpoints_kept", 1) or 1) + 3  # checkpoints + weights, gradients, update
    return weights * models * copies * 4


def check_memory(cfg: Any, estimate: float) -> None:
    """ConfigError, with the estimate and the budget, when the models cannot fit engine.memory_budget_gb."""
    budget = getattr(getattr(cfg, "engine", None), "memory_budget_gb", None)
    if not budget or estimate <= budget * 2**30:
        return
    model = getattr(cfg, "model", None)
    size = f"model.width={model.width}, model.depth={model.depth}" if model is not None else "the models"
    raise ConfigError(f"{size} need about {estimate / 2**30:.3g} GB, over engine.memory_budget_gb={budget:g}; "
                      "use a smaller model or grid, or raise the budget")


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
              needs: list[Shard] = (), info: dict[str, Any] | None = None) -> bool | None:
    """Run a shard unless it is current: True if it ran, False if it was done, None if it must wait
    (another worker holds it or a shard it needs). The one place shards are claimed, commit or abort."""
    if shard_problem(store, shard, needs) is None:
        return False
    if any(not store.is_done(u.name) for u in needs):
        return None  # an upstream shard is pending (ours or another worker's): come back later
    lease = store.claim(shard.name)
    if lease is None:
        return None
    try:
        problem = shard_problem(store, shard, needs)  # fresh: another worker may have finished it
        if problem is None:
            return False
        store.set_aside(shard.name, problem)
        store.record_attempt(shard.name)
        compute_into_store(store, shard, compute, lease, needs, info)
    finally:
        lease.release()
    return True


def compute_into_store(store: ExperimentStore, shard: Shard, compute: Callable, lease: Any,
                       needs: list[Shard], info: dict[str, Any] | None) -> None:
    """Compute a claimed shard into its private directory and commit it, or abort on any error."""
    started = time.time()
    writer = store.writer(shard.name, lease)
    try:
        slow_down(shard.name)
        extra = compute(shard, writer) or {}
        writer.commit({"seconds": time.time() - started, **(info or {}), **extra, "host": HOST, "pid": os.getpid(),
                       "upstream": {u.name: store.digest(u.name) for u in needs}})
    except BaseException:
        writer.abort()
        raise
    for listener in list(COMMIT_LISTENERS):
        listener(store, shard.name)


def shard_problem(store: ExperimentStore, shard: Shard, needs: list[Shard] = ()) -> str | None:
    """Why a shard must be (re)computed: missing, damaged, or built on upstream shards that changed since."""
    problem = store.problem(shard.name)
    if problem is not None:
        return problem
    recorded = (store.done_record(shard.name) or {}).get("upstream")
    for upstream in needs if recorded is not None else ():  # shards of 0.1 recorded no upstream
        if not store.is_done(upstream.name) or recorded.get(upstream.name) != store.digest(upstream.name):
            return f"built on an earlier {upstream.name}"
    return None


def slow_down(name: str) -> None:
    """Test seam: $LRFEATURES_SLOW_SHARD=<shard>=<seconds> makes that shard take that much longer."""
    target, _, seconds = os.environ.get(SLOW_ENV, "").partition("=")
    if target and target == name:
        time.sleep(float(seconds))


def run_until_done(shards: list[Shard], run_one: Callable[[Shard], bool | None]) -> None:
    """Run every shard in plan order; come back to those that must wait until they are done."""
    waiting = list(shards)
    while waiting:
        results = [(shard, run_one(shard)) for shard in waiting]
        waiting = [shard for shard, ran in results if ran is None]
        if waiting and not any(ran for _, ran in results):
            time.sleep(min(1.0, lease_ttl() / 10))  # other workers hold them: poll, not spin


def run_measurements(ctx: Any, writer: ShardWriter) -> None:
    """An analyze shard: every automatic measurement of `ctx.kind`, each writing its own table."""
    for measurement in measurements_for(ctx.kind):
        table = measurement.measure(ctx)
        if table is not None:
            writer.table(measurement.name, table)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU thread count set to n (0: the cores actually available, see threads.py) for
    the block, then restored. The C kernel's workers follow this count too."""
    from .. import threads  # here, not at the top: this edit is confined to this function

    before = torch.get_num_threads()
    wanted = n or min(before, threads.available_cores())  # a cgroup CPU quota caps torch's default
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def tracking_session(cfg: Any, root: str | Path, loggers: list[str] | tuple[str, ...] = (),
                     per_model: bool = False) -> Iterator[Tracker]:
    """Loggers fed every shard as it commits, for the block; at its end (no error), the last
    shards, summary.json and report.html (so write the report inside the block). No loggers: a no-op."""
    check_loggers(loggers)
    tracker = Tracker(root, cfg, list(loggers), per_model)
    COMMIT_LISTENERS.append(tracker.wake)
    complete = False
    try:
        yield tracker
        complete = True
    finally:
        COMMIT_LISTENERS.remove(tracker.wake)
        tracker.close(complete)


def export_experiment(root: str | Path, loggers: list[str] | tuple[str, ...], per_model: bool = False) -> None:
    """Log a store's committed shards, summary.json and report.html to the loggers (`lrfeatures export`)."""
    check_loggers(loggers)
    cfg = ExperimentStore(root).config()
    # Every committed shard, also of stores whose plan changed since (their shards are still the experiment's).
    tracker = Tracker(root, cfg, list(loggers), per_model, poll=3600)
    failed = tracker.close(complete=True, warn=False)
    if failed:
        name, problem = next(iter(failed.items()))
        raise LrfError(f"export of {root} to {name} failed ({problem}); the store is unchanged, fix the cause "
                       "and run the export again")


class Experiment:
    """One experiment of any kind: its store, its recipe's worker, and the runtime around them."""

    def __init__(self, cfg: Any, root: str | Path, progress: Progress | None = None,
                 allow_version_change: bool = False):
        self.cfg = cfg
        self.recipe = check_recipe(cfg)  # before anything is written: a typo must not leave a directory behind
        if hasattr(cfg, "engine"):  # the device must exist here (a config may be written elsewhere)
            resolve_device(cfg.engine.device)
        fingerprint = self.recipe.fingerprint(cfg)  # the data is read and checked before the store is touched
        self.store = ExperimentStore.create(root, cfg, fingerprint, allow_version_change)
        self.worker = self.recipe.open(cfg, self.store, progress)

    def plan(self) -> list[Shard]:
        """All shards, each after the shards it needs."""
        return plan_shards(self.cfg)

    def run_shard(self, shard: Shard) -> bool | None:
        """Run one shard unless it is current; True if it ran, None if it must wait for another worker."""
        compute = getattr(self.worker, f"run_{shard.stage}")
        return run_shard(self.store, shard, compute, dependencies(self.cfg, shard),
                         {"device": str(getattr(self.worker, "device", "cpu"))})

    def run(self) -> dict:
        """Run every pending shard in order, then merge the tables and write summary.json."""
        self.store.clean_partial()
        self.run_shards()
        return self.finalize()

    def run_shards(self) -> None:
        """Run or wait for every shard of the plan (other workers may hold some), at the recipe's threads."""
        with torch_threads(self.recipe.threads(self.cfg)):
            run_until_done(self.plan(), self.run_shard)

    def finalize(self) -> dict:
        """Merge shard tables into the experiment's tables (every planned shard intact) and write its summary."""
        self.recipe.before_finalize(self.worker)
        expected = sorted(s.name for s in self.plan())
        for name in self.recipe.all_tables(self.cfg):
            self.store.merge_table(name, expected)
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
