"""The `--wesar-*` arguments of Megatron-LM runs, and the WeSaRConfig they give.

The arguments are generated from WeSaRConfig's fields (their help and flag names,
megatron_wesar.options), with two Megatron-LM renames: the backbone is `--wesar-backbone` and
the 'megatron' backbone's std is Megatron-LM's own `--init-method-std`. Each lands in the
namespace as `args.wesar_<field>` (`args.wesar_enabled` for `--wesar` / `--no-wesar`).

Nothing here imports megatron.training: the parser is any argparse parser, `args` any namespace.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ..config import WeSaRConfig
from ..init import ModelShape
from ..options import flag_of
from ..sigma_regime import with_regime_sigma

# WeSaRConfig fields whose Megatron-LM flag differs from the one the package's own driver uses.
RENAMED_FLAGS = {"backbone": "--wesar-backbone"}
# WeSaRConfig fields read from Megatron-LM's own arguments: {field: Megatron-LM's dest}.
MEGATRON_LM_ARGS = {"init_method_std": "init_method_std"}


def wesar_dest(field_name: str) -> str:
    """The namespace attribute of a WeSaRConfig field: `wesar_<field>`."""
    return f"wesar_{field_name}"


def _own_fields():
    return [f for f in dataclasses.fields(WeSaRConfig) if f.name not in MEGATRON_LM_ARGS]


def add_wesar_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `--wesar-*` arguments to `parser` (Megatron-LM's extra_args_provider signature).

    Defaults are WeSaRConfig's, except sigma, whose default None means "the paper's sqrt(4e-5),
    or where --wesar-sigma-regime puts it"."""
    group = parser.add_argument_group("WeSaR (megatron_wesar)")
    for field in _own_fields():
        meta = field.metadata
        kwargs = {"dest": wesar_dest(field.name), "help": meta["help"].replace("%", "%%")}
        if isinstance(field.default, bool):
            kwargs.update(action=argparse.BooleanOptionalAction, default=field.default)
        else:
            kwargs.update(type=meta["type"] or type(field.default), default=field.default)
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
        if field.name == "sigma":
            kwargs["default"] = None
        group.add_argument(RENAMED_FLAGS.get(field.name, flag_of(field)), **kwargs)
    return parser


def wesar_config_from_args(args) -> WeSaRConfig:
    """The WeSaRConfig of a Megatron-LM run's `args`: the `--wesar-*` values present in it (the
    WeSaRConfig default for an absent one), Megatron-LM's --init-method-std, and sigma placed by
    --wesar-sigma-regime for the model's shape when --wesar-sigma is not given.

    Raises ValueError naming the flag of a bad value."""
    values = {}
    for field in _own_fields():
        value = getattr(args, wesar_dest(field.name), None)
        if value is not None:
            values[field.name] = value
    for name, dest in MEGATRON_LM_ARGS.items():
        if getattr(args, dest, None) is not None:
            values[name] = getattr(args, dest)
    wesar = WeSaRConfig(**values)
    if "sigma" in values:
        return wesar
    ffn = getattr(args, "ffn_hidden_size", None) or 4 * args.hidden_size
    return with_regime_sigma(wesar, ModelShape(args.hidden_size, args.num_layers, ffn))


def megatron_lm_args():
    """Megatron-LM's parsed arguments when megatron.training has set them in this process,
    else None (megatron.training is never imported here)."""
    global_vars = sys.modules.get("megatron.training.global_vars")
    return getattr(global_vars, "_GLOBAL_ARGS", None)


def current_wesar_config() -> WeSaRConfig:
    """The WeSaR settings of the layers being built: from the `--wesar-*` arguments of the
    Megatron-LM run in this process (Megatron-LM's --init-method-std included), else the
    WeSaRConfig defaults."""
    args = megatron_lm_args()
    return WeSaRConfig() if args is None else wesar_config_from_args(args)
