"""How the study writes numbers: learning rates, losses, ratios, and Markdown tables of them."""
from __future__ import annotations

import math


def format_lr(lr: float) -> str:
    """A learning rate in short scientific notation: 3e-4, 1e-2, 2.5e-4."""
    mantissa, exponent = f"{float(lr):.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def format_number(value, digits=3) -> str:
    """A number with `digits` decimals; "n/a" for None, "diverged" for +inf and nan."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "diverged" if value > 0 or math.isnan(value) else str(value)
    return f"{value:.{digits}f}"


def format_ratio(value, digits=2) -> str:
    """A ratio as a factor ("1.25x"); "n/a" for None."""
    return "n/a" if value is None else f"{value:.{digits}f}x"


def markdown_table(header: list, rows: list) -> str:
    """A Markdown table of `rows` (lists of cells) under `header`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
