"""What the plug-in changes in Megatron-LM's training loop, and the contract each change relies on.

Megatron-LM (megatron/training/training.py at core_v0.16.1) reads two module-level names of
`megatron.training.training` when it runs:

- `finalize_model_grads`: `train()` sets `config.finalize_model_grads_func` to it before the
  first step. The plug-in rebinds it to megatron_wesar.grads.finalize_model_grads (Megatron's,
  then the fused gate reduction).
- `get_megatron_optimizer_config(args) -> (OptimizerConfig, config_overrides)`:
  `setup_model_and_optimizer` builds the optimizer's param groups from its overrides. The
  plug-in adds the gate overrides of megatron_wesar.training.engine.gate_config_overrides (no
  weight decay on the 1-D gates, LR x --wesar-gate-lr-mult through Megatron's scheduler).
"""
from __future__ import annotations

import functools

from ..grads import finalize_model_grads
from ..training.engine import gate_config_overrides
from .args import wesar_config_from_args

PATCHED_NAMES = ("finalize_model_grads", "get_megatron_optimizer_config")


def with_gate_overrides(get_optimizer_config):
    """Wrap Megatron-LM's `get_megatron_optimizer_config(args)`: its config, and its overrides
    with the WeSaR gate overrides of `args` added."""

    @functools.wraps(get_optimizer_config)
    def wesar_optimizer_config(args):
        config, overrides = get_optimizer_config(args)
        gates = gate_config_overrides(config, wesar_config_from_args(args))
        return config, {**overrides, **gates}

    return wesar_optimizer_config


def install_plugin(training_module) -> None:
    """Rebind `finalize_model_grads` and `get_megatron_optimizer_config` in Megatron-LM's
    `megatron.training.training` (module passed in). Idempotent. Raises RuntimeError naming
    what a Megatron-LM version lacks."""
    missing = [name for name in PATCHED_NAMES if not hasattr(training_module, name)]
    if missing:
        raise RuntimeError(
            f"{training_module.__name__} has no {', '.join(missing)}: this Megatron-LM is not "
            "the one the plug-in was written against (tag core_v0.16.1)"
        )
    if not getattr(training_module.finalize_model_grads, "reduces_wesar_gates", False):
        training_module.finalize_model_grads = finalize_model_grads
        training_module.get_megatron_optimizer_config = with_gate_overrides(
            training_module.get_megatron_optimizer_config)
