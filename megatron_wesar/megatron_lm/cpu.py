"""Run Megatron-LM's `pretrain()` on CPU with gloo: the patches beyond megatron_wesar.compat.cpu.

`enable_megatron_lm_cpu_compat()` first enables megatron_wesar.compat.cpu (megatron-core on
CPU), then patches these megatron.training objects, only when `torch.cuda.is_available()` is
False; with CUDA it changes nothing. Megatron-LM functions are wrapped, never copied:

- `initialize.initialize_megatron` (and training's reference to it): called with
  `allow_no_cuda=True` (else it asserts "Megatron requires CUDA").
- `arguments.get_device_arch_version` (validate_args queries cuda:0's compute capability):
  reports 10, the architecture from which validate_args asks nothing of the CUDA connection
  count (`CUDA_DEVICE_MAX_CONNECTIONS=1` under TP, meaningless without a device).
- `initialize.validate_args` (as initialize_megatron calls it): then sets the arguments of
  CPU_ARGUMENTS that need CUDA to their CPU values, saying which it changed in one line:
  `--distributed-backend gloo` (Megatron-LM's default is nccl), no gradient-accumulation
  fusion, no persistent LayerNorm (apex CUDA kernels; megatron-core's torch LayerNorm, used
  without apex, refuses the latter) and no masked-softmax fusion (a CUDA kernel under bf16 /
  fp16).
- `initialize._initialize_distributed`: runs with `torch.cuda.device_count` reporting 1 and
  `torch.cuda.set_device` a no-op, because with no device it skips `initialize_model_parallel`
  altogether.
- `megatron.legacy.fused_kernels.load`: a no-op (it runs `nvcc -V` from CUDA_HOME, None
  here, and builds nothing).
- `initialize._set_random_seed`: with `torch.cuda.device_count` reporting 1, so that it seeds
  megatron's RNG tracker (`model_parallel_cuda_manual_seed`, redirected to the CPU generator by
  compat.cpu).
- `training.get_model`: with `torch.cuda.Stream`, `current_stream` and `stream` as the
  `torch.cpu` ones (the DDP wrapping runs on a side stream).
- `training.pretrain` (and megatron.training's re-export of it, which pretrain_gpt.py imports):
  runs under compat.cpu's CUDA-as-CPU torch function mode: its
  `torch.tensor(..., device='cuda')` (start-time all-reduce, loss dicts, exit flags, data
  flags) and `model.cuda()` stay on CPU.
- `training.load_checkpoint` (`--load` with `--use-distributed-optimizer`; a CPU has neither
  Apex nor TE, so megatron-core's DistributedOptimizer wraps torch's AdamW): three
  megatron-core 0.16.1 defects of that load (the first two are compat.megatron_core's, whose
  functions it calls, as megatron_wesar's own checkpoint load does). Before the load, the
  fresh AdamW gets its state (`prime_distributed_optimizer_state`), else
  `DistributedOptimizer.state_dict` fails `assert len(steps) == 1` (distrib_optimizer.py:642,
  from Megatron-LM's generate_state_dict, checkpointing.py:920); after it, every parameter's
  Adam step is set back to the saved one (`restore_distributed_optimizer_steps`), else the
  dp_reshardable load leaves the primed step 0 and the resumed run's bias correction differs.
  And `optimizer.load_state_dict` runs under `torch.no_grad()`: with fp32 parameters the
  dp_reshardable load copies each saved shard in place into a view of the model parameter,
  which autograd refuses ("a view of a leaf Variable that requires grad is being used in an
  in-place operation", distrib_optimizer.py:940, from Megatron-LM's checkpointing.py:1794).

Checkpoints (`--save`, `--load`, format torch_dist) need nothing more: the RNG state Megatron-LM
saves reads `torch.cuda.get_rng_state`, the CPU generator under compat.cpu, and on load
`torch.set_rng_state` restores that generator (`torch.cuda.set_rng_state` queues a call that
never runs without CUDA). Not patched (they still need CUDA): `--log-memory-to-tensorboard`,
profiling, CUDA graphs, Transformer Engine, in-process restart.
`disable_megatron_lm_cpu_compat()` restores every patched object (for tests).
"""
from __future__ import annotations

import contextlib
import functools

import torch

from ..compat.cpu import cuda_as_cpu, enable_cpu_compat
from ..compat.megatron_core import (
    distributed_optimizer_steps,
    prime_distributed_optimizer_state,
    restore_distributed_optimizer_steps,
    torch_adam_distributed_optimizers,
)

# (owner, attribute, original) for every applied patch.
_applied: list = []


@contextlib.contextmanager
def _cuda_attributes(**replacements):
    """Set attributes of torch.cuda for the duration of the block."""
    saved = {name: getattr(torch.cuda, name) for name in replacements}
    try:
        for name, value in replacements.items():
            setattr(torch.cuda, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.cuda, name, value)


