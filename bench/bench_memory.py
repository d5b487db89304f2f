"""Activation memory of a WeSaR GPT over the same model ungated: the bytes saved for backward by
one training step (CPU, gloo, 2 ranks).

Both ranks build the ungated baseline and WeSaR (same shape: 2 layers, d = 256, sequence 128,
fp32) at TP = 1 (DP = 2) and at TP = 2 with sequence parallelism, and run one full training step
of one microbatch under torch.autograd.graph.saved_tensors_hooks, which sees every tensor that
autograd keeps for backward. The bytes of the distinct storages those tensors live in are summed,
leaving out the parameters' own storages (weights that a layer keeps for its backward are not
activations and are the same in both models). The figure is the larger rank's.

    python bench/bench_memory.py --quick

Prints the table and ends with `wesar_activation_memory_ratio: R`, the larger of the two
layouts' WeSaR / baseline ratios.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from functools import partial

import torch
from _common import max_over_ranks, run_two_ranks

MODEL = ["--num-layers", "2", "--hidden-size", "256", "--ffn-hidden-size", "1024",
         "--num-attention-heads", "4", "--seq-length", "128", "--micro-batch-size", "2",
         "--global-batch-size", "4"]
LAYOUTS = {"TP1": [], "TP2+SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel"]}
VARIANTS = ("baseline", "wesar")


def saved_activation_bytes(engine, step) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during `step()`."""
    params = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def _worker(rank):
    from megatron.core import parallel_state

    from megatron_wesar.data.corpus import BYTE_VOCAB_SIZE
    from megatron_wesar.data.sources import EmbeddedCorpus, microbatches
    from megatron_wesar.training.arguments import parse_pretrain_args
    from megatron_wesar.training.engine import build_engine, initialize_parallel, train_step
    from megatron_wesar.training.pretrain import build_optimizer_config, build_transformer_config

    measured = {}
    for layout, flags in LAYOUTS.items():
        config = parse_pretrain_args(MODEL + flags)
        tp = config.parallel.tensor_model_parallel_size
        initialize_parallel(tp, 1, config.training.seed)
        dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                       parallel_state.get_data_parallel_rank())
        micro, seq = config.training.micro_batch_size, config.model.seq_length
        batch = EmbeddedCorpus(seq, 1, max_bytes=200_000).train_batch(0, micro * dp)
        for variant in VARIANTS:
            wesar = replace(config.wesar, enabled=variant == "wesar")
            engine = build_engine(build_transformer_config(config), wesar, BYTE_VOCAB_SIZE, seq,
                                  build_optimizer_config(config))
            step = partial(train_step, engine, microbatches(batch, dp_rank, dp, micro), 1, micro,
                           seq)
            measured[(layout, variant)] = saved_activation_bytes(engine, step)
        parallel_state.destroy_model_parallel()
    keys = list(measured)
    return dict(zip(keys, max_over_ranks([float(measured[k]) for k in keys])))


def main(argv=None) -> int:
    """Run the benchmark and print the table and the figure."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="accepted for symmetry with the other benchmarks (one step is "
                             "measured either way: the figure is deterministic)")
    parser.parse_args(argv)
    measured = run_two_ranks(_worker)
    print("saved-for-backward bytes of one training step (1 microbatch of 2 x 128 tokens, "
          "d = 256, 2 layers, fp32), parameters' storages left out; the larger rank's")
    print(f"{'layout':<8} {'baseline MB':>12} {'WeSaR MB':>10} {'WeSaR / baseline':>17}")
    ratios = []
    for layout in LAYOUTS:
        base, gated = measured[(layout, "baseline")], measured[(layout, "wesar")]
        ratios.append(gated / base)
        print(f"{layout:<8} {base / 1e6:>12.2f} {gated / 1e6:>10.2f} {gated / base:>17.4f}")
    print(f"wesar_activation_memory_ratio: {max(ratios):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
