"""The WeSaR GPT layer spec (local or Transformer Engine backend) and the GPT model builder.

`get_wesar_layer_spec` returns megatron-core's TransformerLayer spec with the four linear layers
replaced by gated ones: megatron-core's tensor-parallel layers (backend "local"; FP8 through the
torch-native backend, megatron_wesar.fp8) or its TE wrappers (backend "transformer_engine",
megatron_wesar.te_layers: the norms fused into qkv and fc1, as megatron-core's gpt_layer_specs).
`WeSaRGPTModel` is megatron-core's GPTModel whose word embedding and output layer are gated too;
with tied embeddings the two share W_bar and each keeps its own gate (docs/design.md section 3).
`build_gpt_model` validates the parallel shapes and builds it.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.extensions.transformer_engine import TEDotProductAttention, TENorm
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank

from .config import WeSaRConfig
from .layers import (
    GatedColumnParallelLinear,
    GatedPositionEmbedding,
    GatedRowParallelLinear,
    GatedVocabParallelEmbedding,
    assert_gates_finite,
    gate_parameters,
)
from .norm import local_norm

BACKENDS = ("local", "transformer_engine")  # Megatron-LM's --transformer-impl
_TE_LAYERS = "megatron_wesar.te_layers"


class TransformerEngineUnavailableError(ImportError):
    """--transformer-impl transformer_engine where transformer_engine does not import."""


def require_transformer_engine() -> None:
    """Raise TransformerEngineUnavailableError, naming what to install, unless
    transformer_engine (and megatron-core's wrappers of it) import."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as error:
        raise TransformerEngineUnavailableError(
            "--transformer-impl transformer_engine needs NVIDIA Transformer Engine, which does "
            f"not import here ({error}); install it (pip install --no-build-isolation "
            "transformer_engine[pytorch], CUDA only) or use --transformer-impl local (its FP8 "
            "is the torch-native backend)") from error


def seed_for_module(init_seed: int, index: int) -> None:
    """Seed the CPU RNG for the weights of module `index` (global layer number; num_layers + 1 for
    the word embedding, + 2 for the output layer), so that CPU-initialised weights do not depend
    on the pipeline (or tensor) parallel layout."""
    torch.manual_seed(init_seed * 100_003 + index)


class SeededTransformerLayer(TransformerLayer):
    """TransformerLayer whose CPU-initialised weights depend only on (init_seed, layer number).

    With `init_seed=None` it is megatron-core's TransformerLayer unchanged.
    """

    def __init__(self, config, submodules, layer_number: int = 1, *, init_seed=None, **kwargs):
        if init_seed is not None:
            groups = kwargs.get("pg_collection")
            pp_rank = get_pg_rank(groups.pp) if groups is not None else None
            offset = get_transformer_layer_offset(config, kwargs.get("vp_stage"), pp_rank)
            seed_for_module(init_seed, layer_number + offset)
        super().__init__(config, submodules, layer_number, **kwargs)


def get_wesar_layer_spec(wesar: WeSaRConfig, init_seed: int | None = None,
                         backend: str = "local") -> ModuleSpec:
    """A pre-LN GPT TransformerLayer spec whose qkv, attention-output, fc1 and fc2 are gated:
    one gate per logical matrix (linear_qkv: q, k, v; a SwiGLU linear_fc1: gate, up, unless
    `wesar.share_glu_gates`).

    The norm follows `config.normalization` (LayerNorm or RMSNorm); the MLP is GeLU or SwiGLU
    as `config.gated_linear_unit` and `config.activation_func` say. With `init_seed`, each layer's
    CPU-initialised weights depend only on (init_seed, global layer number). `backend` "local"
    builds megatron-core's tensor-parallel layers and `norm.local_norm()` (megatron-core's apex
    FusedLayerNorm where apex is here, else a TorchNorm); "transformer_engine" (raises
    TransformerEngineUnavailableError without TE) TE's LayerNorm-linears for qkv and fc1 (the
    layer norms fused in, so the spec's norms are IdentityOp), TE row-parallel linears and TE's
    attention, as megatron-core's get_gpt_layer_with_transformer_engine_spec.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    te = backend == "transformer_engine"
    if te:
        require_transformer_engine()
        column_cls = (_TE_LAYERS, "GatedTELayerNormColumnParallelLinear")
        row_cls = (_TE_LAYERS, "GatedTERowParallelLinear")
        # megatron-core's TE wrappers (placeholders where TE is absent); SelfAttention calls
        # core_attention itself, so it is the class, not an import path
        attention = TEDotProductAttention
        norm = IdentityOp
    else:
        column_cls, row_cls = GatedColumnParallelLinear, GatedRowParallelLinear
        attention, norm = DotProductAttention, local_norm()

    def column(role):
        return ModuleSpec(module=column_cls, params={"role": role, "wesar": wesar})

    def row(role):
        return ModuleSpec(module=row_cls, params={"role": role, "wesar": wesar})

    return ModuleSpec(
        module=SeededTransformerLayer,
        params={"init_seed": init_seed},
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column("qkv"),
                    core_attention=attention,
                    linear_proj=row("attn_proj"),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=column("fc1"), linear_fc2=row("fc2")),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_wesar_block_spec(config, wesar: WeSaRConfig, vp_stage: int | None = None,
                         init_seed: int | None = None, backend: str = "local") -> ModuleSpec:
    """The TransformerBlock spec of this pipeline stage: gated layers of `backend` and a final
    norm (`norm.local_norm()`; TE's TENorm with backend "transformer_engine")."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    layer = get_wesar_layer_spec(wesar, init_seed, backend)
    final_norm = TENorm if backend == "transformer_engine" else local_norm()
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * num_layers,
                                              layer_norm=final_norm),
    )