def _one_device():
    return 1


def _no_device_arch():
    return 10


def _no_op(*_args, **_kwargs):
    return None


def _with_cuda_attributes(fn, **replacements):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_attributes(**replacements):
            return fn(*args, **kwargs)

    return wrapper


def _allow_no_cuda(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **{**kwargs, "allow_no_cuda": True})

    return wrapper


def _resumable_torch_adam(load_checkpoint):
    """Wrap Megatron-LM's `load_checkpoint(ddp_model, optimizer, ...)`: with a DistributedOptimizer
    over torch Adam, prime its state before the load, run `optimizer.load_state_dict` without
    autograd, and set the Adam steps to the saved ones after the load (read from the state dict
    the load gives `optimizer.load_state_dict`)."""

    @functools.wraps(load_checkpoint)
    def wrapper(ddp_model, optimizer, *args, **kwargs):
        if optimizer is None or not any(torch_adam_distributed_optimizers(optimizer)):
            return load_checkpoint(ddp_model, optimizer, *args, **kwargs)
        prime_distributed_optimizer_state(optimizer)
        saved_steps = []
        load_state_dict = optimizer.load_state_dict

        def reading_steps(state_dict):
            saved_steps.append(distributed_optimizer_steps(optimizer, state_dict))
            with torch.no_grad():  # it copies into views of fp32 model parameters
                return load_state_dict(state_dict)

        optimizer.load_state_dict = reading_steps
        try:
            result = load_checkpoint(ddp_model, optimizer, *args, **kwargs)
        finally:
            del optimizer.load_state_dict
        for steps in saved_steps:
            restore_distributed_optimizer_steps(optimizer, steps)
        return result

    return wrapper


# Megatron-LM arguments whose value needs CUDA: {dest: the CPU value}.
CPU_ARGUMENTS = {
    "distributed_backend": "gloo",
    "gradient_accumulation_fusion": False,  # apex's fused_weight_gradient_mlp_cuda
    "no_persist_layer_norm": True,  # apex's persistent LayerNorm kernel
    "masked_softmax_fusion": False,  # megatron's scaled_masked_softmax_cuda (fp16 / bf16)
}


def _cpu_arguments(validate_args):
    @functools.wraps(validate_args)
    def wrapper(args, *rest, **kwargs):
        result = validate_args(args, *rest, **kwargs)
        changed = [f"{dest}={getattr(args, dest)!r} -> {value!r}"
                   for dest, value in CPU_ARGUMENTS.items() if getattr(args, dest) != value]
        for dest, value in CPU_ARGUMENTS.items():
            setattr(args, dest, value)
        if changed and args.rank == 0:
            print(f"megatron_wesar: no CUDA: {', '.join(changed)}", flush=True)
        return result

    return wrapper


def _patches():
    """The table: (owner, attribute, replacement)."""
    import megatron.training as package
    from megatron.legacy import fused_kernels
    from megatron.training import arguments, initialize, training

    one_device = {"device_count": _one_device, "set_device": _no_op}
    cpu_streams = {"Stream": torch.cpu.Stream, "current_stream": torch.cpu.current_stream,
                   "stream": torch.cpu.stream}
    init = _allow_no_cuda(initialize.initialize_megatron)
    pretrain = cuda_as_cpu(training.pretrain)
    return [
        (arguments, "get_device_arch_version", _no_device_arch),
        (initialize, "initialize_megatron", init),
        (initialize, "validate_args", _cpu_arguments(initialize.validate_args)),
        (training, "initialize_megatron", init),
        (initialize, "_initialize_distributed",
         _with_cuda_attributes(initialize._initialize_distributed, **one_device)),
        (fused_kernels, "load", _no_op),
        (initialize, "_set_random_seed",
         _with_cuda_attributes(initialize._set_random_seed, device_count=_one_device)),
        (training, "get_model", _with_cuda_attributes(training.get_model, **cpu_streams)),
        (training, "load_checkpoint", _resumable_torch_adam(training.load_checkpoint)),
        (training, "pretrain", pretrain),
        (package, "pretrain", pretrain),
    ]


def enable_megatron_lm_cpu_compat() -> bool:
    """Let Megatron-LM's pretrain() run on CPU with gloo (imports megatron.training); returns
    whether the patches are active. Idempotent; does nothing when CUDA is available."""
    if _applied:
        return True
    if not enable_cpu_compat():
        return False
    for owner, name, new in _patches():
        _applied.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)
    return True


def disable_megatron_lm_cpu_compat() -> None:
    """Undo `enable_megatron_lm_cpu_compat` (megatron-core's CPU layer stays enabled)."""
    while _applied:
        owner, name, original = _applied.pop()
        setattr(owner, name, original)
