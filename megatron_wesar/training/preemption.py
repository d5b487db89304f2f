"""Graceful preemption: SIGTERM / SIGINT end the run after the current step (Megatron-LM's
--exit-signal-handler).

A scheduler's preemption signal may reach some ranks only (or at different moments), so the
flag each rank's handler sets is agreed over the world once per step (one all-reduce of one
number); every rank then leaves the loop after the same step, the driver saves a checkpoint and
the process exits 0. A second signal of the same kind while the first is pending gets the
default behaviour (a second Ctrl-C interrupts at once).
"""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ExitSignalHandler:
    """Context manager that turns EXIT_SIGNALS into a request to stop after the current step."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in EXIT_SIGNALS:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def exit_requested(self) -> bool:
        """Whether any rank received an exit signal (collective when enabled: every rank calls
        it after each step)."""
        if not self.enabled:
            return False
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
