"""Spawn real gloo process groups for tests (a torchtitan-style CPU harness).

`run_distributed(fn, world_size, *args)` starts `world_size` processes, initialises
`torch.distributed` with gloo in each, calls `fn(rank, world_size, *args)` and returns the list
of per-rank return values (which must be picklable). A failure on any rank raises in the parent
with that rank's traceback.
"""
from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Set by conftest.py for each test: only tests marked `parallel` or `oracle` may spawn process
# groups, so that `make test-fast` (which deselects them) really runs no multi-process test.
spawn_allowed = True


def free_port() -> int:
    """Return a TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _to_bytes(result) -> bytes:
    """Serialise a result so that its tensors outlive the worker (no shared-memory handles)."""
    buffer = io.BytesIO()
    torch.save(result, buffer)
    return buffer.getvalue()


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        from megatron_wesar.compat import enable_cpu_compat

        enable_cpu_compat()  # what the megatron-wesar entry points do (no-op with CUDA)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, True, _to_bytes(result)))
    except BaseException:  # noqa: BLE001 - the traceback goes to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0):
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return per-rank results."""
    if not spawn_allowed:
        raise RuntimeError("this test spawns process groups: mark it @pytest.mark.parallel")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, queue), daemon=False)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results, failures = {}, []
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not failures:
        try:
            rank, ok, payload = queue.get(timeout=1.0)
        except queue_module.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                failures.append(f"a rank died with exit code {dead[0]} before reporting")
            elif time.monotonic() > deadline:
                failures.append(f"timed out after {timeout:.0f} s")
            continue
        if ok:
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            failures.append(f"rank {rank} failed:\n{payload}")
    for proc in procs:
        proc.join(timeout=5 if failures else timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if failures:
        raise RuntimeError("\n".join(failures))
    return [results[rank] for rank in range(world_size)]
