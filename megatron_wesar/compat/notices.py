"""megatron-core's import-time notices about missing optional accelerators, said once, in one
line, instead of five UserWarnings from every rank."""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

from ..accelerators import apex_available

# printed by megatron-core 0.16.1 on import where Transformer Engine / apex are absent, or on a
# CPU host; expected there and not actionable
MEGATRON_NOTICES = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
    r"When using async grad allreduce it is recommended",
)
_SAID = "MEGATRON_WESAR_ACCELERATOR_NOTICE_SAID"  # inherited by torchrun's children


def quiet_megatron_notices(stream=None) -> None:
    """Silence megatron-core's accelerator notices; say once (first process, rank 0) in one line
    which optional accelerators are missing (apex: `accelerators.apex_available`, the test the
    local spec's norm choice uses)."""
    for message in MEGATRON_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    missing = ["Transformer Engine"] if importlib.util.find_spec("transformer_engine") is None \
        else []
    if not apex_available():
        missing.append("apex")
    if missing and not os.environ.get(_SAID) and os.environ.get("RANK", "0") == "0":
        print(f"note: {' and '.join(missing)} not installed; megatron-core uses its PyTorch "
              "implementations (optional accelerators)", file=stream or sys.stderr)
    os.environ[_SAID] = "1"
