"""Checkpoints of the training driver (megatron_wesar.training.checkpointing).

Every training run happens in a spawned gloo process (tests/helpers/distributed.py), through the
driver `pretrain` with `--save` / `--save-interval` / `--load`:

- resume: 4 steps + save + resume for 4 more == 8 uninterrupted steps, bitwise (losses, gates,
  every model and optimizer tensor of the final checkpoint, scheduler state);
- resharding: TP2 and PP2 checkpoints resumed with TP1 / PP1 (model and Adam moments); a TP1
  checkpoint resumed with TP2 (sequence parallel) and PP2: the state right after loading
  re-saved bitwise, and after one more step every weight, gate and Adam moment as TP1's up
  to rounding;
  distributed-optimizer checkpoints resumed with the same layout (bitwise), another DP size,
  and without it (weights only, with a warning);
- atomicity: a save SIGKILLed inside dist_checkpointing.save, and after the rename but before
  the tracker update, leaves the previous checkpoint and the tracker usable;
- clear errors: missing directory, no tracker, another model shape, damaged checkpoints.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
from unittest import mock

import pytest

from megatron_wesar.training.run_lock import LOCK_FILENAME
from tests.helpers.distributed import run_distributed

TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--log-interval", "1",
]
ITER4, ITER5, ITER8 = "iter_0000004", "iter_0000005", "iter_0000008"


class _Interrupted(Exception):
    """Raised by the test hook to stop a run right after a checkpoint (a preempted job)."""


def _pretrain(argv, stop_after_save=None, save_loaded=None):
    """Run the driver in this (spawned) process; returns (per-step losses, log lines).

    `save_loaded`: a directory where the state is saved again right after loading `--load`."""
    from megatron.core import parallel_state

    import megatron_wesar.training.pretrain as driver
    from megatron_wesar.training.arguments import parse_pretrain_args

    lines = []
    losses = []
    real_save, real_step, real_load = (
        driver.save_checkpoint, driver.train_step, driver.load_checkpoint)

    def save(engine, iteration, directory, log=print):
        path = real_save(engine, iteration, directory, log=log)
        if iteration == stop_after_save:
            raise _Interrupted(iteration)
        return path

    def train_step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        losses.append(result.loss)
        return result

    def load(engine, directory, **kwargs):
        iteration = real_load(engine, directory, **kwargs)
        if save_loaded:
            real_save(engine, iteration, save_loaded, log=lines.append)
        return iteration

    with mock.patch.multiple(driver, save_checkpoint=save, train_step=train_step,
                             load_checkpoint=load):
        try:
            driver.pretrain(parse_pretrain_args(TINY + list(argv)), log=lines.append)
        except _Interrupted:
            parallel_state.destroy_model_parallel()
    return losses, lines


def _pretrain_runs(rank, world_size, runs):
    """`runs`: list of (argv, stop_after_save[, save_loaded]); one (losses, log lines) per run."""
    return [_pretrain(*run) for run in runs]


def _checkpoint_tensors(path):
    """All tensors (model and optimizer) and the common state of one checkpoint."""
    import torch
    from megatron.core import dist_checkpointing

    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        elif isinstance(value, torch.Tensor):
            flat[prefix[:-1]] = value

    walk("", dist_checkpointing.load_plain_tensors(path))
    return flat, dist_checkpointing.load_common_state_dict(path)


def _pretrain_and_read(rank, world_size, runs, paths):
    """`_pretrain_runs`, then the tensors of the checkpoints at `paths` (read by every rank,
    returned by rank 0)."""
    results = _pretrain_runs(rank, world_size, runs)
    tensors = [_checkpoint_tensors(path)[0] for path in paths]
    return results, tensors if rank == 0 else None


def _resume_and_compare(rank, world_size, argv, ckpt_a, ckpt_b):
    losses, lines = _pretrain(argv)
    tensors_a, common_a = _checkpoint_tensors(ckpt_a)
    tensors_b, common_b = _checkpoint_tensors(ckpt_b)
    return {
        "losses": losses,
        "lines": lines,
        "keys_a": sorted(tensors_a),
        "keys_b": sorted(tensors_b),
        "differ": sorted(k for k in tensors_a if k in tensors_b
                         and not tensors_a[k].equal(tensors_b[k])),
        "gates_a": {k: v.tolist() for k, v in tensors_a.items() if _is_gate(k)},
        "gates_b": {k: v.tolist() for k, v in tensors_b.items() if _is_gate(k)},
        "scheduler": (common_a["opt_param_scheduler"], common_b["opt_param_scheduler"]),
        "iteration": (common_a["iteration"], common_b["iteration"]),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """8 uninterrupted steps (saved at iterations 5 and 8), and a run preempted after its
    checkpoint at iteration 4 (same schedule: --train-iters 8)."""
    root = tmp_path_factory.mktemp("ckpt")
    full, preempted = str(root / "full"), str(root / "preempted")
    (full_losses, _), (first_losses, lines) = run_distributed(_pretrain_runs, 1, [
        (["--train-iters", "8", "--save", full, "--save-interval", "5"], None),
        (["--train-iters", "8", "--save", preempted, "--save-interval", "4"], 4),
    ])[0]
    return {"root": root, "full": full, "losses": full_losses, "preempted": preempted,
            "first_losses": first_losses, "first_lines": lines}


@pytest.mark.parallel
def test_resume_is_bitwise_identical_to_uninterrupted_run(reference):
    assert len(reference["losses"]) == 8
    assert reference["first_losses"] == reference["losses"][:4]
    preempted = reference["preempted"]
    assert sorted(os.listdir(preempted)) == [ITER4, "latest_checkpointed_iteration.txt"]
    # The requeued job: --load and --save the same directory, the tracker says 4.
    out = run_distributed(
        _resume_and_compare, 1,
        ["--train-iters", "8", "--load", preempted, "--save", preempted, "--save-interval", "4"],
        os.path.join(reference["full"], ITER8), os.path.join(preempted, ITER8),
    )[0]
    assert out["losses"] == reference["losses"][4:]  # bitwise
    assert any("loaded checkpoint" in line and "iteration 4" in line for line in out["lines"])
    assert out["keys_a"] == out["keys_b"]
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in out["keys_a"])
    assert out["differ"] == []  # every weight, gate and Adam moment bitwise equal
    assert out["gates_a"] and out["gates_a"] == out["gates_b"]
    assert out["scheduler"][0] == out["scheduler"][1]
    assert out["iteration"] == (8, 8)


UPWARD = {"tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
          "pp2": ["--pipeline-model-parallel-size", "2"]}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, reference):
    """Checkpoints at iteration 4 of 6-step runs on 2 ranks (TP2; PP2; distributed optimizer
    DP2), and resumed runs from them on 2 ranks (same layout) and on 1 rank (other layouts).

    Upward: `reference`'s TP1 checkpoint of iteration 4 resumed on 2 ranks with each layout of
    UPWARD; each run saves the state it loaded (iteration 4), takes two steps (5, 6) saving
    after each. "tensors" maps (layout, iteration) to a checkpoint's tensors, "tp1" included."""
    root = tmp_path_factory.mktemp("layouts")
    tp2, pp2, dp2 = str(root / "tp2"), str(root / "pp2"), str(root / "dp2")
    six = ["--train-iters", "6"]
    resume = ["--train-iters", "8", "--load", os.path.join(reference["preempted"], ITER4),
              "--save-interval", "1"]
    upward = {name: str(root / f"{name}_from_tp1") for name in UPWARD}
    checkpoints = {("tp1", 4): os.path.join(reference["preempted"], ITER4),
                   ("tp1", 5): os.path.join(reference["full"], ITER5)}
    for name, directory in upward.items():
        checkpoints.update({(name, 4): os.path.join(directory, ITER4),
                            (name, 5): os.path.join(directory, ITER5)})
    runs, tensors = run_distributed(_pretrain_and_read, 2, [
        (six + ["--tensor-model-parallel-size", "2", "--save", tp2, "--save-interval", "4"], None),
        (six + ["--pipeline-model-parallel-size", "2", "--save", pp2, "--save-interval", "4"],
         None),
        (six + ["--use-distributed-optimizer", "--save", dp2, "--save-interval", "4"], None),
        (six + ["--use-distributed-optimizer", "--load", os.path.join(dp2, ITER4)], None),
    ] + [(resume + UPWARD[name] + ["--save", directory], 6, directory)
         for name, directory in upward.items()], list(checkpoints.values()))[0]
    tp2_run, pp2_run, dp2_run, dp2_resumed = runs[:4]
    # --load of one checkpoint directory (iteration 4), not the tracker's latest (6).
    tp1_from_tp2, pp1_from_pp2, dp1_from_dp2, plain_from_dp2 = run_distributed(
        _pretrain_runs, 1, [
            (six + ["--load", os.path.join(tp2, ITER4)], None),
            (six + ["--load", os.path.join(pp2, ITER4)], None),
            (six + ["--use-distributed-optimizer", "--load", os.path.join(dp2, ITER4)], None),
            (six + ["--load", os.path.join(dp2, ITER4)], None),
        ])[0]
    return {"tp2": tp2_run, "pp2": pp2_run, "dp2": dp2_run, "dp2_resumed": dp2_resumed,
            "tp1_from_tp2": tp1_from_tp2, "pp1_from_pp2": pp1_from_pp2,
            "dp1_from_dp2": dp1_from_dp2, "plain_from_dp2": plain_from_dp2,
            "upward": dict(zip(UPWARD, runs[4:])), "tensors": dict(zip(checkpoints, tensors))}


