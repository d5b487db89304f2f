"""Benchmark the step-level gate-gradient reduction against the ways it could otherwise be done.

Spawns 2 gloo ranks (TP=2). For each preset's gate count (26: tiny, 74: 130m, 146: 1.3b,
242: 13b; 6 gated matrices per layer (q, k, v, attention output, fc1, fc2) + embedding + output
layer) it builds a real megatron-core
WeSaR GPT of (gates - 2) / 4 layers (hidden size 32, sequence parallelism on, so every gate gradient
but the embedding's is a TP partial sum) and gives every gate a nonzero gradient. It times, per
call:
  extension:  megatron_wesar.grads.reduce_gate_grads([model], tp_group), what training runs every
              step: walk the model's gates, sum the partial ones in one collective (C++ extension
              megatron_wesar._C), check every gate gradient is finite;
  fallback:   the same call with the extension disabled (megatron_wesar.gate_reduce._C = None):
              the pure-PyTorch packing path;
and, on the raw list of the partial-sum gate gradients (no model walk; only fused_list checks
finiteness):
  fused_list: megatron_wesar.gate_reduce.allreduce_gate_grads through the extension;
  per_gate:   one dist.all_reduce per gate;
  coalesced:  Megatron's coalesced all-reduce, as finalize_model_grads does it for
              sequence-parallel params (_flatten_dense_tensors -> one all_reduce ->
              _unflatten_dense_tensors -> copy_ back);
  floor:      one dist.all_reduce of an already packed fp32 buffer of the same size: the cost
              of the collective alone, a lower bound for every one-collective method.
Before timing, each rank checks that both reduce_gate_grads paths sum exactly the partial-sum
gradients over the two ranks (and leave the complete one alone) and that the extension path calls
the extension; it raises otherwise. Gradients are reset (untimed) before every call. Methods are
interleaved within every repetition (order rotating); each call is timed after a barrier and a
sample is the slower rank's time. The table reports min / median / max; the figures are median
ratios: `speedup_vs_fallback_<gates>: ` (fallback / extension) per gate count, then, at 242
gates, `speedup_vs_per_gate: `, `speedup_vs_coalesced: ` and last `speedup_vs_fallback: `
(each: that method / extension).

    python bench/bench_gate_reduce.py --quick
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
from _common import STATS_HEADER, count_calls, format_spread, max_over_ranks, run_two_ranks
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors  # what Megatron uses

GATE_COUNTS = (26, 74, 146, 242)  # 4, 12, 24, 40 layers: 6 gates each + embedding, output
HEADLINE_COUNT = 242
METHODS = ("extension", "fallback", "fused_list", "per_gate", "coalesced", "floor")
VOCAB, SEQ = 64, 16


def per_gate(grads, group):
    """One all-reduce per gradient."""
    for g in grads:
        dist.all_reduce(g, group=group)


def coalesced(grads, group):
    """Megatron's coalesced all-reduce (megatron/core/distributed/finalize_model_grads.py,
    _allreduce_non_tensor_model_parallel_grads)."""
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    for buf, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        buf.copy_(synced)


def reduce_without_extension(model_chunks, group):
    """reduce_gate_grads with megatron_wesar._C disabled (the pure-PyTorch path)."""
    from megatron_wesar import gate_reduce, grads

    extension, gate_reduce._C = gate_reduce._C, None
    try:
        grads.reduce_gate_grads(model_chunks, group)
    finally:
        gate_reduce._C = extension


def build_model(num_layers: int):
    """A tiny megatron-core WeSaR GPT with `num_layers` layers, TP=2, sequence parallel."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_wesar.config import WeSaRConfig
    from megatron_wesar.spec import build_gpt_model

    config = TransformerConfig(
        num_layers=num_layers, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        tensor_model_parallel_size=2, sequence_parallel=True, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
    )
    return build_gpt_model(config, WeSaRConfig(), VOCAB, SEQ)


def reduce_paths(model, group) -> dict:
    """The two reduce_gate_grads paths on `model`, as argument-less callables."""
    from megatron_wesar import grads

    return {"extension": lambda: grads.reduce_gate_grads([model], group),
            "fallback": lambda: reduce_without_extension([model], group)}


