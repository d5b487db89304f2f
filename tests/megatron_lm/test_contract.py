"""The Megatron-LM plug-in's own side of the contract, checked without megatron.training (CI):
the --spec object, the --wesar-* arguments, the builder's signature and refusals, the optimizer
override mapping, the rebinding of Megatron-LM's finalize / optimizer-config names, and the
message when Megatron-LM is missing. tests/megatron_lm/test_megatron_lm.py checks the same
contract against a Megatron-LM checkout (MEGATRON_LM_DIR)."""
import argparse
import inspect
import math
import sys
import types

import pytest
from megatron.core.distributed import finalize_model_grads as megatron_finalize
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer import param_group_identifier_keys
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.transformer.spec_utils import ModuleSpec, import_module
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_wesar import grads
from megatron_wesar.config import DEFAULT_SIGMA, WeSaRConfig
from megatron_wesar.megatron_lm import entry, plugin
from megatron_wesar.megatron_lm.args import (
    add_wesar_args,
    current_wesar_config,
    wesar_config_from_args,
)
from megatron_wesar.megatron_lm.layer_spec import (
    BuildTimeGatedColumnParallelLinear,
    BuildTimeGatedRowParallelLinear,
)
from megatron_wesar.megatron_lm.model import check_supported, wesar_gpt_builder
from tests.helpers.distributed import run_distributed
from tests.megatron_lm.test_megatron_lm import GPT_BUILDER_PARAMETERS

SHAPE = {"hidden_size": 64, "num_layers": 2, "ffn_hidden_size": 256}


def megatron_lm_args(argv=(), **megatron_values):
    """A namespace as Megatron-LM's parser leaves it: the --wesar-* arguments of `argv` and
    Megatron-LM's own values (the model shape, --init-method-std)."""
    args = add_wesar_args(argparse.ArgumentParser()).parse_args(list(argv))
    for name, value in {**SHAPE, "init_method_std": 0.02, **megatron_values}.items():
        setattr(args, name, value)
    return args


def test_spec_names_a_ready_module_spec_whose_linears_take_settings_when_built():
    spec = import_module(["megatron_wesar.megatron_lm", "wesar_layer_spec"])  # as --spec does
    assert isinstance(spec, ModuleSpec) and issubclass(spec.module, TransformerLayer)
    attention = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp.submodules
    linears = [attention.linear_qkv, attention.linear_proj, mlp.linear_fc1, mlp.linear_fc2]
    assert [s.module for s in linears] == [
        BuildTimeGatedColumnParallelLinear, BuildTimeGatedRowParallelLinear,
        BuildTimeGatedColumnParallelLinear, BuildTimeGatedRowParallelLinear]
    assert all("wesar" not in s.params for s in linears)


def test_wesar_arguments_give_the_wesar_config():
    args = megatron_lm_args(["--wesar-sigma", "0.01", "--wesar-backbone", "megatron",
                             "--wesar-gate-lr-mult", "2", "--no-wesar-gate-embedding"],
                            init_method_std=0.006)
    assert args.wesar_sigma == 0.01 and args.wesar_gate_lr_mult == 2.0
    assert wesar_config_from_args(args) == WeSaRConfig(
        sigma=0.01, backbone="megatron", gate_lr_mult=2.0, gate_embedding=False,
        init_method_std=0.006)
    assert wesar_config_from_args(megatron_lm_args()) == WeSaRConfig()
    assert not wesar_config_from_args(megatron_lm_args(["--no-wesar"])).enabled


def test_every_wesar_flag_is_prefixed_and_every_setting_reachable():
    parser = add_wesar_args(argparse.ArgumentParser(add_help=False))
    flags = [flag for action in parser._actions for flag in action.option_strings]
    assert flags and all(flag.startswith(("--wesar", "--no-wesar")) for flag in flags)
    dests = {action.dest for action in parser._actions}
    fields = {f"wesar_{name}" for name in WeSaRConfig.__dataclass_fields__}
    assert dests == fields - {"wesar_init_method_std"}  # Megatron-LM's --init-method-std


