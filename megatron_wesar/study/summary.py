"""Read a study folder's per-run metrics (JSONL written by the driver's --metrics-file) and
reduce each run, and the study, to the numbers the report shows (summary.json).

A study folder holds `runs/<method>_lr<lr>_s<seed>/metrics.jsonl` (see runner.run_name) and,
once summarised, `summary.json`. Every optional metric (gates in a baseline, update ratios of a
role that is absent, eval lines) may be missing: the summary then holds null (None) for it.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

from ..coordination import atomic_write_json
from ..init import ROLES
from ..metric_keys import (
    ATTN_LOGIT_MAX,
    FP8_QUANT_REL_ERROR,
    FP8_WEIGHT_SCALE,
    GATE_PREFIX,
    OUTPUT_LOG_Z_ABSMAX,
    OUTPUT_LOG_Z_MEAN,
    REWIND_TO,
    SKIPPED_STEP,
    SPIKE_COUNT_PREFIX,
    SPIKE_FLAG_PREFIX,
    SPIKE_SERIES,
    TOKENS_PER_S,
    UPDATE_RATIO,
    UPDATE_RATIO_SPREAD,
    WEIGHT_NORM_SPREAD,
    WEIGHT_RMS_SPREAD,
    parse_spike_key,
    role_mean_key,
    role_of_matrix,
)
from .format import format_lr
from .schema import BestBaseline, GridCell, MethodSummary, RunSummary, Summary
from .statistics import lr_sensitivity, paired_difference, seed_spread

# the role every relative update ratio is taken against (FFN-up), and the roles shown against it
REFERENCE_ROLE = "fc1"
RELATIVE_ROLES = ("attn_proj", "fc2")
FINAL_FRACTION = 0.1  # final train loss: mean over the last 10% of the optimizer steps
# a blow-up: the training loss rises above BLOWUP_FACTOR x its first step's value (L0) later on
# (the first steps of warm-up move the loss by a few percent either way)
BLOWUP_FACTOR = 1.1

_RUN_DIR = re.compile(r"^(?P<method>.+)_lr(?P<lr>[0-9.eE+-]+)_s(?P<seed>-?\d+)$")


def run_name(method: str, lr: float, seed: int) -> str:
    """The folder name of one run: <method>_lr<lr>_s<seed>."""
    return f"{method}_lr{format_lr(lr)}_s{seed}"


def parse_run_name(name: str):
    """(method, lr, seed) of a run folder name, or None when it is not one."""
    match = _RUN_DIR.match(name)
    if not match:
        return None
    try:
        return match["method"], float(match["lr"]), int(match["seed"])
    except ValueError:
        return None


# --------------------------------------------------------------------------- one run


@dataclass
class RunMetrics:
    """The parsed metrics file of one run."""

    header: dict = field(default_factory=dict)       # the {"run": {...}} line's dict
    initial_gates: dict = field(default_factory=dict)  # {matrix: gate value at the start}
    steps: list = field(default_factory=list)        # one record per optimizer step (has "loss")
    evals: list = field(default_factory=list)        # (iteration, valid_loss), by iteration
    torn_lines: int = 0                              # lines that were not complete JSON
    rewinds: int = 0                                 # records of a rewind (REWIND_TO)

    @property
    def logged(self) -> list:
        """The step records written at log intervals (those carrying monitor keys)."""
        return [r for r in self.steps
                if UPDATE_RATIO_SPREAD in r or TOKENS_PER_S in r
                or any(k.startswith(SPIKE_COUNT_PREFIX) for k in r)]


def _number(value):
    """A JSON value as a float (None, strings 'nan'/'inf' and the like handled), or None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class MetricsFileError(ValueError):
    """A metrics file that cannot be read as one (not UTF-8, malformed records)."""


