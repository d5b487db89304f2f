"""One rank of a Megatron-LM run for the `megatron_lm` tests (started by torchrun).

    harness.py OUT_DIR <arguments>   python -m megatron_wesar.megatron_lm <arguments>

(with `pretrain_gpt.py <arguments>`: Megatron-LM's own script). Both run Megatron-LM's
pretrain() (on CPU through megatron_wesar.megatron_lm.cpu). The harness
wraps Megatron-LM's `train_step` and `train` (test instrumentation only) to record, per rank,
into OUT_DIR/rank<N>.json: every gate's initial value, each step's loss and every gate's value
after it, and at the end the finalize function in the model config, the optimizer's param groups
(names, wd_mult, max_lr, min_lr) and the parameters of Megatron-LM's gpt_builder.
"""
import functools
import inspect
import json
import os
import sys
from pathlib import Path


def _gates(model) -> dict:
    from megatron.training.utils import unwrap_model

    from megatron_wesar.layers import gate_parameters

    return {name: float(p.detach()) for chunk in unwrap_model(model)
            for name, p in gate_parameters(chunk)}


def _groups(model, optimizer) -> list:
    names = {id(p): name for chunk in model for name, p in chunk.named_parameters()}
    return [{"names": sorted(names[id(p)] for p in group["params"]),
             "wd_mult": group["wd_mult"], "max_lr": group["max_lr"],
             "min_lr": group["min_lr"]} for group in optimizer.param_groups]


def _record(out_dir: Path) -> None:
    from gpt_builders import gpt_builder
    from megatron.core import parallel_state
    from megatron.training import training

    steps = []
    original_train_step, original_train = training.train_step, training.train

    @functools.wraps(original_train_step)
    def train_step(forward_step_func, data_iterator, model, *args, **kwargs):
        result = original_train_step(forward_step_func, data_iterator, model, *args, **kwargs)
        loss = result[0].get("lm loss")
        steps.append({"loss": None if loss is None else float(loss), "gates": _gates(model)})
        return result

    @functools.wraps(original_train)
    def train(forward_step_func, model, optimizer, *args, **kwargs):
        initial = _gates(model)
        result = original_train(forward_step_func, model, optimizer, *args, **kwargs)
        config = args[4]
        finalize = config.finalize_model_grads_func
        record = {
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
            "initial_gates": initial,
            "steps": steps,
            "finalize": f"{finalize.__module__}.{finalize.__qualname__}",
            "groups": _groups(model, optimizer),
            "gpt_builder_parameters": list(inspect.signature(gpt_builder).parameters),
        }
        rank = int(os.environ["RANK"])
        (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
        return result

    training.train_step, training.train = train_step, train


def main() -> None:
    """Run `python -m megatron_wesar.megatron_lm` recorded (sys.argv: OUT_DIR arguments...);
    a first argument `pretrain_gpt.py` names the script in the Megatron-LM checkout."""
    from megatron_wesar.megatron_lm.entry import import_megatron_lm
    from megatron_wesar.megatron_lm.entry import main as entry_main

    out_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    root = import_megatron_lm()
    _record(out_dir)
    if argv[0] == "pretrain_gpt.py":
        argv[0] = str(root / argv[0])
    entry_main(argv)


if __name__ == "__main__":
    main()
