"""`megatron-wesar pretrain --dry-run`: check a run's arguments and its TP x PP x DP layout and
plan its memory per GPU, with no GPU, no Transformer Engine and no torch.distributed.

Every distinct pipeline stage of the model (first, middle, last) is built on the meta device by
the run's own builders (build_transformer_config, the WeSaR block spec, WeSaRGPTModel), at TP 1:
without a process group megatron-core's layers size themselves for one rank, and a parameter
that megatron marks `tensor_model_parallel` is split evenly over the TP ranks (the sizes it
splits are checked divisible first), so the count per TP rank is exact. `--transformer-impl
transformer_engine` is estimated with the local layers' shapes (TE's LayerNorm-linears hold the
same norm and linear parameters).

Memory per GPU (one TP rank of a pipeline stage), as megatron keeps it under Adam:
- weights in their own dtype (bf16 under --bf16; the WeSaR gates fp32),
- gradients in fp32 (megatron DDP's main_grad buffer: --accumulate-allreduce-grads-in-fp32),
- optimizer states: Adam's two fp32 moments, plus an fp32 main copy of every non-fp32 weight;
  divided over the data-parallel ranks with --use-distributed-optimizer,
- activations: the per-tensor accounting of Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models" (section 4), for the driver's layers (see
  `layer_activation_bytes`), times the microbatches a stage holds under 1F1B pipelining. The
  driver has no activation recompute, so none is assumed.
CUDA context, communication buffers and allocator fragmentation are not counted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from ..data.tokenizers import build_tokenizer
from ..embedding_variants import apply_embedding_variant
from ..init import ModelShape, sigma_role
from ..spec import WeSaRGPTModel, get_wesar_block_spec
from .arguments import PretrainConfig
from .pretrain import build_transformer_config, padded_vocab_size

GIB = 2**30
ADAM_MOMENT_BYTES = 8  # exp_avg and exp_avg_sq in fp32
FP32_BYTES = 4  # a main gradient, a main weight, a cross-entropy logit


class PlanError(ValueError):
    """A run that cannot be laid out on its world, or whose model shape cannot be known."""


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage on one of its TP ranks: its parameters and memory in bytes."""

    index: int
    first_layer: int
    num_layers: int
    parameters: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int  # without the distributed optimizer
    distributed_optimizer_bytes: int
    microbatches_in_flight: int
    activation_bytes: float

    def total_bytes(self, distributed_optimizer: bool) -> float:
        """Weights, gradients, the optimizer states in effect and the activations."""
        optimizer = (self.distributed_optimizer_bytes if distributed_optimizer
                     else self.optimizer_bytes)
        return self.weight_bytes + self.grad_bytes + optimizer + self.activation_bytes


@dataclass(frozen=True)
class Plan:
    """The layout, the stages and the batch of a run on `world_size` ranks."""

    config: PretrainConfig
    world_size: int
    data_parallel_size: int
    vocab_size: int
    padded_vocab_size: int
    model_parameters: int
    stages: tuple
    microbatches_per_step: int

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all data-parallel ranks."""
        return self.config.training.global_batch_size * self.config.model.seq_length

    @property
    def memory_per_gpu_bytes(self) -> float:
        """The largest stage's memory per GPU, with the optimizer the run uses."""
        distributed = self.config.parallel.use_distributed_optimizer
        return max(stage.total_bytes(distributed) for stage in self.stages)


def check_layout(config: PretrainConfig, world_size: int) -> int:
    """The data-parallel size of `config` on `world_size` ranks; PlanError naming the first
    size that does not divide (world by TP x PP, batch by microbatch x DP, the TP-split sizes
    by TP, the sequence by TP under sequence parallelism)."""
    model, tp = config.model, config.parallel.tensor_model_parallel_size
    split = {"--num-attention-heads": model.num_attention_heads,
             "--hidden-size": model.hidden_size, "--ffn-hidden-size": model.ffn_hidden_size}
    if config.parallel.sequence_parallel:
        split["--seq-length (split by --sequence-parallel)"] = model.seq_length
    for flag, size in split.items():
        if size % tp:
            raise PlanError(f"{flag} {size} is not divisible by --tensor-model-parallel-size "
                            f"{tp}")
    try:
        return config.data_parallel_size(world_size)
    except ValueError as err:
        raise PlanError(str(err)) from None


