"""GateScale, the gate multiply of every gated layer: exact gradients while saving no activation
of its own (docs/design.md section 2)."""
import pytest
import torch
import torch.nn.functional as F

from megatron_wesar.layers import GateScale

ROWS, COLUMNS = 6, 5


def _inputs(per_column: bool, with_bias: bool):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, ROWS // 2, COLUMNS, dtype=torch.float64, generator=gen, requires_grad=True)
    scale = (torch.rand(COLUMNS if per_column else 1, dtype=torch.float64, generator=gen) + 0.5)
    bias = torch.randn(COLUMNS, dtype=torch.float64, generator=gen) if with_bias else None
    return x, scale.requires_grad_(), None if bias is None else bias.requires_grad_()


@pytest.mark.parametrize("per_column", [False, True], ids=["gate", "per-column"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("recompute", [False, True], ids=["from-output", "recompute"])
def test_gradients_equal_plain_autograd(per_column, with_bias, recompute):
    x, scale, bias = _inputs(per_column, with_bias)
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    again = (lambda: x.detach()) if recompute else None
    GateScale.apply(x, scale, bias, again).backward(upstream)
    got = [t.grad.clone() for t in (x, scale, bias) if t is not None]
    for t in (x, scale, bias):
        if t is not None:
            t.grad = None
    plain = x * scale if bias is None else x * scale + bias
    plain.backward(upstream)
    want = [t.grad for t in (x, scale, bias) if t is not None]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0)


def _saved_storages(fn) -> set:
    saved = set()

    def pack(tensor):
        saved.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return saved


def test_a_gated_linear_input_adds_no_saved_activation():
    """The gate keeps the scaled input, which the linear saves anyway; the unscaled input is kept
    by nobody."""
    x, scale, _ = _inputs(per_column=False, with_bias=False)
    weight = torch.randn(4, COLUMNS, dtype=torch.float64, requires_grad=True)
    outputs = {}

    def gated():
        outputs["y"] = GateScale.apply(x, scale, None, None)
        F.linear(outputs["y"], weight)

    saved = _saved_storages(gated)
    assert x.untyped_storage().data_ptr() not in saved
    activations = saved - {weight.untyped_storage().data_ptr(), scale.untyped_storage().data_ptr()}
    assert activations == {outputs["y"].untyped_storage().data_ptr()}


def test_recompute_saves_neither_input_nor_output():
    x, scale, _ = _inputs(per_column=True, with_bias=False)
    outputs = {}

    def gated():
        outputs["y"] = GateScale.apply(x, scale, None, lambda: x.detach())

    saved = _saved_storages(gated)
    assert saved <= {scale.untyped_storage().data_ptr()}


def test_a_zero_gate_gives_a_non_finite_gradient_for_the_guards():
    """From the output alone x cannot be recovered when the gate is exactly 0: the gradient is
    non-finite (reported by the non-finite guards), never a silent wrong number."""
    x, _, _ = _inputs(per_column=False, with_bias=False)
    scale = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    GateScale.apply(x, scale, None, None).sum().backward()
    assert not torch.isfinite(scale.grad).all()
