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
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from functools import partial

from ..compat.megatron_core import destroy_process_groups_since, process_groups
from ..config import SIGMA_REGIMES
from ..coordination import atomic_write_json, broadcast_from_rank0, gather_objects
from ..options import to_argv
from ..training.arguments import PretrainConfig, parse_overrides, pretrain_config
from .launch import die_with_parent, launch
from .summary import format_lr, load_metrics, run_name, summarize, write_summary


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
    seeds_at: str = "grid"  # SEEDS_AT
    shared_lr: float | None = None  # None: the best baseline's best LR
    constant_lr: bool = False  # after warm-up, no decay (min LR = peak LR)


# the shape of the short CPU presets: TP=2 on 2 ranks, sequence 64, one microbatch of 16 per step
_TP2_SEQ64 = {"parallel.tensor_model_parallel_size": 2, "model.seq_length": 64,
              "training.micro_batch_size": 16, "training.global_batch_size": 16}

STUDY_PRESETS = {
    # `make demo`: must finish in <= 10 minutes on 2 CPU cores including start-up.
    "tiny": StudyPreset(
        model_preset="tiny",
        overrides={
            **_TP2_SEQ64,
            "training.train_iters": 80, "training.lr_warmup_iters": 8,
            "wesar.sigma_regime": "130m",
            "logging.log_interval": 20, "logging.eval_interval": 40, "logging.eval_iters": 4,
        },
        methods=("he", "small", "megatron", "wesar"),
        lrs=(1e-3, 3e-3, 1e-2),
        seeds=(1, 2, 3),
        seeds_at="best",
        nproc=2,
        description=(
            "The tiny preset's model (4 layers, d=128, 4 heads, d_ff=512, GeLU, tied embeddings, "
            "learned positions, byte vocabulary, ~0.9M parameters) at TP=2 (no sequence "
            "parallelism) on 2 CPU ranks; sequence 64, global batch 16 (one microbatch), 80 "
            "steps (8 warm-up, cosine to 0.1x), AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, "
            "fp32; WeSaR's sigma in the paper's 130M regime (--wesar-sigma-regime 130m); "
            "validation at steps 40 and 80 on the same 4 held-out batches (64 sequences, 4096 "
            "tokens); monitors every 20 steps; seed 1 on the whole LR grid, seeds 2 and 3 at "
            "each method's best LR of seed 1 and at the shared LR"
        ),
        rationale=(
            "Sized for `make demo`: at most 10 minutes on 2 CPU cores, start-up included. "
            "4 methods x 3 peak learning rates on seed 1 (12 runs), then seeds 2 and 3 at each "
            "method's best LR and at the shared LR (8 to 16 runs, typically 10-12): the three "
            "seeds give the best-LR and the shared-LR comparisons their seed noise and paired "
            "differences. Against the earlier demo (20 runs of 100 steps, 5 evaluations, "
            "monitors every 10 steps: 8m38s), a run here does ~0.8 of the work (80 steps, 2 "
            "evaluations, monitors every 20 steps; measured 0.85-0.9 of the CPU time with the "
            "start-up). In the 130M regime a trial at 100 steps put WeSaR's best LR at 1e-3 "
            "and Small init's at 3e-3 (docs/tiny-scale-findings.md); a best LR at an end of "
            "the grid is flagged in the report. 80 steps show the update-ratio pattern, which "
            "appears within tens of steps, but are far too few for converged losses: the losses "
            "rank the methods early in training only. Sigma sits in the paper's 130M regime "
            "(between the backbone's stds: the W_d gate below 1, the q/k/v and W_u gates "
            "above), not at sqrt(4e-5), "
            "which at d=128 lies below every backbone std and makes every gate 3.5-14 (another "
            "regime, where WeSaR raises every update ratio). No loss spike is expected at this "
            "scale and length (docs/tiny-scale-findings.md); the `instability` preset looks "
            "for one."
        ),
    ),
    # the setup of docs/tiny-scale-findings.md through the driver (hours on 2 CPU cores)
    "tiny-long": StudyPreset(
        model_preset="tiny",
        overrides={
            "parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True,
            "training.train_iters": 800, "training.lr_warmup_iters": 40,
            "wesar.sigma_regime": "130m",
            "logging.log_interval": 10, "logging.eval_interval": 100, "logging.eval_iters": 8,
        },
        methods=("he", "small", "megatron", "scaled-embed", "embed-ln", "wesar"),
        lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
        seeds=(1, 2, 3),
        nproc=2,
        description=(
            "The tiny preset's model at sequence 128, global batch 16, 800 steps (40 warm-up, "
            "cosine to 0.1x), TP=2 with sequence parallelism, WeSaR's sigma in the 130M regime, "
            "6 learning rates, 3 seeds on the whole grid"
        ),
        rationale="The longer CPU study of docs/tiny-scale-findings.md, run through the driver.",
    ),
    # the search for a regime where a baseline spikes or diverges (Wortsman et al. 2023)
    "instability": StudyPreset(
        model_preset="tiny",
        overrides={
            **_TP2_SEQ64,
            "training.train_iters": 300, "training.lr_warmup_iters": 5,
            "training.clip_grad": 0.0, "wesar.sigma_regime": "130m",
            "logging.log_interval": 10, "logging.eval_interval": 100, "logging.eval_iters": 4,
        },
        methods=("he", "small", "megatron", "scaled-embed", "embed-ln", "wesar"),
        lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
        seeds=(1,),
        nproc=2,
        constant_lr=True,
        description=(
            "The tiny preset's model (no qk-norm) at TP=2 on 2 CPU ranks, sequence 64, global "
            "batch 16, 300 steps at a constant peak LR after a 5-step warm-up, NO gradient "
            "clipping, AdamW (0.9, 0.95), weight decay 0.1, fp32; WeSaR's sigma in the 130M "
            "regime; 6 methods x 6 peak LRs 1e-3..3e-1 (up to where the baselines fail), 1 "
            "seed; validation every 100 steps; monitors (update ratios, the largest attention "
            "logit per layer, log Z) every 10 steps"
        ),
        rationale=(
            "Wortsman et al. 2023 reproduce large-scale instabilities in small models with high "
            "learning rates: attention-logit growth (the largest attention logit grows without "
            "bound and attention collapses) and output-logit divergence (log Z drifts away from "
            "0), and compare methods by their LR sensitivity. Everything that damps them is "
            "off here: no clipping, a 5-step warm-up, no LR decay, no qk-norm, no z-loss. "
            "Probes on this machine (docs/tiny-scale-findings.md) found the largest attention "
            "logit of He at LR 1e-1 growing to ~10^5 within 400 steps while the loss stopped at "
            "~3.1 (attention collapse), and the loss rising above its initial value in the "
            "first steps of WeSaR and He at LR 1e-1. 36 runs of 300 steps: 61 minutes on this "
            "machine's 2 cores with other jobs running (measured 2026-11-28, "
            "docs/tiny-scale-findings.md), where He, Scaled Embed and Embed LN spiked late at "
            "LR 3e-1."
        ),
    ),
}