def load_metrics(path: str) -> RunMetrics:
    """Parse one metrics.jsonl. Torn lines (a run still writing, or killed mid-line and resumed)
    are skipped and counted; a record of an iteration seen before replaces the earlier one (a
    resumed run repeats iterations). A damaged file (bytes that are not UTF-8, an iteration that
    is not an integer, no complete record at all) raises MetricsFileError naming the file and
    line."""
    metrics = RunMetrics()
    steps, evals = {}, {}
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if any("\udc80" <= c <= "\udcff" for c in line):  # undecodable bytes
                raise MetricsFileError(f"{path}:{number}: not UTF-8") from None
            metrics.torn_lines += 1
            continue
        if not isinstance(obj, dict):
            continue
        if "run" in obj and isinstance(obj["run"], dict):
            metrics.header = obj["run"]
            metrics.initial_gates = obj.get("initial_gates") or {}
            continue
        iteration = obj.get("iteration")
        if iteration is None:
            continue
        if not (type(iteration) is int or isinstance(iteration, float) and iteration.is_integer()):
            raise MetricsFileError(f"{path}:{number}: iteration {iteration!r} is not an integer")
        iteration = int(iteration)
        if "valid_loss" in obj:
            evals[iteration] = _number(obj["valid_loss"])
        if REWIND_TO in obj:  # the rewound iteration is trained again: count it here
            metrics.rewinds += 1
        if "loss" in obj:
            record = dict(steps.get(iteration, {}))
            record.update({k: v for k, v in obj.items() if k != "valid_loss"})
            record["iteration"] = iteration
            steps[iteration] = record
    if metrics.torn_lines and not (metrics.header or steps or evals):
        raise MetricsFileError(f"{path}: no complete record ({metrics.torn_lines} line(s) that "
                               "are not JSON)")
    metrics.steps = [steps[i] for i in sorted(steps)]
    metrics.evals = [(i, evals[i]) for i in sorted(evals)]
    return metrics


def _finite(values):
    return [v for v in values if v is not None and math.isfinite(v)]


def mean(values):
    """The mean of the finite values among `values` (None entries skipped); None without any."""
    values = _finite(values)
    return math.fsum(values) / len(values) if values else None


def final_train_loss(steps: list, fraction: float = FINAL_FRACTION):
    """Mean training loss over the last `fraction` of the steps (at least one step); None when
    there are no steps, inf/nan when a step in that window is not finite."""
    if not steps:
        return None
    count = max(1, math.ceil(fraction * len(steps)))
    values = [_number(r.get("loss")) for r in steps[-count:]]
    if any(v is None for v in values):
        values = [v for v in values if v is not None]
        if not values:
            return None
    return math.fsum(values) / len(values)


def final_valid_loss(evals: list):
    """The validation loss of the last evaluation, or None without one."""
    return evals[-1][1] if evals else None


def spike_counts(metrics: RunMetrics) -> dict:
    """{series: {rule: n}} from the driver's running counts (the last logged record that has
    them). Without any count in the file, the rules of megatron_wesar.monitor are run here on
    the per-step loss and grad-norm series instead (the same rules, the same parameters)."""
    counts = {s: {} for s in SPIKE_SERIES}
    last = None
    for record in metrics.steps:
        if any(k.startswith(SPIKE_COUNT_PREFIX) for k in record):
            last = record
    if last is not None:
        for key, value in last.items():
            parsed = parse_spike_key(key, SPIKE_COUNT_PREFIX)
            if parsed and parsed[0] in counts:
                series, rule = parsed
                counts[series][rule] = int(round(_number(value) or 0))
        # a spike flagged on a step after the last count (steps between log intervals)
        for record in metrics.steps:
            if record["iteration"] <= last["iteration"]:
                continue
            for key, value in record.items():
                parsed = parse_spike_key(key, SPIKE_FLAG_PREFIX)
                if parsed and parsed[0] in counts and (_number(value) or 0) > 0:
                    series, rule = parsed
                    counts[series][rule] = counts[series].get(rule, 0) + 1
        return counts
    from ..monitor import SpikeTracker

    tracker = SpikeTracker(series=SPIKE_SERIES)
    for record in metrics.steps:
        values = {}
        for series in SPIKE_SERIES:
            value = _number(record.get(series))
            values[series] = value if value is not None else (None if series not in record
                                                                else float("nan"))
        tracker.update(record["iteration"], **values)
    for key, value in tracker.counts().items():
        series, rule = parse_spike_key(key, SPIKE_COUNT_PREFIX)
        counts[series][rule] = int(value)
    return counts


