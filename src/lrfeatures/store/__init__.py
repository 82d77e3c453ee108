"""The experiment store: one directory per experiment, kept like a small database.

Layout:
    DIR/config.toml                 resolved config, package version and data fingerprint (created once,
                                    exclusively: two runs racing for one DIR cannot both own it)
    DIR/versions.json               package-version changes a resume allowed (--allow-version-change)
    DIR/shards/<shard>/             one finished unit of work: tables (*.parquet), weights
                                    (*.safetensors) and done.json, which lists every file with its size
                                    and sha256, and the content digest of each upstream shard it read
    DIR/shards/.lease-<shard>       a worker's claim on a shard: host, pid, time; its mtime is the heartbeat
    DIR/shards/.tmp-<shard>-<token>/  a shard being written by the holder of lease <token>
    DIR/shards/.broken-<shard>-<t>/ a damaged or incomplete shard set aside (kept for inspection)
    DIR/<table>.parquet             tables merged over all shards (derived, rebuilt at will)
    DIR/summary.json, figures/, report.html

Commit: files are written and fsync'ed in the private .tmp directory, done.json last, then the
directory is renamed into place and its parent fsync'ed, so a shard directory with a valid
done.json is complete. Reading a shard verifies every file against done.json (once per process
while the files are unchanged); a damaged shard counts as not done and is recomputed.
Files follow the user's umask.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..config import dump_toml, load_config, read_toml
from ..errors import ConfigError, StoreError
from .files import (HOST, atomic_write_bytes, clean_temp_files, file_hash, files_digest, follow_umask, fsync_dir,
                    fsync_file, json_safe, temp_prefix, write_json, write_table)
from .lease import LEASE_TTL_ENV, Lease, lease_is_live, lease_ttl, read_lease

__all__ = ["HOST", "LEASE_TTL_ENV", "ExperimentStore", "Lease", "ShardWriter", "atomic_write_bytes", "check_out_dir",
           "json_safe", "lease_ttl", "verify_store", "write_json", "write_table"]
_VERIFIED: dict[tuple, str] = {}          # (shard dir, stat of its files) -> content digest, this process


# ---------------------------------------------------------------- shards

class ShardWriter:
    """Collects one shard's files in a private directory; `commit` publishes them at once."""

    def __init__(self, store: "ExperimentStore", shard: str, lease: Lease | None = None):
        self.store, self.shard, self.lease = store, shard, lease
        store.shards_dir.mkdir(parents=True, exist_ok=True)
        token = lease.token if lease else secrets.token_hex(8)
        self.tmp = store.shards_dir / f".tmp-{shard}-{token}"
        self.tmp.mkdir()
        follow_umask(self.tmp, directory=True)

    def table(self, name: str, table: pd.DataFrame) -> None:
        """Add a table to the shard."""
        table.to_parquet(self.tmp / f"{name}.parquet", index=False)

    def tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Add a safetensors file to the shard."""
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  str(self.tmp / f"{name}.safetensors"))

    def commit(self, info: dict[str, Any]) -> None:
        """Publish the shard (files listed with size and hash, all fsync'ed); if another worker won, keep theirs."""
        files = {}
        for path in sorted(self.tmp.iterdir()):
            fsync_file(path)
            follow_umask(path)
            files[path.name] = {"size": path.stat().st_size, "sha256": file_hash(path)}
        done = {"shard": self.shard, "version": __version__, "finished": time.time(), **info, "files": files}
        (self.tmp / "done.json").write_text(json.dumps(done))
        fsync_file(self.tmp / "done.json")
        follow_umask(self.tmp / "done.json")
        fsync_dir(self.tmp)
        try:
            os.rename(self.tmp, self.store.shard_dir(self.shard))
        except OSError:
            if not self.store.is_done(self.shard):
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        fsync_dir(self.store.shards_dir)

    def abort(self) -> None:
        """Drop the partial shard."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def identity_header(version: str, fingerprint: str) -> str:
    """The comment lines of config.toml that carry what the TOML cannot: version and data fingerprint."""
    return f"# lrfeatures {version}\n# data {fingerprint}\n"


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create `path` with `data` unless it exists; True if this call created it (no check-then-write race)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            os.fsync(handle.fileno())
        follow_umask(tmp)
        try:
            os.link(tmp, path)  # atomic, and complete when visible (also on NFS)
        except FileExistsError:
            return False
        fsync_dir(path.parent)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


class ExperimentStore:
    """Read and write one experiment directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.shards_dir = self.root / "shards"

    @classmethod
    def create(cls, root: str | Path, cfg: Any, fingerprint: str = "",
               allow_version_change: bool = False) -> "ExperimentStore":
        """Open `root` for `cfg`: create its config exclusively, or check that the experiment's identity matches."""
        store = cls(root)
        check_out_dir(store.root)
        text = identity_header(__version__, fingerprint) + dump_toml(cfg)
        try:
            store.root.mkdir(parents=True, exist_ok=True)
            if not create_exclusive(store.root / "config.toml", text.encode()):
                store.check_identity(cfg, fingerprint, allow_version_change)
            store.shards_dir.mkdir(exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot write the experiment directory {store.root} ({err.strerror or err}); "
                             "give a writable --out") from None
        clean_temp_files(store.root)
        return store

    def check_identity(self, cfg: Any, fingerprint: str, allow_version_change: bool) -> None:
        """Refuse a resume whose config, data fingerprint or package version differ from the store's."""
        if dump_toml(self.config()) != dump_toml(cfg):
            raise StoreError(f"{self.root} holds an experiment with a different config; "
                             "use a new --out directory, or the same settings to resume")
        header = self.header()
        if fingerprint and header.get("data") and header["data"] != fingerprint:
            raise StoreError(f"{self.root} was computed on different data (fingerprint {header['data'][:24]}, now "
                             f"{fingerprint[:24]}); restore the data or use a new --out directory")
        version = self.version()
        if version != __version__:
            if not allow_version_change:
                raise StoreError(f"{self.root} was written by lrfeatures {version}, this is {__version__}; "
                                 "pass --allow-version-change to resume it anyway, or use a new --out directory")
            changes = self.version_changes() + [{"from": version, "to": __version__, "time": time.time()}]
            write_json(self.root / "versions.json", changes)

    def header(self) -> dict[str, str]:
        """The `# key value` comment lines at the top of config.toml."""
        lines = (self.root / "config.toml").read_text(errors="replace").splitlines()
        pairs = (line[2:].split(" ", 1) for line in lines if line.startswith("# ") and " " in line[2:])
        return {key: value.strip() for key, value in pairs}

    def version_changes(self) -> list[dict]:
        """The version changes allowed so far (versions.json), oldest first."""
        path = self.root / "versions.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else []
        except ValueError:
            raise StoreError(f"{path} is damaged; restore it or use a new --out directory") from None

    def version(self) -> str:
        """The package version the store's shards were last written with."""
        changes = self.version_changes()
        return changes[-1]["to"] if changes else self.header().get("lrfeatures", "unknown")

    def config(self) -> Any:
        """The experiment's resolved config."""
        path = self.root / "config.toml"
        if not path.is_file():
            raise StoreError(f"{self.root} is not an lrfeatures experiment (no config.toml); "
                             "give the --out directory of a run")
        try:
            return load_config(read_toml(str(path)))
        except (ConfigError, UnicodeDecodeError) as err:
            raise StoreError(f"{path} is damaged ({str(err)[:120]}); restore it or use a new --out "
                             "directory") from None

    def shard_dir(self, shard: str) -> Path:
        """Directory of a shard (exists only once it is complete)."""
        return self.shards_dir / shard

    # ----- integrity
    def done_record(self, shard: str) -> dict[str, Any] | None:
        """A shard's done.json, or None if absent or unreadable."""
        try:
            record = json.loads((self.shard_dir(shard) / "done.json").read_bytes())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def problem(self, shard: str) -> str | None:
        """Why a shard is not complete and intact (None if it is); verified once per process while unchanged."""
        folder = self.shard_dir(shard)
        if not folder.is_dir():
            return "missing"
        record = self.done_record(shard)
        if record is None:
            return "no readable done.json"
        files = record.get("files")
        if files is None:  # written before 0.2 listed files: trusted as it is
            return None
        if not isinstance(files, dict) or not all(isinstance(f, dict) and {"size", "sha256"} <= set(f)
                                                  for f in files.values()):
            return "done.json has no valid file list"
        try:
            stats = tuple((n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns) for n in sorted(files))
        except OSError:
            return f"{next(n for n in sorted(files) if not (folder / n).is_file())} is missing"
        key = (str(folder.resolve()), stats)
        if key in _VERIFIED:
            return None
        for name, (_, size, _) in zip(sorted(files), stats):
            if size != files[name]["size"]:
                return f"{name} has {size} bytes, done.json says {files[name]['size']}"
            if file_hash(folder / name) != files[name]["sha256"]:
                return f"{name} does not match its sha256 in done.json"
        _VERIFIED[key] = files_digest(files)
        return None

    def is_done(self, shard: str) -> bool:
        """Whether a shard is complete and intact."""
        return self.problem(shard) is None

    def digest(self, shard: str) -> str:
        """The content digest of a done shard (what dependants record in their done.json)."""
        record = self.done_record(shard) or {}
        return files_digest(record.get("files") or {"legacy": record.get("finished")})

    def set_aside(self, shard: str, reason: str) -> None:
        """Move a damaged or incomplete shard out of the way (kept for inspection), with a one-line warning."""
        folder = self.shard_dir(shard)
        if not folder.exists():
            return
        target = self.shards_dir / f".broken-{shard}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
        # One line on stderr, like the CLI's errors (a Python warning would add its source line).
        print(f"lrfeatures: warning: shard {shard}: {reason}; set aside as {target.name}, recomputing it",
              file=sys.stderr, flush=True)
        os.rename(folder, target)
        _VERIFIED.clear()

    # ----- leases and partial shards
    def lease_path(self, shard: str) -> Path:
        """The lease file of a shard."""
        return self.shards_dir / f".lease-{shard}"

    def claim(self, shard: str) -> Lease | None:
        """A lease on the shard, or None while another live worker holds it."""
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        return Lease.acquire(self.lease_path(shard))

    def claimed(self, shard: str) -> bool:
        """Whether a live worker holds the shard's lease."""
        return lease_is_live(self.lease_path(shard))

    def writer(self, shard: str, lease: Lease | None = None) -> ShardWriter:
        """Start writing a shard (in a temp directory named by the lease's token)."""
        return ShardWriter(self, shard, lease)

    def shard_table(self, shard: str, name: str) -> pd.DataFrame:
        """One table of a complete shard."""
        return pd.read_parquet(self.verified_file(shard, f"{name}.parquet"))

    def shard_tensors(self, shard: str, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        """One safetensors file of a complete shard (safe loading: no pickles)."""
        return load_file(str(self.verified_file(shard, f"{name}.safetensors")), device=device)

    def verified_file(self, shard: str, name: str) -> Path:
        """The path of a file of an intact shard; StoreError naming the damage otherwise."""
        problem = self.problem(shard)
        if problem:
            raise StoreError(f"shard {shard} of {self.root} is damaged ({problem}); re-run the experiment "
                             "command with the same --out to recompute it")
        return self.shard_dir(shard) / name

    def has_file(self, shard: str, name: str) -> bool:
        """Whether a shard holds a file (from done.json's list; an old shard's directory otherwise)."""
        files = (self.done_record(shard) or {}).get("files")
        return name in files if files is not None else (self.shard_dir(shard) / name).is_file()

    def done_shards(self) -> list[str]:
        """Names of the complete, intact shards."""
        if not self.shards_dir.is_dir():
            return []
        return sorted(p.name for p in self.shards_dir.iterdir()
                      if not p.name.startswith(".") and self.is_done(p.name))

    def clean_partial(self, prefix: str = "") -> None:
        """Remove temp directories (of shards named `prefix`...) whose owner's lease is stale or absent."""
        if not self.shards_dir.is_dir():
            return
        for path in self.shards_dir.glob(f".tmp-{prefix}*"):
            shard, _, token = path.name[len(".tmp-"):].rpartition("-")
            lease = self.lease_path(shard)
            if not (lease_is_live(lease) and read_lease(lease).get("token") == token):
                shutil.rmtree(path, ignore_errors=True)
        clean_temp_files(self.root)

    def record_attempt(self, shard: str, folder: str = "computations") -> Path:
        """Leave a file per computation attempt of a shard (an audit trail: retries, restarts, workers)."""
        started = time.time()
        path = self.root / folder / shard / f"{time.time_ns()}-{HOST}-{os.getpid()}.json"
        write_json(path, {"shard": shard, "host": HOST, "pid": os.getpid(), "started": started})
        return path

    def attempts(self, folder: str = "computations") -> dict[str, list[dict]]:
        """The computation attempts recorded per shard, oldest first."""
        base = self.root / folder
        if not base.is_dir():
            return {}

        def started(path: Path) -> int:
            return int(path.name.split("-")[0])  # file names start with time_ns

        return {d.name: [json.loads(p.read_text()) for p in sorted(d.glob("*.json"), key=started)]
                for d in sorted(base.iterdir()) if d.is_dir()}

    # ----- merged tables
    def merge_table(self, name: str, shards: list[str] | None = None) -> pd.DataFrame:
        """Concatenate a table over the given shards (default: every complete one) and save it at the top.

        With `shards`, every one must be intact (StoreError otherwise): a merge never misses a shard.
        """
        if shards is not None:
            for shard in shards:
                self.verified_file(shard, "done.json")  # StoreError for a missing or damaged shard
        parts = [self.shard_table(s, name) for s in (self.done_shards() if shards is None else shards)
                 if self.has_file(s, f"{name}.parquet")]
        table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        write_table(self.root / f"{name}.parquet", table)
        return table

    def table(self, name: str) -> pd.DataFrame:
        """A merged table at the top of the store."""
        path = self.root / f"{name}.parquet"
        if not path.is_file():
            raise StoreError(f"{path} is missing; re-run the experiment command with the same --out to finish it")
        try:
            return pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001  (pyarrow raises many kinds for a damaged file)
            raise StoreError(f"{path} is damaged ({type(err).__name__}); re-run the experiment command with "
                             "the same --out to rebuild it") from None


# ---------------------------------------------------------------- checks of a whole directory

def is_store(root: Path) -> bool:
    """Whether a directory looks like an lrfeatures store (config.toml or shards/)."""
    return (root / "config.toml").is_file() or (root / "shards").is_dir()


def check_out_dir(root: Path) -> None:
    """Refuse an --out that is a file, lies under a file, or is a non-empty folder that is no store."""
    for parent in [root, *root.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is" if parent == root else f"lies under {parent}, which is"
                raise StoreError(f"--out {root} {where} a file; give a folder path")
            break
    if root.is_dir() and not is_store(root) and any(not p.name.startswith(".config.toml.") for p in root.iterdir()):
        raise StoreError(f"--out {root} is a non-empty folder that is not an lrfeatures experiment; "
                         "give an empty or new folder")
    if root.is_dir() and is_store(root) and not (root / "config.toml").is_file():
        raise StoreError(f"{root} holds shards but no config.toml; restore config.toml or use a new --out")
    if str(root.resolve()).startswith(("/proc/", "/sys/", "/dev/")) or str(root.resolve()) in ("/proc", "/sys"):
        raise StoreError(f"--out {root} lies in a system folder; give a folder of yours")


def verify_store(root: str | Path, shards: list[str] | None = None) -> list[tuple[str, str]]:
    """(shard, reason) for every bad shard of a store: damaged, incomplete, or expected but missing."""
    store = ExperimentStore(root)
    store.config()
    bad = []
    present = sorted(p.name for p in store.shards_dir.iterdir()) if store.shards_dir.is_dir() else []
    for name in present:
        if name.startswith(".tmp-") or name.startswith(".broken-"):
            continue
        if not name.startswith("."):
            problem = store.problem(name)
            if problem:
                bad.append((name, problem))
    for name in shards or []:
        if name not in present:
            bad.append((name, "missing"))
    return bad
