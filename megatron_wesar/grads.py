"""Gate-aware gradient finalisation: a drop-in for megatron-core's `finalize_model_grads`.

Set it as `config.finalize_model_grads_func`. It does Megatron's own work (data-parallel sync,
sequence-parallel norm grads, tied-embedding grads over the pipeline, token scaling) and then the
WeSaR gate reduction of docs/design.md section 3:

- every gate whose local gradient is a TP partial sum (`gate.tp_partial_grad`) is summed over its
  tensor-parallel group, all of them in ONE collective (megatron_wesar.gate_reduce);
- complete gate gradients are left alone (summing them again would multiply them by TP);
- tied embeddings keep their shared W_bar tied by Megatron; each stage's gate stays its own;
- a non-finite gate gradient raises NonFiniteGateError naming the gate.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads as megatron_finalize_model_grads

from .gate_reduce import allreduce_gate_grads
from .layers import NonFiniteGateError, gate_parameters


def grad_of(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """A parameter's accumulated gradient: megatron's `main_grad` where DDP keeps one, else
    `.grad`."""
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


def _model_gates(chunk: torch.nn.Module) -> list:
    """(name, gate) pairs of one model chunk: the list the WeSaR model keeps (unwrapping DDP /
    Float16Module), else a walk over the chunk's parameters."""
    module = chunk
    while not hasattr(module, "named_gates") and hasattr(module, "module"):
        module = module.module
    named = getattr(module, "named_gates", None)
    return gate_parameters(chunk) if named is None else named


def _nonfinite_flag(grads: List[torch.Tensor]) -> torch.Tensor:
    """A (1,) fp32 tensor: 0 when every element of `grads` is finite, else inf (no host sync)."""
    finite = torch.isfinite(torch.cat([g.reshape(-1).float() for g in grads])).all()
    return torch.where(finite, 0.0, float("inf")).reshape(1)


def reduce_gate_grads(model: List[torch.nn.Module], tp_group=None) -> None:
    """Sum the TP partial-sum gate gradients of `model` in one collective; check all are finite.

    With TP > 1 the finiteness of the complete (never summed) gate gradients rides in the same
    collective as a flag, so every rank of the TP group raises NonFiniteGateError together.
    """
    named = [(name, grad_of(p), p.tp_partial_grad)
             for chunk in model for name, p in _model_gates(chunk) if p.requires_grad]
    named = [(name, grad, partial) for name, grad, partial in named if grad is not None]
    if not named:
        return
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    partial_grads = [grad for _, grad, partial in named if partial]
    complete = [grad for _, grad, partial in named if not partial]
    if tp_group.size() > 1:
        flag = [_nonfinite_flag(complete)] if complete else []
        bad = allreduce_gate_grads(partial_grads + flag, tp_group)
    else:
        bad = bool(_nonfinite_flag([grad for _, grad, _ in named]).item())
    if bad:
        names = [name for name, grad, _ in named if not bool(torch.isfinite(grad).all())]
        where = ", ".join(names) if names else "on another tensor-parallel rank"
        raise NonFiniteGateError(
            f"non-finite gradient of WeSaR gate(s) {where}; the step is not applied. "
            "Lower the learning rate, check the data, or resume from an earlier checkpoint."
        )


def finalize_model_grads(
    model: List[torch.nn.Module],
    num_tokens: Optional[torch.Tensor] = None,
    pg_collection=None,
    force_all_reduce: Optional[bool] = False,
):
    """megatron-core's finalize_model_grads, then the fused gate reduction (same signature)."""
    megatron_finalize_model_grads(
        model, num_tokens=num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce
    )
    reduce_gate_grads(model, tp_group=None if pg_collection is None else pg_collection.tp)


finalize_model_grads.reduces_wesar_gates = True
