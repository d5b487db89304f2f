"""The Findings paragraph of the report: what the summary's numbers say, in sentences.

Each `_..._sentences` function covers one topic and returns its sentences (possibly none);
`findings` joins them in the report's order.
"""
from __future__ import annotations

import math

from ..metric_keys import SPIKE_RULES, SPIKE_SERIES
from .format import format_lr
from .schema import Summary
from .selection import best_runs, methods_in_order, role_stats, runs_at
from .summary import BLOWUP_FACTOR, REFERENCE_ROLE, RELATIVE_ROLES


def findings(summary: Summary) -> str:
    """The Findings paragraph, generated from the summary's numbers."""
    methods = methods_in_order(summary)
    if not methods:
        return "No runs."
    parts = []
    for topic in (_regime_sentences, _ranking_sentences, _protocol_sentences,
                  _grid_edge_sentences, _baseline_sentences, _instability_sentences,
                  _stability_sentences,
                  _spike_sentences, _loss_rise_sentences, _rule_window_sentences,
                  _proxy_sentences, _update_ratio_sentences, _gate_sentences):
        parts += topic(summary, methods)
    return " ".join(parts)


def _finite_or_none(value):
    return value if value is not None and math.isfinite(value) else None


def _ranking_sentences(summary: Summary, methods: list) -> list:
    """The methods ranked by final validation loss at their best LR, and a too-close gap."""
    info = summary["methods"]
    seeds = sorted({r["seed"] for r in summary["runs"]})
    ranked = sorted(methods, key=lambda m: (
        info[m]["final_valid_loss"] if _finite_or_none(info[m]["final_valid_loss"]) is not None
        else math.inf))
    top = ranked[0]
    top_loss = info[top]["final_valid_loss"]
    if top_loss is None:
        return ["No run has a validation loss; the ranking below would use training loss."]
    seed_text = (f" (mean over {len(seeds)} seeds)" if len(seeds) > 1 else " (one seed)")
    others = []
    for m in ranked[1:]:
        v = _finite_or_none(info[m]["final_valid_loss"])
        if v is None:
            others.append(f"{m} has no finite validation loss")
            continue
        others.append(f"{m} {v:.3f} at LR {format_lr(info[m]['lr'])} "
                      f"(+{v - top_loss:.3f}, +{100 * (v - top_loss) / top_loss:.1f}%)")
    out = [f"Compared at each method's own best learning rate, {top} reaches the lowest final "
           f"validation loss{seed_text}: {top_loss:.3f} at LR {format_lr(info[top]['lr'])}"
           + ("; " + "; ".join(others) if others else "") + "."]
    if len(ranked) > 1 and len(seeds) == 1:
        second = ranked[1]
        v2 = _finite_or_none(info[second]["final_valid_loss"])
        if v2 is not None and v2 - top_loss < 0.01:
            out.append(f"The gap between {top} and {second} ({v2 - top_loss:.3f}) is "
                       "within what one seed of this size can separate.")
    return out


def _regime_sentences(summary: Summary, methods: list) -> list:
    """Which sigma regime the gated methods ran in, and where their gates started: which roles'
    gates start below 1 (WeSaR lowers their update ratios) and which above."""
    out = []
    for m in methods:
        run = next((r for r in summary["runs"] if r["method"] == m and r.get("alpha0")), None)
        if run is None:
            continue
        alpha0 = run["alpha0"]
        regime = (f"the paper's {run['sigma_regime']} regime" if run.get("sigma_regime")
                  else "an explicit sigma, no regime")
        sigma = f"sigma = {run['sigma']:.4g}, " if run.get("sigma") is not None else ""
        below = [f"{role} {v:.2f}" for role, v in alpha0.items() if v < 1]
        above = [f"{role} {v:.2f}" for role, v in alpha0.items() if v >= 1]
        text = f"{m} ran with {sigma}{regime}: its gates start "
        if below and above:
            text += (f"below 1 for {', '.join(below)} (their update ratios are lowered) and at or "
                     f"above 1 for {', '.join(above)}.")
        elif above:
            text += (f"at or above 1 for every role ({', '.join(above)}): sigma lies below every "
                     "backbone std, so WeSaR raises every update ratio, unlike in the paper's "
                     "models.")
        else:
            text += f"below 1 for every role ({', '.join(below)})."
        out.append(text)
    return out


