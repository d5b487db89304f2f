"""Gated megatron-core layers: W_eff = alpha * W_bar with a replicated scalar gate alpha per
logical weight matrix.

W_bar stays each layer's `weight`, sharded exactly as megatron-core shards it; the GEMMs and
gradient-accumulation fusion are untouched, because the gate multiplies an activation next to the
linear (docs/design.md section 2), not the weight:

    layer                  scaled activation                 local gate gradient
    column/row-parallel    input (the tensor the linear      complete, or a TP partial sum when
                           saves for its backward)           the input is TP- or SP-sharded
    fused column-parallel  output, one scale per column      TP partial sum
    vocab embedding        output (after the reduction)      complete; partial when reduce-scattered
    position embedding     the table (W_eff = alpha W_bar)   complete

A fused column-parallel linear holds several logical matrices (megatron's linear_qkv: W_q, W_k,
W_v, laid out per query group; a SwiGLU linear_fc1: W_gate, W_up), each with its own gate: the
gates are expanded into one scale per output column (`FusedLayout`) that multiplies the sharded
output, so each gate's gradient is the sum of grad * unscaled output over its own columns.

The gate adds no saved activation (`GateScale`): it keeps the scaled tensor, which the next op
saves anyway (the linear its input; the attention its keys and values, views of linear_qkv's
output; the activation function fc1's output), and recovers the unscaled one in backward; the
word embedding recomputes its lookup instead.

Each layer records on every gate whether its local gradient is a TP partial sum
(`gate.tp_partial_grad`). With `WeSaRConfig.defer_gate_grad_reduction` (the default) those sums
are done once per step for all gates by `megatron_wesar.grads.finalize_model_grads`, when it is
the model config's `finalize_model_grads_func` (read at every forward); under any other finalize
(megatron-core's or Megatron-LM's stock one, or None in a hand-written loop) and without deferral,
each layer's partial gradients are all-reduced inside backward (one collective per layer per
microbatch), so the gates never drift apart across TP ranks.

Gates are fp32 whatever the model dtype (float64 in a float64 model): parameter, gradient and
reduction; the multiply casts the gate to the activation's dtype and accumulates the gate's
gradient in fp32 or wider.

Under FP8 (`config.fp8`, megatron_wesar.fp8) the transformer linears run their GEMMs in FP8 with
the gate folded into the GEMM's scale (placement "gemm"): no GateScale, and the gate gradient is
a TP partial sum whenever TP > 1 (each rank holds a shard of W_bar).
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
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.utils import (
    get_pg_size,
    get_tensor_model_parallel_group_if_none,
    make_sharded_tensor_for_checkpoint,
)

from .config import WeSaRConfig
from .fp8 import fp8_linear, recipe_for
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
    """y = x * scale (+ bias), for a (1,) gate or a per-column scale of shape (x.shape[-1],),
    saving no activation of its own.

    The multiply runs in x's dtype (the scale cast to it); a bias (x.shape[-1],), when given, is
    added in the same pass. Backward needs x for the scale's gradient: with `recompute` None it
    saves y, the tensor the next op keeps anyway, and uses x = (y - bias) / scale; otherwise
    `recompute()` (no grad) gives x again. The scale's gradient is accumulated in fp32 or wider
    (one dot product for a (1,) gate, one per column otherwise) and returned in its dtype. A
    scale of exactly 0 leaves x unrecoverable from y: its gradient is then non-finite, which the
    non-finite guards report.
    """

    @staticmethod
    def forward(ctx, x, scale, bias=None, recompute=None):
        if bias is None:
            y = x * scale.to(x.dtype)
        else:
            y = torch.addcmul(bias, x, scale.to(x.dtype))
        ctx.recompute = recompute
        ctx.save_for_backward(None if recompute else y, scale, bias)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, scale, bias = ctx.saved_tensors
        grad_x = grad * scale.to(grad.dtype) if ctx.needs_input_grad[0] else None
        columns = grad.shape[-1]
        grad_rows = grad.reshape(-1, columns)
        acc = torch.promote_types(grad.dtype, torch.float32)
        # the bias gradient, also needed to take the bias out of y: one pass over grad
        column_sums = grad_rows.sum(0, dtype=acc) if bias is not None else None
        grad_bias = column_sums.to(grad.dtype) if ctx.needs_input_grad[2] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            if ctx.recompute is not None:
                with torch.no_grad():
                    x = ctx.recompute()
                grad_scale = _sum_of_products(grad_rows, x.reshape(-1, columns), scale, acc)
            else:
                grad_scale = _sum_of_products(grad_rows, y.reshape(-1, columns), scale, acc)
                if bias is not None:
                    grad_scale = grad_scale - _sum_of_products(
                        column_sums.reshape(1, -1), bias.reshape(1, -1), scale, acc)
                grad_scale = grad_scale / scale.to(acc)
            grad_scale = grad_scale.reshape(scale.shape).to(scale.dtype)
        return grad_x, grad_scale, grad_bias, None


def _sum_of_products(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, acc) -> torch.Tensor:
    """sum(a * b) in `acc`: over everything for a (1,) `scale`, per column otherwise."""
    if scale.numel() == 1:
        return torch.dot(a.reshape(-1).to(acc), b.reshape(-1).to(acc)).reshape(1)
    return (a.to(acc) * b.to(acc)).sum(0)


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
        self._partial_gate_grad = bool(placement and partial_grad)
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

    def _scale(self, activation: torch.Tensor, bias: torch.Tensor | None = None,
               recompute=None) -> torch.Tensor:
        """Multiply `activation` by the gate(s) and add `bias` (None: no bias) in one pass; the
        activation itself when this layer is not gated. `recompute` (see GateScale) gives the
        activation again in backward instead of recovering it from the output."""
        scale = self._gate_scale()
        if scale is None:
            return activation
        return GateScale.apply(activation, scale, bias, recompute)

    def _gate_scale(self) -> torch.Tensor | None:
        """The gate as a (1,) scale, or a fused layer's gates as one scale per local output
        column; None when this layer is not gated."""
        gates = self.gates()
        if not gates:
            return None
        scale = gates[0] if len(gates) == 1 else torch.cat(gates)
        if self._reduces_gate_grad_in_backward():
            scale = copy_to_tensor_model_parallel_region(scale, group=self.tp_group)
        if self.fused_layout is not None:
            scale = self.fused_layout.column_scale(scale)
        return scale

    def _reduces_gate_grad_in_backward(self) -> bool:
        """Whether this forward's partial gate gradients are all-reduced in backward: without
        deferral, or when the config's finalize is not the gate-aware one (said once)."""
        if not (self._partial_gate_grad and torch.is_grad_enabled()):
            return False
        if not self.wesar.defer_gate_grad_reduction:
            return True
        finalize = getattr(self.config, "finalize_model_grads_func", None)
        if getattr(finalize, "reduces_wesar_gates", False):
            return False
        warnings.warn(
            "WeSaR: config.finalize_model_grads_func is "
            f"{getattr(finalize, '__qualname__', finalize)}, not "
            "megatron_wesar.grads.finalize_model_grads: the gated layers all-reduce their "
            "partial gate gradients in backward (one collective per layer per microbatch) "
            "instead of once per step",
            stacklevel=3,
        )
        return True

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

    def _fp8_forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False,
                          allreduce_dgrad=False, sequence_parallel=False, **_):
        """What megatron's linear_with_grad_accumulation_and_async_allreduce does (the
        sequence-parallel all-gather, or the input-gradient all-reduce, and the bias), with the
        GEMMs in FP8 and the gate(s) folded into the output scale (megatron_wesar.fp8)."""
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, group=self.tp_group)
        elif allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=self.tp_group)
        fuse = bool(gradient_accumulation_fusion and hasattr(weight, "main_grad"))
        output = fp8_linear(input, weight, self._gate_scale(), self.fp8_recipe, self.tp_group,
                            fuse)
        return output if bias is None else output + bias


