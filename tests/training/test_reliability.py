"""Training that survives divergence, preemption and damaged checkpoints (the driver's guards).

In one 2-rank gloo world (DP = 2), through the driver `pretrain`:

- a diverging baseline (--lr 100) stops at its first non-finite step, names it, and leaves the
  tracker on the last finite checkpoint;
- spike policies: `skip` does not apply a flagged step (the scheduler's step count says how many
  updates were applied); `rewind` reloads the last checkpoint, skips the data since, counts the
  rewind in the metrics and the checkpoint, and stops at --max-rewinds;
- SIGTERM on one rank at a random step: both ranks stop after it with a checkpoint; resuming
  gives the uninterrupted run's losses bitwise;
- a resumed run with another --lr is refused unless --override-opt_param-scheduler or
  --use-checkpoint-opt_param-scheduler says whose schedule wins (the metrics header says which);
- a checkpoint file corrupted in place (same size) is named at load; --load-fallback-to-previous
  loads the newest intact earlier checkpoint instead;
- a second run on a --save directory in use is refused; a lock of a dead process is taken over.

Plus the command line's exit status (1 with one error line for a non-finite run; 0 with a
checkpoint after SIGTERM) and forked processes dying with the process that forked them.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest

from megatron_wesar.training.arguments import parse_pretrain_args
from tests.helpers.distributed import run_distributed

TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--log-interval", "1",
]


class _Interrupted(Exception):
    """Stops a run right after a given checkpoint (a job killed there)."""


def _run(argv, spikes_at=(), spike_once=True, sigterm_at=None, stop_after_save=None):
    """Run the driver in this spawned process: (per-step losses, log lines, the error or None).

    `spikes_at`: iterations a loss rule is made to flag (once each with `spike_once`);
    `sigterm_at`: the iteration during which rank 1 receives SIGTERM."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    import megatron_wesar.training.pretrain as driver
    from megatron_wesar.metric_keys import spike_flag_key
    from megatron_wesar.monitor import SpikeTracker

    fired, losses, lines = set(), [], []

    class InjectedSpikes(SpikeTracker):
        def update(self, step, **series):
            flags = super().update(step, **series)
            if step in spikes_at and not (spike_once and step in fired):
                fired.add(step)
                flags = {**flags, spike_flag_key("loss", "megatron"): 1.0}
            return flags

    real_step, real_save = driver.train_step, driver.save_checkpoint

    def train_step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        losses.append(result.loss)
        if len(losses) == sigterm_at and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    def save(engine, iteration, directory, log=print):
        path = real_save(engine, iteration, directory, log=log)
        if iteration == stop_after_save:
            raise _Interrupted
        return path

    error = None
    with mock.patch.multiple(driver, SpikeTracker=InjectedSpikes, train_step=train_step,
                             save_checkpoint=save):
        try:
            driver.pretrain(parse_pretrain_args(TINY + [str(a) for a in argv]),
                            log=lines.append)
        except Exception as err:  # noqa: BLE001 - returned to the test
            error = f"{type(err).__name__}: {err}"
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
    return losses, lines, error


def _common(path):
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(path)


def _tracker(directory):
    with open(os.path.join(directory, "latest_checkpointed_iteration.txt")) as f:
        return int(f.read())


def _metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _all_finite(path) -> bool:
    import torch
    from megatron.core import dist_checkpointing

    tensors = []

    def walk(value):
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            tensors.append(value)

    walk(dist_checkpointing.load_plain_tensors(path))
    return bool(tensors) and all(bool(t.isfinite().all()) for t in tensors)


