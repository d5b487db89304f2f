"""Training-step time of a WeSaR GPT over the same model ungated (TP=2 with sequence
parallelism, CPU, gloo).

Spawns 2 gloo ranks. Both build three engines of one shape: the baseline (no gates), WeSaR with
the fused step-level gate reduction (the default: under sequence parallelism every gate gradient
but the embedding's is a TP partial sum, and `finalize_model_grads` sums them in one collective
per step),
and WeSaR with each partial-sum gate gradient all-reduced inside backward instead (one
collective per gate per microbatch). Before timing, each rank checks that the WeSaR engines have
gates, that the default variant's are deferred TP partial sums reduced by at least one fused
collective per step, and that the in-backward variant defers none and issues at least one
collective per gate and microbatch more than the default; it raises otherwise. Then, after 5
untimed warm-up rounds, full steps (forward, backward, finalize, optimizer) of the three are
interleaved (order alternating each round); a step's time is the slower rank's.

    python bench/bench_overhead.py --quick
    python bench/bench_overhead.py --model tiny     # the tiny preset

Prints min / median / max per variant and ends with `wesar_in_backward_step_time_ratio: R0`
(in-backward / baseline medians), `wesar_step_time_ratio_min:` (ratio of the minima),
`wesar_step_time_ratio_max:` (ratio of the maxima) and `wesar_step_time_ratio: R` (median WeSaR
default / median baseline).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch.distributed as dist
from _common import (
    STATS_HEADER,
    count_calls,
    format_spread,
    max_over_ranks,
    run_two_ranks,
    spread,
)

MODELS = {
    # matmuls dominate: hidden 512, d_ff 2048
    "matmul": ["--num-layers", "2", "--hidden-size", "512", "--ffn-hidden-size", "2048",
               "--num-attention-heads", "8", "--seq-length", "256", "--micro-batch-size", "4",
               "--global-batch-size", "8"],
    "tiny": ["--preset", "tiny"],
}
PARALLEL = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--lr", "1e-4"]
VARIANTS = ("baseline", "wesar", "wesar_in_backward")
WARMUP_ROUNDS = 5
MIN, MEDIAN, MAX = range(3)  # indices into spread()


def _engine(args, variant):
    from megatron_wesar.data.corpus import BYTE_VOCAB_SIZE
    from megatron_wesar.training.engine import build_engine
    from megatron_wesar.training.pretrain import build_optimizer_config, build_transformer_config

    wesar = args.wesar
    if variant == "baseline":
        wesar = replace(wesar, enabled=False)
    elif variant == "wesar_in_backward":
        wesar = replace(wesar, defer_gate_grad_reduction=False)
    return build_engine(
        build_transformer_config(args), wesar, BYTE_VOCAB_SIZE, args.model.seq_length,
        build_optimizer_config(args),
    )


def _check_gate_reductions(engines, step, num_micro) -> dict:
    """Raise unless the WeSaR variants have gates whose TP partial-sum gradients are reduced as
    their names say (one untimed step of each); return what was counted."""
    from megatron.core.tensor_parallel import mappings

    from megatron_wesar import grads
    from megatron_wesar.layers import gate_parameters

    gates = {variant: gate_parameters(engine.module) for variant, engine in engines.items()}
    if gates["baseline"] or not gates["wesar"]:
        raise RuntimeError(f"gate counts {({v: len(g) for v, g in gates.items()})}: the baseline "
                           "must have none and WeSaR some")
    deferred = [name for name, gate in gates["wesar"] if gate.tp_partial_grad]
    if not deferred:
        raise RuntimeError("no WeSaR gate has a TP partial-sum gradient: the fused reduction "
                           "has nothing to do (is sequence parallelism on?)")
    in_backward = [m for m in engines["wesar_in_backward"].module.modules()
                   if getattr(m, "_partial_gate_grad", False)]
    still_deferred = [name for name, gate in gates["wesar_in_backward"] if gate.tp_partial_grad]
    if still_deferred or not in_backward:
        raise RuntimeError(f"the in-backward variant defers {still_deferred} and reduces "
                           f"{len(in_backward)} gates in backward")
    counts = {}
    for variant in ("wesar", "wesar_in_backward"):
        with count_calls(grads, "allreduce_gate_grads") as fused, \
                count_calls(mappings, "_reduce") as tp_all_reduces:
            step(variant, 0)
        counts[variant] = (fused[0], tp_all_reduces[0])
    if counts["wesar"][0] < 1:
        raise RuntimeError("the default variant's step ran no fused gate-gradient all-reduce")
    extra = counts["wesar_in_backward"][1] - counts["wesar"][1]
    if extra < len(in_backward) * num_micro:
        raise RuntimeError(f"the in-backward variant ran {extra} TP all-reduces more than the "
                           f"default, fewer than {len(in_backward)} gates x {num_micro} "
                           "microbatches")
    return {"gates": len(gates["wesar"]), "deferred": len(deferred),
            "fused_calls": counts["wesar"][0], "in_backward_all_reduces": extra}


def _worker(rank, argv, reps):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from megatron_wesar.data.sources import EmbeddedCorpus, microbatches
    from megatron_wesar.training.arguments import parse_pretrain_args
    from megatron_wesar.training.engine import initialize_parallel, train_step

    args = parse_pretrain_args(argv + PARALLEL)
    seq, micro, global_batch = (args.model.seq_length, args.training.micro_batch_size,
                                args.training.global_batch_size)
    initialize_parallel(2, 1, args.training.seed)
    engines = {v: _engine(args, v) for v in VARIANTS}
    data = EmbeddedCorpus(seq, args.training.seed, max_bytes=2_000_000)
    num_micro = global_batch // micro

    def step(variant, index):
        batch = data.train_batch(index, global_batch)
        train_step(engines[variant], microbatches(batch, 0, 1, micro), num_micro, micro, seq)

    checks = _check_gate_reductions(engines, step, num_micro)
    times = {v: [] for v in VARIANTS}
    for rnd in range(WARMUP_ROUNDS + reps):
        for variant in VARIANTS if rnd % 2 == 0 else reversed(VARIANTS):
            dist.barrier()
            start = time.perf_counter()
            step(variant, rnd)
            elapsed = time.perf_counter() - start
            if rnd >= WARMUP_ROUNDS:
                times[variant].append(elapsed)
    times = {variant: max_over_ranks(samples) for variant, samples in times.items()}
    parallel_state.destroy_model_parallel()
    return times, global_batch * seq, checks


def main(argv=None) -> int:
    """Run the benchmark and print the table and figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--model", choices=sorted(MODELS), default="matmul")
    parser.add_argument("--reps", type=int, default=None)
    opts = parser.parse_args(argv)
    reps = opts.reps or (10 if opts.quick else 30)
    times, tokens_per_step, checks = run_two_ranks(_worker, MODELS[opts.model], reps)
    stats = {variant: spread(times[variant]) for variant in VARIANTS}  # (min, median, max)

    def ratio(variant, which):
        return stats[variant][which] / stats["baseline"][which]

    print(f"model={opts.model} TP=2 sequence-parallel gloo CPU, {WARMUP_ROUNDS} warm-up + {reps} "
          "interleaved steps per variant")
    print(f"WeSaR: {checks['gates']} gates, {checks['deferred']} deferred TP partial sums, "
          f"{checks['fused_calls']} fused all-reduce(s) per step; in-backward variant: "
          f"{checks['in_backward_all_reduces']} more TP all-reduces per step")
    print(f"{'variant':<20} {STATS_HEADER} {'tokens/s':>10} {'vs baseline':>12}")
    for variant in VARIANTS:
        print(f"{variant:<20} {format_spread(times[variant])} "
              f"{tokens_per_step / stats[variant][MEDIAN]:>10.0f} {ratio(variant, MEDIAN):>12.3f}")
    print(f"wesar_in_backward_step_time_ratio: {ratio('wesar_in_backward', MEDIAN):.4f}")
    print(f"wesar_step_time_ratio_min: {ratio('wesar', MIN):.4f}")
    print(f"wesar_step_time_ratio_max: {ratio('wesar', MAX):.4f}")
    print(f"wesar_step_time_ratio: {ratio('wesar', MEDIAN):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
