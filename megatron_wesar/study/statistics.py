"""The statistics the study reports: seed means and stds, paired differences between two methods
over the same seeds (the same data order), and the learning-rate sensitivity of Wortsman et al.
2023.

A paired difference is "outside the seed noise" when its 95% confidence interval (Student's t
over the seeds, two-sided) excludes 0; with one seed there is no noise estimate and nothing is
outside it.
"""
from __future__ import annotations

import math

# two-sided 95% quantiles of Student's t, t_{0.975}(df), df = 1..30; beyond: the normal's
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z_975 = 1.960


def t_quantile_975(df: int) -> float:
    """t_{0.975} with `df` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return T_975[df - 1] if df <= len(T_975) else Z_975


def _finite(values) -> list:
    return [v for v in values if v is not None and math.isfinite(v)]


def seed_spread(values) -> dict:
    """{"mean", "std", "n"} of the finite values (sample std, ddof 1; None with fewer than two);
    mean None without any. "diverged" counts the non-finite ones."""
    finite = _finite(values)
    n = len(finite)
    mean = math.fsum(finite) / n if n else None
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n,
            "diverged": sum(1 for v in values if v is not None and not math.isfinite(v))}


def paired_difference(a_by_seed: dict, b_by_seed: dict) -> dict:
    """a - b over the seeds both have with finite values ({seed: value} each): {"seeds",
    "diffs", "mean", "std", "n", "half_width" (95% CI half width, None below two seeds),
    "verdict"}. verdict: "a lower" / "b lower" when the interval excludes 0, "within noise"
    when it does not, "one seed" when there is no noise estimate, "no common seed" without
    any pair."""
    seeds = sorted(s for s in a_by_seed if s in b_by_seed
                   and _finite([a_by_seed[s]]) and _finite([b_by_seed[s]]))
    diffs = [a_by_seed[s] - b_by_seed[s] for s in seeds]
    spread = seed_spread(diffs)
    n, mean, std = spread["n"], spread["mean"], spread["std"]
    half = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else None
    if n == 0:
        verdict = "no common seed"
    elif n == 1:
        verdict = "one seed"
    elif abs(mean) > half:
        verdict = "a lower" if mean < 0 else "b lower"
    else:
        verdict = "within noise"
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "std": std, "n": n,
            "half_width": half, "verdict": verdict}


def lr_sensitivity(loss_by_lr: dict, initial_loss: float | None):
    """Wortsman et al. 2023's LR sensitivity: the mean over the grid's LRs of
    min(L(lr), L0) - min over LRs of L, with L the final loss ({lr: loss}; a non-finite or
    missing loss counts as L0) and L0 the loss at initialisation. None without L0 or without
    a finite loss."""
    finite = _finite(loss_by_lr.values())
    if initial_loss is None or not finite or not loss_by_lr:
        return None
    best = min(min(finite), initial_loss)
    capped = [min(v, initial_loss) if v is not None and math.isfinite(v) else initial_loss
              for v in loss_by_lr.values()]
    return math.fsum(c - best for c in capped) / len(capped)
