"""The export scenario, run once on 2 gloo ranks (tests/helpers/distributed.py): two tiny
models trained at TP=2 through the driver (GPT-2 style: LayerNorm + GeLU + learned positions,
tied; Llama style: RMSNorm + SwiGLU + RoPE, untied), their gated logits at TP=2, their exports
(Megatron and Hugging Face, at TP=1 with DP=2), the Megatron exports' logits at TP=1, TP=2
and PP=2,
the import round trip and the refusals. Rank 0 returns everything the tests compare."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import torch

from tests.training.test_checkpointing import TINY, _pretrain

MODELS = {
    "gpt2": [],
    "llama": ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
              "--untie-embeddings-and-output-weights"],
}
TRAIN = ["--train-iters", "2", "--lr", "1e-2"]


def tokens() -> torch.Tensor:
    """The batch every model is compared on (2 x 32 byte tokens)."""
    return torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(7))


@contextlib.contextmanager
def model_parallel(tp: int, pp: int = 1):
    """megatron's groups with tensor-parallel size `tp` and `pp` stages (the rest
    data-parallel)."""
    from megatron.core import parallel_state

    from megatron_wesar.training.engine import initialize_parallel

    initialize_parallel(tp, pp, seed=1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()


def logits(model, batch: torch.Tensor) -> torch.Tensor:
    """The whole-vocabulary logits (float64) of `model` on `batch`; with two pipeline stages,
    the first sends its output to the second (None on the first)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(batch.shape[1]).expand_as(batch)
    group = parallel_state.get_pipeline_model_parallel_group()
    stages = parallel_state.get_pipeline_model_parallel_world_size()
    with torch.no_grad():
        if not model.pre_process:
            hidden = torch.empty(batch.shape[1], batch.shape[0], model.config.hidden_size)
            torch.distributed.recv(hidden, group=group, group_src=0)
            model.set_input_tensor(hidden)
        out = model(batch, positions, None)
    if stages > 1 and not model.post_process:
        torch.distributed.send(out, group=group, group_dst=1)
        return None
    return gather_from_tensor_model_parallel_region(out).double()


def cli(command, argv) -> tuple:
    """(exit status, stderr) of `megatron-wesar <command> argv` run on these ranks."""
    from megatron_wesar.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([command, *argv])
    return code, err.getvalue()


def run(rank, world_size, root):
    """The whole scenario (see the module docstring)."""
    from megatron_wesar.export.hf import export_hf
    from megatron_wesar.export.megatron_format import (
        build_plain_model,
        export_megatron,
        load_plain_checkpoint,
    )
    from megatron_wesar.export.source import load_gated_model, open_checkpoint

    out = {name: {} for name in MODELS}
    batch = tokens()
    for name, extra in MODELS.items():
        _pretrain([*TINY, *TRAIN, *extra, "--tensor-model-parallel-size", "2",
                   "--save", f"{root}/{name}/ckpt"])
    with model_parallel(2):
        for name in MODELS:
            model = load_gated_model(open_checkpoint(f"{root}/{name}/ckpt"))
            out[name]["gated"] = logits(model, batch)
    with model_parallel(1):
        for name in MODELS:
            checkpoint = open_checkpoint(f"{root}/{name}/ckpt")
            model = load_gated_model(checkpoint)
            export_megatron(model, checkpoint, f"{root}/{name}/megatron")
            export_hf(model, checkpoint, f"{root}/{name}/hf")
            out[name]["gates"] = {n: p.item() for n, p in model.named_parameters()
                                  if getattr(p, "wesar_gate", False)}
            gate = model.decoder.layers[1].self_attention.linear_qkv.gate_k
            with torch.no_grad():
                gate.mul_(1.01)  # one gate off by 1%: the parity must break
            export_hf(model, checkpoint, f"{root}/{name}/hf_perturbed")
        out["plain_tp1"] = _plain_logits(root, batch, build_plain_model, load_plain_checkpoint)
    with model_parallel(2):
        out["plain_tp2"] = _plain_logits(root, batch, build_plain_model, load_plain_checkpoint)
    with model_parallel(1, pp=2):
        last_stage = [_plain_logits(root, batch, build_plain_model, load_plain_checkpoint)]
    torch.distributed.broadcast_object_list(last_stage, src=1)
    out["plain_pp2"] = last_stage[0]
    out["round_trip"] = _round_trip(root, batch)
    out["refusals"] = _refusals(root)
    return out if rank == 0 else None


