"""Command-line arguments of `megatron-wesar pretrain` (Megatron-LM names) and model presets."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields

from ..config import BACKBONES, DEFAULT_SIGMA


@dataclass(frozen=True)
class Preset:
    """Model shape and batch defaults of a named size."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    lr: float


# Shapes of the paper's sizes follow GPT-3 / Megatron conventions (d_ff = 4d, head dim 64 or 128);
# 130m: 12 x 768 (GPT-3 Small); 1.3b: 24 x 2048 (GPT-3 XL); 13b: 40 x 5120 (GPT-3 13B).
# Batch sizes give the paper's 1M tokens per step at seq 2048 (512 x 2048).
PRESETS = {
    "tiny": Preset(4, 128, 4, 512, 128, 8, 16, 200, 1e-3),
    "130m": Preset(12, 768, 12, 3072, 2048, 4, 512, 20000, 1e-3),
    "1.3b": Preset(24, 2048, 16, 8192, 2048, 2, 512, 20000, 1e-3),
    "13b": Preset(40, 5120, 40, 20480, 2048, 1, 512, 20000, 1e-3),
}


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that states each option's default value (switches and preset-filled ones aside)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is None or default is argparse.SUPPRESS or isinstance(default, bool) \
                or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The `pretrain` argument parser."""
    p = argparse.ArgumentParser(prog="megatron-wesar pretrain", description=__doc__,
                                formatter_class=_DefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="model size whose shape and batch defaults fill unset arguments")
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, help="transformer layers N (default: the preset's)")
    g.add_argument("--hidden-size", type=int, help="hidden size d (default: the preset's)")
    g.add_argument("--ffn-hidden-size", type=int,
                   help="MLP hidden size d_ff (default: the preset's, 4d)")
    g.add_argument("--num-attention-heads", type=int,
                   help="attention heads (default: the preset's)")
    g.add_argument("--seq-length", type=int, help="tokens per sample (default: the preset's)")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP instead of GeLU")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"],
                   default="learned_absolute", help="learned positions or rotary embeddings")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm",
                   help="the pre-LN norm")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="a separate output-layer matrix (default: tied to the word embedding; "
                        "the two keep separate gates either way)")
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision (fp32 master weights)")
    g = p.add_argument_group("WeSaR")
    g.add_argument("--wesar", dest="wesar", action="store_true", default=True,
                   help="gate every matrix: W_eff = gate * W_bar (the default)")
    g.add_argument("--no-wesar", dest="wesar", action="store_false",
                   help="the same model with the backbone init and no gates (baseline)")
    g.add_argument("--wesar-sigma", type=float, default=DEFAULT_SIGMA,
                   help="the one common std of every gated W_bar (paper: sqrt(4e-5))")
    g.add_argument("--init-method", choices=BACKBONES, default="he",
                   help="backbone init whose per-matrix stds the gates carry (or, with "
                        "--no-wesar, the weights get)")
    g.add_argument("--init-method-std", type=float, default=0.02,
                   help="the std of the 'megatron' backbone")
    g.add_argument("--wesar-gate-lr-mult", type=float, default=1.0,
                   help="learning-rate multiplier of the gates (through warm-up and decay)")
    g.add_argument("--wesar-no-embedding-gate", action="store_true",
                   help="leave the word embedding ungated (drawn with its backbone std)")
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int,
                   help="samples per microbatch (default: the preset's)")
    g.add_argument("--global-batch-size", type=int,
                   help="samples per optimizer step over all data-parallel ranks "
                        "(default: the preset's)")
    g.add_argument("--train-iters", type=int,
                   help="optimizer steps, also the LR decay length (default: the preset's)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    g.add_argument("--min-lr", type=float, default=None,
                   help="learning rate at the end of the cosine decay (default: 0.1 x --lr)")
    g.add_argument("--lr-warmup-iters", type=int, default=None,
                   help="linear warm-up steps from 0 (default: --train-iters // 20, at least 1)")
    g.add_argument("--weight-decay", type=float, default=0.1,
                   help="decoupled weight decay of the matrices (never of gates, biases, norms)")
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="clip the global gradient norm to this (0: no clipping)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="Adam beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    g.add_argument("--seed", type=int, default=1234,
                   help="seed of the initial weights and of the data order")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="tensor-parallel ranks per model replica")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages (must divide --num-layers)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard activations along the sequence over the TP group (needs TP > 1)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer state over data-parallel ranks")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="Megatron indexed dataset prefixes, optionally weighted "
                        "('0.3 a 0.7 b'); default: the embedded byte corpus")
    g.add_argument("--split", default="98,2,0", help="train,valid,test split of --data-path")
    g.add_argument("--tokenizer-file", default=None,
                   help="Hugging Face tokenizer.json of --data-path (default: byte tokenizer)")
    g.add_argument("--data-cache-path", default=None,
                   help="where megatron caches the sample indices of --data-path")
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=10,
                   help="progress line and monitors every this many iterations")
    g.add_argument("--eval-interval", type=int, default=None,
                   help="validation every this many iterations (and after the last)")
    g.add_argument("--eval-iters", type=int, default=4, help="validation batches per evaluation")
    g.add_argument("--metrics-file", default=None, help="JSONL metrics of the run")
    g.add_argument("--tensorboard-dir", default=None,
                   help="also write the metrics as TensorBoard scalars here")
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", type=str, default=None,
                   help="directory to save checkpoints to (iter_NNNNNNN/ + tracker file)")
    g.add_argument("--save-interval", type=int, default=None,
                   help="save every this many iterations (and always at the end)")
    g.add_argument("--load", type=str, default=None,
                   help="resume from the latest checkpoint in this directory (or from one "
                        "iter_NNNNNNN/ directory); the same directory as --save starts from "
                        "scratch while it holds no checkpoint yet")
    return p


