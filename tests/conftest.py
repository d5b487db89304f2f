"""Test setup: the shared helpers (tests/distributed.py, ...) importable as top-level modules,
and the rule that only tests marked `parallel` or `oracle` spawn process groups."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distributed  # noqa: E402


def pytest_runtest_setup(item):
    """Allow run_distributed for this test (and the fixtures it sets up) only when marked."""
    distributed.spawn_allowed = any(item.get_closest_marker(m) for m in ("parallel", "oracle"))
