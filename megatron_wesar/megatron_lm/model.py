"""The model builder of the Megatron-LM plug-in: Megatron-LM's `gpt_builder` signature, building
the WeSaR GPT model (gated transformer layers, word embedding and output layer).

`wesar_gpt_builder(args, pre_process, post_process, vp_stage, config, pg_collection)` is what
Megatron-LM's `model_provider(builder, ...)` calls; it reads the GPTModel arguments from
Megatron-LM's `args` as gpt_builder does, and refuses what the WeSaR model does not build
(`check_supported`).
"""
from __future__ import annotations

from ..spec import build_gpt_model
from .args import wesar_config_from_args


def _unsupported(args) -> list:
    """(what, why) of each Megatron-LM option in `args` that the WeSaR model does not support."""
    checks = [
        ("use_legacy_models", "--use-legacy-models: the legacy GPT model has no gated layers; "
         "drop the flag (megatron-core's GPTModel is used)"),
        ("num_experts", "--num-experts (MoE): the experts' linears are not gated"),
        ("mtp_num_layers", "--mtp-num-layers (multi-token prediction): the MTP block is not "
         "gated"),
        ("fp8", "--fp8-format: the plug-in builds the local gated layers and does not carry "
         "Megatron-LM's FP8 settings to them (megatron_wesar's own `pretrain` runs FP8: "
         "docs/fp8.md); train in bf16"),
        ("spec", "--spec: the plug-in builds its own gated layer spec; drop --spec (or use "
         "--spec megatron_wesar.megatron_lm wesar_layer_spec with pretrain_gpt.py itself)"),
        ("multi_latent_attention", "--multi-latent-attention: MLA's linears are not gated"),
        ("qk_layernorm", "--qk-layernorm: the WeSaR layer spec has no q/k norms"),
        ("experimental_attention_variant", "--experimental-attention-variant: not gated"),
        ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path: one layer "
         "spec for all layers"),
    ]
    return [why for name, why in checks if getattr(args, name, None)]


def check_supported(args) -> None:
    """Raise ValueError listing every Megatron-LM option in `args` the WeSaR model refuses."""
    problems = _unsupported(args)
    if problems:
        raise ValueError("megatron_wesar cannot build this model:\n  " + "\n  ".join(problems))


def _transformer_config(args):
    from megatron.training.arguments import core_transformer_config_from_args
    from megatron.training.yaml_arguments import core_transformer_config_from_yaml

    if args.yaml_cfg is not None:
        return core_transformer_config_from_yaml(args, "language_model")
    return core_transformer_config_from_args(args)


def wesar_gpt_builder(args, pre_process, post_process, vp_stage=None, config=None,
                      pg_collection=None):
    """Build this stage's WeSaR GPT model from Megatron-LM's `args` (Megatron-LM's gpt_builder
    signature; `config`, a TransformerConfig, is read from `args` when None, which needs
    megatron.training). With --use-cpu-initialization each module's initial weights depend only
    on (--seed, module), not on the TP/PP layout. Raises ValueError for what
    `check_supported` refuses."""
    check_supported(args)
    if config is None:
        config = _transformer_config(args)
    return build_gpt_model(
        config,
        wesar_config_from_args(args),
        args.padded_vocab_size,
        args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        init_seed=args.seed if config.use_cpu_initialization else None,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
    )
