"""`import --from hf DIR`: a WeSaR checkpoint from a pretrained ungated Hugging Face model, the
starting point of a continued-pretraining run.

The model's shape comes from DIR's config.json (GPT-2 or Llama, hf_layout); everything else
(WeSaR settings, optimizer, schedule, data) from pretrain's options. Every gated matrix W
becomes gate 1 and W_bar = W (the same model), or, with `sigma_rescale`, gate std(W) / sigma and
W_bar = W / gate (every W_bar with the common sigma, as WeSaR initialises them). Linear biases
the HF model lacks (Llama without attention / MLP biases) are zeros; the vocabulary is padded
with zero rows as pretrain pads it. The checkpoint is iteration 0 of `--save`, written by
pretrain's own `save_checkpoint` (atomic), so `pretrain --load` with the same options resumes
from it (fresh Adam moments, the full LR schedule ahead).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import replace

import torch

from ..data.tokenizers import build_tokenizer
from ..training.arguments import ParallelConfig, PretrainConfig, pretrain_config
from ..training.checkpointing import save_checkpoint
from ..training.pretrain import build_run_engine, build_transformer_config, padded_vocab_size
from .fold import EMBEDDING_WEIGHT, OUTPUT_WEIGHT, unfold_into
from .hf_layout import GPT2, Shape, UnsupportedArchitectureError, from_hf, shape_from_hf

INDEX = "model.safetensors.index.json"


def read_hf(directory: str) -> tuple:
    """(transformers config, {name: tensor}) of the Hugging Face model directory `directory`
    (model.safetensors, or shards listed by model.safetensors.index.json)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory: no "
                                "config.json")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"{directory} holds no safetensors weights")
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(directory, name)))
    return config, tensors


def shape_overrides(shape: Shape) -> dict:
    """pretrain's options ({dotted path: value}) that make its model the shape `shape`."""
    return {
        "model.num_layers": shape.num_layers, "model.hidden_size": shape.hidden_size,
        "model.ffn_hidden_size": shape.ffn_hidden_size,
        "model.num_attention_heads": shape.num_attention_heads,
        "model.seq_length": shape.seq_length, "model.swiglu": shape.arch != GPT2,
        "model.position_embedding_type": "learned_absolute" if shape.arch == GPT2 else "rope",
        "model.normalization": "LayerNorm" if shape.arch == GPT2 else "RMSNorm",
        "model.untie_embeddings_and_output_weights": not shape.tied,
    }


def check_expressible(shape: Shape, config: PretrainConfig) -> None:
    """UnsupportedArchitectureError naming each setting of `shape` that pretrain's model of
    `config` computes otherwise."""
    transformer = build_transformer_config(config)
    settings = {
        "key/value heads": (shape.num_query_groups,
                            transformer.num_query_groups or transformer.num_attention_heads),
        "head size": (shape.kv_channels, transformer.kv_channels),
        "norm epsilon": (shape.norm_eps, transformer.layernorm_epsilon),
    }
    bad = [f"{key} {found} (pretrain's model: {needed})"
           for key, (found, needed) in settings.items() if found != needed]
    if bad:
        raise UnsupportedArchitectureError(
            f"the {shape.arch} model has settings pretrain cannot build: " + ", ".join(bad))


def _pad_vocabulary(state: dict, vocab: int) -> None:
    """Pad the embedding (and output) rows with zeros to `vocab` rows, in place."""
    for key in (EMBEDDING_WEIGHT, OUTPUT_WEIGHT):
        if key in state:
            rows = state[key]
            state[key] = torch.cat([rows, rows.new_zeros(vocab - rows.shape[0], rows.shape[1])])


def import_hf(directory: str, overrides: dict, preset: str = "tiny",
              sigma_rescale: bool = False) -> str:
    """Write iteration 0 of the run's `--save` directory from the Hugging Face model
    `directory` (collective; model parallelism initialised with TP = PP = 1). `overrides` and
    `preset`: pretrain's options ({dotted path: value}); the model shape comes from the HF
    config (an option that contradicts it is an error). Returns the checkpoint path.

    UnsupportedArchitectureError / ValueError naming what does not fit."""
    hf_config, tensors = read_hf(directory)
    shape = shape_from_hf(hf_config)
    fixed = shape_overrides(shape)
    conflicts = [f"{key}: model {value!r}, option {overrides[key]!r}"
                 for key, value in fixed.items() if key in overrides and overrides[key] != value]
    if conflicts:
        raise ValueError(f"options contradict {directory}'s config.json: " + "; ".join(conflicts))
    config = pretrain_config({**overrides, **fixed}, preset)
    if not config.checkpoint.save:
        raise ValueError("import needs --save DIR: where the WeSaR checkpoint goes")
    check_expressible(shape, config)
    if shape.tied and "lm_head.weight" in tensors:  # some tied models store their copy
        tensors.pop("lm_head.weight")
    state = from_hf(shape, tensors)
    tokens = build_tokenizer(config.data.tokenizer_file).vocab_size
    vocab = padded_vocab_size(tokens, config.parallel.tensor_model_parallel_size)
    if not tokens <= shape.vocab_size <= vocab:
        raise ValueError(
            f"the model's vocabulary ({shape.vocab_size}) does not fit the run's tokenizer "
            f"({tokens} tokens, padded to {vocab}): pass the model's tokenizer as "
            "--tokenizer-file")
    _pad_vocabulary(state, vocab)
    whole = replace(config, parallel=ParallelConfig(
        use_distributed_optimizer=config.parallel.use_distributed_optimizer))
    engine = build_run_engine(whole, vocab)  # pretrain's engine: its resume finds its schedule
    for key, value in engine.module.state_dict().items():
        if key not in state and key.endswith(".bias") and ".linear_" in key:
            state[key] = torch.zeros_like(value)  # a bias the HF model does not have
    unfold_into(engine.module, state, config.wesar.sigma if sigma_rescale else None)
    engine.optimizer.reload_model_params()
    _fresh_adam_state(engine.optimizer)
    return save_checkpoint(engine, 0, config.checkpoint.save)


# megatron-core 0.16.1 leaves a falsy common step out of the optimizer's sharded state dict
# (`if step:` in its sharded_state_dict) and torch Adam cannot load per-parameter state without
# one; 1e-30 is kept, and Adam's first step makes it exactly 1.0, as from 0.
FRESH_ADAM_STEP = 1e-30


def _fresh_adam_state(optimizer) -> None:
    """Give every parameter the state Adam starts from (zero moments, step "0"), so that the
    checkpoint holds the optimizer state a resume loads (a never-stepped optimizer has none)."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        for param in (p for group in inner.param_groups for p in group["params"]):
            if not inner.state[param]:
                inner.state[param].update(exp_avg=torch.zeros_like(param),
                                          exp_avg_sq=torch.zeros_like(param),
                                          step=torch.tensor(FRESH_ADAM_STEP))
