"""The torch-native FP8 backend (megatron_wesar.fp8): the gated FP8 GEMM against float64 products
of the same quantized operands (forward, both backward GEMMs, the gate's gradient), the layers
under config.fp8 (TP = 2 + SP equals TP = 1) and the clear errors where FP8 cannot run."""
from dataclasses import replace
from functools import lru_cache
from unittest import mock

import pytest
import torch

from megatron_wesar import fp8
from megatron_wesar.fp8 import (
    Fp8Recipe,
    Fp8UnavailableError,
    amaxes,
    check_supported,
    fp8_linear,
    quantize,
    recipe_for,
)
from megatron_wesar.fp8_stats import matrix_stats
from tests.helpers.distributed import run_distributed
from tests.helpers.oracle_check import assert_matches_reference
from tests.helpers.oracle_harness import Case, run_reference_case

HYBRID = Fp8Recipe("hybrid")


def _dequantized(t: torch.Tensor, dtype) -> torch.Tensor:
    """t quantized per tensor and dequantized, in float64 (what the FP8 GEMM multiplies)."""
    q, d = quantize(t, amaxes([t], None)[0], dtype)
    return q.double() * d.double()


@pytest.mark.parametrize("per_column", [False, True], ids=["gate", "column_scale"])
def test_gemm_equals_dequantized_product(per_column):
    """Forward, input gradient, W_bar gradient and gate gradient equal float64 products of the
    quantized tensors the FP8 GEMMs actually multiply (up to fp32 accumulation)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 32, generator=gen, requires_grad=True)
    weight = (torch.randn(48, 32, generator=gen) * 0.0063).requires_grad_()
    scale = (torch.rand(48 if per_column else 1, generator=gen) + 0.5).requires_grad_()
    grad = torch.randn(4, 8, 48, generator=gen)
    out = fp8_linear(x, weight, scale, HYBRID)
    out.backward(grad)

    xd = _dequantized(x.detach().reshape(-1, 32), torch.float8_e4m3fn)
    wd = _dequantized(weight.detach(), torch.float8_e4m3fn)
    s = scale.detach().double()
    unscaled = xd @ wd.T
    torch.testing.assert_close(out.detach().reshape(-1, 48).double(), unscaled * s,
                               rtol=1e-6, atol=1e-7)
    g = grad.reshape(-1, 48)
    # the quantized output gradient is that of x W_bar^T: g * scale, quantized once
    gs = (_dequantized(g * s.float(), torch.float8_e5m2) if per_column
          else _dequantized(g, torch.float8_e5m2) * s)
    torch.testing.assert_close(x.grad.reshape(-1, 32).double(), gs @ wd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), gs.T @ xd, rtol=1e-5, atol=1e-5)
    expected_gate = (gs * unscaled).sum(0) / s if per_column else (gs * unscaled).sum() / s
    torch.testing.assert_close(scale.grad.double(), expected_gate, rtol=1e-5, atol=1e-6)


def test_column_scales_give_the_same_product_in_bf16_and_fp32():
    """Per-column scales ride in the GEMM (row-wise scaling) for a bf16 output and are applied
    after a per-tensor GEMM for fp32 (CUDA's row-wise scaling gives bf16 only): the same product
    up to bf16 rounding, and both equal the float64 product of the quantized operands."""
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(32, 64, generator=gen), torch.randn(48, 64, generator=gen)
    columns = torch.rand(48, generator=gen) + 0.5
    (aq, da), (bq, db) = (quantize(t, amaxes([t], None)[0], torch.float8_e4m3fn) for t in (a, b))
    exact = (aq.double() * da) @ (bq.double() * db).T * columns.double()
    out = {dtype: fp8.scaled_mm(aq, bq, da, db * columns, dtype)
           for dtype in (torch.bfloat16, torch.float32)}
    assert out[torch.bfloat16].dtype == torch.bfloat16 and out[torch.float32].dtype == torch.float32
    torch.testing.assert_close(out[torch.float32].double(), exact, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out[torch.bfloat16].double(), exact, rtol=8e-3, atol=1e-2)


def test_cuda_gemm_shapes_not_multiples_of_16_are_a_clear_error():
    fp8.check_cuda_gemm_shape(torch.empty(24, 64), torch.empty(48, 64))  # rows are free
    for a, b_t in ((torch.empty(32, 72), torch.empty(48, 72)),
                   (torch.empty(32, 64), torch.empty(40, 64))):
        with pytest.raises(Fp8UnavailableError, match="multiples of 16; so must the hidden size"):
            fp8.check_cuda_gemm_shape(a, b_t)


def test_quantization_error_of_w_bar():
    """W_bar drawn with WeSaR's sigma quantizes to e4m3 with a few percent relative error, the
    same for any std (per-tensor scaling)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(256, 256, generator=gen).double()
    errors = [float((_dequantized(s, torch.float8_e4m3fn) - s).norm() / s.norm())
              for s in (w * 0.0063, w * 0.02, w)]
    assert 0.01 < errors[0] < 0.05
    assert max(errors) - min(errors) < 1e-6


def _config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               use_cpu_initialization=True, fp8="hybrid",
                               fp8_recipe="tensorwise")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_recipe_only_for_transformer_linears():
    """config.fp8 puts the transformer linears in FP8; the output layer stays in bf16/fp32."""
    config = _config()
    assert recipe_for(config, "qkv") == HYBRID
    assert recipe_for(config, "output") is None
    assert recipe_for(_config(fp8=None), "qkv") is None


