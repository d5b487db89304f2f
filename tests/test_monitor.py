"""Stability monitors: spike rules on synthetic series; update ratios and norm statistics against
dense computations (in-process, and at TP=2 with sequence parallel over a real megatron step)."""
import math
import random
from functools import lru_cache

import pytest
import torch

from megatron_wesar.init import ROLES
from megatron_wesar.layers import MatrixPart
from megatron_wesar.monitor import (
    GateTrajectory,
    MegatronRule,
    RelativeMedianRule,
    RelativeMinRule,
    SpikeTracker,
    UpdateRatioMonitor,
    ZScoreRule,
    default_rules,
)
from tests.helpers.distributed import run_distributed
from tests.helpers.oracle_harness import Case

STEPS = 2000


def smooth_loss(seed=0):
    """A decaying noisy loss curve: 2 + 6 exp(-t/300) + N(0, 0.02^2)."""
    rng = random.Random(seed)
    return [2 + 6 * math.exp(-t / 300) + rng.gauss(0, 0.02) for t in range(STEPS)]


def smooth_grad_norm(seed=1):
    """A decaying gradient norm with 5% log-normal noise."""
    rng = random.Random(seed)
    return [(1 + 0.5 * math.exp(-t / 100)) * math.exp(rng.gauss(0, 0.05)) for t in range(STEPS)]


def run_rule(rule, series):
    for step, value in enumerate(series):
        rule.update(step, value)
    return rule.spikes


RULES = [MegatronRule, ZScoreRule, RelativeMinRule, RelativeMedianRule]


# --------------------------------------------------------------------------- spike rules


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
@pytest.mark.parametrize("series", [smooth_loss, smooth_grad_norm], ids=lambda s: s.__name__)
def test_no_spike_on_smooth_series(rule, series):
    assert run_rule(rule(), series()) == []


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_grad_norm_spikes_detected_exactly_where_they_are(rule):
    series = smooth_grad_norm()
    spikes = [150, 700, 701, 1234]
    for step in spikes:
        series[step] *= 20
    assert run_rule(rule(), series) == spikes


def test_loss_spikes_below_megatron_factor():
    series = smooth_loss()
    spikes = [500, 1200, 1999]
    for step in spikes:
        series[step] *= 1.6
    assert run_rule(ZScoreRule(), series) == spikes
    assert run_rule(RelativeMinRule(), series) == spikes
    assert run_rule(MegatronRule(), series) == []  # 1.6x is far below 10x the initial max


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_no_detection_inside_window_or_warmup(rule):
    series = smooth_grad_norm()[:300]
    series[20] *= 5  # before the window / warm-up of every rule
    assert run_rule(rule(), series) == []


def test_window_and_warmup_parameters():
    series = [1.0] * 30 + [100.0]
    assert run_rule(MegatronRule(window=30), series) == [30]
    assert run_rule(MegatronRule(window=31), series) == []
    noisy = [1.0 + 0.01 * (-1) ** t for t in range(30)] + [2.0]
    assert run_rule(ZScoreRule(window=30, warmup=0), noisy) == [30]
    assert run_rule(ZScoreRule(window=30, warmup=31), noisy) == []
    assert run_rule(ZScoreRule(window=31, warmup=0), noisy) == []
    assert run_rule(RelativeMinRule(window=30), [2.0] * 29 + [1.0, 1.6]) == [30]
    assert run_rule(RelativeMinRule(window=30), [2.0] * 29 + [1.0, 1.5]) == []  # strictly above
    # the median of 15 x 1.0 and 15 x 3.0 is 2.0: 6.1 > 3 x 2.0, 6.0 is not
    median = [1.0, 3.0] * 15
    assert run_rule(RelativeMedianRule(window=30), median + [6.1]) == [30]
    assert run_rule(RelativeMedianRule(window=30), median + [6.0]) == []
    assert run_rule(RelativeMedianRule(window=31), median + [6.1]) == []


def test_relmedian_ignores_a_noisy_gradient_norm_that_relmin_flags():
    """A gradient norm that swings 2x step to step (as after a high-LR blow-up at the tiny scale)
    is not a spike; 4x its typical value is."""
    noisy = [1.0 if t % 7 else 0.4 for t in range(200)]
    noisy[150] = 4.0
    assert len(run_rule(RelativeMinRule(), noisy)) > 100
    assert run_rule(RelativeMedianRule(), noisy) == [150]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_non_finite_values_are_spikes_and_do_not_poison_history(rule):
    series = smooth_grad_norm()
    bad = {5: float("nan"), 300: float("inf"), 600: float("-inf"), 601: float("nan")}
    for step, value in bad.items():
        series[step] = value
    assert run_rule(rule(), series) == sorted(bad)


