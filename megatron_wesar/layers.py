"""Gated megatron-core layers: W_eff = alpha * W_bar with a replicated scalar gate alpha per
logical weight matrix.

W_bar stays each layer's `weight`, sharded exactly as megatron-core shards it; the GEMMs and
gradient-accumulation fusion are untouched, because the gate multiplies an activation next to the
linear (docs/design.md section 2), not the weight:

    layer             scaled activation                 local gate gradient
    column-parallel   input (replicated, or SP-sharded)  complete; TP partial sum under SP
                      output (TP-sharded)                TP partial sum
    row-parallel      output (after the reduction)       complete; TP partial sum under SP
                      input (TP-sharded)                 TP partial sum
    vocab embedding   output (after the reduction)       complete; partial when reduce-scattered

A fused column-parallel linear holds several logical matrices (megatron's linear_qkv: W_q, W_k,
W_v, laid out per query group; a SwiGLU linear_fc1: W_gate, W_up), each with its own gate: the
gates are expanded into one scale per output column (`FusedLayout`) that multiplies the sharded
output, so each gate's gradient is the sum of grad * unscaled output over its own columns (a TP
partial sum when TP > 1).

Each layer picks the placement at construction (`cheapest_placement`) and records on every gate
whether its local gradient is a TP partial sum (`gate.tp_partial_grad`). With
`WeSaRConfig.defer_gate_grad_reduction` (the default) those sums are done once per step for all
gates by `megatron_wesar.grads.finalize_model_grads`, which must then be the model config's
`finalize_model_grads_func` (checked at every forward that builds a graph); without it each
layer's partial gradients are all-reduced inside backward (one collective per layer per
microbatch).

Gates are fp32 whatever the model dtype (float64 in a float64 model): parameter, gradient and
reduction; the multiply casts the gate to the activation's dtype and accumulates the gate's
gradient in fp32 or wider.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron.core.tensor_parallel.layers import (
    set_defaults_if_not_set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.utils import (
    get_pg_size,
    get_tensor_model_parallel_group_if_none,
    make_sharded_tensor_for_checkpoint,
)

from .config import WeSaRConfig
from .init import ModelShape, gate_initial_value, is_gated, weight_std


class NonFiniteGateError(FloatingPointError):
    """A WeSaR gate (or its gradient) is NaN or infinite."""


class OldGateFormatError(ValueError):
    """A state dict of the old format: one gate for a fused linear's several matrices."""


def _normal_init(std: float):
    return partial(torch.nn.init.normal_, mean=0.0, std=std)


def _accepted_kwargs(cls, kwargs: dict) -> dict:
    """Drop keyword arguments `cls.__init__` does not know (passed by newer megatron-core)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        warnings.warn(
            f"{cls.__name__} of this megatron-core does not take {unknown}; ignoring them",
            stacklevel=3,
        )
    return {k: v for k, v in kwargs.items() if k in params}


def gate_dtype(params_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a gate in a model of `params_dtype`: fp32, or float64 in a float64 model."""
    return torch.promote_types(params_dtype, torch.float32)