def _plain_logits(root, batch, build_plain_model, load_plain_checkpoint) -> dict:
    """{model: logits of its Megatron export in megatron-core's ungated GPTModel}."""
    from megatron_wesar.export.source import open_checkpoint

    result = {}
    for name in MODELS:
        checkpoint = open_checkpoint(f"{root}/{name}/ckpt")
        with open(f"{root}/{name}/megatron/wesar_export.json") as f:
            tied = json.load(f)["tied_embeddings"]
        plain = build_plain_model(checkpoint.config, checkpoint.model["vocab_size"], tied)
        load_plain_checkpoint(plain, f"{root}/{name}/megatron")
        plain.eval()
        result[name] = logits(plain, batch)
    return result


def _round_trip(root, batch) -> dict:
    """hf -> import -> export -> hf through the command line (the GPT-2 style model made tied
    as GPT-2 is, gate 1), the rescaled import of the untied Llama style one (W_bar stds, logits)
    and a run resumed from it."""
    from megatron_wesar.export.source import load_gated_model, open_checkpoint

    if torch.distributed.get_rank() == 0:
        _tie(f"{root}/gpt2/hf", f"{root}/gpt2/hf_tied")
    torch.distributed.barrier()
    result = {"gpt2": [
        cli("import", ["--from", "hf", f"{root}/gpt2/hf_tied", *TINY, *TRAIN,
                       "--save", f"{root}/gpt2/imported"]),
        cli("export", ["--load", f"{root}/gpt2/imported", "--to", "hf", f"{root}/gpt2/hf_again"]),
    ]}
    result["rescaled"] = cli("import", ["--from", "hf", f"{root}/llama/hf", "--rescale-to-sigma",
                                        *TINY, *TRAIN, *MODELS["llama"],
                                        "--save", f"{root}/llama/rescaled"])
    with model_parallel(1):
        from megatron_wesar.monitor import gated_matrices

        model = load_gated_model(open_checkpoint(f"{root}/llama/rescaled"))
        result["rescaled_stds"] = {m.name: float(m.part(m.weight).double().std())
                                   for m in gated_matrices(model)}
        result["rescaled_sigma"] = model.wesar.sigma
        result["rescaled_logits"] = logits(model, batch)
    losses, _ = _pretrain([*TINY, *TRAIN, *MODELS["llama"],
                           "--load", f"{root}/llama/rescaled", "--save", f"{root}/llama/resumed"])
    result["resumed_losses"] = losses
    return result


def _tie(source: str, directory: str) -> None:
    """A copy of the Hugging Face model `source` with its output layer tied to the embedding."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, directory)
    with open(f"{directory}/config.json") as f:
        config = json.load(f)
    config["tie_word_embeddings"] = True
    with open(f"{directory}/config.json", "w") as f:
        json.dump(config, f)
    tensors = load_file(f"{directory}/model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, f"{directory}/model.safetensors", metadata={"format": "pt"})


def _altered_copy(root, name: str, change: dict) -> str:
    """A copy of the GPT-2 style checkpoint whose description's model settings say `change`."""
    copy = f"{root}/{name}"
    if torch.distributed.get_rank() == 0:
        shutil.copytree(f"{root}/gpt2/ckpt", copy)
        meta_path = f"{copy}/iter_0000002/wesar_checkpoint.json"
        with open(meta_path) as f:
            meta = json.load(f)
        meta["model"].update(change)
        with open(meta_path, "w") as f:
            json.dump(meta, f)
    torch.distributed.barrier()
    return copy


def _refusals(root) -> dict:
    """(exit status, stderr) of the commands given bad input."""
    os.makedirs(f"{root}/empty", exist_ok=True)
    baseline = _altered_copy(root, "baseline_ckpt", {"wesar": False})
    other_shape = _altered_copy(root, "other_shape_ckpt", {"ffn_hidden_size": 256})
    return {
        "no_tracker": cli("export", ["--load", f"{root}/empty", "--to", "hf", f"{root}/x"]),
        "baseline": cli("export", ["--load", baseline, "--to", "megatron", f"{root}/y"]),
        "other_shape": cli("export", ["--load", other_shape, "--to", "hf", f"{root}/z"]),
        "exists": cli("export", ["--load", f"{root}/gpt2/ckpt", "--to", "hf",
                                 f"{root}/gpt2/hf"]),
        "left": sorted(os.listdir(root)),
    }
