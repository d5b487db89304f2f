"""Gated megatron-core layers: W_eff = alpha * W_bar with a replicated scalar gate alpha.

W_bar stays each layer's `weight`, sharded exactly as megatron-core shards it; the GEMMs and
gradient-accumulation fusion are untouched, because the gate multiplies an activation next to the
linear (docs/design.md section 2), not the weight:

    layer             scaled activation                 local gate gradient
    column-parallel   input (replicated, or SP-sharded)  complete; TP partial sum under SP
                      output (TP-sharded)                TP partial sum
    row-parallel      output (after the reduction)       complete; TP partial sum under SP
                      input (TP-sharded)                 TP partial sum
    vocab embedding   output (after the reduction)       complete; partial when reduce-scattered

Each layer picks the placement at construction (`cheapest_placement`) and records on the gate
whether its local gradient is a TP partial sum (`gate.tp_partial_grad`). With
`WeSaRConfig.defer_gate_grad_reduction` (the default) those sums are done once per step for all
gates by `megatron_wesar.grads.finalize_model_grads`; without it each partial gradient is
all-reduced inside backward (one collective per gate per microbatch).
"""
from __future__ import annotations

import inspect
import warnings
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


class GateScale(torch.autograd.Function):
    """y = x * gate for a (1,)-shaped gate. Backward takes the gate gradient as one dot product
    (no temporary the size of x), in fp32 or wider."""

    @staticmethod
    def forward(ctx, x, gate):
        ctx.save_for_backward(x, gate)
        return x * gate.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, gate = ctx.saved_tensors
        grad_x = grad * gate.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_gate = None
        if ctx.needs_input_grad[1]:
            acc = torch.promote_types(grad.dtype, torch.float32)
            grad_gate = torch.dot(grad.reshape(-1).to(acc), x.reshape(-1).to(acc))
            grad_gate = grad_gate.reshape(1).to(gate.dtype)
        return grad_x, grad_gate


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


class _Gated:
    """Mixin owning the gate parameter of one gated matrix and where it multiplies."""

    role: str
    gate: torch.nn.Parameter | None

    def _setup_gate(
        self,
        role: str,
        wesar: WeSaRConfig,
        shape: ModelShape,
        placement: str,
        partial_grad: bool,
        weight_role: str | None = None,
    ) -> None:
        self.role = role
        self.wesar = wesar
        self.gate_placement = placement if is_gated(role, wesar) else None
        self._reduce_gate_grad_in_backward = False
        if self.gate_placement is None:
            self.register_parameter("gate", None)
            return
        value = gate_initial_value(role, shape, wesar, weight_role=weight_role)
        gate = torch.nn.Parameter(
            torch.full((1,), value, dtype=self.config.params_dtype),
            requires_grad=wesar.train_gates,
        )
        set_defaults_if_not_set_tensor_model_parallel_attributes(gate)
        gate.allreduce = True  # data-parallel averaging like any replicated parameter
        gate.wesar_gate = True
        gate.wesar_role = role
        gate.tp_partial_grad = bool(partial_grad and wesar.defer_gate_grad_reduction)
        self.gate = gate
        self._reduce_gate_grad_in_backward = bool(
            partial_grad and not wesar.defer_gate_grad_reduction
        )

    def _scale(self, activation: torch.Tensor) -> torch.Tensor:
        """Multiply `activation` by the gate (identity when this matrix is not gated)."""
        if self.gate is None:
            return activation
        gate = self.gate
        if self._reduce_gate_grad_in_backward:
            gate = copy_to_tensor_model_parallel_region(gate, group=self.tp_group)
        elif gate.tp_partial_grad and torch.is_grad_enabled():
            _check_finalize_reduces_gates(self.config)
        return GateScale.apply(activation, gate)

    def _gated_linear(self, linear_forward, input_, **kwargs):
        """Run the parent linear with the gate on its input or output; return (output, bias)."""
        if self.gate_placement == "input":
            input_ = self._scale(input_)
        output, bias = linear_forward(input_, **kwargs)
        if self.gate_placement == "output":
            output = self._scale(output)
            if self.add_bias_in_forward and bias is not None:
                output, bias = output + bias, None
        return output, bias


def _check_finalize_reduces_gates(config) -> None:
    finalize = getattr(config, "finalize_model_grads_func", None)
    if finalize is not None and not getattr(finalize, "reduces_wesar_gates", False):
        raise RuntimeError(
            "WeSaR gates with deferred (step-level) gradient reduction need "
            "config.finalize_model_grads_func = megatron_wesar.grads.finalize_model_grads; "
            f"found {getattr(finalize, '__qualname__', finalize)}. Set it, or build the layers "
            "with WeSaRConfig(defer_gate_grad_reduction=False)."
        )


def _shape_of(config) -> ModelShape:
    return ModelShape.from_transformer_config(config)


def _tp_size(kwargs: dict) -> int:
    return get_pg_size(get_tensor_model_parallel_group_if_none(kwargs.get("tp_group")))


class GatedColumnParallelLinear(ColumnParallelLinear, _Gated):
    """ColumnParallelLinear whose effective weight is gate * weight.

    Takes every argument megatron-core passes to ColumnParallelLinear, plus `role` (one of
    megatron_wesar.init.ROLES) and `wesar` (a WeSaRConfig). The incoming `init_method` is replaced
    by N(0, std(W_bar)^2). The gate scales the input (complete gradient without sequence
    parallelism) or, when that is smaller, the sharded output (TP partial sum). Returns
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
        weight_role: str | None = None,
        skip_bias_add: bool = False,
        gather_output: bool = False,
        **kwargs,
    ):
        wesar = wesar or WeSaRConfig()
        shape = _shape_of(config)
        tp = _tp_size(kwargs)
        sp = bool(config.sequence_parallel) and tp > 1
        input_partial = sp or kwargs.get("disable_grad_reduce", False)
        placement = "input" if is_gated(role, wesar) else None
        if placement and tp > 1 and not gather_output:
            placement = cheapest_placement(
                input_size / (tp if sp else 1),
                output_size / tp,
                input_partial=input_partial,
                output_partial=True,
                defer=wesar.defer_gate_grad_reduction,
            )
        super().__init__(
            input_size,
            output_size,
            config=config,
            init_method=_normal_init(weight_std(weight_role or role, shape, wesar)),
            skip_bias_add=skip_bias_add or placement == "output",
            gather_output=gather_output,
            **_accepted_kwargs(ColumnParallelLinear, kwargs),
        )
        self.add_bias_in_forward = not skip_bias_add
        partial_grad = tp > 1 and (input_partial if placement == "input" else True)
        self._setup_gate(role, wesar, shape, placement, partial_grad, weight_role)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        """Forward of the gated layer: the parent's forward with the gate applied."""
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
        self._setup_gate(role, wesar, shape, placement, partial_grad)

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
        self._setup_gate("embedding", wesar, shape, "output", partial_grad)

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
