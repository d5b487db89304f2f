"""The rule that only tests marked `parallel` or `oracle` spawn process groups (helpers for
the tests live in tests/helpers/)."""
from tests.helpers import distributed


def pytest_runtest_setup(item):
    """Allow run_distributed for this test (and the fixtures it sets up) only when marked."""
    distributed.spawn_allowed = any(item.get_closest_marker(m) for m in ("parallel", "oracle"))