def _close(ours, theirs, rtol):
    return len(ours) == len(theirs) and all(
        abs(a - b) <= rtol * abs(b) for a, b in zip(ours, theirs))


@pytest.mark.parallel
@pytest.mark.parametrize("source,target,layout", [
    ("tp2", "tp1_from_tp2", "TP2 PP1 DP1"),
    ("pp2", "pp1_from_pp2", "TP1 PP2 DP1"),  # tied embedding / output layer on two stages
])
def test_checkpoint_resumes_with_another_layout(layouts, source, target, layout):
    theirs, _ = layouts[source]
    ours, lines = layouts[target]
    # Step 5's loss is that of the weights after step 4; step 6's also needs the Adam moments.
    assert _close(ours, theirs[4:], 1e-5), (ours, theirs)
    assert any(f"written with {layout}" in line for line in lines)
    assert any("optimizer state resharded" in line for line in lines)
    assert not any("NOT loaded" in line for line in lines)


# float32 in another reduction order (TP partial sums, the tied embedding's all-reduce). The
# key part of the qkv bias has an exactly zero gradient (softmax is shift invariant): Adam
# normalises the rounding noise there, so that tensor follows the reduction order more loosely.
RTOL, RTOL_QKV_BIAS = 2e-5, 1e-3
QKV_BIAS = "decoder.layers.self_attention.linear_qkv.bias"