def _check_paths(paths, gates, reset, rank):
    """Raise unless both reduce_gate_grads paths sum exactly the partial-sum gate gradients
    (set to 1e-3 (i + 1) (rank + 1) by `reset`) and the extension path calls _C."""
    from megatron_wesar import gate_reduce

    for path, run in paths.items():
        reset()
        with count_calls(gate_reduce._C, "allreduce_gate_grads") as calls, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback's one-time warning, consumed here
            run()
        if path == "extension" and calls[0] == 0:
            raise RuntimeError("the extension path did not call megatron_wesar._C")
        for i, gate in enumerate(gates):
            # partial sums: 1e-3 (i + 1) (1 + 2) over ranks 0 and 1; complete ones untouched
            expected = 1e-3 * (i + 1) * (3 if gate.tp_partial_grad else rank + 1)
            if abs(gate.grad.item() - expected) > 1e-6 * expected:
                raise RuntimeError(f"{path} path left gate {i} gradient {gate.grad.item()}, "
                                   f"expected {expected}")


def _time_gate_count(n, reps, warmup, group, rank) -> tuple:
    """Check and time every method on a model with `n` gates: ({method: samples}, partial count)."""
    from megatron_wesar import gate_reduce
    from megatron_wesar.layers import gate_parameters

    model = build_model((n - 2) // 6)
    gates = [gate for _, gate in gate_parameters(model)]
    if len(gates) != n:
        raise RuntimeError(f"a {(n - 2) // 6}-layer model has {len(gates)} gates, not {n}")
    init = [torch.full((1,), 1e-3 * (i + 1) * (rank + 1)) for i in range(n)]
    for gate, value in zip(gates, init):
        gate.grad = value.clone()
    grad_list = [gate.grad for gate in gates]
    partial = [gate.grad for gate in gates if gate.tp_partial_grad]
    if len(partial) < n - 1:
        raise RuntimeError(f"{len(partial)} of {n} gate gradients are TP partial sums; sequence "
                           "parallelism makes all but (at most) the embedding's partial")
    packed = torch.cat(partial)
    packed_init = packed.clone()

    def reset():
        torch._foreach_copy_(grad_list, init)
        packed.copy_(packed_init)

    fns = reduce_paths(model, group)
    _check_paths(fns, gates, reset, rank)
    fns.update(
        fused_list=lambda: gate_reduce.allreduce_gate_grads(partial, group),
        per_gate=lambda: per_gate(partial, group),
        coalesced=lambda: coalesced(partial, group),
        floor=lambda: dist.all_reduce(packed, group=group),
    )
    times = {method: [] for method in METHODS}
    for rep in range(warmup + reps):
        shift = rep % len(METHODS)
        for method in METHODS[shift:] + METHODS[:shift]:
            reset()
            dist.barrier()
            t0 = time.perf_counter()
            fns[method]()
            elapsed = time.perf_counter() - t0
            if rep >= warmup:
                times[method].append(elapsed)
    return {method: max_over_ranks(samples) for method, samples in times.items()}, len(partial)


def _worker(rank, reps, warmup):
    warnings.filterwarnings("ignore", module="megatron")
    from megatron.core import parallel_state

    from megatron_wesar import gate_reduce
    from megatron_wesar.training.engine import initialize_parallel

    if not gate_reduce.extension_available():
        raise SystemExit("megatron_wesar._C is not built: pip install --no-build-isolation -e .")
    initialize_parallel(2, 1, seed=1234)
    group = parallel_state.get_tensor_model_parallel_group()
    results = {n: _time_gate_count(n, reps, warmup, group, rank) for n in GATE_COUNTS}
    parallel_state.destroy_model_parallel()
    return results


def main(argv=None) -> int:
    """Run the benchmark and print the table and figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per method")
    args = parser.parse_args(argv)
    reps = args.reps or (60 if args.quick else 200)
    warmup = 3 if args.quick else 10
    results = run_two_ranks(_worker, reps, warmup)
    median = {n: {method: statistics.median(samples) for method, samples in times.items()}
              for n, (times, _) in results.items()}

    print(f"# 2 gloo ranks (TP=2, sequence parallel), {warmup} warm-up + {reps} interleaved "
          "repetitions; per call, the slower rank's wall time")
    print(f"{'gates':>5} {'partial':>7}  {'method':<10} {STATS_HEADER} {'vs extension':>12}")
    for n, (times, partial) in results.items():
        for method in METHODS:
            print(f"{n:>5} {partial:>7}  {method:<10} {format_spread(times[method])} "
                  f"{median[n][method] / median[n]['extension']:>11.2f}x")

    def speedup(method, n=HEADLINE_COUNT):
        return median[n][method] / median[n]["extension"]

    for n in GATE_COUNTS:
        print(f"speedup_vs_fallback_{n}: {speedup('fallback', n):.2f}")
    print(f"speedup_vs_per_gate: {speedup('per_gate'):.2f}")
    print(f"speedup_vs_coalesced: {speedup('coalesced'):.2f}")
    print(f"speedup_vs_fallback: {speedup('fallback'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
