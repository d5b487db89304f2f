"""Fused gate-gradient all-reduce: the C++ extension vs the pure-PyTorch fallback, on real gloo
ranks."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from megatron_wesar import gate_reduce
from tests.helpers.distributed import run_distributed

_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.dtype])


def _make_grads(rank: int, seed: int = 0, fp64: bool = True) -> list[torch.Tensor]:
    """Mixed-dtype gate gradients with different values on every rank (plus a few wider ones).

    With `fp64` some are float64, which makes the packed buffer float64 (the generic path)."""
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    wide = torch.float64 if fp64 else torch.float32
    dtypes = [torch.float32, wide, torch.bfloat16, torch.float16]
    grads = [
        (torch.randn(1, generator=gen, dtype=torch.float64) * 10 ** (i % 5 - 2)).to(dtypes[i % 4])
        for i in range(37)
    ]
    grads.append(torch.randn(3, 2, generator=gen, dtype=torch.float64).to(torch.bfloat16))
    grads.append(torch.randn(4, generator=gen, dtype=torch.float64).to(wide))
    grads.append(torch.randn(4, 3, generator=gen).t())  # non-contiguous: generic path
    grads.append(torch.empty(0))  # owns no slot
    return grads


def _expected(grads_per_rank: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Sum over ranks in the buffer dtype (fp32, or fp64 when any grad is fp64; exact for 2 ranks:
    a single rounding), cast back."""
    fp64 = any(g.dtype == torch.float64 for g in grads_per_rank[0])
    buffer = torch.float64 if fp64 else torch.float32
    out = []
    for per_rank in zip(*grads_per_rank):
        total = per_rank[0].to(buffer)
        for g in per_rank[1:]:
            total = total + g.to(buffer)
        out.append(total.to(per_rank[0].dtype))
    return out


# ---- worker functions (module level so that spawn can pickle them) ---------------------------


def _compare_worker(rank, world_size):
    sub = dist.new_group([0, 1])
    results = {}
    for name, group, fp64 in (("world", None, False), ("new_group", sub, False),
                              ("world-fp64", None, True)):
        ext = _make_grads(rank, seed=1, fp64=fp64)
        ref = [g.clone() for g in ext]
        ext_flag = gate_reduce._C.allreduce_gate_grads(
            ext, dist.group.WORLD if group is None else group
        )
        ref_flag = gate_reduce._allreduce_gate_grads_torch(ref, group)
        # in-place writes are visible to autograd's version counters, as with copy_
        assert all(g._version > 0 for g in ext + ref if g.numel() > 0)
        results[name] = (ext_flag, ext, ref_flag, ref)
    return results