def _is_gate(key: str) -> bool:
    """Whether a checkpoint key is a WeSaR gate (`gate`, or `gate_<part>` of a fused linear)."""
    return key.rsplit(".", 1)[-1].startswith("gate")


def _assert_full_state(ours, theirs):
    """Both checkpoints hold the same keys: every weight and gate, both Adam moments of each,
    and the Adam step."""
    weights = [k for k in theirs if not k.startswith("optimizer.")]
    gates = [k for k in weights if _is_gate(k)]
    # q, k, v, proj, fc1, fc2 (each stacked over layers), word embedding, positions, output
    assert len(gates) == 9, gates
    expected = sorted(weights + ["optimizer.state.common_step"] + [
        f"optimizer.state.{moment}.{k}" for moment in ("exp_avg", "exp_avg_sq") for k in weights])
    assert sorted(theirs) == expected and sorted(ours) == expected


@pytest.mark.parallel
@pytest.mark.parametrize("layout", list(UPWARD))
def test_upward_resharding_loads_the_adam_moments_exactly(layouts, layout):
    """TP1 -> TP2 (sequence parallel) / PP2: the state the resumed run loaded, saved again
    before any step, is the TP1 checkpoint's bitwise (weights, gates, Adam moments, step)."""
    theirs, ours = layouts["tensors"]["tp1", 4], layouts["tensors"][layout, 4]
    _assert_full_state(ours, theirs)
    assert [k for k in theirs if not ours[k].equal(theirs[k])] == []
    assert ours["optimizer.state.common_step"].item() == 4
    _, lines = layouts["upward"][layout]
    assert any("written with TP1 PP1 DP1" in line for line in lines)
    assert any("optimizer state resharded" in line for line in lines)
    assert not any("NOT loaded" in line for line in lines)