def spike_steps(metrics: RunMetrics) -> dict:
    """{series: {rule: [iterations flagged]}} from the per-step spike/<series>/<rule> flags."""
    out = {}
    for record in metrics.steps:
        for key, value in record.items():
            parsed = parse_spike_key(key, SPIKE_FLAG_PREFIX)
            if parsed and (_number(value) or 0) > 0:
                series, rule = parsed
                out.setdefault(series, {}).setdefault(rule, []).append(record["iteration"])
    return out


def max_loss_rise(steps: list):
    """(largest loss_t / min(loss_1..loss_{t-1}), its iteration) over the finite losses: the
    largest rise of the training loss above its running minimum, at any step (no window); None
    with fewer than two finite losses."""
    best, where, running = None, None, None
    for record in steps:
        loss = _number(record.get("loss"))
        if loss is None or not math.isfinite(loss):
            continue
        if running is not None and running > 0:
            rise = loss / running
            if best is None or rise > best:
                best, where = rise, record["iteration"]
        running = loss if running is None else min(running, loss)
    return (best, where) if best is not None else (None, None)


def steps_to_target(evals: list, target):
    """The first eval iteration whose validation loss is <= target, or None."""
    if target is None:
        return None
    for iteration, value in evals:
        if value is not None and value <= target:
            return iteration
    return None


# the flat argument names of metrics headers written before the config tree
_FLAT_HEADER_NAMES = {"wesar.enabled": "wesar", "training.train_iters": "train_iters"}


def run_setting(header: dict, path: str, default):
    """A setting of a run from its metrics header ({"run": ...}): the config tree's dotted
    `path`, or its flat name in headers written before the tree; `default` when absent."""
    node = header
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return header.get(_FLAT_HEADER_NAMES.get(path), default) if header else default
        node = node[key]
    return node


def _role_means(logged: list, stat: str) -> dict:
    """{role: mean over the logged steps of <stat>_mean/<role>} of the roles that have one."""
    out = {}
    for role in ROLES:
        value = mean([_number(r.get(role_mean_key(stat, role))) for r in logged])
        if value is not None:
            out[role] = value
    return out


def _relative_update_ratios(logged: list) -> dict:
    """{role: mean over logged steps of update_ratio_mean/<role> / update_ratio_mean/fc1}."""
    out = {}
    for role in RELATIVE_ROLES:
        ratios = []
        for r in logged:
            num = _number(r.get(role_mean_key(UPDATE_RATIO, role)))
            den = _number(r.get(role_mean_key(UPDATE_RATIO, REFERENCE_ROLE)))
            if num is not None and den:
                ratios.append(num / den)
        value = mean(ratios)
        if value is not None:
            out[role] = value
    return out


def gate_trajectories(metrics: RunMetrics) -> dict:
    """{matrix: [(iteration, gate value), ...]} of the logged gate values (empty: no gates)."""
    out = {}
    for record in metrics.steps:
        for key, value in record.items():
            if key.startswith(GATE_PREFIX):
                value = _number(value)
                if value is not None:
                    out.setdefault(key[len(GATE_PREFIX):], []).append((record["iteration"], value))
    return out


def _last_value(logged: list, key: str):
    """The value of `key` in the last logged record that has it, or None."""
    return next((_number(r[key]) for r in logged[::-1] if key in r), None)


def initial_gates_by_role(initial_gates: dict) -> dict:
    """{role: mean initial gate value (alpha_0) over the role's matrices} in ROLES order."""
    values = {}
    for name, value in initial_gates.items():
        value = _number(value)
        if value is not None:
            values.setdefault(role_of_matrix(name), []).append(value)
    return {role: math.fsum(values[role]) / len(values[role]) for role in (*ROLES, "other")
            if role in values}


def _proxy_series(logged: list, key: str) -> list:
    return [v for v in (_number(r.get(key)) for r in logged) if v is not None]


