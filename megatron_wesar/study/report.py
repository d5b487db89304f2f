"""`megatron-wesar report DIR`: render DIR/report.md and its figures from a study folder.

The report assembles, in this order: a header on the setup, the initial gates per role with the
sigma regime, the Findings paragraph (`findings`), the tables (`tables`: the two comparison
protocols and their paired differences, best LR per method, the LR x method validation-loss grid,
stability over the grid, spike counts per rule, update ratios per role at each method's best LR,
the instability proxies, the FP8 quantization error per role when the runs were in FP8) and the
figures (`figures`: loss curves per LR, the learning-rate sensitivity of Wortsman et al. 2023,
the relative update ratios over steps, the instability proxies over steps, and WeSaR's gate
values over steps).
"""
from __future__ import annotations

import os
import sys

from .figures import FIGURES, draw_figures
from .findings import findings
from .format import format_lr
from .schema import Summary
from .selection import methods_in_order
from .summary import load_summary, normalized, read_json, write_summary
from .tables import (
    table_alpha0,
    table_best,
    table_fp8_quantization,
    table_grid,
    table_paired,
    table_protocols,
    table_proxies,
    table_spikes,
    table_stability,
    table_update_ratios,
)


def _header(summary: Summary, study: dict) -> str:
    """The title, the setup, the grid of runs, the methods, and any stop, failed or skipped
    runs."""
    config = summary.get("config") or study or {}
    lines = [f"# WeSaR study{': ' + config['preset'] if config.get('preset') else ''}", ""]
    if config.get("description"):
        lines += [f"**Setup.** {config['description']}.", ""]
    if config.get("rationale"):
        lines += [f"**Why this setup.** {config['rationale']}", ""]
    runs = summary["runs"]
    wall = config.get("wall_time_s")
    methods = methods_in_order(summary)
    lrs = sorted({r["lr"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    lines.append(f"**Grid.** {len(methods)} methods x {len(lrs)} peak learning rates "
                 f"({', '.join(format_lr(lr) for lr in lrs)}) x {len(seeds)} seed(s) "
                 f"({', '.join(map(str, seeds))}) = {len(runs)} runs"
                 + (f"; study wall time {wall:.0f} s "
                    f"({config.get('world_size', '?')} ranks)" if wall else "") + ".")
    lines.append("")
    descriptions = config.get("method_descriptions", {})
    for m in methods:
        lines.append(f"- `{m}`: {descriptions.get(m, '')}".rstrip(": "))
    if config.get("pretrain_args"):
        lines += ["", "Driver arguments shared by every run: `"
                  + " ".join(config["pretrain_args"]) + "`"]
    if config.get("stopped_during"):
        lines += ["", f"**Stopped.** The study stopped during `{config['stopped_during']}` (an "
                      "exit signal), before its remaining runs; the same command resumes it."]
    failed = config.get("failed_runs") or {}
    if failed:
        lines += ["", "**Failed runs** (each run's error.txt holds the whole traceback):", ""]
        for name, message in failed.items():
            lines += [f"- `{name}`:", "  ```", *(f"  {line}" for line in message.splitlines()),
                      "  ```"]
    skipped = summary.get("skipped_runs") or {}
    if skipped:
        lines += ["", "**Skipped runs** (metrics files that cannot be read):", ""]
        lines += [f"- `{path}`: {why}" for path, why in skipped.items()]
    return "\n".join(lines)


def render_report(study_dir: str, summary: Summary | None = None) -> str:
    """Write DIR/report.md and the PNGs; return the report's path. The summary is read from
    summary.json (written from the run folders first when it does not exist). A study whose
    runs all failed (or were skipped) gets the header alone, which lists them."""
    study_dir = os.path.abspath(study_dir)
    if summary is None:
        summary = load_summary(study_dir)
    if summary is None:
        summary = write_summary(study_dir)
    else:
        summary = normalized(summary)
    study = read_json(os.path.join(study_dir, "study.json")) or {}
    path = os.path.join(study_dir, "report.md")
    if not summary["runs"]:
        config = summary.get("config") or study
        if not (config.get("failed_runs") or summary.get("skipped_runs")):
            raise ValueError(f"{study_dir}: no runs with a metrics file under runs/")
        with open(path, "w") as f:
            f.write(_header(summary, study) + "\n\nNo run has a readable metrics file: nothing "
                    "to compare.\n")
        return path
    has_gates = draw_figures(study_dir, summary)
    from ..monitor import SpikeTracker

    bb = summary.get("best_baseline")
    sections = [_header(summary, study)]
    alpha0 = table_alpha0(summary)
    if alpha0:
        sections += ["## Sigma regime and initial gates",
                     "alpha_0 = sigma_role / sigma per role (mean over the role's matrices), as "
                     "the gates started in the runs (the metrics header's initial_gates). Gates "
                     "below 1 mark the matrices whose update ratios WeSaR lowers.", alpha0]
    sections += [
        "## Findings",
        findings(summary),
        "## Two comparisons: each method at its best LR, every method at one shared LR",
        "Final validation loss, mean ± sample std over the seeds that ran the cell. The shared "
        "LR: " + (f"{format_lr(summary['shared_lr']['lr'])}, {summary['shared_lr']['source']}."
                  if summary.get("shared_lr") else "none (no baseline has a finite loss)."),
        table_protocols(summary),
        "Paired differences: per seed, the method's final validation loss minus the baseline's "
        "(the same seed: the same data order), mean ± the half width of its 95% interval "
        "(Student's t over the seeds). A method is lower or higher only when that interval "
        "excludes 0 (outside the seed noise).",
        table_paired(summary) or "No method other than the baselines ran.",
        "## Best learning rate per method",
        "Final train loss: mean over the last 10% of steps; final valid loss: the last "
        "evaluation (seed means where there are several seeds). Steps to the best baseline: the "
        "first evaluation at which the run's validation loss is <= the best baseline's final "
        "validation loss"
        + (f" ({bb['final_valid_loss']:.3f}, {bb['method']} at LR {format_lr(bb['lr'])})"
           if bb else "") + ", one entry per seed.",
        table_best(summary),
        "## Final validation loss: learning rate x method",
        "Bold: each method's best LR, selected on the seeds that ran every LR of the method; "
        "each cell is the mean over the seeds that ran it.",
        table_grid(summary),
        f"![learning-rate sensitivity]({FIGURES['lr_sensitivity']})",
        f"![loss curves]({FIGURES['loss_curves']})",
        "## Stability over the learning-rate grid",
        "A run diverged when a step was not finite or its final validation loss is not below "
        "its first training loss L0. LR sensitivity (Wortsman et al. 2023): the mean over the "
        "method's LRs of min(final loss, L0) minus its best final loss (seed means; a diverged "
        "cell counts as L0). The highest stable LR: the highest LR below every LR where a seed "
        "diverged. A blow-up: the training loss rises above 1.1x L0 after the first step, even "
        "when the run recovers (the spike rules' windows cannot see the first steps).",
        table_stability(summary),
        "## Spike counts per rule",
        "Summed over every run of a method (all LRs and seeds). Rules (from "
        "megatron_wesar.monitor): " + "; ".join(SpikeTracker().describe()) + ".",
        table_spikes(summary),
        "Gradient norms do not compare across methods: WeSaR's W_bar gradient is alpha times "
        "the effective weight's gradient.",
        "## Update ratios at each method's best LR",
        "Mean over the logged steps of ||dW_eff|| / ||W_eff|| per role (mean over the role's "
        "matrices), the attention-output and FFN-down ratios relative to FFN-up, and the spread "
        "(max/min over roles of the per-role mean).",
        table_update_ratios(summary),
        f"![update ratios]({FIGURES['update_ratios']})",
    ]
    proxies = table_proxies(summary)
    if proxies:
        sections += ["## Instability proxies",
                     "Wortsman et al. 2023: the largest attention logit (softmax_scale * q.k over "
                     "heads, tokens and unmasked pairs, max over layers) and the output "
                     "log-partition log Z (logsumexp over the vocabulary), measured on the "
                     "logging steps; seed means.", proxies,
                     f"![instability proxies]({FIGURES['proxies']})"]
    fp8 = table_fp8_quantization(summary)
    if fp8:
        sections += ["## FP8 quantization of the weights",
                     "Relative quantization error ||W_eff - alpha deq(q(W_bar))|| / ||W_eff|| of "
                     "the transformer linears' weights in their e4m3 GEMMs (torch-native FP8, "
                     "per-tensor scaling; megatron_wesar.fp8_stats) per role, mean over the "
                     "role's matrices and the logged steps, at each method's best LR (seed "
                     "means). The gate is an exact factor, so this is the error of what is "
                     "quantized: WeSaR's W_bar, a baseline's W. The scale spread compares the "
                     "roles' FP8 scales (amax / 448): one range for every matrix under WeSaR.",
                     fp8]
    if has_gates:
        sections += ["## Gates", "Each gate relative to its first logged value, at the gated "
                     "method's best LR.", f"![gates]({FIGURES['gates']})"]
    with open(path, "w") as f:
        f.write("\n\n".join(sections) + "\n")
    return path


def main(argv=None) -> int:
    """`megatron-wesar report DIR [--resummarize]`."""
    import argparse

    p = argparse.ArgumentParser(prog="megatron-wesar report",
                                description="(Re)render DIR/report.md and its figures.")
    p.add_argument("dir", help="the study folder")
    p.add_argument("--resummarize", action="store_true",
                   help="rebuild summary.json from the run folders first")
    ns = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not os.path.isdir(ns.dir):
        p.error(f"{ns.dir}: no such folder")
    summary = write_summary(ns.dir) if ns.resummarize else None
    try:
        path = render_report(ns.dir, summary)
    except ValueError as err:
        print(f"megatron-wesar report: {err}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0
