"""`megatron-wesar study`: methods x peak learning rates x seeds through the pretraining driver.

All runs share ONE process group: the command runs under torchrun (or starts it, like the demo)
and every rank calls `pretrain(config, log=...)` once per run, sequentially, with the run's
PretrainConfig: the study preset's overrides, the method's, then its LR, seed and metrics file.
pretrain sets up and tears down megatron's model-parallel state itself; between runs the
runner destroys the process groups the run left behind (megatron's teardown keeps them, and
each further run got slower) and collects garbage. Each run writes
`DIR/runs/<method>_lr<lr>_s<seed>/metrics.jsonl`
(the driver's --metrics-file) and `log.txt` (its progress lines); rank 0 draws a plain-text
progress bar over runs, then writes `DIR/summary.json` and renders `DIR/report.md`.

A run whose metrics file already holds a complete run with the same arguments is not trained
again (delete its folder, or pass --rerun, to retrain it); a study can thus be resumed.

A run that raises is recorded (its traceback in the run's `error.txt`, its message in
study.json's `failed_runs`) and the study goes on; a run that ends before its last step without
an error was stopped by an exit signal (the driver ends the run after the current step), and the
study stops there. Either way the summary and the report are written, and the command exits
non-zero. The ranks never outlive the study's top process (`launch`).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from functools import partial

from ..compat.megatron_core import destroy_process_groups_since, process_groups
from ..coordination import atomic_write_json, broadcast_from_rank0, gather_objects
from ..options import to_argv
from ..training.arguments import PretrainConfig, parse_overrides, pretrain_config
from .launch import die_with_parent, launch
from .summary import format_lr, load_metrics, run_name, write_summary


@dataclass(frozen=True)
class Method:
    """A method of the study: the PretrainConfig overrides ({dotted path: value}) that select
    it."""

    overrides: dict
    baseline: bool
    description: str


def _baseline(backbone: str) -> dict:
    return {"wesar.enabled": False, "wesar.backbone": backbone}


METHODS = {
    "he": Method(_baseline("he"), True, "He init (the paper's default backbone), no gates"),
    "small": Method(_baseline("small"), True, "Small init (Nguyen & Salazar 2019), no gates"),
    "megatron": Method(_baseline("megatron"), True,
                       "Megatron default init (std 0.02, residual outputs / sqrt(2N)), no gates"),
    "scaled-embed": Method(
        {**_baseline("he"), "model.embedding_variant": "scaled-embed"}, True,
        "Scaled Embed (Takase et al. 2023): He init, word embedding std sqrt(2/(5d)) and its "
        "output x sqrt(d), no gates"),
    "embed-ln": Method(
        {**_baseline("he"), "model.embedding_variant": "embed-ln"}, True,
        "Embed LN (Le Scao et al. 2022): He init, a LayerNorm right after the embedding, no "
        "gates"),
    "wesar": Method({"wesar.enabled": True, "wesar.backbone": "he"}, False,
                    "WeSaR on the He backbone: one common sigma (sigma^2 = 4e-5), trainable gates"),
}


@dataclass(frozen=True)
class StudyPreset:
    """A named study: the model preset and PretrainConfig overrides every run shares, and the
    grid."""

    model_preset: str
    overrides: dict
    methods: tuple
    lrs: tuple
    seeds: tuple
    nproc: int
    description: str
    rationale: str = ""


STUDY_PRESETS = {
    # `make demo`: must finish in <= 10 minutes on 2 CPU cores including start-up.
    "tiny": StudyPreset(
        model_preset="tiny",
        overrides={
            "parallel.tensor_model_parallel_size": 2, "model.seq_length": 64,
            "training.micro_batch_size": 16, "training.global_batch_size": 16,
            "training.train_iters": 100, "training.lr_warmup_iters": 10,
            "logging.log_interval": 10, "logging.eval_interval": 20, "logging.eval_iters": 4,
        },
        methods=("he", "small", "megatron", "wesar"),
        lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
        seeds=(1,),
        nproc=2,
        description=(
            "The tiny preset's model (4 layers, d=128, 4 heads, d_ff=512, GeLU, tied embeddings, "
            "byte vocabulary, ~0.9M parameters) at TP=2 (no sequence parallelism) on 2 CPU "
            "ranks; sequence 64, global batch 16 (one microbatch), 100 steps (10 warm-up, "
            "cosine to 0.1x), AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, fp32; validation "
            "every 20 steps on the same 4 held-out batches (64 sequences, 4096 tokens); "
            "monitors every 10 steps; 1 seed"
        ),
        rationale=(
            "Sized for `make demo`: at most 10 minutes on 2 CPU cores, start-up included, target "
            "7. 4 methods x 5 peak learning rates x 1 seed = 20 runs. The driver makes ~4-5 "
            "steps/s at the tiny preset's own shape (sequence 128) at TP=2 on 2 cores, so its "
            "200 steps do not fit 20 times; at sequence 64 with one microbatch per step a "
            "100-step run with its 5 evaluations took 13-16 s on a lightly loaded machine "
            "(about 5 minutes for the whole demo) and up to ~25 s while other jobs loaded it "
            "(about 7 minutes). Sequence parallelism (twice the collectives per layer) is left "
            "off. 100 steps "
            "are enough for the update-ratio pattern, which shows within the first tens of "
            "steps; they are far too few for converged losses, so the losses rank the methods "
            "early in training only. The grid spans 1e-4..1e-2 in half-decades because WeSaR's "
            "uniform update ratio is ~lr/sigma and the baselines' ~lr/sigma_role "
            "(sigma_role/sigma ~ 14 at d=128), so WeSaR's best LR is expected ~10x below the "
            "baselines'; every method is compared at its own best LR of this shared grid (a "
            "trial at 100 steps over 1e-4..3e-2 put every optimum between 3e-4 and 3e-3). "
            "With 100 steps the megatron and zscore spike rules (100-step windows) cannot fire, "
            "so the report also gives the largest rise of the training loss above its running "
            "minimum, which needs no window; at this scale the update ratios are the robust "
            "signal (docs/tiny-scale-findings.md)."
        ),
    ),
    # the setup of docs/tiny-scale-findings.md through the driver (hours on 2 CPU cores)
    "tiny-long": StudyPreset(
        model_preset="tiny",
        overrides={
            "parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True,
            "training.train_iters": 800, "training.lr_warmup_iters": 40,
            "logging.log_interval": 10, "logging.eval_interval": 100, "logging.eval_iters": 8,
        },
        methods=("he", "small", "megatron", "scaled-embed", "embed-ln", "wesar"),
        lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
        seeds=(1, 2),
        nproc=2,
        description=(
            "The tiny preset's model at sequence 128, global batch 16, 800 steps (40 warm-up, "
            "cosine to 0.1x), TP=2 with sequence parallelism, 6 learning rates, 2 seeds"
        ),
        rationale="The longer CPU study of docs/tiny-scale-findings.md, run through the driver.",
    ),
}


@dataclass
class StudyConfig:
    """Everything that defines a study; written to DIR/study.json."""

    out_dir: str
    preset: str | None
    model_preset: str
    overrides: dict  # PretrainConfig overrides every run shares ({dotted path: value})
    methods: list
    lrs: list
    seeds: list
    nproc: int
    description: str = ""
    rationale: str = ""
    rerun: bool = False
    report: bool = True

    def plan(self) -> list:
        """(method, lr, seed) of every run, seed-major then LR then method, so that each
        learning rate's comparison completes before the next one starts."""
        return [(m, lr, s) for s in self.seeds for lr in self.lrs for m in self.methods]

    def run_config(self, method: str, lr: float, seed: int) -> PretrainConfig:
        """The PretrainConfig of one run (ValueError when the overrides are invalid)."""
        return pretrain_config({
            **self.overrides, **METHODS[method].overrides, "training.lr": float(lr),
            "training.seed": seed, "logging.metrics_file": self.metrics_path(method, lr, seed),
        }, self.model_preset)

    def run_configs(self, world_size: int) -> dict:
        """{(method, lr, seed): PretrainConfig} of the plan; ValueError when an override is
        invalid or a layout does not fit `world_size` ranks."""
        configs = {key: self.run_config(*key) for key in self.plan()}
        for run_config in configs.values():
            run_config.data_parallel_size(world_size)
        return configs

    def pretrain_args(self) -> list:
        """The `pretrain` flags every run shares (as the report shows them)."""
        return ["--preset", self.model_preset, *to_argv(PretrainConfig, self.overrides)]

    def run_dir(self, method: str, lr: float, seed: int) -> str:
        return os.path.join(self.out_dir, "runs", run_name(method, lr, seed))

    def metrics_path(self, method: str, lr: float, seed: int) -> str:
        return os.path.join(self.run_dir(method, lr, seed), "metrics.jsonl")

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["pretrain_args"] = self.pretrain_args()
        out["method_descriptions"] = {m: METHODS[m].description for m in self.methods}
        out["baselines"] = [m for m in self.methods if METHODS[m].baseline]
        return out


