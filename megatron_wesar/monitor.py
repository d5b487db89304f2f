"""Monitors for loss-spike stability studies: spike detectors, update ratios, gate and norm stats.

Spike detectors (`MegatronRule`, `ZScoreRule`, `RelativeMinRule`, `RelativeMedianRule`) are
pure-Python, deterministic rules over a host-side scalar series (loss, gradient norm);
`SpikeTracker` runs the rules metric_keys.SPIKE_RULES names for each series. `UpdateRatioMonitor`
measures ||dW_eff|| / ||W_eff|| and ||W_eff|| of every gated matrix (W_eff = gate * W_bar) on the
training device, TP-aware, with ONE all-reduce per measurement; `GateTrajectory` records the gate
values at the steps asked for.

Every method that returns floats returns a flat dict a driver can dump as one JSONL line. Keys
(`<matrix>` is a logical matrix: the module path with global layer numbers, plus the part of a
fused weight, e.g. `decoder.layers.3.self_attention.linear_qkv.q` (.k, .v),
`decoder.layers.3.mlp.linear_fc1` (a SwiGLU one: `.gate`, `.up`), `embedding.word_embeddings`,
`output_layer`; `<role>` is one of megatron_wesar.init.ROLES present on this rank's pipeline
stage):

    SpikeTracker.update    spike/<series>/<rule>        (rules: metric_keys.SPIKE_RULES[<series>])
                                                        1.0 when the rule flags this step, else 0.0
    SpikeTracker.counts    spikes/<series>/<rule>       number of spikes flagged so far
    UpdateRatioMonitor.read
                           update_ratio/<matrix>        ||W_eff(after) - W_eff(before)||
                                                        / ||W_eff(before)||
                           update_ratio_mean/<role>     mean of update_ratio over the role
                           update_ratio_spread          max / min over roles of update_ratio_mean
                           weight_norm/<matrix>         ||W_eff(before)|| (Frobenius, whole matrix)
                           weight_norm_mean/<role>      mean of weight_norm over the role's matrices
                           weight_norm_spread           max / min over roles of weight_norm_mean
                           weight_rms_mean/<role>       mean of ||W_eff|| / sqrt(numel) (the std)
                           weight_rms_spread            max / min over roles of weight_rms_mean
    GateTrajectory.record  gate/<matrix>                the gate value (only gated matrices)

Norms are reduced over the tensor-parallel group on the device; with pipeline parallelism
`UpdateRatioMonitor.read` merges the stages' matrices on the host, so the per-role statistics
cover the whole model.
"""
from __future__ import annotations

import math
import re
import statistics
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

from .init import ROLES
from .metric_keys import (
    GATE_PREFIX,
    SPIKE_RULES,
    SPIKE_SERIES,
    UPDATE_RATIO,
    WEIGHT_NORM,
    WEIGHT_RMS,
    matrix_key,
    role_mean_key,
    spike_count_key,
    spike_flag_key,
    spread_key,
)

__all__ = [
    "SpikeRule",
    "MegatronRule",
    "ZScoreRule",
    "RelativeRule",
    "RelativeMinRule",
    "RelativeMedianRule",
    "default_rules",
    "SpikeTracker",
    "gated_matrices",
    "UpdateRatioMonitor",
    "GateTrajectory",
]


# --------------------------------------------------------------------------- spike detectors


class SpikeRule:
    """A stateful spike rule over one scalar series: feed it with `update(step, value)`.

    Windows count observations (one per `update` call; equal to steps when fed every step).
    Non-finite values are always spikes (even inside a window or warm-up) and never enter the
    rule's history. `spikes` lists the flagged steps in order.
    """

    name = "rule"

    def __init__(self):
        self.spikes: list[int] = []
        self.count = 0  # observations seen so far, finite or not

    def update(self, step: int, value: float) -> bool:
        """Observe `value` at `step`; return True (and record the step) when it is a spike."""
        value = float(value)
        if math.isfinite(value):
            spike = self._check(value)
            self._observe(value)
        else:
            spike = True
        self.count += 1
        if spike:
            self.spikes.append(step)
        return spike

    def describe(self) -> str:
        """The rule in words, with its parameters."""
        raise NotImplementedError

    def _check(self, value: float) -> bool:
        raise NotImplementedError

    def _observe(self, value: float) -> None:
        raise NotImplementedError


class MegatronRule(SpikeRule):
    """Spike when value >= factor x the largest value of the first `window` observations
    (no detection inside the window). Meant for positive series (loss, gradient norm)."""

    name = "megatron"

    def __init__(self, window: int = 100, factor: float = 10.0):
        super().__init__()
        self.window, self.factor = window, factor
        self.reference = -math.inf

    def describe(self) -> str:
        return (f"{self.name}: value >= {self.factor:g} x max of the first {self.window} values "
                "(no detection before); non-finite values are spikes")

    def _check(self, value):
        return self.count >= self.window and value >= self.factor * self.reference

    def _observe(self, value):
        if self.count < self.window:
            self.reference = max(self.reference, value)


