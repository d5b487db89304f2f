"""Which Hugging Face architecture expresses a plain GPT model, and how its tensors map.

Two architectures that transformers loads without custom code:

    megatron model                                   Hugging Face
    LayerNorm + GeLU (exact) + learned positions     GPT2LMHeadModel (activation "gelu")
    RMSNorm + SwiGLU + RoPE (base 10000, full)       LlamaForCausalLM (biases as flags)

`Shape` is what both sides agree on; `shape_from_megatron` / `shape_from_hf` build it and raise
UnsupportedArchitectureError naming what the other side cannot express. Every tensor maps
through a `Rule` (one megatron tensor <-> one or more HF tensors) in both directions, so export
and import share one table. The fused linear_qkv (per query group: its query heads, key head,
value head) and SwiGLU linear_fc1 ([W_gate; W_up]) are split with `layers.FusedLayout`, the
layers' own description of those layouts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import WeSaRConfig
from ..layers import FusedLayout, matrix_parts

GPT2, LLAMA = "gpt2", "llama"
ROPE_BASE = 10000.0  # megatron GPTModel's default, which pretrain uses


class UnsupportedArchitectureError(ValueError):
    """The model has a setting the target format cannot express."""


@dataclass(frozen=True)
class Shape:
    """The settings a megatron GPT model and its Hugging Face twin share."""

    arch: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    seq_length: int
    norm_eps: float
    bias: bool
    tied: bool


def shape_from_megatron(model: dict, transformer_config, tied: bool) -> Shape:
    """The Shape of the checkpoint model `model` (wesar_checkpoint.json's "model") with its
    TransformerConfig; UnsupportedArchitectureError when neither architecture expresses it."""
    norm, glu, positions = (model["normalization"], model["gated_linear_unit"],
                            model["position_embedding_type"])
    kinds = {("LayerNorm", False, "learned_absolute"): GPT2, ("RMSNorm", True, "rope"): LLAMA}
    arch = kinds.get((norm, glu, positions))
    if arch is None:
        raise UnsupportedArchitectureError(
            f"no Hugging Face architecture for {norm} + {'SwiGLU' if glu else 'GeLU'} + "
            f"{positions} positions: export supports LayerNorm + GeLU + learned positions "
            "(GPT-2) and RMSNorm + SwiGLU + RoPE (Llama)")
    shape = Shape(arch, model["num_layers"], model["hidden_size"], model["ffn_hidden_size"],
                  model["num_attention_heads"], model["num_query_groups"], model["kv_channels"],
                  model["vocab_size"], model["max_sequence_length"],
                  float(transformer_config.layernorm_epsilon), model["add_bias_linear"], tied)
    if arch == GPT2:
        _check_gpt2(shape)
    return shape


def _check_gpt2(shape: Shape) -> None:
    problems = []
    if shape.num_query_groups != shape.num_attention_heads:
        problems.append(f"grouped-query attention ({shape.num_query_groups} key/value heads)")
    if shape.kv_channels * shape.num_attention_heads != shape.hidden_size:
        problems.append(f"head size {shape.kv_channels} != hidden / heads")
    if not shape.bias:
        problems.append("linear layers without biases")
    if problems:
        raise UnsupportedArchitectureError("GPT-2 cannot express " + ", ".join(problems))


def shape_from_hf(config) -> Shape:
    """The Shape of a transformers GPT2Config or LlamaConfig; UnsupportedArchitectureError
    naming any setting megatron's GPT model computes otherwise."""
    kind = getattr(config, "model_type", None)
    if kind == GPT2:
        return _gpt2_shape(config)
    if kind == LLAMA:
        return _llama_shape(config)
    raise UnsupportedArchitectureError(
        f"import supports Hugging Face model types {GPT2!r} and {LLAMA!r}, not {kind!r}")


def _refuse(arch: str, settings: dict) -> None:
    """UnsupportedArchitectureError naming each (setting: (found, needed)) that differs."""
    bad = [f"{key}={found!r} (megatron computes {needed!r})"
           for key, (found, needed) in settings.items() if found != needed]
    if bad:
        raise UnsupportedArchitectureError(f"{arch} model with " + ", ".join(bad))


def _gpt2_shape(config) -> Shape:
    _refuse(GPT2, {
        "activation_function": (config.activation_function, "gelu"),
        "scale_attn_weights": (config.scale_attn_weights, True),
        "scale_attn_by_inverse_layer_idx": (config.scale_attn_by_inverse_layer_idx, False),
        "add_cross_attention": (config.add_cross_attention, False),
    })
    heads, hidden = config.n_head, config.n_embd
    return Shape(GPT2, config.n_layer, hidden, config.n_inner or 4 * hidden, heads, heads,
                 hidden // heads, config.vocab_size, config.n_positions,
                 float(config.layer_norm_epsilon), True, bool(config.tie_word_embeddings))


def _llama_shape(config) -> Shape:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    _refuse(LLAMA, {
        "hidden_act": (config.hidden_act, "silu"),
        "rope_type": (rope.get("rope_type", "default"), "default"),
        "rope_theta": (float(rope.get("rope_theta", ROPE_BASE)), ROPE_BASE),
        "attention_bias == mlp_bias": (bool(config.attention_bias) == bool(config.mlp_bias),
                                       True),
    })
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(LLAMA, config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                 heads, config.num_key_value_heads or heads, head_dim, config.vocab_size,
                 config.max_position_embeddings, float(config.rms_norm_eps),
                 bool(config.attention_bias), bool(config.tie_word_embeddings))


def hf_config(shape: Shape, eod: int, dtype: torch.dtype):
    """The transformers config of `shape` (end-of-document token `eod`, weights of `dtype`)."""
    from transformers import GPT2Config, LlamaConfig

    common = {"vocab_size": shape.vocab_size, "tie_word_embeddings": shape.tied,
              "bos_token_id": eod, "eos_token_id": eod,
              "dtype": str(dtype).replace("torch.", "")}
    if shape.arch == GPT2:
        return GPT2Config(
            n_positions=shape.seq_length, n_embd=shape.hidden_size, n_layer=shape.num_layers,
            n_head=shape.num_attention_heads, n_inner=shape.ffn_hidden_size,
            activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            layer_norm_epsilon=shape.norm_eps, architectures=["GPT2LMHeadModel"], **common)
    return LlamaConfig(
        hidden_size=shape.hidden_size, intermediate_size=shape.ffn_hidden_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_query_groups, head_dim=shape.kv_channels,
        hidden_act="silu", max_position_embeddings=shape.seq_length,
        rms_norm_eps=shape.norm_eps, attention_bias=shape.bias, mlp_bias=shape.bias,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE},
        architectures=["LlamaForCausalLM"], **common)