@pytest.mark.parametrize("overrides, needle", [
    ({"fp8_recipe": "delayed"}, "fp8_recipe 'delayed'"),
    ({"fp8_recipe": "mxfp8"}, "transformer_engine"),
    ({"fp8_param": True}, "fp8_param"),
    ({"params_dtype": torch.float64}, "params_dtype"),
])
def test_unsupported_fp8_is_a_clear_error(overrides, needle):
    """FP8 asked for where the torch-native backend cannot run it is an error naming why."""
    with pytest.raises(Fp8UnavailableError, match=needle):
        check_supported(_config(**overrides))


def test_gpu_without_fp8_gemms_is_a_clear_error(monkeypatch):
    """An Ampere GPU (compute capability 8.0) has no FP8 GEMMs: named, never a bf16 run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(Fp8UnavailableError, match=r"A100.* compute capability 8\.9"):
        check_supported(_config(use_cpu_initialization=False))


def _fp8_case(rank, world_size, case):
    """run_megatron_case with the transformer linears in torch-native hybrid FP8, plus the FP8
    statistics of the initial weights."""
    from tests.helpers import oracle_harness

    plain = oracle_harness.transformer_config

    def fp8_config(c):
        config = plain(c)
        config.fp8, config.fp8_recipe = "hybrid", "tensorwise"
        return config

    with mock.patch.object(oracle_harness, "transformer_config", fp8_config):
        stats = matrix_stats(oracle_harness.build_case_model(case))
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        return {**oracle_harness.run_megatron_case(rank, world_size, case), "stats": stats}


def _fp8_unrounded_case(rank, world_size, case):
    """_fp8_case on the FP8 layers without their rounding (fp8.without_rounding); also returns
    how many FP8 GEMMs this rank ran."""
    with fp8.without_rounding(), mock.patch.object(fp8, "scaled_mm", wraps=fp8.scaled_mm) as gemm:
        return {**_fp8_case(rank, world_size, case), "gemms": gemm.call_count}


# one step: a later step compares Adam updates, which amplify rounding flips of near-zero gradients
# (the key bias's gradient is zero in exact arithmetic) to whole learning-rate steps
FP8_CASE = Case(dtype=torch.float32, steps=1, swiglu=True, num_query_groups=2, seq_len=16,
                micro_batches=1)
# without rounding, the oracle's 5 steps and 2 micro-batches
UNROUNDED_CASE = Case(dtype=torch.float32, swiglu=True, num_query_groups=2)
LAYOUTS = {1: {"tp": 1}, 2: {"tp": 2, "sp": True}}  # world size: TP = 1, TP = 2 with SP


def _fp8_runs(rank, world_size):
    layout = LAYOUTS[world_size]
    return {"fp8": _fp8_case(rank, world_size, replace(FP8_CASE, **layout)),
            "unrounded": _fp8_unrounded_case(rank, world_size, replace(UNROUNDED_CASE, **layout))}


@lru_cache(maxsize=None)
def fp8_results(world_size: int) -> dict:
    """Rank 0's records of the FP8 case and the unrounded case at one layout (one spawn)."""
    return run_distributed(_fp8_runs, world_size)[0]