def run_vocab_size(config: PretrainConfig) -> int:
    """The vocabulary of the run's tokenizer (--tokenizer-file, else bytes)."""
    path = config.data.tokenizer_file
    if path is not None and not os.path.isfile(path):
        raise PlanError(f"--tokenizer-file {path} does not exist (its vocabulary sizes the "
                        "embedding and output layer)")
    return build_tokenizer(path).vocab_size


class _OneRankGroup:
    """A stand-in process group of one rank: without torch.distributed megatron-core sizes
    every layer for one rank anyway (megatron.core.utils.get_pg_size)."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def _one_rank_groups() -> ProcessGroupCollection:
    groups = ProcessGroupCollection()
    for field in dataclasses.fields(groups):
        setattr(groups, field.name, _OneRankGroup())
    return groups


@contextlib.contextmanager
def _pipeline_rank(rank: int, size: int):
    """megatron's pipeline rank and size set by hand (its parallel state is not initialised)."""
    parallel_state.set_pipeline_model_parallel_world_size(size)
    parallel_state.set_pipeline_model_parallel_rank(rank)
    try:
        yield
    finally:
        parallel_state.set_pipeline_model_parallel_rank(None)
        parallel_state.set_pipeline_model_parallel_world_size(None)


def meta_stage_model(config: PretrainConfig, stage: int, vocab_size: int):
    """Pipeline stage `stage` of the run's model (with its embedding variant) built on the meta
    device at TP 1 (local layers, no FP8: neither changes a parameter's shape)."""
    transformer = dataclasses.replace(
        build_transformer_config(config), tensor_model_parallel_size=1, sequence_parallel=False,
        use_cpu_initialization=True, fp8=None, fp8_param=False)
    pp = transformer.pipeline_model_parallel_size
    # under PP a tied model's last stage holds its own copy of the word embedding as the
    # output weight: what an untied output layer allocates (megatron ties them by all-reduce)
    tied = not config.model.untie_embeddings_and_output_weights and pp == 1
    with _pipeline_rank(stage, pp), torch.device("meta"):
        model = WeSaRGPTModel(
            transformer, get_wesar_block_spec(transformer, config.wesar), vocab_size,
            config.model.seq_length, wesar=config.wesar, pre_process=stage == 0,
            post_process=stage == pp - 1, share_embeddings_and_output_weights=tied,
            position_embedding_type=config.model.position_embedding_type,
            pg_collection=_one_rank_groups())
        apply_embedding_variant(model, config.model.embedding_variant, sigma_role(
            "embedding", ModelShape.from_transformer_config(transformer), config.wesar))
    return model


def rank_parameters(model, tp: int) -> tuple[int, int, int]:
    """(parameters, weight bytes, bytes of fp32 main weights the optimizer adds) of one TP rank
    of `model` built at TP 1."""
    count = weight_bytes = main_bytes = 0
    for param in model.parameters():
        numel = param.numel() // tp if getattr(param, "tensor_model_parallel", False) \
            else param.numel()
        count += numel
        weight_bytes += numel * param.element_size()
        if param.dtype != torch.float32:
            main_bytes += numel * FP32_BYTES
    return count, weight_bytes, main_bytes