def _subgroup_worker(rank, world_size, use_extension):
    members = [0, 2]
    group = dist.new_group(members)
    if not use_extension:
        gate_reduce._C = None
    grads = [torch.full((1,), float(rank + 1)), torch.full((2,), 0.25 * rank, dtype=torch.float64)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flag = gate_reduce.allreduce_gate_grads(grads, group)
    # The other ranks must stay in step: a world-wide collective right after.
    check = torch.ones(1)
    dist.all_reduce(check)
    return flag, grads, check.item()


def _nonfinite_worker(rank, world_size, use_extension):
    reduce = (
        gate_reduce._C.allreduce_gate_grads
        if use_extension
        else gate_reduce._allreduce_gate_grads_torch
    )
    group = dist.group.WORLD
    flags = {}
    finite = [torch.ones(1), torch.ones(1, dtype=torch.bfloat16)]
    flags["finite"] = reduce(finite, group)
    for case, value in (("inf", float("inf")), ("-inf", float("-inf")), ("nan", float("nan"))):
        grads = [torch.ones(1) for _ in range(5)] + [torch.ones(2, dtype=torch.float64)]
        if rank == 0:
            grads[3].fill_(value)
        flags[case] = reduce(grads, group)
    # Finite on every rank, overflows only when cast back to fp16 / out of fp32 range.
    fp16_big = torch.full((1,), 60000.0, dtype=torch.float16)
    flags["fp16_overflow"] = reduce([torch.ones(1), fp16_big], group)
    flags["fp32_out_of_range_sum"] = reduce([torch.full((1,), 3e38), torch.ones(1)], group)
    # fp64 gradients are summed in fp64: 1e300 stays finite, 1 + 1e-12 is not rounded to fp32
    fp64 = [torch.full((1,), value, dtype=torch.float64) for value in (1e300, 0.5 + 1e-12)]
    flags["fp64_large"] = reduce(fp64, group)
    flags["fp64_exact"] = fp64[1].item() == 2 * (0.5 + 1e-12)
    return flags


def _empty_worker(rank, world_size):
    results = {}
    # Only rank 0 calls with empty lists: if any of them issued a collective, it would pair
    # with rank 1's all_reduce below and the values (or the run) would go wrong.
    if rank == 0:
        results["ext_empty"] = gate_reduce._C.allreduce_gate_grads([], dist.group.WORLD)
        results["ext_zero_numel"] = gate_reduce._C.allreduce_gate_grads(
            [torch.empty(0), torch.empty(0, 3)], dist.group.WORLD
        )
        results["torch_empty"] = gate_reduce._allreduce_gate_grads_torch([], None)
        results["torch_zero_numel"] = gate_reduce._allreduce_gate_grads_torch(
            [torch.empty(0)], None)
        results["public_empty"] = gate_reduce.allreduce_gate_grads([])
    check = torch.full((1,), float(rank + 1))
    dist.all_reduce(check)
    results["check"] = check.item()
    return results


def _fallback_warns_worker(rank, world_size):
    gate_reduce._C = None
    gate_reduce._warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = []
        for _ in range(3):
            grads = [torch.full((1,), float(rank + 1)), torch.full((1,), 2.0, dtype=torch.bfloat16)]
            flag = gate_reduce.allreduce_gate_grads(grads)
            values.append((flag, [g.item() for g in grads]))
    messages = [str(w.message) for w in caught if "megatron_wesar._C" in str(w.message)]
    return messages, values, gate_reduce.extension_available()


def _bad_input_worker(rank, world_size, use_extension):
    """Rank 0 alone calls the reduction with bad input; rank 1 does not call it at all. Rank 0
    must raise before issuing any collective, else that collective pairs with rank 1's check
    below and the check's value (or the run) goes wrong."""
    reduce = (
        gate_reduce._C.allreduce_gate_grads
        if use_extension
        else gate_reduce._allreduce_gate_grads_torch
    )
    errors = []
    if rank == 0:
        for grads in ([torch.ones(1, dtype=torch.int64)],
                      [torch.ones(1), torch.ones(1, device="meta")]):
            try:
                reduce(grads, dist.group.WORLD)
                errors.append(None)
            except (RuntimeError, TypeError, ValueError) as exc:
                errors.append(type(exc).__name__)
    check = torch.full((1,), float(rank + 1))
    dist.all_reduce(check)
    return errors, check.item()


# ---- tests -------------------------------------------------------------------------------------


def test_extension_is_built_and_used():
    """The test environment builds the extension (make install); the module must pick it up."""
    import megatron_wesar._C as extension

    assert gate_reduce._C is extension and gate_reduce.extension_available()
    assert callable(extension.allreduce_gate_grads)


@pytest.mark.parallel
def test_extension_matches_fallback_bitwise():
    results = run_distributed(_compare_worker, 2)
    for rank_results in results:
        for name, (ext_flag, ext, ref_flag, ref) in rank_results.items():
            fp64 = name.endswith("fp64")
            expected = _expected([_make_grads(r, seed=1, fp64=fp64) for r in range(2)])
            assert ext_flag is False and ref_flag is False, name
            assert len(ext) == len(ref) == len(expected)
            for i, (a, b, want) in enumerate(zip(ext, ref, expected)):
                assert a.dtype == b.dtype == want.dtype, (name, i)
                assert a.shape == b.shape == want.shape, (name, i)
                assert torch.equal(_bits(a), _bits(b)), (name, i, a, b)
                assert torch.equal(_bits(a), _bits(want)), (name, i, a, want)
    # both ranks hold the same sums
    for a, b in zip(results[0]["world"][1], results[1]["world"][1]):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize(
    "use_extension", [True, False], ids=["extension", "torch"]
)
@pytest.mark.parallel
def test_subgroup_of_three_ranks(use_extension):
    results = run_distributed(_subgroup_worker, 3, use_extension)
    for rank in (0, 2):
        flag, grads, check = results[rank]
        assert flag is False
        assert grads[0].item() == 1.0 + 3.0
        assert torch.equal(grads[1], torch.full((2,), 0.5, dtype=torch.float64))
        assert check == 3.0
    flag, grads, check = results[1]  # not a member: untouched
    assert flag is False and grads[0].item() == 2.0 and grads[1].eq(0.25).all() and check == 3.0


@pytest.mark.parametrize(
    "use_extension", [True, False], ids=["extension", "torch"]
)
@pytest.mark.parallel
def test_nonfinite_detected_on_every_rank(use_extension):
    results = run_distributed(_nonfinite_worker, 2, use_extension)
    for flags in results:
        assert flags == {
            "finite": False,
            "inf": True,
            "-inf": True,
            "nan": True,
            "fp16_overflow": True,
            "fp32_out_of_range_sum": True,
            "fp64_large": False,
            "fp64_exact": True,
        }


@pytest.mark.parallel
def test_empty_list_runs_no_collective():
    results = run_distributed(_empty_worker, 2)
    assert results[0] == {
        "ext_empty": False,
        "ext_zero_numel": False,
        "torch_empty": False,
        "torch_zero_numel": False,
        "public_empty": False,
        "check": 3.0,
    }
    assert results[1] == {"check": 3.0}


def test_empty_list_without_process_group():
    assert not dist.is_initialized()
    assert gate_reduce._allreduce_gate_grads_torch([], None) is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert gate_reduce.allreduce_gate_grads([]) is False


@pytest.mark.parallel
def test_fallback_warns_once():
    results = run_distributed(_fallback_warns_worker, 2)
    for messages, values, available in results:
        assert available is False
        assert len(messages) == 1, messages
        assert "pip install --no-build-isolation -e ." in messages[0]
        assert "make install" in messages[0]
        assert values == [(False, [3.0, 4.0])] * 3


@pytest.mark.parametrize(
    "use_extension", [True, False], ids=["extension", "torch"]
)
@pytest.mark.parallel
def test_bad_inputs_raise_before_the_collective(use_extension):
    results = run_distributed(_bad_input_worker, 2, use_extension)
    expected = ["RuntimeError"] * 2 if use_extension else ["TypeError", "ValueError"]
    assert results[0] == (expected, 3.0)
    assert results[1] == ([], 3.0)
