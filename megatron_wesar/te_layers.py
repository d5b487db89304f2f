"""Gated layers on megatron-core's Transformer Engine wrappers (`--transformer-impl
transformer_engine`); importable only where transformer_engine imports.

    layer                                  where the gate(s) multiply    local gate gradient
    GatedTELayerNormColumnParallelLinear   the sharded output, one       TP partial sum (complete
      (qkv, fc1: the norm is fused in)     scale per column              at TP = 1)
    GatedTERowParallelLinear               the input (TP-sharded)        TP partial sum
      (attention output, fc2)

A norm fused into the GEMM cancels a scale of its input (docs/design.md section 2), so qkv and
fc1 take their gates on the output, as the local fused layers do; the gates and their gradient
reduction are the local layers' (`layers._Gated`): one fp32 gate per logical matrix. Under TE's
FP8 the gate multiply stays outside the GEMM (the torch-native backend folds it into the GEMM's
scale, megatron_wesar.fp8); TE then saves its FP8 copy of the input, so the row-parallel gate's
saved tensor is not shared with it.
"""
from __future__ import annotations

from megatron.core.extensions.transformer_engine import (
    TELayerNormColumnParallelLinear,
    TERowParallelLinear,
)
from megatron.core.utils import get_pg_size, get_tensor_model_parallel_group_if_none

from .config import WeSaRConfig
from .init import ModelShape, is_gated, weight_std
from .layers import MatrixPart, _Gated, _normal_init, matrix_parts


class _GatesOutsideTEDtypeCheck:
    """Outside torch.autocast, TE's modules require every parameter to have the input's dtype
    (TransformerEngine pytorch/module/base.py, TransformerEngineBaseModule.set_activation_dtype,
    run by every forward); WeSaR's gates are fp32 in a bf16 / fp16 model by design, so that check
    runs with the gates set aside (TE's own weights are still checked)."""

    def set_activation_dtype(self, inp):
        """TE's set_activation_dtype without this layer's gates in the parameters."""
        gates = {part.gate_name: self._parameters.pop(part.gate_name)
                 for part in self.matrix_parts}
        try:
            super().set_activation_dtype(inp)
        finally:
            self._parameters.update(gates)  # registered last, so the order is kept


class GatedTELayerNormColumnParallelLinear(_GatesOutsideTEDtypeCheck,
                                           TELayerNormColumnParallelLinear, _Gated):
    """megatron-core's TELayerNormColumnParallelLinear (norm fused into the GEMM) whose matrices
    are gated on the sharded output: linear_qkv (role "qkv") gets gate_q, gate_k, gate_v, a
    SwiGLU linear_fc1 (role "fc1") gate_gate and gate_up, a GeLU fc1 one gate. Takes the
    parent's arguments plus `role` and `wesar`; W_bar is drawn with std(W_bar)."""

    def __init__(self, input_size, output_size, *, config, init_method=None, role: str,
                 wesar: WeSaRConfig | None = None, skip_bias_add: bool = False, **kwargs):
        wesar = wesar or WeSaRConfig()
        shape = ModelShape.from_transformer_config(config)
        tp = get_pg_size(get_tensor_model_parallel_group_if_none(kwargs.get("tp_group")))
        parts, layout = matrix_parts(role, config, wesar, output_size // tp)
        placement = "output" if is_gated(parts[0].role, wesar) else None
        stds = {weight_std(part.role, shape, wesar) for part in parts}
        assert len(stds) == 1, f"the parts of {role} must share one init std, got {stds}"
        super().__init__(input_size, output_size, config=config,
                         init_method=_normal_init(stds.pop()),
                         skip_bias_add=skip_bias_add or placement is not None, **kwargs)
        self.add_bias_in_forward = not skip_bias_add
        self._setup_gates(parts, layout, wesar, shape, placement, tp > 1)

    def forward(self, x):
        """The parent's forward (norm and GEMM) with the gate(s) on its output."""
        return self._gated_linear(super().forward, x)


class GatedTERowParallelLinear(_GatesOutsideTEDtypeCheck, TERowParallelLinear, _Gated):
    """megatron-core's TERowParallelLinear (attention output, fc2) whose matrix is gated on its
    TP-sharded input. Takes the parent's arguments plus `role` and `wesar`."""

    def __init__(self, input_size, output_size, *, config, init_method=None, role: str,
                 wesar: WeSaRConfig | None = None, **kwargs):
        wesar = wesar or WeSaRConfig()
        shape = ModelShape.from_transformer_config(config)
        tp = get_pg_size(get_tensor_model_parallel_group_if_none(kwargs.get("tp_group")))
        super().__init__(input_size, output_size, config=config,
                         init_method=_normal_init(weight_std(role, shape, wesar)), **kwargs)
        placement = "input" if is_gated(role, wesar) else None
        self._setup_gates((MatrixPart("", role),), None, wesar, shape, placement, tp > 1)

    def forward(self, x):
        """The parent's forward with the gate on its input."""
        return self._gated_linear(super().forward, x)
