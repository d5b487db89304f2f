"""The plug-in against Megatron-LM itself: a checkout of NVIDIA/Megatron-LM at core_v0.16.1 named
by MEGATRON_LM_DIR (never copied here; how to run: README, "Use with Megatron-LM"). Skipped
without it.

Runs of Megatron-LM's own pretrain() on CPU/gloo (RUNS; tests/megatron_lm/harness.py records
them), a tiny GPT on mock data with CPU initialisation and no dropout, each started when a test
first needs it: `python -m megatron_wesar.megatron_lm` at TP=2 and at TP=1 (3 steps);
Megatron-LM's pretrain_gpt.py with `--spec megatron_wesar.megatron_lm wesar_layer_spec` at TP=2
(3 steps), also replayed on the dense reference; the plug-in with the distributed optimizer at
DP=2 for 4 steps, at once and as 2 steps saved plus 2 resumed.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.reference import ReferenceArch, ReferenceGPT, reference_adamw

MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")
pytestmark = [
    pytest.mark.megatron_lm,
    pytest.mark.parallel,
    pytest.mark.skipif(not MEGATRON_LM_DIR, reason=(
        "MEGATRON_LM_DIR is not set: these tests need a Megatron-LM checkout at tag "
        "core_v0.16.1 (not on PyPI); see README, 'Use with Megatron-LM'")),
]

HARNESS = Path(__file__).with_name("harness.py")
ROOT = HARNESS.parents[2]
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
SPEC = ["pretrain_gpt.py", "--spec", "megatron_wesar.megatron_lm", "wesar_layer_spec"]
CHECKPOINT = object()  # a run's argument: the module's checkpoint directory
# The plug-in with the distributed optimizer on 2 data-parallel ranks for 4 steps: at once, and
# saved after 2 steps (--exit-interval: the same 4-step run, data and LR schedule) then resumed.
DISTOPT = ["--use-distributed-optimizer", "--train-iters", "4", *WESAR]
RUNS = {
    "plugin-tp2": (2, ["--tensor-model-parallel-size", "2", *WESAR]),
    "plugin-tp1": (1, WESAR),
    # exact GELU, as the dense reference (Megatron-LM's fused bias-GELU is the tanh approximation)
    "spec-tp2": (2, [*SPEC, "--tensor-model-parallel-size", "2", "--no-bias-gelu-fusion"]),
    "distopt-dp2": (2, DISTOPT),
    "distopt-dp2-saved": (2, [*DISTOPT, "--save", CHECKPOINT, "--save-interval", "1000",
                              "--exit-interval", "2"]),
    "distopt-dp2-resumed": (2, [*DISTOPT, "--load", CHECKPOINT]),
}


def megatron_lm_run(out_dir: Path, nproc: int, argv: list) -> list:
    """Run the harness on `nproc` ranks with torchrun (`argv` after TINY_GPT, so that it
    overrides it); the per-rank records, and rank 0's tensors under the key 'tensors'."""
    out_dir.mkdir()
    script = argv[:1] if argv and argv[0].endswith(".py") else []
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--standalone", str(HARNESS), str(out_dir), *script, *TINY_GPT,
               *argv[len(script):]]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # tests.helpers
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    records = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]
    records[0]["tensors"] = torch.load(out_dir / "tensors.pt", weights_only=False)
    return records


