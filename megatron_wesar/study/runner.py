"""`megatron-wesar study`: methods x peak learning rates x seeds through the pretraining driver.

All runs share ONE process group: the command runs under torchrun (or starts it, like the demo)
and every rank calls `pretrain(parse_pretrain_args(argv), log=...)` once per run, sequentially.
pretrain sets up and tears down megatron's model-parallel state itself; between runs the
runner destroys the process groups the run left behind (megatron's teardown keeps them, and
each further run got slower) and collects garbage. Each run writes
`DIR/runs/<method>_lr<lr>_s<seed>/metrics.jsonl`
(the driver's --metrics-file) and `log.txt` (its progress lines); rank 0 draws a plain-text
progress bar over runs, then writes `DIR/summary.json` and renders `DIR/report.md`.

A run whose metrics file already holds a complete run with the same arguments is not trained
again (delete its folder, or pass --rerun, to retrain it); a study can thus be resumed.
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
from dataclasses import dataclass, field
from functools import partial

from ..compat.megatron_core import destroy_process_groups_since, process_groups
from ..coordination import atomic_write_json, broadcast_from_rank0, gather_objects
from .summary import format_lr, load_metrics, run_name, write_summary


@dataclass(frozen=True)
class Method:
    """A method of the study: the driver arguments that select it."""

    args: tuple
    baseline: bool
    description: str


METHODS = {
    "he": Method(("--no-wesar", "--init-method", "he"), True,
                 "He init (the paper's default backbone), no gates"),
    "small": Method(("--no-wesar", "--init-method", "small"), True,
                    "Small init (Nguyen & Salazar 2019), no gates"),
    "megatron": Method(("--no-wesar", "--init-method", "megatron"), True,
                       "Megatron default init (std 0.02, residual outputs / sqrt(2N)), no gates"),
    "wesar": Method(("--init-method", "he"), False,
                    "WeSaR on the He backbone: one common sigma (sigma^2 = 4e-5), trainable gates"),
}
# the paper's embedding-side baselines; the driver has no switch for them yet
SKIPPED_METHODS = {
    "scaled-embed": "Scaled Embed (embeddings x sqrt(d)): not implemented in the driver",
    "embed-ln": "Embed LN (LayerNorm after the embedding): not implemented in the driver",
}


@dataclass(frozen=True)
class StudyPreset:
    """A named study: the driver arguments every run shares, and the grid."""

    pretrain_args: tuple
    methods: tuple
    lrs: tuple
    seeds: tuple
    nproc: int
    description: str
    rationale: str = ""


STUDY_PRESETS = {
    # `make demo`: must finish in <= 10 minutes on 2 CPU cores including start-up.
    "tiny": StudyPreset(
        pretrain_args=(
            "--preset", "tiny", "--tensor-model-parallel-size", "2",
            "--seq-length", "64", "--micro-batch-size", "16", "--global-batch-size", "16",
            "--train-iters", "100", "--lr-warmup-iters", "10", "--log-interval", "10",
            "--eval-interval", "20", "--eval-iters", "4",
        ),
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
        pretrain_args=(
            "--preset", "tiny", "--tensor-model-parallel-size", "2", "--sequence-parallel",
            "--train-iters", "800", "--lr-warmup-iters", "40", "--log-interval", "10",
            "--eval-interval", "100", "--eval-iters", "8",
        ),
        methods=("he", "small", "megatron", "wesar"),
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
    pretrain_args: list
    methods: list
    lrs: list
    seeds: list
    nproc: int
    description: str = ""
    rationale: str = ""
    rerun: bool = False
    report: bool = True
    skipped_methods: dict = field(default_factory=lambda: dict(SKIPPED_METHODS))

    def plan(self) -> list:
        """(method, lr, seed) of every run, seed-major then LR then method, so that each
        learning rate's comparison completes before the next one starts."""
        return [(m, lr, s) for s in self.seeds for lr in self.lrs for m in self.methods]

    def run_argv(self, method: str, lr: float, seed: int) -> list:
        """The driver's argv of one run."""
        return [*self.pretrain_args, *METHODS[method].args, "--lr", repr(float(lr)),
                "--seed", str(seed), "--metrics-file", self.metrics_path(method, lr, seed)]

    def run_dir(self, method: str, lr: float, seed: int) -> str:
        return os.path.join(self.out_dir, "runs", run_name(method, lr, seed))

    def metrics_path(self, method: str, lr: float, seed: int) -> str:
        return os.path.join(self.run_dir(method, lr, seed), "metrics.jsonl")

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
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
        skipped = [n for n in unknown if n in SKIPPED_METHODS]
        if skipped:
            raise argparse.ArgumentTypeError(
                "; ".join(SKIPPED_METHODS[n] for n in skipped))
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
    pretrain_args = list(preset.pretrain_args)
    if ns.train_iters is not None:
        pretrain_args += ["--train-iters", str(ns.train_iters)]
    pretrain_args += extra
    return StudyConfig(
        out_dir=os.path.abspath(ns.dir or os.path.join("out", f"study-{ns.preset}")),
        preset=ns.preset,
        pretrain_args=pretrain_args,
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


def _args_dict(args) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(args)))