def test_rules_describe_themselves_and_tracker_keys():
    texts = [r.describe() for r in default_rules()]
    assert "10 x max of the first 100" in texts[0]
    assert "previous 64 values > 6" in texts[1]
    assert "1.5 x min of the previous 50" in texts[2]
    assert "3 x median of the previous 50" in default_rules("grad_norm")[2].describe()
    tracker = SpikeTracker()
    assert tracker.describe()[2].startswith("loss: relmin")
    assert tracker.describe()[5].startswith("grad_norm: relmedian")
    for step, (loss, norm) in enumerate(zip(smooth_loss(), smooth_grad_norm())):
        out = tracker.update(step, loss=loss, grad_norm=norm if step != 400 else float("nan"))
    assert set(out) == {f"spike/loss/{r}" for r in ("megatron", "zscore", "relmin")} | {
        f"spike/grad_norm/{r}" for r in ("megatron", "zscore", "relmedian")}
    assert tracker.update(STEPS, loss=None, grad_norm=1.0).keys() == {
        "spike/grad_norm/megatron", "spike/grad_norm/zscore", "spike/grad_norm/relmedian"}
    counts = tracker.counts()
    assert counts["spikes/grad_norm/zscore"] == 1.0 and counts["spikes/loss/zscore"] == 0.0


# --------------------------------------------------------------------------- dense helpers


def _dense_stats(matrices, roles):
    """Expected read() dict from dense {name: (role, W0, W1, g0, g1)}, computed in float64."""
    out, by_role = {}, {}
    for name, (role, w0, w1, g0, g1) in matrices.items():
        w0, w1 = w0.double(), w1.double()
        norm = (g0 * w0).norm().item()
        ratio = (g1 * w1 - g0 * w0).norm().item() / norm
        out[f"update_ratio/{name}"], out[f"weight_norm/{name}"] = ratio, norm
        by_role.setdefault(role, []).append((ratio, norm, norm / math.sqrt(w0.numel())))
    for i, stat in enumerate(("update_ratio", "weight_norm", "weight_rms")):
        means = {r: sum(v[i] for v in by_role[r]) / len(by_role[r]) for r in roles}
        out.update({f"{stat}_mean/{r}": m for r, m in means.items()})
        out[f"{stat}_spread"] = max(means.values()) / min(means.values())
    return out


def _assert_stats(actual, expected, rel):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=rel), key


class _FakeGated(torch.nn.Module):
    """A module shaped like a WeSaR layer of one matrix for the monitor: its part (role), weight
    and gate."""

    fused_layout = None

    def __init__(self, role, weight, gate, sharded):
        super().__init__()
        self.matrix_parts = (MatrixPart("", role),)
        self.weight = torch.nn.Parameter(weight)
        self.gate = None if gate is None else torch.nn.Parameter(torch.tensor([gate]))
        if sharded:
            self.weight.tensor_model_parallel, self.weight.partition_dim = True, 0

    def gates(self):
        return [] if self.gate is None else [self.gate]


FAKE = {  # name: (role, full shape, gate, sharded)
    "a": ("q", (8, 6), 0.7, True),
    "b": ("q", (4, 6), -1.3, False),
    "c": ("fc2", (6, 10), 2.0, True),
    "d": ("output", (10, 6), None, False),
}


def _fake_run(rank, tp):
    """Fake layers on TP rank `rank` of `tp`; a perturbation step; (read(), expected, calls)."""
    gen = torch.Generator().manual_seed(0)
    full0 = {n: torch.randn(s, generator=gen) for n, (_, s, _, _) in FAKE.items()}
    full1 = {n: w + 0.01 * torch.randn(w.shape, generator=gen) for n, w in full0.items()}
    model = torch.nn.ModuleDict({
        n: _FakeGated(role, full0[n].chunk(tp)[rank].clone() if sh else full0[n].clone(), g, sh)
        for n, (role, _, g, sh) in FAKE.items()
    })
    group = torch.distributed.group.WORLD if tp > 1 else None
    monitor = UpdateRatioMonitor(model, tp_group=group)
    monitor.snapshot()
    with torch.no_grad():
        for n, (_, _, g, sh) in FAKE.items():
            model[n].weight.copy_(full1[n].chunk(tp)[rank] if sh else full1[n])
            if g is not None:
                model[n].gate.mul_(1.05)
    calls = []
    real = torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        ratios = monitor.measure()
    finally:
        torch.distributed.all_reduce = real
    assert all(isinstance(r, torch.Tensor) and r.dim() == 0 for r in ratios.values())
    dense = {}
    for n, (role, _, g, _) in FAKE.items():
        g0 = torch.tensor(1.0 if g is None else g, dtype=torch.float32)
        g1 = g0 if g is None else g0 * torch.tensor(1.05, dtype=torch.float32)
        dense[n] = (role, full0[n], full1[n], g0.double(), g1.double())
    return monitor.read(), _dense_stats(dense, ["q", "fc2", "output"]), len(calls)


def test_update_ratio_single_process_matches_dense():
    actual, expected, calls = _fake_run(0, 1)
    assert calls == 0
    _assert_stats(actual, expected, rel=1e-5)


def test_measure_requires_snapshot_and_read_is_empty_before():
    layer = _FakeGated("q", torch.ones(2, 2), 1.0, False)
    monitor = UpdateRatioMonitor(torch.nn.ModuleDict({"a": layer}))
    assert monitor.read() == {}
    with pytest.raises(RuntimeError, match="snapshot"):
        monitor.measure()


