"""The report's Markdown tables: best LR per method, the LR x method grid, spike counts per rule,
update ratios per role, the initial gates per role, the two comparison protocols and their paired
differences, LR sensitivity and the instability proxies."""
from __future__ import annotations

import math

from ..init import ROLES
from ..metric_keys import SPIKE_RULES, SPIKE_SERIES
from .format import format_lr, format_number, format_ratio, markdown_table
from .schema import Summary
from .selection import best_runs, methods_in_order, role_stats, runs_at
from .summary import BLOWUP_FACTOR, REFERENCE_ROLE, RELATIVE_ROLES, mean


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
    header = ["method", "runs"] + [f"{s} / {r}" for s in SPIKE_SERIES for r in SPIKE_RULES[s]] + [
        "non-finite steps"] + (["skipped steps", "rewinds"] if acted else []) + [
        "max loss / running min: best LR", "any LR", "max grad norm (any LR)"]
    rows = []
    for m in methods:
        runs = [r for r in summary["runs"] if m == r["method"]]
        row = [m, len(runs)]
        for series in SPIKE_SERIES:
            for rule in SPIKE_RULES[series]:
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



def format_spread(spread: dict | None, digits: int = 3) -> str:
    """A seed_spread as "mean ± std (n seeds)", "mean (1 seed)", with diverged seeds named."""
    if not spread or spread.get("mean") is None:
        text = "n/a"
    elif spread.get("std") is None:
        text = f"{spread['mean']:.{digits}f} (1 seed)"
    else:
        text = f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f} ({spread['n']} seeds)"
    if spread and spread.get("diverged"):
        text += f", {spread['diverged']} diverged"
    return text


VERDICTS = {"a lower": "{a} lower", "b lower": "{b} lower", "within noise": "within seed noise",
            "one seed": "one seed: no noise estimate", "no common seed": "no common seed"}


def format_paired(diff: dict, a: str, b: str) -> str:
    """A paired_difference as "mean ± 95% half width (n seeds): verdict"."""
    verdict = VERDICTS[diff["verdict"]].format(a=a, b=b)
    if diff["mean"] is None:
        return verdict
    if diff["half_width"] is None:
        return f"{diff['mean']:+.3f} ({diff['n']} seed): {verdict}"
    return f"{diff['mean']:+.3f} ± {diff['half_width']:.3f} ({diff['n']} seeds): {verdict}"


def table_alpha0(summary: Summary) -> str:
    """Per gated method: the sigma regime, sigma, and alpha_0 (the initial gate value, mean over
    the role's matrices) per role, from the runs' metrics headers."""
    gated = {}
    for r in summary["runs"]:
        if r.get("alpha0") and r["method"] not in gated:
            gated[r["method"]] = r
    if not gated:
        return ""
    roles = [role for role in (*ROLES, "other") if any(role in r["alpha0"]
                                                       for r in gated.values())]
    rows = [[m, r.get("sigma_regime") or "none (explicit sigma)",
             f"{r['sigma']:.4g}" if r.get("sigma") is not None else "n/a"]
            + [f"{r['alpha0'][role]:.3g}" if role in r["alpha0"] else "" for role in roles]
            for m, r in gated.items()]
    return markdown_table(["method", "sigma regime", "sigma"] + roles, rows)


def table_protocols(summary: Summary) -> str:
    """Per method, side by side: its best LR and final validation loss there, and its final
    validation loss at the shared LR (seed mean ± std)."""
    protocols = summary.get("protocols") or {}
    best, shared = protocols.get("best"), protocols.get("shared")
    shared_lr = (summary.get("shared_lr") or {}).get("lr")
    header = ["method", "best LR", "valid at its best LR"]
    if shared:
        header.append(f"valid at the shared LR {format_lr(shared_lr)}")
    rows = []
    for m in methods_in_order(summary):
        row = [m, format_lr(best["lrs"][m]), format_spread(best["cells"].get(m))]
        if shared:
            row.append(format_spread(shared["cells"].get(m)) if m in shared["cells"] else
                       "not run")
        rows.append(row)
    return markdown_table(header, rows)


def table_paired(summary: Summary) -> str:
    """Every non-baseline method minus every baseline, per protocol: the mean paired difference
    of the final validation loss over the seeds both ran, its 95% interval and the verdict."""
    protocols = summary.get("protocols") or {}
    names = [p for p in ("best", "shared") if p in protocols]
    titles = {"best": "each at its best LR",
              "shared": f"all at the shared LR "
                        f"{format_lr((summary.get('shared_lr') or {}).get('lr', 0))}"}
    pairs = [(m, b) for m, by_b in protocols["best"]["paired"].items() for b in by_b] \
        if names else []
    rows = []
    for m, b in pairs:
        row = [f"{m} - {b}"]
        for name in names:
            diff = protocols[name]["paired"].get(m, {}).get(b)
            row.append(format_paired(diff, m, b) if diff else "not run")
        rows.append(row)
    return markdown_table(["paired difference (same seeds)"] + [titles[n] for n in names], rows) \
        if rows else ""


