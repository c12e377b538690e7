"""One run per out_dir: an exclusive lock file held for the run's lifetime.

The lock is a file created atomically (O_CREAT | O_EXCL, which shared cluster filesystems honour where flock may not
work) holding the holder's host, pid and start time. A lock left by a process that no longer exists on this host is
stale (the run was killed with SIGKILL or the machine rebooted) and is taken over with a notice; a lock held on
another host cannot be checked from here, so it is refused with the way to remove it if that job is dead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.fabric import Fabric

from training.setup import TrainingError

LOCK_FILE = "run.lock"


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown holder (the lock file is empty or unreadable)"
    return f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"


def _in_use(out_dir: Path, holder: dict, path: Path) -> TrainingError:
    return TrainingError(f"{out_dir} is in use by another run: {_describe(holder)}; if that job is dead, remove {path}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # half-written by a holder killed between create and write, or removed meanwhile
    return holder if isinstance(holder, dict) else {}


def _is_stale(holder: dict) -> bool:
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


def _create(path: Path) -> bool:
    """Create the lock file naming this process; False if it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(_holder(), f)
    return True


def acquire(out_dir: Path) -> Path:
    """Take the lock of `out_dir` (created if missing) or raise TrainingError naming its holder."""
    path = out_dir / LOCK_FILE
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"out_dir {out_dir}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if _create(path):
            return path
        holder = _read_holder(path)
        if not _is_stale(holder):
            raise _in_use(out_dir, holder, path)
        print(f"taking over the stale lock {path} of {_describe(holder)}, which is no longer running", file=sys.stderr)
        path.unlink(missing_ok=True)
        if _create(path):
            return path
        raise _in_use(out_dir, _read_holder(path), path)  # another run took it over first
    except OSError as e:
        raise TrainingError(f"{out_dir}: cannot write the run directory ({e.strerror})") from None


@contextmanager
def out_dir_lock(out_dir: Path, fabric: Fabric) -> Iterator[None]:
    """Hold the lock of `out_dir` while the block runs. Rank 0 takes it; every rank learns of a refusal and raises,
    so no rank waits forever for one that has stopped."""
    path, refusal = None, None
    if fabric.global_rank == 0:
        try:
            path = acquire(out_dir)
        except TrainingError as e:
            refusal = str(e)
    refusal = fabric.broadcast(refusal)
    if refusal is not None:
        raise TrainingError(refusal)
    try:
        yield
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