class ZScoreRule(SpikeRule):
    """Spike when (value - mean) / std > threshold over the previous `window` finite values
    (population std), once `warmup` observations are seen and the window is full. A zero std
    flags any value above the mean."""

    name = "zscore"

    def __init__(self, window: int = 64, threshold: float = 6.0, warmup: int = 100):
        super().__init__()
        self.window, self.threshold, self.warmup = window, threshold, warmup
        self.history: deque = deque(maxlen=window)

    def describe(self) -> str:
        return (f"{self.name}: z-score over the previous {self.window} values > "
                f"{self.threshold:g}, after {self.warmup} warm-up values and a full window; "
                "non-finite values are spikes")

    def _check(self, value):
        if self.count < self.warmup or len(self.history) < self.window:
            return False
        mean = math.fsum(self.history) / len(self.history)
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in self.history) / len(self.history))
        if std == 0.0:
            return value > mean
        return (value - mean) / std > self.threshold

    def _observe(self, value):
        self.history.append(value)


class RelativeRule(SpikeRule):
    """Spike when value > factor x a reference statistic (`statistic`, named `reference`) of the
    previous `window` finite values, once the window is full (and `warmup` observations are
    seen)."""

    reference = ""

    def __init__(self, window: int = 50, factor: float = 1.5, warmup: int = 0):
        super().__init__()
        self.window, self.factor, self.warmup = window, factor, warmup
        self.history: deque = deque(maxlen=window)

    def describe(self) -> str:
        return (f"{self.name}: value > {self.factor:g} x {self.reference} of the previous "
                f"{self.window} values, once the window is full (warm-up {self.warmup}); "
                "non-finite values are spikes")

    def statistic(self, values) -> float:
        """The reference statistic of the window."""
        raise NotImplementedError

    def _check(self, value):
        if self.count < self.warmup or len(self.history) < self.window:
            return False
        return value > self.factor * self.statistic(self.history)

    def _observe(self, value):
        self.history.append(value)


class RelativeMinRule(RelativeRule):
    """Spike when value > factor x the minimum of the previous `window` finite values: for the
    loss, whose running minimum is where training got to."""

    name, reference = "relmin", "min"

    def statistic(self, values) -> float:
        return min(values)


class RelativeMedianRule(RelativeRule):
    """Spike when value > factor x the median of the previous `window` finite values: for the
    gradient norm, whose running minimum is an outlier of a noisy series (at the tiny scale the
    relmin rule flagged 13-44% of all gradient-norm steps, docs/tiny-scale-findings.md)."""

    name, reference = "relmedian", "median"

    def __init__(self, window: int = 50, factor: float = 3.0, warmup: int = 0):
        super().__init__(window, factor, warmup)

    def statistic(self, values) -> float:
        return statistics.median(values)


_RULES = {rule.name: rule for rule in (MegatronRule, ZScoreRule, RelativeMinRule,
                                       RelativeMedianRule)}


def default_rules(series: str = "loss") -> list[SpikeRule]:
    """Fresh instances of the rules SPIKE_RULES names for `series`, with default parameters."""
    return [_RULES[name]() for name in SPIKE_RULES[series]]


class SpikeTracker:
    """Runs its own copy of the rules (`rules(series)`, default: `default_rules`) on each named
    series."""

    def __init__(self, series=SPIKE_SERIES, rules=default_rules):
        self.rules = {name: rules(name) for name in series}

    def update(self, step: int, **values) -> dict:
        """Feed the series given by keyword (None skips one); {spike/<series>/<rule>: 0.0|1.0}."""
        out = {}
        for series, value in values.items():
            if value is None:
                continue
            for rule in self.rules[series]:
                out[spike_flag_key(series, rule.name)] = float(rule.update(step, value))
        return out

    def counts(self) -> dict:
        """{spikes/<series>/<rule>: number of spikes so far}."""
        return {spike_count_key(s, r.name): float(len(r.spikes))
                for s, rules in self.rules.items() for r in rules}

    def describe(self) -> list[str]:
        """The rules in words, per series: "<series>: <rule text>"."""
        return [f"{series}: {r.describe()}" for series, rules in self.rules.items()
                for r in rules]


# --------------------------------------------------------------------------- gated matrices


