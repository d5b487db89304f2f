"""One rank of a Megatron-LM run for the `megatron_lm` tests (started by torchrun).

    harness.py OUT_DIR <arguments>   python -m megatron_wesar.megatron_lm <arguments>

(with `pretrain_gpt.py <arguments>`: Megatron-LM's own script). Both run Megatron-LM's
pretrain() (on CPU through megatron_wesar.megatron_lm.cpu). The harness
wraps Megatron-LM's `train_step` and `train` (test instrumentation only) to record, per rank,
into OUT_DIR/rank<N>.json: every gate's initial value, each step's loss and every gate's value
after it, and at the end the finalize function in the model config, the optimizer's param groups
(names, wd_mult, max_lr, min_lr) and the parameters of Megatron-LM's gpt_builder. Rank 0 also
saves OUT_DIR/tensors.pt, in the dense reference's canonical names (tests/helpers/gather.py):
the whole model when train() starts and ends, and for each step its batches (Megatron-LM's
`get_batch_on_this_tp_rank`: tokens, labels, loss_mask per microbatch), the learning rate of
every param group, the grad norm, and the gate gradients (where the distributed optimizer keeps
them) and gate values after the step.
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


def _group_names(optimizer, names: dict) -> list:
    """The names of the model parameters in each param group of `optimizer` (a chain's groups
    in order); under the distributed optimizer, of those whose shard this rank holds."""
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        index = getattr(opt, "model_param_group_index_map", None)  # the distributed optimizer's
        if index is None:
            out += [sorted(names[id(p)] for p in group["params"]) for group in opt.param_groups]
            continue
        groups = [[] for _ in opt.param_groups]
        for param, (group, _) in index.items():
            groups[group].append(names[id(param)])
        out += [sorted(group) for group in groups]
    return out


def _groups(model, optimizer) -> list:
    names = {id(p): name for chunk in model for name, p in chunk.named_parameters()}
    return [{"names": group_names, "wd_mult": group["wd_mult"], "max_lr": group["max_lr"],
             "min_lr": group["min_lr"]}
            for group_names, group in zip(_group_names(optimizer, names), optimizer.param_groups)]


def _canonical(model, optimizer=None) -> dict:
    """The gathered canonical model (collective); with `optimizer`, the gate gradients instead,
    read where the distributed optimizer keeps them."""
    from megatron.training import get_args

    from megatron_wesar.layers import gate_parameters
    from tests.helpers.gather import distributed_optimizer_owned, gather_canonical

    if optimizer is None:
        return gather_canonical(model[0])
    owned = None
    if get_args().use_distributed_optimizer:
        owned = distributed_optimizer_owned(optimizer, [p for _, p in gate_parameters(model[0])])
    grads = gather_canonical(model[0], values="grad", owned=owned)
    return {name: grad for name, grad in grads.items() if name.endswith(".gate")}


def _capture_batches(batches: list) -> None:
    """Record the batch of every microbatch (Megatron-LM's get_batch_on_this_tp_rank, which
    pretrain_gpt.py imports when it is imported or run)."""
    from megatron.training import utils

    original = utils.get_batch_on_this_tp_rank

    @functools.wraps(original)
    def get_batch_on_this_tp_rank(*args, **kwargs):
        batch = original(*args, **kwargs)
        batches.append({k: batch[k].clone() for k in ("tokens", "labels", "loss_mask")})
        return batch

    utils.get_batch_on_this_tp_rank = get_batch_on_this_tp_rank


def _record(out_dir: Path) -> None:
    import torch
    from gpt_builders import gpt_builder
    from megatron.core import parallel_state
    from megatron.training import training

    steps, tensors, batches = [], {"steps": []}, []
    original_train_step, original_train = training.train_step, training.train
    _capture_batches(batches)

    @functools.wraps(original_train_step)
    def train_step(forward_step_func, data_iterator, model, optimizer, *args, **kwargs):
        lrs = [group["lr"] for group in optimizer.param_groups]
        result = original_train_step(forward_step_func, data_iterator, model, optimizer, *args,
                                     **kwargs)
        loss = result[0].get("lm loss")
        steps.append({"loss": None if loss is None else float(loss), "gates": _gates(model)})
        gates = {k: v for k, v in _canonical(model).items() if k.endswith(".gate")}
        tensors["steps"].append({"batches": batches[:], "lrs": lrs, "grad_norm": result[5],
                                 "gate_grads": _canonical(model, optimizer), "gates": gates})
        batches.clear()
        return result

    def write(model, optimizer, config, initial) -> None:
        tensors["final"] = _canonical(model)
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
        if rank == 0:
            torch.save(tensors, out_dir / "tensors.pt")

    @functools.wraps(original_train)
    def train(forward_step_func, model, optimizer, *args, **kwargs):
        initial = _gates(model)
        tensors["initial"] = _canonical(model)
        try:
            result = original_train(forward_step_func, model, optimizer, *args, **kwargs)
        except SystemExit:  # --exit-interval: train() exits the process
            write(model, optimizer, args[4], initial)
            raise
        write(model, optimizer, args[4], initial)
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
