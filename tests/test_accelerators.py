"""apex, when importable: the local spec's norms are megatron-core's apex FusedLayerNorm and no
apex notice is said; absent, TorchNorm and one notice line. The optimizer is the Adam that
megatron-core's optimizer module chose at import (TE's or apex's FusedAdam, else torch's AdamW).

apex does not install here: its importable case is a stub (apex's fused LayerNorm module and its
CUDA kernel's module in sys.modules, for this test only), and megatron-core's fused_layer_norm
module, which read apex at its own import, is patched as that import would have set it."""
import io
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from megatron_wesar.accelerators import APEX_FUSED_LAYER_NORM, apex_available
from megatron_wesar.compat import notices
from megatron_wesar.config import WeSaRConfig
from megatron_wesar.norm import ApexFusedNorm, TorchNorm
from megatron_wesar.spec import get_wesar_layer_spec
from megatron_wesar.training.arguments import parse_pretrain_args
from tests.helpers.distributed import run_distributed


class StubFusedLayerNormAffineFunction:
    """apex's FusedLayerNormAffineFunction as megatron-core calls it; records its calls."""

    calls = 0

    @staticmethod
    def forward(ctx, input, weight, bias, normalized_shape, eps, memory_efficient=False):
        StubFusedLayerNormAffineFunction.calls += 1
        return F.layer_norm(input, normalized_shape, weight, bias, eps)

    @classmethod
    def apply(cls, *args):
        return cls.forward(None, *args)


@pytest.fixture
def stub_apex(monkeypatch):
    """An importable apex fused LayerNorm (stub modules) for this test only."""
    from megatron.core.fusions import fused_layer_norm

    for name in ("apex", "apex.normalization", *APEX_FUSED_LAYER_NORM):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[APEX_FUSED_LAYER_NORM[0]].FusedLayerNormAffineFunction = \
        StubFusedLayerNormAffineFunction
    monkeypatch.setattr(fused_layer_norm, "HAVE_FUSED_LAYER_NORM", True)
    monkeypatch.setattr(fused_layer_norm, "FusedLayerNormAffineFunction",
                        StubFusedLayerNormAffineFunction, raising=False)


def _notice(monkeypatch) -> str:
    """What quiet_megatron_notices says twice on rank 0 of a fresh run."""
    monkeypatch.setenv(notices._SAID, "")
    monkeypatch.setenv("RANK", "0")
    stream = io.StringIO()
    notices.quiet_megatron_notices(stream)
    notices.quiet_megatron_notices(stream)
    return stream.getvalue()


def _config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                             use_cpu_initialization=True, **overrides)


def _norms(config):
    """The layer spec's two norms, built for `config`."""
    from megatron.core.transformer.spec_utils import build_module

    sub = get_wesar_layer_spec(WeSaRConfig()).submodules
    return [build_module(spec, config=config, hidden_size=32, eps=1e-5)
            for spec in (sub.input_layernorm, sub.pre_mlp_layernorm)]


def test_apex_importable_picks_megatron_fused_layer_norm(stub_apex, monkeypatch):
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

    assert apex_available()
    sub = get_wesar_layer_spec(WeSaRConfig()).submodules
    assert sub.input_layernorm is ApexFusedNorm and sub.pre_mlp_layernorm is ApexFusedNorm
    config = _config(bf16=True, params_dtype=torch.bfloat16, sequence_parallel=False)
    for norm in _norms(config):
        assert isinstance(norm, FusedLayerNorm)
        assert {p.dtype for p in norm.parameters()} == {torch.bfloat16}
        x = torch.randn(4, 2, 32, dtype=torch.bfloat16)
        before = StubFusedLayerNormAffineFunction.calls
        torch.testing.assert_close(norm(x), F.layer_norm(x, (32,), norm.weight, norm.bias))
        assert StubFusedLayerNormAffineFunction.calls == before + 1  # apex's function ran
    # apex's kernel is LayerNorm only: RMSNorm keeps the PyTorch norm, as in megatron-core
    assert all(isinstance(n, TorchNorm) for n in _norms(_config(normalization="RMSNorm")))
    assert "apex" not in _notice(monkeypatch)


@pytest.mark.skipif(apex_available(), reason="apex is installed here")
def test_apex_absent_keeps_torch_norm_and_says_so_once(monkeypatch):
    sub = get_wesar_layer_spec(WeSaRConfig()).submodules
    assert sub.input_layernorm is TorchNorm and sub.pre_mlp_layernorm is TorchNorm
    said = _notice(monkeypatch).splitlines()
    assert len(said) == 1 and "apex" in said[0] and said[0].startswith("note:")


def _optimizer_classes(rank, world_size):
    """The inner optimizer class the driver builds: as megatron-core chose it here, and with
    megatron-core's choice replaced by a stub FusedAdam (as if TE or apex had imported)."""
    from unittest import mock

    from megatron.core import optimizer as megatron_optimizer

    from megatron_wesar.training.engine import initialize_parallel
    from megatron_wesar.training.pretrain import build_run_engine

    class StubFusedAdam(torch.optim.AdamW):
        def __init__(self, params, adam_w_mode=True, **kwargs):
            super().__init__(params, **kwargs)
            self.adam_w_mode = adam_w_mode

    config = parse_pretrain_args(["--num-layers", "1", "--hidden-size", "32",
                                  "--num-attention-heads", "4", "--seq-length", "16"])
    initialize_parallel(1, 1, 0)
    built = build_run_engine(config, 256).optimizer.optimizer
    with mock.patch.multiple(megatron_optimizer, Adam=StubFusedAdam,
                             USING_PYTORCH_OPTIMIZER=False):
        fused = build_run_engine(config, 256).optimizer.optimizer
    return type(built).__name__, type(fused).__name__, fused.adam_w_mode


@pytest.mark.parallel
def test_driver_optimizer_is_megatron_cores_choice():
    from megatron.core import optimizer as megatron_optimizer

    built, fused, adam_w_mode = run_distributed(_optimizer_classes, 1)[0]
    # megatron-core's fallback without TE and apex is torch's AdamW (decoupled weight decay)
    expected = "AdamW" if megatron_optimizer.USING_PYTORCH_OPTIMIZER else \
        megatron_optimizer.Adam.__name__
    assert built == expected
    assert fused == "StubFusedAdam" and adam_w_mode  # a fused Adam in AdamW mode

