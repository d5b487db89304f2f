"""One run per checkpoint directory: a lock file in --save that a second run refuses to take
(two runs on one directory would delete each other's temporary checkpoints and race on the
tracker). A lock left by a process that no longer runs on this host is taken over."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time

import torch.distributed as dist

from ..coordination import on_rank0
from .checkpointing import CheckpointError

LOCK_FILENAME = ".megatron_wesar.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take(path: str) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = json.load(f)
            except (OSError, ValueError):
                holder = {}
            stale = holder.get("host") == owner["host"] and not _alive(int(holder.get("pid", -1)))
            if not stale:
                raise CheckpointError(
                    f"checkpoint directory {os.path.dirname(path)} is in use by another run "
                    f"(pid {holder.get('pid')} on {holder.get('host')}, lock {path}); use another "
                    "--save directory, or remove the lock file if that run is gone") from None
            os.remove(path)  # its process is gone: take the lock over
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
        return
    raise CheckpointError(f"could not take the lock {path}")


def _release(path: str) -> None:
    try:
        with open(path) as f:
            if json.load(f).get("pid") == os.getpid():
                os.remove(path)
    except (OSError, ValueError):
        pass


@contextlib.contextmanager
def save_directory_lock(directory: str | None):
    """Hold the lock of checkpoint directory `directory` (None: nothing) for the block; every
    rank raises CheckpointError when another live run holds it (collective)."""
    if not directory:
        yield
        return
    path = os.path.join(os.path.abspath(directory), LOCK_FILENAME)

    def take():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _take(path)

    on_rank0(take)
    try:
        yield
    finally:
        if dist.get_rank() == 0:
            _release(path)
