"""The `megatron-wesar` command: `pretrain` (the driver), `preprocess` (indexed datasets) and
`demo` (README's main job)."""
from __future__ import annotations

import sys

DEMO_ARGS = [
    "--preset", "tiny", "--tensor-model-parallel-size", "2", "--sequence-parallel",
    "--train-iters", "60", "--log-interval", "10", "--lr", "1e-3",
]


def run_demo() -> int:
    """A short TP=2 (sequence-parallel) training of the tiny preset on CPU, two local ranks."""
    from torch.distributed.run import main as torchrun

    torchrun(["--standalone", "--nproc-per-node", "2", "-m", "megatron_wesar", "pretrain",
              *DEMO_ARGS])
    return 0


def main(argv=None) -> int:
    """Dispatch `megatron-wesar <command> [args]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"pretrain": _pretrain, "preprocess": _preprocess, "demo": lambda rest: run_demo()}
    if not argv or argv[0] not in commands:
        print(f"usage: megatron-wesar {{{','.join(commands)}}} [args]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


def _pretrain(rest) -> int:
    from .training.pretrain import main as pretrain_main

    return pretrain_main(rest)


def _preprocess(rest) -> int:
    from .data.preprocess import main as preprocess_main

    return preprocess_main(rest)