@pytest.mark.parallel
def test_tp2_sp_fp8_equals_tp1_fp8():
    """TP = 2 with sequence parallelism trains the FP8 model as TP = 1 does: amaxes are maxed over
    the TP group, so every GEMM sees the same scales (up to accumulation order)."""
    tp1, tp2 = fp8_results(1)["fp8"], fp8_results(2)["fp8"]
    assert tp1["losses"] == pytest.approx(tp2["losses"], rel=1e-6)
    # statistics of the whole logical matrices: the same at both layouts, one entry per matrix
    # (q, k, v, attention output, SwiGLU gate and up, fc2)
    assert len(tp1["stats"]) == 7 * FP8_CASE.num_layers
    for name, stats in tp1["stats"].items():
        assert (tp2["stats"][name].amax, tp2["stats"][name].scale) == (stats.amax, stats.scale)
        assert tp2["stats"][name].rel_error == pytest.approx(stats.rel_error, rel=1e-9)
        assert 0.01 < stats.rel_error < 0.05
    (one,), (two,) = tp1["gate_grads"], tp2["gate_grads"]
    assert one.keys() == two.keys() and len(one) == FP8_CASE.num_gates
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=5e-5, atol=1e-8, msg=key)
    # and the FP8 step is within FP8 rounding of the exact model's (the dense reference from the
    # same weights): loss measured 7e-5 relative, global grad norm 1.3e-2 (e5m2 gradients)
    ref = run_reference_case(FP8_CASE, tp1["initial"])
    assert tp1["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-3)
    assert tp1["grad_norms"][0] == pytest.approx(ref["grad_norms"][0], rel=5e-2)


@pytest.mark.parallel
@pytest.mark.parametrize("world_size", list(LAYOUTS), ids=["tp1", "tp2-sp"])
def test_fp8_layers_without_rounding_match_dense_reference(world_size):
    """The FP8 layers' arithmetic around the rounding is exact: with quantize and scaled_mm
    unrounded, 5 AdamW steps of a SwiGLU GQA WeSaR model train as the dense reference does, to
    the oracle's float32 tolerances (losses, grad norms, every gate gradient and value, every
    trained tensor). The rounding itself is test_gemm_equals_dequantized_product's."""
    case = replace(UNROUNDED_CASE, **LAYOUTS[world_size])
    ours = fp8_results(world_size)["unrounded"]
    # every gated linear (qkv, attention output, fc1, fc2) ran its three GEMMs in the backend
    assert ours["gemms"] == 3 * 4 * case.num_layers * case.micro_batches * case.steps
    assert_matches_reference(case, ours)


# --- driver flags (Megatron-LM's names) and the backends -----------------------------------


def test_fp8_flags_reach_the_transformer_config():
    from megatron_wesar.training.arguments import parse_pretrain_args
    from megatron_wesar.training.pretrain import build_transformer_config

    assert build_transformer_config(parse_pretrain_args([])).fp8 is None
    config = build_transformer_config(parse_pretrain_args(["--fp8-format", "hybrid"]))
    assert (config.fp8, config.fp8_recipe) == ("hybrid", "tensorwise")
    te = parse_pretrain_args(["--transformer-impl", "transformer_engine", "--fp8-format", "e4m3",
                              "--fp8-recipe", "delayed", "--fp8-amax-history-len", "16",
                              "--fp8-amax-compute-algo", "max", "--fp8-param-gather"])
    config = build_transformer_config(te)
    assert (config.fp8, config.fp8_recipe, config.fp8_amax_history_len) == ("e4m3", "delayed", 16)
    assert config.fp8_amax_compute_algo == "max" and config.fp8_param


@pytest.mark.parametrize("argv, message", [
    (["--fp8-format", "hybrid", "--fp8-recipe", "delayed"],
     "--fp8-recipe delayed needs --transformer-impl transformer_engine"),
    (["--fp8-format", "hybrid", "--fp8-recipe", "mxfp8"], "mxfp8 needs --transformer-impl"),
    (["--fp8-format", "hybrid", "--fp8-param-gather"], "--fp8-param-gather needs"),
    (["--fp8-amax-history-len", "16"], "--fp8-amax-history-len need --fp8-format"),
    (["--fp8-format", "hybrid", "--fp8-amax-compute-algo", "max"], "only apply to --fp8-recipe "
     "delayed"),
    (["--fp8-format", "bf16"], "--fp8-format"),
    (["--transformer-impl", "te"], "--transformer-impl"),
])
def test_fp8_that_cannot_run_is_a_flag_error(argv, message, capsys):
    """FP8 asked for where it cannot run stops at the arguments, never a silent bf16 run."""
    from megatron_wesar.training.arguments import parse_pretrain_args

    with pytest.raises(SystemExit):
        parse_pretrain_args(argv)
    assert message in capsys.readouterr().err