@pytest.mark.parallel
@pytest.mark.parametrize("layout", list(UPWARD))
def test_upward_resharding_continues_like_tp1(reference, layouts, layout):
    """TP1 -> TP2 / PP2, then steps 5 and 6: the losses, and after step 5 every weight, gate
    and Adam moment, equal TP1's up to float32 reduction order."""
    theirs, ours = layouts["tensors"]["tp1", 5], layouts["tensors"][layout, 5]
    _assert_full_state(ours, theirs)
    assert ours["optimizer.state.common_step"].item() == 5
    far = {}
    for key, expected in theirs.items():
        rtol = RTOL_QKV_BIAS if key == QKV_BIAS else RTOL
        diff, scale = (ours[key] - expected).abs().max().item(), expected.abs().max().item()
        if diff > rtol * scale + 1e-8:
            far[key] = (diff, scale)
    assert far == {}
    losses, _ = layouts["upward"][layout]
    assert _close(losses, reference["losses"][4:6], 1e-5), (losses, reference["losses"])


@pytest.mark.parallel
def test_distributed_optimizer_resume_is_bitwise(layouts):
    full, _ = layouts["dp2"]
    resumed, lines = layouts["dp2_resumed"]
    assert len(full) == 6 and resumed == full[4:]  # the Adam step count is restored too
    assert not any("NOT loaded" in line for line in lines)


@pytest.mark.parallel
def test_distributed_optimizer_other_layouts(layouts):
    full, _ = layouts["dp2"]
    # DP2 -> DP1 with the distributed optimizer: everything resumes.
    dp1, dp1_lines = layouts["dp1_from_dp2"]
    assert _close(dp1, full[4:], 1e-6), (dp1, full)
    assert not any("NOT loaded" in line for line in dp1_lines)
    # Distributed -> plain optimizer: the weights only, said clearly; Adam starts afresh.
    plain, plain_lines = layouts["plain_from_dp2"]
    assert _close(plain[:1], full[4:5], 1e-6) and plain[1] != full[5], (plain, full)
    warning = [line for line in plain_lines if "NOT loaded" in line]
    assert len(warning) == 1 and "distributed optimizer on -> off" in warning[0]
    assert "Adam moments start from zero" in warning[0]


def _blocked_save(argv, phase, marker):
    """Child process: run the driver and, at the save of iteration 8, stop at `phase` forever
    (after writing its losses so far to `marker`) so that the parent can SIGKILL it there."""
    import json

    import torch
    from megatron.core import dist_checkpointing

    import megatron_wesar.training.checkpointing as ckpt
    import megatron_wesar.training.pretrain as driver
    from megatron_wesar.training.arguments import parse_pretrain_args

    torch.set_num_threads(1)  # as in tests/helpers/distributed.py: the reference's arithmetic
    from megatron_wesar.compat import enable_cpu_compat

    enable_cpu_compat()
    losses = []
    real_step = driver.train_step

    def train_step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        losses.append(result.loss)
        return result

    def block():
        with open(marker + ".tmp", "w") as f:
            json.dump(losses, f)
        os.replace(marker + ".tmp", marker)
        while True:
            time.sleep(60)

    driver.train_step = train_step
    if phase == "writing":  # inside dist_checkpointing.save, the data files written
        real_save = dist_checkpointing.save

        def save(state, path, **kwargs):
            real_save(state, path, **kwargs)
            if ITER8 in str(path):
                block()

        dist_checkpointing.save = save
    elif phase == "tracker":  # renamed into place, the tracker not updated yet
        real_tracker = ckpt._write_tracker

        def write_tracker(directory, iteration):
            if iteration == 8:
                block()
            real_tracker(directory, iteration)

        ckpt._write_tracker = write_tracker
    driver.pretrain(parse_pretrain_args(TINY + list(argv)), log=lambda line: None)


def _kill_during_save(argv, phase, tmp_path):
    """Start `_blocked_save`, wait until it blocks in `phase`, SIGKILL it and its children;
    return the losses it had."""
    import json

    import psutil

    marker = str(tmp_path / f"blocked-{phase}")
    proc = multiprocessing.get_context("spawn").Process(
        target=_blocked_save, args=(argv, phase, marker))
    proc.start()
    deadline = time.monotonic() + 240
    while not os.path.exists(marker):
        assert proc.is_alive(), f"the child exited ({proc.exitcode}) before blocking in {phase}"
        assert time.monotonic() < deadline, f"the child never reached {phase}"
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    for child in children:  # e.g. megatron's checkpoint-writer results manager
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    assert proc.exitcode == -signal.SIGKILL
    with open(marker) as f:
        return json.load(f)


