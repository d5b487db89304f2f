"""The configuration of `megatron-wesar pretrain`: one tree of frozen dataclasses.

    PretrainConfig
      model       ModelConfig        shape, positions, norm, MLP, precision
      wesar       WeSaRConfig        the method (megatron_wesar.config)
      training    TrainingConfig     batch, schedule, optimizer, seed
      parallel    ParallelConfig     TP, PP, SP, distributed optimizer
      data        DataConfig         indexed datasets or the embedded corpus
      checkpoint  CheckpointConfig   save / load
      logging     LoggingConfig      progress, metrics, evaluation
      plan        PlanConfig         --dry-run: plan the run instead of training it

Every leaf is a command-line option (megatron_wesar.options): its help is the field's docstring
and its flag Megatron-LM's name where Megatron-LM has one. A model preset (--preset) and the
study presets are overrides of this tree ({dotted path: value}); an explicit flag beats the
preset, the preset beats the field's default.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace

from ..config import WeSaRConfig
from ..embedding_variants import EMBEDDING_VARIANTS
from ..init import ModelShape
from ..options import add_options, option, replace_path, section, validate_options
from ..sigma_regime import with_regime_sigma
from .divergence import SPIKE_POLICIES

TRANSFORMER_IMPLS = ("local", "transformer_engine")  # Megatron-LM's --transformer-impl
FP8_FORMATS = ("e4m3", "hybrid")  # Megatron-LM's --fp8-format
FP8_RECIPES = ("tensorwise", "delayed", "mxfp8", "blockwise")  # Megatron-LM's --fp8-recipe


@dataclass(frozen=True)
class ModelConfig:
    """The GPT model's shape and numerics."""

    num_layers: int = option(4, "transformer layers N", positive=True, preset_filled=True)
    hidden_size: int = option(128, "hidden size d", positive=True, preset_filled=True)
    ffn_hidden_size: int = option(512, "MLP hidden size d_ff (4d in the presets)",
                                  positive=True, preset_filled=True)
    num_attention_heads: int = option(4, "attention heads", positive=True, preset_filled=True)
    seq_length: int = option(128, "tokens per sample", positive=True, preset_filled=True)
    swiglu: bool = option(False, "SwiGLU MLP instead of GeLU")
    position_embedding_type: str = option(
        "learned_absolute", "learned positions or rotary embeddings",
        choices=("learned_absolute", "rope"))
    normalization: str = option("LayerNorm", "the pre-LN norm", choices=("LayerNorm", "RMSNorm"))
    untie_embeddings_and_output_weights: bool = option(
        False, "a separate output-layer matrix (else tied to the word embedding; the two keep "
        "separate gates either way)")
    bf16: bool = option(False, "bf16 mixed precision (fp32 master weights)")
    embedding_variant: str = option(
        "none", "an embedding-side baseline for an ungated embedding: scaled-embed (output x "
        "sqrt(d), std sqrt(2/(5d)); Takase et al. 2023) or embed-ln (a norm after the "
        "embedding; Le Scao et al. 2022)", choices=EMBEDDING_VARIANTS)
    transformer_impl: str = option(
        "local", "the transformer layers' linears: local (megatron-core's tensor-parallel "
        "layers; FP8 through the torch-native backend) or transformer_engine (TE's fused "
        "LayerNorm-linears; needs transformer_engine importable)", choices=TRANSFORMER_IMPLS)
    fp8_format: str | None = option(
        None, "train the transformer linears' GEMMs in FP8: e4m3 (every operand) or hybrid "
        "(e4m3 forward, e5m2 gradients); off when absent", type=str, choices=FP8_FORMATS)
    fp8_recipe: str = option(
        "tensorwise", "FP8 scaling recipe: tensorwise (per-tensor dynamic scaling; the only one "
        "of --transformer-impl local), delayed (amax history), mxfp8 or blockwise (TE only). "
        "Megatron-LM's default is delayed", choices=FP8_RECIPES)
    fp8_amax_history_len: int = option(
        1, "amax history length of the delayed recipe", positive=True)
    fp8_amax_compute_algo: str = option(
        "most_recent", "how the delayed recipe picks the amax from its history",
        choices=("most_recent", "max"))
    fp8_param_gather: bool = option(
        False, "keep parameters in FP8 and all-gather them in FP8 (TE only)")

    def __post_init__(self):
        validate_options(self)
        self.check_fp8()

    def check_fp8(self) -> None:
        """ValueError for FP8 settings that cannot run together: FP8 options without
        --fp8-format, or what the torch-native backend of --transformer-impl local lacks (FP8
        is never silently dropped)."""
        defaults = ModelConfig.__dataclass_fields__
        delayed_only = [flag for flag, name in (
            ("--fp8-amax-history-len", "fp8_amax_history_len"),
            ("--fp8-amax-compute-algo", "fp8_amax_compute_algo"),
        ) if getattr(self, name) != defaults[name].default]
        if self.fp8_format is None:
            given = delayed_only + ["--fp8-param-gather"] * self.fp8_param_gather
            if given:
                raise ValueError(f"{', '.join(given)} need --fp8-format")
            return
        if delayed_only and self.fp8_recipe != "delayed":
            raise ValueError(f"{', '.join(delayed_only)} only apply to --fp8-recipe delayed")
        if self.transformer_impl == "local":
            if self.fp8_recipe != "tensorwise":
                raise ValueError(
                    f"--fp8-recipe {self.fp8_recipe} needs --transformer-impl "
                    "transformer_engine; the torch-native FP8 backend of --transformer-impl "
                    "local implements --fp8-recipe tensorwise")
            if self.fp8_param_gather:
                raise ValueError("--fp8-param-gather needs --transformer-impl transformer_engine")