def _difference_text(baseline: str, diff: dict) -> str:
    """"<baseline> (<mean> ± <half width>)" of a paired difference."""
    if diff["mean"] is None:
        return baseline
    half = f" ± {diff['half_width']:.3f}" if diff["half_width"] is not None else ""
    return f"{baseline} ({diff['mean']:+.3f}{half})"


VERDICT_WORDS = (("a lower", "lower than"), ("b lower", "higher than"),
                 ("within noise", "within seed noise of"),
                 ("one seed", "compared on one seed only (no noise estimate) with"))


def _protocol_sentences(summary: Summary, methods: list) -> list:
    """What each non-baseline method's paired differences against the baselines say, under each
    protocol, and which claim holds under which."""
    protocols = summary.get("protocols") or {}
    shared = summary.get("shared_lr") or {}
    names = {"best": "at each method's own best LR",
             "shared": f"at the shared LR {format_lr(shared.get('lr', 0))}"}
    out = []
    for m in methods:
        wins = {}
        for protocol in ("best", "shared"):
            paired = (protocols.get(protocol) or {}).get("paired", {}).get(m)
            if not paired:
                continue
            wins[protocol] = all(d["verdict"] == "a lower" for d in paired.values())
            parts = []
            for verdict, words in VERDICT_WORDS:
                listed = [_difference_text(b, d) for b, d in paired.items()
                          if d["verdict"] == verdict]
                if listed:
                    parts.append(f"{words} {', '.join(listed)}")
            n = max(d["n"] for d in paired.values())
            source = f" ({shared['source']})" if protocol == "shared" else ""
            out.append(f"Paired over the same seeds ({n}), {names[protocol]}{source}, {m}'s "
                       "final validation loss is " + "; ".join(parts)
                       + f" (difference {m} - baseline, 95% interval).")
        if len(wins) == 2:
            claim = f"So the claim that {m} beats every baseline outside seed noise holds "
            if wins["best"] != wins["shared"]:
                holds, fails = ("best", "shared") if wins["best"] else ("shared", "best")
                out.append(claim + f"{names[holds]} and not {names[fails]}.")
            else:
                out.append(claim + ("under both protocols." if wins["best"] else
                                    "under neither protocol."))
    return out


def _unstable_lrs(summary: Summary, method: str) -> dict:
    """{lr: [what happened]} of the method's LRs where a run diverged, its loss rose above
    BLOWUP_FACTOR x its first step's value, or a spike rule flagged its training loss (over
    the LR's seeds: how many diverged, the largest rise, the rules)."""
    out = {}
    for lr in sorted({r["lr"] for r in summary["runs"] if r["method"] == method}):
        runs = runs_at(summary, method, lr)
        events = []
        diverged = sum(1 for r in runs if r.get("diverged"))
        if diverged:
            events.append(f"diverged in {diverged} of {len(runs)} seed(s)")
        peak = max((r.get("peak_loss_over_initial") or 0) for r in runs)
        if peak > BLOWUP_FACTOR:
            events.append(f"loss up to {peak:.2f}x L0")
        flagged = sorted({rule for r in runs for rule, n in r["spikes"].get("loss", {}).items()
                          if n})
        if flagged:
            events.append("loss spike (" + ", ".join(flagged) + ")")
        if events:
            out[lr] = events
    return out


