"""`megatron-wesar export` and `megatron-wesar import`.

Both run as one process (or collectively under torchrun: every rank loads the whole model, rank
0 writes) with tensor- and pipeline-parallel size 1: megatron reshards a checkpoint of any
layout into it, and the files they write load into any layout.
"""
from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from ..training.arguments import parse_overrides
from ..training.checkpointing import CheckpointError, CheckpointMismatchError
from .hf_layout import UnsupportedArchitectureError

EXPECTED_ERRORS = (CheckpointError, CheckpointMismatchError, UnsupportedArchitectureError,
                   FileExistsError, FileNotFoundError, ValueError)


def export_parser() -> argparse.ArgumentParser:
    """The `export` argument parser."""
    parser = argparse.ArgumentParser(
        prog="megatron-wesar export",
        description="Fold every WeSaR gate into its matrix (W = gate * W_bar) and write the "
                    "model as a plain Megatron checkpoint or a Hugging Face directory.")
    parser.add_argument("--load", required=True,
                        help="the WeSaR save directory (its tracker's checkpoint) or one "
                             "iter_NNNNNNN/ directory")
    parser.add_argument("--iteration", type=int, default=None,
                        help="export this iteration of --load instead of the tracker's")
    parser.add_argument("--to", required=True, choices=("megatron", "hf"),
                        help="megatron: megatron-core dist checkpoint of the ungated GPTModel; "
                             "hf: config.json + model.safetensors + tokenizer")
    parser.add_argument("out", help="the directory to create (must not exist)")
    parser.add_argument("--tokenizer-file", default=None,
                        help="hf: the run's --tokenizer-file, copied (default: the byte "
                             "tokenizer)")
    return parser


def _world(action):
    """Run `action()` in a world of model-parallel size 1 (CPU: gloo; a world of one unless
    launched by torchrun); print an expected error and return 1 instead of raising."""
    from megatron.core import parallel_state

    from ..compat import enable_cpu_compat
    from ..training.engine import initialize_parallel
    from ..training.pretrain import init_distributed

    enable_cpu_compat()
    init_distributed()
    initialize_parallel(1, 1, seed=0)
    try:
        message = action()
        if dist.get_rank() == 0:
            print(message)
        return 0
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        parallel_state.destroy_model_parallel()


def export_main(argv=None) -> int:
    """`megatron-wesar export --load CKPT --to {megatron,hf} OUT`."""
    args = export_parser().parse_args(argv)

    def run():
        from .hf import export_hf
        from .megatron_format import export_megatron
        from .output import refuse_existing
        from .source import load_gated_model, open_checkpoint

        refuse_existing(args.out)  # before the (long) load
        checkpoint = open_checkpoint(args.load, args.iteration)
        model = load_gated_model(checkpoint)
        if args.to == "megatron":
            path = export_megatron(model, checkpoint, args.out)
        else:
            path = export_hf(model, checkpoint, args.out, args.tokenizer_file)
        return f"exported {checkpoint.path} (gates folded) to {path}"

    return _world(run)


def import_main(argv=None) -> int:
    """`megatron-wesar import --from hf DIR [--rescale-to-sigma] --save CKPT [pretrain options]`."""
    parser = argparse.ArgumentParser(
        prog="megatron-wesar import",
        description="Start a WeSaR run from a pretrained ungated Hugging Face model: writes "
                    "iteration 0 of --save; every other option is pretrain's (see pretrain "
                    "--help) and must be repeated when pretrain --load resumes it.")
    parser.add_argument("--from", dest="source", required=True, nargs=2,
                        metavar=("hf", "DIR"), help="the Hugging Face model directory DIR")
    parser.add_argument("--rescale-to-sigma", action="store_true",
                        help="gate = std(W) / sigma and W_bar = W / gate (every W_bar with the "
                             "common sigma); default gate 1, W_bar = W")
    args, rest = parser.parse_known_args(argv)
    kind, directory = args.source
    if kind != "hf":
        parser.error(f"--from {kind}: only hf is supported")
    preset, overrides = parse_overrides(rest)

    def run():
        from .hf_import import import_hf

        path = import_hf(directory, overrides, preset or "tiny", args.rescale_to_sigma)
        return f"imported {directory} as WeSaR checkpoint {path}"

    return _world(run)
