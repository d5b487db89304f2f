"""A study that goes wrong: failed runs make the command exit 1 with their whole messages in
the summary and report; the ranks die with the study's top process; `report` skips a damaged
metrics file with a warning naming it."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_wesar.study.summary import MetricsFileError, load_metrics

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "study_small")
SMALL_RUN = ["--num-layers", "1", "--hidden-size", "16", "--ffn-hidden-size", "32",
             "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--lr-warmup-iters", "1", "--log-interval", "1",
             "--eval-interval", "1000", "--tensor-model-parallel-size", "1"]


@pytest.fixture
def study_dir(tmp_path):
    """A writable copy of the fixture study (study.json and runs/)."""
    dst = tmp_path / "study"
    dst.mkdir()
    shutil.copy(os.path.join(FIXTURE, "study.json"), dst / "study.json")
    shutil.copytree(os.path.join(FIXTURE, "runs"), dst / "runs")
    return str(dst)


def _metrics(study_dir, run):
    return os.path.join(study_dir, "runs", run, "metrics.jsonl")


def test_report_skips_damaged_metrics_files_naming_them(study_dir, capsys):
    from megatron_wesar.cli import main

    with open(_metrics(study_dir, "he_lr1e-2_s1"), "r+b") as f:
        f.seek(300)
        f.write(b"\xff\xfe\x00garbage")  # bytes that are not UTF-8
    with open(_metrics(study_dir, "small_lr1e-3_s1"), "wb") as f:
        f.write(b"\x00" * 4096)  # a zero-filled file (no complete record)
    assert main(["report", study_dir]) == 0
    err = capsys.readouterr().err
    for run in ("he_lr1e-2_s1", "small_lr1e-3_s1"):
        assert f"warning: {_metrics(study_dir, run)}" in err and "run skipped" in err
    summary = json.load(open(os.path.join(study_dir, "summary.json")))
    assert len(summary["runs"]) == 17
    assert set(summary["skipped_runs"]) == {"runs/he_lr1e-2_s1/metrics.jsonl",
                                            "runs/small_lr1e-3_s1/metrics.jsonl"}
    report = open(os.path.join(study_dir, "report.md")).read()
    assert "**Skipped runs**" in report and "`runs/he_lr1e-2_s1/metrics.jsonl`: " in report


def test_report_names_a_damaged_summary(study_dir, capsys):
    from megatron_wesar.cli import main

    with open(os.path.join(study_dir, "summary.json"), "w") as f:
        f.write('{"runs": [')
    assert main(["report", study_dir]) == 1
    assert f"{os.path.join(study_dir, 'summary.json')}: not valid JSON" in capsys.readouterr().err
    assert main(["report", study_dir, "--resummarize"]) == 0  # rebuilt from the run folders


def test_load_metrics_names_the_file_and_line_of_a_bad_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1, "loss": 3.0}\n{"iteration": "x", "loss": 2.0}\n')
    with pytest.raises(MetricsFileError, match=f"{path}:2: iteration 'x' is not an integer"):
        load_metrics(str(path))


# --------------------------------------------------------------------------- failed runs

MESSAGE = "iteration 3: non-finite gradients\n  decoder.layers.0.mlp.linear_fc1 gate: nan\n" \
          "  decoder.layers.1.mlp.linear_fc2 gate: inf"


def _study_that_fails_then_stops(rank, world_size, out_dir):
    """he raises; wesar ends before its last step (as the driver does on an exit signal); the
    study must stop there."""
    from unittest import mock

    from megatron_wesar.study.runner import main

    def pretrain(config, log):
        if not config.wesar.enabled:
            try:
                raise OSError("disk full")
            except OSError as err:
                raise FloatingPointError(MESSAGE) from err
        if rank == 0:
            with open(config.logging.metrics_file, "w") as f:
                f.write(json.dumps({"iteration": 1, "loss": 5.0, "grad_norm": 1.0}) + "\n")
        return []

    with mock.patch("megatron_wesar.training.pretrain.pretrain", pretrain):
        return main(["--dir", out_dir, "--methods", "he,wesar", "--lrs", "1e-3,1e-2",
                     "--train-iters", "2", "--", *SMALL_RUN])


@pytest.mark.parallel
def test_failed_and_stopped_runs_exit_1_keeping_whole_messages(tmp_path):
    from tests.helpers.distributed import run_distributed

    out_dir = str(tmp_path / "study")
    assert run_distributed(_study_that_fails_then_stops, 1, out_dir, timeout=180) == [1]
    study = json.load(open(os.path.join(out_dir, "study.json")))
    assert list(study["failed_runs"]) == ["he_lr1e-3_s1"]
    message = study["failed_runs"]["he_lr1e-3_s1"]
    assert message.startswith(f"FloatingPointError: {MESSAGE}\n  at test_study_failures.py:")
    assert "\ncaused by: OSError: disk full\n  at test_study_failures.py:" in message
    error = open(os.path.join(out_dir, "runs", "he_lr1e-3_s1", "error.txt")).read()
    assert error.startswith("Traceback") and "disk full" in error
    # the stopped run ends the study: the runs after it never start
    assert study["stopped_during"] == "wesar_lr1e-3_s1"
    assert sorted(os.listdir(os.path.join(out_dir, "runs"))) == ["he_lr1e-3_s1",
                                                                 "wesar_lr1e-3_s1"]
    summary = json.load(open(os.path.join(out_dir, "summary.json")))
    assert [(r["method"], r["steps"]) for r in summary["runs"]] == [("wesar", 1)]
    report = open(os.path.join(out_dir, "report.md")).read()
    assert "**Stopped.** The study stopped during `wesar_lr1e-3_s1`" in report
    assert "**Failed runs**" in report and "  decoder.layers.1.mlp.linear_fc2 gate: inf" in report


# --------------------------------------------------------------------------- killed study


def _children(pid: int) -> list:
    """The pids whose parent is `pid` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parallel
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_study_kills_its_ranks(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    started = tmp_path / "study.json"  # written by rank 0 once the ranks have started
    top = subprocess.Popen(
        [sys.executable, "-m", "megatron_wesar", "study", "--nproc-per-node", "2",
         "--dir", str(tmp_path), "--methods", "he", "--lrs", "1e-3", "--train-iters", "100000",
         "--", *SMALL_RUN], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = []
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert top.poll() is None and time.monotonic() < deadline, "the study never started"
            time.sleep(0.5)
        ranks = _children(top.pid)
        assert len(ranks) == 2
        top.send_signal(signal.SIGKILL)
        top.wait()
        deadline = time.monotonic() + 10
        while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(r) for r in ranks), "a rank outlived the study's top process"
    finally:
        for pid in [top.pid, *ranks]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        top.wait()


def test_an_impossible_study_fails_before_starting_any_rank(capsys):
    from megatron_wesar.study.runner import main

    assert main(["--nproc-per-node", "3"]) == 2  # the tiny study's TP=2 on 3 ranks
    assert "world size 3 is not a multiple of tensor-model-parallel size 2" in \
        capsys.readouterr().err