def layer_activation_bytes(transformer, seq_length: int, micro_batch_size: int,
                           fused_attention: bool) -> float:
    """Bytes one transformer layer saves for backward per microbatch on one TP rank.

    Korthikanti et al. 2022, section 4.1, tensor by tensor: the two norms' inputs, the qkv and
    fc1 inputs and the hidden dropout masks (1 byte) are sbh each, split over TP only under
    sequence parallelism; Q, K, V and the attention-output input (sbh each), fc1's output (the
    activation's input, twice as wide under SwiGLU) and fc2's input are split over TP; the
    softmax output (a s^2 b) and, with attention dropout, its mask and its dropped output, split
    over TP, unless the attention is fused (`fused_attention`, Transformer Engine's), which
    saves no s x s matrix. Elements are of the model's dtype. For a 16-bit GeLU model with
    d_ff = 4h and dropout this is the paper's sbh (34 + 5as/h) / t under TP + SP and
    sbh (10 + 24/t + 5as/(ht)) under TP alone.
    """
    t = transformer.tensor_model_parallel_size
    element = transformer.params_dtype.itemsize
    sb = seq_length * micro_batch_size
    sbh, sbf = sb * transformer.hidden_size, sb * transformer.ffn_hidden_size
    masks = 2 if transformer.hidden_dropout > 0 else 0
    sequence_split = t if transformer.sequence_parallel else 1
    replicated = sbh * (4 * element + masks) / sequence_split
    mlp = sbf * element * (3 if transformer.gated_linear_unit else 2)
    split = (4 * sbh * element + mlp) / t
    scores = 0.0
    if not fused_attention:
        as2b = transformer.num_attention_heads * seq_length * sb
        dropped = element + 1 if transformer.attention_dropout > 0 else 0
        scores = as2b * (element + dropped) / t
    return replicated + split + scores


def output_activation_bytes(transformer, seq_length: int, micro_batch_size: int,
                            vocab_size: int) -> float:
    """Bytes the last stage's final norm, output layer and cross entropy save per microbatch on
    one TP rank (Korthikanti et al. 2022, section 4.3: the norm and output-layer inputs, sbh
    each, and the fp32 logits, sbv / t)."""
    t = transformer.tensor_model_parallel_size
    sb = seq_length * micro_batch_size
    sequence_split = t if transformer.sequence_parallel else 1
    inputs = 2 * sb * transformer.hidden_size * transformer.params_dtype.itemsize
    return inputs / sequence_split + sb * vocab_size * FP32_BYTES / t


def plan(config: PretrainConfig, world_size: int) -> Plan:
    """Check `config`'s layout on `world_size` ranks (PlanError) and plan every stage."""
    dp = check_layout(config, world_size)
    transformer = build_transformer_config(config)
    model, training = config.model, config.training
    tp, pp = transformer.tensor_model_parallel_size, transformer.pipeline_model_parallel_size
    vocab = run_vocab_size(config)
    padded = padded_vocab_size(vocab, tp)
    microbatches = training.global_batch_size // (training.micro_batch_size * dp)
    per_layer = layer_activation_bytes(
        transformer, model.seq_length, training.micro_batch_size,
        fused_attention=model.transformer_impl == "transformer_engine")
    layers = model.num_layers // pp
    counted, stages, model_parameters = {}, [], 0
    for index in range(pp):
        kind = (index == 0, index == pp - 1)  # the middle stages are alike
        if kind not in counted:
            stage_model = meta_stage_model(config, index, padded)
            counted[kind] = (rank_parameters(stage_model, tp),
                             rank_parameters(stage_model, 1)[0])
        (parameters, weight_bytes, main_bytes), whole = counted[kind]
        model_parameters += whole
        optimizer_bytes = parameters * ADAM_MOMENT_BYTES + main_bytes
        in_flight = min(pp - index, microbatches)  # 1F1B: stage r holds p - r microbatches
        activations = layers * in_flight * per_layer
        if index == pp - 1:
            activations += output_activation_bytes(
                transformer, model.seq_length, training.micro_batch_size, padded)
        stages.append(StagePlan(
            index, index * layers + 1, layers, parameters, weight_bytes,
            parameters * FP32_BYTES, optimizer_bytes, optimizer_bytes / dp, in_flight,
            activations))
    if pp > 1 and not model.untie_embeddings_and_output_weights:
        model_parameters -= padded * model.hidden_size  # the last stage's copy of the embedding
    return Plan(config, world_size, dp, vocab, padded, model_parameters, tuple(stages),
                microbatches)


