"""Leases: a worker's exclusive claim on a shard, safe on shared file systems (no flock).

A lease is a file created with O_CREAT|O_EXCL that holds its owner's host, pid and a token; its
mtime is the heartbeat, renewed by a thread while the shard runs. It is stale when the heartbeat
is older than the TTL ($LRFEATURES_LEASE_TTL, default 120 s), or at once when its owner is a
dead process of this host. Breaking a stale lease renames it first, so two breakers never both win.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .files import HOST, process_alive

LEASE_TTL_ENV = "LRFEATURES_LEASE_TTL"   # seconds without a heartbeat before a lease is stale (tests: short)
DEFAULT_LEASE_TTL = 120.0


def lease_ttl() -> float:
    """Seconds without a heartbeat after which a lease is stale ($LRFEATURES_LEASE_TTL; default 120)."""
    text = os.environ.get(LEASE_TTL_ENV, "")
    try:
        return float(text) if text else DEFAULT_LEASE_TTL
    except ValueError:
        raise ConfigError(f"${LEASE_TTL_ENV}={text!r} must be a number of seconds") from None


class Lease:
    """An exclusive claim on one shard: a file created with O_EXCL, its mtime renewed by a heartbeat thread."""

    def __init__(self, path: Path, token: str):
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{path.name}", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, path: Path) -> "Lease | None":
        """The lease, or None while another worker's heartbeat is fresh (a stale lease is broken)."""
        token = secrets.token_hex(8)
        for _ in range(2):  # a second try after breaking a stale lease
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if not break_stale_lease(path):
                    return None
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump({"host": HOST, "pid": os.getpid(), "time": time.time(), "token": token}, handle)
            return cls(path, token)
        return None

    def _beat(self) -> None:
        """Renew the heartbeat every quarter TTL until released."""
        while not self._stop.wait(lease_ttl() / 4):
            try:
                now = time.time()
                os.utime(self.path, (now, now))
            except OSError:
                return

    def held(self) -> bool:
        """Whether the lease file is still ours (a stalled worker's lease may have been broken)."""
        return read_lease(self.path).get("token") == self.token

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        self._thread.join()
        if self.held():
            self.path.unlink(missing_ok=True)


def read_lease(path: Path) -> dict[str, Any]:
    """A lease's content ({} if absent or unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def lease_is_live(path: Path) -> bool:
    """Whether a lease exists with a heartbeat younger than the TTL, held by no known-dead process of this host."""
    try:
        fresh = time.time() - path.stat().st_mtime <= lease_ttl()
    except FileNotFoundError:
        return False
    owner = read_lease(path)
    # A worker killed on this host is known dead at once; elsewhere only its silent heartbeat tells.
    return fresh and (not owner or process_alive(owner.get("host", ""), int(owner.get("pid", 0))))


def break_stale_lease(path: Path) -> bool:
    """Remove a stale lease; True if the shard is free to claim again. Works without flock (NFS, Ray)."""
    if lease_is_live(path):
        return False
    stale = read_lease(path).get("token")
    moved = path.with_name(f"{path.name}.broken-{secrets.token_hex(4)}")
    try:
        os.rename(path, moved)  # atomic: of two breakers, one moves the file and the other finds none
    except FileNotFoundError:
        return True
    if read_lease(moved).get("token") != stale:  # we moved a fresh lease made in between: give it back
        try:
            os.link(moved, path)
        except OSError:
            pass
        moved.unlink(missing_ok=True)
        return False
    moved.unlink(missing_ok=True)
    return True
