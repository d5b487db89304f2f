"""Selections from a study summary that the tables, the Findings and the figures share."""
from __future__ import annotations

from ..init import ROLES
from .schema import RunSummary, Summary
from .summary import RELATIVE_ROLES, mean


def methods_in_order(summary: Summary) -> list:
    """The methods with runs: in the study's order, then any others alphabetically."""
    order = list(summary.get("config", {}).get("methods", []))
    present = {r["method"] for r in summary["runs"]}
    return [m for m in order if m in present] + sorted(present - set(order))


def runs_at(summary: Summary, method: str, lr: float) -> list[RunSummary]:
    """The runs (one per seed) of `method` at learning rate `lr`."""
    return [r for r in summary["runs"] if r["method"] == method and r["lr"] == lr]


def best_runs(summary: Summary) -> dict:
    """{method: runs at its best LR}."""
    return {m: runs_at(summary, m, info["lr"]) for m, info in summary["methods"].items()}


def role_stats(runs: list[RunSummary]) -> dict:
    """Seed means of the update-ratio statistics of some runs of one (method, lr): {"roles":
    {role: ratio}, "rel": {role: ratio to the reference role}, "spread": max/min over roles}."""
    out = {"roles": {}, "rel": {}}
    for role in ROLES:
        value = mean([r["update_ratio_mean"].get(role) for r in runs])
        if value is not None:
            out["roles"][role] = value
    for role in RELATIVE_ROLES:
        value = mean([r["update_ratio_rel_fc1"].get(role) for r in runs])
        if value is not None:
            out["rel"][role] = value
    out["spread"] = mean([r["update_ratio_spread"] for r in runs])
    return out
