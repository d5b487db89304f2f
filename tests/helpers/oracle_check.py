"""The oracle's comparison: a megatron-core run of a Case against the dense reference's replay,
with the tolerances of each dtype (docs/design.md section 4)."""
import torch

from tests.helpers.oracle_harness import Case, run_reference_case

REL = {torch.float64: 1e-10, torch.float32: 1e-4}
# Without RoPE the key bias gets no gradient in exact arithmetic (softmax is invariant to a shift
# shared by a row of scores): it moves by rounding noise only, which Adam amplifies differently in
# each implementation. In float64 it is held to the noise level instead of to the reference's
# trajectory; in float32 the noise reaches Adam's step size and says nothing.
NOISE_ONLY = ".k.bias"
NOISE_LEVEL = {torch.float64: 1e-9, torch.float32: None}
# Trained tensors in float32: Adam turns the rounding noise of small gradients into relative
# differences of ~2e-4 after 5 steps (per tensor, against its largest value).
TRAINED_REL = {torch.float64: 1e-10, torch.float32: 1e-3}
# A gate gradient is a sum over every token and feature, with cancellation: in float32 the
# summation orders of the layouts move it by up to ~1.3e-4 of its value.
GATE_GRAD_REL = {torch.float64: 1e-10, torch.float32: 1e-3}
# megatron's get_grad_norm_fp32 accumulates the norm in fp32 whatever the gradients' dtype
GRAD_NORM_REL = {torch.float64: 1e-6, torch.float32: 1e-4}


def assert_close_rel(actual, expected, rel, what):
    """|actual - expected| <= rel * max|expected| (elementwise for scalars, per tensor)."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    assert err <= rel, f"{what}: megatron vs reference differ by {err:.2e} relative (> {rel:g})"


def assert_matches_reference(case: Case, ours: dict) -> None:
    """`ours` (run_megatron_case's records of `case`) equals the dense reference's replay from its
    initial weights: per-step losses, grad norms, gate gradients and gate values, every trained
    tensor after the last step; frozen gates unchanged, the others trained."""
    ref = run_reference_case(case, ours["initial"])
    rel = REL[case.dtype]
    assert len(ref["gates"][0]) == case.num_gates
    assert len(ref["gate_grads"][0]) == (case.num_gates if case.train_gates else 0)
    for step in range(case.steps):
        assert_close_rel(ours["losses"][step], ref["losses"][step], rel, f"step {step} loss")
        assert_close_rel(ours["grad_norms"][step], ref["grad_norms"][step],
                         GRAD_NORM_REL[case.dtype], f"step {step} grad norm")
        assert ours["gate_grads"][step].keys() == ref["gate_grads"][step].keys()
        for key, expected in ref["gate_grads"][step].items():
            assert_close_rel(ours["gate_grads"][step][key], expected, GATE_GRAD_REL[case.dtype],
                             f"step {step} grad of {key}")
        assert ours["gates"][step].keys() == ref["gates"][step].keys()
        for key, expected in ref["gates"][step].items():
            assert_close_rel(ours["gates"][step][key], expected, rel, f"step {step} value of {key}")
    assert ours["final"].keys() == ref["final"].keys()
    for key, expected in ref["final"].items():
        if key.endswith(NOISE_ONLY) and not case.rope:
            for value in (ours["final"][key], expected):
                noise = NOISE_LEVEL[case.dtype]
                assert noise is None or value.abs().max() <= noise, (key, value)
            continue
        assert_close_rel(ours["final"][key], expected, TRAINED_REL[case.dtype], f"trained {key}")
    frozen = set() if case.train_gates else set(ref["gates"][0])
    for key, value in ours["final"].items():
        changed = not torch.equal(value, ours["initial"][key])
        assert changed is (key not in frozen), f"{key}: changed {changed}, frozen {key in frozen}"
    assert ref["losses"][-1] < ref["losses"][0], "the run should learn something in 5 steps"
