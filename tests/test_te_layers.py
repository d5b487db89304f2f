"""The Transformer Engine backend (megatron_wesar.te_layers, spec backend "transformer_engine"):
its spec, the error where TE is absent, the gated layers on a stub of megatron-core's TE wrappers
(what runs here), and on real TE where it imports (a GPU machine)."""
import importlib.util
import pathlib
import sys
import types
from dataclasses import replace
from unittest import mock

import pytest
import torch
from megatron.core.extensions.transformer_engine import TEDotProductAttention, TENorm

from megatron_wesar.config import WeSaRConfig
from tests.helpers.oracle_harness import Case


def _has_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_transformer_engine(), reason="transformer_engine imports here")
def test_transformer_engine_backend_without_te_names_what_to_install():
    from megatron_wesar.config import WeSaRConfig
    from megatron_wesar.spec import TransformerEngineUnavailableError, get_wesar_layer_spec

    with pytest.raises(TransformerEngineUnavailableError, match="install it .*transformer_engine"):
        get_wesar_layer_spec(WeSaRConfig(), backend="transformer_engine")


def test_transformer_engine_spec_shape():
    """The TE spec is megatron-core's TE GPT layer: norm-fused LayerNorm-linears for qkv and fc1
    (the spec's norms IdentityOp), TE row-parallel linears and TE attention, gated like the
    local layers (role and wesar passed)."""
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_wesar import spec
    from megatron_wesar.config import WeSaRConfig

    wesar = WeSaRConfig(backbone="small")
    with mock.patch.object(spec, "require_transformer_engine"):
        layer = spec.get_wesar_layer_spec(wesar, backend="transformer_engine")
    sub = layer.submodules
    attention, mlp = sub.self_attention.submodules, sub.mlp.submodules
    assert sub.input_layernorm is IdentityOp and sub.pre_mlp_layernorm is IdentityOp
    te = "megatron_wesar.te_layers"
    assert attention.linear_qkv.module == (te, "GatedTELayerNormColumnParallelLinear")
    assert mlp.linear_fc1.module == (te, "GatedTELayerNormColumnParallelLinear")
    assert attention.linear_proj.module == (te, "GatedTERowParallelLinear")
    assert mlp.linear_fc2.module == (te, "GatedTERowParallelLinear")
    assert attention.core_attention is TEDotProductAttention  # SelfAttention calls it
    roles = [s.params["role"] for s in (attention.linear_qkv, attention.linear_proj,
                                        mlp.linear_fc1, mlp.linear_fc2)]
    assert roles == ["qkv", "attn_proj", "fc1", "fc2"]
    assert all(s.params["wesar"] is wesar for s in (attention.linear_qkv, mlp.linear_fc2))
    with pytest.raises(ValueError, match="backend must be one of"):
        spec.get_wesar_layer_spec(wesar, backend="te")


@pytest.mark.skipif(not (_has_transformer_engine() and torch.cuda.is_available()),
                    reason="needs transformer_engine and a CUDA GPU (not installable here)")
