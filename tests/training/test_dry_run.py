"""`megatron-wesar pretrain --dry-run`: every example launch script's exact arguments plan at the
world it is written for (run through the script itself, DRY_RUN=1), the counts equal the real
model's, the memory follows its stated accounting, and a layout that does not fit is one error
line."""
import math
import os
import pathlib
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_wesar.training.arguments import parse_pretrain_args
from megatron_wesar.training.dry_run import (
    ADAM_MOMENT_BYTES,
    FP32_BYTES,
    layer_activation_bytes,
    plan,
)
from tests.helpers.distributed import run_distributed

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("pretrain_*.sh"))
SLURM_WRAPPER = "pretrain_13b_fp8.sbatch"
LAUNCHER = "launch.sh"  # sourced by every script: torchrun, or DRY_RUN=1 its dry run
WORLD = {"pretrain_130m.sh": 8, "pretrain_1.3b_multinode.sh": 16,
         "pretrain_13b_multinode.sh": 32, "pretrain_13b_fp8.sh": 32, "pretrain_tiny_cpu.sh": 4}
LAST_LINE = re.compile(r"memory_per_gpu_gb: (\d+\.\d+)")
# Slurm's commands as the wrapper uses them, on one node: srun runs the task as node 0
FAKE_SLURM = {"srun": 'while [[ $1 == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n',
              "scontrol": "echo node0; echo node1; echo node2; echo node3\n"}


def _launch(command, env=None) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "NNODES", "GPUS_PER_NODE")}
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**base, "DRY_RUN": "1", "PYTHON": sys.executable,
                                            **(env or {})})


def _finished(proc: subprocess.Popen) -> tuple:
    """(exit status, stdout, stderr) of a launched dry run, once it has ended."""
    out, err = proc.communicate()
    return proc.returncode, out, err


