"""Divergence: what a non-finite step names, and the spike policies that act on a flagged step.

`describe_nonfinite` says what went non-finite in a step (loss, gradient norm, and for WeSaR the
first gate in model order whose gradient is not finite, over all ranks). `SpikePolicy` decides,
from the declared spike rules' verdict, whether a step is applied (`log`: always; `skip`: not
when a rule flags it, OLMo-core's skip-step) or the run rewinds to its last checkpoint and skips
the data window that led to the spike (`rewind`, PaLM's recipe), with a cap on rewinds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..coordination import gather_objects
from ..grads import grad_of
from ..layers import gate_parameters

SPIKE_POLICIES = ("log", "skip", "rewind")


class NonFiniteStepError(FloatingPointError):
    """A training step's loss or gradient is NaN or infinite; it was not applied."""


class RewindLimitError(RuntimeError):
    """The spike policy `rewind` reached its cap on rewinds."""


def _first_local_nonfinite_gate(model) -> str | None:
    for chunk in model:
        for name, gate in gate_parameters(chunk):
            grad = grad_of(gate)
            if grad is not None and not bool(torch.isfinite(grad).all()):
                return name.removeprefix("module.")
    return None


def describe_nonfinite(model, loss: float, grad_norm: float) -> str:
    """'loss nan, gradient norm nan; first non-finite gate gradient: <name>' (collective: every
    rank calls it; the first gate over pipeline stages in model order)."""
    names = gather_objects(_first_local_nonfinite_gate(model))
    gate = next((name for name in names if name), None)
    text = f"loss {loss}, gradient norm {grad_norm}"
    return text + (f"; first non-finite WeSaR gate gradient: {gate}" if gate else "")


@dataclass
class SpikePolicy:
    """What a step flagged by a spike rule (or a non-finite step) does: `log` applies flagged
    steps and stops at a non-finite one; `skip` does not apply flagged or non-finite steps;
    `rewind` reloads the last checkpoint and skips the data since, at most `max_rewinds` times.
    """

    name: str = "log"
    max_rewinds: int = 3

    def __post_init__(self):
        if self.name not in SPIKE_POLICIES:
            raise ValueError(f"--spike-policy must be one of {SPIKE_POLICIES}, got {self.name!r}")

    def applies(self, flagged: bool) -> bool:
        """Whether a finite step that a rule flagged (or not) is applied."""
        return self.name == "log" or not flagged

    def on_unapplied(self, iteration: int, nonfinite: str | None, rewinds: int) -> str:
        """What the loop does with a step that was not applied: 'skip' (go on) or 'rewind';
        raises NonFiniteStepError (policy log) or RewindLimitError (cap reached)."""
        if self.name == "log":
            raise NonFiniteStepError(
                f"iteration {iteration} is non-finite ({nonfinite}); it was not applied and "
                "nothing is saved from it. Lower the learning rate (or the gate LR multiplier) "
                "and resume from the last checkpoint, or train with --spike-policy skip/rewind.")
        if self.name == "skip":
            return "skip"
        if rewinds >= self.max_rewinds:
            what = f"non-finite step ({nonfinite})" if nonfinite else "spike"
            raise RewindLimitError(f"iteration {iteration}: {what} after {rewinds} rewinds "
                                   f"(--max-rewinds {self.max_rewinds}); stopping")
        return "rewind"