def _scenarios(rank, world_size, root, sigterm_at):
    """Every in-process scenario; rank 0 returns what the tests check."""
    import torch.distributed as dist

    out = {}
    d = lambda *parts: os.path.join(root, *parts)  # noqa: E731

    # non-finite: a diverging baseline, checkpoints every 2 steps
    out["nan"] = _run(["--no-wesar", "--lr", 100, "--train-iters", 40, "--save", d("nan"),
                       "--save-interval", 2, "--metrics-file", d("nan.jsonl")])
    out["nan_wesar"] = _run(["--lr", 100, "--train-iters", 40])
    # skip vs log: the same injected spike at iteration 3
    for policy in ("skip", "log"):
        out[policy] = _run(["--spike-policy", policy, "--train-iters", 5, "--save", d(policy),
                            "--metrics-file", d(f"{policy}.jsonl")], spikes_at=(3,))
    # rewind: a spike at iteration 5 once; then one at 5 every time, capped at 2 rewinds
    out["rewind"] = _run(["--spike-policy", "rewind", "--train-iters", 8, "--save", d("rw"),
                          "--save-interval", 2, "--metrics-file", d("rw.jsonl")],
                         spikes_at=(5,))
    out["rewind_cap"] = _run(["--spike-policy", "rewind", "--max-rewinds", 2, "--train-iters", 6,
                              "--save", d("cap"), "--save-interval", 2], spikes_at=(5,),
                             spike_once=False)
    # SIGTERM during iteration `sigterm_at` on rank 1; resume; the same run uninterrupted
    out["sigterm"] = _run(["--train-iters", 8, "--save", d("sig")], sigterm_at=sigterm_at)
    out["resumed"] = _run(["--train-iters", 8, "--save", d("sig"), "--load", d("sig")])
    out["straight"] = _run(["--train-iters", 8])
    # another --lr on resume
    _run(["--train-iters", 6, "--save", d("sch"), "--save-interval", 3], stop_after_save=3)
    for name, flags in (("refused", []), ("override", ["--override-opt_param-scheduler"]),
                        ("use_ckpt", ["--use-checkpoint-opt_param-scheduler"])):
        out[f"schedule_{name}"] = _run(["--train-iters", 6, "--lr", 2e-3, "--load", d("sch"),
                                        "--metrics-file", d(f"sch_{name}.jsonl"), *flags])
    # a checkpoint corrupted in place
    _run(["--train-iters", 6, "--save", d("bad"), "--save-interval", 2], stop_after_save=4)
    if rank == 0:
        victim = sorted(n for n in os.listdir(d("bad", "iter_0000004")) if n.endswith(".distcp"))
        path = d("bad", "iter_0000004", victim[0])
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        out["victim"] = path
    dist.barrier()
    out["corrupt"] = _run(["--train-iters", 6, "--load", d("bad")])
    out["fallback"] = _run(["--train-iters", 6, "--load", d("bad"),
                            "--load-fallback-to-previous"])
    # a --save directory in use by a live process, then by a dead one
    if rank == 0:
        os.makedirs(d("locked"))
        with open(d("locked", ".megatron_wesar.lock"), "w") as f:
            json.dump({"pid": os.getppid(), "host": os.uname().nodename}, f)
    dist.barrier()
    out["locked"] = _run(["--train-iters", 2, "--save", d("locked")])
    if rank == 0:
        dead = subprocess.Popen(["true"])
        dead.wait()
        with open(d("locked", ".megatron_wesar.lock"), "w") as f:
            json.dump({"pid": dead.pid, "host": os.uname().nodename}, f)
    dist.barrier()
    out["stale_lock"] = _run(["--train-iters", 2, "--save", d("locked")])
    out["one_step"] = _run(["--train-iters", 1])
    out["lock_left"] = os.path.exists(d("locked", ".megatron_wesar.lock"))
    out["common"] = {name: _common(d(*parts)) for name, parts in {
        "skip": ("skip", "iter_0000005"), "log": ("log", "iter_0000005"),
        "rewind": ("rw", "iter_0000008"), "sigterm": ("sig", f"iter_{sigterm_at:07d}"),
    }.items()}
    out["nan_tracker"] = _tracker(d("nan"))
    out["nan_finite"] = _all_finite(d("nan", f"iter_{out['nan_tracker']:07d}"))  # collective
    return out if rank == 0 else None


SIGTERM_AT = random.Random().randint(2, 6)


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reliability"))
    print(f"SIGTERM at iteration {SIGTERM_AT}")
    return root, run_distributed(_scenarios, 2, root, SIGTERM_AT)[0]