# where the seeds after the first run: "grid" every seed at every LR; "best" the first seed on
# the whole grid, the others only at each method's best LR of the first seed and at the shared LR
SEEDS_AT = ("grid", "best")


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
    seeds_at: str = "grid"
    shared_lr: float | None = None  # the shared-LR protocol's LR; None: the best baseline's
    constant_lr: bool = False

    def __post_init__(self):
        if self.seeds_at not in SEEDS_AT:
            raise ValueError(f"seeds_at must be one of {SEEDS_AT}, got {self.seeds_at!r}")
        if self.shared_lr is not None and self.shared_lr not in self.lrs:
            raise ValueError(f"the shared LR {self.shared_lr:g} is not one of the study's LRs "
                             f"{self.lrs}")

    def grid(self) -> list:
        """(method, lr, seed) of every run the study may train, seed-major then LR then method."""
        return [(m, lr, s) for s in self.seeds for lr in self.lrs for m in self.methods]

    def plan(self) -> list:
        """The runs trained first: the whole grid, or with seeds_at "best" the first seed's
        (each learning rate's comparison completes before the next one starts)."""
        seeds = self.seeds if self.seeds_at == "grid" else self.seeds[:1]
        return [(m, lr, s) for s in seeds for lr in self.lrs for m in self.methods]

    def followup_plan(self, summary: dict) -> list:
        """With seeds_at "best": the runs of the seeds after the first, at each method's best
        LR (of the runs so far) and at the shared LR (summary["shared_lr"]); else []."""
        if self.seeds_at != "best":
            return []
        shared = (summary.get("shared_lr") or {}).get("lr")
        lrs = {m: sorted({summary["methods"][m]["lr"], *([shared] if shared else [])})
               for m in self.methods if m in summary["methods"]}
        return [(m, lr, s) for s in self.seeds[1:] for lr in self.lrs for m in self.methods
                if lr in lrs.get(m, ())]

    def run_config(self, method: str, lr: float, seed: int) -> PretrainConfig:
        """The PretrainConfig of one run (ValueError when the overrides are invalid)."""
        return pretrain_config({
            **self.overrides, **METHODS[method].overrides, "training.lr": float(lr),
            **({"training.min_lr": float(lr)} if self.constant_lr else {}),
            "training.seed": seed, "logging.metrics_file": self.metrics_path(method, lr, seed),
        }, self.model_preset)

    def run_configs(self, world_size: int) -> dict:
        """{(method, lr, seed): PretrainConfig} of the whole grid; ValueError when an override
        is invalid or a layout does not fit `world_size` ranks."""
        configs = {key: self.run_config(*key) for key in self.grid()}
        for run_config in configs.values():
            run_config.data_parallel_size(world_size)
        return configs

    def pretrain_args(self) -> list:
        """The `pretrain` flags every run shares (as the report shows them)."""
        return ["--preset", self.model_preset, *to_argv(PretrainConfig, self.overrides),
                *(["--min-lr", "<the run's --lr>"] if self.constant_lr else [])]

    def run_dir(self, method: str, lr: float, seed: int) -> str:
        """The folder of one run."""
        return os.path.join(self.out_dir, "runs", run_name(method, lr, seed))

    def metrics_path(self, method: str, lr: float, seed: int) -> str:
        """The metrics file of one run."""
        return os.path.join(self.run_dir(method, lr, seed), "metrics.jsonl")

    def to_json(self) -> dict:
        """study.json's content: the fields, the shared driver flags, the methods' descriptions
        and which of them are baselines."""
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
    p.add_argument("--seeds-at", choices=SEEDS_AT, default=None,
                   help="grid: every seed at every LR; best: the seeds after the first only at "
                        "each method's best LR of the first seed and at the shared LR (default: "
                        "the preset's)")
    p.add_argument("--shared-lr", type=float, default=None,
                   help="the LR of the shared-LR comparison, one of --lrs (default: the "
                        "preset's, else the best baseline's best LR)")
    p.add_argument("--sigma-regime", choices=SIGMA_REGIMES, default=None,
                   help="WeSaR's sigma where the paper's model of this size had it relative to "
                        "the backbone's stds (the driver's --wesar-sigma-regime; default: the "
                        "preset's)")
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
    if ns.sigma_regime is not None:
        overrides["wesar.sigma_regime"] = ns.sigma_regime
    model_preset, extra_overrides = parse_overrides(extra)
    overrides.update(extra_overrides)
    changed = [f"--{name.replace('_', '-')} {getattr(ns, name)}"
               for name in ("train_iters", "sigma_regime") if getattr(ns, name) is not None]
    lrs = ns.lrs or list(preset.lrs)
    # the preset's shared LR holds where it is one of the LRs; an explicit one must be
    shared = ns.shared_lr if ns.shared_lr is not None else (
        preset.shared_lr if preset.shared_lr in lrs else None)
    try:
        return StudyConfig(
            out_dir=os.path.abspath(ns.dir or os.path.join("out", f"study-{ns.preset}")),
            preset=ns.preset,
            model_preset=model_preset or preset.model_preset,
            overrides=overrides,
            methods=ns.methods or list(preset.methods),
            lrs=lrs,
            seeds=ns.seeds or list(preset.seeds),
            nproc=ns.nproc_per_node or preset.nproc,
            description=preset.description if not extra and not changed else
            preset.description + f" (overridden: {' '.join([*extra, *changed])})",
            rationale=preset.rationale,
            rerun=ns.rerun,
            report=ns.report,
            seeds_at=ns.seeds_at or preset.seeds_at,
            shared_lr=shared,
            constant_lr=preset.constant_lr,
        )
    except ValueError as err:
        build_parser().error(str(err))


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
    if ended_nonfinite(metrics):  # it diverged: training it again ends the same way
        return True
    if not metrics.steps or metrics.steps[-1]["iteration"] != run_config.training.train_iters:
        return False
    return not (run_config.logging.eval_interval and not metrics.evals)


