"""The report's figures (matplotlib, Agg backend), written as PNGs into the study folder."""
from __future__ import annotations

import math
import os

from ..init import ROLES
from ..metric_keys import (
    ATTN_LOGIT_MAX,
    OUTPUT_LOG_Z_MEAN,
    UPDATE_RATIO,
    UPDATE_RATIO_SPREAD,
    role_mean_key,
    role_of_matrix,
)
from .format import format_lr
from .schema import Summary
from .selection import methods_in_order, runs_at
from .summary import REFERENCE_ROLE, RELATIVE_ROLES, gate_trajectories, load_metrics

FIGURES = {
    "loss_curves": "loss_curves.png",
    "lr_sensitivity": "lr_sensitivity.png",
    "update_ratios": "update_ratios.png",
    "gates": "gates.png",
    "proxies": "instability_proxies.png",
}


def draw_figures(study_dir: str, summary: Summary) -> bool:
    """Write the FIGURES into `study_dir`; False (and no gates.png) when no run has gates. The
    proxies figure is left out when no run has the instability proxies."""
    cache = _metrics_cache(study_dir, summary)
    figure_loss_curves(summary, cache, os.path.join(study_dir, FIGURES["loss_curves"]))
    figure_lr_sensitivity(summary, os.path.join(study_dir, FIGURES["lr_sensitivity"]))
    figure_update_ratios(summary, cache, os.path.join(study_dir, FIGURES["update_ratios"]))
    proxies_path = os.path.join(study_dir, FIGURES["proxies"])
    if not figure_proxies(summary, cache, proxies_path) and os.path.exists(proxies_path):
        os.remove(proxies_path)
    gates_path = os.path.join(study_dir, FIGURES["gates"])
    has_gates = figure_gates(summary, cache, gates_path)
    if not has_gates and os.path.exists(gates_path):
        os.remove(gates_path)
    return has_gates


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(methods: list) -> dict:
    """{method: line color}, in the methods' order."""
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def _smooth(values: list, window: int) -> list:
    """The running mean of `values` over the last `window` of them."""
    if window <= 1:
        return values
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _metrics_cache(study_dir: str, summary: Summary) -> dict:
    """{(method, lr, seed): RunMetrics} of the runs whose metrics file exists."""
    cache = {}
    for r in summary["runs"]:
        path = os.path.join(study_dir, r.get("metrics_file", ""))
        if os.path.isfile(path):
            cache[(r["method"], r["lr"], r["seed"])] = load_metrics(path)
    return cache


def figure_loss_curves(summary: Summary, cache: dict, path: str):
    """Training (smoothed) and validation loss over steps, one panel per LR, methods overlaid."""
    plt = _pyplot()
    methods = methods_in_order(summary)
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
            for r in runs_at(summary, m, lr):
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


def figure_lr_sensitivity(summary: Summary, path: str):
    """Final validation loss against LR per method (seeds as dots, best LR as a star)."""
    plt = _pyplot()
    methods = methods_in_order(summary)
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


def figure_update_ratios(summary: Summary, cache: dict, path: str):
    """The relative update ratios and their spread over steps, each method at its best LR."""
    plt = _pyplot()
    methods = methods_in_order(summary)
    colors = _colors(methods)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    any_data = False
    for m in methods:
        lr = summary["methods"][m]["lr"]
        for k, r in enumerate(runs_at(summary, m, lr)):
            metrics = cache.get((m, lr, r["seed"]))
            if metrics is None:
                continue
            logged = metrics.logged
            label = f"{m} (LR {format_lr(lr)})" if k == 0 else None
            for ax, role in zip(axes, RELATIVE_ROLES):
                xs, ys = [], []
                for rec in logged:
                    num = rec.get(role_mean_key(UPDATE_RATIO, role))
                    den = rec.get(role_mean_key(UPDATE_RATIO, REFERENCE_ROLE))
                    if isinstance(num, (int, float)) and isinstance(den, (int, float)) and den:
                        xs.append(rec["iteration"])
                        ys.append(num / den)
                if xs:
                    any_data = True
                    ax.plot(xs, ys, "-", color=colors[m], label=label)
            spread = [rec for rec in logged
                      if isinstance(rec.get(UPDATE_RATIO_SPREAD), (int, float))]
            xs = [rec["iteration"] for rec in spread]
            ys = [rec[UPDATE_RATIO_SPREAD] for rec in spread]
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


def figure_gates(summary: Summary, cache: dict, path: str) -> bool:
    """WeSaR gates over steps, each relative to its first logged value; False: no gates."""
    plt = _pyplot()
    gated = [m for m in methods_in_order(summary)
             if any(r.get("gate_count") for r in summary["runs"] if r["method"] == m)]
    if not gated:
        return False
    fig, axes = plt.subplots(1, len(gated), figsize=(6.5 * len(gated), 4), squeeze=False)
    palette = plt.get_cmap("tab10").colors
    role_colors = {role: palette[i % len(palette)] for i, role in enumerate((*ROLES, "other"))}
    for ax, m in zip(axes[0], gated):
        lr = summary["methods"][m]["lr"]
        runs = runs_at(summary, m, lr)
        metrics = cache.get((m, lr, runs[0]["seed"])) if runs else None
        seen = set()
        for name, values in (gate_trajectories(metrics).items() if metrics else []):
            role = role_of_matrix(name)
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



def figure_proxies(summary: Summary, cache: dict, path: str) -> bool:
    """The largest attention logit and the mean log Z over steps, each method at its best LR
    and at the highest LR of the grid (first seed); False when no run has them."""
    plt = _pyplot()
    methods = methods_in_order(summary)
    colors = _colors(methods)
    top = max(r["lr"] for r in summary["runs"])
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), squeeze=False)
    any_data = False
    for col, (title, lr_of) in enumerate((
            ("each method's best LR", lambda m: summary["methods"][m]["lr"]),
            (f"the highest LR {format_lr(top)}", lambda m: top))):
        for m in methods:
            runs = runs_at(summary, m, lr_of(m))
            metrics = cache.get((m, lr_of(m), runs[0]["seed"])) if runs else None
            if metrics is None:
                continue
            for row, key in enumerate((ATTN_LOGIT_MAX, OUTPUT_LOG_Z_MEAN)):
                points = [(r["iteration"], r[key]) for r in metrics.logged
                          if isinstance(r.get(key), (int, float))]
                if points:
                    any_data = True
                    axes[row][col].plot(*zip(*points), "-", color=colors[m],
                                        label=f"{m} (LR {format_lr(lr_of(m))})")
        axes[0][col].set_title(f"largest attention logit, {title}")
        axes[0][col].set_yscale("symlog")
        axes[1][col].set_title(f"mean log Z of the output, {title}")
        for row in range(2):
            axes[row][col].set_xlabel("step")
            axes[row][col].grid(alpha=0.3)
            if any_data:
                axes[row][col].legend(fontsize=7)
    fig.suptitle("Instability proxies (Wortsman et al. 2023), first seed")
    fig.tight_layout()
    if any_data:
        fig.savefig(path, dpi=90)
    plt.close(fig)
    return any_data
