"""Claim files: one process at a time may own a cell or an artifact key, across processes and
machines sharing a results or cache folder. A claim left by a dead process on this host is stale
and taken over; a claim from another host is respected (its liveness cannot be checked).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path


def _holder(path: Path) -> str | None:
    """Who holds the claim at ``path`` ("host pid"), or None when it is stale or unreadable."""
    try:
        host, _, pid = path.read_text().partition(" ")
    except OSError:
        return None
    if host != socket.gethostname():
        return f"{host} {pid}"  # liveness on another machine cannot be checked: respect the claim
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return None
    except PermissionError:
        pass  # alive, owned by another user
    try:  # a zombie (dead, not yet reaped, e.g. under a container init that never reaps) is dead
        if Path(f"/proc/{int(pid)}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            return None
    except (OSError, IndexError):
        pass
    return f"{host} {pid}"


def try_claim(path: Path) -> str | None:
    """Create the claim file ``path`` ("host pid") for this process: None when it is now ours,
    else its live holder. A claim left by a dead process on this host is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _holder(path)
            if holder is not None:
                return holder
            path.unlink(missing_ok=True)  # stale
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{socket.gethostname()} {os.getpid()}")
        return None


class ClaimLock:
    """Wait for the claim file ``path`` (see :func:`try_claim`), release on exit."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> ClaimLock:
        while try_claim(self.path) is not None:
            time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)
