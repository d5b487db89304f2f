"""Benchmark the fused gate-gradient all-reduce against the ways it could otherwise be done.

Spawns 2 gloo ranks on this machine. For 64, 256 and 1024 gates (shape (1,) fp32 each) it times
  per_gate:   one dist.all_reduce per gate;
  coalesced:  Megatron's coalesced all-reduce, as finalize_model_grads does it for
              sequence-parallel params (_flatten_dense_tensors -> one all_reduce ->
              _unflatten_dense_tensors -> copy_ back);
  fallback:   megatron_wesar's pure-PyTorch path (used when _C is not built);
  fused:      megatron_wesar.gate_reduce.allreduce_gate_grads through the C++ extension
              (includes its non-finite check, which the others do not do);
  floor:      one dist.all_reduce of an already packed fp32 buffer of the same size: the cost
              of the collective alone, a lower bound for every one-collective method.
Methods are interleaved within every repetition (order rotating), each timed on rank 0 after a
barrier, one call per sample (as in training: one call per step); the table reports medians. The last two lines are the speedups of the fused path at 256
gates: baseline median / fused median.

    python bench/bench_gate_reduce.py --quick
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors  # what Megatron uses

GATE_COUNTS = (64, 256, 1024)
METHODS = ("per_gate", "coalesced", "fallback", "fused", "floor")



def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def per_gate(grads, group):
    for g in grads:
        dist.all_reduce(g, group=group)


def coalesced(grads, group):
    # megatron/core/distributed/finalize_model_grads.py, _allreduce_non_tensor_model_parallel_grads
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    for buf, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        buf.copy_(synced)


def _worker(rank, world_size, port, reps, warmup, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from megatron_wesar import gate_reduce

        if not gate_reduce.extension_available():
            raise SystemExit("megatron_wesar._C is not built: pip install --no-build-isolation -e .")
        fns = {
            "per_gate": per_gate,
            "coalesced": coalesced,
            "fallback": gate_reduce._allreduce_gate_grads_torch,
            "fused": gate_reduce.allreduce_gate_grads,
        }
        group = dist.group.WORLD
        times = {}
        packed = {}
        for n in GATE_COUNTS:
            init = [torch.full((1,), 1e-3 * (i + 1) * (rank + 1)) for i in range(n)]
            grads = [t.clone() for t in init]
            packed[n] = torch.cat(init)
            fns["floor"] = lambda _grads, grp, buf=packed[n]: dist.all_reduce(buf, group=grp)
            for rep in range(warmup + reps):
                shift = rep % len(METHODS)
                for method in METHODS[shift:] + METHODS[:shift]:
                    with torch.no_grad():
                        for g, v in zip(grads, init):  # keep values bounded (untimed)
                            g.copy_(v)
                        packed[n].copy_(torch.cat(init))
                    dist.barrier()
                    t0 = time.perf_counter()
                    fns[method](grads, group)
                    elapsed = time.perf_counter() - t0
                    if rep >= warmup:
                        times.setdefault((n, method), []).append(elapsed)
        if rank == 0:
            queue.put({k: statistics.median(v) for k, v in times.items()})
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (< 1 minute)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per method")
    args = parser.parse_args(argv)
    reps = args.reps or (60 if args.quick else 200)
    warmup = 3 if args.quick else 10

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, 2, port, reps, warmup, queue)) for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode != 0 for proc in procs) or queue.empty():
        print("benchmark failed", file=sys.stderr)
        return 1
    medians = queue.get()

    print(f"# 2 gloo ranks, {reps} interleaved repetitions, median wall time per call on rank 0")
    print(f"{'gates':>6}  {'method':<10}  {'median ms':>10}  {'vs fused':>9}")
    for n in GATE_COUNTS:
        for method in METHODS:
            t = medians[(n, method)]
            print(f"{n:>6}  {method:<10}  {t * 1e3:>10.3f}  {t / medians[(n, 'fused')]:>8.1f}x")
    fused = medians[(256, "fused")]
    print(f"speedup_vs_per_gate: {medians[(256, 'per_gate')] / fused:.2f}")
    print(f"speedup_vs_coalesced: {medians[(256, 'coalesced')] / fused:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
