"""The paper's embedding-side baselines, applied to a built (ungated) GPT model.

- "scaled-embed" (Takase et al. 2023, "Spike No More"): the word embedding's output is
  multiplied by sqrt(d), and the embedding matrix is drawn with std sqrt(2/(5d)) as in that
  paper, so that the scaled embeddings have std sqrt(2/5), of order one.
- "embed-ln" (Le Scao et al. 2022; BLOOM): a norm of the model's kind (config.normalization)
  right after the embedding (word + positions), the backbone's embedding init unchanged.

Both act on the first pipeline stage only and keep megatron-core's module tree: the scale is a
forward hook on `embedding.word_embeddings`, the norm a TorchNorm registered as
`embedding.embedding_norm` (so it is in the state dict, the checkpoints and the optimizer; under
sequence parallelism its gradients are summed over the TP group like every norm's).
"""
from __future__ import annotations

import math

import torch

from .norm import TorchNorm

EMBEDDING_VARIANTS = ("none", "scaled-embed", "embed-ln")


def scaled_embed_std(hidden_size: int) -> float:
    """The word-embedding std Scaled Embed is paired with: sqrt(2/(5d))."""
    return math.sqrt(2.0 / (5.0 * hidden_size))


def apply_embedding_variant(model: torch.nn.Module, variant: str, backbone_std: float) -> None:
    """Turn the GPT stage `model` (megatron-core GPTModel, ungated embedding drawn with
    `backbone_std`) into `variant` in place; before DDP wraps it and the optimizer is built."""
    if variant not in EMBEDDING_VARIANTS:
        raise ValueError(f"embedding variant must be one of {EMBEDDING_VARIANTS}, got {variant!r}")
    if variant == "none" or not getattr(model, "pre_process", True):
        return
    embedding = model.embedding
    if getattr(embedding.word_embeddings, "gate", None) is not None:
        raise ValueError(f"the {variant} baseline is for an ungated embedding (WeSaR off, or "
                         "--no-wesar-gate-embedding)")
    config = model.config
    if variant == "scaled-embed":
        scale = math.sqrt(config.hidden_size)
        with torch.no_grad():
            embedding.word_embeddings.weight.mul_(scaled_embed_std(config.hidden_size)
                                                  / backbone_std)
        embedding.word_embeddings.register_forward_hook(
            lambda module, args, output: output * scale)
    else:
        embedding.embedding_norm = TorchNorm(config, config.hidden_size,
                                             eps=config.layernorm_epsilon)
        embedding.register_forward_hook(
            lambda module, args, output: module.embedding_norm(output))
