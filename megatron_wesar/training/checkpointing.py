"""Checkpoints of the training driver on megatron-core's dist_checkpointing: atomic, resumable.

Layout (Megatron-LM's)::

    DIR/latest_checkpointed_iteration.txt   iteration of the newest complete checkpoint
    DIR/iter_0000010/                       one checkpoint: dist_checkpointing's files
                                            (metadata.json, common.pt, .metadata, *.distcp)
                                            plus wesar_checkpoint.json (see below)

A checkpoint holds the model's sharded state dict (every WeSaR gate included: they are
replicated (1,)-tensors), the optimizer's (Adam moments, step; with the distributed optimizer in
the `dp_reshardable` format), the LR scheduler's state dict, the iteration and, per rank, the RNG
states. `wesar_checkpoint.json` records the model shape, the WeSaR settings, the parallel layout
and the size of every file of the checkpoint; `load_checkpoint` checks it before megatron reads
anything, so a checkpoint of another model or a damaged one fails with a message that says which
shapes differ or which file is missing or truncated.

Atomicity: every rank writes into a fresh sibling `iter_0000010.tmp-<nonce>`; after a barrier,
rank 0 fsyncs it, renames it into place (an existing checkpoint of the same iteration is first
renamed aside to `iter_0000010.old-<nonce>`, and used by `load_checkpoint` should the crash fall
between the two renames), and only then replaces the tracker file (temporary file, fsync,
os.replace). Killed at any moment, a save leaves the tracker pointing at the previous complete
checkpoint. Leftover `*.tmp-*` / `*.old-*` directories are ignored and removed by the next
successful save.

Resharding: model weights load into any TP/PP/DP layout (megatron reshards the sharded tensors).
The optimizer state follows the model across layouts with the plain (non-distributed) optimizer,
whose state is one sharded tensor per parameter; the distributed optimizer's `dp_reshardable`
state loads into the same TP x PP layout with any DP size. Across any other change (TP or PP
with the distributed optimizer, distributed optimizer on or off, fp32 <-> bf16) the weights,
scheduler and iteration are loaded, the Adam moments start afresh, and a log line says so.
RNG states are restored when the layout is identical.

Integrity: `wesar_checkpoint.json` (format 2) lists every file with its size and SHA-256
(checkpoint_files.py); `load_checkpoint` verifies them, all ranks in parallel, before megatron
reads anything, and names a damaged file. It then stops, or with `fallback_to_previous` loads
the newest intact earlier checkpoint of the directory and says which one it skipped. The
training loop's counters (`Engine.training_state`: data offset, rewinds, skipped steps) travel
with the checkpoint.

Resumed LR schedule: settings that differ from the checkpoint's (peak / min LR, warm-up, decay)
are refused unless the scheduler was built with Megatron-LM's `override_opt_param_scheduler`
(this run's win) or `use_checkpoint_opt_param_scheduler` (the checkpoint's win);
`schedule_in_effect` gives the settings the run then uses.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from dataclasses import asdict
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from ..compat.megatron_core import (
    distributed_optimizer_steps,
    prime_distributed_optimizer_state,
    restore_distributed_optimizer_steps,
)
from ..coordination import agree, on_rank0
from ..layers import old_gate_format_error
from .checkpoint_files import build_manifest, list_files, verify_manifest

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "TRACKER_FILENAME",
    "METADATA_FILENAME",
    "checkpoint_path",
    "read_tracker",
    "save_checkpoint",
    "load_checkpoint",
    "schedule_in_effect",
]

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
METADATA_FILENAME = "wesar_checkpoint.json"
FORMAT_NAME = "megatron_wesar.checkpoint"
FORMAT_VERSION = 2  # 2: files with SHA-256 and training_state; 1: file sizes only
DISTRIB_OPTIM_SHARDING = "dp_reshardable"

_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_STALE_DIR = re.compile(r"^iter_\d{7,}\.(tmp|old)-[0-9a-f]+$")

Log = Optional[Callable[[str], None]]


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, has no tracker, or is incomplete or unreadable."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for a model of another shape."""


