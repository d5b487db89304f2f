"""The gated model a WeSaR checkpoint holds, rebuilt from the checkpoint's own description.

`open_checkpoint` resolves and verifies a checkpoint exactly as `pretrain --load` does (tracker,
SHA-256 manifest); `run_config` turns its `wesar_checkpoint.json` back into the PretrainConfig
whose `build_transformer_config` gives the model's numerics; `load_gated_model` builds the gated
GPT model in the current model-parallel layout and loads the checkpoint's weights into it
(megatron reshards them from the layout they were saved with).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from megatron.core import dist_checkpointing

from ..config import WeSaRConfig
from ..coordination import on_rank0
from ..spec import build_gpt_model
from ..training.arguments import ParallelConfig, PretrainConfig, pretrain_config
from ..training.checkpointing import (
    CheckpointError,
    CheckpointMismatchError,
    check_tensor_shapes,
    checkpoint_candidates,
    first_intact,
)
from ..training.pretrain import build_transformer_config

# what pretrain's ModelConfig sets for each recorded model setting
_MODEL_OVERRIDES = {
    "num_layers": "model.num_layers",
    "hidden_size": "model.hidden_size",
    "ffn_hidden_size": "model.ffn_hidden_size",
    "num_attention_heads": "model.num_attention_heads",
    "max_sequence_length": "model.seq_length",
    "gated_linear_unit": "model.swiglu",
    "position_embedding_type": "model.position_embedding_type",
    "normalization": "model.normalization",
}
SHARDING_METADATA = {"singleton_local_shards": False}  # as pretrain saves the model


@dataclass
class GatedCheckpoint:
    """A verified WeSaR checkpoint: its path, its description (wesar_checkpoint.json) and the
    PretrainConfig that rebuilds its model."""

    path: str
    description: dict
    config: PretrainConfig

    @property
    def model(self) -> dict:
        """The recorded model settings (shape, vocabulary, positions, tying, gates)."""
        return self.description["model"]


def open_checkpoint(load: str, iteration: int | None = None) -> GatedCheckpoint:
    """The checkpoint `load` names (a save directory: its tracker's or `iteration`'s; or one
    iter_*/ directory), verified file by file. Collective: every rank calls it.

    Raises CheckpointError for a missing directory, tracker or damaged file, and
    CheckpointMismatchError for a checkpoint that is not of a WeSaR model this package builds.
    """
    directory = os.path.abspath(load)
    candidates = on_rank0(lambda: checkpoint_candidates(directory, iteration, missing_ok=False))
    path, description = first_intact(candidates[:1], False, None)
    return GatedCheckpoint(path, description, run_config(path, description))


def run_config(path: str, description: dict) -> PretrainConfig:
    """The PretrainConfig (TP = PP = 1) whose model is the one `description` records.

    CheckpointMismatchError when it is not a WeSaR model (another method: nothing to fold), or
    has a setting that pretrain's config cannot rebuild (named).
    """
    model = description.get("model", {})
    if not model.get("wesar"):
        raise CheckpointMismatchError(
            f"checkpoint {path} was trained without WeSaR gates (a baseline method): there is "
            "nothing to fold; load it with the ungated model of its shape directly")
    if not model.get("wesar_gate_embedding") and "embedding_variant" not in model:
        raise CheckpointMismatchError(
            f"checkpoint {path} has an ungated word embedding and does not record whether it "
            "ran with an embedding-side baseline (scaled-embed multiplies it by sqrt(d)); "
            "export needs a gated word embedding")
    overrides = {key: model[name] for name, key in _MODEL_OVERRIDES.items()}
    overrides["model.untie_embeddings_and_output_weights"] = not model[
        "share_embeddings_and_output_weights"]
    overrides["model.bf16"] = description.get("layout", {}).get("params_dtype") == "bfloat16"
    overrides["model.embedding_variant"] = model.get("embedding_variant", "none")
    wesar = WeSaRConfig(**description["wesar_config"])
    overrides.update({f"wesar.{key}": value for key, value in description["wesar_config"].items()})
    config = pretrain_config(overrides)
    if config.wesar != wesar:
        raise CheckpointMismatchError(f"checkpoint {path}: its WeSaR settings do not rebuild")
    transformer = build_transformer_config(config)
    rebuilt = {
        "num_query_groups": transformer.num_query_groups or transformer.num_attention_heads,
        "kv_channels": transformer.kv_channels,
        "add_bias_linear": bool(transformer.add_bias_linear),
    }
    diffs = [f"{key}: checkpoint {model.get(key)!r}, pretrain's model {value!r}"
             for key, value in rebuilt.items() if model.get(key) != value]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {path} has settings this package's model builder does not make: "
            + "; ".join(diffs))
    return config


def in_current_layout(config: PretrainConfig) -> PretrainConfig:
    """`config` with the current tensor- and pipeline-parallel sizes (no sequence
    parallelism)."""
    from megatron.core import parallel_state

    return replace(config, parallel=ParallelConfig(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size()))


def build_model(config: PretrainConfig, vocab_size: int):
    """The gated GPT model of `config` in the current model-parallel layout, with the
    TransformerConfig `pretrain` builds for it."""
    config = in_current_layout(config)
    return build_gpt_model(
        build_transformer_config(config), config.wesar, vocab_size, config.model.seq_length,
        share_embeddings_and_output_weights=not config.model.untie_embeddings_and_output_weights,
        position_embedding_type=config.model.position_embedding_type)


def load_gated_model(checkpoint: GatedCheckpoint):
    """The gated model of `checkpoint` in the current model-parallel layout, its weights and
    gates loaded, in eval mode (collective). CheckpointMismatchError naming tensors of the
    model that the checkpoint lacks or holds in another shape."""
    if not parallel_layout_is_whole():
        raise CheckpointError("load_gated_model needs pipeline-parallel size 1")
    model = build_model(checkpoint.config, checkpoint.model["vocab_size"])
    check_tensor_shapes(checkpoint.path, model.sharded_state_dict())
    load_sharded(model, checkpoint.path, key="model")
    model.eval()
    return model


def parallel_layout_is_whole() -> bool:
    """Whether this rank holds every pipeline stage (PP = 1)."""
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size() == 1


def load_sharded(model, path: str, key: str = "model") -> None:
    """Load the dist checkpoint `path`'s `key` entry into `model` (any saved layout; collective)."""
    sharded = model.sharded_state_dict(metadata=dict(SHARDING_METADATA))
    loaded = dist_checkpointing.load({key: sharded}, path)
    model.load_state_dict(loaded[key], strict=True)
