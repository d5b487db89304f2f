"""Config dataclass fields that are also command-line options.

A field declared with `option(default, help, flag=...)` carries its meaning (`help`, the field's
docstring) and its command-line flag (Megatron-LM's name where Megatron-LM has one) in its
metadata. `add_options` turns the fields of a config tree into argparse options (each with the
field's dotted path, "training.lr", as its dest); `replace_path` applies {dotted path: value}
overrides to a tree and `to_argv` turns them back into flags.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def option(default: Any, help: str, *, flag: str | None = None, choices=None, type=None,
           nargs: str | None = None, positive: bool = False, preset_filled: bool = False):
    """A dataclass field with its help text and command-line flag (default: --field-name).

    `type` parses a flag's value where the default does not say it (None defaults); `choices`
    and `positive` (> 0 when set) are checked by `validate_options`; `preset_filled` says the
    model preset, not the default, gives the value when the flag is absent."""
    metadata = {"help": help, "flag": flag, "choices": choices, "type": type, "nargs": nargs,
                "positive": positive, "preset_filled": preset_filled}
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable")
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    """The command-line flag of a config field."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def section(cls):
    """A field holding a nested config of type `cls` (a section of the tree)."""
    return dataclasses.field(default_factory=cls)


def is_section(field: dataclasses.Field) -> bool:
    """Whether a field holds a nested config (see `section`) rather than a value."""
    return dataclasses.is_dataclass(field.default_factory)


def section_type(field: dataclasses.Field) -> type:
    """The dataclass of a section field."""
    return field.default_factory


def validate_options(config) -> None:
    """ValueError naming the field and flag of the first field of `config` (one section, not
    its subsections) outside its `choices` or not > 0 where `positive`."""
    for field in dataclasses.fields(config):
        if is_section(field):
            continue
        value, meta = getattr(config, field.name), field.metadata
        name = f"{type(config).__name__}.{field.name} ({flag_of(field)})"
        if meta.get("choices") and value is not None and value not in meta["choices"]:
            raise ValueError(f"{name} must be one of {tuple(meta['choices'])}, got {value!r}")
        if meta.get("positive") and value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def leaf_fields(cls, prefix: str = ""):
    """(dotted path, field) of every option of the config tree `cls`, depth first."""
    for field in dataclasses.fields(cls):
        if is_section(field):
            yield from leaf_fields(section_type(field), f"{prefix}{field.name}.")
        else:
            yield prefix + field.name, field


def _default_text(field: dataclasses.Field) -> str:
    if field.metadata.get("preset_filled"):
        return "the preset's"
    default = field.default
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None:
        return ""
    return f"{default:g}" if isinstance(default, float) else str(default)


def add_options(parser: argparse.ArgumentParser, cls, sections: dict | None = None) -> None:
    """Add one option per leaf field of the config tree `cls` to `parser`, grouped by section.

    Values of absent flags stay absent from the parsed namespace (argparse.SUPPRESS), so that
    vars(namespace) holds exactly what the command line set; the help shows each field's help
    text and default."""
    groups = {}
    for path, field in leaf_fields(cls):
        section = path.rpartition(".")[0]
        if section not in groups:
            title = (sections or {}).get(section, section or None)
            groups[section] = parser.add_argument_group(title) if section else parser
        default = _default_text(field)
        help_text = field.metadata["help"] + (f" (default: {default})" if default else "")
        kwargs = dict(dest=path, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        if isinstance(field.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = field.metadata["type"] or type(field.default)
            kwargs["metavar"] = field.name.upper()
            if field.metadata["choices"]:
                kwargs["choices"] = field.metadata["choices"]
            if field.metadata["nargs"]:
                kwargs["nargs"] = field.metadata["nargs"]
        groups[section].add_argument(flag_of(field), **kwargs)


def replace_path(config, values: dict):
    """A copy of the frozen config tree `config` with the dotted paths of `values` replaced.

    Constructs every touched section anew, so that each validates its new values."""
    own, nested = {}, {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            own[head] = value
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted((set(own) | set(nested)) - names)
    if unknown:
        raise KeyError(f"{type(config).__name__} has no field(s) {unknown}")
    for head, sub in nested.items():
        own[head] = replace_path(getattr(config, head), sub)
    return dataclasses.replace(config, **own)


def to_argv(cls, values: dict) -> list:
    """The command-line flags that set `values` ({dotted path: value}) of the config tree `cls`
    (the inverse of parsing them)."""
    fields = dict(leaf_fields(cls))
    argv = []
    for path, value in values.items():
        flag = flag_of(fields[path])
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv
