"""Gates are fp32 in a bf16 model: the parameter, its gradient buffer (main_grad) and the
data-parallel reduction, through megatron's DDP and its mixed-precision optimizer; alpha_0 is
computed in float64 and stored in fp32 (docs/design.md section 1)."""
import math
from dataclasses import replace

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.oracle_harness import Case

# d = 32, N = 2, d_ff = 64 (the Case defaults): He's stds written out by hand
D, N, D_FF = 32, 2, 64
HE_STD = {"q": math.sqrt(1 / D), "k": math.sqrt(1 / D), "v": math.sqrt(1 / D),
          "attn_proj": math.sqrt(1 / D) / math.sqrt(2 * N), "fc1_gate": math.sqrt(1 / D),
          "fc1": math.sqrt(1 / D), "fc2": math.sqrt(2 / D_FF) / math.sqrt(2 * N),
          "embedding": math.sqrt(4e-5), "position": math.sqrt(4e-5), "output": math.sqrt(1 / D)}
SIGMA = math.sqrt(4e-5)
CASE = Case(dtype=torch.bfloat16, swiglu=True, lr=1e-3)


def _bf16_step(rank, world_size, case):
    """Build the bf16 engine, run one step: per gate (role, dtype, initial value, main_grad dtype,
    grad-buffer dtype, gradient finite, value after the step); the dtypes of the matrices."""
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig

    from megatron_wesar.layers import gate_parameters
    from megatron_wesar.training.engine import (
        build_engine,
        initialize_parallel,
        lm_forward_step,
        train_step,
    )
    from tests.helpers.oracle_harness import (
        _gpt_kwargs,
        _microbatches,
        transformer_config,
        wesar_config,
    )

    initialize_parallel(case.tp, case.pp, case.seed)
    config = replace(transformer_config(case), bf16=True)
    optimizer_config = OptimizerConfig(optimizer="adam", lr=case.lr, bf16=True,
                                       params_dtype=torch.bfloat16,
                                       use_distributed_optimizer=case.distributed_optimizer)
    engine = build_engine(config, wesar_config(case), case.vocab_size, case.seq_len,
                          optimizer_config, **_gpt_kwargs(case))
    gates = gate_parameters(engine.module)
    buffer_dtype = {id(p): buffer.grad_dtype for buffer in engine.model[0].buffers
                    for p in buffer.params}
    rows = {name: [gate.wesar_role, gate.dtype, gate.item()] for name, gate in gates}

    def after_backward(engine):
        for name, gate in gates:
            grad = gate.main_grad.item()
            rows[name] += [gate.main_grad.dtype, buffer_dtype[id(gate)],
                           math.isfinite(grad) and grad != 0]

    result = train_step(engine, _microbatches(case, 0), case.micro_batches, case.micro_batch_size,
                        case.seq_len, forward_step_func=lm_forward_step,
                        after_backward=after_backward)
    for name, gate in gates:
        rows[name] += [gate.dtype, gate.item()]
    matrices = {p.dtype for p in engine.module.parameters() if p.ndim == 2}
    parallel_state.destroy_model_parallel()
    return rows, matrices, result.update_successful


def _check(rows, matrices, updated, case):
    assert matrices == {torch.bfloat16}  # the model itself is bf16
    assert updated
    assert len(rows) == case.num_gates
    for name, (role, dtype, alpha0, grad_dtype, buffer, grad_ok, after_dtype, after) in (
            rows.items()):
        assert (dtype, grad_dtype, buffer, after_dtype) == (torch.float32,) * 4, name
        assert grad_ok, name
        # alpha_0 = sigma_role / sigma in float64, rounded once to fp32
        expected = HE_STD[role] / SIGMA
        assert alpha0 == torch.tensor(expected, dtype=torch.float32).item(), (name, alpha0)
        assert abs(alpha0 * SIGMA / HE_STD[role] - 1) <= 2.0 ** -24, name
        assert after != alpha0, name  # the optimizer stepped it (in fp32)


def _bf16_steps(rank, world_size, cases):
    return [_bf16_step(rank, world_size, case) for case in cases]


@pytest.mark.parallel
def test_gates_are_fp32_in_a_bf16_model_dp2():
    """Megatron's mixed-precision optimizer and its distributed optimizer, at DP = 2."""
    cases = [replace(CASE, dp=2), replace(CASE, dp=2, distributed_optimizer=True)]
    results = run_distributed(_bf16_steps, 2, cases)
    for case, on_rank0, on_rank1 in zip(cases, *results):
        for rows, matrices, updated in (on_rank0, on_rank1):
            _check(rows, matrices, updated, case)
        assert on_rank0[0] == on_rank1[0]  # the DP replicas agree on every gate
