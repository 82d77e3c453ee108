"""The tracking session: a background thread that feeds the loggers every shard as it commits.

Training never waits for a logger. The runtime wakes the thread when a shard commits (`wake`);
the thread also looks for newly committed shards every `poll` seconds, so shards committed by
other processes (Ray workers) are logged too. Each wake-up reads every new shard's tables from
the store (the tables the merged metrics are built from) and hands them to the loggers as one
batch. A logger that fails stops, with a one-line warning at the end; the store is unaffected
and `lrfeatures export DIR --to NAME` can log it again.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from ..store import ExperimentStore
from .feed import ShardTables

POLL_SECONDS = 5.0


def make_logger(name: str, root: Path, cfg: Any, per_model: bool):
    """The logger called `name` (its package imported here, in the session's thread)."""
    if name == "tensorboard":
        from .tensorboard_logger import TensorBoardLogger
        return TensorBoardLogger(root, cfg, per_model)
    if name == "mlflow":
        from .mlflow_logger import MlflowLogger
        return MlflowLogger(root, cfg, per_model)
    from .wandb_logger import WandbLogger
    return WandbLogger(root, cfg, per_model)


class Tracker:
    """Feeds the named loggers from a store's committed shards, off the caller's thread."""

    def __init__(self, root: str | Path, cfg: Any, names: list[str], per_model: bool = False,
                 shards: list[str] | None = None, poll: float = POLL_SECONDS):
        self.root, self.cfg, self.per_model, self.poll = Path(root), cfg, per_model, poll
        self.names = list(dict.fromkeys(names))
        self.planned = set(shards) if shards is not None else None  # None: every committed shard
        self.loggers: dict[str, Any] = {}
        self.failed: dict[str, str] = {}
        self.seen: set[str] = set()
        self.woken, self.stopping = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self.loop, name="lrfeatures-tracking", daemon=True)
        if self.names:
            self.thread.start()

    def wake(self, *_: Any) -> None:
        """A shard committed: look soon (cheap; called from the training loop's thread)."""
        self.woken.set()

    def loop(self) -> None:
        """Until closed: wait for a wake-up or the poll interval, then feed the new shards."""
        while not self.stopping.is_set():
            self.woken.wait(self.poll)
            self.woken.clear()
            self.feed_new()

    def feed_new(self) -> None:
        """Hand every committed shard not yet logged to every live logger, as one batch."""
        store = ExperimentStore(self.root)
        if not (self.root / "config.toml").is_file():
            return  # the store is not created yet: nothing may be written before it
        new = [n for n in store.done_shards() if n not in self.seen and (self.planned is None or n in self.planned)]
        if not new:
            return
        batch = [read_shard(store, n) for n in new]
        self.seen.update(new)
        for name in self.names:
            self.call(name, "shards", batch)

    def call(self, name: str, method: str, *args: Any) -> None:
        """logger.method(*args), opening the logger on first use; a failure stops only that logger."""
        if name in self.failed:
            return
        try:
            if name not in self.loggers:
                self.loggers[name] = make_logger(name, self.root, self.cfg, self.per_model)
            getattr(self.loggers[name], method)(*args)
        except Exception as err:  # noqa: BLE001  (a logger must never take the experiment down)
            self.failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

    def close(self, complete: bool = True, warn: bool = True) -> dict[str, str]:
        """Stop the thread; if `complete`, log the last shards, then summary.json and report.html.

        Returns {logger: problem} for the loggers that failed (each also a one-line warning if `warn`).
        """
        if not self.names:
            return {}
        self.stopping.set()
        self.woken.set()
        self.thread.join()
        if complete:
            self.feed_new()
        summary_path = self.root / "summary.json"
        summary = read_json(summary_path) if complete and summary_path.is_file() else None
        report = self.root / "report.html"
        for name in self.names:
            if name in self.loggers or (complete and summary is not None):
                self.call(name, "finish", summary, report if report.is_file() else None)
        for name, problem in self.failed.items() if warn else ():
            print(f"lrfeatures: warning: {name} logging stopped ({problem}); the store is complete: "
                  f"`lrfeatures export {self.root} --to {name}` logs it again", file=sys.stderr)
        return dict(self.failed)


def read_shard(store: ExperimentStore, name: str) -> ShardTables:
    """A committed shard's metrics and evaluations tables (empty where it has none)."""
    tables = {t: store.shard_table(name, t) for t in ("metrics", "evaluations")
              if store.has_file(name, f"{t}.parquet")}
    return ShardTables(name, **tables)


def read_json(path: Path) -> dict:
    """A JSON file's object ({} when unreadable)."""
    import json

    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
