"""Run megatron-core 0.16.1 on CPU with gloo: a narrow, reversible compatibility layer.

`enable_cpu_compat()` applies the patches below only when `torch.cuda.is_available()` is False
(or when forced); with CUDA present it changes nothing. Each patch replaces something that
raises, or silently does the wrong thing, on a CUDA-less machine; no megatron code is copied,
megatron functions are wrapped. Enabling imports the megatron modules it patches.
`disable_cpu_compat()` restores every original object (for tests).

Global redirects of `torch.cuda` functions (each raises without CUDA):

- `torch.cuda.current_device` -> `torch.device("cpu")`. Megatron allocates with
  `device=torch.cuda.current_device()`: GlobalMemoryBuffer, sequence-parallel gathers and
  reduce-scatters (forward and backward), DDP grad buffers, pipeline p2p receive buffers,
  the checkpoint saver's consistency check.
- `torch.cuda.synchronize` -> no-op. Called after batched pipeline p2p and by checkpoint save.
- `torch.cuda.get_rng_state` -> `torch.get_rng_state`, and `torch.cuda.manual_seed` ->
  `torch.manual_seed` (the original only queues a lazy call that never runs without CUDA).
  `CudaRNGStatesTracker.add` uses both to seed each tracked state. On CPU "the CUDA RNG" is the
  default CPU generator; a side effect is that `model_parallel_cuda_manual_seed(seed)` reseeds
  the CPU generator with `seed` (the data-parallel seed, equal on every rank).

Megatron's RNG tracker (megatron.core.tensor_parallel.random):

- `_get_cuda_rng_state` / `_set_cuda_rng_state` -> get/set the CPU generator state (the
  originals raise, or queue a lazy CUDA call that never runs), so that
  `get_cuda_rng_tracker().fork()` swaps CPU RNG streams as it swaps CUDA ones on GPUs (used
  by dropout in tensor-parallel regions and by activation recomputation).
- a logging filter on that module drops its "CPU RNG state changed within GPU RNG context"
  warning, which is expected there once the tracked RNG is the CPU generator.

These megatron functions run under `_CudaAsCpu`, a TorchFunctionMode active only while they
run: it turns `device="cuda"` factory arguments into "cpu", makes `Tensor.cuda()` return the
tensor, and makes the no-argument `Tensor.type()` report CPU tensors as `torch.cuda.*Tensor`
(the strings megatron asserts on or branches on). Each is replaced at its definition site and
in every loaded megatron.core module that imported it by name:

- pipeline_parallel.schedules.forward_backward_no_pipelining and
  forward_backward_pipelining_without_interleaving: `torch.zeros([], device="cuda")` token count.
  The mode is therefore active for the whole forward/backward step, including the user's
  forward_step_func.
- transformer.utils.get_default_causal_mask: `torch.ones(..., device="cuda")` (attention
  without an explicit mask).
- optimizer.clip_grads.get_grad_norm_fp32, clip_grad_by_total_norm_fp32, count_zeros_fp32:
  CUDA scratch tensors and `grad.type() == 'torch.cuda.FloatTensor'` assertion.
- optimizer.optimizer.MixedPrecisionOptimizer.__init__, Float16OptimizerWithFloat16Params
  .__init__, FP32Optimizer.__init__, optimizer.distrib_optimizer.DistributedOptimizer.__init__:
  scale / found-inf tensors on "cuda" and `param.type()` checks that pick fp32 vs bf16/fp16.
- models.common.language_module.LanguageModule.setup_embeddings_and_output_layer:
  `weight.data.cuda()` before all-reducing tied embeddings across pipeline stages.

Not patched (not reached by the supported paths; they still raise): CUDA streams and events
(only multi-instance distributed optimizer, activation offloading), the interleaved pipeline
schedule, fully-parallel checkpoint load exchange, Megatron FSDP, autocast, CUDA graphs.
dist_checkpointing save additionally needs `psutil` installed (not a CUDA matter).
"""
from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable, List, Tuple

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enable_cpu_compat", "disable_cpu_compat", "cpu_compat_active"]

_RNG_WARNING = "CPU RNG state changed within GPU RNG context"