# --------------------------------------------------------------------------------------------
# paths and the tracker


def checkpoint_path(directory: str, iteration: int) -> str:
    """`directory/iter_0000010`: where the checkpoint of `iteration` lives."""
    return os.path.join(directory, f"iter_{iteration:07d}")


def read_tracker(directory: str) -> int | None:
    """The iteration named by `directory`'s tracker file; None when there is no tracker.

    Raises CheckpointError when the tracker exists but does not hold an iteration number.
    """
    path = os.path.join(directory, TRACKER_FILENAME)
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(
            f"checkpoint tracker {path} does not hold an iteration: {text!r}") from None
    if iteration < 0:
        raise CheckpointError(f"checkpoint tracker {path} holds a negative iteration {iteration}")
    return iteration


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _write_tracker(directory: str, iteration: int) -> None:
    """Point the tracker at `iteration` atomically (temporary file, fsync, os.replace)."""
    path = os.path.join(directory, TRACKER_FILENAME)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(directory)


def _publish(tmp: str, final: str) -> None:
    """Rename the complete checkpoint `tmp` to `final` (an existing `final` is moved aside first,
    because a directory cannot replace a non-empty one)."""
    aside = None
    if os.path.lexists(final):
        aside = f"{final}.old-{uuid.uuid4().hex[:12]}"
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_path(os.path.dirname(final))
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _remove_stale(directory: str) -> None:
    """Remove the `iter_*.tmp-*` / `iter_*.old-*` leftovers of interrupted saves."""
    for name in os.listdir(directory):
        if _STALE_DIR.match(name):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        elif name.startswith(TRACKER_FILENAME + ".tmp-"):
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass


def _resolve(directory: str, iteration: int) -> str:
    """The directory of checkpoint `iteration`, or the copy a crash between the two renames of
    a re-save left aside."""
    final = checkpoint_path(directory, iteration)
    if os.path.isdir(final):
        return final
    base = os.path.basename(final)
    aside = sorted(n for n in os.listdir(directory) if n.startswith(base + ".old-"))
    for name in aside:
        candidate = os.path.join(directory, name)
        if os.path.isfile(os.path.join(candidate, METADATA_FILENAME)):
            return candidate
    raise CheckpointError(
        f"the tracker {os.path.join(directory, TRACKER_FILENAME)} names iteration {iteration}, "
        f"but the checkpoint {final} does not exist"
    )


# --------------------------------------------------------------------------------------------
# what a checkpoint describes


def _optimizer_config(optimizer):
    chained = getattr(optimizer, "chained_optimizers", None)
    return (chained[0] if chained else optimizer).config


def model_description(engine) -> dict:
    """Shape-determining settings of `engine`'s model (equal on every rank)."""
    config, module = engine.config, engine.module
    wesar = module.wesar
    return {
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.ffn_hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_query_groups": config.num_query_groups or config.num_attention_heads,
        "kv_channels": config.kv_channels,
        "gated_linear_unit": bool(config.gated_linear_unit),
        "normalization": config.normalization,
        "add_bias_linear": bool(config.add_bias_linear),
        "vocab_size": module.vocab_size,
        "max_sequence_length": module.max_sequence_length,
        "position_embedding_type": module.position_embedding_type,
        "share_embeddings_and_output_weights": bool(module.share_embeddings_and_output_weights),
        "wesar": bool(wesar.enabled),
        "wesar_gate_embedding": bool(wesar.enabled and wesar.gate_embedding),
        "wesar_gate_output_layer": bool(wesar.enabled and wesar.gate_output_layer),
    }


def layout_description(engine) -> dict:
    """This run's parallel layout and precision (what decides whether optimizer state and RNG
    states can be loaded as they are)."""
    optimizer_config = _optimizer_config(engine.optimizer)
    distributed = bool(optimizer_config.use_distributed_optimizer)
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "world_size": dist.get_world_size(),
        "sequence_parallel": bool(engine.config.sequence_parallel),
        "params_dtype": str(engine.config.params_dtype).replace("torch.", ""),
        "use_distributed_optimizer": distributed,
        "distrib_optim_sharding_type": DISTRIB_OPTIM_SHARDING if distributed else None,
    }