# --------------------------------------------------------------------------- arguments


def _floats(text: str) -> list:
    return [float(x) for x in text.replace(",", " ").split()]


def _ints(text: str) -> list:
    return [int(x) for x in text.replace(",", " ").split()]


def _names(text: str) -> list:
    names = [x for x in text.replace(",", " ").split()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-wesar study",
        description="Train methods x peak learning rates x seeds with the driver and report. "
                    "Arguments after `--` go to every run's `pretrain` (they override the "
                    "preset's).",
    )
    p.add_argument("--preset", choices=sorted(STUDY_PRESETS), default="tiny")
    p.add_argument("--dir", default=None, help="study folder (default: out/study-<preset>)")
    p.add_argument("--methods", type=_names, default=None,
                   help=f"comma-separated, from {sorted(METHODS)}")
    p.add_argument("--lrs", type=_floats, default=None, help="comma-separated peak LRs")
    p.add_argument("--seeds", type=_ints, default=None, help="comma-separated seeds")
    p.add_argument("--train-iters", type=int, default=None, help="override the preset's steps")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks to start when not already under torchrun (default: the preset's)")
    p.add_argument("--rerun", action="store_true",
                   help="train every run again even where a complete metrics file exists")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="write summary.json only (render later with `megatron-wesar report`)")
    return p