def ended_nonfinite(metrics) -> bool:
    """Whether a run's last step had a non-finite loss or gradient norm (written as null)."""
    last = metrics.steps[-1] if metrics.steps else {}
    return bool(last) and any(last.get(k) is None or not math.isfinite(last[k])
                              for k in ("loss", "grad_norm"))


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
    diverged_runs: list = dataclasses.field(default_factory=list)  # a non-finite step ended them

    @property
    def exit_code(self) -> int:
        """0 when every run of the plan finished (or diverged: an outcome, not a failure),
        else 1."""
        return 1 if self.failed_runs or self.stopped_during else 0


def _last_valid(path: str):
    try:
        metrics = load_metrics(path)
    except (OSError, ValueError):
        return None
    return metrics.evals[-1][1] if metrics.evals else None


class _Runs:
    """Trains runs of a study one after the other on the current process group and keeps what
    happened to them (timings, failures, divergences, the run an exit signal stopped)."""

    def __init__(self, config: StudyConfig, run_configs: dict, log):
        import torch.distributed as dist

        self.config, self.run_configs, self.log = config, run_configs, log
        self.rank = dist.get_rank()
        self.start = time.perf_counter()
        self.done = 0
        self.timings, self.failures, self.diverged, self.stopped = {}, {}, [], None

    def train(self, plan: list, total: int) -> None:
        """Train the runs of `plan` (`total`: the runs planned so far, for the progress line);
        stops at a run an exit signal stopped."""
        import torch.distributed as dist

        from ..training.divergence import NonFiniteStepError
        from ..training.pretrain import pretrain

        config, rank = self.config, self.rank
        for key in plan:
            method, lr, seed = key
            run_dir, metrics_path = config.run_dir(*key), config.metrics_path(*key)
            run_config = self.run_configs[key]
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
                error = diverged = None
                log_file = open(os.path.join(run_dir, "log.txt"), "w") if rank == 0 else None
                try:
                    pretrain(run_config, log=partial(print, file=log_file, flush=True)
                             if log_file else (lambda line: None))
                except NonFiniteStepError as err:  # the run diverged: an outcome
                    diverged = str(err)
                    _cleanup_parallel_state()
                except Exception as err:  # noqa: BLE001 - a failed run is recorded, the study goes on
                    error = (traceback.format_exc(), failure_message(err))
                    _cleanup_parallel_state()
                finally:
                    if log_file:
                        log_file.close()
                errors = [e for e in gather_objects(error) if e]
                if errors:
                    status = "FAILED"
                    self.failures[run_name(*key)] = errors[0][1]
                    if rank == 0:
                        with open(os.path.join(run_dir, "error.txt"), "w") as f:
                            f.write(errors[0][0])
                elif any(gather_objects(diverged)):
                    status = "DIVERGED"
                    self.diverged.append(run_name(*key))
                elif broadcast_from_rank0(rank == 0 and _stopped_early(
                        metrics_path, run_config.training.train_iters)):
                    status, self.stopped = "STOPPED", run_name(*key)
                destroy_process_groups_since(groups_before)
                gc.collect()
            dist.barrier()
            self.done += 1
            self.timings[run_name(*key)] = time.perf_counter() - run_start
            if rank == 0:
                self._progress(key, status, total)
            if self.stopped:
                return

    def _progress(self, key, status: str, total: int) -> None:
        method, lr, seed = key
        elapsed = time.perf_counter() - self.start
        val = _last_valid(self.config.metrics_path(*key))
        val_text = f"val={val:.3f}" if val is not None else "val=n/a"
        eta = elapsed / self.done * (total - self.done)
        self.log(f"{progress_bar(self.done, total)} {self.done}/{total} {method} "
                 f"lr={format_lr(lr)} seed={seed} {val_text} ({status}, "
                 f"{self.timings[run_name(*key)]:.1f}s; elapsed {_duration(elapsed)}, "
                 f"eta {_duration(eta)})")