def _sharding_metadata(engine) -> dict:
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if _optimizer_config(engine.optimizer).use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = DISTRIB_OPTIM_SHARDING
    return metadata


def _model_keys(engine) -> list[str]:
    return ["model"] if len(engine.model) == 1 else [f"model{i}" for i in range(len(engine.model))]


def _model_sharded_state_dict(engine, metadata: dict) -> dict:
    return {
        key: chunk.module.sharded_state_dict(metadata=dict(metadata))
        for key, chunk in zip(_model_keys(engine), engine.model)
    }


def _rng_state() -> dict:
    tracker = tensor_parallel.get_cuda_rng_tracker()
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {k: v.clone() for k, v in tracker.get_states().items()},
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(data) -> ShardedObject:
    """This rank's RNG states, one shard per (pp, tp, dp) rank."""
    shape = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", data, shape, offset, replica_id=0)


def _say(log: Log, message: str) -> None:
    if log is not None and dist.get_rank() == 0:
        log(message)


# --------------------------------------------------------------------------------------------
# save


def save_checkpoint(engine, iteration: int, directory: str, log: Log = print) -> str:
    """Save `engine` (model, optimizer, scheduler, RNG) at `iteration` to `directory`.

    Collective: every rank calls it. Writes `directory/iter_<iteration:07d>/` atomically, then
    points `directory/latest_checkpointed_iteration.txt` at it; returns the checkpoint path.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    directory = os.path.abspath(directory)
    final = checkpoint_path(directory, iteration)

    def make_tmp():
        os.makedirs(directory, exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
        os.mkdir(tmp)
        return tmp

    tmp = on_rank0(make_tmp)

    metadata = _sharding_metadata(engine)
    state = _model_sharded_state_dict(engine, metadata)
    state["optimizer"] = engine.optimizer.sharded_state_dict(state, metadata=metadata)
    state["opt_param_scheduler"] = engine.scheduler.state_dict()
    state["iteration"] = iteration
    state["checkpoint_format"] = FORMAT_VERSION
    state["rng_state"] = _rng_sharded_object(_rng_state())
    state["training_state"] = dict(engine.training_state)
    dist_checkpointing.save(state, tmp, content_metadata={"format": FORMAT_NAME})
    # dist_checkpointing.save returns after a barrier: every rank's files are written.
    manifest = build_manifest(tmp, list_files(tmp))

    description = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "iteration": iteration,
        "model": model_description(engine),
        "layout": layout_description(engine),
        "wesar_config": asdict(engine.module.wesar),
    }

    def finish():
        for name in manifest:
            _fsync_path(os.path.join(tmp, name))
        description["files"] = dict(sorted(manifest.items()))
        meta_path = os.path.join(tmp, METADATA_FILENAME)
        with open(meta_path, "w") as f:
            json.dump(description, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        _publish(tmp, final)
        _write_tracker(directory, iteration)
        _remove_stale(directory)

    on_rank0(finish)
    _say(log, f"saved checkpoint at iteration {iteration} to {final}")
    return final


# --------------------------------------------------------------------------------------------
# load


def _read_description(path: str) -> dict:
    """Read and check `path`'s wesar_checkpoint.json and the files it lists (rank 0)."""
    meta_path = os.path.join(path, METADATA_FILENAME)
    if not os.path.isfile(meta_path):
        raise CheckpointError(
            f"checkpoint {path} is incomplete or not a megatron_wesar checkpoint: "
            f"{meta_path} is missing"
        )
    try:
        with open(meta_path) as f:
            description = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint metadata {meta_path} is unreadable: {err}") from err
    if not isinstance(description, dict) or description.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_path} is not a megatron_wesar checkpoint description")
    if description.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {description.get('version')}; this "
            f"megatron_wesar reads versions up to {FORMAT_VERSION}"
        )
    return description


