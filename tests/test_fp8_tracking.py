"""bench/fp8_tracking.py's pieces: the FP8 grid shift keeps the format's error statistics but
moves the rounding; the comparison's arithmetic; reading a run's final validation loss."""
import importlib.util
import json
import math
import pathlib
from unittest import mock

import pytest
import torch

from megatron_wesar import fp8

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "bench" / "fp8_tracking.py"
_spec = importlib.util.spec_from_file_location("fp8_tracking", SCRIPT)
fp8_tracking = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fp8_tracking)


def _rel_error(t: torch.Tensor) -> tuple[float, torch.Tensor]:
    q, d = fp8.quantize(t, fp8.amaxes([t], None)[0], torch.float8_e4m3fn)
    back = q.double() * d.double()
    return float((back - t.double()).norm() / t.double().norm()), back


def test_grid_shift_moves_the_rounding_not_its_size():
    """A shifted grid rounds the values elsewhere (most of them change) with the same relative
    error as the plain grid (a Gaussian: 2.6 % either way), and each call draws a new shift."""
    t = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.0063
    plain_error, plain = _rel_error(t)
    with mock.patch.object(fp8, "quantize", fp8.quantize):  # restored afterwards
        fp8_tracking.shift_fp8_grid(1)
        shifted_errors, shifted = zip(*(_rel_error(t) for _ in range(3)))
    assert 0.02 < plain_error < 0.035
    for error, values in zip(shifted_errors, shifted):
        assert error == pytest.approx(plain_error, rel=0.1)
        assert (values != plain).double().mean() > 0.5
    assert not torch.equal(shifted[0], shifted[1])


def test_compare_is_welch():
    c = fp8_tracking.compare([1.0, 2.0, 3.0], [2.0, 4.0])
    assert c["diff"] == pytest.approx(1.0)
    assert c["se"] == pytest.approx(math.sqrt(2.0 / 2 + 1.0 / 3))


def test_final_valid_loss(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"run": {}}, {"iteration": 200, "loss": 2.5}, {"iteration": 200, "valid_loss": 2.75}]))
    assert fp8_tracking.final_valid_loss(str(path)) == 2.75
    assert fp8_tracking.final_valid_loss(str(path), train_iters=100) is None
    assert fp8_tracking.final_valid_loss(str(tmp_path / "missing.jsonl")) is None