@dataclass(frozen=True)
class Rule:
    """One megatron tensor and the HF tensor(s) it becomes: `split` maps it to them (in the
    order of `hf`), `merge` back."""

    megatron: str
    hf: tuple
    split: Callable
    merge: Callable


def _same(megatron: str, hf: str) -> Rule:
    return Rule(megatron, (hf,), lambda t: [t], lambda ts: ts[0])


def _transposed(megatron: str, hf: str) -> Rule:
    """A GPT-2 Conv1D weight: [in, out], the transpose of megatron's [out, in]."""
    return Rule(megatron, (hf,), lambda t: [t.t()], lambda ts: ts[0].t())


def _split(layout: FusedLayout, tensor: torch.Tensor) -> list:
    return [layout.rows(tensor, i).reshape(-1, *tensor.shape[1:])
            for i in range(len(layout.widths))]


def _merge(layout: FusedLayout, parts: list) -> torch.Tensor:
    rest = parts[0].shape[1:]
    out = parts[0].new_empty((layout.repeats * sum(layout.widths), *rest))
    for i, part in enumerate(parts):
        layout.rows(out, i).copy_(part.reshape(layout.repeats, layout.widths[i], *rest))
    return out


def _fused(megatron: str, hf: tuple, layout: FusedLayout) -> Rule:
    return Rule(megatron, hf, lambda t: _split(layout, t), lambda ts: _merge(layout, ts))


def _gpt2_c_attn(megatron: str, hf: str, layout: FusedLayout, weight: bool) -> Rule:
    """GPT-2's c_attn: [W_q; W_k; W_v] (all heads each) as a Conv1D weight, or its bias."""
    flip = (lambda t: t.t()) if weight else (lambda t: t)
    sizes = [w * layout.repeats for w in layout.widths]
    return Rule(megatron, (hf,), lambda t: [flip(torch.cat(_split(layout, t)))],
                lambda ts: _merge(layout, list(torch.split(flip(ts[0]), sizes))))


class _LayoutConfig:
    """The fields `layers.matrix_parts` reads to lay out linear_qkv and linear_fc1."""

    def __init__(self, shape: Shape):
        self.num_attention_heads, self.kv_channels = shape.num_attention_heads, shape.kv_channels
        self.num_query_groups, self.gated_linear_unit = shape.num_query_groups, True