def checkpoint_candidates(directory: str, iteration: int | None, missing_ok: bool):
    """[(checkpoint path, its iteration or None)] to load, in order: the one asked for (the
    tracker's, `iteration`'s, or `directory` itself when it is one checkpoint), then the older
    iter_*/ of the directory, newest first (for the fallback). None when `missing_ok` and
    nothing is saved."""
    if not os.path.isdir(directory):
        if missing_ok:
            return None
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if iteration is None and os.path.isfile(os.path.join(directory, METADATA_FILENAME)):
        return [(directory, None)]
    if iteration is None:
        iteration = read_tracker(directory)
        if iteration is None:
            if missing_ok:
                return None
            raise CheckpointError(
                f"no checkpoint to load in {directory}: it has no {TRACKER_FILENAME} "
                "(nothing was saved there, or the first save did not complete)"
            )
    older = sorted((int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(directory))
                    if m and int(m.group(1)) < iteration), reverse=True)
    return [(_resolve(directory, iteration), iteration)] + [
        (checkpoint_path(directory, i), i) for i in older]


def _open_verified(path: str, iteration: int | None) -> dict:
    """The description of checkpoint `path` once every file it lists is verified (collective);
    CheckpointError naming what is damaged."""
    def read():
        description = _read_description(path)
        if iteration is not None and description.get("iteration") != iteration:
            raise CheckpointError(f"checkpoint {path} holds iteration "
                                  f"{description.get('iteration')}, expected {iteration}")
        return description

    description = on_rank0(read)
    problems = verify_manifest(path, description.get("files", {}))
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged: " + "; ".join(problems))
    return description


def first_intact(candidates: list, fallback_to_previous: bool, log: Log) -> tuple[str, dict]:
    """(path, description) of the first intact candidate: the first one, or with
    `fallback_to_previous` the newest intact one (each damaged one named in the log)."""
    for index, (path, iteration) in enumerate(candidates):
        try:
            return path, _open_verified(path, iteration)
        except CheckpointError as err:
            if not fallback_to_previous or index == len(candidates) - 1:
                if len(candidates) > 1 and not fallback_to_previous:
                    raise CheckpointError(
                        f"{err}. Earlier checkpoints exist in {os.path.dirname(path)}: pass "
                        "--load-fallback-to-previous to load the newest intact one") from err
                raise
            _say(log, f"WARNING: {err}; falling back to the previous checkpoint")
    raise AssertionError("unreachable: no candidates")


def _check_model(path: str, description: dict, engine) -> None:
    """Raise CheckpointMismatchError naming every shape setting that differs."""
    saved, mine = description.get("model", {}), model_description(engine)
    diffs = [
        f"{key}: checkpoint {saved.get(key)!r}, this model {value!r}"
        for key, value in mine.items()
        if saved.get(key) != value
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for a model of another shape: " + "; ".join(diffs)
        )


# why a key of this model can be missing from an older WeSaR checkpoint
_MISSING_HINTS = {
    "embedding.position_embeddings": " (saved before the learned position table had a gate "
    "of its own: the same model has that gate at 1.0)",
}


def check_tensor_shapes(path: str, model_state: dict) -> None:
    """Compare the global shapes of the model's sharded tensors with the checkpoint's
    (catches shape differences the description does not name)."""
    saved = dist_checkpointing.load_tensors_metadata(path)
    problems, mine = [], set()
    stack = [model_state]
    while stack:
        node = stack.pop()
        values = node.values() if isinstance(node, dict) else node
        for value in values:
            if isinstance(value, (dict, list, tuple)):
                stack.append(value)
            elif isinstance(value, ShardedTensor):
                mine.add(value.key)
                if value.key not in saved:
                    problems.append(f"{value.key}: missing from the checkpoint"
                                    + _MISSING_HINTS.get(value.key.rpartition(".")[0], ""))
                elif tuple(saved[value.key].global_shape) != tuple(value.global_shape):
                    problems.append(
                        f"{value.key}: checkpoint {tuple(saved[value.key].global_shape)}, "
                        f"this model {tuple(value.global_shape)}"
                    )
    for key in saved:  # one gate for a fused linear: the format before one gate per matrix
        new = sorted(k for k in mine if k.startswith(key + "_"))
        if key.endswith(".gate") and key not in mine and new:
            raise CheckpointMismatchError(str(old_gate_format_error(key, new)))
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit this model: " + "; ".join(sorted(problems)[:10])
            + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
        )