# (owner, attribute, original value as found in owner.__dict__) for every applied patch.
_applied: List[Tuple[Any, str, Any]] = []
_active = False


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaAsCpu(TorchFunctionMode):
    """Redirect CUDA device requests to CPU inside the megatron functions wrapped below."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)  # e.g. 'torch.FloatTensor' -> 'torch.cuda.FloatTensor'
            return name.replace("torch.", "torch.cuda.", 1) if args[0].is_cpu else name
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def cuda_as_cpu(fn: Callable) -> Callable:
    """`fn` run under the _CudaAsCpu mode; entered once (a nested mode would rename
    'torch.cuda.FloatTensor' again, to 'torch.cuda.cuda.FloatTensor')."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if any(isinstance(mode, _CudaAsCpu) for mode in _function_modes()):
            return fn(*args, **kwargs)
        with _CudaAsCpu():
            return fn(*args, **kwargs)

    return wrapper


def _function_modes() -> list:
    """The active torch function modes, innermost last."""
    from torch.overrides import _get_current_function_mode_stack

    return _get_current_function_mode_stack()


def _current_device():
    return torch.device("cpu")


def _synchronize(device=None):
    return None


def _cpu_rng_state(*_args, **_kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, *_args, **_kwargs):
    torch.set_rng_state(new_state)


def _drop_rng_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_RNG_WARNING)


def _patches():
    """The table: (owner, attribute, replacement, why)."""
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as opt
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as rnd
    from megatron.core.transformer import utils as tutils

    def wrap(owner, name, why):
        return (owner, name, cuda_as_cpu(getattr(owner, name)), why)

    cuda = torch.cuda
    return [
        (cuda, "current_device", _current_device, "device=torch.cuda.current_device()"),
        (cuda, "synchronize", _synchronize, "after pipeline p2p; checkpoint save"),
        (cuda, "get_rng_state", _cpu_rng_state, "CudaRNGStatesTracker.add reads it"),
        (cuda, "manual_seed", torch.manual_seed, "CudaRNGStatesTracker.add seeds with it"),
        (rnd, "_get_cuda_rng_state", _cpu_rng_state, "RNG tracker fork() reads the state"),
        (rnd, "_set_cuda_rng_state", _set_cpu_rng_state, "RNG tracker fork() sets the state"),
        wrap(schedules, "forward_backward_no_pipelining", 'zeros(device="cuda") token count'),
        wrap(schedules, "forward_backward_pipelining_without_interleaving", "token count too"),
        wrap(tutils, "get_default_causal_mask", 'ones(device="cuda") causal mask'),
        wrap(clip_grads, "get_grad_norm_fp32", 'tensors on "cuda"'),
        wrap(clip_grads, "clip_grad_by_total_norm_fp32", "'torch.cuda.FloatTensor' assertion"),
        wrap(clip_grads, "count_zeros_fp32", 'zeros(device="cuda")'),
        wrap(opt.MixedPrecisionOptimizer, "__init__", 'found_inf / scale tensors on "cuda"'),
        wrap(opt.Float16OptimizerWithFloat16Params, "__init__", "param.type() dtype checks"),
        wrap(opt.FP32Optimizer, "__init__", 'scale tensor on "cuda"'),
        wrap(DistributedOptimizer, "__init__", "param.type() dtype checks"),
        wrap(LanguageModule, "setup_embeddings_and_output_layer", "weight.data.cuda()"),
    ]


def _set(owner, name, value) -> None:
    _applied.append((owner, name, vars(owner)[name]))
    setattr(owner, name, value)


def enable_cpu_compat(force: bool = False) -> bool:
    """Let megatron-core run on CPU with gloo; returns whether the layer is active.

    Idempotent. Does nothing (and returns False) when CUDA is available, unless `force`.
    """
    global _active
    if _active:
        return True
    if torch.cuda.is_available() and not force:
        return False
    for owner, name, new, _why in _patches():
        original = vars(owner)[name]
        _set(owner, name, new)
        if isinstance(owner, type(sys)) and callable(original):
            # Rebind `from module import name` copies held by other megatron.core modules.
            for mod_name, mod in list(sys.modules.items()):
                if mod_name.startswith("megatron.core") and mod is not owner:
                    if vars(mod).get(name) is original:
                        _set(mod, name, new)
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_drop_rng_warning)
    _active = True
    return True


def disable_cpu_compat() -> None:
    """Undo `enable_cpu_compat` (restore every patched object); mainly for tests."""
    global _active
    while _applied:
        owner, name, original = _applied.pop()
        setattr(owner, name, original)
    logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(_drop_rng_warning)
    _active = False


def cpu_compat_active() -> bool:
    """Whether `enable_cpu_compat` has patched megatron-core in this process."""
    return _active
