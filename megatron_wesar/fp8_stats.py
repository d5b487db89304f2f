"""FP8 statistics of the weights on the torch-native FP8 path: how each logical matrix's W_bar
quantizes in the e4m3 GEMM that uses it (megatron_wesar.fp8).

Per logical matrix (monitor.gated_matrices: a fused weight's parts separately; a baseline's
ungated matrices too, W_eff = W): the amax of its W_bar, the dequantization scale its GEMM
quantizes it with (the amax of its layer's whole weight, TP-maxed, over the format's largest
value; a fused layer's parts share it), and the relative quantization error of W_eff,
||W_eff - alpha * deq(q(W_bar))|| / ||W_eff||. The gate alpha is an exact per-matrix factor, so
that error is W_bar's own; WeSaR quantizes one uniform W_bar where a baseline quantizes W.

`fp8_role_statistics` gives the metrics keys <stat>_mean/<role> (metric_keys.FP8_*,
role_mean_key): the mean over the role's matrices of each statistic, over the whole model
(pipeline stages merged). Only per-role keys go to the metrics file: per matrix that would be
3 x 7 keys per layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import groupby

import torch
import torch.distributed as dist

from .coordination import gather_stage_dicts
from .fp8 import amaxes, group_size, quantize
from .init import ROLES
from .metric_keys import FP8_QUANT_REL_ERROR, FP8_WEIGHT_AMAX, FP8_WEIGHT_SCALE, role_mean_key
from .monitor import gated_matrices


@dataclass(frozen=True)
class QuantStats:
    """FP8 statistics of one logical matrix: the amax of its W_bar, the dequantization scale of
    its GEMM and the relative quantization error of W_eff."""

    role: str
    amax: float
    scale: float
    rel_error: float


def fp8_matrices(model) -> list:
    """[(matrix, layer)]: the logical matrices (monitor.Matrix) of `model` whose layer runs in
    torch-native FP8, in gated_matrices' order."""
    layers = {}
    for chunk in (model if isinstance(model, (list, tuple)) else [model]):
        for module in chunk.modules():
            if getattr(module, "fp8_recipe", None) is not None:
                layers[id(module.weight)] = module
    return [(m, layers[id(m.weight)]) for m in gated_matrices(model) if id(m.weight) in layers]


def matrix_stats(model) -> dict:
    """{matrix name: QuantStats} of this rank's FP8 matrices (this pipeline stage), each over
    the whole logical matrix: two collectives over the layers' TP group (one MAX, one SUM), so
    call it on every rank of the group."""
    pairs = fp8_matrices(model)
    if not pairs:
        return {}
    group = pairs[0][1].tp_group
    by_layer = []  # (layer, its matrices): a layer's parts are consecutive in pairs
    for _, run in groupby(pairs, key=lambda pair: id(pair[1])):
        run = list(run)
        by_layer.append((run[0][1], [m for m, _ in run]))
    with torch.no_grad():
        maxima = amaxes([layer.weight for layer, _ in by_layer] + [m.part(m.weight)
                                                                   for m, _ in pairs], group)
        scales, squares = [], []
        for (layer, matrices), amax in zip(by_layer, maxima):
            q, d = quantize(layer.weight, amax, layer.fp8_recipe.forward_dtype)
            weight = layer.weight.float()
            error = q.float() * d - weight
            scales += [float(d)] * len(matrices)
            for m in matrices:
                squares += [m.part(error).square().sum(dtype=torch.float64),
                            m.part(weight).square().sum(dtype=torch.float64)]
        sums = torch.stack(squares)
        if group_size(group) > 1:
            dist.all_reduce(sums, group=group)
    part_amax = maxima[len(by_layer):].tolist()
    sums = sums.tolist()
    return {m.name: QuantStats(m.role, part_amax[i], scales[i],
                               math.sqrt(sums[2 * i] / sums[2 * i + 1]) if sums[2 * i + 1] else 0.0)
            for i, (m, _) in enumerate(pairs)}

def role_means(stats: dict) -> dict:
    """{<stat>_mean/<role>: mean over the role's matrices} of matrix_stats' values (stat:
    fp8_weight_amax, fp8_weight_scale, fp8_quant_rel_error), in ROLES order."""
    out = {}
    for role in ROLES:
        rows = [s for s in stats.values() if s.role == role]
        if not rows:
            continue
        for stat, attribute in ((FP8_WEIGHT_AMAX, "amax"), (FP8_WEIGHT_SCALE, "scale"),
                                (FP8_QUANT_REL_ERROR, "rel_error")):
            out[role_mean_key(stat, role)] = (math.fsum(getattr(s, attribute) for s in rows)
                                              / len(rows))
    return out


def fp8_role_statistics(model) -> dict:
    """role_means of the whole model's FP8 matrices (the pipeline stages' matrix_stats merged by
    one object all-gather), or {} when no layer runs in FP8; every rank gets them. Collective:
    call it on every rank."""
    stats = matrix_stats(model)
    if not stats:
        return {}
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        stats = gather_stage_dicts(stats)
    return role_means(stats)