class WeSaRGPTModel(GPTModel):
    """megatron-core GPTModel with a gated word embedding and a gated output layer.

    Takes GPTModel's arguments plus `wesar`. With `wesar.enabled=False` it is the same model
    with the backbone init and no gates.
    """

    def __init__(self, config, transformer_layer_spec, vocab_size, max_sequence_length, *,
                 wesar: WeSaRConfig, init_seed: int | None = None, **kwargs):
        super().__init__(config, transformer_layer_spec, vocab_size, max_sequence_length, **kwargs)
        self.wesar = wesar
        if self.pre_process:
            if init_seed is not None:
                seed_for_module(init_seed, config.num_layers + 1)
            old = self.embedding.word_embeddings
            self.embedding.word_embeddings = GatedVocabParallelEmbedding(
                vocab_size,
                config.hidden_size,
                config=config,
                reduce_scatter_embeddings=old.reduce_scatter_embeddings,
                tp_group=old.tp_group,
                wesar=wesar,
            )
            if getattr(self.embedding, "position_embeddings", None) is not None:
                self.embedding.position_embeddings = GatedPositionEmbedding(
                    max_sequence_length, config.hidden_size, config=config, wesar=wesar)
        if self.post_process:
            if init_seed is not None:
                seed_for_module(init_seed, config.num_layers + 2)
            old = self.output_layer
            tied = self.share_embeddings_and_output_weights
            self.output_layer = GatedColumnParallelLinear(
                config.hidden_size,
                vocab_size,
                config=config,
                role="output",
                weight_role="embedding" if tied else None,
                wesar=wesar,
                bias=False,
                skip_bias_add=False,
                gather_output=old.gather_output,
                skip_weight_param_allocation=self.pre_process and tied,
                embedding_activation_buffer=old.embedding_activation_buffer,
                grad_output_buffer=old.grad_output_buffer,
                tp_group=old.tp_group,
            )
        if self.pre_process or self.post_process:
            self.setup_embeddings_and_output_layer()
        self.named_gates = gate_parameters(self)  # listed once, checked at every forward

    def forward(self, *args, **kwargs):
        """GPTModel.forward, after checking (one fused check) that every gate is finite."""
        if self.wesar.check_finite_gates:
            assert_gates_finite(self.named_gates)
        return super().forward(*args, **kwargs)


def validate_parallel_shapes(config, tp_size: int | None = None,
                             vocab_size: int | None = None) -> None:
    """Raise ValueError when the model's sizes cannot be split over the tensor-parallel group."""
    if tp_size is None:
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if config.tensor_model_parallel_size != tp_size:
        raise ValueError(
            f"config.tensor_model_parallel_size={config.tensor_model_parallel_size} but the "
            f"tensor-parallel group has {tp_size} ranks"
        )
    for name in ("hidden_size", "num_attention_heads", "ffn_hidden_size"):
        value = getattr(config, name)
        if value % tp_size:
            raise ValueError(
                f"{name}={value} is not divisible by the tensor-model-parallel size {tp_size}"
            )
    if vocab_size is not None and vocab_size % tp_size:
        raise ValueError(
            f"vocab_size={vocab_size} is not divisible by the tensor-model-parallel size {tp_size}"
            " (pad the vocabulary to a multiple of it)"
        )
    groups = config.num_query_groups or config.num_attention_heads
    if groups % tp_size:
        raise ValueError(
            f"num_query_groups={groups} is not divisible by the tensor-model-parallel size "
            f"{tp_size}"
        )


def build_gpt_model(
    config,
    wesar: WeSaRConfig,
    vocab_size: int,
    max_sequence_length: int,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    init_seed: int | None = None,
    backend: str = "local",
    **gpt_kwargs,
) -> WeSaRGPTModel:
    """Build the WeSaR GPT model for this rank's pipeline stage, its transformer layers of
    `backend` ("local" or "transformer_engine", see get_wesar_layer_spec).

    `gpt_kwargs` go to GPTModel (e.g. share_embeddings_and_output_weights,
    position_embedding_type='rope'). Pre/post-process default to this rank's stage. With
    `init_seed` and CPU initialisation the initial weights do not depend on the TP/PP layout.
    """
    validate_parallel_shapes(config, vocab_size=vocab_size)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    return WeSaRGPTModel(
        config,
        get_wesar_block_spec(config, wesar, gpt_kwargs.get("vp_stage"), init_seed, backend),
        vocab_size,
        max_sequence_length,
        wesar=wesar,
        init_seed=init_seed,
        pre_process=pre_process,
        post_process=post_process,
        **gpt_kwargs,
    )
