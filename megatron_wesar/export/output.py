"""Export directories appear whole or not at all: everything is written into a fresh sibling
directory, which rank 0 renames to its final name once complete (removed on failure)."""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager

import torch.distributed as dist

from ..coordination import on_rank0


def on_writer(fn):
    """Run `fn` on rank 0 only (every rank gets its result or its error); without
    torch.distributed, here."""
    if not dist.is_initialized():
        return fn()
    return on_rank0(fn)


def refuse_existing(out: str) -> None:
    """FileExistsError when `out` exists: an export never overwrites."""
    if os.path.lexists(out):
        raise FileExistsError(f"{os.path.abspath(out)} already exists: export writes a new "
                              "directory (remove it or choose another name)")


@contextmanager
def staged_directory(out: str):
    """Yield a fresh temporary directory next to `out` (the same path on every rank); when the
    block completes it becomes `out`, when it raises it is removed. FileExistsError when `out`
    exists already (an export never overwrites)."""
    out = os.path.abspath(out)

    def make() -> str:
        refuse_existing(out)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp-{uuid.uuid4().hex[:12]}"
        os.mkdir(tmp)
        return tmp

    tmp = on_writer(make)
    try:
        yield tmp
        if dist.is_initialized():
            dist.barrier()
        on_writer(lambda: os.rename(tmp, out))
    except BaseException:
        if not dist.is_initialized() or dist.get_rank() == 0:  # no collective: ranks may differ
            shutil.rmtree(tmp, ignore_errors=True)
        raise