def _slurm_env(tmp: pathlib.Path) -> dict:
    """A 4-node Slurm allocation of 8 GPUs per node, with fake srun / scontrol on PATH."""
    for name, body in FAKE_SLURM.items():
        (tmp / name).write_text("#!/usr/bin/env bash\n" + body)
        (tmp / name).chmod(0o755)
    return {"PATH": f"{tmp}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "4",
            "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "node[0-3]",
            "SLURM_SUBMIT_DIR": str(ROOT)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (exit status, stdout, stderr)} of every example's dry run and of the bad layouts,
    run at once (each pays megatron-core's import)."""
    commands = {script: (["bash", f"examples/{script}"], None) for script in SCRIPTS}
    commands[SLURM_WRAPPER] = (["bash", f"examples/{SLURM_WRAPPER}"],
                               _slurm_env(tmp_path_factory.mktemp("slurm")))
    commands["world 24 for TP 8 x PP 4"] = (["bash", "examples/pretrain_13b_fp8.sh"],
                                            {"GPUS_PER_NODE": "6"})
    commands["12 heads on TP 8"] = (
        ["bash", "examples/pretrain_130m.sh", "--tensor-model-parallel-size", "8"], None)
    procs = {name: _launch(command, env) for name, (command, env) in commands.items()}
    return {name: _finished(proc) for name, proc in procs.items()}


def _plan_lines(result) -> list[str]:
    status, out, err = result
    assert status == 0, err[-3000:]
    lines = out.splitlines()
    assert LAST_LINE.fullmatch(lines[-1]), lines[-1]
    return lines


@pytest.mark.parametrize("script", SCRIPTS + [SLURM_WRAPPER])
def test_example_plans_at_the_world_it_is_written_for(runs, script):
    lines = _plan_lines(runs[script])
    world = WORLD[script.replace(".sbatch", ".sh")]
    assert any(line.startswith(f"layout: world {world} = ") for line in lines), lines
    assert any(re.fullmatch(r"tokens per step: [\d,]+", line) for line in lines), lines


def test_13b_fp8_fits_80_gb_gpus(runs):
    lines = _plan_lines(runs["pretrain_13b_fp8.sh"])
    assert float(LAST_LINE.fullmatch(lines[-1]).group(1)) < 80
    assert "FP8 hybrid" in lines[2] and any(line.startswith("transformer_engine: estimated")
                                            for line in lines)


@pytest.mark.parametrize("case, message", [
    ("world 24 for TP 8 x PP 4",
     "world size 24 is not a multiple of tensor-model-parallel size 8 x pipeline-model-parallel "
     "size 4"),
    ("12 heads on TP 8", "--num-attention-heads 12 is not divisible by "
                         "--tensor-model-parallel-size 8"),
])
def test_a_layout_that_does_not_fit_is_one_error_line(runs, case, message):
    status, out, err = runs[case]
    assert status == 1, err[-2000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == [f"megatron-wesar pretrain: error: {message}"], err
    assert "Traceback" not in err and "memory_per_gpu_gb" not in out


def test_every_example_is_dry_run_and_launches_what_it_plans():
    files = {p.name for p in EXAMPLES.iterdir() if p.is_file()}
    assert files == set(SCRIPTS) | {SLURM_WRAPPER, LAUNCHER} == set(WORLD) | {SLURM_WRAPPER,
                                                                              LAUNCHER}
    for script in SCRIPTS:  # one launcher: the dry run and torchrun get the same arguments
        text = (EXAMPLES / script).read_text()
        assert text.rstrip().endswith(f'source "$(dirname "$0")/{LAUNCHER}"'), script
    launcher = (EXAMPLES / LAUNCHER).read_text()
    assert launcher.count('-m megatron_wesar pretrain "${ARGS[@]}" "$@"') == 2


def test_a_drifted_script_fails_its_dry_run(tmp_path):
    text = (EXAMPLES / "pretrain_13b_multinode.sh").read_text()
    drifted = tmp_path / "drifted.sh"
    drifted.write_text(text.replace("--bf16", "--bf16 --fp8-format hybrid --fp8-recipe delayed"))
    (tmp_path / LAUNCHER).write_text((EXAMPLES / LAUNCHER).read_text())
    status, _, err = _finished(_launch(["bash", str(drifted)]))
    assert status == 2 and "--fp8-recipe delayed needs --transformer-impl" in err, err


def test_world_size_needs_dry_run(capsys):
    with pytest.raises(SystemExit):
        parse_pretrain_args(["--world-size", "8"])
    assert "--world-size plans a --dry-run" in capsys.readouterr().err


SHAPE = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
         "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "8"]
TINY = SHAPE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                "--sequence-parallel"]
VARIANTS = {"WeSaR tied bf16": ["--bf16"], "ungated untied swiglu rope embed-ln": [
    "--no-wesar", "--untie-embeddings-and-output-weights", "--swiglu",
    "--position-embedding-type", "rope", "--embedding-variant", "embed-ln"]}


def _real_rank(rank, world_size, argvs):
    """Per argv, this rank's parameters, weight bytes and DDP gradient-buffer bytes in the real
    engine (built one after another on the same ranks)."""
    from megatron.core import parallel_state

    from megatron_wesar.data.corpus import BYTE_VOCAB_SIZE
    from megatron_wesar.training.engine import initialize_parallel
    from megatron_wesar.training.pretrain import build_run_engine, padded_vocab_size

    out = []
    for argv in argvs:
        config = parse_pretrain_args(argv)
        tp = config.parallel.tensor_model_parallel_size
        initialize_parallel(tp, config.parallel.pipeline_model_parallel_size, 1)
        engine = build_run_engine(config, padded_vocab_size(BYTE_VOCAB_SIZE, tp))
        params = list(engine.module.parameters())
        out.append((sum(p.numel() for p in params),
                    sum(p.numel() * p.element_size() for p in params),
                    sum(b.grad_data.numel() * b.grad_data.element_size()
                        for b in engine.model[0].buffers)))
        parallel_state.destroy_model_parallel()
    return out


@pytest.mark.parallel
def test_counts_equal_the_real_model_on_every_rank():
    argvs = {variant: TINY + extra for variant, extra in VARIANTS.items()}
    real = run_distributed(_real_rank, 4, list(argvs.values()))
    for index, (variant, argv) in enumerate(argvs.items()):
        stages = plan(parse_pretrain_args(argv + ["--dry-run"]), 4).stages
        # megatron's rank order: TP fastest, then DP (1 here), then PP
        for rank, counts in enumerate(real):
            stage = stages[rank // 2]
            assert (stage.parameters, stage.weight_bytes, stage.grad_bytes) == counts[index], (
                variant, rank)


@pytest.mark.parametrize("bf16", [False, True])
def test_optimizer_states_are_adam_moments_plus_fp32_main_weights(bf16):
    argv = SHAPE + ["--use-distributed-optimizer", "--dry-run"] + ["--bf16"] * bf16
    result = plan(parse_pretrain_args(argv), 4)  # DP 4
    (stage,) = result.stages
    gates = 6 * 4 + 3  # q, k, v, attention output, fc1, fc2 per layer; embedding, positions, output
    assert stage.grad_bytes == FP32_BYTES * stage.parameters
    main = FP32_BYTES * (stage.parameters - gates) if bf16 else 0
    assert stage.weight_bytes == (2 * stage.parameters + 2 * gates if bf16
                                  else FP32_BYTES * stage.parameters)
    assert stage.optimizer_bytes == ADAM_MOMENT_BYTES * stage.parameters + main
    assert stage.distributed_optimizer_bytes == stage.optimizer_bytes / 4
    assert result.memory_per_gpu_bytes == (stage.weight_bytes + stage.grad_bytes
                                           + stage.distributed_optimizer_bytes
                                           + stage.activation_bytes)
    assert result.tokens_per_step == 8 * 32 and result.microbatches_per_step == 1


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_activations_are_korthikanti_et_al_for_their_model(sequence_parallel):
    """A 16-bit GeLU layer, d_ff = 4h, dropout: Korthikanti et al. 2022, Table 2."""
    s, b, h, a, t = 2048, 4, 5120, 40, 8
    layer = SimpleNamespace(
        tensor_model_parallel_size=t, sequence_parallel=sequence_parallel,
        params_dtype=torch.bfloat16, hidden_size=h, ffn_hidden_size=4 * h,
        num_attention_heads=a, gated_linear_unit=False, hidden_dropout=0.1,
        attention_dropout=0.1)
    paper = (s * b * h * (34 / t + 5 * a * s / (h * t)) if sequence_parallel
             else s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    assert math.isclose(layer_activation_bytes(layer, s, b, fused_attention=False), paper)
    without_scores = paper - s * b * h * 5 * a * s / (h * t)
    assert math.isclose(layer_activation_bytes(layer, s, b, fused_attention=True),
                        without_scores)
