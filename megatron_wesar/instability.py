"""Small-scale instability proxies (Wortsman et al. 2023, "Small-scale proxies for large-scale
Transformer training instabilities"): the largest attention logit of every layer (attention-logit
growth) and the output log-partition log Z = logsumexp over the vocabulary of the output logits
(output-logit divergence).

`InstabilityMonitor` hooks megatron-core's local DotProductAttention modules (their inputs q and
k) and the output layer (its vocab-parallel logits) only between `enable()` and `disable()`, so
the steps that are not measured pay nothing. Keys of `read()` (the metrics JSONL contract: every
key starts with `attn_logit_max` or `output_log_z`, megatron_wesar.metric_keys):

    attn_logit_max/layer_<i>   max over heads, batch and unmasked (query, key) pairs of
                               softmax_scale * q.k in layer i (global, 0-based), over the
                               microbatches since enable()
    attn_logit_max             the max of those over the layers
    output_log_z_mean          mean over tokens of log Z (log of the softmax's normaliser)
    output_log_z_absmax        max over tokens of |log Z|

Tensor parallelism: attention heads are sharded, so the per-layer maxima are maxed over the TP
group; the vocabulary is sharded, so log Z is the logsumexp of the shards' logsumexps (two TP
all-reduces per measured microbatch, inside the hook). Data-parallel ranks see other tokens:
`read()` reduces over the DP group, and merges the pipeline stages' layers.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .coordination import gather_stage_dicts
from .metric_keys import (
    ATTN_LOGIT_MAX,
    OUTPUT_LOG_Z_ABSMAX,
    OUTPUT_LOG_Z_MEAN,
    attn_logit_layer_key,
)
from .monitor import unwrap_model

__all__ = ["attention_logit_max", "vocab_parallel_log_z", "InstabilityMonitor"]


def attention_logit_max(query: torch.Tensor, key: torch.Tensor, scale: float,
                        mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """The largest logit scale * q.k over heads, batch and the (query, key) pairs that take part
    in the softmax, as a 0-dim fp32 tensor. query [sq, b, np, hn], key [sk, b, ng, hn] (megatron's
    layout; ng divides np: grouped-query keys are repeated); `mask` True where masked
    (broadcastable to [b, np, sq, sk]), else the causal triangle when `causal`."""
    query, key = query.detach().float(), key.detach().float()
    if query.shape[2] != key.shape[2]:
        key = key.repeat_interleave(query.shape[2] // key.shape[2], dim=2)
    scores = torch.einsum("sbnh,tbnh->bnst", query, key).mul_(scale)
    if mask is None and causal:
        sq, sk = scores.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu_(sk - sq + 1)
    if mask is not None:
        scores = scores.masked_fill(mask.bool(), -math.inf)
    return scores.amax()


def vocab_parallel_log_z(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """log Z = logsumexp over the whole vocabulary of vocab-parallel `logits` [..., v / tp]:
    the logsumexp of the TP ranks' local logsumexps (one max and one sum all-reduce), in fp32,
    shaped like `logits` without its last dimension."""
    local = torch.logsumexp(logits.detach().float(), dim=-1)
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return local
    peak = local.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=tp_group)
    total = torch.exp(local - peak)
    dist.all_reduce(total, group=tp_group)
    return peak + torch.log(total)


def _groups():
    """(tp group, dp group) of megatron's parallel state, or (None, None) without it."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None, None
    return (parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_data_parallel_group())


class InstabilityMonitor:
    """The attention-logit and log Z proxies of `model` (a module, DDP-wrapped or bare, or a list
    of chunks) over the forwards between `enable()` and `disable()`; `read()` gives the keys of
    the module docstring ({} when nothing was measured)."""

    def __init__(self, model):
        from megatron.core.transformer.dot_product_attention import DotProductAttention
        from megatron.core.transformer.enums import AttnMaskType

        self._causal = AttnMaskType.causal
        self.attention, self.output_layers = [], []
        for chunk in model if isinstance(model, (list, tuple)) else [model]:
            root = unwrap_model(chunk)
            for module in root.modules():
                if isinstance(module, DotProductAttention):
                    self.attention.append(module)
            output = getattr(root, "output_layer", None)
            if output is not None and getattr(root, "post_process", True):
                self.output_layers.append(output)
        self.tp_group, self.dp_group = _groups()
        self._handles = []
        self._reset()

    def _reset(self) -> None:
        self._logit_max = {}  # global layer index -> 0-dim tensor
        self._log_z = []  # one [sq, b] tensor per microbatch

    @property
    def enabled(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._handles)

    def enable(self) -> None:
        """Install the hooks and start a new measurement."""
        if self.enabled:
            return
        self._reset()
        for module in self.attention:
            self._handles.append(module.register_forward_pre_hook(
                self._attention_hook, with_kwargs=True))
        for module in self.output_layers:
            self._handles.append(module.register_forward_hook(self._output_hook))

    def disable(self) -> None:
        """Remove the hooks (the measurement stays for `read()`)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _attention_hook(self, module, args, kwargs):
        names = ("query", "key", "value", "attention_mask", "attn_mask_type")
        inputs = dict(zip(names, args))
        inputs.update({k: v for k, v in kwargs.items() if k in names})
        mask_type = inputs.get("attn_mask_type") or module.attn_mask_type
        scale = module.softmax_scale
        if module.config.apply_query_key_layer_scaling:  # the softmax multiplies it back
            scale *= module.layer_number
        value = attention_logit_max(inputs["query"], inputs["key"], scale,
                                    inputs.get("attention_mask"), mask_type == self._causal)
        layer = module.layer_number - 1
        seen = self._logit_max.get(layer)
        self._logit_max[layer] = value if seen is None else torch.maximum(seen, value)

    def _output_hook(self, module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        self._log_z.append(vocab_parallel_log_z(logits, self.tp_group).reshape(-1))

    def read(self) -> dict:
        """The measurement since `enable()` as host floats: per-layer and overall attention-logit
        maxima, mean and max |.| of log Z. Every rank of the model must call it (it reduces over
        the TP and DP groups and gathers the pipeline stages)."""
        layers = sorted(self._logit_max)
        maxima = [self._logit_max[i] for i in layers]
        log_z = torch.cat(self._log_z) if self._log_z else torch.zeros(0)
        ones = torch.ones((), dtype=torch.float32)
        peaks = torch.stack(maxima + [log_z.abs().max() if log_z.numel() else -ones])
        sums = torch.stack([log_z.double().sum(), torch.tensor(float(log_z.numel()),
                                                               dtype=torch.float64)])
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=self.tp_group)
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=self.dp_group)
            dist.all_reduce(sums, group=self.dp_group)
        values = peaks.tolist()
        out = {attn_logit_layer_key(i): values[k] for k, i in enumerate(layers)}
        total, count = sums.tolist()
        if count:
            out[OUTPUT_LOG_Z_MEAN] = total / count
            out[OUTPUT_LOG_Z_ABSMAX] = values[-1]
        if self.tp_group is not None:
            out = gather_stage_dicts(out)
        layer_values = [v for k, v in out.items() if k.startswith(ATTN_LOGIT_MAX + "/")]
        if layer_values:
            out[ATTN_LOGIT_MAX] = max(layer_values)
        return out