class Runs:
    """Megatron-LM runs by name, each started the first time a test asks for it."""

    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def __getitem__(self, name: str) -> list:
        if name not in self.done:
            nproc, argv = RUNS[name]
            argv = [self.root / "checkpoint" if a is CHECKPOINT else a for a in argv]
            self.done[name] = megatron_lm_run(self.root / name, nproc, [str(a) for a in argv])
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The records of the runs of RUNS, by name (run on first use)."""
    return Runs(tmp_path_factory.mktemp("megatron_lm"))


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


def gates_in_gate_groups(groups: list) -> list:
    """The parameter names (DDP's `module.` dropped) in those of `groups` that hold a gate,
    checking that each holds gates alone, with no weight decay and LR (and min LR) x
    GATE_LR_MULT."""
    gate_groups = [g for g in groups if any(".gate" in n for n in g["names"])]
    for group in gate_groups:
        assert all(".gate" in name for name in group["names"]), group["names"]
        assert group["wd_mult"] == 0.0
        assert math.isclose(group["max_lr"], LR * GATE_LR_MULT)
        assert math.isclose(group["min_lr"], MIN_LR * GATE_LR_MULT)
    return [name.removeprefix("module.") for g in gate_groups for name in g["names"]]


def test_gates_are_in_their_own_optimizer_groups(runs):
    for record in runs["plugin-tp2"] + runs["plugin-tp1"]:
        assert len(gates_in_gate_groups(record["groups"])) == len(record["initial_gates"])
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


# The dense reference (tests/helpers/reference.py) of the TINY_GPT model as pretrain_gpt.py builds
# it: tied embedding and output layer (Megatron-LM's default), 4 x hidden FFN, learned positions.
TINY_ARCH = ReferenceArch(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                          ffn_hidden_size=256, max_seq_len=32, tied=True)
ADAM_BETAS, ADAM_EPS, WEIGHT_DECAY, CLIP_GRAD = (0.9, 0.999), 1e-8, 0.1, 1.0  # Megatron-LM's
# defaults but --weight-decay


def reference_replay(tensors: dict) -> list:
    """Replay a run's recorded steps on the dense reference in float64, from the run's gathered
    initial weights (so Megatron's embedding init needs no matching): each step's microbatches
    with its learning rate, AdamW, global-norm clipping at CLIP_GRAD. Per step: the loss, the
    grad norm, the gate gradients (after clipping, as Megatron-LM's main_grad holds them) and
    the gate values after the step; and the whole model after the last step."""
    model = ReferenceGPT(TINY_ARCH, {k: v.double() for k, v in tensors["initial"].items()})
    optimizer = reference_adamw(model, LR, ADAM_BETAS, ADAM_EPS, WEIGHT_DECAY)
    replayed = []
    for step in tensors["steps"]:
        (lr,) = set(step["lrs"])  # the --spec run's groups share one learning rate
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        batches = step["batches"]
        # pretrain_gpt.py's loss: each microbatch's token mean, averaged over microbatches
        assert all(bool(b["loss_mask"].all()) for b in batches)  # no masked token: a plain mean
        loss = sum(model(b["tokens"], b["labels"]) for b in batches) / len(batches)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD)
        gate_grads = {k: g.grad.clone() for k, g in model.gates().items()}
        optimizer.step()
        replayed.append({"loss": loss.item(), "grad_norm": grad_norm.item(),
                         "gate_grads": gate_grads,
                         "gates": {k: g.detach().clone() for k, g in model.gates().items()}})
    return replayed, model.canonical_state_dict()


# float32 Megatron-LM vs the float64 reference, max relative error over 3 steps (measured
# 2026-11-28: loss 2.8e-8, grad norm 1.1e-6 (Megatron sums it in fp32), gate gradient 2.0e-4
# (sums over every token and feature, with cancellation: the worst is the smallest gradient),
# gate value 1.0e-7 (Adam's update is nearly sign(grad) * lr: rounding barely moves it), trained
# tensors 1.9e-3 (Adam normalises each element by its own gradient: the few elements whose
# gradient is at fp32 rounding level get an update of O(lr) of either sign; 7 of 16384 in the
# worst tensor differ by more than 1e-6)).
SPEC_TOLERANCE = {"loss": 1e-6, "grad_norm": 1e-5, "gate_grad": 1e-3, "gate": 1e-6,
                  "trained": 5e-3}
# Without RoPE the key bias has no gradient in exact arithmetic (tests/test_oracle.py,
# NOISE_ONLY): in fp32 it moves by Adam steps of rounding noise and says nothing.
NOISE_ONLY = ".k.bias"


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    actual, expected = (torch.as_tensor(t, dtype=torch.float64) for t in (actual, expected))
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_spec_path_under_stock_finalize_matches_the_dense_reference(runs):
    rank0 = runs["spec-tp2"][0]
    tensors = rank0["tensors"]
    replayed, final = reference_replay(tensors)
    assert not any(k.startswith(("embedding.", "position.", "output.")) and k.endswith(".gate")
                   for k in tensors["initial"])  # the reference is ungated there too
    errors = {"loss": 0.0, "grad_norm": 0.0, "gate_grad": 0.0, "gate": 0.0}
    for ours, ref, step in zip(tensors["steps"], replayed, rank0["steps"]):
        errors["loss"] = max(errors["loss"], relative_error(step["loss"], ref["loss"]))
        errors["grad_norm"] = max(errors["grad_norm"],
                                  relative_error(ours["grad_norm"], ref["grad_norm"]))
        assert ours["gate_grads"].keys() == ref["gate_grads"].keys() == ours["gates"].keys()
        assert len(ours["gates"]) == 6 * TINY_ARCH.num_layers
        for name, grad in ref["gate_grads"].items():
            errors["gate_grad"] = max(errors["gate_grad"],
                                      relative_error(ours["gate_grads"][name], grad))
            errors["gate"] = max(errors["gate"],
                                 relative_error(ours["gates"][name], ref["gates"][name]))
    trained = max(relative_error(tensors["final"][k], v) for k, v in final.items()
                  if not k.endswith(NOISE_ONLY))
    assert all(v.abs().max() <= 1e-9 for k, v in final.items() if k.endswith(NOISE_ONLY))
    print(f"spec-tp2 vs the float64 reference: {errors}, trained tensors {trained:.2e}")
    assert len(replayed) == 3 and replayed[-1]["loss"] < replayed[0]["loss"]
    for what, value in errors.items():
        assert value <= SPEC_TOLERANCE[what], (what, value)
    assert trained <= SPEC_TOLERANCE["trained"]


def test_distributed_optimizer_resumes_as_an_uninterrupted_run(runs):
    whole, saved, resumed = (runs[name][0] for name in
                             ("distopt-dp2", "distopt-dp2-saved", "distopt-dp2-resumed"))
    assert [len(r["steps"]) for r in (whole, saved, resumed)] == [4, 2, 2]
    assert [s["loss"] for s in whole["steps"]] == [s["loss"] for s in
                                                   saved["steps"] + resumed["steps"]]
    tensors = [r["tensors"] for r in (whole, saved, resumed)]
    assert [s["lrs"] for s in tensors[0]["steps"]] == [s["lrs"] for s in
                                                        tensors[1]["steps"] + tensors[2]["steps"]]
    for name, value in tensors[1]["final"].items():
        assert torch.equal(tensors[2]["initial"][name], value), name  # the load
    for name, value in tensors[0]["final"].items():
        assert torch.equal(tensors[2]["final"][name], value), name  # bitwise: gates and W_bar
    assert resumed["steps"][-1]["gates"] == whole["steps"][-1]["gates"]
    assert runs["distopt-dp2"][0]["groups"] != runs["distopt-dp2"][1]["groups"]  # DP shards
    for rank_whole, rank_resumed in zip(runs["distopt-dp2"], runs["distopt-dp2-resumed"]):
        assert rank_resumed["groups"] == rank_whole["groups"]
    # after the load: every gate, on the rank holding its shard, in a group of gates alone with
    # no weight decay and LR x the multiplier
    groups = [g for record in runs["distopt-dp2-resumed"] for g in record["groups"]]
    assert set(gates_in_gate_groups(groups)) == set(resumed["initial_gates"])
