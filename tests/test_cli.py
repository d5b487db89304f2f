"""The `megatron-wesar` command starts quietly: megatron-core's accelerator notices become one
line, said once (not by other ranks, not again by torchrun's children); an accelerator asked for
where it is absent (Transformer Engine, an FP8 backend) is one error line, not a traceback."""
import importlib.util
import os
import subprocess
import sys

import pytest

NOTE = "note: Transformer Engine and apex not installed"


def _help(**env):
    """stderr of `python -m megatron_wesar pretrain --help` in a fresh environment (no notice
    said yet, rank 0; earlier in-process CLI runs of this pytest session set the marker) with
    `env` added."""
    fresh = {k: v for k, v in os.environ.items()
             if k not in ("MEGATRON_WESAR_ACCELERATOR_NOTICE_SAID", "RANK")}
    result = subprocess.run([sys.executable, "-m", "megatron_wesar", "pretrain", "--help"],
                            capture_output=True, text=True, env={**fresh, **env}, check=True)
    return result.stderr


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("transformer_engine", "apex")),
                    reason="the note is about Transformer Engine and apex being absent")
def test_accelerator_notices_are_one_line_once():
    first = _help()
    assert first.count("note:") == 1 and NOTE in first
    assert "UserWarning" not in first and "Apex is not installed" not in first
    assert "note:" not in _help(RANK="1")  # other ranks stay silent
    assert "note:" not in _help(MEGATRON_WESAR_ACCELERATOR_NOTICE_SAID="1")  # torchrun children


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None,
                    reason="the error is about Transformer Engine being absent")
def test_transformer_engine_asked_for_where_absent_is_one_error_line():
    result = subprocess.run(
        [sys.executable, "-m", "megatron_wesar", "pretrain", "--preset", "tiny",
         "--transformer-impl", "transformer_engine", "--train-iters", "1"],
        capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "needs NVIDIA Transformer Engine" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_fp8_without_an_fp8_backend_is_one_error_line():
    """`--fp8-format hybrid` where torch has no _scaled_mm stops with one error line naming why."""
    # deleted once everything is imported (megatron-core's imports reach torch's own users of it)
    run = ("import sys, torch, megatron_wesar.training.pretrain; del torch._scaled_mm; "
           "from megatron_wesar.cli import main; sys.exit(main(['pretrain', '--preset', 'tiny', "
           "'--fp8-format', 'hybrid', '--train-iters', '1']))")
    result = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "FP8 backend" in errors[0] and "_scaled_mm" in errors[0], errors
    assert "Traceback" not in result.stderr
