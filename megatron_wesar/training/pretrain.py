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
from ..compat.megatron_core import forked_processes_die_with_this_one
from ..coordination import gather_stage_dicts
from ..data.sources import EmbeddedCorpus, IndexedDatasets, microbatches
from ..data.tokenizers import build_tokenizer
from ..fp8 import Fp8UnavailableError
from ..fp8_stats import fp8_role_statistics
from ..instability import InstabilityMonitor
from ..metric_keys import (
    ATTN_LOGIT_MAX,
    GATE_PREFIX,
    OUTPUT_LOG_Z_MEAN,
    REWIND_TO,
    SKIPPED_STEP,
    SPIKE_FLAG_PREFIX,
)
from ..monitor import GateTrajectory, SpikeTracker, UpdateRatioMonitor
from ..spec import TransformerEngineUnavailableError
from .arguments import PretrainConfig, parse_pretrain_args
from .checkpointing import (
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    save_checkpoint,
    schedule_in_effect,
)
from .divergence import NonFiniteStepError, RewindLimitError, SpikePolicy
from .engine import LRSchedule, build_engine, evaluate, initialize_parallel, train_step
from .metrics import MetricsWriter
from .preemption import ExitSignalHandler
from .run_lock import save_directory_lock


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
        fp8=model.fp8_format,
        fp8_recipe=model.fp8_recipe,
        fp8_amax_history_len=model.fp8_amax_history_len,
        fp8_amax_compute_algo=model.fp8_amax_compute_algo,
        fp8_param=model.fp8_param_gather,
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

    Rank 0 logs a progress line per log interval and writes the metrics JSONL: a {"run": config,
    "schedule": the LR schedule in effect, "initial_gates": {matrix: gate value at the start}}
    line, one line per step (iteration, loss, grad_norm, lr, the spike flags raised,
    `skipped_step` / `rewind_to` when the spike policy acted), the monitors at log intervals
    (update ratios, norms, gates, the instability proxies of megatron_wesar.instability, spike
    counts, tokens/s; under torch-native FP8 the weights' FP8 statistics per role,
    megatron_wesar.fp8_stats) and a
    {"iteration", "valid_loss"} line per evaluation. A non-finite step is never applied (policy
    log stops the run there with NonFiniteStepError); SIGTERM / SIGINT end the run after the
    current step with a checkpoint (--exit-signal-handler).
    """
    training, parallel = config.training, config.parallel
    init_distributed()
    forked_processes_die_with_this_one()  # megatron's checkpoint writers are forked
    dp_size = config.data_parallel_size(dist.get_world_size())
    tp = parallel.tensor_model_parallel_size
    initialize_parallel(tp, parallel.pipeline_model_parallel_size, training.seed)
    data = build_data(config)
    engine = build_run_engine(config, padded_vocab_size(data.vocab_size, tp))
    with save_directory_lock(config.checkpoint.save), \
            ExitSignalHandler(training.exit_signal_handler) as signals:
        records = TrainingLoop(config, engine, data, dp_size, signals, log).run()
    parallel_state.destroy_model_parallel()
    return records


def build_run_engine(config: PretrainConfig, vocab_size: int):
    """The engine (model, DDP, optimizer, LR schedule) a run of `config` trains, for a
    vocabulary of `vocab_size` (padded); megatron's parallel state must be initialised."""
    model, training, checkpoint = config.model, config.training, config.checkpoint
    return build_engine(
        build_transformer_config(config),
        config.wesar,
        vocab_size,
        model.seq_length,
        build_optimizer_config(config),
        LRSchedule(training.effective_lr_warmup_iters, training.train_iters, "cosine"),
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        init_seed=training.seed,
        position_embedding_type=model.position_embedding_type,
        embedding_variant=model.embedding_variant,
        backend=model.transformer_impl,
        override_opt_param_scheduler=checkpoint.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=checkpoint.use_checkpoint_opt_param_scheduler,
    )


