"""One-collective all-reduce of WeSaR gate gradients (docs/design.md section 3).

Every partial-sum gate gradient is a tiny tensor (usually shape (1,)). `allreduce_gate_grads`
packs all of them into one fp32 buffer (fp64 when any gradient is fp64), sums it with a single
all-reduce and writes the result back in place, reporting whether any reduced value is
non-finite. The C++ extension `megatron_wesar._C` (csrc/) does this in one call; when it is not
built, a pure-PyTorch path with bitwise-identical results is used instead, after one warning.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.distributed as dist

try:
    from megatron_wesar import _C
except ImportError as _exc:  # not built (e.g. running from a plain source checkout)
    _C = None
    _IMPORT_ERROR: Optional[BaseException] = _exc
else:
    _IMPORT_ERROR = None

__all__ = ["allreduce_gate_grads", "extension_available"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Dtypes with a smaller range than fp32: the cast back from the fp32 sum may overflow.
_NARROW_DTYPES = (torch.float16, torch.bfloat16)
_warned = False


def extension_available() -> bool:
    """True if the compiled extension `megatron_wesar._C` is importable."""
    return _C is not None


def _warn_fallback() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        "megatron_wesar._C (the fused gate-gradient all-reduce extension) is not built "
        f"({_IMPORT_ERROR}); using the slower pure-PyTorch fallback, which gives identical "
        "results. Build it from the source tree with `pip install --no-build-isolation -e .` "
        "(or `make install`).",
        UserWarning,
        stacklevel=3,
    )


def allreduce_gate_grads(grads: Sequence[torch.Tensor], group=None) -> bool:
    """Sum `grads` over `group` in place with ONE fp32 all-reduce; True if any result is non-finite.

    `grads` are float32/float64/float16/bfloat16 tensors on one device, identical in number and
    shape on every rank of `group` (`None`: the default world group). Each is cast to fp32 (fp64
    when any of them is fp64),
    summed, and cast back to its own dtype. An empty list (or only empty tensors) runs no
    collective and returns False; so does a rank that is not a member of `group`.
    """
    if _C is None:
        _warn_fallback()
    if len(grads) == 0 or group is dist.GroupMember.NON_GROUP_MEMBER:
        return False
    if group is None:
        group = dist.group.WORLD
        if group is None:
            raise RuntimeError("allreduce_gate_grads: torch.distributed is not initialized")
    if _C is not None:
        return _C.allreduce_gate_grads(grads, group)
    return _allreduce_gate_grads_torch(grads, group)


def _buffer_dtype(grads: Sequence[torch.Tensor]) -> torch.dtype:
    """fp32, or fp64 when any gradient is fp64 (float64 runs stay exact)."""
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def _allreduce_gate_grads_torch(grads: Sequence[torch.Tensor], group) -> bool:
    """The pure-PyTorch path: same packing, collective and non-finite rule as the extension."""
    if len(grads) == 0:
        return False
    unsupported = {g.dtype for g in grads}.difference(_SUPPORTED_DTYPES)
    if unsupported:
        raise TypeError(
            "allreduce_gate_grads: expected float32/float64/float16/bfloat16 tensors, "
            f"got {sorted(map(str, unsupported))}"
        )
    devices = {g.device for g in grads}
    if len(devices) > 1:
        raise ValueError(f"allreduce_gate_grads: all tensors must be on one device, got {devices}")
    sizes = [g.numel() for g in grads]
    total = sum(sizes)
    if total == 0:
        return False
    with torch.no_grad():
        flat = torch.empty(total, dtype=_buffer_dtype(grads), device=grads[0].device)
        torch.cat([g.reshape(-1) for g in grads], out=flat)  # casts like .to(flat.dtype)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        finite = torch.isfinite(flat).all()
        views = [
            v if v.shape == g.shape else v.view(g.shape) for g, v in zip(grads, flat.split(sizes))
        ]
        torch._foreach_copy_(list(grads), views)
        narrow = [g.reshape(-1) for g in grads if g.dtype in _NARROW_DTYPES]
        if narrow:  # the cast back from fp32 may overflow
            finite &= torch.isfinite(torch.cat(narrow)).all()
    return not bool(finite)
