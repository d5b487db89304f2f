"""The plain (ungated) Megatron checkpoint: megatron-core's own GPTModel with its local layer
spec, written with dist_checkpointing in Megatron-LM's release layout::

    OUT/latest_checkpointed_iteration.txt   "release"
    OUT/release/                            the dist checkpoint: {"model", "checkpoint_version",
                                            "iteration"}
    OUT/wesar_export.json                   the source checkpoint, the folded gates' model
                                            settings and the Megatron-LM flags of that shape

Its sharded tensors are megatron-core's (layers stacked, norms under the TE-compatible names of
the local spec), so the ungated model loads it into any TP/PP layout (`load_plain_checkpoint`).
"""
from __future__ import annotations

import json
import os

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from ..training.pretrain import build_transformer_config
from .fold import fold_gates, is_tied
from .output import on_writer, staged_directory
from .source import SHARDING_METADATA, in_current_layout, load_sharded

RELEASE = "release"
TRACKER = "latest_checkpointed_iteration.txt"
EXPORT_DESCRIPTION = "wesar_export.json"
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version


def build_plain_model(config, vocab_size: int, tied: bool) -> GPTModel:
    """megatron-core's GPTModel (local spec, no gates) of `config`'s shape: this rank's stage
    in the current model-parallel layout; `tied`: one matrix for the word embedding and the
    output layer."""
    config = in_current_layout(config)
    transformer = build_transformer_config(config)
    spec = get_gpt_layer_local_spec(normalization=transformer.normalization)
    return GPTModel(transformer, spec, vocab_size, config.model.seq_length,
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(),
                    share_embeddings_and_output_weights=tied,
                    position_embedding_type=config.model.position_embedding_type)


def load_plain_state(model, state: dict) -> None:
    """Load the plain state dict `state` into the ungated `model`; ValueError naming any key
    either side lacks."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"the folded weights do not fit the ungated model: missing {missing}, "
                         f"unexpected {result.unexpected_keys}")


def megatron_lm_flags(config, vocab_size: int, tied: bool) -> list:
    """The Megatron-LM flags of the exported model's shape (its tokenizer's flags aside)."""
    model = config.model
    flags = ["--num-layers", model.num_layers, "--hidden-size", model.hidden_size,
             "--ffn-hidden-size", model.ffn_hidden_size,
             "--num-attention-heads", model.num_attention_heads,
             "--seq-length", model.seq_length, "--max-position-embeddings", model.seq_length,
             "--position-embedding-type", model.position_embedding_type,
             "--normalization", model.normalization, "--vocab-size", vocab_size,
             "--make-vocab-size-divisible-by", 1, "--finetune"]
    flags += ["--swiglu"] if model.swiglu else []
    flags += [] if tied else ["--untie-embeddings-and-output-weights"]
    return [str(flag) for flag in flags]


def export_megatron(model, checkpoint, out: str) -> str:
    """Fold the gates of the loaded gated `model` (of `checkpoint`, a source.GatedCheckpoint;
    tensor-parallel size 1) and write the plain Megatron checkpoint `out` (collective; atomic).
    Returns the path of the dist checkpoint inside it."""
    state = fold_gates(model)
    tied, vocab = is_tied(state), checkpoint.model["vocab_size"]
    plain = build_plain_model(checkpoint.config, vocab, tied)
    load_plain_state(plain, state)
    description = {
        "source": checkpoint.path,
        "iteration": checkpoint.description.get("iteration"),
        "tied_embeddings": tied,
        "vocab_size": vocab,
        "megatron_lm_flags": megatron_lm_flags(checkpoint.config, vocab, tied),
    }
    with staged_directory(out) as tmp:
        release = os.path.join(tmp, RELEASE)
        on_writer(lambda: os.mkdir(release))
        state_dict = {"model": plain.sharded_state_dict(metadata=dict(SHARDING_METADATA)),
                      "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
        dist_checkpointing.save(state_dict, release, content_metadata=dict(SHARDING_METADATA))
        on_writer(lambda: _write_descriptions(tmp, description))
    return os.path.join(os.path.abspath(out), RELEASE)


def _write_descriptions(directory: str, description: dict) -> None:
    with open(os.path.join(directory, TRACKER), "w") as f:
        f.write(RELEASE)
    with open(os.path.join(directory, EXPORT_DESCRIPTION), "w") as f:
        json.dump(description, f, indent=1)
        f.write("\n")


def load_plain_checkpoint(model, out: str) -> None:
    """Load the plain Megatron checkpoint `out` (written by `export_megatron`) into the ungated
    `model` (`build_plain_model`, any TP/PP layout; collective)."""
    load_sharded(model, os.path.join(out, RELEASE))
