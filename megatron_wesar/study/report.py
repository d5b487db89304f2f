"""`megatron-wesar report DIR`: render DIR/report.md and its figures from a study folder.

Figures (matplotlib, Agg backend): loss curves per learning rate (methods overlaid), final
validation loss against learning rate per method (the learning-rate sensitivity of Wortsman et
al. 2023), the update ratios of attention-output and FFN-down relative to FFN-up over steps per
method at its best LR, and WeSaR's gate values over steps. Tables: best LR per method, the LR x
method validation-loss grid, spike counts per rule, update ratios per role at each method's best
LR. The Findings paragraph is generated from the same numbers.
"""
from __future__ import annotations

import math
import os
import sys

from .summary import (
    REFERENCE_ROLE,
    RELATIVE_ROLES,
    ROLES,
    SPIKE_RULES,
    SPIKE_SERIES,
    format_lr,
    load_metrics,
    load_summary,
    read_json,
    write_summary,
)

FIGURES = {
    "loss_curves": "loss_curves.png",
    "lr_sensitivity": "lr_sensitivity.png",
    "update_ratios": "update_ratios.png",
    "gates": "gates.png",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- formatting


def _f(value, digits=3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "diverged" if value > 0 or math.isnan(value) else str(value)
    return f"{value:.{digits}f}"


def _x(value, digits=2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}x"


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _methods(summary: dict) -> list:
    order = list(summary.get("config", {}).get("methods", []))
    present = {r["method"] for r in summary["runs"]}
    return [m for m in order if m in present] + sorted(present - set(order))


def _runs_at(summary: dict, method: str, lr: float) -> list:
    return [r for r in summary["runs"] if r["method"] == method and r["lr"] == lr]


def _mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return math.fsum(values) / len(values) if values else None


def _best_runs(summary: dict) -> dict:
    """{method: runs at its best LR}."""
    return {m: _runs_at(summary, m, info["lr"]) for m, info in summary["methods"].items()}


def _role_stats(runs: list) -> dict:
    """Seed means of the update-ratio statistics of some runs of one (method, lr)."""
    out = {"roles": {}, "rel": {}}
    for role in ROLES:
        value = _mean([r["update_ratio_mean"].get(role) for r in runs])
        if value is not None:
            out["roles"][role] = value
    for role in RELATIVE_ROLES:
        value = _mean([r["update_ratio_rel_fc1"].get(role) for r in runs])
        if value is not None:
            out["rel"][role] = value
    out["spread"] = _mean([r["update_ratio_spread"] for r in runs])
    return out


# --------------------------------------------------------------------------- tables


def table_best(summary: dict) -> str:
    methods = _methods(summary)
    finite = [summary["methods"][m]["final_valid_loss"] for m in methods]
    finite = [v for v in finite if v is not None and math.isfinite(v)]
    best_valid = min(finite) if finite else None
    rows = []
    for m in methods:
        info = summary["methods"][m]
        runs = _runs_at(summary, m, info["lr"])
        delta = (info["final_valid_loss"] - best_valid
                 if info["final_valid_loss"] is not None and best_valid is not None
                 and math.isfinite(info["final_valid_loss"]) else None)
        steps = [r["steps_to_best_baseline"] for r in runs]
        steps_text = ", ".join("never" if s is None else str(s) for s in steps) \
            if summary.get("best_baseline") else "n/a"
        edge = {"low": "lowest LR of the grid", "high": "highest LR of the grid"}.get(
            info.get("edge"), "")
        rows.append([m, format_lr(info["lr"]), _f(info["final_train_loss"]),
                     _f(info["final_valid_loss"]),
                     "best" if delta == 0 else (f"+{delta:.3f}" if delta is not None else "n/a"),
                     steps_text, edge])
    return _table(["method", "best LR", "final train loss", "final valid loss",
                   "valid vs best method", "steps to best baseline's valid loss",
                   "best LR at grid edge"], rows)


def table_grid(summary: dict) -> str:
    methods = _methods(summary)
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
            text = _f(cell["final_valid_loss"])
            if cell["final_valid_loss"] is None:
                text = f"({_f(cell['final_train_loss'])} train)"
            row.append(f"**{text}**" if lr == best else text)
        rows.append(row)
    return _table(["method"] + [f"LR {format_lr(lr)}" for lr in lrs], rows)


def table_spikes(summary: dict) -> str:
    methods = _methods(summary)
    header = ["method", "runs"] + [f"{s} / {r}" for s in SPIKE_SERIES for r in SPIKE_RULES] + [
        "non-finite steps", "max loss / running min: best LR", "any LR",
        "max grad norm (any LR)"]
    rows = []
    for m in methods:
        runs = [r for r in summary["runs"] if m == r["method"]]
        row = [m, len(runs)]
        for series in SPIKE_SERIES:
            for rule in SPIKE_RULES:
                row.append(sum(int(r["spikes"].get(series, {}).get(rule, 0)) for r in runs))
        row.append(sum(r.get("nonfinite_steps", 0) for r in runs))
        best = [r["max_loss_rise"] for r in runs if r["lr"] == summary["methods"][m]["lr"]
                and r.get("max_loss_rise") is not None]
        every = [r for r in runs if r.get("max_loss_rise") is not None]
        row.append(_x(max(best)) if best else "n/a")
        if every:
            top = max(every, key=lambda r: r["max_loss_rise"])
            row.append(f"{_x(top['max_loss_rise'])} (LR {format_lr(top['lr'])}, "
                       f"step {top['max_loss_rise_step']})")
        else:
            row.append("n/a")
        norms = [r["max_grad_norm"] for r in runs if r["max_grad_norm"] is not None]
        row.append(_f(max(norms), 2) if norms else "n/a")
        rows.append(row)
    return _table(header, rows)


def table_update_ratios(summary: dict) -> str:
    methods = _methods(summary)
    best_runs = _best_runs(summary)
    rows = []
    for m in methods:
        stats = _role_stats(best_runs[m])
        row = [m, format_lr(summary["methods"][m]["lr"])]
        row += [f"{stats['roles'][role]:.2e}" if role in stats["roles"] else "n/a"
                for role in ROLES]
        row += [_x(stats["rel"].get(role)) for role in RELATIVE_ROLES]
        row.append(_x(stats["spread"]))
        rows.append(row)
    header = ["method", "LR"] + list(ROLES) + [f"{r}/{REFERENCE_ROLE}" for r in RELATIVE_ROLES] + [
        "spread (max/min over roles)"]
    return _table(header, rows)


# --------------------------------------------------------------------------- findings


def findings(summary: dict) -> str:
    """The Findings paragraph, generated from the summary's numbers."""
    methods = _methods(summary)
    if not methods:
        return "No runs."
    info = summary["methods"]
    runs = summary["runs"]
    parts = []
    seeds = sorted({r["seed"] for r in runs})
    ranked = sorted(methods, key=lambda m: (
        info[m]["final_valid_loss"] if info[m]["final_valid_loss"] is not None
        and math.isfinite(info[m]["final_valid_loss"]) else math.inf))
    top = ranked[0]
    top_loss = info[top]["final_valid_loss"]
    seed_text = (f" (mean over {len(seeds)} seeds)" if len(seeds) > 1 else " (one seed)")
    if top_loss is None:
        parts.append("No run has a validation loss; the ranking below would use training loss.")
    else:
        others = []
        for m in ranked[1:]:
            v = info[m]["final_valid_loss"]
            if v is None or not math.isfinite(v):
                others.append(f"{m} has no finite validation loss")
                continue
            others.append(f"{m} {v:.3f} at LR {format_lr(info[m]['lr'])} "
                          f"(+{v - top_loss:.3f}, +{100 * (v - top_loss) / top_loss:.1f}%)")
        parts.append(
            f"Compared at each method's own best learning rate, {top} reaches the lowest final "
            f"validation loss{seed_text}: {top_loss:.3f} at LR {format_lr(info[top]['lr'])}"
            + ("; " + "; ".join(others) if others else "") + ".")
        if len(ranked) > 1:
            second = ranked[1]
            v2 = info[second]["final_valid_loss"]
            if v2 is not None and math.isfinite(v2) and v2 - top_loss < 0.01:
                parts.append(f"The gap between {top} and {second} ({v2 - top_loss:.3f}) is "
                             "within what one seed of this size can separate.")
    edges = [m for m in methods if info[m].get("at_grid_edge")]
    if edges:
        listed = ", ".join(f"{m} ({format_lr(info[m]['lr'])}, {info[m]['edge']} end)"
                           for m in edges)
        if len(edges) == 1:
            parts.append(f"The best LR of {listed} is at an end of the grid, so its optimum "
                         "may lie outside the grid.")
        else:
            parts.append(f"The best LRs of {listed} are at an end of the grid, so their optima "
                         "may lie outside the grid.")
    else:
        parts.append("Every method's best LR lies inside the grid (not at either end).")
    bb = summary.get("best_baseline")
    for m in methods:
        if info[m].get("baseline") or not bb:
            continue
        best = _runs_at(summary, m, info[m]["lr"])
        reached = [r["steps_to_best_baseline"] for r in best]
        iters = best[0].get("train_iters") or best[0].get("steps")
        if all(s is not None for s in reached):
            parts.append(
                f"{m} at its best LR reaches the best baseline's final validation loss "
                f"({bb['final_valid_loss']:.3f}, {bb['method']} at LR {format_lr(bb['lr'])}) at "
                f"step {', '.join(map(str, reached))} of {iters}.")
        else:
            parts.append(
                f"{m} at its best LR does not reach the best baseline's final validation loss "
                f"({bb['final_valid_loss']:.3f}, {bb['method']} at LR {format_lr(bb['lr'])}) "
                f"within {iters} steps in {sum(s is None for s in reached)} of {len(reached)} "
                "run(s).")
    total = {(s, r): sum(int(x["spikes"].get(s, {}).get(r, 0)) for x in runs)
             for s in SPIKE_SERIES for r in SPIKE_RULES}
    nonfinite = sum(x.get("nonfinite_steps", 0) for x in runs)
    rules = ", ".join(SPIKE_RULES)
    if not any(total.values()) and not nonfinite:
        parts.append(f"No spikes: no rule ({rules}) flagged any step of the loss or of the "
                     f"gradient norm in any of the {len(runs)} runs, and no loss was non-finite.")
    else:
        parts.append(_spike_text(summary, methods, total, nonfinite))
    rises = [r for r in runs if r.get("max_loss_rise") is not None]
    if rises:
        top = max(rises, key=lambda r: r["max_loss_rise"])
        at_best = []
        for m in methods:
            values = [r["max_loss_rise"] for r in rises
                      if r["method"] == m and r["lr"] == info[m]["lr"]]
            if values:
                at_best.append(f"{m} {max(values):.2f}x")
        parts.append(
            "Independent of the rules' windows, the largest rise of the training loss above its "
            f"running minimum is {top['max_loss_rise']:.2f}x ({top['method']} at LR "
            f"{format_lr(top['lr'])}, step {top['max_loss_rise_step']}); at each method's best "
            "LR it is " + ", ".join(at_best) + ".")
    iters = max((r.get("train_iters") or r.get("steps") or 0) for r in runs)
    from ..monitor import MegatronRule, ZScoreRule

    late = max(MegatronRule().window, ZScoreRule().warmup)
    waits = (f"both wait for the first {late} steps" if MegatronRule().window ==
             ZScoreRule().warmup else f"which wait for the first {MegatronRule().window} and "
             f"{ZScoreRule().warmup} steps")
    if iters and iters <= late:
        parts.append(f"With {iters} steps per run, the megatron and zscore rules ({waits}) "
                     "cannot flag any step here; only relmin can.")
    elif iters and iters <= late + ZScoreRule().window:
        parts.append(f"With {iters} steps per run, the megatron and zscore rules ({waits}) "
                     f"only see the last {iters - late} steps of each run.")
    best_runs = _best_runs(summary)
    stats = {m: _role_stats(best_runs[m]) for m in methods}
    rel_text = []
    for role in RELATIVE_ROLES:
        values = [f"{m} {stats[m]['rel'][role]:.2f}x" for m in methods if role in stats[m]["rel"]]
        if values:
            rel_text.append(f"{role}/{REFERENCE_ROLE}: " + ", ".join(values))
    spreads = {m: stats[m]["spread"] for m in methods if stats[m]["spread"] is not None}
    if rel_text or spreads:
        text = ("Update ratios ||dW_eff||/||W_eff|| at each method's best LR (mean over the "
                "logged steps): " + "; ".join(rel_text) + ".")
        if spreads:
            low = min(spreads, key=spreads.get)
            high = max(spreads, key=spreads.get)
            def extremes(m):
                roles = stats[m]["roles"]
                if len(roles) < 2:
                    return ""
                return (f" ({max(roles, key=roles.get)} highest, "
                        f"{min(roles, key=roles.get)} lowest)")

            text += (" The spread across roles (max/min of the per-role mean) is "
                     + ", ".join(f"{m} {v:.2f}{extremes(m)}" for m, v in spreads.items())
                     + f": the most uniform are {low}'s, the least uniform {high}'s.")
        parts.append(text)
    gate_runs = [r for r in runs if r.get("gate_count")]
    if gate_runs:
        for m in methods:
            mine = [r for r in best_runs[m] if r.get("gate_max_rel_change") is not None]
            if mine:
                change = max(r["gate_max_rel_change"] for r in mine)
                parts.append(f"{m}'s gates moved at most {100 * change:.2f}% (last against first "
                             f"logged value) at its best LR.")
    return " ".join(parts)


def _spike_text(summary: dict, methods: list, total: dict, nonfinite: int) -> str:
    """Where the spike rules fired: per series and rule, the share of steps, the runs; a series
    no rule flagged is said plainly to have no spikes."""
    runs = summary["runs"]
    all_steps = sum(r.get("steps") or 0 for r in runs)
    rules = ", ".join(SPIKE_RULES)
    names = {"loss": "training loss", "grad_norm": "gradient norm"}
    out = []
    for series in SPIKE_SERIES:
        fired = {rule: total[(series, rule)] for rule in SPIKE_RULES if total[(series, rule)]}
        if not fired:
            out.append(f"No {names.get(series, series)} spikes: no rule ({rules}) flagged a "
                       f"step of the {names.get(series, series)} in any of the {len(runs)} runs.")
            continue
        sentences = []
        for rule, count in fired.items():
            hit = [r for r in runs if int(r["spikes"].get(series, {}).get(rule, 0))]
            text = (f"{series}/{rule} flagged {count} of {all_steps} steps "
                    f"({100 * count / max(all_steps, 1):.1f}%) in {len(hit)} of {len(runs)} runs")
            if len(hit) <= 4:
                details = []
                for r in hit:
                    steps = (r.get("spike_steps") or {}).get(series, {}).get(rule, [])
                    shown = ", ".join(map(str, steps[:5])) + (", ..." if len(steps) > 5 else "")
                    details.append(f"{r['method']} at LR {format_lr(r['lr'])} seed {r['seed']}"
                                   + (f" (steps {shown})" if steps else ""))
                text += ": " + "; ".join(details)
            else:
                per_method = {m: sum(int(r["spikes"].get(series, {}).get(rule, 0))
                                     for r in runs if r["method"] == m) for m in methods}
                text += (" (by method: " + ", ".join(f"{m} {n}" for m, n in per_method.items())
                         + ")")
            sentences.append(text)
        quiet = [rule for rule in SPIKE_RULES if rule not in fired]
        text = "Spike rules fired on the " + names.get(series, series) + ": " + "; ".join(
            sentences) + "."
        if quiet:
            text += f" Rules {', '.join(quiet)} flagged none of its steps."
        out.append(text)
    if nonfinite:
        out.append(f"{nonfinite} steps had a non-finite loss or gradient norm.")
    return " ".join(out)


# --------------------------------------------------------------------------- figures


def _colors(methods: list) -> dict:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def _smooth(values: list, window: int) -> list:
    if window <= 1:
        return values
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _metrics_cache(study_dir: str, summary: dict) -> dict:
    cache = {}
    for r in summary["runs"]:
        path = os.path.join(study_dir, r.get("metrics_file", ""))
        if os.path.isfile(path):
            cache[(r["method"], r["lr"], r["seed"])] = load_metrics(path)
    return cache


def figure_loss_curves(summary, cache, path):
    plt = _pyplot()
    methods = _methods(summary)
    colors = _colors(methods)
    lrs = sorted({r["lr"] for r in summary["runs"]})
    ncols = min(len(lrs), 3)
    nrows = math.ceil(len(lrs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False,
                             sharey=True)
    tails = []
    for i, lr in enumerate(lrs):
        ax = axes[i // ncols][i % ncols]
        for m in methods:
            labelled = False
            for r in _runs_at(summary, m, lr):
                metrics = cache.get((m, lr, r["seed"]))
                if metrics is None or not metrics.steps:
                    continue
                xs = [s["iteration"] for s in metrics.steps]
                ys = [s.get("loss") for s in metrics.steps]
                ys = [float(y) if isinstance(y, (int, float)) else math.nan for y in ys]
                ys = _smooth(ys, max(1, len(ys) // 30))
                ax.plot(xs, ys, color=colors[m], lw=1.2, alpha=0.85,
                        label=None if labelled else f"{m} train")
                tails += [y for y in ys[len(ys) // 5:] if math.isfinite(y)]
                if metrics.evals:
                    ex = [e[0] for e in metrics.evals]
                    ey = [e[1] if e[1] is not None else math.nan for e in metrics.evals]
                    ax.plot(ex, ey, "o--", color=colors[m], ms=3.5, lw=0.8,
                            label=None if labelled else f"{m} valid")
                    tails += [y for y in ey if math.isfinite(y)]
                labelled = True
        ax.set_title(f"peak LR {format_lr(lr)}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel("loss (nats/token)")
    for j in range(len(lrs), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    if tails:
        tails.sort()
        low, high = tails[0], tails[min(len(tails) - 1, int(0.98 * len(tails)))]
        pad = 0.05 * (high - low or 1.0)
        axes[0][0].set_ylim(low - pad, high + 4 * pad)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle("Training loss (smoothed) and validation loss, one panel per peak LR")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def figure_lr_sensitivity(summary, path):
    plt = _pyplot()
    methods = _methods(summary)
    colors = _colors(methods)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    finite_all = []
    for m in methods:
        cells = summary["grid"].get(m, {})
        lrs = sorted(summary["methods"][m]["lrs"])
        xs, ys = [], []
        for lr in lrs:
            cell = cells.get(format_lr(lr))
            v = cell["final_valid_loss"] if cell else None
            if v is not None and math.isfinite(v):
                xs.append(lr)
                ys.append(v)
                for sv in cell.get("valid_by_seed", []):
                    if sv is not None and math.isfinite(sv):
                        ax.plot([lr], [sv], ".", color=colors[m], alpha=0.4)
        finite_all += ys
        ax.plot(xs, ys, "o-", color=colors[m], label=m)
        best = summary["methods"][m]
        if best["final_valid_loss"] is not None and math.isfinite(best["final_valid_loss"]):
            ax.plot([best["lr"]], [best["final_valid_loss"]], "*", ms=14, color=colors[m],
                    markeredgecolor="black")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title("Learning-rate sensitivity (star: each method's best LR)")
    ax.grid(alpha=0.3, which="both")
    if finite_all:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def figure_update_ratios(summary, cache, path):
    plt = _pyplot()
    methods = _methods(summary)
    colors = _colors(methods)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    any_data = False
    for m in methods:
        lr = summary["methods"][m]["lr"]
        for k, r in enumerate(_runs_at(summary, m, lr)):
            metrics = cache.get((m, lr, r["seed"]))
            if metrics is None:
                continue
            logged = metrics.logged
            label = f"{m} (LR {format_lr(lr)})" if k == 0 else None
            for ax, role in zip(axes, RELATIVE_ROLES):
                xs, ys = [], []
                for rec in logged:
                    num = rec.get(f"update_ratio_mean/{role}")
                    den = rec.get(f"update_ratio_mean/{REFERENCE_ROLE}")
                    if isinstance(num, (int, float)) and isinstance(den, (int, float)) and den:
                        xs.append(rec["iteration"])
                        ys.append(num / den)
                if xs:
                    any_data = True
                    ax.plot(xs, ys, "-", color=colors[m], label=label)
            xs = [rec["iteration"] for rec in logged
                  if isinstance(rec.get("update_ratio_spread"), (int, float))]
            ys = [rec["update_ratio_spread"] for rec in logged
                  if isinstance(rec.get("update_ratio_spread"), (int, float))]
            if xs:
                axes[2].plot(xs, ys, "-", color=colors[m], label=label)
    for ax, role in zip(axes, RELATIVE_ROLES):
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_title(f"update ratio {role} / {REFERENCE_ROLE}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[2].axhline(1.0, color="gray", lw=0.8, ls=":")
    axes[2].set_title("spread: max/min over roles of the mean update ratio")
    axes[2].set_xlabel("step")
    axes[2].grid(alpha=0.3)
    if any_data:
        axes[0].legend(fontsize=8)
    fig.suptitle("||dW_eff|| / ||W_eff|| per role, each method at its best LR")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _role_of(matrix: str) -> str:
    for needle, role in (("linear_qkv", "qkv"), ("linear_proj", "attn_proj"),
                         ("linear_fc1", "fc1"), ("linear_fc2", "fc2"),
                         ("word_embeddings", "embedding"), ("output_layer", "output")):
        if needle in matrix:
            return role
    return "other"


def figure_gates(summary, cache, path) -> bool:
    """WeSaR gates over steps, each relative to its first logged value; False: no gates."""
    from .summary import gate_trajectories

    plt = _pyplot()
    gated = [m for m in _methods(summary)
             if any(r.get("gate_count") for r in summary["runs"] if r["method"] == m)]
    if not gated:
        return False
    fig, axes = plt.subplots(1, len(gated), figsize=(6.5 * len(gated), 4), squeeze=False)
    role_colors = dict(zip(ROLES + ("other",), ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e",
                                                 "#9467bd", "#8c564b", "#7f7f7f"]))
    for ax, m in zip(axes[0], gated):
        lr = summary["methods"][m]["lr"]
        runs = _runs_at(summary, m, lr)
        metrics = cache.get((m, lr, runs[0]["seed"])) if runs else None
        seen = set()
        for name, values in (gate_trajectories(metrics).items() if metrics else []):
            role = _role_of(name)
            xs = [v[0] for v in values]
            ys = [v[1] / values[0][1] if values[0][1] else math.nan for v in values]
            ax.plot(xs, ys, color=role_colors[role], lw=0.9, alpha=0.8,
                    label=None if role in seen else role)
            seen.add(role)
        ax.set_title(f"{m} gates at LR {format_lr(lr)} (seed {runs[0]['seed'] if runs else '?'})")
        ax.set_xlabel("step")
        ax.set_ylabel("gate / first logged gate value")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- the report


def _header(summary: dict, study: dict) -> str:
    config = summary.get("config") or study or {}
    lines = [f"# WeSaR study{': ' + config['preset'] if config.get('preset') else ''}", ""]
    if config.get("description"):
        lines += [f"**Setup.** {config['description']}.", ""]
    if config.get("rationale"):
        lines += [f"**Why this setup.** {config['rationale']}", ""]
    runs = summary["runs"]
    wall = config.get("wall_time_s")
    methods = _methods(summary)
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
    skipped = config.get("skipped_methods") or {}
    for name, why in skipped.items():
        lines.append(f"- `{name}`: skipped ({why}).")
    if config.get("pretrain_args"):
        lines += ["", "Driver arguments shared by every run: `"
                  + " ".join(config["pretrain_args"]) + "`"]
    failed = config.get("failed_runs") or {}
    if failed:
        lines += ["", "**Failed runs.** " + "; ".join(f"{k}: {v}" for k, v in failed.items())]
    return "\n".join(lines)


def render_report(study_dir: str, summary: dict | None = None) -> str:
    """Write DIR/report.md and the PNGs; return the report's path. The summary is read from
    summary.json (written from the run folders first when it does not exist)."""
    study_dir = os.path.abspath(study_dir)
    if summary is None:
        summary = load_summary(study_dir)
    if summary is None:
        summary = write_summary(study_dir)
    else:
        from .summary import _json_safe, _restore

        summary = _restore(_json_safe(summary))
    if not summary["runs"]:
        raise ValueError(f"{study_dir}: no runs with a metrics file under runs/")
    study = read_json(os.path.join(study_dir, "study.json")) or {}
    cache = _metrics_cache(study_dir, summary)
    figure_loss_curves(summary, cache, os.path.join(study_dir, FIGURES["loss_curves"]))
    figure_lr_sensitivity(summary, os.path.join(study_dir, FIGURES["lr_sensitivity"]))
    figure_update_ratios(summary, cache, os.path.join(study_dir, FIGURES["update_ratios"]))
    has_gates = figure_gates(summary, cache, os.path.join(study_dir, FIGURES["gates"]))
    if not has_gates and os.path.exists(os.path.join(study_dir, FIGURES["gates"])):
        os.remove(os.path.join(study_dir, FIGURES["gates"]))
    from ..monitor import default_rules

    bb = summary.get("best_baseline")
    sections = [
        _header(summary, study),
        "## Findings",
        findings(summary),
        "## Best learning rate per method",
        "Final train loss: mean over the last 10% of steps; final valid loss: the last "
        "evaluation (seed means where there are several seeds). Steps to the best baseline: the "
        "first evaluation at which the run's validation loss is <= the best baseline's final "
        "validation loss"
        + (f" ({bb['final_valid_loss']:.3f}, {bb['method']} at LR {format_lr(bb['lr'])})"
           if bb else "") + ", one entry per seed.",
        table_best(summary),
        "## Final validation loss: learning rate x method",
        "Bold: each method's best LR.",
        table_grid(summary),
        f"![learning-rate sensitivity]({FIGURES['lr_sensitivity']})",
        f"![loss curves]({FIGURES['loss_curves']})",
        "## Spike counts per rule",
        "Summed over every run of a method (all LRs and seeds). Rules (from "
        "megatron_wesar.monitor): " + "; ".join(r.describe() for r in default_rules()) + ".",
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
    if has_gates:
        sections += ["## Gates", "Each gate relative to its first logged value, at the gated "
                     "method's best LR.", f"![gates]({FIGURES['gates']})"]
    path = os.path.join(study_dir, "report.md")
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
