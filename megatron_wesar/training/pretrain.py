"""`megatron-wesar pretrain`: WeSaR GPT pretraining on megatron-core, under torchrun or alone.

Under torchrun (env:// rendezvous, one node or many) every rank runs `main`; run as a plain
single process it forms a world of one. nccl on GPUs, gloo on CPU.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer.transformer_config import TransformerConfig

from ..compat import enable_cpu_compat
from ..coordination import gather_stage_dicts
from ..data.sources import EmbeddedCorpus, IndexedDatasets, microbatches
from ..data.tokenizers import build_tokenizer
from ..metric_keys import GATE_PREFIX, SPIKE_FLAG_PREFIX
from ..monitor import GateTrajectory, SpikeTracker, UpdateRatioMonitor
from .arguments import PretrainConfig, parse_pretrain_args
from .checkpointing import load_checkpoint, save_checkpoint
from .engine import LRSchedule, build_engine, evaluate, initialize_parallel, train_step
from .metrics import MetricsWriter


def init_distributed() -> None:
    """Join the torchrun world (env://), or form a world of one for a plain process."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_transformer_config(config: PretrainConfig) -> TransformerConfig:
    """The megatron-core TransformerConfig of the run."""
    on_cpu = not torch.cuda.is_available()
    model, parallel = config.model, config.parallel
    dtype = torch.bfloat16 if model.bf16 else torch.float32
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        bf16=model.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=on_cpu,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=not on_cpu and not model.swiglu,
        bias_dropout_fusion=not on_cpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        normalization=model.normalization,
        init_method_std=config.wesar.init_method_std,
    )


def build_optimizer_config(config: PretrainConfig) -> OptimizerConfig:
    """The megatron optimizer config (Adam with decoupled weight decay) of the run."""
    training = config.training
    return OptimizerConfig(
        optimizer="adam",
        lr=training.lr,
        min_lr=training.effective_min_lr,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_eps=training.adam_eps,
        clip_grad=training.clip_grad,
        bf16=config.model.bf16,
        params_dtype=torch.bfloat16 if config.model.bf16 else torch.float32,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
    )


def build_data(config: PretrainConfig):
    """The run's data: Megatron indexed datasets (--data-path) or the embedded byte corpus."""
    data, training, seq_length = config.data, config.training, config.model.seq_length
    if data.data_path is None:
        return EmbeddedCorpus(seq_length, training.seed)
    return IndexedDatasets(
        list(data.data_path), data.split, seq_length, training.seed,
        build_tokenizer(data.tokenizer_file),
        train_samples=training.train_iters * training.global_batch_size,
        valid_samples=config.logging.eval_iters * training.global_batch_size,
        cache_dir=data.data_cache_path,
    )


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int) -> int:
    """The vocabulary padded to a multiple of the tensor-parallel size (extra rows never used)."""
    return -(-vocab_size // tensor_model_parallel_size) * tensor_model_parallel_size


def pretrain(config: PretrainConfig, log=print) -> list[dict]:
    """Train for config.training.train_iters steps; return one record per log interval.

    Rank 0 logs a progress line per log interval and writes the metrics JSONL: a {"run": config}
    line (the config tree as nested dicts), one line per step (iteration, loss, grad_norm, lr, and
    the spike flags raised), the monitors at log intervals (update ratios, norms, gates, spike
    counts, tokens/s) and a {"iteration", "valid_loss"} line per evaluation.
    """
    model, training, parallel = config.model, config.training, config.parallel
    checkpoint, logging = config.checkpoint, config.logging
    init_distributed()
    dp_size = config.data_parallel_size(dist.get_world_size())
    tp = parallel.tensor_model_parallel_size
    initialize_parallel(tp, parallel.pipeline_model_parallel_size, training.seed)
    data = build_data(config)
    engine = build_engine(
        build_transformer_config(config),
        config.wesar,
        padded_vocab_size(data.vocab_size, tp),
        model.seq_length,
        build_optimizer_config(config),
        LRSchedule(training.effective_lr_warmup_iters, training.train_iters, "cosine"),
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        init_seed=training.seed,
        position_embedding_type=model.position_embedding_type,
        embedding_variant=model.embedding_variant,
    )
    first_step = 0
    if checkpoint.load:
        first_step = load_checkpoint(
            engine, checkpoint.load, log=log,
            missing_ok=bool(checkpoint.save)
            and os.path.abspath(checkpoint.load) == os.path.abspath(checkpoint.save))
    is_logger = dist.get_rank() == 0
    metrics = MetricsWriter(logging.metrics_file if is_logger else None,
                            logging.tensorboard_dir if is_logger else None)
    metrics.write({"run": asdict(config)})
    spikes, monitor, gates = SpikeTracker(), UpdateRatioMonitor(engine.model), GateTrajectory(
        engine.model)
    micro, global_batch, train_iters = (training.micro_batch_size, training.global_batch_size,
                                        training.train_iters)
    num_micro = global_batch // (micro * dp_size)
    dp_rank = parallel_state.get_data_parallel_rank()
    step_shape = (num_micro, micro, model.seq_length)
    records, start = [], time.perf_counter()
    for step in range(first_step, train_iters):
        iteration = step + 1
        log_now = iteration % logging.log_interval == 0 or iteration == train_iters
        batch = data.train_batch(step, global_batch)
        result = train_step(
            engine, microbatches(batch, dp_rank, dp_size, micro), *step_shape,
            after_backward=(lambda _: monitor.snapshot()) if log_now else None,
        )
        record = {
            "iteration": iteration,
            "loss": result.loss,
            "grad_norm": result.grad_norm,
            "lr": engine.scheduler.get_lr(engine.optimizer.param_groups[0]),
        }
        flags = spikes.update(iteration, loss=result.loss, grad_norm=result.grad_norm)
        record.update({key: flag for key, flag in flags.items() if flag})
        if log_now:
            monitor.measure()
            record.update(monitor.read())
            record.update(gather_stage_dicts(gates.record(iteration)))
            record.update(spikes.counts())
            record["tokens_per_s"] = (global_batch * model.seq_length * (iteration - first_step)
                                      / (time.perf_counter() - start))
            records.append(record)
            if is_logger:
                log(format_progress(record, train_iters))
        metrics.write(record)
        if iteration == train_iters or (
                logging.eval_interval and iteration % logging.eval_interval == 0):
            valid = evaluate(
                engine,
                (microbatches(data.valid_batch(i, global_batch), dp_rank, dp_size, micro)
                 for i in range(logging.eval_iters)),
                *step_shape,
            )
            metrics.write({"iteration": iteration, "valid_loss": valid})
            if is_logger:
                log(f"validation at iteration {iteration:>6} | loss {valid:.4f}")
        if checkpoint.save and checkpoint.save_interval and (
                iteration % checkpoint.save_interval == 0):
            save_checkpoint(engine, iteration, checkpoint.save, log=log)
    if checkpoint.save and train_iters > first_step and (
            not checkpoint.save_interval or train_iters % checkpoint.save_interval):
        save_checkpoint(engine, train_iters, checkpoint.save, log=log)
    metrics.close()
    parallel_state.destroy_model_parallel()
    return records


def format_progress(record: dict, train_iters: int) -> str:
    """One progress line: iteration, loss, lr, grad norm, tokens/s, update-ratio spread, gates."""
    grad_norm = record["grad_norm"]
    line = (
        f"iteration {record['iteration']:>6}/{train_iters} | loss {record['loss']:.4f} | "
        f"lr {record['lr']:.3e} | grad norm "
        f"{'skipped' if grad_norm is None else format(grad_norm, '.3f')} | "
        f"tokens/s {record['tokens_per_s']:.0f}"
    )
    if "update_ratio_spread" in record:
        line += f" | update-ratio spread {record['update_ratio_spread']:.2f}"
    gates = [v for k, v in record.items() if k.startswith(GATE_PREFIX)]
    if gates:
        line += f" | gates [{min(gates):.3f}, {max(gates):.3f}]"
    spikes = sum(v for k, v in record.items() if k.startswith(SPIKE_FLAG_PREFIX))
    if spikes:
        line += f" | SPIKE ({int(spikes)} rules)"
    return line


def main(argv=None) -> int:
    """Entry point of `megatron-wesar pretrain` (enables the CPU layer where CUDA is absent)."""
    enable_cpu_compat()
    pretrain(parse_pretrain_args(argv))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
