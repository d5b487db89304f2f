"""Run metrics: a JSONL file (one object per line) and TensorBoard scalars when installed."""
from __future__ import annotations

import json
import math
import os
import warnings


class MetricsWriter:
    """Writes metric records as JSONL lines and, if a directory is given and TensorBoard is
    installed, as TensorBoard scalars. Write on one rank only."""

    def __init__(self, path: str | None, tensorboard_dir: str | None = None):
        self._file = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("--tensorboard-dir given but TensorBoard is not installed "
                              "(pip install tensorboard); writing JSONL metrics only",
                              stacklevel=2)
            else:
                self._tb = SummaryWriter(tensorboard_dir)

    def write(self, record: dict) -> None:
        """Append one record; numbers that are not finite are written as null."""
        if self._file is not None:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                     for k, v in record.items()}
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        if self._tb is not None and "iteration" in record:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["iteration"])

    def close(self) -> None:
        """Flush and close the outputs."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