def run_study(config: StudyConfig, log=print) -> StudyOutcome:
    """Train every run of the study on the current process group (every rank calls this) until
    the plan ends or an exit signal stops a run; rank 0 writes summary.json and the report.
    With seeds_at "best" the seeds after the first follow, at the LRs the first seed's runs
    select (StudyConfig.followup_plan)."""
    import torch.distributed as dist

    from ..training.pretrain import init_distributed

    init_distributed()
    rank = dist.get_rank()
    plan = config.plan()
    run_configs = config.run_configs(dist.get_world_size())  # all valid before any training
    if rank == 0:
        os.makedirs(os.path.join(config.out_dir, "runs"), exist_ok=True)
        atomic_write_json(os.path.join(config.out_dir, "study.json"), config.to_json())
        seeds_text = (f"{len(config.seeds)} seed(s)" if config.seeds_at == "grid" else
                      f"seed {config.seeds[0]}, then {len(config.seeds) - 1} more seed(s) at "
                      "the selected LRs")
        log(f"study: {len(config.methods)} methods x {len(config.lrs)} learning rates x "
            f"{seeds_text} = {len(plan)} runs on {dist.get_world_size()} rank(s) "
            f"-> {config.out_dir}")
    dist.barrier()
    runs = _Runs(config, run_configs, log)
    runs.train(plan, len(plan))
    if not runs.stopped and config.seeds_at == "best":
        followup = broadcast_from_rank0(
            config.followup_plan(summarize(config.out_dir, config.to_json()))
            if rank == 0 else None)
        if rank == 0 and followup:
            log(f"seeds {config.seeds[1:]}: {len(followup)} runs at each method's best LR and "
                "the shared LR")
        runs.train(followup, len(plan) + len(followup))
    summary = None
    if rank == 0:
        info = config.to_json()
        info.update(wall_time_s=time.perf_counter() - runs.start, run_time_s=runs.timings,
                    failed_runs=runs.failures, diverged_runs=runs.diverged,
                    stopped_during=runs.stopped, world_size=dist.get_world_size())
        atomic_write_json(os.path.join(config.out_dir, "study.json"), info)
        summary = write_summary(config.out_dir, info)
        log(f"summary: {os.path.join(config.out_dir, 'summary.json')}")
        if config.report:
            from .report import render_report

            path = render_report(config.out_dir, summary)
            log(f"report: {path}")
        if runs.stopped:
            log(f"study stopped during {runs.stopped} (an exit signal); the same command "
                "resumes it")
        if runs.diverged:
            log(f"{len(runs.diverged)} run(s) diverged (a non-finite step): "
                + ", ".join(runs.diverged))
        for name, message in runs.failures.items():
            log(f"FAILED {name}: {message}")
        if runs.failures:
            log(f"{len(runs.failures)} of {runs.done} runs failed (tracebacks in their "
                "error.txt)")
    dist.barrier()
    return StudyOutcome(summary, runs.failures, runs.stopped, runs.diverged)


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
