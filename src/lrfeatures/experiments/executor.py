"""Run an experiment's shards in this process (local) or as tasks on a Ray cluster (ray).

Shards talk only through the experiment's store, so the same shards can run anywhere the
store's directory is visible (a local disk, or a shared file system mounted at the same path
on every node). The Ray driver:
    - opens the store (checking its identity), removes partial shards whose lease is stale and submits
      only the shards that are not done, so stopping and restarting it resumes the sweep;
    - passes each shard the ObjectRefs of the shards it depends on, so a fine-tuning shard
      starts as soon as its own pre-training shard finishes, not after the whole grid;
    - counts finished shards on one progress bar as `ray.wait` returns them;
    - merges the tables and writes the summary in one last task (it may need the device).
A worker that dies mid-shard is retried (Ray `max_retries`); exceptions are retried only if
transient (`transient_errors()`), never a user error such as ConfigError. A shard either
commits atomically or leaves only a hidden temporary directory, so a retry or a restart
recomputes exactly the shards that are not done.

Resources per shard come from `ExecutorConfig`, filled from the CLI flags `--cpus-per-shard`
and `--gpus-per-shard` rather than from the experiment config: they describe where a run
happens, not what it computes, so changing them must not change the experiment's identity
(its config.toml) and a sweep can be resumed on different hardware.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from ..config import dump_toml
from ..errors import ConfigError, LrfError
from ..plugins import load_plugins
from ..store import ExperimentStore, lease_ttl
from . import runtime

FAULT_ENV = "LRFEATURES_FAULT_ONCE"
INSTALL_HINT = "pip install 'lrfeatures[ray]'"
ATTEMPTS_DIR = "executor/attempts"


def transient_errors() -> tuple[type[BaseException], ...]:
    """Exceptions worth retrying: I/O hiccups (shared file systems) and GPU memory pressure."""
    import torch

    return (OSError, torch.cuda.OutOfMemoryError)


# ---------------------------------------------------------------- what to run

class Experiment(Protocol):
    """What an executor needs from a built experiment."""

    store: ExperimentStore

    def run_shard(self, shard: Any) -> bool: ...
    def run(self) -> dict: ...
    def finalize(self) -> dict: ...


@dataclass(frozen=True)
class ExperimentFactory:
    """A picklable recipe for an experiment: its config and its store directory (absolute)."""

    cfg: Any
    root: str
    allow_version_change: bool = False   # resume a store written by another package version (recorded)

    def __post_init__(self):
        # Ray workers run in their own working directory: a relative --out would land elsewhere.
        object.__setattr__(self, "root", str(Path(self.root).absolute()))
        self.recipe  # an unknown kind fails here, in one line

    @property
    def recipe(self) -> runtime.Recipe:
        """The recipe of this kind of experiment (from the runtime's table of kinds)."""
        return runtime.recipe_for(getattr(self.cfg, "kind", None))

    @property
    def unit(self) -> str:
        """What shard_cost counts (for the progress bar)."""
        return self.recipe.unit_name

    @property
    def key(self) -> tuple[str, str]:
        """Identity of the experiment (config text and directory), for caching in workers."""
        return dump_toml(self.cfg), self.root

    def build(self, progress: Callable[[int], None] | None = None) -> Experiment:
        """The experiment object, with its store opened (created, or checked against the config)."""
        return runtime.Experiment(self.cfg, self.root, progress=progress,
                                  allow_version_change=self.allow_version_change)

    def open_store(self) -> ExperimentStore:
        """The store alone, its identity checked (no device needed: safe on a driver without a GPU)."""
        recipe = runtime.check_recipe(self.cfg)
        return ExperimentStore.create(self.root, self.cfg, recipe.fingerprint(self.cfg), self.allow_version_change)

    def plan_shards(self) -> list:
        """All shards, each after the shards it depends on."""
        return runtime.plan_shards(self.cfg)

    def dependencies(self, shard) -> list:
        """The shards that must be done before `shard` runs."""
        return runtime.dependencies(self.cfg, shard)

    def shard_cost(self, shard) -> int:
        """Training work of a shard (model-steps or model-epochs)."""
        return runtime.shard_cost(self.cfg, shard)


@dataclass(frozen=True)
class ExecutorConfig:
    """Resources Ray reserves for each shard, and how often a crashed shard is retried."""

    cpus_per_shard: float = 1.0
    gpus_per_shard: float = 0.0
    max_retries: int = 3

    def validate(self) -> None:
        """Raise ConfigError on a negative or non-finite resource."""
        for flag, value in (("--cpus-per-shard", self.cpus_per_shard), ("--gpus-per-shard", self.gpus_per_shard)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{flag}={value} must be a number >= 0")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries={self.max_retries} must be >= 0")


def executor_config(cfg: Any, cpus_per_shard: float | None = None,
                    gpus_per_shard: float | None = None) -> ExecutorConfig:
    """Resources per shard: the flags, else 1 CPU, and 1 GPU when the experiment trains on CUDA."""
    on_cuda = str(cfg.engine.device).startswith("cuda")
    config = ExecutorConfig(cpus_per_shard=1.0 if cpus_per_shard is None else float(cpus_per_shard),
                            gpus_per_shard=(1.0 if on_cuda else 0.0) if gpus_per_shard is None
                            else float(gpus_per_shard))
    config.validate()
    if on_cuda and config.gpus_per_shard == 0:
        raise ConfigError(f"engine.device={cfg.engine.device!r} but --gpus-per-shard=0: Ray hides GPUs from "
                          "tasks that reserve none; give --gpus-per-shard > 0 (e.g. 0.25) or use --device cpu")
    return config


def make_executor(name: str, cfg: Any, address: str | None = None, cpus_per_shard: float | None = None,
                  gpus_per_shard: float | None = None, workers: int | None = None) -> "LocalExecutor | RayExecutor":
    """The executor the CLI asked for ('local', with `workers` processes, or 'ray')."""
    if name == "local":
        given = [flag for flag, value in (("--ray-address", address), ("--cpus-per-shard", cpus_per_shard),
                                          ("--gpus-per-shard", gpus_per_shard)) if value is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} {'only applies' if len(given) == 1 else 'only apply'} to Ray; "
                              "add --executor ray or drop them")
        return LocalExecutor(1 if workers is None else workers)
    if workers is not None:
        raise ConfigError("--workers only applies to --executor local; Ray runs as many shards as the "
                          "cluster has room for (--cpus-per-shard)")
    if name == "ray":
        return RayExecutor(executor_config(cfg, cpus_per_shard, gpus_per_shard), address=address)
    raise ConfigError(f"--executor {name!r} is unknown; use local or ray")


