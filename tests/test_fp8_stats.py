"""The weights' FP8 statistics (megatron_wesar.fp8_stats) in a tiny torch-native FP8 run: the
metrics file holds <stat>_mean/<role> for every FP8 role at the log intervals only, equal to a
direct float64 computation of the definitions on the run's final weights, for WeSaR and for the
He baseline (W_eff = W)."""
import json
import math
from unittest import mock

import pytest
import torch

from megatron_wesar.metric_keys import (
    FP8_QUANT_REL_ERROR,
    FP8_WEIGHT_AMAX,
    FP8_WEIGHT_SCALE,
    role_mean_key,
)
from megatron_wesar.training.arguments import parse_pretrain_args
from tests.helpers.distributed import run_distributed

TINY = ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--train-iters", "2", "--log-interval", "2",
        "--eval-iters", "1", "--swiglu", "--fp8-format", "hybrid"]
FP8_ROLES = ("q", "k", "v", "attn_proj", "fc1_gate", "fc1", "fc2")
STATS = (FP8_WEIGHT_AMAX, FP8_WEIGHT_SCALE, FP8_QUANT_REL_ERROR)


def direct_statistics(model) -> dict:
    """{<stat>_mean/<role>} from the definitions: per logical matrix, W_eff = alpha * W_bar,
    W_bar quantized to e4m3 with its layer's per-tensor scale amax(W_bar) / 448."""
    from megatron_wesar.monitor import gated_matrices

    values = {}
    for m in gated_matrices(model):
        if m.role not in FP8_ROLES:
            continue
        weight = m.weight.detach()
        scale = weight.abs().max().float() / torch.finfo(torch.float8_e4m3fn).max
        dequantized = (weight.float() / scale).to(torch.float8_e4m3fn).double() * scale.double()
        alpha = 1.0 if m.gate is None else m.gate.detach().double()
        w_eff = alpha * m.part(weight).double()
        error = (w_eff - alpha * m.part(dequantized)).norm() / w_eff.norm()
        for stat, value in ((FP8_WEIGHT_AMAX, m.part(weight).abs().max()),
                            (FP8_WEIGHT_SCALE, scale), (FP8_QUANT_REL_ERROR, error)):
            values.setdefault(role_mean_key(stat, m.role), []).append(float(value))
    return {key: math.fsum(v) / len(v) for key, v in values.items()}


def _runs(rank, world_size, runs):
    """{name: (metrics records, direct statistics of the final weights)} of pretrain runs."""
    from megatron_wesar.training import pretrain as driver

    out, engines = {}, []
    build = driver.build_run_engine
    with mock.patch.object(driver, "build_run_engine",
                           lambda *a, **k: engines.append(build(*a, **k)) or engines[-1]):
        for name, argv in runs.items():
            driver.pretrain(parse_pretrain_args(argv), log=lambda line: None)
            with open(argv[argv.index("--metrics-file") + 1]) as f:
                records = [json.loads(line) for line in f]
            out[name] = (records, direct_statistics(engines[-1].model))
    return out


@pytest.mark.parallel
def test_fp8_run_records_the_weights_fp8_statistics(tmp_path):
    runs = {name: TINY + extra + ["--metrics-file", str(tmp_path / f"{name}.jsonl")]
            for name, extra in (("wesar", []), ("he", ["--no-wesar"]))}
    results = run_distributed(_runs, 1, runs)[0]
    for name, (records, direct) in results.items():
        steps = {r["iteration"]: r for r in records if "loss" in r}
        keys = {key for key in steps[2] if key.startswith("fp8_")}
        assert keys == {role_mean_key(s, role) for s in STATS for role in FP8_ROLES}, name
        assert not any(key.startswith("fp8_") for key in steps[1])  # not a log iteration
        for key in keys:
            assert steps[2][key] == pytest.approx(direct[key], rel=1e-6), (name, key)
        errors = [steps[2][role_mean_key(FP8_QUANT_REL_ERROR, role)] for role in FP8_ROLES]
        assert all(0.005 < e < 0.05 for e in errors), (name, errors)
