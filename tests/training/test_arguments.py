"""`megatron-wesar pretrain` arguments: flags to configs and the presets (the example launch
scripts are checked by their dry runs, tests/training/test_dry_run.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_wesar.training.arguments import parse_pretrain_args
from megatron_wesar.training.pretrain import build_optimizer_config, build_transformer_config

CONFIGS = {
    "wesar": lambda config: config.wesar,
    "transformer": build_transformer_config,
    "optimizer": build_optimizer_config,
}

# (flags, config, field, value without the flags, value with them)
FLAG_MAPPING = [
    (["--backbone", "small"], "wesar", "backbone", "he", "small"),
    (["--backbone", "megatron"], "wesar", "backbone", "he", "megatron"),
    (["--wesar-sigma", "1e-3"], "wesar", "sigma", math.sqrt(4e-5), 1e-3),
    (["--no-wesar"], "wesar", "enabled", True, False),
    (["--no-wesar-gate-embedding"], "wesar", "gate_embedding", True, False),
    (["--no-wesar-gate-output-layer"], "wesar", "gate_output_layer", True, False),
    (["--no-wesar-train-gates"], "wesar", "train_gates", True, False),
    (["--wesar-share-glu-gates"], "wesar", "share_glu_gates", False, True),
    (["--no-wesar-defer-gate-grad-reduction"], "wesar", "defer_gate_grad_reduction", True,
     False),
    (["--wesar-gate-lr-mult", "0.1"], "wesar", "gate_lr_mult", 1.0, 0.1),
    (["--init-method-std", "0.01"], "wesar", "init_method_std", 0.02, 0.01),
    (["--init-method-std", "0.01"], "transformer", "init_method_std", 0.02, 0.01),
    (["--swiglu"], "transformer", "gated_linear_unit", False, True),
    (["--swiglu"], "transformer", "activation_func", F.gelu, F.silu),
    (["--normalization", "RMSNorm"], "transformer", "normalization", "LayerNorm", "RMSNorm"),
    (["--bf16"], "transformer", "params_dtype", torch.float32, torch.bfloat16),
    (["--bf16"], "transformer", "bf16", False, True),
    (["--bf16"], "optimizer", "params_dtype", torch.float32, torch.bfloat16),
    (["--bf16"], "optimizer", "bf16", False, True),
    (["--tensor-model-parallel-size", "2"], "transformer", "tensor_model_parallel_size", 1, 2),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel"], "transformer",
     "sequence_parallel", False, True),
    (["--pipeline-model-parallel-size", "2"], "transformer", "pipeline_model_parallel_size",
     1, 2),
    (["--clip-grad", "0.5"], "optimizer", "clip_grad", 1.0, 0.5),
    (["--adam-beta1", "0.8"], "optimizer", "adam_beta1", 0.9, 0.8),
    (["--adam-beta2", "0.999"], "optimizer", "adam_beta2", 0.95, 0.999),
    (["--adam-eps", "1e-6"], "optimizer", "adam_eps", 1e-8, 1e-6),
    (["--weight-decay", "0.01"], "optimizer", "weight_decay", 0.1, 0.01),
    (["--lr", "3e-4"], "optimizer", "lr", 1e-3, 3e-4),
    (["--min-lr", "1e-5"], "optimizer", "min_lr", 0.1 * 1e-3, 1e-5),
    (["--use-distributed-optimizer"], "optimizer", "use_distributed_optimizer", False, True),
]


@pytest.mark.parametrize("flags, config, field, default, value", FLAG_MAPPING,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_flag_sets_its_config_field(flags, config, field, default, value):
    build = CONFIGS[config]
    assert getattr(build(parse_pretrain_args([])), field) == default
    assert getattr(build(parse_pretrain_args(flags)), field) == value


def test_flags_without_a_megatron_config_field_reach_the_config_tree():
    defaults = parse_pretrain_args([])
    assert not defaults.model.untie_embeddings_and_output_weights
    assert defaults.model.position_embedding_type == "learned_absolute"
    config = parse_pretrain_args(["--untie-embeddings-and-output-weights",
                                  "--position-embedding-type", "rope", "--seed", "7",
                                  "--data-path", "0.3", "a", "0.7", "b", "--tokenizer-file",
                                  "tok.json", "--tensorboard-dir", "tb"])
    assert config.model.untie_embeddings_and_output_weights
    assert config.model.position_embedding_type == "rope" and config.training.seed == 7
    assert config.data.data_path == ("0.3", "a", "0.7", "b")
    assert config.data.tokenizer_file == "tok.json" and config.logging.tensorboard_dir == "tb"


def test_every_flag_is_the_field_it_sets():
    """Each leaf of the tree has one option whose dest is the field's dotted path; its
    Megatron-LM-style flag is the field name with dashes unless the field says otherwise."""
    from megatron_wesar.options import leaf_fields
    from megatron_wesar.training.arguments import PretrainConfig, build_parser

    actions = {a.dest: a for a in build_parser()._actions if a.dest not in ("help", "preset")}
    leaves = dict(leaf_fields(PretrainConfig))
    assert set(actions) == set(leaves)
    renamed = {path: a.option_strings[0] for path, a in actions.items()
               if a.option_strings[0] != "--" + path.rpartition(".")[2].replace("_", "-")}
    assert renamed == {  # the WeSaR-only knobs carry the wesar- prefix
        "wesar.enabled": "--wesar", "wesar.sigma": "--wesar-sigma",
        "wesar.sigma_regime": "--wesar-sigma-regime",
        "wesar.gate_embedding": "--wesar-gate-embedding",
        "wesar.gate_output_layer": "--wesar-gate-output-layer",
        "wesar.train_gates": "--wesar-train-gates", "wesar.gate_lr_mult": "--wesar-gate-lr-mult",
        "wesar.check_finite_gates": "--wesar-check-finite-gates",
        "wesar.share_glu_gates": "--wesar-share-glu-gates",
        "wesar.defer_gate_grad_reduction": "--wesar-defer-gate-grad-reduction",
        # Megatron-LM's own spelling
        "checkpoint.override_opt_param_scheduler": "--override-opt_param-scheduler",
        "checkpoint.use_checkpoint_opt_param_scheduler": "--use-checkpoint-opt_param-scheduler",
    }


@pytest.mark.parametrize("argv, message", [
    (["--num-layers", "0"], "--num-layers) must be > 0"),
    (["--lr", "nan"], "--lr"),
    (["--wesar-sigma", "-1"], "--wesar-sigma) must be > 0"),
    (["--eval-iters", "0"], "--eval-iters) must be > 0"),
    (["--save-interval", "5"], "--save-interval needs --save"),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], "not divisible"),
])
def test_bad_values_are_errors_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_pretrain_args(argv)
    assert message in capsys.readouterr().err


def test_config_sections_validate_on_construction():
    from megatron_wesar.options import replace_path
    from megatron_wesar.training.arguments import PretrainConfig, TrainingConfig

    with pytest.raises(ValueError, match="micro_batch_size"):
        TrainingConfig(micro_batch_size=0)
    with pytest.raises(ValueError, match="not divisible"):
        replace_path(PretrainConfig(), {"parallel.pipeline_model_parallel_size": 3})
    with pytest.raises(KeyError, match="no field"):
        replace_path(PretrainConfig(), {"training.learning_rate": 1.0})


# Depth and width of GPT-3 Small / XL / 13B (Brown et al. 2020), d_ff = 4 d, heads of 64 / 128 / 128
# dims, 512 sequences of 2048 tokens per step.
# preset: (num_layers, hidden, heads, ffn, seq, micro batch, global batch, head dim)
PRESET_TABLE = {
    "130m": (12, 768, 12, 3072, 2048, 4, 512, 64),
    "1.3b": (24, 2048, 16, 8192, 2048, 2, 512, 128),
    "13b": (40, 5120, 40, 20480, 2048, 1, 512, 128),
}
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                "seq_length", "micro_batch_size", "global_batch_size")


@pytest.mark.parametrize("preset", list(PRESET_TABLE))
def test_preset_shapes_and_derived_defaults(preset):
    *shape, head_dim = PRESET_TABLE[preset]
    args = parse_pretrain_args(["--preset", preset])
    assert tuple(_setting(args, name) for name in SHAPE_FIELDS) == tuple(shape)
    assert args.training.train_iters == 20000 and args.training.lr == 1e-3
    assert args.model.untie_embeddings_and_output_weights  # as the paper's models
    assert math.isclose(args.training.effective_min_lr, 1e-4)
    assert args.training.effective_lr_warmup_iters == 1000
    config = build_transformer_config(args)
    assert (config.num_layers, config.hidden_size, config.num_attention_heads,
            config.ffn_hidden_size) == tuple(shape[:4])
    assert config.kv_channels == head_dim
    # an explicit flag beats the preset; the derived defaults follow the values actually used
    args = parse_pretrain_args(["--preset", preset, "--num-layers", "2", "--lr", "2e-3",
                                "--train-iters", "100"])
    assert args.model.num_layers == 2 and args.model.hidden_size == shape[1]
    assert math.isclose(args.training.effective_min_lr, 2e-4)
    assert args.training.effective_lr_warmup_iters == 5


def _setting(config, name):
    section = "model" if hasattr(config.model, name) else "training"
    return getattr(getattr(config, section), name)


def test_explicit_schedule_flags_beat_the_derived_defaults():
    args = parse_pretrain_args(["--lr", "2e-3", "--min-lr", "0", "--lr-warmup-iters", "0"])
    assert args.training.effective_min_lr == 0.0 and args.training.effective_lr_warmup_iters == 0
    assert parse_pretrain_args(["--train-iters", "10"]).training.effective_lr_warmup_iters == 1


def test_every_pretrain_flag_says_what_it_means():
    """`pretrain --help` explains every option (argparse's own -h aside)."""
    from megatron_wesar.training.arguments import build_parser

    silent = [a.option_strings for a in build_parser()._actions
              if a.option_strings != ["-h", "--help"] and not a.help]
    assert silent == []