def run_experiment(factory: ExperimentFactory, executor: "LocalExecutor | RayExecutor | None" = None,
                   quiet: bool = True) -> dict:
    """Run every pending shard of an experiment on `executor` (default: local), then its summary."""
    return (executor or LocalExecutor()).run(factory, quiet=quiet)


def progress_bar(total: int, unit: str, quiet: bool, desc: str):
    """A tqdm bar."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=unit != "shard", disable=quiet, dynamic_ncols=True, desc=desc)


# ---------------------------------------------------------------- local

class LocalExecutor:
    """Every shard on this machine: in this process (workers = 1: exactly `experiment.run()`), or
    shared with workers - 1 more processes that claim shards through the store's leases.

    Each process walks the same plan; a shard another process holds, or whose upstream is not
    done, is polled until it is done, so when this process's walk ends every shard is done and
    it merges the tables. A worker that dies leaves a lease that goes stale, and the shard is
    then run again by whoever reaches it (the store's crash rule). Workers run at the recipe's
    thread count, so 2 workers of a 1-thread preset use the 2 cores of this machine.
    """

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise ConfigError(f"--workers={workers} must be >= 1")
        self.workers = workers

    def run(self, factory: ExperimentFactory, quiet: bool = True) -> dict:
        """Run the experiment with a progress bar over training work; returns its summary."""
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
        done = context.Value("q", 0)
        count = counter(done)
        with progress_bar(0, factory.unit, quiet, "training") as bar:
            def progress(n: int) -> None:
                count(n)
                bar.update(done.value - bar.n)  # every process's work, as of this update

            experiment = factory.build(progress=progress)  # the store exists before any worker opens it
            bar.total = sum(factory.shard_cost(s) for s in factory.plan_shards()
                            if not experiment.store.is_done(s.name))
            bar.refresh()
            experiment.store.clean_partial()  # before the workers start: their fresh leases are not partial
            workers = [context.Process(target=pool_worker, args=(factory, done), daemon=True,
                                       name=f"lrfeatures-worker-{i}") for i in range(1, self.workers)]
            for worker in workers:
                worker.start()
            try:
                experiment.run_shards()
            finally:
                for worker in workers:
                    worker.join(timeout=60)
                    if worker.is_alive():
                        worker.terminate()
            bar.update(done.value - bar.n)
            return experiment.finalize()


def counter(done: Any) -> Callable[[int], None]:
    """A progress callback adding to `done`, a multiprocessing Value shared by the local workers."""
    def count(n: int) -> None:
        with done.get_lock():
            done.value += n

    return count


def pool_worker(factory: ExperimentFactory, done: Any) -> None:
    """A local worker process: walk the plan, claiming what no other process holds."""
    load_plugins([])  # the parent's --plugin modules, passed down in $LRFEATURES_PLUGINS
    factory.build(progress=counter(done)).run_shards()


# ---------------------------------------------------------------- ray

def import_ray():
    """The ray module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray, which is not installed; "
                          f"install it with: {INSTALL_HINT}") from None
    return ray


