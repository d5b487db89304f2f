"""The training engine on megatron-core: parallel state, model + DDP + optimizer, one step.

Everything here is megatron-core's own machinery (GPTModel through `build_gpt_model`,
DistributedDataParallel, the megatron optimizer, `get_forward_backward_func` schedules) with the
WeSaR pieces plugged in: gate-aware `finalize_model_grads` and the gate learning-rate multiplier.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import (
    OptimizerConfig,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from ..compat.cpu import cpu_compat_active
from ..config import WeSaRConfig
from ..embedding_variants import apply_embedding_variant
from ..grads import finalize_model_grads
from ..init import ModelShape, sigma_role
from ..layers import NonFiniteGateError
from ..spec import build_gpt_model
from .divergence import describe_nonfinite


def initialize_parallel(tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                        seed: int) -> None:
    """Set up megatron's TP/PP/DP groups on the initialised default group, and seed the RNGs.

    Raises ValueError when the world size is not a multiple of TP x PP, and RuntimeError on a
    machine without CUDA when the CPU compatibility layer is not enabled.
    """
    if not torch.cuda.is_available() and not cpu_compat_active():
        raise RuntimeError(
            "megatron-core needs CUDA; to run it on CPU with gloo, call "
            "megatron_wesar.compat.enable_cpu_compat() first (the megatron-wesar command does)"
        )
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised before initialize_parallel")
    world = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not a multiple of tensor-model-parallel size "
            f"{tensor_model_parallel_size} x pipeline-model-parallel size "
            f"{pipeline_model_parallel_size}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def gate_config_overrides(optimizer_config: OptimizerConfig, wesar: WeSaRConfig) -> dict:
    """Megatron's standard param-group overrides (no weight decay on biases and 1-D params, which
    covers the (1,)-shaped gates) plus the gate learning-rate multiplier."""
    overrides = get_standard_config_overrides(optimizer_config)
    if wesar.enabled and wesar.gate_lr_mult != 1.0:
        # megatron-core's scheduler reads each group's max_lr / min_lr (it ignores lr_mult);
        # a checkpoint load matches groups by (wd_mult, lr_mult, ...) only: without lr_mult
        # the gates' group would take the saved max_lr of the biases' group (same wd_mult 0)
        min_lr = optimizer_config.min_lr or 0.0
        overrides[ParamKey(attr="wesar_gate")] = ParamGroupOverride(
            max_lr=optimizer_config.lr * wesar.gate_lr_mult,
            min_lr=min_lr * wesar.gate_lr_mult,
            lr_mult=wesar.gate_lr_mult,
        )
    return overrides


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate schedule: linear warm-up from 0, then decay to min_lr ('constant' keeps the
    peak). Weight decay stays constant."""

    warmup_iters: int = 0
    decay_iters: int = 1
    decay_style: str = "constant"

    def __post_init__(self):
        if self.warmup_iters < 0 or self.decay_iters <= 0:
            raise ValueError(f"bad LR schedule lengths: {self}")
        if self.decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown LR decay style {self.decay_style!r}")


def new_training_state() -> dict:
    """The training loop's counters that checkpoints carry: the offset of the data stream (the
    batches skipped by rewinds), the rewinds and the skipped steps so far."""
    return {"data_offset": 0, "rewinds": 0, "skipped_steps": 0}


@dataclass
class Engine:
    """The model chunks (DDP-wrapped), optimizer, LR scheduler and model config of this rank,
    and the training loop's counters (`new_training_state`)."""

    model: List[DistributedDataParallel]
    optimizer: object
    scheduler: OptimizerParamScheduler
    config: object
    training_state: dict = field(default_factory=new_training_state)

    @property
    def module(self):
        """The bare WeSaR GPT model of this rank's stage."""
        return self.model[0].module


def build_engine(
    transformer_config,
    wesar: WeSaRConfig,
    vocab_size: int,
    max_sequence_length: int,
    optimizer_config: OptimizerConfig,
    schedule: LRSchedule = LRSchedule(),
    ddp_config: DistributedDataParallelConfig | None = None,
    embedding_variant: str = "none",
    override_opt_param_scheduler: bool = False,
    use_checkpoint_opt_param_scheduler: bool = False,
    **gpt_kwargs,
) -> Engine:
    """Build this rank's WeSaR GPT stage (with an embedding-side baseline `embedding_variant`,
    megatron_wesar.embedding_variants), wrap it in megatron DDP, build optimizer and scheduler.

    Under bf16 / fp16 the default DDP config accumulates and reduces gradients in fp32
    (Megatron-LM's --accumulate-allreduce-grads-in-fp32). The scheduler is what applies
    megatron's per-group lr_mult / wd_mult (no weight decay on the gates, biases and norms; the
    gate LR multiplier), so it is always built; the two `*_opt_param_scheduler` flags are
    Megatron-LM's rule for a resumed schedule that differs.
    """
    ddp_config = ddp_config or DistributedDataParallelConfig(
        use_distributed_optimizer=optimizer_config.use_distributed_optimizer,
        # as Megatron-LM under bf16 / fp16: accumulate and reduce gradients in fp32 (a gate's
        # gradient is a sum over every token and feature)
        grad_reduce_in_fp32=bool(optimizer_config.bf16 or optimizer_config.fp16),
    )
    model = build_gpt_model(transformer_config, wesar, vocab_size, max_sequence_length,
                            **gpt_kwargs)
    apply_embedding_variant(model, embedding_variant, sigma_role(
        "embedding", ModelShape.from_transformer_config(transformer_config), wesar))
    ddp = DistributedDataParallel(transformer_config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        optimizer_config, [ddp], config_overrides=gate_config_overrides(optimizer_config, wesar)
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optimizer_config.lr,
        min_lr=optimizer_config.min_lr if optimizer_config.min_lr is not None else 0.0,
        lr_warmup_steps=schedule.warmup_iters,
        lr_decay_steps=schedule.decay_iters,
        lr_decay_style=schedule.decay_style,
        start_wd=optimizer_config.weight_decay,
        end_wd=optimizer_config.weight_decay,
        wd_incr_steps=schedule.decay_iters,
        wd_incr_style="constant",
        override_opt_param_scheduler=override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=use_checkpoint_opt_param_scheduler,
    )
    transformer_config.finalize_model_grads_func = finalize_model_grads
    transformer_config.no_sync_func = ddp.no_sync
    return Engine(model=[ddp], optimizer=optimizer, scheduler=scheduler, config=transformer_config)


