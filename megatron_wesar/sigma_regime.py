"""Sigma in the paper's regime at any width.

In the paper's models, sigma = sqrt(4e-5) lies between the He backbone's smallest std (W_d, the
residual-output fc2) and its largest (q, k, v and W_u): at 130M (d 768, N 12) the W_d gate starts
at 0.82, at 1.3B (d 2048, N 24) at 0.36, at 13B (d 5120, N 40) at 0.17, while the q/k/v and W_u
gates start above 1. At a small width the same sigma lies below every std (every gate above 1),
which is another regime. `regime_sigma` places sigma at the paper model's relative position, on a
log scale, between the smallest and the largest std of the model at hand.
"""
from __future__ import annotations

import math
from dataclasses import replace

from .config import DEFAULT_SIGMA, SIGMA_REGIMES, WeSaRConfig
from .init import ModelShape, sigma_role

# the paper's model sizes (d_ff = 4d)
PAPER_SHAPES = {
    "130m": ModelShape(hidden_size=768, num_layers=12, ffn_hidden_size=4 * 768),
    "1.3b": ModelShape(hidden_size=2048, num_layers=24, ffn_hidden_size=4 * 2048),
    "13b": ModelShape(hidden_size=5120, num_layers=40, ffn_hidden_size=4 * 5120),
}
assert tuple(PAPER_SHAPES) == SIGMA_REGIMES
SMALLEST, LARGEST = "fc2", "q"  # the roles of the smallest and the largest backbone std


def _log_span(shape: ModelShape, wesar: WeSaRConfig) -> tuple[float, float]:
    low = math.log(sigma_role(SMALLEST, shape, wesar))
    return low, math.log(sigma_role(LARGEST, shape, wesar)) - low


def regime_position(regime: str) -> float:
    """Where sigma = sqrt(4e-5) sits between log std(W_d) (0) and log std(q) (1) in the paper's
    model of size `regime` (He backbone)."""
    low, span = _log_span(PAPER_SHAPES[regime], WeSaRConfig(backbone="he"))
    return (math.log(DEFAULT_SIGMA) - low) / span


def regime_sigma(regime: str, shape: ModelShape, wesar: WeSaRConfig) -> float:
    """The sigma at the paper's relative position of `regime` for a model of `shape` and the
    backbone of `wesar`."""
    if regime not in PAPER_SHAPES:
        raise ValueError(f"sigma regime must be one of {SIGMA_REGIMES}, got {regime!r}")
    low, span = _log_span(shape, wesar)
    return math.exp(low + regime_position(regime) * span)


def with_regime_sigma(wesar: WeSaRConfig, shape: ModelShape) -> WeSaRConfig:
    """`wesar` with sigma placed by its `sigma_regime` (unchanged when that is None)."""
    if wesar.sigma_regime is None:
        return wesar
    return replace(wesar, sigma=regime_sigma(wesar.sigma_regime, shape, wesar))