def proxies(logged: list) -> dict:
    """The instability proxies of one run (megatron_wesar.instability): the largest attention
    logit at the last logged step and its peak over the run, log Z's mean at the last logged
    step and the peak of |log Z|; None where the metrics hold none."""
    attn = _proxy_series(logged, ATTN_LOGIT_MAX)
    log_z = _proxy_series(logged, OUTPUT_LOG_Z_MEAN)
    log_z_abs = _proxy_series(logged, OUTPUT_LOG_Z_ABSMAX)
    finite = [v for v in attn if math.isfinite(v)]
    finite_abs = [v for v in log_z_abs if math.isfinite(v)]
    return {
        "attn_logit_max_final": attn[-1] if attn else None,
        "attn_logit_max_peak": max(finite) if finite else None,
        "output_log_z_final": log_z[-1] if log_z else None,
        "output_log_z_absmax_peak": max(finite_abs) if finite_abs else None,
    }


def _diverged(final_loss, initial_loss, nonfinite_steps: int) -> bool:
    """A run diverged when a step was not finite, or its final loss is not finite or not below
    the loss at initialisation (the L0 of Wortsman et al.'s LR sensitivity)."""
    if nonfinite_steps:
        return True
    if final_loss is None:
        return False
    return not math.isfinite(final_loss) or (initial_loss is not None
                                             and final_loss >= initial_loss)


def summarize_run(method: str, lr: float, seed: int, metrics: RunMetrics) -> RunSummary:
    """The per-run entry of summary.json (steps_to_best_baseline is filled by summarize). A run
    with a non-finite step has final losses inf (it diverged, whatever it reached before)."""
    steps, logged = metrics.steps, metrics.logged
    losses = [_number(r.get("loss")) for r in steps]
    grad_norms = [_number(r.get("grad_norm")) for r in steps]
    finite_grad = _finite(grad_norms)
    gates = gate_trajectories(metrics)
    gate_change = None
    if gates:
        changes = [abs(values[-1][1] / values[0][1] - 1.0)
                   for values in gates.values() if values[0][1]]
        gate_change = max(changes) if changes else None
    header = metrics.header
    rise, rise_step = max_loss_rise(steps)
    nonfinite = (sum(1 for v in losses if v is None or not math.isfinite(v))
                 + sum(1 for v in grad_norms if v is not None and not math.isfinite(v)))
    final_train, final_valid = final_train_loss(steps), final_valid_loss(metrics.evals)
    if nonfinite:  # diverged: whatever it reached before does not count
        final_train = math.inf if final_train is None or math.isfinite(final_train) \
            else final_train
        final_valid = None if final_valid is None else math.inf
    initial = next((v for v in losses if v is not None and math.isfinite(v)), None)
    later = [v for v in losses[1:] if v is not None and math.isfinite(v)]
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "wesar": run_setting(header, "wesar.enabled", method == "wesar"),
        "steps": len(steps),
        "train_iters": run_setting(header, "training.train_iters", None),
        "final_train_loss": final_train,
        "final_valid_loss": final_valid,
        "initial_loss": initial,
        "peak_loss_over_initial": max(later) / initial if later and initial else None,
        "diverged": _diverged(final_valid if final_valid is not None else final_train, initial,
                              nonfinite),
        "valid_curve": [[i, v] for i, v in metrics.evals],
        "skipped_steps": sum(1 for r in steps if r.get(SKIPPED_STEP)),
        "rewinds": metrics.rewinds,
        "nonfinite_steps": nonfinite,
        "spikes": spike_counts(metrics),
        "spike_steps": spike_steps(metrics),
        "max_grad_norm": max(finite_grad) if finite_grad else None,
        "max_loss_rise": rise,
        "max_loss_rise_step": rise_step,
        "mean_grad_norm": mean(grad_norms),
        "steps_to_best_baseline": None,
        "update_ratio_spread": mean([_number(r.get(UPDATE_RATIO_SPREAD)) for r in logged]),
        "update_ratio_mean": _role_means(logged, UPDATE_RATIO),
        "update_ratio_rel_fc1": _relative_update_ratios(logged),
        "weight_norm_spread_final": _last_value(logged, WEIGHT_NORM_SPREAD),
        "weight_rms_spread_final": _last_value(logged, WEIGHT_RMS_SPREAD),
        "gate_count": len(gates),
        "gate_max_rel_change": gate_change,
        "tokens_per_s": mean([_number(r.get(TOKENS_PER_S)) for r in logged]),
        **proxies(logged),
        "sigma": run_setting(header, "wesar.sigma", None),
        "sigma_regime": run_setting(header, "wesar.sigma_regime", None),
        "alpha0": initial_gates_by_role(metrics.initial_gates),
        "fp8_quant_rel_error": _role_means(logged, FP8_QUANT_REL_ERROR),
        "fp8_weight_scale": _role_means(logged, FP8_WEIGHT_SCALE),
    }