class TrainingLoop:
    """The steps of one run: data, spike policy, monitors, evaluation, checkpoints, metrics."""

    def __init__(self, config: PretrainConfig, engine, data, dp_size: int, signals, log):
        self.config, self.engine, self.data, self.signals, self.log = (
            config, engine, data, signals, log)
        self.dp_size, self.dp_rank = dp_size, parallel_state.get_data_parallel_rank()
        training = config.training
        self.micro = training.micro_batch_size
        self.step_shape = (training.global_batch_size // (self.micro * dp_size), self.micro,
                           config.model.seq_length)
        self.policy = SpikePolicy(training.spike_policy, training.max_rewinds)
        self.spikes = SpikeTracker()
        self.monitor = UpdateRatioMonitor(engine.model)
        self.gates = GateTrajectory(engine.model)
        self.proxies = InstabilityMonitor(engine.model)  # hooked on logging iterations only
        self.is_logger = dist.get_rank() == 0

    def _say(self, line: str) -> None:
        if self.is_logger:
            self.log(line)

    def _microbatches(self, batch):
        return microbatches(batch, self.dp_rank, self.dp_size, self.micro)

    def run(self) -> list[dict]:
        """Resume (with --load), train to --train-iters or an exit signal, save; the records."""
        checkpoint, logging = self.config.checkpoint, self.config.logging
        first_step = 0
        if checkpoint.load:
            first_step = load_checkpoint(
                self.engine, checkpoint.load, log=self.log,
                missing_ok=bool(checkpoint.save)
                and os.path.abspath(checkpoint.load) == os.path.abspath(checkpoint.save),
                fallback_to_previous=checkpoint.load_fallback_to_previous)
        self.metrics = MetricsWriter(logging.metrics_file if self.is_logger else None,
                                     logging.tensorboard_dir if self.is_logger else None)
        try:
            self.metrics.write({"run": asdict(self.config),
                                "schedule": schedule_in_effect(self.engine.scheduler),
                                "initial_gates": gather_stage_dicts(self.gates.current())})
            return self._steps(first_step)
        finally:
            self.metrics.close()

    def _steps(self, first_step: int) -> list[dict]:
        train_iters = self.config.training.train_iters
        save, save_interval = self.config.checkpoint.save, self.config.checkpoint.save_interval
        self.first_step, self.start = first_step, time.perf_counter()
        records, step, saved_at = [], first_step, first_step
        while step < train_iters:
            iteration = step + 1
            record = self._step(iteration)
            if REWIND_TO in record:
                step = saved_at = record[REWIND_TO]
                continue
            if "tokens_per_s" in record:  # a log interval
                records.append(record)
                self._say(format_progress(record, train_iters))
            self.metrics.write(record)
            self._maybe_evaluate(iteration)
            step = iteration
            if save and save_interval and iteration % save_interval == 0:
                save_checkpoint(self.engine, iteration, save, log=self.log)
                saved_at = iteration
            if self.signals.exit_requested():
                self._say(f"exit signal received: stopping after iteration {iteration}")
                break
        if save and step > saved_at:
            save_checkpoint(self.engine, step, save, log=self.log)
        return records

    def _step(self, iteration: int) -> dict:
        """Train one step under the spike policy; its metrics record."""
        training, logging = self.config.training, self.config.logging
        state = self.engine.training_state
        log_now = iteration % logging.log_interval == 0 or iteration == training.train_iters
        batch = self.data.train_batch(iteration - 1 + state["data_offset"],
                                      training.global_batch_size)
        flags = {}

        def decide(loss: float, grad_norm: float) -> bool:
            flags.update(self.spikes.update(iteration, loss=loss, grad_norm=grad_norm))
            return self.policy.applies(any(flags.values()))

        if log_now:
            self.proxies.enable()
        try:
            result = train_step(
                self.engine, self._microbatches(batch), *self.step_shape,
                after_backward=(lambda _: self.monitor.snapshot()) if log_now else None,
                decide=decide)
        finally:
            self.proxies.disable()
        if result.nonfinite:
            flags = self.spikes.update(iteration, loss=result.loss, grad_norm=result.grad_norm)
        record = {
            "iteration": iteration,
            "loss": result.loss,
            "grad_norm": result.grad_norm,
            "lr": self.engine.scheduler.get_lr(self.engine.optimizer.param_groups[0]),
        }
        record.update({key: flag for key, flag in flags.items() if flag})
        if not result.update_successful:
            try:
                action = self.policy.on_unapplied(iteration, result.nonfinite, state["rewinds"])
            except (NonFiniteStepError, RewindLimitError):
                self.metrics.write(record)
                raise
            if action == "rewind":
                record[REWIND_TO] = self._rewind(iteration)
                self.metrics.write(record)
                return record
            record[SKIPPED_STEP] = 1.0
            state["skipped_steps"] += 1
        if log_now:
            if result.update_successful:
                self.monitor.measure()
                record.update(self.monitor.read())
            record.update(self.proxies.read())  # the step's forward, applied or not
            record.update(gather_stage_dicts(self.gates.record(iteration)))
            record.update(fp8_role_statistics(self.engine.model))
            record.update(self.spikes.counts())
            tokens = training.global_batch_size * self.config.model.seq_length
            record["tokens_per_s"] = (tokens * (iteration - self.first_step)
                                      / (time.perf_counter() - self.start))
        return record

    def _rewind(self, iteration: int) -> int:
        """Reload the last checkpoint and skip the data of the steps since; its iteration."""
        before = dict(self.engine.training_state)
        back = load_checkpoint(self.engine, self.config.checkpoint.save, log=self.log)
        self.engine.training_state.update(
            data_offset=before["data_offset"] + iteration - back,
            rewinds=before["rewinds"] + 1, skipped_steps=before["skipped_steps"])
        self._say(f"iteration {iteration}: spike; rewound to iteration {back}, skipping the data "
                  f"of iterations {back + 1}..{iteration} (rewind {before['rewinds'] + 1} of at "
                  f"most {self.policy.max_rewinds})")
        return back

    def _maybe_evaluate(self, iteration: int) -> None:
        logging, training = self.config.logging, self.config.training
        if iteration != training.train_iters and not (
                logging.eval_interval and iteration % logging.eval_interval == 0):
            return
        valid = evaluate(
            self.engine,
            (self._microbatches(self.data.valid_batch(i, training.global_batch_size))
             for i in range(logging.eval_iters)),
            *self.step_shape,
        )
        self.metrics.write({"iteration": iteration, "valid_loss": valid})
        self._say(f"validation at iteration {iteration:>6} | loss {valid:.4f}")


