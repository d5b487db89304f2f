"""The report's Markdown tables: best LR per method, the LR x method grid, spike counts per rule
and update ratios per role."""
from __future__ import annotations

import math

from ..init import ROLES
from ..metric_keys import SPIKE_RULES, SPIKE_SERIES
from .format import format_lr, format_number, format_ratio, markdown_table
from .schema import Summary
from .selection import best_runs, methods_in_order, role_stats, runs_at
from .summary import REFERENCE_ROLE, RELATIVE_ROLES


def table_best(summary: Summary) -> str:
    """Per method: its best LR, final losses there, the gap to the best method, the steps to
    the best baseline's validation loss and whether the best LR is at an end of the grid."""
    methods = methods_in_order(summary)
    finite = [summary["methods"][m]["final_valid_loss"] for m in methods]
    finite = [v for v in finite if v is not None and math.isfinite(v)]
    best_valid = min(finite) if finite else None
    rows = []
    for m in methods:
        info = summary["methods"][m]
        runs = runs_at(summary, m, info["lr"])
        delta = (info["final_valid_loss"] - best_valid
                 if info["final_valid_loss"] is not None and best_valid is not None
                 and math.isfinite(info["final_valid_loss"]) else None)
        steps = [r["steps_to_best_baseline"] for r in runs]
        steps_text = ", ".join("never" if s is None else str(s) for s in steps) \
            if summary.get("best_baseline") else "n/a"
        edge = {"low": "lowest LR of the grid", "high": "highest LR of the grid"}.get(
            info.get("edge"), "")
        rows.append([m, format_lr(info["lr"]), format_number(info["final_train_loss"]),
                     format_number(info["final_valid_loss"]),
                     "best" if delta == 0 else (f"+{delta:.3f}" if delta is not None else "n/a"),
                     steps_text, edge])
    return markdown_table(["method", "best LR", "final train loss", "final valid loss",
                   "valid vs best method", "steps to best baseline's valid loss",
                   "best LR at grid edge"], rows)


def table_grid(summary: Summary) -> str:
    """Seed-mean final validation loss per method and LR (train loss where no evaluation);
    each method's best LR in bold."""
    methods = methods_in_order(summary)
    lrs = sorted({r["lr"] for r in summary["runs"]})
    rows = []
    for m in methods:
        cells = summary["grid"].get(m, {})
        best = summary["methods"][m]["lr"]
        row = [m]
        for lr in lrs:
            cell = cells.get(format_lr(lr))
            if cell is None:
                row.append("")
                continue
            text = format_number(cell["final_valid_loss"])
            if cell["final_valid_loss"] is None:
                text = f"({format_number(cell['final_train_loss'])} train)"
            row.append(f"**{text}**" if lr == best else text)
        rows.append(row)
    return markdown_table(["method"] + [f"LR {format_lr(lr)}" for lr in lrs], rows)


def table_spikes(summary: Summary) -> str:
    """Per method, summed over its runs: spikes per series and rule, non-finite steps (and,
    when a spike policy acted in any run, the steps it skipped and its rewinds), the largest
    loss rise above its running minimum and the largest gradient norm."""
    methods = methods_in_order(summary)
    acted = any(r.get("skipped_steps") or r.get("rewinds") for r in summary["runs"])
    header = ["method", "runs"] + [f"{s} / {r}" for s in SPIKE_SERIES for r in SPIKE_RULES] + [
        "non-finite steps"] + (["skipped steps", "rewinds"] if acted else []) + [
        "max loss / running min: best LR", "any LR", "max grad norm (any LR)"]
    rows = []
    for m in methods:
        runs = [r for r in summary["runs"] if m == r["method"]]
        row = [m, len(runs)]
        for series in SPIKE_SERIES:
            for rule in SPIKE_RULES:
                row.append(sum(int(r["spikes"].get(series, {}).get(rule, 0)) for r in runs))
        row.append(sum(r.get("nonfinite_steps", 0) for r in runs))
        if acted:
            row += [sum(r.get(key, 0) for r in runs) for key in ("skipped_steps", "rewinds")]
        best = [r["max_loss_rise"] for r in runs if r["lr"] == summary["methods"][m]["lr"]
                and r.get("max_loss_rise") is not None]
        every = [r for r in runs if r.get("max_loss_rise") is not None]
        row.append(format_ratio(max(best)) if best else "n/a")
        if every:
            top = max(every, key=lambda r: r["max_loss_rise"])
            row.append(f"{format_ratio(top['max_loss_rise'])} (LR {format_lr(top['lr'])}, "
                       f"step {top['max_loss_rise_step']})")
        else:
            row.append("n/a")
        norms = [r["max_grad_norm"] for r in runs if r["max_grad_norm"] is not None]
        row.append(format_number(max(norms), 2) if norms else "n/a")
        rows.append(row)
    return markdown_table(header, rows)


def table_update_ratios(summary: Summary) -> str:
    """Per method at its best LR: the mean update ratio per role, relative to the reference
    role, and their spread."""
    methods = methods_in_order(summary)
    runs_at_best = best_runs(summary)
    rows = []
    for m in methods:
        stats = role_stats(runs_at_best[m])
        row = [m, format_lr(summary["methods"][m]["lr"])]
        row += [f"{stats['roles'][role]:.2e}" if role in stats["roles"] else "n/a"
                for role in ROLES]
        row += [format_ratio(stats["rel"].get(role)) for role in RELATIVE_ROLES]
        row.append(format_ratio(stats["spread"]))
        rows.append(row)
    header = ["method", "LR"] + list(ROLES) + [f"{r}/{REFERENCE_ROLE}" for r in RELATIVE_ROLES] + [
        "spread (max/min over roles)"]
    return markdown_table(header, rows)


# --------------------------------------------------------------------------- findings
