"""The experiment store: one directory per experiment, the contract between stages.

Layout:
    DIR/config.toml                 resolved config and package version (written once)
    DIR/shards/<shard>/             one finished unit of work: tables (*.parquet), weights
                                    (*.safetensors) and done.json
    DIR/<table>.parquet             tables merged over all shards (derived, rebuilt at will)
    DIR/summary.json, figures/, report.html

A shard is written into a private temporary directory and renamed into place in one step,
so a shard directory is either complete or absent: an interrupted run leaves nothing that
looks finished, and several processes can work on different shards of one experiment.
Single files are written to a temporary name and renamed (atomic on POSIX).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import dump_toml, load_config, read_toml
from .errors import StoreError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_table(path: Path, table: pd.DataFrame) -> None:
    """Write a DataFrame as Parquet, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        table.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(value: Any) -> Any:
    """Nested data with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (NaN and inf become null)."""
    text = json.dumps(json_safe(data), indent=2, default=str, allow_nan=False)
    atomic_write_bytes(path, text.encode())


class ShardWriter:
    """Collects one shard's files in a private directory; `commit` publishes them at once."""

    def __init__(self, store: "ExperimentStore", shard: str):
        self.store, self.shard = store, shard
        store.shards_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=store.shards_dir, prefix=f".tmp-{shard}-"))

    def table(self, name: str, table: pd.DataFrame) -> None:
        """Add a table to the shard."""
        table.to_parquet(self.tmp / f"{name}.parquet", index=False)

    def tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Add a safetensors file to the shard."""
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  str(self.tmp / f"{name}.safetensors"))

    def commit(self, info: dict[str, Any]) -> None:
        """Publish the shard; if another process finished it first, keep theirs."""
        (self.tmp / "done.json").write_text(json.dumps({"shard": self.shard, "version": __version__,
                                                         "finished": time.time(), **info}))
        try:
            os.rename(self.tmp, self.store.shard_dir(self.shard))
        except OSError:
            if not self.store.is_done(self.shard):
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)

    def abort(self) -> None:
        """Drop the partial shard."""
        shutil.rmtree(self.tmp, ignore_errors=True)


class ExperimentStore:
    """Read and write one experiment directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.shards_dir = self.root / "shards"

    @classmethod
    def create(cls, root: str | Path, cfg: Any) -> "ExperimentStore":
        """Open `root` for `cfg`: write its config, or check that an existing one matches."""
        store = cls(root)
        text = f"# lrfeatures {__version__}\n" + dump_toml(cfg)
        path = store.root / "config.toml"
        if path.exists():
            existing = store.config()
            if dump_toml(existing) != dump_toml(cfg):
                raise StoreError(f"{store.root} holds an experiment with a different config; "
                                 "use a new --out directory, or the same settings to resume")
        else:
            store.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, text.encode())
        store.shards_dir.mkdir(exist_ok=True)
        return store

    def config(self) -> Any:
        """The experiment's resolved config."""
        path = self.root / "config.toml"
        if not path.is_file():
            raise StoreError(f"{self.root} is not an lrfeatures experiment (no config.toml); "
                             "give the --out directory of a run")
        return load_config(read_toml(str(path)))

    def shard_dir(self, shard: str) -> Path:
        """Directory of a shard (exists only once it is complete)."""
        return self.shards_dir / shard

    def is_done(self, shard: str) -> bool:
        """Whether a shard is complete."""
        return (self.shard_dir(shard) / "done.json").is_file()

    def writer(self, shard: str) -> ShardWriter:
        """Start writing a shard."""
        return ShardWriter(self, shard)

    def shard_table(self, shard: str, name: str) -> pd.DataFrame:
        """One table of a complete shard."""
        return pd.read_parquet(self.shard_dir(shard) / f"{name}.parquet")

    def shard_tensors(self, shard: str, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        """One safetensors file of a complete shard (safe loading: no pickles)."""
        return load_file(str(self.shard_dir(shard) / f"{name}.safetensors"), device=device)

    def done_shards(self) -> list[str]:
        """Names of the complete shards."""
        if not self.shards_dir.is_dir():
            return []
        return sorted(p.name for p in self.shards_dir.iterdir() if (p / "done.json").is_file())

    def clean_partial(self, prefix: str = "") -> None:
        """Remove temporary directories (of shards named `prefix`...) left by interrupted shards older than a minute."""
        if not self.shards_dir.is_dir():
            return
        for path in self.shards_dir.glob(f".tmp-{prefix}*"):
            if time.time() - path.stat().st_mtime > 60:
                shutil.rmtree(path, ignore_errors=True)

    def merge_table(self, name: str) -> pd.DataFrame:
        """Concatenate a table over all complete shards that have it, and save it at the top."""
        parts = [pd.read_parquet(self.shard_dir(s) / f"{name}.parquet") for s in self.done_shards()
                 if (self.shard_dir(s) / f"{name}.parquet").is_file()]
        table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        write_table(self.root / f"{name}.parquet", table)
        return table

    def table(self, name: str) -> pd.DataFrame:
        """A merged table at the top of the store."""
        path = self.root / f"{name}.parquet"
        if not path.is_file():
            raise StoreError(f"{path} is missing; re-run the experiment command with the same --out to finish it")
        return pd.read_parquet(path)