def _instability_sentences(summary: Summary, methods: list) -> list:
    """Whether any baseline spiked, blew up or diverged, and what the other methods did under
    the same protocol; said plainly when nothing did."""
    baselines = set(summary.get("baseline_methods") or [])
    unstable = {m: _unstable_lrs(summary, m) for m in methods}

    def listed(m):
        return f"{m} at " + "; ".join(f"LR {format_lr(lr)} ({', '.join(events)})"
                                      for lr, events in unstable[m].items())

    hit = [m for m in methods if m in baselines and unstable[m]]
    others = [m for m in methods if m not in baselines]
    if not hit:
        return [f"No baseline spiked, blew up (loss above {BLOWUP_FACTOR:g}x its first step's) or "
                "diverged at any LR of "
                "this grid: the grid shows no instability regime at this scale and length"
                + (" (" + "; ".join(listed(m) for m in others if unstable[m]) + ")"
                   if any(unstable[m] for m in others) else "") + "."]
    out = ["Instabilities of the baselines (training-loss spike rules, loss above "
           f"{BLOWUP_FACTOR:g}x its first step's value L0, divergence): "
           + "; ".join(listed(m) for m in hit) + "."]
    for m in others:
        out.append(f"Under the same protocol {listed(m)}." if unstable[m] else
                   f"Under the same protocol {m} had none of these at any LR.")
    return out


def _stability_sentences(summary: Summary, methods: list) -> list:
    """Which methods diverged at which LRs (and whether each non-baseline method diverged where
    a baseline did), and the LR sensitivity ranking."""
    stability = summary.get("stability") or {}
    if not stability:
        return []
    out = []
    diverged = {m: stability[m]["diverged_lrs"] for m in methods if m in stability}
    if not any(diverged.values()):
        out.append("No run diverged (no non-finite step, every final loss below the loss at "
                   "initialisation) at any LR of the grid.")
    else:
        out.append("Diverged (a non-finite step, or a final loss not below the first step's): "
                   + "; ".join(f"{m} at LR {', '.join(format_lr(lr) for lr in lrs)}"
                               for m, lrs in diverged.items() if lrs) + ".")
        baselines = set(summary.get("baseline_methods") or [])
        for m in methods:
            if m in baselines or m not in diverged:
                continue
            failed_lrs = sorted({lr for b in baselines for lr in diverged.get(b, [])})
            survived = [lr for lr in failed_lrs if lr not in diverged[m]]
            if failed_lrs:
                lrs = ", ".join(map(format_lr, failed_lrs))
                out.append(f"At the LRs where a baseline diverged ({lrs}), {m} "
                           + (f"did not at {', '.join(map(format_lr, survived))}"
                              if survived else "diverged too") + ".")
    blowups = {m: stability[m].get("blowup_lrs") for m in methods if m in stability}
    if any(blowups.values()):
        out.append(f"The training loss rose above {BLOWUP_FACTOR:g}x its first step's value (a "
                   "blow-up, even where the run recovered) for " + "; ".join(
                       f"{m} at LR {', '.join(format_lr(lr) for lr in lrs)}"
                       for m, lrs in blowups.items() if lrs)
                   + (f"; never for {', '.join(m for m, lrs in blowups.items() if not lrs)}"
                      if not all(blowups.values()) else "") + ".")
    sens = {m: stability[m]["lr_sensitivity"] for m in methods
            if stability.get(m, {}).get("lr_sensitivity") is not None}
    if len(sens) > 1:
        ranked = sorted(sens, key=sens.get)
        out.append("LR sensitivity (Wortsman et al. 2023: the mean over the grid of "
                   "min(final loss, L0) minus the best final loss; lower is more robust): "
                   + ", ".join(f"{m} {sens[m]:.3f}" for m in ranked)
                   + f"; {ranked[0]} is the least sensitive over this grid.")
    return out


def _proxy_sentences(summary: Summary, methods: list) -> list:
    """The instability proxies at the highest LR of the grid and at each method's best LR."""
    runs = [r for r in summary["runs"] if r.get("attn_logit_max_peak") is not None]
    if not runs:
        return []
    top = max(r["lr"] for r in runs)
    at_top = {}
    for m in methods:
        values = [r["attn_logit_max_peak"] for r in runs if r["method"] == m and r["lr"] == top]
        if values:
            at_top[m] = max(values)
    at_best = {}
    for m in methods:
        values = [r["attn_logit_max_peak"] for r in runs
                  if r["method"] == m and r["lr"] == summary["methods"][m]["lr"]]
        if values:
            at_best[m] = max(values)
    out = ["The largest attention logit (peak over the logged steps) is, at each method's best "
           "LR, " + ", ".join(f"{m} {v:.3g}" for m, v in at_best.items())
           + f"; at the highest LR {format_lr(top)}, "
           + ", ".join(f"{m} {v:.3g}" for m, v in at_top.items()) + "."]
    if at_top and at_best and max(at_top.values()) > 10 * max(at_best.values()):
        out.append("Attention-logit growth (Wortsman et al. 2023) shows at the highest LR: its "
                   "largest logits exceed those at the best LRs more than tenfold.")
    return out