def format_plan(plan: Plan) -> list[str]:
    """The dry run's report: layout, model, batch, a per-stage table (GB = 2^30 bytes) and the
    last line `memory_per_gpu_gb: <value>`."""
    config = plan.config
    model, parallel, training = config.model, config.parallel, config.training
    distributed = parallel.use_distributed_optimizer
    lines = [
        "megatron-wesar pretrain --dry-run: nothing is initialised or trained",
        f"layout: world {plan.world_size} = TP {parallel.tensor_model_parallel_size} x PP "
        f"{parallel.pipeline_model_parallel_size} x DP {plan.data_parallel_size}; sequence "
        f"parallel {'on' if parallel.sequence_parallel else 'off'}; distributed optimizer "
        f"{'on' if distributed else 'off'}",
        f"model: {model.num_layers} layers, hidden {model.hidden_size}, ffn "
        f"{model.ffn_hidden_size}, {model.num_attention_heads} heads, sequence "
        f"{model.seq_length}, vocabulary {plan.vocab_size} (padded {plan.padded_vocab_size}), "
        f"{'WeSaR' if config.wesar.enabled else 'ungated'}, "
        f"{'bf16' if model.bf16 else 'fp32'}"
        + (f", FP8 {model.fp8_format}" if model.fp8_format else ""),
        f"model parameters: {plan.model_parameters:,}",
    ]
    if model.transformer_impl == "transformer_engine":
        lines.append("transformer_engine: estimated with the local layers' shapes (the same "
                     "parameters; fused attention saves no s x s scores)")
    if model.fp8_format:
        lines.append("FP8: activations counted in the model dtype (an upper bound)")
    lines += [
        f"batch: {training.micro_batch_size} x {model.seq_length} tokens per microbatch, "
        f"{plan.microbatches_per_step} microbatches per step per data-parallel rank",
        f"tokens per step: {plan.tokens_per_step:,}",
        "per GPU (GB; one TP rank of the stage; optimizer: Adam states without / with "
        "--use-distributed-optimizer):",
        f"{'stage':>5} {'layers':>9} {'parameters':>15} {'weights':>8} {'grads':>7} "
        f"{'optim':>7} {'dist.':>7} {'activ.':>7} {'(mb)':>5} {'total':>7}",
    ]
    for stage in plan.stages:
        last = stage.first_layer + stage.num_layers - 1
        gib = [value / GIB for value in (
            stage.weight_bytes, stage.grad_bytes, stage.optimizer_bytes,
            stage.distributed_optimizer_bytes, stage.activation_bytes)]
        lines.append(
            f"{stage.index:>5} {f'{stage.first_layer}-{last}':>9} {stage.parameters:>15,} "
            f"{gib[0]:>8.2f} {gib[1]:>7.2f} {gib[2]:>7.2f} {gib[3]:>7.2f} {gib[4]:>7.2f} "
            f"{stage.microbatches_in_flight:>5} {stage.total_bytes(distributed) / GIB:>7.2f}")
    lines.append(f"memory_per_gpu_gb: {plan.memory_per_gpu_bytes / GIB:.2f}")
    return lines


def dry_run(config: PretrainConfig, log=print) -> None:
    """Plan `config` on --world-size ranks (default: WORLD_SIZE, else 1) and log the plan,
    ending with `memory_per_gpu_gb: <value>`."""
    world_size = config.plan.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    for line in format_plan(plan(config, world_size)):
        log(line)
