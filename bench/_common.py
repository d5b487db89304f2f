"""Helpers shared by the benchmarks: two spawned gloo ranks, call counting, min/median/max."""
from __future__ import annotations

import contextlib
import os
import queue as queue_module
import socket
import statistics
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
STATS_HEADER = f"{'min ms':>9} {'median ms':>10} {'max ms':>9}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, port, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    from megatron_wesar.compat import enable_cpu_compat

    enable_cpu_compat()  # megatron-core on CPU (no-op where CUDA is present)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        results.put((rank, True, fn(rank, *args)))
    except BaseException:  # noqa: BLE001 - the traceback goes to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_two_ranks(fn, *args):
    """Run `fn(rank, *args)` on 2 spawned gloo ranks; return rank 0's (picklable) result.

    `fn` must be a module-level function. When a rank raises, both ranks are stopped and this
    raises RuntimeError with that rank's traceback.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(rank, port, fn, args, results))
             for rank in range(WORLD_SIZE)]
    for proc in procs:
        proc.start()
    reported = {}
    try:
        while len(reported) < WORLD_SIZE:
            try:
                rank, ok, payload = results.get(timeout=1.0)
            except queue_module.Empty:
                if any(proc.exitcode not in (None, 0) for proc in procs):
                    raise RuntimeError("a benchmark rank died before reporting") from None
                continue
            if not ok:
                raise RuntimeError(f"benchmark rank {rank} failed:\n{payload}")
            reported[rank] = payload
    finally:
        for proc in procs:
            if len(reported) < WORLD_SIZE and proc.is_alive():
                proc.terminate()
            proc.join()
    return reported[0]


@contextlib.contextmanager
def count_calls(owner, name: str):
    """Replace `owner.name` by a wrapper counting its calls for the duration; yields a one-item
    list holding the count."""
    original = getattr(owner, name)
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(owner, name, counted)
    try:
        yield calls
    finally:
        setattr(owner, name, original)


def max_over_ranks(samples: list) -> list:
    """Per sample, the largest of the ranks' values (a collective: every rank must call it)."""
    values = torch.tensor(samples, dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.tolist()


def spread(samples: list) -> tuple:
    """(min, median, max) of `samples`."""
    return min(samples), statistics.median(samples), max(samples)


def format_spread(samples: list) -> str:
    """min / median / max of `samples` (seconds) in milliseconds, aligned under STATS_HEADER."""
    low, mid, high = spread(samples)
    return f"{low * 1e3:>9.3f} {mid * 1e3:>10.3f} {high * 1e3:>9.3f}"
