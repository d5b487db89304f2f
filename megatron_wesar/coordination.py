"""How ranks coordinate outside the training math: run on rank 0 and share the result, agree on
failures, broadcast and gather small Python objects, merge the pipeline stages' dicts, and write
files atomically. All collectives are on the default (world) group unless a group is given."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch.distributed as dist


def on_rank0(fn: Callable):
    """Run `fn` on rank 0; every rank returns its result, or raises the error it raised."""
    payload = None
    if dist.get_rank() == 0:
        try:
            payload = (True, fn())
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            payload = (False, err)
    ok, value = broadcast_from_rank0(payload)
    if not ok:
        raise value
    return value


def gather_objects(value: Any, group=None) -> list:
    """Every rank's `value` (picklable), in rank order of `group`, on every rank."""
    size = dist.get_world_size(group)
    if size == 1:
        return [value]
    values = [None] * size
    dist.all_gather_object(values, value, group=group)
    return values


def agree(error: BaseException | None) -> None:
    """Raise on every rank when some rank failed (so that no rank waits in a collective that
    the failed ones never reach): each rank raises its own error, or the first rank's."""
    errors = gather_objects(error)
    if error is not None:
        raise error
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's `value` (picklable), on every rank."""
    if dist.get_world_size() == 1:
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_stage_dicts(values: dict) -> dict:
    """Merge dicts of all pipeline stages (keys are unique per stage); identity without PP."""
    from megatron.core import parallel_state

    stages = gather_objects(values, parallel_state.get_pipeline_model_parallel_group())
    return {k: v for stage in stages for k, v in stage.items()}


def atomic_write_json(path: str, obj: Any, **dump_kwargs) -> None:
    """Write `obj` as indented JSON to `path` through a temporary file and os.replace, so that a
    reader never sees a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, **dump_kwargs)
        f.write("\n")
    os.replace(tmp, path)
