"""`wesar_layer_spec`: a ready ModuleSpec object for Megatron-LM's `--spec`.

Megatron-LM's `--spec MODULE NAME` takes the attribute NAME of MODULE as the transformer layer
spec without calling it, so the spec is a module-level object. Its gated linears read their
WeSaR settings when they are built, not when this module is imported
(`args.current_wesar_config`: the `--wesar-*` arguments of the Megatron-LM run, else the
WeSaRConfig defaults). It gates the transformer layers only: GPTModel's word embedding and
output layer stay Megatron's (use `python -m megatron_wesar.megatron_lm` to gate them too).
"""
from __future__ import annotations

import dataclasses

from megatron.core.transformer.spec_utils import ModuleSpec

from ..layers import GatedColumnParallelLinear, GatedRowParallelLinear
from ..spec import get_wesar_layer_spec
from .args import current_wesar_config


class BuildTimeGatedColumnParallelLinear(GatedColumnParallelLinear):
    """GatedColumnParallelLinear whose WeSaRConfig, when the spec gives none, is the one in force
    when the layer is built (`current_wesar_config`)."""

    def __init__(self, *args, wesar=None, **kwargs):
        super().__init__(*args, wesar=wesar or current_wesar_config(), **kwargs)


class BuildTimeGatedRowParallelLinear(GatedRowParallelLinear):
    """GatedRowParallelLinear whose WeSaRConfig, when the spec gives none, is the one in force
    when the layer is built (`current_wesar_config`)."""

    def __init__(self, *args, wesar=None, **kwargs):
        super().__init__(*args, wesar=wesar or current_wesar_config(), **kwargs)


BUILD_TIME_CLASSES = {
    GatedColumnParallelLinear: BuildTimeGatedColumnParallelLinear,
    GatedRowParallelLinear: BuildTimeGatedRowParallelLinear,
}


def settings_at_build_time(spec):
    """`spec` (a ModuleSpec tree, changed in place) with each gated linear replaced by its
    build-time class and its fixed WeSaRConfig removed."""
    if isinstance(spec, ModuleSpec):
        if spec.module in BUILD_TIME_CLASSES:
            spec.module = BUILD_TIME_CLASSES[spec.module]
            spec.params = {k: v for k, v in spec.params.items() if k != "wesar"}
        settings_at_build_time(spec.submodules)
    elif dataclasses.is_dataclass(spec):
        for field in dataclasses.fields(spec):
            settings_at_build_time(getattr(spec, field.name))
    return spec


def build_time_layer_spec() -> ModuleSpec:
    """The WeSaR TransformerLayer spec (megatron_wesar.spec.get_wesar_layer_spec) whose gated
    linears take their WeSaR settings when they are built."""
    return settings_at_build_time(get_wesar_layer_spec(None))


wesar_layer_spec = build_time_layer_spec()
