"""The shape of summary.json: what `summary.summarize` returns and the report reads.

TypedDicts (plain dicts at run time), declared in the order the summary writes their keys.
Floats may be inf or nan in memory (a diverged run); summary.json stores those as strings.
"""
from __future__ import annotations

from typing import TypedDict


class RunSummary(TypedDict):
    """One run (method, lr, seed): an entry of summary["runs"]."""

    method: str
    lr: float
    seed: int
    wesar: bool                     # gated (WeSaR) or a baseline
    steps: int                      # optimizer steps in the metrics file
    train_iters: int | None
    final_train_loss: float | None
    final_valid_loss: float | None  # inf (both) when a step was not finite
    initial_loss: float | None      # the first step's training loss (L0)
    peak_loss_over_initial: float | None  # the largest later training loss / L0
    diverged: bool                  # a non-finite step, or final loss not below L0
    valid_curve: list               # [[iteration, valid loss], ...]
    nonfinite_steps: int
    skipped_steps: int              # steps the spike policy did not apply (--spike-policy skip)
    rewinds: int                    # rewinds of --spike-policy rewind
    spikes: dict                    # {series: {rule: count}}
    spike_steps: dict               # {series: {rule: [flagged iterations]}}
    max_grad_norm: float | None
    max_loss_rise: float | None     # largest loss / running minimum of the loss
    max_loss_rise_step: int | None
    mean_grad_norm: float | None
    steps_to_best_baseline: int | None
    update_ratio_spread: float | None
    update_ratio_mean: dict         # {role: mean update ratio}
    update_ratio_rel_fc1: dict      # {role: mean of its update ratio / the reference role's}
    weight_norm_spread_final: float | None
    weight_rms_spread_final: float | None
    gate_count: int
    gate_max_rel_change: float | None
    tokens_per_s: float | None
    attn_logit_max_final: float | None      # the largest attention logit, last logged step
    attn_logit_max_peak: float | None       # ... its largest logged value
    output_log_z_final: float | None        # mean log Z over tokens, last logged step
    output_log_z_absmax_peak: float | None  # the largest logged max |log Z|
    sigma: float | None             # WeSaR's common std (the run's header)
    sigma_regime: str | None        # the sigma regime that placed it, if any
    alpha0: dict                    # {role: mean initial gate value}; {} without gates
    fp8_quant_rel_error: dict       # {role: mean FP8 quantization error of W_eff}; {} without
    fp8_weight_scale: dict          # {role: mean FP8 dequantization scale of W_bar}; {} without
    metrics_file: str               # relative to the study folder; added by summarize


class GridCell(TypedDict):
    """One (method, lr) over its seeds: an entry of summary["grid"][method][lr]."""

    final_valid_loss: float | None  # seed mean; inf when a seed diverged
    final_train_loss: float | None
    valid_std: float | None         # sample std over the seeds (None below two)
    seeds: list
    valid_by_seed: list
    diverged_seeds: list


class MethodSummary(TypedDict):
    """One method at its best LR: an entry of summary["methods"]."""

    lr: float
    final_valid_loss: float | None
    final_train_loss: float | None
    at_grid_edge: bool
    edge: str | None                # "low", "high" or None
    lrs: list                       # every LR the method ran at, ascending
    baseline: bool


class BestBaseline(TypedDict):
    """The baseline (method, lr) with the lowest final validation loss."""

    method: str
    lr: float
    final_valid_loss: float


class SeedSpread(TypedDict):
    """statistics.seed_spread: a cell's final validation losses over its seeds."""

    mean: float | None
    std: float | None
    n: int
    diverged: int


class PairedDifference(TypedDict):
    """statistics.paired_difference: method - baseline over their common seeds."""

    seeds: list
    diffs: list
    mean: float | None
    std: float | None
    n: int
    half_width: float | None        # 95% confidence interval half width (Student's t)
    verdict: str                    # "a lower", "b lower", "within noise", "one seed", ...


class Protocol(TypedDict):
    """One comparison protocol: which LR each method ran at, and its numbers there."""

    lrs: dict                       # {method: lr}
    cells: dict[str, SeedSpread]
    paired: dict[str, dict[str, PairedDifference]]  # {method: {baseline: difference}}


class Stability(TypedDict):
    """One method over the LR grid."""

    initial_loss: float | None
    lr_sensitivity: float | None    # Wortsman et al. 2023
    diverged_lrs: list
    highest_stable_lr: float | None
    blowup_lrs: list                # LRs where a run's loss rose above 1.1 x L0 after step 1


class Summary(TypedDict):
    """A study's summary (summary.json)."""

    config: dict                    # study.json
    runs: list[RunSummary]
    methods: dict[str, MethodSummary]
    grid: dict[str, dict[str, GridCell]]  # {method: {format_lr(lr): cell}}
    best_baseline: BestBaseline | None
    baseline_methods: list
    skipped_runs: dict              # {metrics file: why it could not be read}
    shared_lr: dict | None          # {"lr", "source"} of the shared-LR protocol
    protocols: dict[str, Protocol]  # "best" and (with a shared LR) "shared"
    stability: dict[str, Stability]
