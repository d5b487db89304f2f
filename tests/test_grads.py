"""Gate-aware finalize_model_grads: non-finite gate gradients, misuse with megatron's stock
finalize, and the optimizer param groups of the gates (no weight decay, LR multiplier)."""
import math

import pytest
import torch

from distributed import run_distributed
from oracle_harness import Case, build_case_model


def _batch(case):
    tokens = case.global_batch(0)[:1]
    positions = torch.arange(case.seq_len).unsqueeze(0)
    return tokens[:, :-1], positions, tokens[:, 1:]


def _non_finite_gate_grad(rank, world_size, case):
    from megatron.core import parallel_state

    from megatron_wesar.grads import reduce_gate_grads
    from megatron_wesar.layers import NonFiniteGateError

    model = build_case_model(case)
    inputs, positions, labels = _batch(case)
    model(inputs, positions, None, labels=labels).float().mean().backward()
    reduce_gate_grads([model])  # finite: no error
    partial = [n for n, p in model.named_parameters() if getattr(p, "tp_partial_grad", False)]
    complete = [n for n, p in model.named_parameters()
                if getattr(p, "wesar_gate", False) and not p.tp_partial_grad]
    messages = {}
    for name in (partial[0], complete[0]):
        model.zero_grad()
        model(inputs, positions, None, labels=labels).float().mean().backward()
        param = dict(model.named_parameters())[name]
        if rank == 0:
            param.grad.fill_(float("inf"))
        try:
            reduce_gate_grads([model])
        except NonFiniteGateError as err:
            messages[name] = str(err)
    parallel_state.destroy_model_parallel()
    return messages, partial[0], complete[0]


def test_non_finite_gate_gradient_raises_naming_the_gate():
    case = Case(tp=2, sp=True)
    results = run_distributed(_non_finite_gate_grad, 2, case)
    messages, partial, complete = results[0]
    # partial-sum gates: the inf of rank 0 reaches every rank through the fused all-reduce
    for rank_messages, _, _ in results:
        assert partial in rank_messages and partial in rank_messages[partial]
    # a complete gate is checked locally, where it went non-finite
    assert complete in messages and "non-finite gradient" in messages[complete]


def _stock_finalize_with_deferred_gates(rank, world_size, case):
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    model = build_case_model(case)
    model.config.finalize_model_grads_func = finalize_model_grads
    inputs, positions, labels = _batch(case)
    try:
        model(inputs, positions, None, labels=labels)
        message = None
    except RuntimeError as err:
        message = str(err)
    parallel_state.destroy_model_parallel()
    return message


def test_deferred_gates_refuse_megatrons_stock_finalize():
    message = run_distributed(_stock_finalize_with_deferred_gates, 2, Case(tp=2, sp=True))[0]
    assert message is not None and "megatron_wesar.grads.finalize_model_grads" in message


def _gate_param_groups(rank, world_size, gate_lr_mult):
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig

    from megatron_wesar.config import WeSaRConfig
    from megatron_wesar.training.engine import build_engine, initialize_parallel
    from oracle_harness import transformer_config

    case = Case(dtype=torch.float32)
    initialize_parallel(1, 1, case.seed)
    engine = build_engine(
        transformer_config(case),
        WeSaRConfig(gate_lr_mult=gate_lr_mult),
        case.vocab_size,
        case.seq_len,
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1),
    )
    gate_ids = {id(p) for n, p in engine.module.named_parameters() if n.endswith(".gate")}
    seen = []
    for group in engine.optimizer.param_groups:
        gates = [p for p in group["params"] if id(p) in gate_ids]
        matrices = [p for p in group["params"] if p.ndim == 2]
        seen.append((len(gates), len(matrices), group["lr"], group["weight_decay"]))
    parallel_state.destroy_model_parallel()
    return seen, len(gate_ids)


@pytest.mark.parametrize("gate_lr_mult", [1.0, 0.1])
def test_gates_get_no_weight_decay_and_their_lr_multiplier(gate_lr_mult):
    groups, n_gates = run_distributed(_gate_param_groups, 1, gate_lr_mult)[0]
    assert n_gates == 4 * 2 + 2
    assert sum(g[0] for g in groups) == n_gates
    for gates, matrices, lr, weight_decay in groups:
        if gates:
            assert matrices == 0 and weight_decay == 0.0
            assert math.isclose(lr, 1e-3 * gate_lr_mult)
        if matrices:
            assert weight_decay == 0.1 and math.isclose(lr, 1e-3)
