"""The plug-in against Megatron-LM itself: a checkout of NVIDIA/Megatron-LM at core_v0.16.1 named
by MEGATRON_LM_DIR (never copied here; how to run: README, "Use with Megatron-LM"). Skipped
without it.

Three runs of Megatron-LM's own pretrain() on CPU/gloo (tests/megatron_lm/harness.py records
them), a tiny GPT on mock data for 3 steps with CPU initialisation and no dropout:
`python -m megatron_wesar.megatron_lm` at TP=2 and at TP=1, and Megatron-LM's pretrain_gpt.py
with `--spec megatron_wesar.megatron_lm wesar_layer_spec` at TP=2.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")
pytestmark = [
    pytest.mark.megatron_lm,
    pytest.mark.parallel,
    pytest.mark.skipif(not MEGATRON_LM_DIR, reason=(
        "MEGATRON_LM_DIR is not set: these tests need a Megatron-LM checkout at tag "
        "core_v0.16.1 (not on PyPI); see README, 'Use with Megatron-LM'")),
]

HARNESS = Path(__file__).with_name("harness.py")
LR, MIN_LR, GATE_LR_MULT, SIGMA = 1e-3, 1e-4, 2.0, 0.01
TINY_GPT = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "3", "--lr", str(LR), "--min-lr", str(MIN_LR),
    "--weight-decay", "0.1", "--mock-data", "--tokenizer-type", "NullTokenizer",
    # 255 + EOD: a vocabulary of 256 needs no padding at TP=1 or TP=2 (padding changes the model)
    "--vocab-size", "255", "--transformer-impl", "local", "--eval-iters", "0",
    "--eval-interval", "1000", "--log-interval", "1", "--use-cpu-initialization",
    "--hidden-dropout", "0", "--attention-dropout", "0",
]
WESAR = ["--wesar-sigma", str(SIGMA), "--wesar-gate-lr-mult", str(GATE_LR_MULT)]
# Megatron-LM's gpt_builder (gpt_builders.py at core_v0.16.1), which model_provider calls.
GPT_BUILDER_PARAMETERS = ("args", "pre_process", "post_process", "vp_stage", "config",
                          "pg_collection")
STOCK_FINALIZE = "megatron.core.distributed.finalize_model_grads.finalize_model_grads"


def megatron_lm_run(out_dir: Path, nproc: int, argv: list) -> list:
    """Run the harness on `nproc` ranks with torchrun; the per-rank records."""
    out_dir.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--standalone", str(HARNESS), str(out_dir), *argv, *TINY_GPT]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: per-rank records} of the three runs."""
    root = tmp_path_factory.mktemp("megatron_lm")
    return {
        "plugin-tp2": megatron_lm_run(root / "p2", 2, ["--tensor-model-parallel-size", "2",
                                                       *WESAR]),
        "plugin-tp1": megatron_lm_run(root / "p1", 1, WESAR),
        "spec-tp2": megatron_lm_run(root / "s2", 2, [
            "pretrain_gpt.py", "--tensor-model-parallel-size", "2",
            "--spec", "megatron_wesar.megatron_lm", "wesar_layer_spec"]),
    }


def last_gates(record) -> dict:
    return record["steps"][-1]["gates"]


def test_plugin_trains_with_the_gate_aware_finalize(runs):
    for record in runs["plugin-tp2"]:
        assert record["finalize"] == "megatron_wesar.grads.finalize_model_grads"
        assert len(record["steps"]) == 3
    losses = [step["loss"] for step in runs["plugin-tp2"][0]["steps"]]
    assert all(math.isfinite(loss) for loss in losses), losses


def test_plugin_gates_embedding_and_output_with_the_wesar_arguments(runs):
    gates = runs["plugin-tp2"][0]["initial_gates"]
    assert {"embedding.word_embeddings.gate", "output_layer.gate"} <= set(gates)
    # He backbone: alpha_0 = sqrt(1/d) / sigma with --wesar-sigma; tied output layer likewise
    assert math.isclose(gates["decoder.layers.0.self_attention.linear_qkv.gate_q"],
                        math.sqrt(1 / 64) / SIGMA, rel_tol=1e-6)
    assert math.isclose(gates["output_layer.gate"], math.sqrt(1 / 64) / SIGMA, rel_tol=1e-6)


def test_gates_are_identical_across_tp_ranks_and_equal_to_tp1(runs):
    tp2, (tp1,) = runs["plugin-tp2"], runs["plugin-tp1"]
    assert last_gates(tp2[0]) == last_gates(tp2[1])
    moved = [n for n, v in last_gates(tp1).items() if v != tp1["initial_gates"][n]]
    assert len(moved) == len(last_gates(tp1))  # every gate trained
    for name, value in last_gates(tp1).items():
        assert math.isclose(last_gates(tp2[0])[name], value, rel_tol=1e-5), name
    for step1, step2 in zip(tp1["steps"], tp2[0]["steps"]):
        assert math.isclose(step1["loss"], step2["loss"], rel_tol=1e-5)


def test_gates_are_in_their_own_optimizer_groups(runs):
    for record in runs["plugin-tp2"] + runs["plugin-tp1"]:
        gate_groups = [g for g in record["groups"] if any(".gate" in n for n in g["names"])]
        gates = [name for g in gate_groups for name in g["names"]]
        assert len(gates) == len(record["initial_gates"])
        for group in gate_groups:
            assert all(".gate" in name for name in group["names"]), group["names"]
            assert group["wd_mult"] == 0.0
            assert math.isclose(group["max_lr"], LR * GATE_LR_MULT)
            assert math.isclose(group["min_lr"], MIN_LR * GATE_LR_MULT)
        weights = [g for g in record["groups"]
                   if any(n.endswith("linear_qkv.weight") for n in g["names"])]
        assert [(g["wd_mult"], g["max_lr"]) for g in weights] == [(1.0, LR)]


def test_spec_path_under_stock_finalize_keeps_tp_ranks_in_step(runs):
    rank0, rank1 = runs["spec-tp2"]
    assert rank0["finalize"] == STOCK_FINALIZE
    gates = rank0["initial_gates"]
    assert "embedding.word_embeddings.gate" not in gates  # the transformer layers only
    assert math.isclose(gates["decoder.layers.0.self_attention.linear_qkv.gate_q"],
                        math.sqrt(1 / 64) / math.sqrt(4e-5), rel_tol=1e-6)  # defaults
    assert all(last_gates(rank0)[n] != v for n, v in gates.items())
    assert last_gates(rank0) == last_gates(rank1)  # partial gate gradients were reduced


def test_builder_has_the_signature_of_megatron_lm_gpt_builder(runs):
    assert tuple(runs["plugin-tp1"][0]["gpt_builder_parameters"]) == GPT_BUILDER_PARAMETERS