def _refuse_old_gate_format(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of a fused layer: raise OldGateFormatError for its old key."""
    key = f"{prefix}gate"
    if key in state_dict:
        raise old_gate_format_error(key, [prefix + part.gate_name for part in module.matrix_parts])


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
    A single gate scales the input (complete gradient; a TP partial sum under sequence
    parallelism); the gates of a fused layer scale the sharded output column by column (TP
    partial sums). Returns (output, bias) like the parent.
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
        fp8 = recipe_for(config, role)
        placement = "input" if is_gated(parts[0].role, wesar) else None
        if placement and fp8 is not None:
            placement = "gemm"
        elif placement and layout is not None:
            if gather_output:
                raise ValueError(f"a fused {role} linear cannot gather its output")
            placement = "output"
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
        self.fp8_recipe = fp8
        partial_grad = tp > 1 and (input_partial if placement == "input" else True)
        self._setup_gates(parts, layout, wesar, shape, placement, partial_grad, weight_role)

    def _forward_impl(self, input, weight, *args, **kwargs):
        if self.fp8_recipe is None:
            return super()._forward_impl(input, weight, *args, **kwargs)
        return self._fp8_forward_impl(input, weight, *args, **kwargs)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        """Forward of the gated layer: the parent's forward with the gate(s) applied."""
        return self._gated_linear(
            super().forward, input_, weight=weight, runtime_gather_output=runtime_gather_output
        )


class GatedRowParallelLinear(RowParallelLinear, _Gated):
    """RowParallelLinear whose effective weight is gate * weight.

    The gate scales the input, the tensor the linear saves for its backward (a TP partial sum
    when the input is TP-sharded, `input_is_parallel`). The bias stays un-gated. Returns
    (output, bias) like the parent.
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
        input_is_parallel: bool = False,
        **kwargs,
    ):
        wesar = wesar or WeSaRConfig()
        shape = _shape_of(config)
        tp = _tp_size(kwargs)
        super().__init__(
            input_size,
            output_size,
            config=config,
            init_method=_normal_init(weight_std(role, shape, wesar)),
            input_is_parallel=input_is_parallel,
            **_accepted_kwargs(RowParallelLinear, kwargs),
        )
        self.fp8_recipe = recipe_for(config, role)
        placement = "input" if is_gated(role, wesar) else None
        if placement and self.fp8_recipe is not None:
            placement = "gemm"
        partial_grad = tp > 1 and (input_is_parallel or placement == "gemm")
        self._setup_gates((MatrixPart("", role),), None, wesar, shape, placement, partial_grad)

    def _forward_impl(self, input, weight, *args, **kwargs):
        if self.fp8_recipe is None:
            return super()._forward_impl(input, weight, *args, **kwargs)
        return self._fp8_forward_impl(input, weight, *args, **kwargs)

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
        partial_grad = get_pg_size(self.tp_group) > 1 and self.reduce_scatter_embeddings
        placement = "output" if is_gated("embedding", wesar) else None
        self._setup_gates((MatrixPart("", "embedding"),), None, wesar, shape, placement,
                          partial_grad)

    def forward(self, input_):
        """Look up rows of the embedding table, scaled by the gate (the lookup is redone in
        backward for the gate's gradient instead of being saved)."""
        return self._scale(super().forward(input_),
                           recompute=partial(VocabParallelEmbedding.forward, self, input_))

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


class GatedPositionEmbedding(torch.nn.Embedding, _Gated):
    """megatron's learned position table (a torch.nn.Embedding, replicated over TP) whose table
    is gate * weight: the gate scales the table before the lookup, so its gradient is complete
    and no activation is saved (the table is re-read in backward)."""

    def __init__(self, max_sequence_length: int, hidden_size: int, *, config,
                 wesar: WeSaRConfig | None = None):
        wesar = wesar or WeSaRConfig()
        shape = _shape_of(config)
        table = torch.empty(max_sequence_length, hidden_size, dtype=config.params_dtype,
                            device=parameter_device(config))
        super().__init__(max_sequence_length, hidden_size, _weight=table)  # no default init
        self.config = config
        if config.perform_initialization:
            torch.nn.init.normal_(self.weight, mean=0.0, std=weight_std("position", shape, wesar))
        placement = "table" if is_gated("position", wesar) else None
        self._setup_gates((MatrixPart("", "position"),), None, wesar, shape, placement, False)

    def forward(self, position_ids):
        """Look up rows of gate * weight."""
        table = self._scale(self.weight, recompute=lambda: self.weight)
        return torch.nn.functional.embedding(position_ids, table)


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