# --------------------------------------------------------------------------- the study


def _sort_key(run: dict, order: list):
    method = run["method"]
    return (order.index(method) if method in order else len(order), method, run["lr"],
            run["seed"])


def _loss_key(entry: dict):
    """Ranking key of a run or (method, lr) cell: the final validation loss, the final train
    loss where no evaluation exists; non-finite and missing values rank last."""
    for name in ("final_valid_loss", "final_train_loss"):
        value = entry.get(name)
        if value is not None:
            return value if math.isfinite(value) else math.inf
    return math.inf


def grid(runs: list[RunSummary]) -> dict[str, dict[float, GridCell]]:
    """{method: {lr: cell}}: per (method, lr) the seed means of the final losses."""
    cells = {}
    for run in runs:
        cells.setdefault(run["method"], {}).setdefault(run["lr"], []).append(run)
    out = {}
    for method, by_lr in cells.items():
        out[method] = {}
        for lr, group in sorted(by_lr.items()):
            valid = [r["final_valid_loss"] for r in group]
            train = [r["final_train_loss"] for r in group]
            out[method][lr] = {
                "final_valid_loss": _seed_mean(valid),
                "final_train_loss": _seed_mean(train),
                "valid_std": seed_spread(valid)["std"],
                "seeds": [r["seed"] for r in group],
                "valid_by_seed": valid,
                "diverged_seeds": [r["seed"] for r in group if r["diverged"]],
            }
    return out


def _seed_mean(values):
    """Mean over seeds; inf when any seed diverged (non-finite), None when none has a value."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if any(not math.isfinite(v) for v in present):
        return math.inf
    return math.fsum(present) / len(present)


def _selection_key(cell: GridCell, seeds: set):
    """The ranking key of a cell over `seeds` only: the mean final validation loss of those
    seeds (inf when one diverged); the whole cell's key without validation losses."""
    mean_valid = _seed_mean([v for s, v in zip(cell["seeds"], cell["valid_by_seed"])
                             if s in seeds])
    if mean_valid is None:
        return _loss_key(cell)
    return mean_valid if math.isfinite(mean_valid) else math.inf


def best_lrs(cells: dict[str, dict[float, GridCell]]) -> dict[str, MethodSummary]:
    """{method: {lr, final_valid_loss, final_train_loss, at_grid_edge, ...}} at the LR with the
    lowest final validation loss (train loss when a method has no evaluation), compared over
    the seeds that ran every LR of the method (the LR is selected on the same seeds everywhere,
    even where later seeds ran only some LRs); the losses given are the means over all seeds
    of that LR."""
    out = {}
    for method, by_lr in cells.items():
        lrs = sorted(by_lr)
        if not lrs:
            continue
        common = set.intersection(*(set(cell["seeds"]) for cell in by_lr.values()))
        best = min(lrs, key=lambda lr: _selection_key(by_lr[lr], common))
        out[method] = {
            "lr": best,
            "final_valid_loss": by_lr[best]["final_valid_loss"],
            "final_train_loss": by_lr[best]["final_train_loss"],
            "at_grid_edge": len(lrs) > 1 and best in (lrs[0], lrs[-1]),
            "edge": ("low" if best == lrs[0] else "high") if len(lrs) > 1 and best in (
                lrs[0], lrs[-1]) else None,
            "lrs": lrs,
        }
    return out


