"""Gate-aware finalize_model_grads: non-finite gate gradients, misuse with megatron's stock
finalize or with none, and the optimizer param groups of the gates (no weight decay, LR
multiplier)."""
import math
from functools import lru_cache

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.gather import gather_canonical
from tests.helpers.oracle_harness import Case, build_case_model
from tests.helpers.reference import ReferenceGPT


def _batch(case):
    tokens = case.global_batch(0)[:1]
    positions = torch.arange(case.seq_len).unsqueeze(0)
    return tokens[:, :-1], positions, tokens[:, 1:]


def _non_finite_gate_grad(rank, world_size, case):
    """Make one gate gradient infinite on rank 0 only (a partial-sum gate, then a complete one)
    and call reduce_gate_grads on every rank: (error type, message) per gate, on this rank."""
    from megatron.core import parallel_state

    from megatron_wesar.grads import finalize_model_grads, reduce_gate_grads

    model = build_case_model(case)
    model.config.finalize_model_grads_func = finalize_model_grads  # reduce_gate_grads below
    inputs, positions, labels = _batch(case)
    model(inputs, positions, None, labels=labels).float().mean().backward()
    reduce_gate_grads([model])  # finite: no error
    gates = dict(model.named_gates)
    partial = next(n for n, p in gates.items() if p.tp_partial_grad)
    complete = next(n for n, p in gates.items() if not p.tp_partial_grad)
    outcome = {}
    for name in (partial, complete):
        model.zero_grad()
        model(inputs, positions, None, labels=labels).float().mean().backward()
        if rank == 0:
            gates[name].grad.fill_(float("inf"))
        try:
            reduce_gate_grads([model])
            outcome[name] = None
        except Exception as err:  # noqa: BLE001 - the type is what the test checks
            outcome[name] = (type(err).__name__, str(err))
    check = torch.full((1,), float(rank + 1))
    torch.distributed.all_reduce(check)  # the ranks are still in step
    parallel_state.destroy_model_parallel()
    return outcome, partial, complete, check.item()


@pytest.mark.parallel
def test_non_finite_gate_gradient_on_one_rank_raises_on_every_rank():
    results = run_distributed(_non_finite_gate_grad, 2, Case(tp=2, sp=True))
    for rank, (outcome, partial, complete, check) in enumerate(results):
        assert check == 3.0
        for name in (partial, complete):
            assert outcome[name] is not None, (rank, name)
            kind, message = outcome[name]
            assert kind == "NonFiniteGateError", (rank, name, kind, message)
            assert "non-finite gradient" in message
        # the partial sum carries rank 0's inf to every rank: both name the gate
        assert partial in outcome[partial][1]
        # a complete gate is inf on rank 0 only; its flag rides in the same collective
        expected = complete if rank == 0 else "on another tensor-parallel rank"
        assert expected in outcome[complete][1], (rank, outcome[complete][1])


def _custom_loop(rank, world_size, cases):
    """One forward/backward of each (case, finalize) in a hand-written loop: the error message,
    or (initial state, gate gradients). `finalize` None leaves config.finalize_model_grads_func
    unset; "stock" sets megatron-core's own."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    from megatron_wesar.layers import gate_parameters

    out = []
    for case, finalize in cases:
        model = build_case_model(case)
        assert model.config.finalize_model_grads_func is None
        if finalize == "stock":
            model.config.finalize_model_grads_func = finalize_model_grads
        initial = gather_canonical(model)
        inputs, positions, labels = _batch(case)
        try:
            logits = model(inputs, positions, None)  # float64: the gathered logits
        except RuntimeError as err:
            out.append(str(err))
        else:
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                              labels.reshape(-1)).backward()
            gates = {id(p) for _, p in gate_parameters(model)}
            # raises if the TP ranks disagree (a gate gradient that is not the full sum)
            grads = gather_canonical(model, values="grad", owned=gates)
            out.append((initial, grads))
        parallel_state.destroy_model_parallel()
    return out


DEFERRED = Case(tp=2, sp=True)
IN_BACKWARD = Case(tp=2, sp=True, swiglu=True, num_heads=8, num_query_groups=2,
                   defer_gate_grad_reduction=False)


@lru_cache(maxsize=None)
def custom_loop_results():
    """Rank 0's outcomes at TP = 2: deferred gates with megatron's stock finalize, deferred
    gates with none, gates reduced in backward with none."""
    cases = ((DEFERRED, "stock"), (DEFERRED, None), (IN_BACKWARD, None))
    return run_distributed(_custom_loop, 2, cases)[0]


@pytest.mark.parallel
def test_deferred_gates_refuse_megatrons_stock_finalize():
    message = custom_loop_results()[0]
    assert isinstance(message, str), message
    assert "megatron_wesar.grads.finalize_model_grads" in message
    assert "found finalize_model_grads" in message


@pytest.mark.parallel
def test_custom_loop_at_tp2_gets_a_clear_error_or_exact_gate_sums():
    """Deferred reduction without the gate-aware finalize (None) is an error at the first
    forward; reduction in backward needs no finalize and gives the reference's gate gradients."""
    _, message, (initial, grads) = custom_loop_results()
    assert isinstance(message, str), message
    assert "finalize_model_grads_func" in message and "found None" in message
    assert "defer_gate_grad_reduction=False" in message
    reference = ReferenceGPT(IN_BACKWARD.arch(), initial)
    inputs, _, labels = _batch(IN_BACKWARD)
    reference(inputs, labels).backward()
    expected = {name: gate.grad for name, gate in reference.gates().items()}
    assert grads.keys() == expected.keys() and len(grads) == IN_BACKWARD.num_gates
    for name, value in expected.items():
        err = ((grads[name] - value).abs() / value.abs()).item()
        assert err <= 1e-10, (name, grads[name].item(), value.item())


def _gate_param_groups(rank, world_size, gate_lr_mult):
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig

    from megatron_wesar.config import WeSaRConfig
    from megatron_wesar.layers import gate_parameters
    from megatron_wesar.training.engine import build_engine, initialize_parallel
    from tests.helpers.oracle_harness import transformer_config

    case = Case(dtype=torch.float32)
    initialize_parallel(1, 1, case.seed)
    engine = build_engine(
        transformer_config(case),
        WeSaRConfig(gate_lr_mult=gate_lr_mult),
        case.vocab_size,
        case.seq_len,
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1),
    )
    gate_ids = {id(p) for _, p in gate_parameters(engine.module)}
    seen = []
    for group in engine.optimizer.param_groups:
        gates = [p for p in group["params"] if id(p) in gate_ids]
        matrices = [p for p in group["params"] if p.ndim == 2]
        seen.append((len(gates), len(matrices), group["lr"], group["weight_decay"]))
    parallel_state.destroy_model_parallel()
    return seen, len(gate_ids)


@pytest.mark.parametrize("gate_lr_mult", [1.0, 0.1])
@pytest.mark.parallel
def test_gates_get_no_weight_decay_and_their_lr_multiplier(gate_lr_mult):
    groups, n_gates = run_distributed(_gate_param_groups, 1, gate_lr_mult)[0]
    assert n_gates == Case().num_gates
    assert sum(g[0] for g in groups) == n_gates
    for gates, matrices, lr, weight_decay in groups:
        if gates:
            assert matrices == 0 and weight_decay == 0.0
            assert math.isclose(lr, 1e-3 * gate_lr_mult)
        if matrices:
            assert weight_decay == 0.1 and math.isclose(lr, 1e-3)
