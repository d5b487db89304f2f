"""WeSaRConfig: what WeSaR gates and how its gates and common weights are initialised."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .options import option, validate_options

BACKBONES = ("he", "small", "megatron")
DEFAULT_SIGMA = math.sqrt(4e-5)
SIGMA_REGIMES = ("130m", "1.3b", "13b")  # the paper's model sizes (megatron_wesar.sigma_regime)


@dataclass(frozen=True)
class WeSaRConfig:
    """Settings of weight scaling as reparameterization (Nishida et al., EMNLP 2024).

    Each field's meaning is its `help` (dataclasses.fields(WeSaRConfig)[i].metadata["help"]),
    shown by `megatron-wesar pretrain --help` next to its flag.
    """

    enabled: bool = option(
        True, "gate every matrix: W_eff = gate * W_bar; --no-wesar builds the same model with "
        "the backbone init and no gates (the baseline)", flag="--wesar")
    sigma: float = option(
        DEFAULT_SIGMA, "the ONE common std of every gated W_bar (paper: sqrt(4e-5))",
        flag="--wesar-sigma", positive=True)
    sigma_regime: str | None = option(
        None, "place sigma where the paper's model of this size had it relative to the "
        "backbone's stds (log scale, between W_d's and q's; megatron_wesar.sigma_regime); an "
        "explicit --wesar-sigma wins", flag="--wesar-sigma-regime", choices=SIGMA_REGIMES,
        type=str)
    backbone: str = option(
        "he", "the init whose per-matrix stds the gates carry (or, with --no-wesar, the weights "
        "get): he, small or megatron", choices=BACKBONES)
    init_method_std: float = option(
        0.02, "the std of the 'megatron' backbone (Megatron-LM's --init-method-std)",
        positive=True)
    gate_embedding: bool = option(
        True, "gate the input embeddings: the word embedding and the learned position table, "
        "each with its own gate starting at sigma_role / sigma; --no-wesar-gate-embedding draws "
        "them with their backbone std instead",
        flag="--wesar-gate-embedding")
    gate_output_layer: bool = option(
        True, "gate the (untied or tied) output layer", flag="--wesar-gate-output-layer")
    train_gates: bool = option(
        True, "the gates are trainable parameters (else frozen at their initial values)",
        flag="--wesar-train-gates")
    gate_lr_mult: float = option(
        1.0, "learning-rate multiplier of the gates relative to the base LR (through warm-up "
        "and decay)", flag="--wesar-gate-lr-mult")
    check_finite_gates: bool = option(
        True, "raise NonFiniteGateError when a gate is not finite at forward time",
        flag="--wesar-check-finite-gates")
    share_glu_gates: bool = option(
        False, "with SwiGLU, one gate for linear_fc1's fused [W_gate; W_up] (YuLan-Mini's "
        "choice) instead of one gate each (the paper's)", flag="--wesar-share-glu-gates")
    defer_gate_grad_reduction: bool = option(
        True, "leave TP partial-sum gate gradients to the fused step-level reduction of "
        "megatron_wesar.grads.finalize_model_grads (it must then be the config's "
        "finalize_model_grads_func); --no-... all-reduces each in backward",
        flag="--wesar-defer-gate-grad-reduction")

    def __post_init__(self):
        validate_options(self)
        if not math.isfinite(self.sigma):
            raise ValueError(f"WeSaRConfig.sigma must be a finite number > 0, got {self.sigma!r}")
        if not (math.isfinite(self.gate_lr_mult) and self.gate_lr_mult >= 0):
            raise ValueError(
                f"WeSaRConfig.gate_lr_mult must be a finite number >= 0, got {self.gate_lr_mult!r}"
            )
        if not math.isfinite(self.init_method_std):
            raise ValueError(
                f"WeSaRConfig.init_method_std must be > 0, got {self.init_method_std!r}"
            )
