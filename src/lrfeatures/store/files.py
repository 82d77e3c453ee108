"""Files of the store: atomic writes, fsync, the user's umask, content hashes, temp files left by a kill."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd

HOST = socket.gethostname()


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path, directory: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp (0600/0700) the mode the user's umask asks for."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename is durable only once its directory is)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync directories
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def temp_prefix(path: Path) -> str:
    """Hidden temp name next to `path`, tagged with host and pid so a cleaner knows whether its writer lives."""
    return f".{path.name}.~{HOST}~{os.getpid()}~"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp) on a temp file beside `path`, fsync it, then rename it over `path` (readers see
    the old content or the whole new one; a failure leaves no temp file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path))
    os.close(fd)
    try:
        write(tmp)
        fsync_file(Path(tmp))
        follow_umask(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_table(path: Path, table: pd.DataFrame) -> None:
    """Write a DataFrame as Parquet, atomically."""
    atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))


def process_alive(host: str, pid: int) -> bool:
    """Whether a process of this host runs (another host's processes count as alive)."""
    if host != HOST:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temp_files(folder: Path) -> None:
    """Remove temp files of atomic writes whose writer (this host, by pid) is gone: leftovers of a kill."""
    if not folder.is_dir():
        return
    for path in folder.glob(".*.~*~*~*"):
        match = re.search(r"\.~(.+)~(\d+)~[^~]*$", path.name)
        if match and path.is_file() and not process_alive(match[1], int(match[2])):
            path.unlink(missing_ok=True)


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


def file_hash(path: Path) -> str:
    """sha256 of a file (measured faster than blake2b here: SHA extensions), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def files_digest(files: dict[str, Any]) -> str:
    """One digest of a shard's file list (names, sizes, hashes): what its dependants record."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
