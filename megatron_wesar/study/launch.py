"""Starting the study's ranks, and tying their lives to the study's top process.

Not under torchrun, `megatron-wesar study` becomes torchrun's agent itself (`launch`, in this
process): on SIGTERM / SIGINT / SIGHUP the agent sends its ranks SIGTERM (SIGKILL 30 s later);
a rank's driver then ends its run after the current step and the runner stops the study. A
SIGKILL of the agent cannot be handled, so each rank asks the kernel to SIGKILL it as soon as
its parent dies (`die_with_parent`: prctl PR_SET_PDEATHSIG on Linux, a watchdog thread on the
parent's pid elsewhere); no rank outlives the agent, whoever started it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_INTERVAL_S = 1.0


def launch(nproc: int, argv: list) -> int:
    """Run `megatron-wesar study argv` on `nproc` local ranks, torchrun's agent in this process;
    return the exit code: 0, the first failed rank's, or 128 + the signal that stopped it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "megatron_wesar",
                        "study", *argv]))
    except ChildFailedError as err:
        code = err.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code  # a negative code: killed by signal -code
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL_S)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent() -> None:
    """Have this process SIGKILLed when its parent process dies (even by SIGKILL)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGKILL)
        return
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True,
                     name="die-with-parent").start()
