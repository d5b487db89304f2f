"""The torch-native FP8 backend (megatron_wesar.fp8): the gated FP8 GEMM against float64 products
of the same quantized operands (forward, both backward GEMMs, the gate's gradient), the layers
under config.fp8 (TP = 2 + SP equals TP = 1) and the clear errors where FP8 cannot run."""
from dataclasses import replace
from unittest import mock

import pytest
import torch

from megatron_wesar.fp8 import (
    Fp8Recipe,
    Fp8UnavailableError,
    amaxes,
    check_supported,
    fp8_linear,
    quantize,
    recipe_for,
    weight_stats,
)
from tests.helpers.distributed import run_distributed
from tests.helpers.oracle_harness import Case

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


def test_quantization_error_of_w_bar():
    """W_bar drawn with WeSaR's sigma quantizes to e4m3 with a few percent relative error, the
    same for any std (per-tensor scaling)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(256, 256, generator=gen)
    errors = [weight_stats(w * std, HYBRID).rel_error for std in (0.0063, 0.02, 1.0)]
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


def _fp8_case(rank, world_size, case):
    """run_megatron_case with the transformer linears in torch-native hybrid FP8."""
    from tests.helpers import oracle_harness

    plain = oracle_harness.transformer_config

    def fp8_config(c):
        config = plain(c)
        config.fp8, config.fp8_recipe = "hybrid", "tensorwise"
        return config

    with mock.patch.object(oracle_harness, "transformer_config", fp8_config):
        return oracle_harness.run_megatron_case(rank, world_size, case)


# one step: a later step compares Adam updates, which amplify rounding flips of near-zero gradients
# (the key bias's gradient is zero in exact arithmetic) to whole learning-rate steps
FP8_CASE = Case(dtype=torch.float32, steps=1, swiglu=True, num_query_groups=2, seq_len=16)


@pytest.mark.parallel
def test_tp2_sp_fp8_equals_tp1_fp8():
    """TP = 2 with sequence parallelism trains the FP8 model as TP = 1 does: amaxes are maxed over
    the TP group, so every GEMM sees the same scales (up to accumulation order)."""
    tp1 = run_distributed(_fp8_case, 1, FP8_CASE)[0]
    tp2 = run_distributed(_fp8_case, 2, replace(FP8_CASE, tp=2, sp=True))[0]
    assert tp1["losses"] == pytest.approx(tp2["losses"], rel=1e-6)
    (one,), (two,) = tp1["gate_grads"], tp2["gate_grads"]
    assert one.keys() == two.keys() and len(one) == FP8_CASE.num_gates
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=5e-5, atol=1e-8, msg=key)