def discover_runs(study_dir: str) -> list:
    """[(method, lr, seed, metrics path)] of every run folder with a metrics file."""
    runs_dir = os.path.join(study_dir, "runs")
    out = []
    if not os.path.isdir(runs_dir):
        return out
    for name in sorted(os.listdir(runs_dir)):
        parsed = parse_run_name(name)
        path = os.path.join(runs_dir, name, "metrics.jsonl")
        if parsed and os.path.isfile(path):
            out.append((*parsed, path))
    return out


def summarize(study_dir: str, config: dict | None = None) -> Summary:
    """The summary of a study folder: {"runs": [...], "config": {...}, "methods": {...},
    "grid": {...}, "best_baseline": {...} | None, "skipped_runs": {...}}.

    `config` defaults to the folder's study.json (written by the runner), else {}. Baselines are
    the runs whose header says `wesar: false`. steps_to_best_baseline is measured against the
    final validation loss of the best baseline cell (the (method, lr) with the lowest seed-mean
    final validation loss over every baseline method and LR). A run whose metrics file cannot
    be read is left out with a warning naming the file, and listed in skipped_runs.
    """
    if config is None:
        config = read_json(os.path.join(study_dir, "study.json")) or {}
    order = list(config.get("methods", []))
    runs, skipped = [], {}
    for method, lr, seed, path in discover_runs(study_dir):
        try:
            metrics = load_metrics(path)
        except (OSError, ValueError) as err:
            warn(f"{err}; run skipped")
            skipped[os.path.relpath(path, study_dir)] = str(err)
            continue
        entry = summarize_run(method, lr, seed, metrics)
        entry["metrics_file"] = os.path.relpath(path, study_dir)
        runs.append(entry)
    runs.sort(key=lambda r: _sort_key(r, order))
    cells = grid(runs)
    methods = best_lrs(cells)
    baseline_methods = sorted({r["method"] for r in runs if not r["wesar"]},
                              key=lambda m: (order.index(m) if m in order else len(order), m))
    best_baseline = None
    candidates = [(m, lr, cell) for m in baseline_methods for lr, cell in cells[m].items()
                  if cell["final_valid_loss"] is not None
                  and math.isfinite(cell["final_valid_loss"])]
    if candidates:
        method, lr, cell = min(candidates, key=lambda c: c[2]["final_valid_loss"])
        best_baseline = {"method": method, "lr": lr, "final_valid_loss": cell["final_valid_loss"]}
        target = cell["final_valid_loss"]
        for run in runs:
            evals = [(i, v) for i, v in run["valid_curve"]]
            run["steps_to_best_baseline"] = steps_to_target(evals, target)
    for method, info in methods.items():
        info["baseline"] = method in baseline_methods
    shared = shared_lr(config, best_baseline)
    return {
        "config": config,
        "runs": runs,
        "methods": methods,
        "grid": {m: {format_lr(lr): cell for lr, cell in by_lr.items()}
                 for m, by_lr in cells.items()},
        "best_baseline": best_baseline,
        "baseline_methods": baseline_methods,
        "skipped_runs": skipped,
        "shared_lr": shared,
        "protocols": protocols(runs, methods, baseline_methods, shared),
        "stability": stability(runs, cells),
    }


def shared_lr(config: dict, best_baseline: BestBaseline | None) -> dict | None:
    """The shared nominal LR of the shared-LR protocol: {"lr", "source"}. The study's
    `shared_lr` when set, else the best baseline's best LR (tune the strongest baseline, run
    every method at its LR); None without either."""
    if config.get("shared_lr") is not None:
        return {"lr": float(config["shared_lr"]), "source": "set by the study"}
    if best_baseline is None:
        return None
    return {"lr": best_baseline["lr"],
            "source": f"the best LR of the best baseline, {best_baseline['method']}"}


def _valid_by_seed(runs: list, method: str, lr: float) -> dict:
    return {r["seed"]: r["final_valid_loss"] for r in runs
            if r["method"] == method and r["lr"] == lr and r["final_valid_loss"] is not None}