def _layouts(shape: Shape) -> tuple:
    """(linear_qkv's FusedLayout, SwiGLU linear_fc1's) of the whole (TP = 1) weights."""
    config, wesar = _LayoutConfig(shape), WeSaRConfig()
    qkv_rows = (shape.num_attention_heads + 2 * shape.num_query_groups) * shape.kv_channels
    _, qkv = matrix_parts("qkv", config, wesar, qkv_rows)
    _, fc1 = matrix_parts("fc1", config, wesar, 2 * shape.ffn_hidden_size)
    return qkv, fc1


def rules(shape: Shape) -> list:
    """The mapping of every tensor of the plain megatron model of `shape`."""
    qkv, fc1 = _layouts(shape)
    gpt2 = shape.arch == GPT2
    out = []
    for i in range(shape.num_layers):
        m = f"decoder.layers.{i}."
        if gpt2:
            h = f"transformer.h.{i}."
            out += [_gpt2_c_attn(m + "self_attention.linear_qkv.weight", h + "attn.c_attn.weight",
                                 qkv, weight=True),
                    _gpt2_c_attn(m + "self_attention.linear_qkv.bias", h + "attn.c_attn.bias",
                                 qkv, weight=False),
                    _transposed(m + "self_attention.linear_proj.weight", h + "attn.c_proj.weight"),
                    _same(m + "self_attention.linear_proj.bias", h + "attn.c_proj.bias"),
                    _transposed(m + "mlp.linear_fc1.weight", h + "mlp.c_fc.weight"),
                    _same(m + "mlp.linear_fc1.bias", h + "mlp.c_fc.bias"),
                    _transposed(m + "mlp.linear_fc2.weight", h + "mlp.c_proj.weight"),
                    _same(m + "mlp.linear_fc2.bias", h + "mlp.c_proj.bias")]
            norms = (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2"))
            out += [_same(f"{m}{a}.{p}", f"{h}{b}.{p}") for a, b in norms
                    for p in ("weight", "bias")]
            continue
        h = f"model.layers.{i}."
        params = ("weight", "bias") if shape.bias else ("weight",)
        for p in params:
            out += [_fused(f"{m}self_attention.linear_qkv.{p}",
                           tuple(f"{h}self_attn.{x}_proj.{p}" for x in "qkv"), qkv),
                    _same(f"{m}self_attention.linear_proj.{p}", f"{h}self_attn.o_proj.{p}"),
                    _fused(f"{m}mlp.linear_fc1.{p}", (f"{h}mlp.gate_proj.{p}",
                                                      f"{h}mlp.up_proj.{p}"), fc1),
                    _same(f"{m}mlp.linear_fc2.{p}", f"{h}mlp.down_proj.{p}")]
        out += [_same(m + "input_layernorm.weight", h + "input_layernorm.weight"),
                _same(m + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight")]
    if gpt2:
        out += [_same("embedding.word_embeddings.weight", "transformer.wte.weight"),
                _same("embedding.position_embeddings.weight", "transformer.wpe.weight"),
                _same("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
                _same("decoder.final_layernorm.bias", "transformer.ln_f.bias")]
    else:
        out += [_same("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                _same("decoder.final_layernorm.weight", "model.norm.weight")]
    if not shape.tied:
        out.append(_same("output_layer.weight", "lm_head.weight"))
    return out


def to_hf(shape: Shape, state: dict) -> dict:
    """The HF state dict of the plain megatron state dict `state` (contiguous tensors).
    ValueError naming megatron tensors the mapping leaves out."""
    table = rules(shape)
    unmapped = sorted(set(state) - {rule.megatron for rule in table})
    if unmapped:
        raise UnsupportedArchitectureError(f"no Hugging Face place for {unmapped[:8]}")
    return {key: tensor.contiguous() for rule in table
            for key, tensor in zip(rule.hf, rule.split(state[rule.megatron]))}


def from_hf(shape: Shape, tensors: dict) -> dict:
    """The plain megatron state dict of the HF state dict `tensors`. ValueError naming missing
    HF tensors and HF tensors without a megatron place."""
    table = rules(shape)
    needed = {key for rule in table for key in rule.hf}
    missing, extra = sorted(needed - set(tensors)), sorted(set(tensors) - needed)
    if missing or extra:
        raise ValueError(f"the Hugging Face weights do not fit a {shape.arch} model of their "
                         f"config: missing {missing[:8]}, unknown {extra[:8]}")
    return {rule.megatron: rule.merge([tensors[key] for key in rule.hf]).contiguous()
            for rule in table}
