"""`megatron-wesar pretrain`: WeSaR GPT pretraining on megatron-core, under torchrun or alone.

Under torchrun (env:// rendezvous, one node or many) every rank runs `main`; run as a plain
single process it forms a world of one. nccl on GPUs, gloo on CPU.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import WeSaRConfig
from ..layers import gate_parameters
from .arguments import PretrainArgs, parse_pretrain_args
from ..data.sources import EmbeddedCorpus, microbatches
from .engine import LRSchedule, build_engine, initialize_parallel, train_step


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


def pretrain(args: PretrainArgs, log=print) -> list[dict]:
    """Train for args.train_iters steps; return one record per log interval (rank 0 logs)."""
    init_distributed()
    dp_size = args.data_parallel_size(dist.get_world_size())
    data = EmbeddedCorpus(args.seq_length, args.seed)
    initialize_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                        args.seed)
    engine = build_engine(
        transformer_config_from_args(args),
        wesar_config_from_args(args),
        data.vocab_size,
        args.seq_length,
        optimizer_config_from_args(args),
        LRSchedule(args.lr_warmup_iters, args.train_iters, "cosine"),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
    )
    num_micro = args.global_batch_size // (args.micro_batch_size * dp_size)
    dp_rank = parallel_state.get_data_parallel_rank()
    records, start = [], time.perf_counter()
    for step in range(args.train_iters):
        batch = data.train_batch(step, args.global_batch_size)
        result = train_step(engine, microbatches(batch, dp_rank, dp_size, args.micro_batch_size),
                            num_micro, args.micro_batch_size, args.seq_length)
        if (step + 1) % args.log_interval == 0 or step + 1 == args.train_iters:
            elapsed = time.perf_counter() - start
            gates = [g.item() for _, g in gate_parameters(engine.module)]
            record = {
                "iteration": step + 1,
                "loss": result.loss,
                "lr": engine.scheduler.get_lr(engine.optimizer.param_groups[0]),
                "grad_norm": result.grad_norm,
                "tokens_per_s": args.global_batch_size * args.seq_length * (step + 1) / elapsed,
                "gate_min": min(gates) if gates else None,
                "gate_max": max(gates) if gates else None,
            }
            records.append(record)
            if dist.get_rank() == 0:
                log(format_progress(record, args.train_iters))
    parallel_state.destroy_model_parallel()
    return records


def format_progress(record: dict, train_iters: int) -> str:
    """One progress line: iteration, loss, lr, grad norm, tokens/s, gate range."""
    line = (
        f"iteration {record['iteration']:>6}/{train_iters} | loss {record['loss']:.4f} | "
        f"lr {record['lr']:.3e} | grad norm {record['grad_norm']:.3f} | "
        f"tokens/s {record['tokens_per_s']:.0f}"
    )
    if record["gate_min"] is not None:
        line += f" | gates [{record['gate_min']:.3f}, {record['gate_max']:.3f}]"
    return line


def main(argv=None) -> int:
    """Entry point of `megatron-wesar pretrain`."""
    pretrain(parse_pretrain_args(argv))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
