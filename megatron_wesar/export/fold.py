"""Folding the gates into their matrices (W = gate * W_bar) and the reverse (W_bar = W / gate).

Both walk `monitor.gated_matrices`, the one enumeration of the logical matrices of a gated model:
each part of a fused weight (q, k, v of linear_qkv; gate and up of a SwiGLU linear_fc1) is
scaled by its own gate. A tied output layer has no weight of its own: it uses the word
embedding's W_bar with its own gate, so folding gives it a matrix of its own
(`output_layer.weight`) unless its folded matrix equals the embedding's, bit for bit.

The plain state dict is the gated model's without its gates, keyed as megatron-core's GPTModel
(local spec) keys its state dict; it holds whole tensors, so both need tensor-parallel size 1.
"""
from __future__ import annotations

import torch

from ..layers import gate_parameters
from ..monitor import gated_matrices

OUTPUT_WEIGHT = "output_layer.weight"
EMBEDDING_WEIGHT = "embedding.word_embeddings.weight"


def _require_whole_tensors() -> None:
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise RuntimeError("folding gates needs whole tensors: tensor-parallel size 1 (megatron "
                           "reshards a checkpoint of any layout into it)")


def _weight_keys(model) -> dict:
    """{id(weight): its state-dict key} of every parameter of `model`."""
    return {id(param): name for name, param in model.named_parameters()}


def _plain_key(matrix, keys: dict) -> str:
    """The plain state-dict key of `matrix`'s folded weight (a tied output layer: its own)."""
    key = keys[id(matrix.weight)]
    return OUTPUT_WEIGHT if matrix.role == "output" else key


def _tensors(model) -> dict:
    """{key: tensor} of `model`'s state dict without its gates (and without empty extra
    states); the tensors share storage with the model's."""
    gates = {name for name, _ in gate_parameters(model)}
    return {key: value for key, value in model.state_dict().items()
            if isinstance(value, torch.Tensor) and key not in gates}


def fold_gates(model) -> dict:
    """The plain state dict of the gated `model` (tensor-parallel size 1): every gated matrix
    W = gate * W_bar (computed in the gate's dtype, stored in the weight's), every other tensor
    copied, the gates left out. A tied output layer gets `output_layer.weight` when its folded
    matrix differs from the word embedding's (two gates on one W_bar: two matrices)."""
    _require_whole_tensors()
    state = {key: value.detach().clone() for key, value in _tensors(model).items()}
    keys = _weight_keys(model)
    for matrix in gated_matrices(model):
        key = _plain_key(matrix, keys)
        if key not in state:  # a tied output layer
            state[key] = matrix.weight.detach().clone()
        if matrix.gate is not None:
            part = matrix.part(state[key])
            part.copy_(part.to(matrix.gate.dtype) * matrix.gate.detach())
    if model.share_embeddings_and_output_weights and torch.equal(state[OUTPUT_WEIGHT],
                                                                 state[EMBEDDING_WEIGHT]):
        del state[OUTPUT_WEIGHT]
    return state


def is_tied(state: dict) -> bool:
    """Whether the plain state dict ties the output layer to the word embedding (no matrix of
    its own)."""
    return OUTPUT_WEIGHT not in state


def unfold_into(model, state: dict, sigma: float | None = None) -> dict:
    """Set the gated `model` (tensor-parallel size 1) from the plain state dict `state`: every
    tensor copied, then each gated matrix W split into gate g and W_bar = W / g, with g = 1, or,
    with `sigma`, g = std(W) / sigma so that every W_bar has the common std. A tied model takes
    one matrix for its embedding and output layer. Returns {matrix name: gate}.

    ValueError naming missing or extra keys, or two output matrices for a tied model."""
    _require_whole_tensors()
    own, keys = _tensors(model), _weight_keys(model)
    tied = bool(model.share_embeddings_and_output_weights)
    if tied and not is_tied(state):
        raise ValueError("the model ties its output layer to the word embedding, but the given "
                         "weights have an output matrix of their own: untie the model")
    extra, missing = sorted(set(state) - set(own)), sorted(set(own) - set(state))
    if extra or missing:
        raise ValueError(f"the weights do not fit the model: missing {missing[:8]}, "
                         f"without a place {extra[:8]}")
    values = {}
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(state[key])
        for matrix in gated_matrices(model):
            if matrix.gate is None:
                if sigma is not None and tied and matrix.role == "output":
                    raise ValueError("an ungated tied output layer cannot share a rescaled W_bar")
                continue
            plain = matrix.part(state[keys[id(matrix.weight)] if tied else
                                      _plain_key(matrix, keys)])
            gate = 1.0 if sigma is None else float(plain.double().std()) / sigma
            matrix.gate.fill_(gate)
            matrix.part(matrix.weight).copy_(plain.to(matrix.gate.dtype) / matrix.gate)
            values[matrix.name] = matrix.gate.item()
    return values
