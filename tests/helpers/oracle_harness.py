"""Run one WeSaR GPT training case on megatron-core and on the dense reference, step by step.

`run_megatron_case` runs inside every rank of a gloo group (megatron DDP, the megatron optimizer,
the pipeline schedules, finalize_model_grads); `run_reference_case` replays the same steps on the
reference decoder from the gathered initial weights. Both return per-step losses, gate gradients
(before clipping), global grad norms and gate values after each optimizer step, and every
trained tensor (W_bar, gates, biases, norms, embeddings) after the last step.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from unittest import mock

import torch
import torch.nn.functional as F

from tests.helpers.gather import distributed_optimizer_owned, gather_canonical
from tests.helpers.reference import ReferenceArch, ReferenceGPT, reference_adamw


@dataclass(frozen=True)
class Case:
    """One oracle configuration (float64 unless dtype says otherwise)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    sp: bool = False
    tied: bool = False
    backbone: str = "he"
    swiglu: bool = False
    share_glu_gates: bool = False
    rope: bool = False
    rmsnorm: bool = False
    enabled: bool = True
    sigma: float | None = None  # None: WeSaRConfig's default
    gate_embedding: bool = True
    gate_output_layer: bool = True
    train_gates: bool = True
    distributed_optimizer: bool = False
    defer_gate_grad_reduction: bool = True
    stock_finalize: bool = False  # megatron-core's own finalize_model_grads
    layer_spec_only: bool = False  # megatron's GPTModel with get_wesar_layer_spec (ungated ends)
    steps: int = 5
    micro_batches: int = 2
    micro_batch_size: int = 2
    seq_len: int = 16
    num_layers: int = 2
    hidden_size: int = 32
    num_heads: int = 4
    num_query_groups: int | None = None  # None: MHA; fewer than num_heads: GQA
    ffn_hidden_size: int = 64
    vocab_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    clip_grad: float = 0.0  # megatron's clip asserts fp32 grads: float64 cases run unclipped
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    seed: int = 1234
    dtype: torch.dtype = torch.float64

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def arch(self) -> ReferenceArch:
        return ReferenceArch(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            ffn_hidden_size=self.ffn_hidden_size,
            max_seq_len=self.seq_len,
            num_query_groups=self.num_query_groups,
            swiglu=self.swiglu,
            share_glu_gates=self.share_glu_gates,
            rope=self.rope,
            tied=self.tied,
            rmsnorm=self.rmsnorm,
        )

    @property
    def gates_per_layer(self) -> int:
        """q, k, v, attention output, fc1 (SwiGLU: gate and up, unless shared) and fc2."""
        return 7 if self.swiglu and not self.share_glu_gates else 6

    @property
    def num_gates(self) -> int:
        """How many gates the model has: one per matrix of each layer, plus the gated input
        embeddings (word, and learned positions without RoPE) and output."""
        if not self.enabled:
            return 0
        embeddings = self.gate_embedding * (1 if self.rope else 2)
        ends = 0 if self.layer_spec_only else embeddings + self.gate_output_layer
        return self.gates_per_layer * self.num_layers + ends

    def global_batch(self, step: int) -> torch.Tensor:
        """Token ids [global batch, seq_len + 1] of `step` (a new batch every step), the same for
        every layout."""
        rows = self.dp * self.micro_batches * self.micro_batch_size
        gen = torch.Generator().manual_seed(self.seed * 1000 + step)
        return torch.randint(0, self.vocab_size, (rows, self.seq_len + 1), generator=gen)


def transformer_config(case: Case):
    """The megatron-core TransformerConfig of a case."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=case.num_layers,
        hidden_size=case.hidden_size,
        num_attention_heads=case.num_heads,
        num_query_groups=case.num_query_groups,
        ffn_hidden_size=case.ffn_hidden_size,
        tensor_model_parallel_size=case.tp,
        pipeline_model_parallel_size=case.pp,
        sequence_parallel=case.sp,
        params_dtype=case.dtype,
        pipeline_dtype=case.dtype,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gated_linear_unit=case.swiglu,
        activation_func=F.silu if case.swiglu else F.gelu,
        normalization="RMSNorm" if case.rmsnorm else "LayerNorm",
        add_bias_linear=True,
    )


def wesar_config(case: Case):
    """The WeSaRConfig of a case."""
    from megatron_wesar.config import WeSaRConfig

    return WeSaRConfig(
        backbone=case.backbone,
        enabled=case.enabled,
        gate_embedding=case.gate_embedding,
        gate_output_layer=case.gate_output_layer,
        train_gates=case.train_gates,
        defer_gate_grad_reduction=case.defer_gate_grad_reduction,
        share_glu_gates=case.share_glu_gates,
        **({} if case.sigma is None else {"sigma": case.sigma}),
    )


def _layer_spec_only_gpt(config, wesar, vocab_size, max_sequence_length, *, init_seed=None,
                         **gpt_kwargs):
    """megatron-core's own GPTModel (ungated embedding and output layer, megatron's init) with
    the WeSaR TransformerLayer spec: what a user of get_wesar_layer_spec alone builds."""
    from megatron.core.models.gpt import GPTModel

    from megatron_wesar.spec import get_wesar_layer_spec, seed_for_module

    seed_for_module(init_seed, 0)
    return GPTModel(config, get_wesar_layer_spec(wesar, init_seed), vocab_size,
                    max_sequence_length, **gpt_kwargs)


def _model_builder(case: Case):
    from megatron_wesar.spec import build_gpt_model

    return _layer_spec_only_gpt if case.layer_spec_only else build_gpt_model


def build_case_model(case: Case):
    """Initialise model parallelism for `case` on this rank and build its bare model."""
    from megatron_wesar.training.engine import initialize_parallel

    initialize_parallel(case.tp, case.pp, case.seed)
    return _model_builder(case)(transformer_config(case), wesar_config(case), case.vocab_size,
                                case.seq_len, **_gpt_kwargs(case))


def _gpt_kwargs(case: Case) -> dict:
    # megatron's vocab-parallel cross-entropy computes in fp32; float64 cases gather the logits
    # (parallel_output=False) and take the cross-entropy in float64 themselves.
    return dict(
        init_seed=case.seed,
        share_embeddings_and_output_weights=case.tied,
        position_embedding_type="rope" if case.rope else "learned_absolute",
        parallel_output=case.dtype != torch.float64,
    )


def _microbatches(case: Case, step: int):
    from megatron.core import parallel_state

    from megatron_wesar.data.sources import microbatches, windows_to_batch

    return microbatches(
        windows_to_batch(case.global_batch(step)),
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
        case.micro_batch_size,
    )


def _float64_forward_step(data_iterator, model):
    """Forward one microbatch; on the last stage the loss is a float64 cross-entropy of the full
    logits."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None)
    return output, partial(_float64_loss, batch["labels"], batch["loss_mask"])