@pytest.mark.parallel
def test_kill_during_save_keeps_previous_checkpoint(reference, tmp_path):
    from megatron_wesar.training.checkpointing import read_tracker

    save = str(tmp_path / "run")
    train = ["--train-iters", "8", "--save", save, "--save-interval", "4"]
    resume = train + ["--load", save]

    # Killed inside megatron's save of iteration 8 (the one of iteration 4 completed).
    assert _kill_during_save(train, "writing", tmp_path) == reference["losses"]
    assert read_tracker(save) == 4
    names = sorted(os.listdir(save))
    assert names[0] == LOCK_FILENAME  # the killed run's lock, taken over by the next run
    names.remove(LOCK_FILENAME)
    assert names[0] == ITER4 and ITER8 not in names
    assert len([n for n in names if n.startswith(ITER8 + ".tmp-")]) == 1

    # Resumed from iteration 4, killed after renaming iteration 8 into place.
    assert _kill_during_save(resume, "tracker", tmp_path) == reference["losses"][4:]
    assert read_tracker(save) == 4  # iter_0000008 is complete, but not published
    assert ITER8 in os.listdir(save)

    # The tracker's checkpoint loads; the next save replaces iter_0000008 and cleans up.
    (losses, lines), = run_distributed(_pretrain_runs, 1, [(resume, None)])[0]
    assert losses == reference["losses"][4:]
    assert any("loaded checkpoint" in line and "iteration 4" in line for line in lines)
    assert read_tracker(save) == 8
    assert sorted(os.listdir(save)) == [ITER4, ITER8, "latest_checkpointed_iteration.txt"]


def _errors(rank, world_size, cases):
    """Run the driver once per case; return (exception type name, message) or the losses."""
    from megatron.core import parallel_state

    out = []
    for argv in cases:
        try:
            losses, _ = _pretrain(argv)
            out.append(("ok", losses))
        except Exception as err:  # noqa: BLE001 - inspected by the test
            parallel_state.destroy_model_parallel()
            out.append((type(err).__name__, str(err)))
    return out


@pytest.mark.parallel
def test_clear_errors(reference, tmp_path):
    good = os.path.join(reference["full"], ITER8)
    missing, empty = str(tmp_path / "missing"), str(tmp_path / "empty")
    os.mkdir(empty)

    def damaged(name, damage):
        root = tmp_path / name
        shutil.copytree(good, root / ITER8)
        (root / "latest_checkpointed_iteration.txt").write_text("8")
        return str(root), damage(root / ITER8)

    def truncate(path):
        target = sorted(path.glob("*.distcp"))[0]
        target.write_bytes(target.read_bytes()[:100])
        return str(target)

    def remove(name):
        def damage(path):
            (path / name).unlink()
            return str(path / name)
        return damage

    def scramble(path):  # same size, garbage content
        target = path / ".metadata"
        target.write_bytes(b"\0" * target.stat().st_size)
        return str(target)

    truncated, truncated_file = damaged("truncated", truncate)
    no_common, common_file = damaged("no_common", remove("common.pt"))
    no_meta, meta_file = damaged("no_meta", remove("wesar_checkpoint.json"))
    scrambled, _ = damaged("scrambled", scramble)
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "latest_checkpointed_iteration.txt").write_text("12")
    fresh = str(tmp_path / "fresh")

    results = run_distributed(_errors, 1, [
        ["--train-iters", "2", "--load", missing],
        ["--train-iters", "2", "--load", empty],
        ["--train-iters", "9", "--load", reference["full"], "--hidden-size", "32",
         "--num-layers", "4"],
        ["--train-iters", "9", "--load", truncated],
        ["--train-iters", "9", "--load", no_common],
        ["--train-iters", "9", "--load", no_meta],
        ["--train-iters", "9", "--load", scrambled],
        ["--train-iters", "2", "--load", str(dangling)],
        ["--train-iters", "2", "--load", fresh, "--save", fresh],
    ])[0]
    kinds = [kind for kind, _ in results]
    assert kinds == ["CheckpointError"] * 2 + ["CheckpointMismatchError"] + \
        ["CheckpointError"] * 5 + ["ok"], results
    messages = [message for _, message in results]
    assert f"checkpoint directory {missing} does not exist" in messages[0]
    assert empty in messages[1] and "latest_checkpointed_iteration.txt" in messages[1]
    assert "hidden_size: checkpoint 64, this model 32" in messages[2]
    assert "num_layers: checkpoint 2, this model 4" in messages[2]
    assert "ffn_hidden_size" not in messages[2]
    assert truncated_file in messages[3] and "100 bytes" in messages[3]
    assert common_file in messages[4] and "missing" in messages[4]
    assert meta_file in messages[5] and "missing" in messages[5]
    # scrambled in place: its SHA-256 names it before megatron reads it
    assert "is damaged" in messages[6] and scrambled in messages[6] and "SHA-256" in messages[6]
    assert "iteration 12" in messages[7] and "iter_0000012" in messages[7]
    assert len(results[8][1]) == 2  # --load == --save with nothing saved yet: fresh start
    assert sorted(os.listdir(fresh)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]