def lm_forward_step(data_iterator: Iterator[dict], model):
    """Forward one microbatch {tokens, labels, loss_mask, position_ids}; masked mean loss."""
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in next(data_iterator).items()}
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return per_token, partial(masked_mean_loss, batch["loss_mask"])


def masked_mean_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Mean of the per-token loss over the unmasked tokens, and its detached copy for logging."""
    mask = loss_mask.to(per_token_loss.dtype)
    loss = (per_token_loss * mask).sum() / mask.sum().clamp_min(1)
    return loss, {"lm loss": loss.detach().clone()}  # the schedule scales `loss` in place


@dataclass
class StepResult:
    """What one optimizer step reports (loss averaged over microbatches and DP ranks; the global
    gradient norm before clipping). `update_successful` is False when the update was not applied:
    the step was non-finite (`nonfinite` says what) or `decide` declined it."""

    loss: float
    grad_norm: float
    update_successful: bool
    nonfinite: str | None = None


def train_step(
    engine: Engine,
    microbatches: Iterator[dict],
    num_microbatches: int,
    micro_batch_size: int,
    seq_length: int,
    forward_step_func: Callable = lm_forward_step,
    after_backward: Callable[[Engine], None] | None = None,
    decide: Callable[[float, float], bool] | None = None,
) -> StepResult:
    """One optimizer step: forward/backward over the microbatches, finalize, then the update
    unless the step is non-finite or `decide(loss, grad_norm)` returns False.

    Before anything is applied the loss and the global gradient norm are computed (the same on
    every rank): a non-finite one (or a non-finite WeSaR gate gradient) leaves the model and the
    optimizer untouched and names the first non-finite gate. `after_backward(engine)` runs after
    the gradients are final. The LR schedule advances only with an applied update.
    """
    for chunk in engine.model:
        chunk.zero_grad_buffer()
    engine.optimizer.zero_grad()
    try:
        outputs = _run_schedule(engine, forward_step_func, microbatches, num_microbatches,
                                micro_batch_size, seq_length, forward_only=False)
    except NonFiniteGateError:  # raised by the gate reduction at the end of the schedule
        outputs = None
    loss = reduce_loss(outputs)
    engine.optimizer.prepare_grads()
    grad_norm = float(engine.optimizer.get_grad_norm())
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return StepResult(loss, grad_norm, update_successful=False,
                          nonfinite=describe_nonfinite(engine.model, loss, grad_norm))
    if after_backward is not None:
        after_backward(engine)
    if decide is not None and not decide(loss, grad_norm):
        return StepResult(loss, grad_norm, update_successful=False)
    update_successful, _, _ = engine.optimizer.step()
    if update_successful:
        engine.scheduler.step(increment=1)
    return StepResult(loss, grad_norm, update_successful=bool(update_successful))


def _run_schedule(engine, forward_step_func, microbatches, num_microbatches, micro_batch_size,
                  seq_length, forward_only: bool) -> list:
    """megatron-core's pipeline schedule (no pipelining when PP = 1) over the microbatches."""
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=microbatches,
        model=engine.model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def reduce_loss(outputs: list | None) -> float:
    """Mean 'lm loss' over microbatches and data-parallel ranks, broadcast from the last stage
    (NaN where the last stage's schedule gave no outputs)."""
    value = torch.zeros(1, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage():
        value[0] = (float("nan") if outputs is None
                    else torch.stack([o["lm loss"].double() for o in outputs]).mean())
        dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value /= parallel_state.get_data_parallel_world_size()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(value, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return value.item()


@torch.no_grad()
def evaluate(engine: Engine, batches: Iterator[Iterator[dict]], num_microbatches: int,
             micro_batch_size: int, seq_length: int,
             forward_step_func: Callable = lm_forward_step) -> float:
    """Mean loss over `batches` (each an iterator of this rank's microbatches), forward only."""
    for chunk in engine.model:
        chunk.eval()
    losses = []
    for microbatches in batches:
        outputs = _run_schedule(engine, forward_step_func, microbatches, num_microbatches,
                                micro_batch_size, seq_length, forward_only=True)
        losses.append(reduce_loss(outputs))
    for chunk in engine.model:
        chunk.train()
    return sum(losses) / len(losses)