@dataclass(frozen=True)
class TrainingConfig:
    """Batch, learning-rate schedule, optimizer and seed."""

    micro_batch_size: int = option(8, "samples per microbatch", positive=True,
                                   preset_filled=True)
    global_batch_size: int = option(
        16, "samples per optimizer step over all data-parallel ranks", positive=True,
        preset_filled=True)
    train_iters: int = option(200, "optimizer steps, also the LR decay length", positive=True,
                              preset_filled=True)
    lr: float = option(1e-3, "peak learning rate", positive=True, preset_filled=True)
    min_lr: float | None = option(
        None, "learning rate at the end of the cosine decay (default: 0.1 x --lr)", type=float)
    lr_warmup_iters: int | None = option(
        None, "linear warm-up steps from 0 (default: --train-iters // 20, at least 1)", type=int)
    weight_decay: float = option(
        0.1, "decoupled weight decay of the matrices (never of gates, biases, norms)")
    clip_grad: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    adam_beta1: float = option(0.9, "Adam beta1")
    adam_beta2: float = option(0.95, "Adam beta2")
    adam_eps: float = option(1e-8, "Adam epsilon")
    seed: int = option(1234, "seed of the initial weights and of the data order")
    spike_policy: str = option(
        "log", "what a step flagged by a spike rule does: log (applied, flagged in the metrics), "
        "skip (not applied), rewind (reload the last checkpoint and skip the data since); a "
        "non-finite step is never applied: log stops the run there", choices=SPIKE_POLICIES)
    max_rewinds: int = option(3, "the most rewinds of --spike-policy rewind before the run stops",
                              positive=True)
    exit_signal_handler: bool = option(
        True, "SIGTERM / SIGINT finish the current step, save a checkpoint (with --save) and "
        "exit 0")

    def __post_init__(self):
        validate_options(self)
        if not math.isfinite(self.lr):
            raise ValueError(f"--lr must be finite, got {self.lr}")
        if self.lr_warmup_iters is not None and not (
                0 <= self.lr_warmup_iters < self.train_iters):
            raise ValueError(f"--lr-warmup-iters {self.lr_warmup_iters} must be >= 0 and < "
                             f"--train-iters {self.train_iters}")

    @property
    def effective_min_lr(self) -> float:
        """--min-lr, or 0.1 x --lr when unset."""
        return 0.1 * self.lr if self.min_lr is None else self.min_lr

    @property
    def effective_lr_warmup_iters(self) -> int:
        """--lr-warmup-iters, or --train-iters // 20 (at least 1, less than --train-iters) when
        unset."""
        if self.lr_warmup_iters is None:
            return min(max(1, self.train_iters // 20), self.train_iters - 1)
        return self.lr_warmup_iters


@dataclass(frozen=True)
class ParallelConfig:
    """How the model and its optimizer are split over ranks."""

    tensor_model_parallel_size: int = option(1, "tensor-parallel ranks per model replica",
                                             positive=True)
    pipeline_model_parallel_size: int = option(1, "pipeline stages (must divide --num-layers)",
                                               positive=True)
    sequence_parallel: bool = option(
        False, "shard activations along the sequence over the TP group (needs TP > 1)")
    use_distributed_optimizer: bool = option(
        False, "shard the optimizer state over data-parallel ranks")

    def __post_init__(self):
        validate_options(self)
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")


@dataclass(frozen=True)
class DataConfig:
    """The training and validation data."""

    data_path: tuple | None = option(
        None, "Megatron indexed dataset prefixes, optionally weighted ('0.3 a 0.7 b'); "
        "default: the embedded byte corpus", type=str, nargs="+")
    split: str = option("98,2,0", "train,valid,test split of --data-path")
    tokenizer_file: str | None = option(
        None, "Hugging Face tokenizer.json of --data-path (default: byte tokenizer)", type=str)
    data_cache_path: str | None = option(
        None, "where megatron caches the sample indices of --data-path", type=str)

    def __post_init__(self):
        if self.data_path is not None:
            object.__setattr__(self, "data_path", tuple(self.data_path))


@dataclass(frozen=True)
class CheckpointConfig:
    """Where checkpoints are saved and loaded."""

    save: str | None = option(
        None, "directory to save checkpoints to (iter_NNNNNNN/ + tracker file)", type=str)
    save_interval: int | None = option(
        None, "save every this many iterations (and always at the end)", type=int,
        positive=True)
    load: str | None = option(
        None, "resume from the latest checkpoint in this directory (or from one iter_NNNNNNN/ "
        "directory); the same directory as --save starts from scratch while it holds no "
        "checkpoint yet", type=str)
    load_fallback_to_previous: bool = option(
        False, "when the checkpoint to load is damaged, load the newest intact earlier one "
        "(named in the log) instead of stopping")
    override_opt_param_scheduler: bool = option(
        False, "on resume, this run's LR schedule settings replace the checkpoint's",
        flag="--override-opt_param-scheduler")
    use_checkpoint_opt_param_scheduler: bool = option(
        False, "on resume, the checkpoint's LR schedule settings replace this run's (without "
        "either flag they must agree)", flag="--use-checkpoint-opt_param-scheduler")

    def __post_init__(self):
        validate_options(self)
        if self.save_interval is not None and not self.save:
            raise ValueError("--save-interval needs --save DIR")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ValueError("--override-opt_param-scheduler and "
                             "--use-checkpoint-opt_param-scheduler exclude each other")


@dataclass(frozen=True)
class LoggingConfig:
    """Progress lines, metrics files and evaluation."""

    log_interval: int = option(10, "progress line and monitors every this many iterations",
                               positive=True)
    eval_interval: int | None = option(
        None, "validation every this many iterations (and after the last)", type=int,
        positive=True)
    eval_iters: int = option(4, "validation batches per evaluation", positive=True)
    metrics_file: str | None = option(None, "JSONL metrics of the run", type=str)
    tensorboard_dir: str | None = option(
        None, "also write the metrics as TensorBoard scalars here", type=str)

    def __post_init__(self):
        validate_options(self)


@dataclass(frozen=True)
class PlanConfig:
    """A dry run: the run's layout and memory planned, nothing trained
    (megatron_wesar.training.dry_run)."""

    dry_run: bool = option(
        False, "check every argument and the TP x PP x DP layout, print the parameters and "
        "memory per GPU and the tokens per step (last line `memory_per_gpu_gb: <value>`) and "
        "exit; needs no GPU, no Transformer Engine and no torch.distributed")
    world_size: int | None = option(
        None, "the number of ranks a --dry-run plans for (default: WORLD_SIZE of the "
        "environment, else 1)", type=int, positive=True)

    def __post_init__(self):
        validate_options(self)
        if self.world_size is not None and not self.dry_run:
            raise ValueError("--world-size plans a --dry-run; a run's world is torchrun's")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything one pretraining run needs (see the module docstring)."""

    model: ModelConfig = section(ModelConfig)
    wesar: WeSaRConfig = section(WeSaRConfig)
    training: TrainingConfig = section(TrainingConfig)
    parallel: ParallelConfig = section(ParallelConfig)
    data: DataConfig = section(DataConfig)
    checkpoint: CheckpointConfig = section(CheckpointConfig)
    logging: LoggingConfig = section(LoggingConfig)
    plan: PlanConfig = section(PlanConfig)

    def __post_init__(self):
        if self.training.spike_policy == "rewind" and not (
                self.checkpoint.save and self.checkpoint.save_interval):
            raise ValueError("--spike-policy rewind needs --save DIR and --save-interval N "
                             "(the checkpoints it rewinds to)")
        if self.model.num_layers % self.parallel.pipeline_model_parallel_size:
            raise ValueError(
                f"--num-layers {self.model.num_layers} is not divisible by "
                f"--pipeline-model-parallel-size {self.parallel.pipeline_model_parallel_size}"
            )

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for `world_size` ranks; ValueError when the layout is impossible."""
        tp = self.parallel.tensor_model_parallel_size
        pp = self.parallel.pipeline_model_parallel_size
        if world_size % (tp * pp):
            raise ValueError(
                f"world size {world_size} is not a multiple of tensor-model-parallel size "
                f"{tp} x pipeline-model-parallel size {pp}"
            )
        dp = world_size // (tp * pp)
        micro, global_ = self.training.micro_batch_size, self.training.global_batch_size
        if global_ % (micro * dp):
            raise ValueError(
                f"--global-batch-size {global_} is not divisible by "
                f"--micro-batch-size {micro} x data-parallel size {dp}"
            )
        return dp


def _paper_size(num_layers: int, hidden_size: int, num_attention_heads: int,
                micro_batch_size: int) -> dict:
    """Overrides of a paper-size preset: d_ff = 4d, sequence 2048, untied embedding and output
    (as the paper's models), 512 sequences (1M tokens) per step, 20000 steps at the default peak
    LR."""
    return {
        "model.num_layers": num_layers, "model.hidden_size": hidden_size,
        "model.num_attention_heads": num_attention_heads, "model.ffn_hidden_size": 4 * hidden_size,
        "model.seq_length": 2048, "model.untie_embeddings_and_output_weights": True,
        "training.micro_batch_size": micro_batch_size,
        "training.global_batch_size": 512, "training.train_iters": 20000,
    }


# Model presets as overrides of the defaults (the defaults are the tiny model). Shapes of the
# paper's sizes follow GPT-3 / Megatron conventions (head dim 64 or 128): 130m: 12 x 768 (GPT-3
# Small); 1.3b: 24 x 2048 (GPT-3 XL); 13b: 40 x 5120 (GPT-3 13B).
PRESETS = {
    "tiny": {},
    "130m": _paper_size(12, 768, 12, 4),
    "1.3b": _paper_size(24, 2048, 16, 2),
    "13b": _paper_size(40, 5120, 40, 1),
}


def pretrain_config(overrides: dict | None = None, preset: str = "tiny") -> PretrainConfig:
    """The PretrainConfig of `preset` with `overrides` ({dotted path: value}) applied; each
    section validates its values (ValueError). With wesar.sigma_regime and no explicit
    wesar.sigma, sigma is placed by the regime for the model's shape."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    overrides = {**PRESETS[preset], **(overrides or {})}
    config = replace_path(PretrainConfig(), overrides)
    if "wesar.sigma" in overrides:  # an explicit sigma beats the regime
        return config
    model = config.model
    shape = ModelShape(model.hidden_size, model.num_layers, model.ffn_hidden_size)
    return replace(config, wesar=with_regime_sigma(config.wesar, shape))


SECTION_TITLES = {"logging": "logging and evaluation", "wesar": "WeSaR", "plan": "dry run"}


def build_parser() -> argparse.ArgumentParser:
    """The `pretrain` argument parser, generated from the PretrainConfig tree."""
    parser = argparse.ArgumentParser(prog="megatron-wesar pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                        help="model size whose shape and batch values fill unset options "
                             "(default: tiny)")
    add_options(parser, PretrainConfig, SECTION_TITLES)
    return parser


def parse_overrides(argv) -> tuple[str | None, dict]:
    """(--preset or None, {dotted path: value} of the other options `argv` sets)."""
    values = vars(build_parser().parse_args(argv))
    return values.pop("preset", None), values


def parse_pretrain_args(argv=None) -> PretrainConfig:
    """Parse `argv` into the run's PretrainConfig: the preset, then the explicit flags."""
    preset, overrides = parse_overrides(argv)
    try:
        return pretrain_config(overrides, preset or "tiny")
    except ValueError as err:
        build_parser().error(str(err))