def parse_study_args(argv=None) -> StudyConfig:
    """Parse `megatron-wesar study` arguments into a StudyConfig."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ns = build_parser().parse_args(argv)
    preset = STUDY_PRESETS[ns.preset]
    overrides = dict(preset.overrides)
    if ns.train_iters is not None:
        overrides["training.train_iters"] = ns.train_iters
    model_preset, extra_overrides = parse_overrides(extra)
    overrides.update(extra_overrides)
    return StudyConfig(
        out_dir=os.path.abspath(ns.dir or os.path.join("out", f"study-{ns.preset}")),
        preset=ns.preset,
        model_preset=model_preset or preset.model_preset,
        overrides=overrides,
        methods=ns.methods or list(preset.methods),
        lrs=ns.lrs or list(preset.lrs),
        seeds=ns.seeds or list(preset.seeds),
        nproc=ns.nproc_per_node or preset.nproc,
        description=preset.description if not extra and ns.train_iters is None else
        preset.description + f" (overridden: {' '.join(extra)}"
        + (f" --train-iters {ns.train_iters}" if ns.train_iters is not None else "") + ")",
        rationale=preset.rationale,
        rerun=ns.rerun,
        report=ns.report,
    )


# --------------------------------------------------------------------------- running


def progress_bar(done: int, total: int, width: int = 10) -> str:
    filled = round(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def is_complete(path: str, run_config: PretrainConfig) -> bool:
    """Whether `path` holds a finished run of exactly this configuration."""
    if not os.path.isfile(path):
        return False
    try:
        metrics = load_metrics(path)
    except (OSError, ValueError):
        return False
    if metrics.header != json.loads(json.dumps(dataclasses.asdict(run_config))):
        return False
    if not metrics.steps or metrics.steps[-1]["iteration"] != run_config.training.train_iters:
        return False
    return not (run_config.logging.eval_interval and not metrics.evals)


def _stopped_early(path: str, train_iters: int) -> bool:
    """Whether the metrics file of a run that returned ends before its last step."""
    try:
        steps = load_metrics(path).steps
    except (OSError, ValueError):
        return True
    return not steps or steps[-1]["iteration"] < train_iters


def failure_message(err: BaseException) -> str:
    """The whole message of `err` (every line), where it was raised, and what it was raised
    from: what a study records of a failed run (the traceback goes to its error.txt)."""
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        frames = traceback.extract_tb(err.__traceback__)
        where = f"\n  at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in " \
                f"{frames[-1].name}" if frames else ""
        parts.append("".join(traceback.format_exception_only(type(err), err)).rstrip() + where)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return "\ncaused by: ".join(parts)


@dataclass
class StudyOutcome:
    """What a study ended with, on every rank (the summary on rank 0 only)."""

    summary: dict | None
    failed_runs: dict  # {run name: failure_message}
    stopped_during: str | None  # the run an exit signal stopped, the study with it

    @property
    def exit_code(self) -> int:
        """0 when every run of the plan finished, else 1."""
        return 1 if self.failed_runs or self.stopped_during else 0


def _last_valid(path: str):
    try:
        metrics = load_metrics(path)
    except (OSError, ValueError):
        return None
    return metrics.evals[-1][1] if metrics.evals else None


def run_study(config: StudyConfig, log=print) -> StudyOutcome:
    """Train every run of the study on the current process group (every rank calls this) until
    the plan ends or an exit signal stops a run; rank 0 writes summary.json and the report."""
    import torch.distributed as dist

    from ..training.pretrain import init_distributed, pretrain

    init_distributed()
    rank = dist.get_rank()
    plan = config.plan()
    run_configs = config.run_configs(dist.get_world_size())  # all valid before any training
    if rank == 0:
        os.makedirs(os.path.join(config.out_dir, "runs"), exist_ok=True)
        atomic_write_json(os.path.join(config.out_dir, "study.json"), config.to_json())
        log(f"study: {len(config.methods)} methods x {len(config.lrs)} learning rates x "
            f"{len(config.seeds)} seed(s) = {len(plan)} runs on {dist.get_world_size()} rank(s) "
            f"-> {config.out_dir}")
    dist.barrier()
    start = time.perf_counter()
    timings, failures, stopped = {}, {}, None
    for index, key in enumerate(plan):
        method, lr, seed = key
        run_dir, metrics_path = config.run_dir(*key), config.metrics_path(*key)
        run_config = run_configs[key]
        skip = False
        if rank == 0:
            os.makedirs(run_dir, exist_ok=True)
            skip = not config.rerun and is_complete(metrics_path, run_config)
            if not skip:
                for name in ("metrics.jsonl", "error.txt", "log.txt"):
                    if os.path.exists(os.path.join(run_dir, name)):
                        os.remove(os.path.join(run_dir, name))
        skip = broadcast_from_rank0(skip)
        run_start = time.perf_counter()
        status = "kept"
        groups_before = process_groups()
        if not skip:
            status = "done"
            error = None
            log_file = open(os.path.join(run_dir, "log.txt"), "w") if rank == 0 else None
            try:
                pretrain(run_config, log=partial(print, file=log_file, flush=True)
                         if log_file else (lambda line: None))
            except Exception as err:  # noqa: BLE001 - a failed run is recorded, the study goes on
                error = (traceback.format_exc(), failure_message(err))
                _cleanup_parallel_state()
            finally:
                if log_file:
                    log_file.close()
            errors = [e for e in gather_objects(error) if e]
            if errors:
                status = "FAILED"
                failures[run_name(*key)] = errors[0][1]
                if rank == 0:
                    with open(os.path.join(run_dir, "error.txt"), "w") as f:
                        f.write(errors[0][0])
            elif broadcast_from_rank0(
                    rank == 0 and _stopped_early(metrics_path, run_config.training.train_iters)):
                status, stopped = "STOPPED", run_name(*key)
            destroy_process_groups_since(groups_before)
            gc.collect()
        dist.barrier()
        timings[run_name(*key)] = time.perf_counter() - run_start
        if rank == 0:
            elapsed = time.perf_counter() - start
            val = _last_valid(metrics_path)
            val_text = f"val={val:.3f}" if val is not None else "val=n/a"
            eta = elapsed / (index + 1) * (len(plan) - index - 1)
            log(f"{progress_bar(index + 1, len(plan))} {index + 1}/{len(plan)} {method} "
                f"lr={format_lr(lr)} seed={seed} {val_text} ({status}, "
                f"{timings[run_name(*key)]:.1f}s; elapsed {_duration(elapsed)}, "
                f"eta {_duration(eta)})")
        if stopped:
            break
    summary = None
    if rank == 0:
        wall = time.perf_counter() - start
        info = config.to_json()
        info.update(wall_time_s=wall, run_time_s=timings, failed_runs=failures,
                    stopped_during=stopped, world_size=dist.get_world_size())
        atomic_write_json(os.path.join(config.out_dir, "study.json"), info)
        summary = write_summary(config.out_dir, info)
        log(f"summary: {os.path.join(config.out_dir, 'summary.json')}")
        if config.report:
            from .report import render_report

            path = render_report(config.out_dir, summary)
            log(f"report: {path}")
        if stopped:
            log(f"study stopped during {stopped} (an exit signal); the same command resumes it")
        for name, message in failures.items():
            log(f"FAILED {name}: {message}")
        if failures:
            log(f"{len(failures)} of {len(plan)} runs failed (tracebacks in their error.txt)")
    dist.barrier()
    return StudyOutcome(summary, failures, stopped)


def _cleanup_parallel_state() -> None:
    """Tear down megatron's model-parallel state after a run that raised mid-way."""
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    except Exception:  # noqa: BLE001
        pass


def main(argv=None) -> int:
    """`megatron-wesar study`: under torchrun, or one rank, run here; else start torchrun. Exits
    2 on an invalid run configuration, 1 when a run failed or the study was stopped
    (StudyOutcome)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_study_args(argv)
    under_torchrun = "RANK" in os.environ
    try:  # before starting any rank
        config.run_configs(int(os.environ["WORLD_SIZE"]) if under_torchrun else config.nproc)
    except ValueError as err:
        print(f"megatron-wesar study: {err}", file=sys.stderr)
        return 2
    if not under_torchrun and config.nproc > 1:
        return launch(config.nproc, argv)
    if under_torchrun:
        die_with_parent()  # torchrun's agent: the ranks end with it
    import torch.distributed as dist

    from ..compat import enable_cpu_compat

    enable_cpu_compat()
    try:
        outcome = run_study(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return outcome.exit_code
