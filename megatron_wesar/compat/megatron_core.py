"""Workarounds for megatron-core 0.16.1 (the newest release for Python 3.11), one per upstream
behaviour they correct. Each is called explicitly where it is needed; nothing here patches
megatron. The CPU layer (megatron-core on CPU + gloo) is compat/cpu.py beside this file.

Patch table (workaround: the upstream behaviour it corrects; where it is used):

- `prime_distributed_optimizer_state`: without Apex / TE, `DistributedOptimizer.state_dict`
  asserts on `state["step"]` of every parameter, which a fresh torch Adam lacks before its
  first step. Used by checkpoint load with the distributed optimizer.
- `distributed_optimizer_steps`, `restore_distributed_optimizer_steps`: without Apex / TE, the
  dp_reshardable load copies the local (pre-load) Adam step back over the loaded one and leaves
  one step tensor shared by all parameters. Used by checkpoint load with the distributed
  optimizer.
- `process_groups`, `destroy_process_groups_since`: `parallel_state.destroy_model_parallel()`
  only drops its references; torch.distributed keeps every TP/PP/DP group (17 per run at TP=2)
  and each further run in the same process gets slower. Used by the study runner.
- `forked_processes_die_with_this_one`: dist_checkpointing's FileSystemWriterAsync forks one
  writer process per file bucket, even for a synchronous save; a rank killed while they write
  leaves them orphaned and blocked forever. Used by the pretraining driver.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

import torch
import torch.distributed as dist


def prime_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh torch.optim.Adam inside megatron's DistributedOptimizer its state (zero
    moments, step 0) before its sharded_state_dict(is_loading=True).

    megatron-core 0.16.1 without Apex / Transformer Engine reads `state["step"]` of every
    parameter there (DistributedOptimizer.state_dict: `assert len(steps) == 1`), which a fresh
    torch Adam does not have yet; with Apex or TE FusedAdam nothing is needed.
    """
    for opt in torch_adam_distributed_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "step" not in state:
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)
                    state["step"] = torch.tensor(0.0)


def torch_adam_distributed_optimizers(optimizer) -> list:
    """The DistributedOptimizers in `optimizer` that wrap a torch optimizer (no Apex / TE)."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [
        opt if isinstance(opt, distrib_optimizer.DistributedOptimizer) else None
        for opt in chained
    ]


def distributed_optimizer_steps(optimizer, state_dict) -> list:
    """The Adam step count saved for each DistributedOptimizer (None for other optimizers)."""
    optimizers = torch_adam_distributed_optimizers(optimizer)
    if not any(optimizers):
        return []
    states = [state_dict] if len(optimizers) == 1 else [state_dict[k] for k in sorted(state_dict)]
    steps = []
    for opt, state in zip(optimizers, states):
        found = {g["step"] for g in state["optimizer"]["param_groups"] if "step" in g}
        steps.append(float(found.pop()) if opt is not None and len(found) == 1 else None)
    return steps


def restore_distributed_optimizer_steps(optimizer, steps: list) -> None:
    """Set the torch Adam step of every parameter of each DistributedOptimizer to its saved
    value, one tensor per parameter.

    megatron-core 0.16.1 with torch Adam (no Apex / TE): DistributedOptimizer.load_state_dict
    sets the loaded step, but its dp_reshardable parameter-state load then copies the local
    (pre-load) step back over it, and leaves one step tensor shared by all parameters.
    """
    for opt, step in zip(torch_adam_distributed_optimizers(optimizer), steps):
        if opt is None or step is None:
            continue
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(step, dtype=state["step"].dtype)


def _registered_groups() -> list:
    """Every process group torch.distributed knows, in creation order (its private registry:
    torch 2.13 has no public listing)."""
    return list(dist.distributed_c10d._world.pg_map)


def process_groups() -> set:
    """The process groups torch.distributed knows now."""
    return set(_registered_groups())


def destroy_process_groups_since(before: set) -> None:
    """Destroy the process groups created since `before` (`process_groups()`), but the world.

    Measured without it: tokens/s fell from ~8300 to ~4400-5300 over 10 study runs of 40 steps
    in one process; with it, flat. The losses are unaffected.
    """
    world = dist.GroupMember.WORLD
    for group in _registered_groups():
        if group not in before and group is not world:
            dist.destroy_process_group(group)


_PR_SET_PDEATHSIG = 1
_registered_death_signal = False


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def forked_processes_die_with_this_one() -> None:
    """Have every process this one forks from now on killed (SIGKILL) when this one dies: the
    Linux parent-death signal, set in each child at fork. Idempotent; a no-op off Linux."""
    global _registered_death_signal
    if _registered_death_signal or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(after_in_child=_die_with_parent)
    _registered_death_signal = True