@pytest.mark.parallel
def test_a_diverging_run_stops_at_its_first_nonfinite_step(scenarios):
    root, out = scenarios
    losses, _, error = out["nan"]
    assert error and "NonFiniteStepError" in error
    first_bad = next(i for i, loss in enumerate(losses, 1) if not math.isfinite(loss))
    assert f"iteration {first_bad} is non-finite (loss nan" in error
    assert len(losses) == first_bad  # nothing after it
    # the tracker is on the last checkpoint before it, which holds finite tensors only
    assert out["nan_tracker"] == (first_bad - 1) // 2 * 2 and out["nan_finite"]
    assert not os.path.exists(os.path.join(root, "nan", f"iter_{first_bad + first_bad % 2:07d}"))
    wesar_error = out["nan_wesar"][2]  # WeSaR: the first gate whose gradient went non-finite
    assert "NonFiniteStepError" in wesar_error
    assert "first non-finite WeSaR gate gradient: " in wesar_error and ".gate" in wesar_error
    last = _metrics(os.path.join(root, "nan.jsonl"))[-1]
    assert last["iteration"] == first_bad and last["loss"] is None  # non-finite: null


@pytest.mark.parallel
def test_skip_policy_does_not_apply_a_flagged_step(scenarios):
    root, out = scenarios
    assert out["skip"][2] is None and out["log"][2] is None
    assert out["skip"][0] == out["log"][0][:3] + out["skip"][0][3:]  # identical until the spike
    assert out["skip"][0][3:] != out["log"][0][3:]  # then the skipped update shows
    # applied updates: the scheduler advances only with them
    assert out["common"]["log"]["opt_param_scheduler"]["num_steps"] == 5
    assert out["common"]["skip"]["opt_param_scheduler"]["num_steps"] == 4
    assert out["common"]["skip"]["training_state"]["skipped_steps"] == 1
    skipped = [r["iteration"] for r in _metrics(os.path.join(root, "skip.jsonl"))
               if r.get("skipped_step")]
    assert skipped == [3]
    assert not any(r.get("skipped_step") for r in _metrics(os.path.join(root, "log.jsonl")))
    assert _study_counts(root, "skip.jsonl") == (1, 0)  # what the study summary counts
    assert _study_counts(root, "log.jsonl") == (0, 0)


def _study_counts(root, name):
    """(skipped steps, rewinds) of a metrics file as the study summary counts them."""
    from megatron_wesar.study.summary import load_metrics, summarize_run

    run = summarize_run("wesar", 1e-3, 1, load_metrics(os.path.join(root, name)))
    return run["skipped_steps"], run["rewinds"]


@pytest.mark.parallel
def test_rewind_policy_reloads_and_skips_the_data_since(scenarios):
    root, out = scenarios
    losses, lines, error = out["rewind"]
    assert error is None
    assert len(losses) == 9  # 1..5, then 5..8 again from the checkpoint of iteration 4
    assert losses[5] != losses[4]  # iteration 5 again, on the next batch of the stream
    state = out["common"]["rewind"]["training_state"]
    assert state == {"data_offset": 1, "rewinds": 1, "skipped_steps": 0}
    assert out["common"]["rewind"]["opt_param_scheduler"]["num_steps"] == 8
    records = _metrics(os.path.join(root, "rw.jsonl"))
    assert [r["rewind_to"] for r in records if "rewind_to" in r] == [4]
    assert _study_counts(root, "rw.jsonl") == (0, 1)
    assert any("rewound to iteration 4" in line for line in lines)
    cap_losses, _, cap_error = out["rewind_cap"]
    assert cap_error and "RewindLimitError" in cap_error and "after 2 rewinds" in cap_error


@pytest.mark.parallel
def test_sigterm_on_one_rank_saves_and_resumes_bitwise(scenarios):
    _, out = scenarios
    losses, lines, error = out["sigterm"]
    assert error is None and len(losses) == SIGTERM_AT  # the step in flight finished
    assert any(f"stopping after iteration {SIGTERM_AT}" in line for line in lines)
    assert out["common"]["sigterm"]["iteration"] == SIGTERM_AT
    resumed, _, resume_error = out["resumed"]
    assert resume_error is None
    assert losses + resumed == out["straight"][0]  # bitwise