def _grid_edge_sentences(summary: Summary, methods: list) -> list:
    """Which methods' best LR lies at an end of the LR grid."""
    info = summary["methods"]
    edges = [m for m in methods if info[m].get("at_grid_edge")]
    if not edges:
        return ["Every method's best LR lies inside the grid (not at either end)."]
    listed = ", ".join(f"{m} ({format_lr(info[m]['lr'])}, {info[m]['edge']} end)"
                       for m in edges)
    if len(edges) == 1:
        return [f"The best LR of {listed} is at an end of the grid, so its optimum "
                "may lie outside the grid."]
    return [f"The best LRs of {listed} are at an end of the grid, so their optima "
            "may lie outside the grid."]


def _baseline_sentences(summary: Summary, methods: list) -> list:
    """When each non-baseline method reaches the best baseline's final validation loss."""
    info = summary["methods"]
    bb = summary.get("best_baseline")
    if not bb:
        return []
    target = (f"({bb['final_valid_loss']:.3f}, {bb['method']} at LR {format_lr(bb['lr'])})")
    out = []
    for m in methods:
        if info[m].get("baseline"):
            continue
        best = runs_at(summary, m, info[m]["lr"])
        reached = [r["steps_to_best_baseline"] for r in best]
        iters = best[0].get("train_iters") or best[0].get("steps")
        if all(s is not None for s in reached):
            out.append(f"{m} at its best LR reaches the best baseline's final validation loss "
                       f"{target} at step {', '.join(map(str, reached))} of {iters}.")
        else:
            out.append(f"{m} at its best LR does not reach the best baseline's final validation "
                       f"loss {target} within {iters} steps in "
                       f"{sum(s is None for s in reached)} of {len(reached)} run(s).")
    return out


def _spike_sentences(summary: Summary, methods: list) -> list:
    """How often the spike rules fired, or that none did and no loss was non-finite."""
    runs = summary["runs"]
    total = {(s, r): sum(int(x["spikes"].get(s, {}).get(r, 0)) for x in runs)
             for s in SPIKE_SERIES for r in SPIKE_RULES[s]}
    nonfinite = sum(x.get("nonfinite_steps", 0) for x in runs)
    if not any(total.values()) and not nonfinite:
        rules = "; ".join(f"{s}: {', '.join(SPIKE_RULES[s])}" for s in SPIKE_SERIES)
        return [f"No spikes: no rule ({rules}) flagged any step of the loss or "
                f"of the gradient norm in any of the {len(runs)} runs, and no loss was "
                "non-finite."]
    return [_spike_text(summary, methods, total, nonfinite)]


def _loss_rise_sentences(summary: Summary, methods: list) -> list:
    """The largest rise of the training loss above its running minimum, overall and per method
    at its best LR."""
    info = summary["methods"]
    rises = [r for r in summary["runs"] if r.get("max_loss_rise") is not None]
    if not rises:
        return []
    top = max(rises, key=lambda r: r["max_loss_rise"])
    at_best = []
    for m in methods:
        values = [r["max_loss_rise"] for r in rises
                  if r["method"] == m and r["lr"] == info[m]["lr"]]
        if values:
            at_best.append(f"{m} {max(values):.2f}x")
    return ["Independent of the rules' windows, the largest rise of the training loss above its "
            f"running minimum is {top['max_loss_rise']:.2f}x ({top['method']} at LR "
            f"{format_lr(top['lr'])}, step {top['max_loss_rise_step']}); at each method's best "
            "LR it is " + ", ".join(at_best) + "."]


