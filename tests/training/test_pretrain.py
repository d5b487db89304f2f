"""The pretraining driver on real gloo groups: every layout trains like the single process, and
impossible layouts get clear errors."""
import pytest

from megatron_wesar.training.arguments import parse_pretrain_args
from tests.helpers.distributed import run_distributed

TINY = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--train-iters", "5", "--log-interval", "1",
        "--lr-warmup-iters", "1"]
LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "dp2": (2, ["--use-distributed-optimizer"]),
    "tp2pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
}


def _losses(rank, world_size, argv):
    from megatron_wesar.training.pretrain import pretrain

    records = pretrain(parse_pretrain_args(argv), log=lambda line: None)
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def single_process_losses():
    return run_distributed(_losses, 1, TINY)[0]


@pytest.mark.parallel
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_like_the_single_process(layout, single_process_losses):
    world, extra = LAYOUTS[layout]
    losses = run_distributed(_losses, world, TINY + extra)[0]
    assert len(losses) == len(single_process_losses) == 5
    for step, (ours, ref) in enumerate(zip(losses, single_process_losses)):
        assert abs(ours - ref) <= 1e-4 * abs(ref), (layout, step, ours, ref)
    assert losses[-1] < losses[0]


def test_impossible_layouts_are_clear_errors():
    args = parse_pretrain_args(TINY + ["--tensor-model-parallel-size", "2"])
    with pytest.raises(ValueError, match="world size 3 is not a multiple"):
        args.data_parallel_size(3)
    args = parse_pretrain_args(TINY)
    with pytest.raises(ValueError, match="global-batch-size 8 is not divisible"):
        args.data_parallel_size(3)
    with pytest.raises(SystemExit):
        parse_pretrain_args(TINY + ["--sequence-parallel"])  # needs TP > 1
    with pytest.raises(SystemExit):
        parse_pretrain_args(TINY + ["--pipeline-model-parallel-size", "3"])
