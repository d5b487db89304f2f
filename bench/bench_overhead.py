"""Training-step time of a WeSaR GPT over the same model ungated (TP=2, CPU, gloo).

Spawns 2 gloo ranks. Both build three engines of one shape: the baseline (no gates), WeSaR with
the fused step-level gate reduction and cheapest gate placement (the default), and WeSaR with
each partial-sum gate gradient all-reduced in backward at complete-gradient placements (the
placement before the fused reduction existed). Full steps (forward, backward, finalize, optimizer)
of the three are interleaved; medians are compared.

    python bench/bench_overhead.py --quick
    python bench/bench_overhead.py --model tiny     # the tiny preset: tokens/s, WeSaR vs baseline

Ends with `wesar_step_time_ratio: R` (WeSaR default / baseline) and
`wesar_in_backward_step_time_ratio: R0`; with --model tiny also the tokens/s figures.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODELS = {
    # matmuls dominate: hidden 512, d_ff 2048
    "matmul": ["--num-layers", "2", "--hidden-size", "512", "--ffn-hidden-size", "2048",
               "--num-attention-heads", "8", "--seq-length", "256", "--micro-batch-size", "4",
               "--global-batch-size", "8"],
    "tiny": ["--preset", "tiny"],
}
VARIANTS = ("baseline", "wesar", "wesar_in_backward")


def _engine(args, variant):
    from megatron_wesar.data.corpus import BYTE_VOCAB_SIZE
    from megatron_wesar.training.engine import build_engine
    from megatron_wesar.training.pretrain import (
        optimizer_config_from_args,
        transformer_config_from_args,
        wesar_config_from_args,
    )

    wesar = wesar_config_from_args(args)
    if variant == "baseline":
        wesar = replace(wesar, enabled=False)
    elif variant == "wesar_in_backward":
        wesar = replace(wesar, defer_gate_grad_reduction=False)
    return build_engine(
        transformer_config_from_args(args), wesar, BYTE_VOCAB_SIZE, args.seq_length,
        optimizer_config_from_args(args),
    )


def _worker(rank, world, port, argv, reps, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from megatron_wesar.training.arguments import parse_pretrain_args
    from megatron_wesar.data.sources import EmbeddedCorpus, microbatches
    from megatron_wesar.training.engine import initialize_parallel, train_step

    dist.init_process_group("gloo")
    args = parse_pretrain_args(argv + ["--tensor-model-parallel-size", "2", "--lr", "1e-4"])
    initialize_parallel(2, 1, args.seed)
    engines = {v: _engine(args, v) for v in VARIANTS}
    data = EmbeddedCorpus(args.seq_length, args.seed, max_bytes=2_000_000)
    num_micro = args.global_batch_size // args.micro_batch_size
    times = {v: [] for v in VARIANTS}
    for rep in range(reps + 2):  # two warm-up rounds
        for variant in VARIANTS if rep % 2 == 0 else reversed(VARIANTS):
            batch = data.train_batch(rep, args.global_batch_size)
            dist.barrier()
            start = time.perf_counter()
            train_step(engines[variant], microbatches(batch, 0, 1, args.micro_batch_size),
                       num_micro, args.micro_batch_size, args.seq_length)
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if rep >= 2:
                times[variant].append(elapsed.item())
    if rank == 0:
        queue.put((times, args.global_batch_size * args.seq_length))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def main(argv=None) -> int:
    """Run the benchmark and print the table and figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--model", choices=sorted(MODELS), default="matmul")
    parser.add_argument("--reps", type=int, default=None)
    opts = parser.parse_args(argv)
    reps = opts.reps or (10 if opts.quick else 30)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, MODELS[opts.model], reps, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    times, tokens_per_step = queue.get()
    for p in procs:
        p.join()
    medians = {v: statistics.median(t) for v, t in times.items()}
    base = medians["baseline"]
    print(f"model={opts.model} TP=2 gloo CPU, {reps} interleaved steps per variant")
    print(f"{'variant':<20} {'median ms':>10} {'tokens/s':>10} {'vs baseline':>12}")
    for variant in VARIANTS:
        m = medians[variant]
        print(f"{variant:<20} {m * 1e3:>10.1f} {tokens_per_step / m:>10.0f} {m / base:>12.3f}")
    if opts.model == "tiny":
        print(f"baseline_tokens_per_s: {tokens_per_step / base:.0f}")
        print(f"wesar_tokens_per_s: {tokens_per_step / medians['wesar']:.0f}")
    print(f"wesar_in_backward_step_time_ratio: {medians['wesar_in_backward'] / base:.4f}")
    print(f"wesar_step_time_ratio: {medians['wesar'] / base:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