def _rule_window_sentences(summary: Summary, methods: list) -> list:
    """Whether the runs are too short for the windowed spike rules to see (most of) them."""
    from ..monitor import MegatronRule, ZScoreRule

    iters = max((r.get("train_iters") or r.get("steps") or 0) for r in summary["runs"])
    megatron, zscore = MegatronRule(), ZScoreRule()
    late = max(megatron.window, zscore.warmup)
    waits = (f"both wait for the first {late} steps" if megatron.window == zscore.warmup
             else f"which wait for the first {megatron.window} and {zscore.warmup} steps")
    if iters and iters <= late:
        return [f"With {iters} steps per run, the megatron and zscore rules ({waits}) "
                "cannot flag any step here; only the relative rules (" + ", ".join(
                    SPIKE_RULES[s][-1] for s in SPIKE_SERIES) + ") can."]
    if iters and iters <= late + zscore.window:
        return [f"With {iters} steps per run, the megatron and zscore rules ({waits}) "
                f"only see the last {iters - late} steps of each run."]
    return []


def _update_ratio_sentences(summary: Summary, methods: list) -> list:
    """The relative update ratios and their spread across roles at each method's best LR."""
    runs_at_best = best_runs(summary)
    stats = {m: role_stats(runs_at_best[m]) for m in methods}
    rel_text = []
    for role in RELATIVE_ROLES:
        values = [f"{m} {stats[m]['rel'][role]:.2f}x" for m in methods if role in stats[m]["rel"]]
        if values:
            rel_text.append(f"{role}/{REFERENCE_ROLE}: " + ", ".join(values))
    spreads = {m: stats[m]["spread"] for m in methods if stats[m]["spread"] is not None}
    if not rel_text and not spreads:
        return []
    text = ("Update ratios ||dW_eff||/||W_eff|| at each method's best LR (mean over the "
            "logged steps): " + "; ".join(rel_text) + ".")
    if spreads:
        low = min(spreads, key=spreads.get)
        high = max(spreads, key=spreads.get)
        text += (" The spread across roles (max/min of the per-role mean) is "
                 + ", ".join(f"{m} {v:.2f}{_extreme_roles(stats[m]['roles'])}"
                             for m, v in spreads.items())
                 + f": the most uniform are {low}'s, the least uniform {high}'s.")
    return [text]


def _extreme_roles(roles: dict) -> str:
    """" (<role> highest, <role> lowest)" of {role: update ratio}; "" with fewer than two."""
    if len(roles) < 2:
        return ""
    return f" ({max(roles, key=roles.get)} highest, {min(roles, key=roles.get)} lowest)"


def _gate_sentences(summary: Summary, methods: list) -> list:
    """How far each gated method's gates moved at its best LR."""
    if not any(r.get("gate_count") for r in summary["runs"]):
        return []
    runs_at_best = best_runs(summary)
    out = []
    for m in methods:
        mine = [r for r in runs_at_best[m] if r.get("gate_max_rel_change") is not None]
        if mine:
            change = max(r["gate_max_rel_change"] for r in mine)
            out.append(f"{m}'s gates moved at most {100 * change:.2f}% (last against first "
                       f"logged value) at its best LR.")
    return out


def _spike_text(summary: Summary, methods: list, total: dict, nonfinite: int) -> str:
    """Where the spike rules fired: per series and rule, the share of steps, the runs; a series
    no rule flagged is said plainly to have no spikes."""
    runs = summary["runs"]
    all_steps = sum(r.get("steps") or 0 for r in runs)
    names = {"loss": "training loss", "grad_norm": "gradient norm"}
    out = []
    for series in SPIKE_SERIES:
        fired = {rule: total[(series, rule)] for rule in SPIKE_RULES[series]
                 if total[(series, rule)]}
        rules = ", ".join(SPIKE_RULES[series])
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
        quiet = [rule for rule in SPIKE_RULES[series] if rule not in fired]
        text = "Spike rules fired on the " + names.get(series, series) + ": " + "; ".join(
            sentences) + "."
        if quiet:
            text += f" Rules {', '.join(quiet)} flagged none of its steps."
        out.append(text)
    if nonfinite:
        out.append(f"{nonfinite} steps had a non-finite loss or gradient norm.")
    return " ".join(out)
