"""The pieces of the export that need no process group: which Hugging Face architecture a
model maps to (and the refusals), the tensor mapping of the fused layouts, the byte tokenizer
and the all-or-nothing output directory."""
from __future__ import annotations

import os
import re

import pytest
import torch

from megatron_wesar.export.hf_layout import (
    LLAMA,
    Shape,
    UnsupportedArchitectureError,
    from_hf,
    rules,
    shape_from_hf,
    shape_from_megatron,
    to_hf,
)
from megatron_wesar.export.output import staged_directory


class _Config:
    layernorm_epsilon = 1e-5


def _megatron_model(**changes) -> dict:
    model = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
             "num_attention_heads": 4, "num_query_groups": 4, "kv_channels": 16,
             "gated_linear_unit": False, "normalization": "LayerNorm", "add_bias_linear": True,
             "vocab_size": 256, "max_sequence_length": 32,
             "position_embedding_type": "learned_absolute"}
    return {**model, **changes}


def test_architecture_follows_norm_mlp_and_positions():
    assert shape_from_megatron(_megatron_model(), _Config, tied=True).arch == "gpt2"
    llama = _megatron_model(normalization="RMSNorm", gated_linear_unit=True,
                            position_embedding_type="rope", num_query_groups=2)
    assert shape_from_megatron(llama, _Config, tied=False).arch == LLAMA


@pytest.mark.parametrize("changes, named", [
    ({"gated_linear_unit": True}, "LayerNorm + SwiGLU + learned_absolute"),
    ({"normalization": "RMSNorm", "gated_linear_unit": True}, "RMSNorm + SwiGLU + learned"),
    ({"num_query_groups": 2}, "grouped-query attention"),
    ({"add_bias_linear": False}, "without biases"),
])
def test_an_architecture_no_target_expresses_is_refused(changes, named):
    with pytest.raises(UnsupportedArchitectureError, match=re.escape(named)):
        shape_from_megatron(_megatron_model(**changes), _Config, tied=True)


def test_hf_models_megatron_computes_otherwise_are_refused():
    from transformers import GPT2Config, GPTJConfig, LlamaConfig

    with pytest.raises(UnsupportedArchitectureError, match="activation_function='gelu_new'"):
        shape_from_hf(GPT2Config())  # GPT-2's tanh-approximate GeLU
    with pytest.raises(UnsupportedArchitectureError, match="rope_theta=500000.0"):
        shape_from_hf(LlamaConfig(rope_parameters={"rope_type": "default",
                                                   "rope_theta": 500000.0}))
    with pytest.raises(UnsupportedArchitectureError, match="not 'gptj'"):
        shape_from_hf(GPTJConfig())
    assert shape_from_hf(GPT2Config(activation_function="gelu")).arch == "gpt2"


def _random_state(shape: Shape) -> dict:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for rule in rules(shape):
        rows = {"linear_qkv": (shape.num_attention_heads + 2 * shape.num_query_groups)
                * shape.kv_channels, "linear_fc1": 2 * shape.ffn_hidden_size}
        size = next((n for k, n in rows.items() if k in rule.megatron), shape.hidden_size)
        if "linear_fc2.weight" in rule.megatron:
            state[rule.megatron] = torch.randn(shape.hidden_size, shape.ffn_hidden_size,
                                               generator=generator)
        elif "word_embeddings" in rule.megatron or "output_layer" in rule.megatron:
            state[rule.megatron] = torch.randn(shape.vocab_size, shape.hidden_size,
                                               generator=generator)
        elif rule.megatron.endswith("bias") or "norm" in rule.megatron:
            state[rule.megatron] = torch.randn(size, generator=generator)
        else:
            state[rule.megatron] = torch.randn(size, shape.hidden_size, generator=generator)
    return state


def test_llama_tensors_follow_megatrons_per_group_layout_both_ways():
    shape = Shape(LLAMA, 1, 64, 96, 4, 2, 16, 256, 32, 1e-5, True, False)
    state = _random_state(shape)
    hf = to_hf(shape, state)
    qkv = state["decoder.layers.0.self_attention.linear_qkv.weight"].view(2, 4, 16, 64)
    # per query group: its 2 query heads, then its key head, then its value head
    assert torch.equal(hf["model.layers.0.self_attn.q_proj.weight"], qkv[:, :2].reshape(64, 64))
    assert torch.equal(hf["model.layers.0.self_attn.k_proj.weight"], qkv[:, 2].reshape(32, 64))
    assert torch.equal(hf["model.layers.0.self_attn.v_proj.weight"], qkv[:, 3].reshape(32, 64))
    fc1 = state["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(hf["model.layers.0.mlp.gate_proj.weight"], fc1[:96])
    assert torch.equal(hf["model.layers.0.mlp.up_proj.weight"], fc1[96:])
    back = from_hf(shape, hf)
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[key], state[key]) for key in state)
    hf.pop("lm_head.weight")
    with pytest.raises(ValueError, match="missing \\['lm_head.weight'\\]"):
        from_hf(shape, hf)


def test_byte_tokenizer_ids_are_the_bytes(tmp_path):
    from tokenizers import Tokenizer

    from megatron_wesar.export.hf import write_byte_tokenizer

    write_byte_tokenizer(str(tmp_path))
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "héllo wörld\x00 ∑"
    ids = tokenizer.encode(text).ids
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_a_failed_export_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_directory(str(out)) as tmp:
            open(os.path.join(tmp, "config.json"), "w").close()
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []
    with staged_directory(str(out)) as tmp:
        open(os.path.join(tmp, "config.json"), "w").close()
    assert os.listdir(out) == ["config.json"]
    with pytest.raises(FileExistsError, match="already exists"):
        with staged_directory(str(out)):
            pass
