"""Gate-aware finalize_model_grads: non-finite gate gradients, misuse with megatron's stock
finalize or with none (the partial gate gradients are then all-reduced in backward), and the
optimizer param groups of the gates (no weight decay, LR
multiplier)."""
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
    or (initial state, gate gradients, the warnings said). `finalize` None leaves
    config.finalize_model_grads_func unset; "stock" sets megatron-core's own."""
    import warnings

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
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                logits = model(inputs, positions, None)  # float64: the gathered logits
        except RuntimeError as err:
            out.append(str(err))
        else:
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                              labels.reshape(-1)).backward()
            gates = {id(p) for _, p in gate_parameters(model)}
            # raises if the TP ranks disagree (a gate gradient that is not the full sum)
            grads = gather_canonical(model, values="grad", owned=gates)
            out.append((initial, grads, [str(w.message) for w in said]))
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


def _assert_reference_gate_grads(case, initial, grads):
    reference = ReferenceGPT(case.arch(), initial)
    inputs, _, labels = _batch(case)
    reference(inputs, labels).backward()
    expected = {name: gate.grad for name, gate in reference.gates().items()}
    assert grads.keys() == expected.keys() and len(grads) == case.num_gates
    for name, value in expected.items():
        err = ((grads[name] - value).abs() / value.abs()).item()
        assert err <= 1e-10, (name, grads[name].item(), value.item())


@pytest.mark.parallel
@pytest.mark.parametrize("index, case", [(0, DEFERRED), (1, DEFERRED), (2, IN_BACKWARD)],
                         ids=["deferred-stock-finalize", "deferred-no-finalize",
                              "in-backward-no-finalize"])
def test_custom_loop_at_tp2_gets_exact_gate_sums(index, case):
    """Without the gate-aware finalize (megatron's stock one, or None in a hand-written loop) the
    layers all-reduce their partial gate gradients in backward: every TP rank holds the
    reference's gate gradients (gather_canonical raises when the ranks disagree)."""
    outcome = custom_loop_results()[index]
    assert not isinstance(outcome, str), outcome
    initial, grads, said = outcome
    _assert_reference_gate_grads(case, initial, grads)
    notices = [m for m in said if "all-reduce their partial gate gradients in backward" in m]
    # deferral without the gate-aware finalize is said (once per layer kind); none without
    assert bool(notices) == case.defer_gate_grad_reduction, said