class RayExecutor:
    """Shards as Ray tasks, wired by their dependencies; the store is the only shared state."""

    def __init__(self, config: ExecutorConfig | None = None, address: str | None = None,
                 log_to_driver: bool = True):
        self.config = config or ExecutorConfig()
        self.config.validate()
        self.address, self.log_to_driver = address, log_to_driver
        self.ray = import_ray()

    def connect(self) -> bool:
        """Join the running Ray (this process's, --ray-address, or RAY_ADDRESS), else start a local one.

        Returns True if this call connected (and so must disconnect afterwards).
        """
        ray = self.ray
        if ray.is_initialized():
            return False
        address = self.address or os.environ.get("RAY_ADDRESS")
        if not address:  # a private single-machine instance: no dashboard, nothing to share
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=self.log_to_driver, logging_level=logging.WARNING)
            return True
        try:
            ray.init(address=address, log_to_driver=self.log_to_driver, logging_level=logging.WARNING)
        except ValueError as err:
            raise ConfigError(f"--ray-address {address!r} is not usable ({err}); give auto, HOST:PORT "
                              "or ray://HOST:10001") from None
        except ConnectionError as err:
            raise ConfigError(f"cannot reach a Ray cluster at {address!r} ({err}); start one with "
                              "`ray start --head`, or drop --ray-address to use a local instance") from None
        return True

    def check_resources(self) -> None:
        """Fail early, instead of waiting forever, if no node can hold one shard."""
        nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        for flag, name, need in (("--cpus-per-shard", "CPU", self.config.cpus_per_shard),
                                 ("--gpus-per-shard", "GPU", self.config.gpus_per_shard)):
            most = max((n.get(name, 0.0) for n in nodes), default=0.0)
            if need > most:
                raise ConfigError(f"{flag}={need:g} but no node of the Ray cluster has more than {most:g} {name}s; "
                                  f"lower {flag}" + (" and use --device cpu" if name == "GPU" else "")
                                  + " or add bigger nodes")

    def run(self, factory: ExperimentFactory, quiet: bool = True) -> dict:
        """Run every pending shard on the cluster, then merge tables and write the summary there."""
        connected = self.connect()
        try:
            store = factory.open_store()  # a config mismatch fails here, before any task starts
            store.clean_partial()
            self.check_resources()
            pending = [s for s in factory.plan_shards() if not store.is_done(s.name)]
            self.run_shards(factory, pending, quiet)
            finalize = self.remote(finalize_in_worker)
            return self.get(finalize.options(**self.task_options()).remote(factory))
        finally:
            if connected:
                self.ray.shutdown()

    def run_shards(self, factory: ExperimentFactory, shards: list, quiet: bool) -> None:
        """Submit every shard with its upstream refs; wait for all; raise if any failed for good."""
        ray = self.ray
        task = self.remote(run_shard_in_worker)
        factory_ref = ray.put(factory)
        fault_marker = os.environ.get(FAULT_ENV, "")
        refs: dict[str, Any] = {}
        shard_of: dict[Any, Any] = {}
        for shard in shards:  # plan order: upstream shards are submitted first
            upstream = [refs[d.name] for d in factory.dependencies(shard) if d.name in refs]
            ref = task.options(name=shard.name, **self.task_options()).remote(
                factory_ref, shard, fault_marker, self.config.cpus_per_shard, *upstream)
            refs[shard.name], shard_of[ref] = ref, shard
        failures: list[tuple[Any, BaseException]] = []
        with progress_bar(len(shards), "shard", quiet, "shards") as bar:
            waiting = list(refs.values())
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                for ref in ready:
                    try:
                        ray.get(ref)
                        bar.update(1)
                    except ray.exceptions.RayError as err:  # a shard's own error, or its upstream's
                        failures.append((shard_of[ref], err))
                        bar.set_postfix(failed=len(failures))
        if failures:
            raise shard_failure(failures, len(shards))

    def task_options(self) -> dict[str, Any]:
        """Ray options of a shard task: its resources and retry policy."""
        return {"num_cpus": self.config.cpus_per_shard, "num_gpus": self.config.gpus_per_shard,
                "max_retries": self.config.max_retries,
                "retry_exceptions": list(transient_errors())}

    def remote(self, function: Callable):
        """`function` as a Ray remote function (made on first use: Ray is optional)."""
        return self.ray.remote(function)

    def get(self, ref: Any) -> Any:
        """ray.get, with a user error raised as itself (one line in the CLI)."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:
            if isinstance(getattr(err, "cause", None), LrfError):
                raise err.cause from None
            raise


def shard_failure(failures: list[tuple[Any, BaseException]], total: int) -> BaseException:
    """The error to raise for failed shards: a user error as itself, anything else summarized."""
    shard, first = failures[0]
    cause = getattr(first, "cause", None)
    if isinstance(cause, LrfError):
        return type(cause)(f"shard {shard.name}: {cause}")
    names = ", ".join(s.name for s, _ in failures[:5]) + (" ..." if len(failures) > 5 else "")
    error = RuntimeError(f"{len(failures)} of {total} shards failed ({names}); first: "
                         f"{type(cause or first).__name__}: {cause or first}. Finished shards are saved; "
                         "re-run the same command to resume")
    error.__cause__ = first
    return error


# ---------------------------------------------------------------- in the worker

_WORKER_EXPERIMENT: dict[tuple[str, str], Experiment] = {}


def worker_experiment(factory: ExperimentFactory, cpus: float) -> Experiment:
    """The experiment of this worker, built once per worker process (data stays cached)."""
    if factory.key not in _WORKER_EXPERIMENT:
        import torch

        torch.set_num_threads(max(1, int(cpus)))  # as many threads as CPUs reserved, never more
        _WORKER_EXPERIMENT.clear()  # one experiment per worker: drop other experiments' data
        _WORKER_EXPERIMENT[factory.key] = factory.build()
    return _WORKER_EXPERIMENT[factory.key]


def run_shard_in_worker(factory: ExperimentFactory, shard: Any, fault_marker: str, cpus: float,
                        *upstream: Any) -> dict[str, Any]:
    """Ray task: run one shard unless done. `upstream` holds the results of the shards it needs."""
    store = ExperimentStore(factory.root)
    if store.is_done(shard.name):
        return {"shard": shard.name, "ran": False}
    record_attempt(store, shard.name)
    experiment = worker_experiment(factory, cpus)
    with fault_once(experiment.store, fault_marker):
        while (ran := experiment.run_shard(shard)) is None:  # another worker (another driver) holds it
            time.sleep(min(1.0, lease_ttl() / 10))
    return {"shard": shard.name, "ran": ran}


def finalize_in_worker(factory: ExperimentFactory) -> dict:
    """Ray task: merge the shard tables and write summary.json."""
    return worker_experiment(factory, 1).finalize()


def record_attempt(store: ExperimentStore, shard: str) -> Path:
    """Leave a file per Ray attempt of a shard (an audit trail: retries, restarts)."""
    return store.record_attempt(shard, ATTEMPTS_DIR)


def attempts(root: str | Path) -> dict[str, list[dict]]:
    """The computation attempts recorded by Ray workers, per shard, oldest first."""
    return ExperimentStore(root).attempts(ATTEMPTS_DIR)


@contextmanager
def fault_once(store: ExperimentStore, marker: str) -> Iterator[None]:
    """Test seam: with LRFEATURES_FAULT_ONCE=<path> set for the driver, the first worker to reach a
    shard's commit while <path> exists deletes it and dies (os._exit) - after the shard's work,
    before it is published - as a crashed or preempted node would. Does nothing otherwise.
    """
    if not marker:
        yield
        return
    make_writer = store.writer

    def writer(name: str, lease=None):
        shard_writer = make_writer(name, lease)
        commit = shard_writer.commit

        def commit_or_die(info: dict) -> None:
            try:
                os.remove(marker)  # atomic claim: exactly one worker dies
            except FileNotFoundError:
                return commit(info)
            sys.stdout.flush()
            os._exit(1)

        shard_writer.commit = commit_or_die
        return shard_writer

    store.writer = writer
    try:
        yield
    finally:
        del store.writer