def is_complete(path: str, args) -> bool:
    """Whether `path` holds a finished run of exactly these driver arguments."""
    if not os.path.isfile(path):
        return False
    try:
        metrics = load_metrics(path)
    except (OSError, ValueError):
        return False
    expected = _args_dict(args)
    if not metrics.header or any(metrics.header.get(k) != v for k, v in expected.items()):
        return False
    if not metrics.steps or metrics.steps[-1]["iteration"] != args.train_iters:
        return False
    eval_interval = getattr(args, "eval_interval", None)
    if eval_interval and not metrics.evals:
        return False
    return True


def _last_valid(path: str):
    try:
        metrics = load_metrics(path)
    except (OSError, ValueError):
        return None
    return metrics.evals[-1][1] if metrics.evals else None


def run_study(config: StudyConfig, log=print) -> dict | None:
    """Train every run of the study on the current process group (every rank calls this);
    rank 0 writes summary.json and the report and returns the summary, other ranks None."""
    import torch.distributed as dist

    from ..training.arguments import parse_pretrain_args
    from ..training.pretrain import init_distributed, pretrain

    init_distributed()
    rank = dist.get_rank()
    plan = config.plan()
    # validate every run's arguments before training anything
    argvs = {key: config.run_argv(*key) for key in plan}
    parsed = {key: parse_pretrain_args(argv) for key, argv in argvs.items()}
    for args in parsed.values():
        args.data_parallel_size(dist.get_world_size())  # ValueError on an impossible layout
    if rank == 0:
        os.makedirs(os.path.join(config.out_dir, "runs"), exist_ok=True)
        atomic_write_json(os.path.join(config.out_dir, "study.json"), config.to_json())
        log(f"study: {len(config.methods)} methods x {len(config.lrs)} learning rates x "
            f"{len(config.seeds)} seed(s) = {len(plan)} runs on {dist.get_world_size()} rank(s) "
            f"-> {config.out_dir}")
        if config.skipped_methods:
            log("skipped: " + "; ".join(config.skipped_methods.values()))
    dist.barrier()
    start = time.perf_counter()
    timings, failures = {}, {}
    for index, key in enumerate(plan):
        method, lr, seed = key
        run_dir, metrics_path = config.run_dir(*key), config.metrics_path(*key)
        args = parsed[key]
        skip = False
        if rank == 0:
            os.makedirs(run_dir, exist_ok=True)
            skip = not config.rerun and is_complete(metrics_path, args)
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
                pretrain(args, log=partial(print, file=log_file, flush=True)
                         if log_file else (lambda line: None))
            except Exception:  # noqa: BLE001 - a failed run is recorded, the study goes on
                error = traceback.format_exc()
                _cleanup_parallel_state()
            finally:
                if log_file:
                    log_file.close()
            errors = [e for e in gather_objects(error) if e]
            if errors:
                status = "FAILED"
                failures[run_name(*key)] = errors[0].strip().splitlines()[-1]
                if rank == 0:
                    with open(os.path.join(run_dir, "error.txt"), "w") as f:
                        f.write(errors[0])
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
    summary = None
    if rank == 0:
        wall = time.perf_counter() - start
        info = config.to_json()
        info.update(wall_time_s=wall, run_time_s=timings, failed_runs=failures,
                    world_size=dist.get_world_size())
        atomic_write_json(os.path.join(config.out_dir, "study.json"), info)
        summary = write_summary(config.out_dir, info)
        log(f"summary: {os.path.join(config.out_dir, 'summary.json')}")
        if config.report and not summary["runs"]:
            log("no run wrote metrics: no report")
        elif config.report:
            from .report import render_report

            path = render_report(config.out_dir, summary)
            log(f"report: {path}")
    dist.barrier()
    return summary


def _cleanup_parallel_state() -> None:
    """Tear down megatron's model-parallel state after a run that raised mid-way."""
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    except Exception:  # noqa: BLE001
        pass


def main(argv=None) -> int:
    """`megatron-wesar study`: under torchrun, or one rank, run here; else start torchrun."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_study_args(argv)
    if "RANK" not in os.environ and config.nproc > 1:
        from torch.distributed.run import main as torchrun

        torchrun(["--standalone", "--nproc-per-node", str(config.nproc), "-m", "megatron_wesar",
                  "study", *argv])
        return 0
    import torch.distributed as dist

    from ..compat import enable_cpu_compat

    enable_cpu_compat()
    try:
        run_study(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