@pytest.mark.parallel
def test_a_resumed_schedule_that_differs_needs_a_decision(scenarios):
    root, out = scenarios
    error = out["schedule_refused"][2]
    assert "CheckpointMismatchError" in error and "max_lr" in error
    assert "--override-opt_param-scheduler" in error
    assert "--use-checkpoint-opt_param-scheduler" in error
    for name, max_lr in (("override", 2e-3), ("use_ckpt", 1e-3)):
        assert out[f"schedule_{name}"][2] is None
        header = _metrics(os.path.join(root, f"sch_{name}.jsonl"))[0]
        assert header["run"]["training"]["lr"] == 2e-3  # what was asked
        assert header["schedule"]["max_lr"] == max_lr  # what runs


@pytest.mark.parallel
def test_a_checkpoint_corrupted_in_place_is_named(scenarios):
    _, out = scenarios
    error = out["corrupt"][2]
    assert "CheckpointError" in error and out["victim"] in error and "SHA-256" in error
    assert "--load-fallback-to-previous" in error
    _, lines, fallback_error = out["fallback"]
    assert fallback_error is None
    assert any("WARNING" in line and out["victim"] in line for line in lines)
    assert any("iter_0000002 (iteration 2" in line for line in lines)


@pytest.mark.parallel
def test_one_run_per_save_directory(scenarios):
    _, out = scenarios
    error = out["locked"][2]
    assert "CheckpointError" in error and "in use by another run" in error
    assert out["stale_lock"][2] is None and not out["lock_left"]
    assert out["one_step"][2] is None and len(out["one_step"][0]) == 1  # --train-iters 1 runs


def test_warmup_must_be_shorter_than_the_run(capsys):
    with pytest.raises(SystemExit):
        parse_pretrain_args(["--train-iters", "5", "--lr-warmup-iters", "5"])
    assert "--lr-warmup-iters 5 must be >= 0 and < --train-iters 5" in capsys.readouterr().err
    assert parse_pretrain_args(["--train-iters", "1"]).training.effective_lr_warmup_iters == 0


CLI = [sys.executable, "-m", "megatron_wesar", "pretrain", *TINY]
UNBUFFERED = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.mark.parallel  # two training processes, each with its own (one-rank) process group
def test_command_line_exit_status(tmp_path):
    """A non-finite run: exit 1, one error line, no traceback. SIGTERM: exit 0, a checkpoint of
    the step in flight."""
    nan = subprocess.run(CLI + ["--no-wesar", "--lr", "100", "--train-iters", "40"],
                         capture_output=True, text=True, timeout=300, env=UNBUFFERED)
    assert nan.returncode == 1
    assert "megatron-wesar pretrain: error: iteration" in nan.stderr
    assert "Traceback" not in nan.stderr
    save = tmp_path / "ck"
    run = subprocess.Popen(CLI + ["--train-iters", "10000", "--save", str(save)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=UNBUFFERED)
    seen = 0
    for line in run.stdout:
        if line.startswith("iteration"):
            seen = int(line.split()[1].split("/")[0])
            if seen >= 3:
                run.send_signal(signal.SIGTERM)
                break
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert _tracker(save) >= seen and "exit signal received" in out


def test_forked_processes_die_with_the_process_that_forked_them(tmp_path):
    """A process that called forked_processes_die_with_this_one forks a sleeping child and is
    SIGKILLed: the child goes with it."""
    pid_file = tmp_path / "child.pid"
    code = (
        "import os, time\n"
        "from megatron_wesar.compat.megatron_core import forked_processes_die_with_this_one\n"
        "forked_processes_die_with_this_one()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(120)\n"
        "    os._exit(0)\n"
        f"open({str(pid_file)!r}, 'w').write(str(pid))\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and parent.poll() is None
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        if not _running(child):
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the forked child outlived its parent")


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie awaiting its reaper is not)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False