def test_sigma_regime_places_sigma_unless_sigma_is_given():
    placed = wesar_config_from_args(megatron_lm_args(["--wesar-sigma-regime", "13b"]))
    assert not math.isclose(placed.sigma, DEFAULT_SIGMA)
    given = megatron_lm_args(["--wesar-sigma-regime", "13b", "--wesar-sigma", "0.005"])
    assert wesar_config_from_args(given).sigma == 0.005


def test_a_bad_value_names_its_flag():
    with pytest.raises(ValueError, match="--wesar-sigma"):
        wesar_config_from_args(megatron_lm_args(["--wesar-sigma", "-1"]))


def test_layers_read_megatron_lm_args_when_they_exist(monkeypatch):
    monkeypatch.delitem(sys.modules, "megatron.training.global_vars", raising=False)
    assert current_wesar_config() == WeSaRConfig()
    args = megatron_lm_args(["--wesar-sigma", "0.02"], init_method_std=0.01)
    monkeypatch.setitem(sys.modules, "megatron.training.global_vars",
                        types.SimpleNamespace(_GLOBAL_ARGS=args))
    assert current_wesar_config() == WeSaRConfig(sigma=0.02, init_method_std=0.01)


def test_builder_has_megatron_lm_gpt_builder_signature():
    assert tuple(inspect.signature(wesar_gpt_builder).parameters) == GPT_BUILDER_PARAMETERS


@pytest.mark.parametrize("name, flag", [
    ("use_legacy_models", "--use-legacy-models"), ("num_experts", "--num-experts"),
    ("mtp_num_layers", "--mtp-num-layers"), ("fp8", "--fp8"), ("spec", "--spec"),
    ("multi_latent_attention", "--multi-latent-attention"), ("qk_layernorm", "--qk-layernorm"),
])
def test_unsupported_options_are_refused_by_name(name, flag):
    check_supported(argparse.Namespace())
    with pytest.raises(ValueError, match=flag):
        check_supported(argparse.Namespace(**{name: 8 if name == "num_experts" else True}))


def _fake_optimizer_config(args):
    return OptimizerConfig(lr=1e-3, min_lr=1e-4), {"megatron's own": "kept"}


def test_gate_overrides_reach_megatron_lm_optimizer_config():
    wrapped = plugin.with_gate_overrides(_fake_optimizer_config)
    config, overrides = wrapped(megatron_lm_args(["--wesar-gate-lr-mult", "3"]))
    assert config.lr == 1e-3 and overrides["megatron's own"] == "kept"
    gate = overrides[ParamKey(attr="wesar_gate")]
    assert math.isclose(gate["max_lr"], 3e-3) and math.isclose(gate["min_lr"], 3e-4)


def test_install_rebinds_finalize_and_optimizer_config_once():
    training = types.ModuleType("megatron.training.training")
    training.finalize_model_grads = megatron_finalize
    training.get_megatron_optimizer_config = _fake_optimizer_config
    plugin.install_plugin(training)
    plugin.install_plugin(training)
    assert training.finalize_model_grads is grads.finalize_model_grads
    assert training.get_megatron_optimizer_config.__wrapped__ is _fake_optimizer_config
    del training.finalize_model_grads
    with pytest.raises(RuntimeError, match="finalize_model_grads"):
        plugin.install_plugin(training)


