"""Gate-aware gradient finalisation: a drop-in for megatron-core's `finalize_model_grads`.

Set it as `config.finalize_model_grads_func`. It does Megatron's own work (data-parallel sync,
sequence-parallel norm grads, tied-embedding grads over the pipeline, token scaling) and then the
WeSaR gate reduction of DESIGN section 3:

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


def _grad_of(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


def reduce_gate_grads(model: List[torch.nn.Module], tp_group=None) -> None:
    """Sum the TP partial-sum gate gradients of `model` in one collective; check all are finite."""
    gates = [(name, p) for chunk in model for name, p in gate_parameters(chunk) if p.requires_grad]
    named = [(name, _grad_of(p), p.tp_partial_grad) for name, p in gates]
    named = [(name, grad, partial) for name, grad, partial in named if grad is not None]
    if not named:
        return
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    partial_grads = [grad for _, grad, partial in named if partial]
    bad = False
    if partial_grads and tp_group.size() > 1:
        bad = allreduce_gate_grads(partial_grads, tp_group)
    complete = [grad.reshape(-1) for _, grad, partial in named if not partial]
    if complete and not bool(torch.isfinite(torch.cat(complete)).all()):
        bad = True
    if bad:
        names = [name for name, grad, _ in named if not bool(torch.isfinite(grad).all())]
        raise NonFiniteGateError(
            f"non-finite gradient of WeSaR gate(s) {', '.join(names)}; the step is not applied. "
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