def _optimizer_loadable(saved: dict, mine: dict) -> tuple[bool, str]:
    """Whether the checkpoint's optimizer state can be loaded into this layout, and why not."""
    if saved.get("params_dtype") != mine["params_dtype"]:
        return False, f"params dtype {saved.get('params_dtype')} -> {mine['params_dtype']}"
    if bool(saved.get("use_distributed_optimizer")) != mine["use_distributed_optimizer"]:
        return False, (
            "distributed optimizer "
            f"{'on' if saved.get('use_distributed_optimizer') else 'off'} -> "
            f"{'on' if mine['use_distributed_optimizer'] else 'off'}"
        )
    if mine["use_distributed_optimizer"]:
        if saved.get("distrib_optim_sharding_type") != mine["distrib_optim_sharding_type"]:
            return False, f"distributed-optimizer format {saved.get('distrib_optim_sharding_type')}"
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if saved.get(key) != mine[key]:
                return False, (
                    f"{key} {saved.get(key)} -> {mine[key]} (the distributed optimizer's "
                    f"{DISTRIB_OPTIM_SHARDING} state reshards over data-parallel ranks only)"
                )
    return True, ""


_SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
                  "start_wd", "end_wd", "wd_incr_steps", "wd_incr_style")


def _schedule_differences(scheduler, saved: dict) -> list[str]:
    """'name checkpoint X, this run Y' for each LR / weight-decay schedule setting that differs."""
    return [
        f"{key}: checkpoint {saved[key]!r}, this run {getattr(scheduler, key)!r}"
        for key in _SCHEDULE_KEYS
        if key in saved and hasattr(scheduler, key) and getattr(scheduler, key) != saved[key]
    ]


def _check_schedule(path: str, scheduler) -> list[str]:
    """The schedule settings that differ from checkpoint `path`'s; CheckpointMismatchError
    when some differ and the scheduler neither overrides nor uses the checkpoint's (Megatron-LM
    asserts there)."""
    saved = on_rank0(
        lambda: dist_checkpointing.load_common_state_dict(path)["opt_param_scheduler"])
    diffs = _schedule_differences(scheduler, saved)
    if diffs and not (scheduler.override_opt_param_scheduler
                      or scheduler.use_checkpoint_opt_param_scheduler):
        raise CheckpointMismatchError(
            f"the LR schedule differs from checkpoint {path}'s ({'; '.join(diffs)}): pass "
            "--override-opt_param-scheduler to use this run's values or "
            "--use-checkpoint-opt_param-scheduler to keep the checkpoint's")
    return diffs


def schedule_in_effect(scheduler) -> dict:
    """The LR / weight-decay schedule settings the scheduler runs with (after a resume, the
    checkpoint's where it used them)."""
    return {key: getattr(scheduler, key) for key in _SCHEDULE_KEYS if hasattr(scheduler, key)}


def _same_ranks(saved: dict, mine: dict) -> bool:
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size")
    return all(saved.get(k) == mine[k] for k in keys)