@dataclass(frozen=True)
class PretrainArgs:
    """Validated pretraining arguments (preset defaults filled in)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    seq_length: int
    swiglu: bool
    position_embedding_type: str
    normalization: str
    untie_embeddings_and_output_weights: bool
    bf16: bool
    wesar: bool
    wesar_sigma: float
    init_method: str
    init_method_std: float
    wesar_gate_lr_mult: float
    wesar_no_embedding_gate: bool
    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    lr: float
    min_lr: float
    lr_warmup_iters: int
    weight_decay: float
    clip_grad: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    seed: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    sequence_parallel: bool
    use_distributed_optimizer: bool
    log_interval: int
    preset: str = "tiny"
    data_path: list | None = None
    split: str = "98,2,0"
    tokenizer_file: str | None = None
    data_cache_path: str | None = None
    eval_interval: int | None = None
    eval_iters: int = 4
    metrics_file: str | None = None
    tensorboard_dir: str | None = None
    # checkpointing
    save: str | None = None
    save_interval: int | None = None
    load: str | None = None

    def __post_init__(self):
        positive = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "seq_length", "micro_batch_size", "global_batch_size", "train_iters",
                    "tensor_model_parallel_size", "pipeline_model_parallel_size", "log_interval")
        for name in positive:
            if getattr(self, name) <= 0:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be > 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.eval_interval is not None and self.eval_interval <= 0:
            raise ValueError(f"--eval-interval must be > 0, got {self.eval_interval}")
        if self.eval_iters <= 0:
            raise ValueError(f"--eval-iters must be > 0, got {self.eval_iters}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.save_interval is not None and self.save_interval <= 0:
            raise ValueError(f"--save-interval must be > 0, got {self.save_interval}")
        if self.save_interval is not None and not self.save:
            raise ValueError("--save-interval needs --save DIR")
        if self.num_layers % self.pipeline_model_parallel_size:
            raise ValueError(
                f"--num-layers {self.num_layers} is not divisible by "
                f"--pipeline-model-parallel-size {self.pipeline_model_parallel_size}"
            )

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for `world_size` ranks; ValueError when the layout is impossible."""
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not a multiple of tensor-model-parallel size "
                f"{self.tensor_model_parallel_size} x pipeline-model-parallel size "
                f"{self.pipeline_model_parallel_size}"
            )
        dp = world_size // model_parallel
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ValueError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size {dp}"
            )
        return dp


def parse_pretrain_args(argv=None) -> PretrainArgs:
    """Parse `argv`, fill unset values from the preset, validate."""
    ns = build_parser().parse_args(argv)
    preset = PRESETS[ns.preset]
    values = vars(ns)
    for f in fields(Preset):
        if values.get(f.name) is None:
            values[f.name] = getattr(preset, f.name)
    if values["min_lr"] is None:
        values["min_lr"] = 0.1 * values["lr"]
    if values["lr_warmup_iters"] is None:
        values["lr_warmup_iters"] = max(1, values["train_iters"] // 20)
    try:
        return PretrainArgs(**values)
    except ValueError as err:
        build_parser().error(str(err))
