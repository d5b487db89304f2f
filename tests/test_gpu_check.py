"""bench/gpu_check.py where there is no GPU: one error line, the offline installs it would run,
and the model it times (the GPU figures themselves need a GPU machine)."""
import importlib.util
import pathlib
import subprocess
import sys

import pytest
import torch

from megatron_wesar.training.arguments import parse_pretrain_args
from megatron_wesar.training.dry_run import plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for a machine without CUDA")
def test_without_cuda_it_stops_with_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--wheels", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"gpu_check: error: CUDA is not available (torch {torch.__version__}, "
        f"{f'CUDA {torch.version.cuda}' if torch.version.cuda else 'a CPU-only build'}): run "
        "this on a GPU machine"]


def test_missing_packages_install_offline_from_the_wheels(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None)
    wheels, checkout = gpu_check.pip_install_commands(tmp_path)
    pip = [sys.executable, "-m", "pip", "install", "--no-index"]
    assert wheels == pip + ["--find-links", str(tmp_path), "megatron-core==0.16.1", "torchao"]
    assert checkout == pip + ["--no-deps", "--no-build-isolation", "-e", str(ROOT)]
    with pytest.raises(gpu_check.GpuCheckError, match="megatron-core==0.16.1, torchao not "
                                                      "installed and no --wheels folder"):
        gpu_check.pip_install_commands(None)


def test_installed_packages_are_not_reinstalled(monkeypatch):
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: object())
    assert [command[-1] for command in gpu_check.pip_install_commands(None)] == [str(ROOT)]


def test_the_timed_model_is_about_350m_parameters_in_every_variant():
    for flags in gpu_check.VARIANTS.values():
        config = parse_pretrain_args(gpu_check.MODEL + flags)
        assert config.model.bf16 and config.model.transformer_impl == "local"
    parameters = plan(parse_pretrain_args(gpu_check.MODEL), 1).model_parameters
    assert 340e6 < parameters < 360e6, parameters


def test_a_failed_build_of_the_checkout_runs_it_from_the_source_tree(monkeypatch, capsys):
    """Where the extension does not build, the stages import the package from the checkout (one
    warning line) instead of the whole check stopping; a failed wheel install still stops it."""
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    ran = []

    def run(command, check, cwd):
        ran.append(command)
        if command[-1] == str(ROOT):
            raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    gpu_check.install(ROOT)
    assert len(ran) == 2
    assert gpu_check.os.environ["PYTHONPATH"] == f"{ROOT}{gpu_check.os.pathsep}/elsewhere"
    assert capsys.readouterr().err.startswith("gpu_check: warning: building this checkout failed")

    def fail(command, check, cwd):
        raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(gpu_check.subprocess, "run", fail)
    with pytest.raises(subprocess.CalledProcessError):
        gpu_check.install(ROOT)