def test_tracker_and_stale_directories(tmp_path):
    from megatron_wesar.training import checkpointing as ckpt

    root = str(tmp_path)
    assert ckpt.read_tracker(root) is None
    ckpt._write_tracker(root, 12)
    assert ckpt.read_tracker(root) == 12
    assert os.listdir(root) == ["latest_checkpointed_iteration.txt"]
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("twelve")
    with pytest.raises(ckpt.CheckpointError, match="does not hold an iteration"):
        ckpt.read_tracker(root)
    # A crash between the two renames of a re-save: the old copy stands in.
    aside = tmp_path / "iter_0000012.old-0123abcd"
    aside.mkdir()
    (aside / ckpt.METADATA_FILENAME).write_text("{}")
    assert ckpt._resolve(root, 12) == str(aside)
    (tmp_path / "iter_0000012.tmp-89abcdef").mkdir()
    (tmp_path / "iter_0000012").mkdir()
    assert ckpt._resolve(root, 12) == str(tmp_path / "iter_0000012")
    ckpt._remove_stale(root)
    assert sorted(os.listdir(root)) == ["iter_0000012", "latest_checkpointed_iteration.txt"]
    # Publishing over an existing checkpoint of the same iteration.
    new = tmp_path / "iter_0000012.tmp-00000000"
    new.mkdir()
    (new / "marker").write_text("new")
    ckpt._publish(str(new), str(tmp_path / "iter_0000012"))
    assert (tmp_path / "iter_0000012" / "marker").read_text() == "new"
    assert sorted(os.listdir(root)) == ["iter_0000012", "latest_checkpointed_iteration.txt"]


def test_checkpoint_arguments():
    from megatron_wesar.training.arguments import CheckpointConfig, parse_pretrain_args

    args = parse_pretrain_args(TINY + ["--save", "/x", "--save-interval", "5", "--load", "/y"])
    assert (args.checkpoint.save, args.checkpoint.save_interval, args.checkpoint.load) == (
        "/x", 5, "/y")
    assert parse_pretrain_args(TINY).checkpoint == CheckpointConfig()
    with pytest.raises(SystemExit):
        parse_pretrain_args(TINY + ["--save", "/x", "--save-interval", "0"])
    with pytest.raises(SystemExit):
        parse_pretrain_args(TINY + ["--save-interval", "5"])


def test_a_checkpoint_with_one_gate_per_fused_linear_is_named_as_the_old_format():
    """A dist checkpoint of the format before one gate per matrix (one `linear_qkv.gate`) is
    refused with the old-format message, not as a list of missing keys."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_wesar.training import checkpointing

    prefix = "model.decoder.layers.self_attention.linear_qkv"
    mine = {part: ShardedTensor.from_rank_offsets(f"{prefix}.gate_{part}", torch.ones(1))
            for part in ("q", "k", "v")}
    saved = {f"{prefix}.gate": mock.Mock(global_shape=(1,))}
    with mock.patch.object(checkpointing.dist_checkpointing, "load_tensors_metadata",
                           return_value=saved):
        with pytest.raises(checkpointing.CheckpointMismatchError, match="old format with ONE gate"):
            checkpointing.check_tensor_shapes("/ckpt", mine)