def _float64_loss(labels, loss_mask, logits):
    from megatron_wesar.training.engine import masked_mean_loss

    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    ).view_as(labels)
    return masked_mean_loss(loss_mask, per_token)


def build_case_engine(case: Case):
    """Initialise model parallelism for `case` and build its engine (DDP, optimizer, finalize)."""
    from megatron.core.distributed import finalize_model_grads as stock_finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig

    from megatron_wesar.training import engine as engine_module

    engine_module.initialize_parallel(case.tp, case.pp, case.seed)
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=case.lr,
        weight_decay=case.weight_decay,
        adam_beta1=case.betas[0],
        adam_beta2=case.betas[1],
        adam_eps=case.eps,
        clip_grad=case.clip_grad,
        use_distributed_optimizer=case.distributed_optimizer,
    )
    with mock.patch.object(engine_module, "build_gpt_model", _model_builder(case)):
        engine = engine_module.build_engine(transformer_config(case), wesar_config(case),
                                            case.vocab_size, case.seq_len, optimizer_config,
                                            **_gpt_kwargs(case))
    if case.stock_finalize:
        engine.config.finalize_model_grads_func = stock_finalize_model_grads
    return engine


def run_megatron_case(rank: int, world_size: int, case: Case) -> dict:
    """Train `case` for case.steps steps on this rank; return the gathered per-step records."""
    from megatron.core import parallel_state

    from megatron_wesar.layers import gate_parameters
    from megatron_wesar.training.engine import lm_forward_step, train_step

    assert world_size == case.world_size
    engine = build_case_engine(case)
    records = {"losses": [], "gate_grads": [], "gates": [], "grad_norms": []}
    records["initial"] = gather_canonical(engine.module)
    gates = [p for _, p in gate_parameters(engine.module)]
    # with the distributed optimizer each reduced gate gradient lives on one DP rank only
    owned = (distributed_optimizer_owned(engine.optimizer, gates)
             if case.distributed_optimizer else None)

    def record_gate_grads(engine):
        grads = gather_canonical(engine.module, values="grad", owned=owned)
        records["gate_grads"].append({k: v for k, v in grads.items() if k.endswith(".gate")})

    forward_step = _float64_forward_step if case.dtype == torch.float64 else lm_forward_step
    for step in range(case.steps):
        result = train_step(engine, _microbatches(case, step), case.micro_batches,
                            case.micro_batch_size, case.seq_len, forward_step_func=forward_step,
                            after_backward=record_gate_grads)
        params = gather_canonical(engine.module)
        records["gates"].append({k: v for k, v in params.items() if k.endswith(".gate")})
        records["losses"].append(result.loss)
        records["grad_norms"].append(result.grad_norm)
    records["final"] = params
    parallel_state.destroy_model_parallel()
    return records


def run_reference_case(case: Case, initial: dict) -> dict:
    """Replay `case` on the dense reference decoder loaded from `initial`."""
    model = ReferenceGPT(case.arch(), initial)
    for gate in model.gates().values():
        gate.requires_grad_(case.train_gates)
    optimizer = reference_adamw(model, case.lr, case.betas, case.eps, case.weight_decay)
    records = {"losses": [], "gate_grads": [], "gates": [], "grad_norms": []}
    for step in range(case.steps):
        optimizer.zero_grad()
        tokens = case.global_batch(step)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        records["gate_grads"].append(
            {k: g.grad.clone() for k, g in model.gates().items() if g.grad is not None}
        )
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), case.clip_grad or float("inf"))
        optimizer.step()
        records["losses"].append(loss.item())
        records["grad_norms"].append(norm.item())
        records["gates"].append({k: g.detach().clone() for k, g in model.gates().items()})
    records["final"] = model.canonical_state_dict()
    return records
