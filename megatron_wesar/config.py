"""WeSaRConfig: what WeSaR gates and how its gates and common weights are initialised."""
from __future__ import annotations

import math
from dataclasses import dataclass

BACKBONES = ("he", "small", "megatron")
DEFAULT_SIGMA = math.sqrt(4e-5)


@dataclass(frozen=True)
class WeSaRConfig:
    """Settings of weight scaling as reparameterization (Nishida et al., EMNLP 2024).

    Attributes:
        sigma: the ONE common std of every gated W_bar (paper default sqrt(4e-5)).
        backbone: the init whose per-matrix std the gates carry: 'he', 'small' or 'megatron'.
        gate_embedding: gate the word embedding (its gate starts at sigma_role / sigma).
        gate_output_layer: gate the (untied or tied) output layer.
        train_gates: whether the gates are trainable parameters.
        gate_lr_mult: learning-rate multiplier of the gates relative to the base LR.
        enabled: False builds the same model with the backbone init and no gates (the baseline).
        init_method_std: the std of the 'megatron' backbone (Megatron's --init-method-std).
        check_finite_gates: raise NonFiniteGateError when a gate is not finite at forward time.
        share_glu_gates: with SwiGLU, one gate for linear_fc1's fused [W_gate; W_up] (YuLan-Mini's
            choice) instead of one gate each (the paper's).
        defer_gate_grad_reduction: leave TP partial-sum gate gradients to the fused step-level
            reduction of megatron_wesar.grads.finalize_model_grads (True; it must then be the
            config's finalize_model_grads_func), or all-reduce each in backward (False).
    """

    sigma: float = DEFAULT_SIGMA
    backbone: str = "he"
    gate_embedding: bool = True
    gate_output_layer: bool = True
    train_gates: bool = True
    gate_lr_mult: float = 1.0
    enabled: bool = True
    init_method_std: float = 0.02
    check_finite_gates: bool = True
    share_glu_gates: bool = False
    defer_gate_grad_reduction: bool = True

    def __post_init__(self):
        sigma = self.sigma
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"WeSaRConfig.sigma must be a finite number > 0, got {self.sigma!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"WeSaRConfig.backbone must be one of {BACKBONES}, got {self.backbone!r}"
            )
        if not (math.isfinite(self.gate_lr_mult) and self.gate_lr_mult >= 0):
            raise ValueError(
                f"WeSaRConfig.gate_lr_mult must be a finite number >= 0, got {self.gate_lr_mult!r}"
            )
        if not (math.isfinite(self.init_method_std) and self.init_method_std > 0):
            raise ValueError(
                f"WeSaRConfig.init_method_std must be > 0, got {self.init_method_std!r}"
            )
