"""Per-matrix init scales (docs/design.md section 1) and the gate initial values they give."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import DEFAULT_SIGMA, WeSaRConfig

# One role per logical matrix: linear_qkv holds q, k and v; a SwiGLU linear_fc1 holds fc1_gate
# (W_gate) and fc1 (W_up, also the whole fc1 of a GeLU MLP, and a SwiGLU fc1 whose two halves
# share one gate). "position" is the learned position table (absent with RoPE): an input
# embedding like the word embedding, with its std and gated with it.
ROLES = ("q", "k", "v", "attn_proj", "fc1_gate", "fc1", "fc2", "embedding", "position", "output")
INPUT_EMBEDDING_ROLES = ("embedding", "position")
RESIDUAL_OUTPUT_ROLES = ("attn_proj", "fc2")


@dataclass(frozen=True)
class ModelShape:
    """The sizes the backbone inits depend on: d, N and d_ff (before SwiGLU doubling)."""

    hidden_size: int
    num_layers: int
    ffn_hidden_size: int

    @classmethod
    def from_transformer_config(cls, config) -> "ModelShape":
        """Read the shape from a megatron-core TransformerConfig."""
        return cls(config.hidden_size, config.num_layers, config.ffn_hidden_size)


def sigma_role(role: str, shape: ModelShape, wesar: WeSaRConfig) -> float:
    """The std the backbone init gives the matrix of `role` (docs/design.md section 1 table).

    Baseline stds never read a WeSaR knob: He's word embedding has the paper's constant
    std sqrt(4e-5) (config.DEFAULT_SIGMA) whatever `wesar.sigma` is.
    """
    if role not in ROLES:
        raise ValueError(f"unknown matrix role {role!r}; expected one of {ROLES}")
    d, n, d_ff = shape.hidden_size, shape.num_layers, shape.ffn_hidden_size
    depth_scale = 1.0 / math.sqrt(2.0 * n)
    if wesar.backbone == "he":
        if role == "fc2":
            base = math.sqrt(2.0 / d_ff)
        elif role in INPUT_EMBEDDING_ROLES:
            base = DEFAULT_SIGMA
        else:
            base = math.sqrt(1.0 / d)
    elif wesar.backbone == "small":
        base = math.sqrt(2.0 / (5.0 * d))
    else:  # megatron
        base = wesar.init_method_std
    return base * depth_scale if role in RESIDUAL_OUTPUT_ROLES else base


def is_gated(role: str, wesar: WeSaRConfig) -> bool:
    """Whether the matrix of `role` carries a gate under `wesar`."""
    if not wesar.enabled:
        return False
    if role in INPUT_EMBEDDING_ROLES:
        return wesar.gate_embedding
    if role == "output":
        return wesar.gate_output_layer
    return True


def weight_std(role: str, shape: ModelShape, wesar: WeSaRConfig) -> float:
    """The std W of `role` is drawn with: the common sigma when gated, else sigma_role."""
    return wesar.sigma if is_gated(role, wesar) else sigma_role(role, shape, wesar)


def gate_initial_value(
    role: str, shape: ModelShape, wesar: WeSaRConfig, weight_role: str | None = None
) -> float:
    """alpha_0 = sigma_role / std(W_bar), in float64 (Python floats).

    `weight_role` names the role that owns W_bar when it differs from `role`: a tied output layer
    uses the word embedding's W_bar, so its gate must carry sigma_role('output') over that std.
    """
    return sigma_role(role, shape, wesar) / weight_std(weight_role or role, shape, wesar)