def test_transformer_engine_gated_model_runs_and_gates_scale():
    """On TE: the gated TE model builds, its gates multiply (doubling every gate of a layer
    doubles that layer's qkv output) and every gate gets a finite gradient."""
    from megatron_wesar.layers import gate_parameters
    from tests.helpers import oracle_harness

    case = replace(Case(dtype=torch.bfloat16, swiglu=True), seq_len=16)
    config = oracle_harness.transformer_config(case)
    config.use_cpu_initialization = False
    with mock.patch.object(oracle_harness, "transformer_config", lambda c: config):
        from megatron_wesar.spec import build_gpt_model
        from megatron_wesar.training.engine import initialize_parallel

        initialize_parallel(1, 1, case.seed)
        model = build_gpt_model(config, oracle_harness.wesar_config(case), case.vocab_size,
                                case.seq_len, backend="transformer_engine").cuda()
    tokens = case.global_batch(0)[:2, :-1].cuda()
    positions = torch.arange(case.seq_len, device="cuda").expand_as(tokens)
    qkv = model.decoder.layers[0].self_attention.linear_qkv
    x = torch.randn(case.seq_len, 2, case.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        before = qkv(x)[0]
        for gate in qkv.gates():
            gate.mul_(2)
        torch.testing.assert_close(qkv(x)[0], 2 * before, rtol=2e-2, atol=1e-3)
    model(tokens, positions, None, labels=tokens).float().mean().backward()
    grads = [g.grad for _, g in gate_parameters(model)]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


class _StubTELinear(torch.nn.Module):
    """What the gated TE layers use of megatron-core's TE linears: their constructor's
    arguments, `weight` in params_dtype, and a forward returning (output, bias) that first runs
    TE's dtype check (TransformerEngineBaseModule.set_activation_dtype outside autocast: every
    parameter must have the input's dtype)."""

    def __init__(self, input_size, output_size, *, config, init_method, skip_bias_add=False,
                 **kwargs):
        super().__init__()
        self.config, self.tp_group = config, None
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=config.params_dtype))
        init_method(self.weight)

    def set_activation_dtype(self, inp):
        for name, param in self.named_parameters():
            if param is not None:
                assert inp.dtype == param.dtype, (
                    "Data types for parameters must match when outside of autocasted region. "
                    f" Found input dtype: {inp.dtype} and {name!r} dtype: {param.dtype}")

    def forward(self, x):
        self.set_activation_dtype(x)
        return x @ self.weight.t(), None


def _te_layers_on_stub_te(monkeypatch):
    """megatron_wesar.te_layers built on _StubTELinear (loaded aside, not in sys.modules)."""
    stub = types.ModuleType("megatron.core.extensions.transformer_engine")
    stub.TELayerNormColumnParallelLinear = type("TELayerNormColumnParallelLinear",
                                                (_StubTELinear,), {})
    stub.TERowParallelLinear = type("TERowParallelLinear", (_StubTELinear,), {})
    monkeypatch.setitem(sys.modules, stub.__name__, stub)
    path = pathlib.Path(__file__).resolve().parents[1] / "megatron_wesar" / "te_layers.py"
    spec = importlib.util.spec_from_file_location("megatron_wesar.te_layers_on_stub", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fp32_gates_pass_te_dtype_check_in_a_bf16_model(monkeypatch):
    """TE refuses a parameter whose dtype is not the input's; the gated TE layers keep their
    fp32 gates out of that check (TE's own weight stays in it) and keep them registered, in
    order, for the optimizer and checkpoints."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    te_layers = _te_layers_on_stub_te(monkeypatch)
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               params_dtype=torch.bfloat16, bf16=True,
                               use_cpu_initialization=True)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    qkv = te_layers.GatedTELayerNormColumnParallelLinear(32, 96, config=config, role="qkv",
                                                         wesar=WeSaRConfig())
    row = te_layers.GatedTERowParallelLinear(32, 32, config=config, role="attn_proj",
                                             wesar=WeSaRConfig())
    for layer, gates in ((qkv, ["gate_q", "gate_k", "gate_v"]), (row, ["gate"])):
        names = [name for name, _ in layer.named_parameters()]
        assert names == ["weight", *gates]
        assert all(getattr(layer, g).dtype == torch.float32 for g in gates)
        output, _ = layer(x)
        assert output.dtype == torch.bfloat16
        assert [name for name, _ in layer.named_parameters()] == names
        with pytest.raises(AssertionError, match="'weight' dtype"):
            layer(x.float())
    # the gates multiply: qkv's output columns by gate_q, gate_k, gate_v
    with torch.no_grad():
        plain = x @ qkv.weight.t()
        torch.testing.assert_close(qkv(x)[0], plain * torch.cat(
            [g.to(torch.bfloat16).expand(32) for g in qkv.gates()]), rtol=1e-2, atol=1e-3)


def test_transformer_engine_block_spec_final_norm_is_te_norm():
    """The TE block's final norm is megatron-core's TENorm class (build_module builds it)."""
    from megatron_wesar import spec

    with mock.patch.object(spec, "require_transformer_engine"), \
            mock.patch.object(spec, "get_num_layers_to_build", return_value=2):
        block = spec.get_wesar_block_spec(object(), WeSaRConfig(), backend="transformer_engine")
    assert block.submodules.layer_norm is TENorm and len(block.submodules.layer_specs) == 2