def load_checkpoint(engine, directory: str, iteration: int | None = None, *,
                    missing_ok: bool = False, fallback_to_previous: bool = False,
                    log: Log = print) -> int:
    """Load a checkpoint into `engine`; return its iteration (0 when nothing was loaded).

    Collective: every rank calls it. `directory` is a save directory (the tracker's iteration,
    or `iteration`, is loaded) or one checkpoint `iter_*/` itself. Loads the model always (any
    TP/PP layout), the optimizer state where the layout allows it (see the module docstring;
    otherwise a log line says that the Adam moments start afresh), the scheduler and, with an
    identical layout, the RNG states, and `engine.training_state`.

    Raises CheckpointError for a missing directory, no tracker (unless `missing_ok`, which
    returns 0) or a missing, truncated, corrupted or unreadable checkpoint (naming the file;
    with `fallback_to_previous` the newest intact earlier checkpoint is loaded instead);
    CheckpointMismatchError (a ValueError) for a checkpoint of a model of another shape, or an
    LR schedule that differs while the scheduler neither overrides nor uses the checkpoint's.
    """
    directory = os.path.abspath(directory)
    candidates = on_rank0(lambda: checkpoint_candidates(directory, iteration, missing_ok))
    if candidates is None:
        _say(log, f"no checkpoint in {directory} yet: starting from iteration 0")
        return 0
    path, description = first_intact(candidates, fallback_to_previous, log)
    _check_model(path, description, engine)
    schedule_diffs = _check_schedule(path, engine.scheduler)

    metadata = _sharding_metadata(engine)
    model_state = _model_sharded_state_dict(engine, metadata)
    error = None
    try:
        check_tensor_shapes(path, model_state)
    except CheckpointMismatchError as err:
        error = err
    except Exception as err:  # noqa: BLE001 - every rank raises below
        error = CheckpointError(f"failed to read checkpoint {path}: {type(err).__name__}: {err}")
    agree(error)

    saved_layout, my_layout = description.get("layout", {}), layout_description(engine)
    load_optimizer, why_not = _optimizer_loadable(saved_layout, my_layout)
    load_rng = _same_ranks(saved_layout, my_layout)

    state = dict(model_state)
    if load_optimizer:
        prime_distributed_optimizer_state(engine.optimizer)
        with torch.no_grad():  # the optimizer initialises its state in place
            state["optimizer"] = engine.optimizer.sharded_state_dict(
                model_state, is_loading=True, metadata=metadata
            )
    if load_rng:
        state["rng_state"] = _rng_sharded_object(None)

    error, loaded = None, None
    try:
        with torch.no_grad():
            loaded = dist_checkpointing.load(state, path)
    except Exception as err:  # noqa: BLE001 - re-raised with the path
        error = CheckpointError(f"failed to read checkpoint {path}: {type(err).__name__}: {err}")
        error.__cause__ = err
    agree(error)

    for key, chunk in zip(_model_keys(engine), engine.model):
        chunk.module.load_state_dict(loaded[key], strict=True)
    if load_optimizer:
        steps = distributed_optimizer_steps(engine.optimizer, loaded["optimizer"])
        with torch.no_grad():
            engine.optimizer.load_state_dict(loaded["optimizer"])
        restore_distributed_optimizer_steps(engine.optimizer, steps)
    else:
        engine.optimizer.reload_model_params()  # main (fp32) params from the loaded weights
    engine.scheduler.num_steps = 0  # megatron's load_state_dict adds the saved steps
    engine.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    engine.training_state.update(loaded.get("training_state", {}))
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    loaded_iteration = int(loaded["iteration"])

    layout = (f"TP{saved_layout.get('tensor_model_parallel_size')} "
              f"PP{saved_layout.get('pipeline_model_parallel_size')} "
              f"DP{saved_layout.get('data_parallel_size')}")
    _say(log, f"loaded checkpoint {path} (iteration {loaded_iteration}, written with {layout})")
    if schedule_diffs:
        whose = ("this run's values override the checkpoint's"
                 if engine.scheduler.override_opt_param_scheduler
                 else "the checkpoint's values are used")
        _say(log, f"LR schedule differs from the checkpoint's ({'; '.join(schedule_diffs)}): "
                  f"{whose}")
    if not load_optimizer:
        _say(log, f"WARNING: optimizer state of {path} NOT loaded ({why_not}): model weights, LR "
                  "schedule and iteration resumed; Adam moments start from zero")
    elif not load_rng:
        _say(log, f"optimizer state resharded from {layout}; RNG states not restored (the "
                  "layout differs)")
    return loaded_iteration
