"""Gather a sharded megatron-core WeSaR GPT into the reference decoder's canonical state dict.

Every rank converts its local parameters to canonical names (splitting Megatron's fused layouts:
per-group [q, k, v] rows of linear_qkv, per-rank [gate, up] rows of a SwiGLU linear_fc1, and
their gates gate_q, gate_k, gate_v, gate_gate, gate_up), then all ranks exchange them and
concatenate the tensor-parallel shards in TP-rank order.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LAYER_PARTS = {
    "input_layernorm": "ln1",
    "self_attention.linear_qkv": "qkv",
    "self_attention.linear_proj": "proj",
    "pre_mlp_layernorm": "ln2",
    "mlp.linear_fc1": "fc1",
    "mlp.linear_fc2": "fc2",
}
_TOP = {
    "embedding.word_embeddings": "embedding",
    "embedding.position_embeddings": "position",
    "decoder.final_layernorm": "final_norm",
    "output_layer": "output",
}


def unwrap(model):
    """The bare GPT model under DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def canonical_name(model, name: str) -> str | None:
    """Map a megatron parameter name of this stage to the reference's name (None: skip)."""
    module_path, _, leaf = name.rpartition(".")
    match = _LAYER.match(module_path + "." + leaf)
    if match:
        local, rest = int(match.group(1)), match.group(2)
        global_index = model.decoder.layers[local].layer_number - 1
        module_path, _, leaf = rest.rpartition(".")
        if module_path not in _LAYER_PARTS:
            raise KeyError(f"unexpected parameter {name}")
        return f"layers.{global_index}.{_LAYER_PARTS[module_path]}.{leaf}"
    if module_path in _TOP:
        return f"{_TOP[module_path]}.{leaf}"
    raise KeyError(f"unexpected parameter {name}")


# the gate of each part of a fused layer (<layer>.gate_<part>) -> the reference's matrix
_GATE_PARTS = {"qkv": {"q": "q", "k": "k", "v": "v"}, "fc1": {"gate": "fc1_gate", "up": "fc1_up"}}


def _split_fused(model, canon: str, tensor: torch.Tensor) -> dict:
    """Split Megatron's fused local layouts into canonical local pieces: the weight and bias rows
    of each matrix, and the gate of each matrix (`<layer>.gate_<part>` -> `<matrix>.gate`)."""
    config = model.config
    head, leaf = canon.rsplit(".", 1)
    prefix, _, layer = head.rpartition(".")
    if leaf.startswith("gate_") and layer in _GATE_PARTS:
        return {f"{prefix}.{_GATE_PARTS[layer][leaf[len('gate_'):]]}.gate": tensor}
    if ".qkv." in canon and leaf in ("weight", "bias"):
        heads = config.num_attention_heads
        groups = config.num_query_groups or heads
        hn = config.kv_channels
        per_group = heads // groups
        rows = tensor.view(-1, (per_group + 2) * hn, *tensor.shape[1:])
        q, k, v = rows.split([per_group * hn, hn, hn], dim=1)
        return {
            f"{prefix}.{name}.{leaf}": part.reshape(-1, *tensor.shape[1:])
            for name, part in (("q", q), ("k", k), ("v", v))
        }
    if ".fc1." in canon and leaf in ("weight", "bias") and config.gated_linear_unit:
        gate, up = tensor.chunk(2, dim=0)
        return {f"{prefix}.fc1_gate.{leaf}": gate, f"{prefix}.fc1_up.{leaf}": up}
    return {canon: tensor}


def local_canonical(model, values: str = "param", only=None) -> dict:
    """{canonical name: (tensor, partition_dim or None)} for this rank.

    `values` picks what to read: 'param' (the values) or 'grad' (main_grad, else .grad).
    `only`: a set of parameter ids; the others are skipped.
    """
    model = unwrap(model)
    out = {}
    for name, param in model.named_parameters():
        if only is not None and id(param) not in only:
            continue
        canon = canonical_name(model, name)
        if values == "param":
            tensor = param.detach()
        else:
            tensor = getattr(param, "main_grad", None)
            if tensor is None:
                tensor = param.grad
            if tensor is None:
                continue
            tensor = tensor.detach()
        if getattr(param, "shared", False) and canon == "output.weight":
            continue  # the last stage's copy of a tied embedding
        dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        for key, piece in _split_fused(model, canon, tensor.clone()).items():
            out[key] = (piece, dim)
    return out


def gather_canonical(model, values: str = "param", owned=None) -> dict:
    """The full canonical state dict (same on every rank), TP shards concatenated.

    By default every data-parallel replica holds the same values and DP rank 0's are read.
    `owned` (a set of parameter ids) reads each parameter from the DP rank that owns it instead:
    with the distributed optimizer the reduced gradient of a parameter lives only on the rank
    whose gradient-buffer shard holds it. Replicated tensors must agree over TP ranks: a mismatch
    raises (that is how an incomplete gate gradient shows up).
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    mine = (tp_rank, dp_rank, local_canonical(model, values, only=owned))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    pieces: dict = {}
    for tp, dp, entries in everyone:
        if owned is None and dp != 0:
            continue
        for key, (tensor, dim) in entries.items():
            if tp in pieces.setdefault(key, {}):
                raise AssertionError(f"{key} is owned by two data-parallel ranks")
            pieces[key][tp] = (tensor, dim)
    full = {}
    for key, by_tp in pieces.items():
        ordered = [by_tp[t] for t in sorted(by_tp)]
        dim = ordered[0][1]
        if dim is None:
            first = ordered[0][0]
            for other, _ in ordered[1:]:
                if not torch.equal(first, other):
                    raise AssertionError(f"replicated {values} {key} differs across TP ranks")
            full[key] = first
        else:
            full[key] = torch.cat([t for t, _ in ordered], dim=dim)
    return full


def distributed_optimizer_owned(optimizer, params) -> set:
    """Ids of those of `params` whose gradient-buffer shard this DP rank owns under megatron's
    distributed optimizer (each optimizer of a chain maps the parameters of its local shards)."""
    owned = set()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        owned.update(id(p) for p in opt.model_param_gbuf_map)
    return {id(p) for p in params} & owned