def table_stability(summary: Summary) -> str:
    """Per method over its LRs: the loss at initialisation L0, Wortsman et al.'s LR
    sensitivity, the LRs at which a seed diverged, the highest stable LR, the LRs at which the
    loss rose above BLOWUP_FACTOR x L0 after the first step and the largest later loss / L0."""
    stability = summary.get("stability") or {}
    rows = []
    for m in methods_in_order(summary):
        info = stability.get(m)
        if not info:
            continue
        rows.append([m, format_number(info["initial_loss"]), format_number(info["lr_sensitivity"]),
                     ", ".join(format_lr(lr) for lr in info["diverged_lrs"]) or "none",
                     format_lr(info["highest_stable_lr"]) if info["highest_stable_lr"] else
                     "none",
                     ", ".join(format_lr(lr) for lr in info.get("blowup_lrs", [])) or "none",
                     format_ratio(max(peaks)) if (peaks := [
                         r["peak_loss_over_initial"] for r in summary["runs"] if r["method"] == m
                         and r.get("peak_loss_over_initial") is not None]) else "n/a"])
    return markdown_table(["method", "L0 (first step's loss)", "LR sensitivity",
                           "LRs where a seed diverged", "highest stable LR",
                           f"LRs where the loss rose above {BLOWUP_FACTOR:g}x L0",
                           "max later loss / L0 (any LR)"], rows)


def proxy_rows(summary: Summary) -> list:
    """(method, lr, which) of the proxy table: each method at its best LR and at its highest
    stable LR (one row when they coincide)."""
    stability = summary.get("stability") or {}
    out = []
    for m in methods_in_order(summary):
        best = summary["methods"][m]["lr"]
        stable = (stability.get(m) or {}).get("highest_stable_lr")
        out.append((m, best, "best LR" + (" and highest stable LR" if stable == best else "")))
        if stable is not None and stable != best:
            out.append((m, stable, "highest stable LR"))
    return out


def table_proxies(summary: Summary) -> str:
    """The instability proxies (seed means) at each method's best LR and highest stable LR: the
    largest attention logit (last logged, peak) and log Z (mean at the last logged step, peak
    of |log Z|)."""
    keys = ("attn_logit_max_final", "attn_logit_max_peak", "output_log_z_final",
            "output_log_z_absmax_peak")
    rows = []
    for m, lr, which in proxy_rows(summary):
        runs = runs_at(summary, m, lr)
        values = [mean([r.get(k) for r in runs]) for k in keys]
        if all(v is None for v in values):
            continue
        rows.append([m, format_lr(lr), which] + [format_number(v, 2) for v in values])
    return markdown_table(["method", "LR", "which", "max attention logit (last)",
                           "max attention logit (peak)", "mean log Z (last)",
                           "max abs log Z (peak)"], rows) if rows else ""


def table_fp8_quantization(summary: Summary) -> str:
    """Per method at its best LR: the relative FP8 (e4m3) quantization error of W_eff per role
    (mean over the logged steps, seed means), its spread and the spread of the weights' FP8
    scales (max / min over roles); "" when no run has FP8 statistics."""
    roles = [role for role in ROLES
             if any(role in r.get("fp8_quant_rel_error", {}) for r in summary["runs"])]
    if not roles:
        return ""
    runs_at_best = best_runs(summary)

    def per_role(runs, field):
        return [mean([r.get(field, {}).get(role) for r in runs]) for role in roles]

    def spread(values):
        present = [v for v in values if v is not None]
        return format_ratio(max(present) / min(present) if present and min(present) > 0
                            else None)

    rows = []
    for m in methods_in_order(summary):
        errors = per_role(runs_at_best[m], "fp8_quant_rel_error")
        rows.append([m, format_lr(summary["methods"][m]["lr"])]
                    + ["n/a" if e is None else f"{100 * e:.2f}%" for e in errors]
                    + [spread(errors), spread(per_role(runs_at_best[m], "fp8_weight_scale"))])
    return markdown_table(["method", "LR"] + roles + ["error spread (max/min over roles)",
                                                      "scale spread (max/min over roles)"], rows)