def protocols(runs: list, methods: dict, baseline_methods: list, shared: dict | None) -> dict:
    """The two comparisons: "best" (each method at its own best LR) and "shared" (every method
    at the shared LR). Each: {"lrs": {method: lr}, "cells": {method: seed_spread of its final
    validation losses}, "paired": {method: {baseline: paired_difference(method - baseline)}}}
    for every non-baseline method against every baseline, over the seeds both ran."""
    lrs_of = {"best": {m: info["lr"] for m, info in methods.items()}}
    if shared is not None:
        lrs_of["shared"] = {m: shared["lr"] for m in methods
                            if any(r["method"] == m and r["lr"] == shared["lr"] for r in runs)}
    out = {}
    for name, lrs in lrs_of.items():
        by_seed = {m: _valid_by_seed(runs, m, lr) for m, lr in lrs.items()}
        out[name] = {
            "lrs": lrs,
            "cells": {m: seed_spread(list(values.values())) for m, values in by_seed.items()},
            "paired": {m: {b: paired_difference(by_seed[m], by_seed[b])
                           for b in baseline_methods if b in by_seed}
                       for m in by_seed if m not in baseline_methods},
        }
    return out


def stability(runs: list, cells: dict) -> dict:
    """Per method: the LR sensitivity of Wortsman et al. 2023 over its LRs (seed-mean final
    validation loss; L0 = the mean loss of the runs' first steps), the LRs at which a seed
    diverged, the highest LR of the grid below every such LR (the highest stable LR) and the
    LRs at which a run's training loss rose above BLOWUP_FACTOR x its first step's (a blow-up,
    even when the run recovered)."""
    out = {}
    for method, by_lr in cells.items():
        initial = mean([r["initial_loss"] for r in runs if r["method"] == method])
        diverged = [lr for lr, cell in by_lr.items() if cell["diverged_seeds"]]
        stable = [lr for lr in by_lr if not diverged or lr < min(diverged)]
        blowups = {r["lr"] for r in runs if r["method"] == method
                   and (r["peak_loss_over_initial"] or 0) > BLOWUP_FACTOR}
        out[method] = {
            "initial_loss": initial,
            "lr_sensitivity": lr_sensitivity(
                {lr: cell["final_valid_loss"] for lr, cell in by_lr.items()}, initial),
            "diverged_lrs": sorted(diverged),
            "highest_stable_lr": max(stable) if stable else None,
            "blowup_lrs": sorted(blowups),
        }
    return out


def read_json(path: str):
    """A JSON file's content, or None when it does not exist (ValueError naming a damaged
    one)."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None


def warn(message: str) -> None:
    """Say a warning on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def _json_safe(obj):
    """Replace non-finite floats by strings ('inf', '-inf', 'nan') so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_summary(study_dir: str, config: dict | None = None) -> Summary:
    """Summarise the study folder and write summary.json; return the summary."""
    summary = summarize(study_dir, config)
    atomic_write_json(os.path.join(study_dir, "summary.json"), _json_safe(summary),
                      allow_nan=False)
    return summary


def normalized(summary: Summary) -> Summary:
    """`summary` as load_summary returns it once written (non-finite floats, string keys)."""
    return _restore(_json_safe(summary))


def load_summary(study_dir: str) -> Summary | None:
    """summary.json of a study folder with its 'inf'/'nan' strings turned back into floats."""
    summary = read_json(os.path.join(study_dir, "summary.json"))
    return _restore(summary) if summary is not None else None


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_FLOAT_FIELDS = {"final_train_loss", "final_valid_loss", "max_grad_norm", "mean_grad_norm",
                 "attn_logit_max_final", "attn_logit_max_peak", "output_log_z_final",
                 "output_log_z_absmax_peak", "mean", "std", "diffs"}


def _restore(obj, key=None):
    if isinstance(obj, dict):
        return {k: _restore(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v, key) for v in obj]
    if isinstance(obj, str) and key in _FLOAT_FIELDS | {"valid_by_seed", "valid_curve"}:
        return _NONFINITE.get(obj, obj)
    return obj