# --------------------------------------------------------------------------- TP=2 on megatron

# grouped-query attention and SwiGLU: the parts of both fused weights are matrices of their own
CASE = Case(tp=2, sp=True, dtype=torch.float32, num_heads=8, num_query_groups=2, swiglu=True)


def _tp2_rank(rank, world_size, case):
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig

    from megatron_wesar.training.engine import (
        build_engine,
        initialize_parallel,
        lm_forward_step,
        train_step,
    )
    from tests.helpers.gather import gather_canonical
    from tests.helpers.oracle_harness import (
        _gpt_kwargs,
        _microbatches,
        transformer_config,
        wesar_config,
    )

    fake = _fake_run(rank, world_size)  # replicated and sharded weights on the world group
    initialize_parallel(case.tp, case.pp, case.seed)
    engine = build_engine(
        transformer_config(case), wesar_config(case), case.vocab_size, case.seq_len,
        OptimizerConfig(optimizer="adam", lr=case.lr, weight_decay=case.weight_decay),
        **_gpt_kwargs(case),
    )
    monitor = UpdateRatioMonitor(engine.model)
    gates = GateTrajectory(engine.model)
    canonical = {m.name: _canonical_matrix(engine.module, m.name) for m in monitor.matrices}
    steps = []
    for step in range(2):  # the second step reuses the snapshot buffers
        record = {}

        def before_step(engine):
            record["before"] = gather_canonical(engine.module)  # noqa: B023 - runs in this step
            monitor.snapshot()

        train_step(engine, _microbatches(case, step), case.micro_batches, case.micro_batch_size,
                   case.seq_len, forward_step_func=lm_forward_step, after_backward=before_step)
        record["after"] = gather_canonical(engine.module)
        calls = []
        real = torch.distributed.all_reduce
        torch.distributed.all_reduce = (
            lambda *a, **k: (calls.append(k.get("group")), real(*a, **k))[1])  # noqa: B023
        try:
            monitor.measure()
            record["read"] = monitor.read()
            record["gates"] = gates.record(step)
        finally:
            torch.distributed.all_reduce = real
        record["collectives"] = len(calls)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        record["group_is_tp"] = all(g is tp_group for g in calls)
        steps.append(record)
    parallel_state.destroy_model_parallel()
    return {"fake": fake, "steps": steps, "canonical": canonical,
            "roles": {m.name: m.role for m in monitor.matrices}, "trajectory": gates.values}


@lru_cache(maxsize=None)
def tp2_results():
    return run_distributed(_tp2_rank, CASE.world_size, CASE)


# the part of a fused weight (the last component of a monitor's matrix name) -> the reference's
# matrix
_PARTS = {"linear_qkv": {"q": "q", "k": "k", "v": "v"},
          "linear_fc1": {"gate": "fc1_gate", "up": "fc1_up"}}


def _canonical_matrix(module, name):
    """The reference's name of a monitor's matrix (e.g. layers.1.k, embedding, output)."""
    from tests.helpers.gather import canonical_name

    layer, _, part = name.rpartition(".")
    if layer.rpartition(".")[2] in _PARTS:
        prefix = canonical_name(module, layer + ".weight").rsplit(".", 2)[0]
        return f"{prefix}.{_PARTS[layer.rpartition('.')[2]][part]}"
    return canonical_name(module, name + ".weight").rsplit(".", 1)[0]


@pytest.mark.parallel
def test_tp2_replicated_and_sharded_weights_one_collective():
    for rank_result in tp2_results():
        actual, expected, calls = rank_result["fake"]
        assert calls == 1
        _assert_stats(actual, expected, rel=1e-5)


@pytest.mark.parallel
def test_tp2_sp_update_ratios_and_norms_match_dense_after_a_megatron_step():
    results = tp2_results()
    r0 = results[0]
    roles = r0["roles"]
    assert sorted(set(roles.values())) == sorted(ROLES)
    for step in range(2):
        for result in results:
            assert result["steps"][step]["collectives"] == 1
            assert result["steps"][step]["group_is_tp"]
        record = r0["steps"][step]
        before, after = record["before"], record["after"]
        dense = {}
        for name, canon in r0["canonical"].items():
            gate = f"{canon}.gate"
            dense[name] = (roles[name], before[f"{canon}.weight"], after[f"{canon}.weight"],
                           before[gate].double(), after[gate].double())
            assert not torch.equal(dense[name][1], dense[name][2])
        expected = _dense_stats(dense, [r for r in dict.fromkeys(roles.values())])
        _assert_stats(record["read"], expected, rel=1e-5)
        assert results[1]["steps"][step]["read"] == record["read"]  # TP ranks agree exactly
        assert record["gates"] == {f"gate/{n}": after[f"{c}.gate"].item()
                                   for n, c in r0["canonical"].items()}
    assert all(len(v) == 2 for v in r0["trajectory"].values())