def format_progress(record: dict, train_iters: int) -> str:
    """One progress line: iteration, loss, lr, grad norm, tokens/s, update-ratio spread, the
    instability proxies, gates."""
    grad_norm = record["grad_norm"]
    line = (
        f"iteration {record['iteration']:>6}/{train_iters} | loss {record['loss']:.4f} | "
        f"lr {record['lr']:.3e} | grad norm "
        f"{'skipped' if grad_norm is None else format(grad_norm, '.3f')} | "
        f"tokens/s {record['tokens_per_s']:.0f}"
    )
    if "update_ratio_spread" in record:
        line += f" | update-ratio spread {record['update_ratio_spread']:.2f}"
    if ATTN_LOGIT_MAX in record:
        line += f" | attn logit max {record[ATTN_LOGIT_MAX]:.1f}"
    if OUTPUT_LOG_Z_MEAN in record:
        line += f" | log Z {record[OUTPUT_LOG_Z_MEAN]:.2f}"
    gates = [v for k, v in record.items() if k.startswith(GATE_PREFIX)]
    if gates:
        line += f" | gates [{min(gates):.3f}, {max(gates):.3f}]"
    spikes = sum(v for k, v in record.items() if k.startswith(SPIKE_FLAG_PREFIX))
    if spikes:
        line += f" | SPIKE ({int(spikes)} rules)"
    return line


# errors that end a run for a reason the message states in full (no traceback needed)
RUN_ERRORS = (NonFiniteStepError, RewindLimitError, CheckpointError, CheckpointMismatchError,
              TransformerEngineUnavailableError, Fp8UnavailableError)


def main(argv=None) -> int:
    """Entry point of `megatron-wesar pretrain` (enables the CPU layer where CUDA is absent):
    the run, or with --dry-run its plan (megatron_wesar.training.dry_run); exit status 1 with
    one error line (rank 0) for the errors of RUN_ERRORS and a layout that does not fit."""
    from .dry_run import PlanError, dry_run  # it builds on this module's config builders

    enable_cpu_compat()
    status = 0
    try:
        config = parse_pretrain_args(argv)
        (dry_run if config.plan.dry_run else pretrain)(config)
    except (*RUN_ERRORS, PlanError) as err:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"megatron-wesar pretrain: error: {err}", file=sys.stderr)
        status = 1
    if dist.is_initialized():
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