@dataclass
class Matrix:
    """One logical matrix of a rank: its name, role, the W_bar shard it lives in, its gate (None:
    ungated, 1) and, for a part of a fused weight, `rows` (the part's rows of that shard)."""

    name: str
    role: str
    weight: torch.nn.Parameter
    gate: torch.nn.Parameter | None
    sharded: bool
    rows: Callable[[torch.Tensor], torch.Tensor] | None = None

    def part(self, weight: torch.Tensor) -> torch.Tensor:
        """This matrix's rows of `weight` (the shard, or a copy of it)."""
        return weight if self.rows is None else self.rows(weight)


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def unwrap_model(model):
    """The bare module inside DDP / Float16Module wrappers (`.module` chains)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def gated_matrices(model) -> list[Matrix]:
    """The logical matrices of `model` (a module, DDP-wrapped or bare, or a list of chunks) built
    by the WeSaR layers (every module with `matrix_parts`; ungated ones in baselines count with
    gate 1). A fused weight gives one matrix per part, named `<module>.<part>` (linear_qkv.q,
    .k, .v; a SwiGLU linear_fc1.gate, .up), each with its own gate and rows.

    A tied output layer without its own weight uses the shared word-embedding W_bar with its own
    gate. The order is deterministic and the same on every TP rank.
    """
    chunks = model if isinstance(model, (list, tuple)) else [model]
    out = []
    for chunk in chunks:
        root = unwrap_model(chunk)
        layers = getattr(getattr(root, "decoder", None), "layers", [])
        global_index = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(layers)}
        for name, module in root.named_modules():
            parts = getattr(module, "matrix_parts", None)
            if parts is None:
                continue
            weight = getattr(module, "weight", None)
            if weight is None:
                weight = root.shared_embedding_or_output_weight()
            name = _LAYER.sub(lambda m: f"decoder.layers.{global_index[m.group(1)]}.",  # noqa: B023
                              name)
            sharded = bool(getattr(weight, "tensor_model_parallel", False))
            gates = module.gates() or [None] * len(parts)
            layout = module.fused_layout
            for i, (part, gate) in enumerate(zip(parts, gates)):
                rows = None if layout is None else partial(layout.rows, index=i)
                out.append(Matrix(f"{name}.{part.name}" if part.name else name, part.role,
                                  weight, gate, sharded, rows))
    return out


def _default_pp_group():
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_pipeline_model_parallel_group()
    return None


def _default_tp_group():
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


class UpdateRatioMonitor:
    """Update ratios ||dW_eff|| / ||W_eff|| and norms ||W_eff|| of every gated matrix, TP-aware.

    Call `snapshot()` before the optimizer step (e.g. as train_step's `after_backward` hook) and
    `measure()` after it, on the steps to be measured only (other steps cost nothing). The
    snapshot keeps one copy of this rank's W_bar shards (param dtype) and the gate values. Norms
    of TP-sharded weights are sums of squares over the TP group (`tp_group`; default: megatron's,
    none when model parallelism is not initialised); replicated weights count once. All matrices
    share ONE all-reduce per `measure()`. Nothing is read back to the host before `read()`.
    With the distributed optimizer's overlapped parameter all-gather, the updated weights only
    exist after the next forward's gather: measure then, or disable the overlap.
    """

    def __init__(self, model, tp_group=None):
        self.matrices = gated_matrices(model)
        self.tp_group = tp_group if tp_group is not None else _default_tp_group()
        self.tp_size = dist.get_world_size(self.tp_group) if self.tp_group is not None else 1
        tp_rank = dist.get_rank(self.tp_group) if self.tp_group is not None else 0
        any64 = any(m.weight.dtype == torch.float64 for m in self.matrices)
        self.dtype = torch.float64 if any64 else torch.float32
        self.device = self.matrices[0].weight.device if self.matrices else torch.device("cpu")
        # replicated weights contribute from TP rank 0 only
        keep = [1.0 if (m.sharded or tp_rank == 0) else 0.0 for m in self.matrices]
        self._keep = torch.tensor(keep * 2, dtype=self.dtype, device=self.device)
        numel = [m.part(m.weight).numel() * (self.tp_size if m.sharded else 1)
                 for m in self.matrices]
        self._numel = torch.tensor(numel, dtype=self.dtype, device=self.device)
        self.pp_group = _default_pp_group()
        self._w0: dict[int, torch.Tensor] = {}
        self._g0: torch.Tensor | None = None
        self._last: torch.Tensor | None = None

    def _gates(self) -> torch.Tensor:
        one = torch.ones(1, dtype=self.dtype, device=self.device)
        return torch.cat([one if m.gate is None else m.gate.detach().reshape(1).to(self.dtype)
                          for m in self.matrices])

    def snapshot(self) -> None:
        """Copy W_bar of every matrix (shared weights once) and the gates; no host sync."""
        for m in self.matrices:
            key = id(m.weight)
            if key in self._w0:
                self._w0[key].copy_(m.weight.detach())
            else:
                self._w0[key] = m.weight.detach().clone()
        self._g0 = self._gates()

    def release(self) -> None:
        """Free the snapshot buffers."""
        self._w0, self._g0 = {}, None

    def measure(self) -> dict:
        """{matrix name: update ratio (0-dim device tensor)} since the last `snapshot()`.

        Also computes the norm and per-role statistics kept for `read()`.
        """
        if self._g0 is None:
            raise RuntimeError("UpdateRatioMonitor.measure() needs a snapshot() before the step")
        if not self.matrices:
            return {}
        g0, g1 = self._g0, self._gates()
        delta_sq, weight_sq = [], []
        for i, m in enumerate(self.matrices):
            w0 = m.part(self._w0[id(m.weight)])
            # g1*W1 - g0*W0 = g1*(W1 - W0) + (g1 - g0)*W0: W1 - W0 is exact for nearby values
            delta = torch.sub(m.part(m.weight.detach()), w0).to(self.dtype)
            if m.gate is not None:
                delta.mul_(g1[i]).addcmul_(w0, g1[i] - g0[i])
            delta_sq.append(torch.linalg.vector_norm(delta, dtype=self.dtype).square())
            w0_norm = torch.linalg.vector_norm(w0, dtype=self.dtype)
            weight_sq.append((w0_norm * g0[i]).square())
        sums = torch.stack(delta_sq + weight_sq) * self._keep
        if self.tp_size > 1:
            dist.all_reduce(sums, group=self.tp_group)
        delta_sq, weight_sq = sums.chunk(2)
        norms = weight_sq.sqrt()
        ratios = delta_sq.sqrt() / norms
        self._last = torch.cat([ratios, norms])
        return {m.name: ratios[i] for i, m in enumerate(self.matrices)}

    def read(self) -> dict:
        """The last measurement as host floats (one device-to-host copy); {} before any.

        With pipeline parallelism every stage must call it: the stages' matrices are merged
        (one object all-gather over the pipeline group) so the per-role statistics cover the
        whole model.
        """
        if self._last is None:
            return {}
        n = len(self.matrices)
        values = self._last.tolist()
        rows = [(m.name, m.role, values[i], values[n + i], int(self._numel[i]))
                for i, m in enumerate(self.matrices)]
        if self.pp_group is not None and dist.get_world_size(self.pp_group) > 1:
            stages = [None] * dist.get_world_size(self.pp_group)
            dist.all_gather_object(stages, rows, group=self.pp_group)
            rows = [row for stage in stages for row in stage]
        return matrix_statistics(rows)


def matrix_statistics(rows) -> dict:
    """The read() keys from rows (name, role, update ratio, ||W_eff||, numel) of all matrices."""
    out = {matrix_key(UPDATE_RATIO, name): ratio for name, _, ratio, _, _ in rows}
    out.update({matrix_key(WEIGHT_NORM, name): norm for name, _, _, norm, _ in rows})
    roles = [r for r in ROLES if any(row[1] == r for row in rows)]
    for stat, value_of in (
        (UPDATE_RATIO, lambda row: row[2]),
        (WEIGHT_NORM, lambda row: row[3]),
        (WEIGHT_RMS, lambda row: row[3] / math.sqrt(row[4])),
    ):
        means = {}
        for role in roles:
            values = [value_of(row) for row in rows if row[1] == role]
            means[role] = sum(values) / len(values)
            out[role_mean_key(stat, role)] = means[role]
        if means:
            low, high = min(means.values()), max(means.values())
            out[spread_key(stat)] = high / low if low > 0 else math.inf
    return out


class GateTrajectory:
    """Host-side record of every gate's value at the steps it is asked for.

    `steps` lists the recorded steps and `values[name]` the gate's values at them.
    """

    def __init__(self, model):
        self.gates = [(m.name, m.gate) for m in gated_matrices(model) if m.gate is not None]
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {name: [] for name, _ in self.gates}

    def current(self) -> dict:
        """{matrix: gate value} now (one device-to-host copy), recording nothing."""
        if not self.gates:
            return {}
        values = torch.cat([g.detach().reshape(1).double() for _, g in self.gates]).tolist()
        return {name: value for (name, _), value in zip(self.gates, values)}

    def record(self, step: int) -> dict:
        """Read all gates (one device-to-host copy), append them; {gate/<matrix>: value}."""
        values = self.current()
        if not values:
            return {}
        self.steps.append(step)
        for name, value in values.items():
            self.values[name].append(value)
        return {f"{GATE_PREFIX}{name}": value for name, value in values.items()}