def parameter_device(config) -> torch.device:
    """Where megatron-core puts a new parameter: the CPU with `config.use_cpu_initialization` or
    without CUDA, else the current CUDA device."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class GateScale(torch.autograd.Function):
    """y = x * scale (+ bias), for a (1,) gate or a per-column scale of shape (x.shape[-1],).

    The multiply runs in x's dtype (the scale cast to it); a bias (x.shape[-1],), when given, is
    added in the same pass. Backward accumulates the scale's gradient in fp32 or wider (one dot
    product for a (1,) gate, one per column otherwise) and returns it in the scale's dtype.
    """

    @staticmethod
    def forward(ctx, x, scale, bias=None):
        ctx.save_for_backward(x, scale)
        if bias is None:
            return x * scale.to(x.dtype)
        return torch.addcmul(bias, x, scale.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        grad_x = grad * scale.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_scale = grad_bias = None
        if ctx.needs_input_grad[1]:
            acc = torch.promote_types(grad.dtype, torch.float32)
            if scale.numel() == 1:
                grad_scale = torch.dot(grad.reshape(-1).to(acc), x.reshape(-1).to(acc))
            else:
                columns = scale.numel()
                grad_scale = (grad.reshape(-1, columns).to(acc)
                              * x.reshape(-1, columns).to(acc)).sum(0)
            grad_scale = grad_scale.reshape(scale.shape).to(scale.dtype)
        if len(ctx.needs_input_grad) > 2 and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_scale, grad_bias


def cheapest_placement(
    input_elems: float, output_elems: float, input_partial: bool, output_partial: bool, defer: bool
) -> str:
    """Where the gate multiplies: 'input' or 'output' of the linear.

    With the step-level fused reduction (`defer`), a partial-sum gradient costs nothing extra, so
    the smaller activation wins (ties: input). Without it, a partial-sum gradient costs one
    collective per gate per microbatch, so a complete placement wins when there is one.
    """
    if not defer and input_partial != output_partial:
        return "output" if input_partial else "input"
    return "output" if output_elems < input_elems else "input"


@dataclass(frozen=True)
class MatrixPart:
    """One logical weight matrix of a gated layer, with its own gate (docs/design.md section 1).

    `name` is "" for a layer of one matrix, else its part of a fused layer ("q", "k", "v" of
    linear_qkv; "gate", "up" of a SwiGLU linear_fc1). `role` is one of megatron_wesar.init.ROLES.
    """

    name: str
    role: str

    @property
    def gate_name(self) -> str:
        """The name of its gate parameter: 'gate', or 'gate_<name>' in a fused layer."""
        return f"gate_{self.name}" if self.name else "gate"


@dataclass(frozen=True)
class FusedLayout:
    """The local output rows of a fused column-parallel weight: `repeats` blocks, each holding
    `widths[i]` rows of part i, in the order of the parts.

    megatron's linear_qkv has one block per local query group (that group's query heads, key
    head, value head); a SwiGLU linear_fc1 one block (this rank's W_gate shard, its W_up shard).
    """

    widths: tuple
    repeats: int

    def rows(self, tensor: torch.Tensor, index: int) -> torch.Tensor:
        """The rows of part `index` of `tensor` (dim 0: local output rows), a view of shape
        [repeats, widths[index], *tensor.shape[1:]]."""
        start = sum(self.widths[:index])
        blocks = tensor.view(self.repeats, sum(self.widths), *tensor.shape[1:])
        return blocks[:, start:start + self.widths[index]]

    def column_scale(self, gates: torch.Tensor) -> torch.Tensor:
        """The scale of every local output column: gates[i] (gates: one per part) over the
        columns of part i."""
        block = torch.cat([gates[i:i + 1].expand(w) for i, w in enumerate(self.widths)])
        return block.repeat(self.repeats)


def matrix_parts(role: str, config, wesar: WeSaRConfig, local_output_size: int):
    """(parts, layout) of a column-parallel linear of `role` with `local_output_size` columns on
    this rank: the three parts q, k, v of "qkv" (megatron's linear_qkv); gate and up of "fc1"
    under SwiGLU (unless `wesar.share_glu_gates`); else one part of `role` and layout None."""
    if role == "qkv":
        if getattr(config, "attention_output_gate", False):
            raise ValueError("WeSaR gates do not support config.attention_output_gate")
        heads, channels = config.num_attention_heads, config.kv_channels
        groups = config.num_query_groups or heads
        parts = (MatrixPart("q", "q"), MatrixPart("k", "k"), MatrixPart("v", "v"))
        widths = (heads // groups * channels, channels, channels)
        layout = FusedLayout(widths, local_output_size // sum(widths))
    elif role == "fc1" and config.gated_linear_unit and not wesar.share_glu_gates:
        parts = (MatrixPart("gate", "fc1_gate"), MatrixPart("up", "fc1"))
        layout = FusedLayout((local_output_size // 2,) * 2, 1)
    else:
        return (MatrixPart("", role),), None
    if sum(layout.widths) * layout.repeats != local_output_size:
        raise ValueError(f"{role}: {local_output_size} local output columns do not split into "
                         f"{layout.repeats} blocks of {layout.widths}")
    return parts, layout


def old_gate_format_error(key: str, new_keys) -> OldGateFormatError:
    """The error for `key`, an old-format entry `<layer>.gate` holding one gate for the fused
    matrices whose gates are now `new_keys` (`<layer>.gate_q`, ...)."""
    layer = key[: -len(".gate")]
    return OldGateFormatError(
        f"{key}: this checkpoint or state dict has the old format with ONE gate for the fused "
        f"matrices of {layer}; WeSaR now gives each logical matrix its own gate "
        f"({', '.join(new_keys)}). Convert it by copying the old gate into each new one (the "
        "same model, the same outputs), or retrain."
    )


class _Gated:
    """Mixin owning the gate parameters of a gated layer's matrices and where they multiply."""

    matrix_parts: tuple
    fused_layout: FusedLayout | None

    def _setup_gates(
        self,
        parts: tuple,
        layout: FusedLayout | None,
        wesar: WeSaRConfig,
        shape: ModelShape,
        placement: str | None,
        partial_grad: bool,
        weight_role: str | None = None,
    ) -> None:
        self.matrix_parts, self.fused_layout = parts, layout
        self.wesar = wesar
        self.gate_placement = placement
        self._reduce_gate_grad_in_backward = bool(
            placement and partial_grad and not wesar.defer_gate_grad_reduction
        )
        for part in parts:
            gate = None
            if placement is not None:
                value = gate_initial_value(part.role, shape, wesar, weight_role=weight_role)
                gate = self._new_gate(value, part.role, partial_grad)
            self.register_parameter(part.gate_name, gate)
        if layout is not None:
            self.register_load_state_dict_pre_hook(_refuse_old_gate_format)

    def _new_gate(self, value: float, role: str, partial_grad: bool) -> torch.nn.Parameter:
        """A (1,) gate holding `value` (float64, stored in the gate dtype) and its attributes."""
        weight = getattr(self, "weight", None)
        device = weight.device if weight is not None else parameter_device(self.config)
        gate = torch.nn.Parameter(
            torch.full((1,), value, dtype=gate_dtype(self.config.params_dtype), device=device),
            requires_grad=self.wesar.train_gates,
        )
        set_defaults_if_not_set_tensor_model_parallel_attributes(gate)
        gate.allreduce = True  # data-parallel averaging like any replicated parameter
        gate.wesar_gate = True
        gate.wesar_role = role
        gate.tp_partial_grad = bool(partial_grad and self.wesar.defer_gate_grad_reduction)
        return gate

    def gates(self) -> list:
        """The gates of this layer's matrices, in the order of `matrix_parts` ([] if ungated)."""
        if self.gate_placement is None:
            return []
        return [getattr(self, part.gate_name) for part in self.matrix_parts]

    def _scale(self, activation: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Multiply `activation` by the gate(s) and add `bias` (None: no bias) in one pass; the
        activation itself when this layer is not gated."""
        gates = self.gates()
        if not gates:
            return activation
        scale = gates[0] if len(gates) == 1 else torch.cat(gates)
        if self._reduce_gate_grad_in_backward:
            scale = copy_to_tensor_model_parallel_region(scale, group=self.tp_group)
        elif gates[0].tp_partial_grad and gates[0].requires_grad and torch.is_grad_enabled():
            _check_finalize_reduces_gates(self.config)
        if self.fused_layout is not None:
            scale = self.fused_layout.column_scale(scale)
        return GateScale.apply(activation, scale, bias)

    def _gated_linear(self, linear_forward, input_, **kwargs):
        """Run the parent linear with the gate on its input or output; return (output, bias)."""
        if self.gate_placement == "input":
            input_ = self._scale(input_)
        output, bias = linear_forward(input_, **kwargs)
        if self.gate_placement == "output":
            fused_bias = bias if self.add_bias_in_forward else None
            output = self._scale(output, fused_bias)
            if fused_bias is not None:
                bias = None
        return output, bias


def _refuse_old_gate_format(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of a fused layer: raise OldGateFormatError for its old key."""
    key = f"{prefix}gate"
    if key in state_dict:
        raise old_gate_format_error(key, [prefix + part.gate_name for part in module.matrix_parts])


def _check_finalize_reduces_gates(config) -> None:
    """Raise unless `config.finalize_model_grads_func` sums the TP partial gate gradients."""
    finalize = getattr(config, "finalize_model_grads_func", None)
    if getattr(finalize, "reduces_wesar_gates", False):
        return
    if finalize is None:
        found = ("None: nothing would sum the TP partial-sum gate gradients, and the gates would "
                 "silently drift apart across tensor-parallel ranks")
    else:
        found = getattr(finalize, "__qualname__", finalize)
    raise RuntimeError(
        "WeSaR gates with deferred (step-level) gradient reduction need "
        "config.finalize_model_grads_func = megatron_wesar.grads.finalize_model_grads; "
        f"found {found}. Set it (and let the training loop call it after the backward passes), "
        "or build the layers with WeSaRConfig(defer_gate_grad_reduction=False)."
    )


def _shape_of(config) -> ModelShape:
    return ModelShape.from_transformer_config(config)


def _tp_size(kwargs: dict) -> int:
    return get_pg_size(get_tensor_model_parallel_group_if_none(kwargs.get("tp_group")))


class GatedColumnParallelLinear(ColumnParallelLinear, _Gated):
    """ColumnParallelLinear whose effective weight is gate * weight, one gate per logical matrix.

    Takes every argument megatron-core passes to ColumnParallelLinear, plus `role` (one of
    megatron_wesar.init.ROLES, or "qkv" for megatron's fused linear_qkv) and `wesar` (a
    WeSaRConfig). linear_qkv gets gates gate_q, gate_k, gate_v; a SwiGLU linear_fc1 (role "fc1",
    config.gated_linear_unit) gets gate_gate and gate_up unless `wesar.share_glu_gates`; every
    other layer one gate `gate`. The incoming `init_method` is replaced by N(0, std(W_bar)^2).
    A single gate scales the input (complete gradient without sequence parallelism) or, when that
    is smaller, the sharded output (TP partial sum); the gates of a fused layer scale the sharded
    output column by column. Returns (output, bias) like the parent.
    """

    def __init__(
        self,
        input_size,
        output_size,
        *,
        config,
        init_method=None,
        role: str,
        wesar: WeSaRConfig | None = None,
        weight_role: str | None = None,
        skip_bias_add: bool = False,
        gather_output: bool = False,
        **kwargs,
    ):
        wesar = wesar or WeSaRConfig()
        shape = _shape_of(config)
        tp = _tp_size(kwargs)
        parts, layout = matrix_parts(role, config, wesar, output_size // tp)
        sp = bool(config.sequence_parallel) and tp > 1
        input_partial = sp or kwargs.get("disable_grad_reduce", False)
        placement = "input" if is_gated(parts[0].role, wesar) else None
        if placement and layout is not None:
            if gather_output:
                raise ValueError(f"a fused {role} linear cannot gather its output")
            placement = "output"
        elif placement and tp > 1 and not gather_output:
            placement = cheapest_placement(
                input_size / (tp if sp else 1),
                output_size / tp,
                input_partial=input_partial,
                output_partial=True,
                defer=wesar.defer_gate_grad_reduction,
            )
        stds = {weight_std(weight_role or part.role, shape, wesar) for part in parts}
        assert len(stds) == 1, f"the parts of {role} must share one init std, got {stds}"
        super().__init__(
            input_size,
            output_size,
            config=config,
            init_method=_normal_init(stds.pop()),
            skip_bias_add=skip_bias_add or placement == "output",
            gather_output=gather_output,
            **_accepted_kwargs(ColumnParallelLinear, kwargs),
        )
        self.add_bias_in_forward = not skip_bias_add
        partial_grad = tp > 1 and (input_partial if placement == "input" else True)
        self._setup_gates(parts, layout, wesar, shape, placement, partial_grad, weight_role)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        """Forward of the gated layer: the parent's forward with the gate(s) applied."""
        return self._gated_linear(
            super().forward, input_, weight=weight, runtime_gather_output=runtime_gather_output
        )


class GatedRowParallelLinear(RowParallelLinear, _Gated):
    """RowParallelLinear whose effective weight is gate * weight.

    The gate scales the output after the tensor-parallel reduction and before the bias (complete
    gradient without sequence parallelism) or, when that is smaller, the sharded input (TP
    partial sum). The bias stays un-gated. Returns (output, bias) like the parent.
    """

    def __init__(
        self,
        input_size,
        output_size,
        *,
        config,
        init_method=None,
        role: str,
        wesar: WeSaRConfig | None = None,
        skip_bias_add: bool = False,
        input_is_parallel: bool = False,
        **kwargs,
    ):
        wesar = wesar or WeSaRConfig()
        shape = _shape_of(config)
        tp = _tp_size(kwargs)
        sp = bool(config.sequence_parallel) and tp > 1
        placement = "output" if is_gated(role, wesar) else None
        if placement and tp > 1 and input_is_parallel:
            placement = cheapest_placement(
                input_size / tp,
                output_size / (tp if sp else 1),
                input_partial=True,
                output_partial=sp,
                defer=wesar.defer_gate_grad_reduction,
            )
        super().__init__(
            input_size,
            output_size,
            config=config,
            init_method=_normal_init(weight_std(role, shape, wesar)),
            skip_bias_add=skip_bias_add or placement == "output",
            input_is_parallel=input_is_parallel,
            **_accepted_kwargs(RowParallelLinear, kwargs),
        )
        self.add_bias_in_forward = not skip_bias_add
        partial_grad = tp > 1 and (True if placement == "input" else sp)
        self._setup_gates((MatrixPart("", role),), None, wesar, shape, placement, partial_grad)

    def forward(self, input_):
        """Forward of the gated layer: the parent's forward with the gate applied."""
        return self._gated_linear(super().forward, input_)


class GatedVocabParallelEmbedding(VocabParallelEmbedding, _Gated):
    """VocabParallelEmbedding whose table is gate * weight; the gate scales the looked-up rows
    (complete gradient, a TP partial sum when the rows are reduce-scattered)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        config,
        init_method=None,
        wesar: WeSaRConfig | None = None,
        **kwargs,
    ):
        wesar = wesar or WeSaRConfig()
        shape = _shape_of(config)
        super().__init__(
            num_embeddings,
            embedding_dim,
            config=config,
            init_method=_normal_init(weight_std("embedding", shape, wesar)),
            **_accepted_kwargs(VocabParallelEmbedding, kwargs),
        )
        self.config = config
        partial_grad = self.tp_group.size() > 1 and self.reduce_scatter_embeddings
        placement = "output" if is_gated("embedding", wesar) else None
        self._setup_gates((MatrixPart("", "embedding"),), None, wesar, shape, placement,
                          partial_grad)

    def forward(self, input_):
        """Look up rows of the embedding table, scaled by the gate."""
        return self._scale(super().forward(input_))

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The parent's sharded weight plus the gate as a replicated tensor."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.gate is not None:
            key = f"{prefix}gate"
            sharded[key] = make_sharded_tensor_for_checkpoint(
                self.gate,
                key,
                prepend_offsets=sharded_offsets,
                tp_group=self.tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )
        return sharded


def gate_parameters(module: torch.nn.Module):
    """(name, gate) for every WeSaR gate in `module`, in a deterministic order."""
    return [(n, p) for n, p in module.named_parameters() if getattr(p, "wesar_gate", False)]


def assert_gates_finite(gates: list) -> None:
    """Raise NonFiniteGateError naming every gate of `gates` ((name, gate) pairs, as
    `gate_parameters` lists them) whose value is NaN or infinite.

    One fused check (a single host sync) for all gates.
    """
    if not gates:
        return
    values = torch.cat([g.detach().reshape(1).float() for _, g in gates])
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    bad = [f"{name}={values[i].item()}" for i, (name, _) in enumerate(gates) if not finite[i]]
    raise NonFiniteGateError(
        f"WeSaR gate(s) became non-finite: {', '.join(bad)}. The run has diverged; lower the "
        "learning rate or the gate LR multiplier, or resume from an earlier checkpoint."
    )
