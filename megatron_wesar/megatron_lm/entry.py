"""`python -m megatron_wesar.megatron_lm <pretrain_gpt.py arguments> [--wesar-* ...]`, and
`python -m megatron_wesar.megatron_lm SCRIPT.py <arguments>`.

Runs Megatron-LM's own `pretrain()` with pretrain_gpt.py's dataset provider, forward step and
embedding ranks, and with WeSaR plugged in: the `--wesar-*` arguments (args.add_wesar_args), the
WeSaR GPT model builder (model.wesar_gpt_builder: gated layers, word embedding and output layer),
the gate-aware finalize_model_grads and the gate optimizer overrides (plugin.install_plugin). On
a machine without CUDA it runs on CPU with gloo (cpu.enable_megatron_lm_cpu_compat).

With a first argument ending in .py it runs that Megatron-LM script instead (`run_script`),
unchanged but for the CPU patches: e.g. pretrain_gpt.py with `--spec megatron_wesar.megatron_lm
wesar_layer_spec` on a machine without CUDA.

Megatron-LM (megatron.training, pretrain_gpt.py) is not a package on PyPI: it is imported from
a checkout named by MEGATRON_LM_DIR (appended to sys.path, so megatron.core stays the installed
megatron-core) or from wherever megatron.training is already importable. With megatron-core's
wheel one Megatron-LM step needs a fix on any machine: `initialize_megatron` runs
megatron-core's `compile_helpers()` (`make` in the installed package), but the wheel ships the
compiled `helpers_cpp` and no Makefile; `import_megatron_lm` makes it build only when
`helpers_cpp` does not import.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

MEGATRON_LM_TAG = "core_v0.16.1"


class MegatronLMNotFound(ImportError):
    """megatron.training (Megatron-LM) or one of its requirements cannot be imported."""


def compile_helpers_if_missing(compile_helpers):
    """Wrap megatron-core's `compile_helpers`: build only when `helpers_cpp` does not import."""

    @functools.wraps(compile_helpers)
    def wrapper():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            compile_helpers()

    return wrapper


def import_megatron_lm() -> Path:
    """Import megatron.training and return the Megatron-LM checkout's root (the directory of
    pretrain_gpt.py, put on sys.path); megatron-core's `compile_helpers` is wrapped by
    `compile_helpers_if_missing` (once). Raises MegatronLMNotFound saying what to install."""
    root = os.environ.get("MEGATRON_LM_DIR")
    if root and root not in sys.path:
        sys.path.append(root)  # after site-packages: the installed megatron.core is the one used
    try:
        import megatron.training
    except ImportError as err:
        missing = getattr(err, "name", None) or str(err)
        if missing.startswith("megatron.training") or missing == "megatron":
            where = (f"MEGATRON_LM_DIR={root} has no megatron/training" if root else
                     "megatron.training is not importable and MEGATRON_LM_DIR is not set")
            raise MegatronLMNotFound(
                f"{where}. Megatron-LM is not on PyPI: `git clone --branch {MEGATRON_LM_TAG} "
                "https://github.com/NVIDIA/Megatron-LM` (the release matching megatron-core "
                "0.16.1) and set MEGATRON_LM_DIR to the clone."
            ) from err
        raise MegatronLMNotFound(
            f"Megatron-LM's megatron.training needs the module {missing!r}, which is not "
            f"installed: pip install {missing.split('.')[0]}"
        ) from err
    found = Path(megatron.training.__file__).resolve().parents[2]
    if not (found / "pretrain_gpt.py").is_file():
        raise MegatronLMNotFound(
            f"megatron.training was imported from {found}, which has no pretrain_gpt.py: point "
            "MEGATRON_LM_DIR at a full Megatron-LM checkout")
    if str(found) not in sys.path:
        sys.path.append(str(found))
    from megatron.core.datasets import utils

    if not hasattr(utils.compile_helpers, "__wrapped__"):
        utils.compile_helpers = compile_helpers_if_missing(utils.compile_helpers)
    return found


def _extra_args_provider(pretrain_gpt):
    """add_wesar_args, chained after pretrain_gpt.py's own provider (ModelOpt's) when it has
    one."""
    from .args import add_wesar_args

    if not getattr(pretrain_gpt, "has_nvidia_modelopt", False):
        return add_wesar_args
    return lambda parser: add_wesar_args(pretrain_gpt.add_modelopt_args(parser))


def run_script(script: str, argv: list) -> None:
    """Run the Megatron-LM script `script` as __main__ with `argv`, on CPU with gloo when there
    is no CUDA."""
    import runpy

    import_megatron_lm()
    from .cpu import enable_megatron_lm_cpu_compat

    enable_megatron_lm_cpu_compat()
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def main(argv=None) -> None:
    """Run Megatron-LM's pretrain() on pretrain_gpt.py's data and loss with the WeSaR model.
    `argv` (default sys.argv[1:]) are pretrain_gpt.py's arguments plus `--wesar-*` ones; with a
    first argument ending in .py, `run_script` runs that script with the rest."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].endswith(".py"):
        return run_script(argv[0], argv[1:])
    sys.argv = [sys.argv[0], *argv]
    import_megatron_lm()
    import pretrain_gpt  # Megatron-LM's script: its providers, not its __main__ block
    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart, training
    from model_provider import model_provider

    from .cpu import enable_megatron_lm_cpu_compat
    from .model import wesar_gpt_builder
    from .plugin import install_plugin

    enable_megatron_lm_cpu_compat()
    install_plugin(training)
    datasets_provider = pretrain_gpt.train_valid_test_datasets_provider
    datasets_provider.is_distributed = True
    pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(training.pretrain)
    pretrain(
        datasets_provider,
        functools.partial(model_provider, wesar_gpt_builder),
        ModelType.encoder_or_decoder,
        pretrain_gpt.forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        extra_args_provider=_extra_args_provider(pretrain_gpt),
        store=store,
        get_embedding_ranks=pretrain_gpt.get_embedding_ranks,
    )
