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
from ..config import WeSaRConfig
from ..coordination import gather_stage_dicts
from ..data.sources import EmbeddedCorpus, IndexedDatasets, microbatches
from ..data.tokenizers import build_tokenizer
from ..metric_keys import GATE_PREFIX, SPIKE_FLAG_PREFIX
from ..monitor import GateTrajectory, SpikeTracker, UpdateRatioMonitor
from .arguments import PretrainArgs, parse_pretrain_args
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


def transformer_config_from_args(args: PretrainArgs) -> TransformerConfig:
    """The megatron-core TransformerConfig of the run."""
    on_cpu = not torch.cuda.is_available()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=on_cpu,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=not on_cpu and not args.swiglu,
        bias_dropout_fusion=not on_cpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        normalization=args.normalization,
        init_method_std=args.init_method_std,
    )


def wesar_config_from_args(args: PretrainArgs) -> WeSaRConfig:
    """The WeSaRConfig of the run."""
    return WeSaRConfig(
        sigma=args.wesar_sigma,
        backbone=args.init_method,
        enabled=args.wesar,
        gate_embedding=not args.wesar_no_embedding_gate,
        gate_lr_mult=args.wesar_gate_lr_mult,
        init_method_std=args.init_method_std,
    )


def optimizer_config_from_args(args: PretrainArgs) -> OptimizerConfig:
    """The megatron optimizer config (Adam with decoupled weight decay) of the run."""
    return OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )


def build_data(args: PretrainArgs):
    """The run's data: Megatron indexed datasets (--data-path) or the embedded byte corpus."""
    if args.data_path is None:
        return EmbeddedCorpus(args.seq_length, args.seed)
    return IndexedDatasets(
        args.data_path, args.split, args.seq_length, args.seed,
        build_tokenizer(args.tokenizer_file),
        train_samples=args.train_iters * args.global_batch_size,
        valid_samples=args.eval_iters * args.global_batch_size,
        cache_dir=args.data_cache_path,
    )


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int) -> int:
    """The vocabulary padded to a multiple of the tensor-parallel size (extra rows never used)."""
    return -(-vocab_size // tensor_model_parallel_size) * tensor_model_parallel_size


def pretrain(args: PretrainArgs, log=print) -> list[dict]:
    """Train for args.train_iters steps; return one record per log interval.

    Rank 0 logs a progress line per log interval and writes the metrics JSONL: a {"run": args}
    line, one line per step (iteration, loss, grad_norm, lr, and the spike flags raised), the
    monitors at log intervals (update ratios, norms, gates, spike counts, tokens/s) and a
    {"iteration", "valid_loss"} line per evaluation.
    """
    init_distributed()
    dp_size = args.data_parallel_size(dist.get_world_size())
    initialize_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                        args.seed)
    data = build_data(args)
    engine = build_engine(
        transformer_config_from_args(args),
        wesar_config_from_args(args),
        padded_vocab_size(data.vocab_size, args.tensor_model_parallel_size),
        args.seq_length,
        optimizer_config_from_args(args),
        LRSchedule(args.lr_warmup_iters, args.train_iters, "cosine"),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        init_seed=args.seed,
        position_embedding_type=args.position_embedding_type,
    )
    first_step = 0
    if args.load:
        first_step = load_checkpoint(
            engine, args.load, log=log,
            missing_ok=bool(args.save) and os.path.abspath(args.load) == os.path.abspath(args.save))
    is_logger = dist.get_rank() == 0
    metrics = MetricsWriter(args.metrics_file if is_logger else None,
                            args.tensorboard_dir if is_logger else None)
    metrics.write({"run": asdict(args)})
    spikes, monitor, gates = SpikeTracker(), UpdateRatioMonitor(engine.model), GateTrajectory(
        engine.model)
    num_micro = args.global_batch_size // (args.micro_batch_size * dp_size)
    dp_rank = parallel_state.get_data_parallel_rank()
    step_shape = (num_micro, args.micro_batch_size, args.seq_length)
    records, start = [], time.perf_counter()
    for step in range(first_step, args.train_iters):
        iteration = step + 1
        log_now = iteration % args.log_interval == 0 or iteration == args.train_iters
        batch = data.train_batch(step, args.global_batch_size)
        result = train_step(
            engine, microbatches(batch, dp_rank, dp_size, args.micro_batch_size), *step_shape,
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
            record["tokens_per_s"] = (args.global_batch_size * args.seq_length
                                      * (iteration - first_step) / (time.perf_counter() - start))
            records.append(record)
            if is_logger:
                log(format_progress(record, args.train_iters))
        metrics.write(record)
        if iteration == args.train_iters or (
                args.eval_interval and iteration % args.eval_interval == 0):
            valid = evaluate(
                engine,
                (microbatches(data.valid_batch(i, args.global_batch_size), dp_rank, dp_size,
                              args.micro_batch_size) for i in range(args.eval_iters)),
                *step_shape,
            )
            metrics.write({"iteration": iteration, "valid_loss": valid})
            if is_logger:
                log(f"validation at iteration {iteration:>6} | loss {valid:.4f}")
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save_checkpoint(engine, iteration, args.save, log=log)
    if args.save and args.train_iters > first_step and (
            not args.save_interval or args.train_iters % args.save_interval):
        save_checkpoint(engine, args.train_iters, args.save, log=log)
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