class _MissingTriton:
    """A meta path finder: importing megatron.training fails on its missing dependency."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "megatron.training":
            raise ModuleNotFoundError("No module named 'triton'", name="triton")
        return None


def test_missing_megatron_lm_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("MEGATRON_LM_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "megatron.training", None)
    with pytest.raises(entry.MegatronLMNotFound, match="core_v0.16.1.*MEGATRON_LM_DIR"):
        entry.import_megatron_lm()
    monkeypatch.delitem(sys.modules, "megatron.training")
    monkeypatch.setattr(sys, "meta_path", [_MissingTriton(), *sys.meta_path])
    with pytest.raises(entry.MegatronLMNotFound, match="pip install triton"):
        entry.import_megatron_lm()


def _build_and_group(rank, world_size):
    """One process: a layer from wesar_layer_spec under Megatron-LM-like args, the plug-in's
    model, and megatron's optimizer with the plug-in's overrides."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import get_megatron_optimizer, get_standard_config_overrides
    from megatron.core.transformer import TransformerConfig

    from megatron_wesar.megatron_lm import wesar_layer_spec

    parallel_state.initialize_model_parallel(1, 1)
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                               use_cpu_initialization=True, init_method_std=0.01)
    args = megatron_lm_args(["--wesar-sigma", "0.02", "--wesar-gate-lr-mult", "2"],
                            init_method_std=0.01, padded_vocab_size=128,
                            max_position_embeddings=16, fp16_lm_cross_entropy=False,
                            untie_embeddings_and_output_weights=False,
                            position_embedding_type="learned_absolute", rotary_percent=1.0,
                            rotary_base=10000, use_rope_scaling=False, seed=1234)
    sys.modules["megatron.training.global_vars"] = types.SimpleNamespace(_GLOBAL_ARGS=args)
    layer = wesar_layer_spec(config)  # ModuleSpec.__call__ builds it, as TransformerBlock does
    layer_gates = {name: float(p) for name, p in layer.named_parameters() if "gate" in name}
    model = wesar_gpt_builder(args, True, True, config=config)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)

    def megatron_lm_optimizer_config(_args):
        optimizer_config = OptimizerConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.1)
        return optimizer_config, get_standard_config_overrides(optimizer_config)

    optimizer_config, overrides = plugin.with_gate_overrides(megatron_lm_optimizer_config)(args)
    optimizer = get_megatron_optimizer(optimizer_config, [ddp], config_overrides=overrides)
    names = {id(p): name for name, p in ddp.named_parameters()}
    groups = [(group["wd_mult"], group["max_lr"], group["min_lr"],
               [names[id(p)] for p in group["params"]],
               tuple(group[key] for key in param_group_identifier_keys))
              for group in optimizer.param_groups]
    return layer_gates, groups


@pytest.mark.parallel
def test_spec_layer_builder_and_optimizer_groups_in_megatron_core():
    (layer_gates, groups), = run_distributed(_build_and_group, 1)
    d, n, d_ff = 64, 2, 256
    assert math.isclose(layer_gates["self_attention.linear_qkv.gate_q"],
                        math.sqrt(1 / d) / 0.02, rel_tol=1e-6)  # He backbone, sigma from args
    assert math.isclose(layer_gates["mlp.linear_fc2.gate"],
                        math.sqrt(2 / d_ff) / math.sqrt(2 * n) / 0.02, rel_tol=1e-6)
    gate_groups = [g for g in groups if any(name.endswith(("gate", "gate_q")) for name in g[3])]
    gates = [name for g in gate_groups for name in g[3]]
    assert "module.embedding.word_embeddings.gate" in gates
    assert "module.output_layer.gate" in gates
    for wd_mult, max_lr, min_lr, names, _ in gate_groups:
        assert wd_mult == 0.0 and math.isclose(max_lr, 2e-3) and math.isclose(min_lr, 2e-4)
        assert all(".gate" in name for name in names), names
    weights = [g for g in groups if any(name.endswith("linear_qkv.weight") for name in g[3])]
    assert [(wd, lr) for wd, lr, *_ in weights] == [(1.0, 1e-3)]
    # a checkpoint load matches each saved group to a group by these keys alone: the gates'
    # group (its LR multiplier) must not be taken for the biases' one (also no weight decay)
    assert len({g[4] for g in groups}) == len(groups)
