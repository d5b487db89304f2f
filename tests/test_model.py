"""The WeSaR GPT model: init statistics, gate gradients vs finite differences, checkpoint
entries of the gates, and clear errors for bad input."""
import math
from dataclasses import replace
from unittest import mock

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.gather import gather_canonical
from tests.helpers.oracle_harness import Case, build_case_model

ROLE_OF = {"qkv": "qkv", "proj": "attn_proj", "fc1": "fc1", "fc2": "fc2"}
PAPER_SIGMA = math.sqrt(4e-5)
# d = 256, N = 2 layers, d_ff = 1024: the backbones' stds written out by hand (residual-output
# matrices carry 1 / sqrt(2N) = 1/2). He's word embedding is WeSaR's sigma itself.
D, N, D_FF = 256, 2, 1024
SMALL = math.sqrt(2 / (5 * D))
BACKBONE_STD = {
    "he": lambda sigma: {"qkv": math.sqrt(1 / D), "attn_proj": math.sqrt(1 / D) / 2,
                         "fc1": math.sqrt(1 / D), "fc2": math.sqrt(2 / D_FF) / 2,
                         "embedding": sigma, "output": math.sqrt(1 / D)},
    "small": lambda sigma: {"qkv": SMALL, "attn_proj": SMALL / 2, "fc1": SMALL, "fc2": SMALL / 2,
                            "embedding": SMALL, "output": SMALL},
    "megatron": lambda sigma: {"qkv": 0.02, "attn_proj": 0.01, "fc1": 0.02, "fc2": 0.01,
                               "embedding": 0.02, "output": 0.02},
}
STATS_CASE = Case(
    num_layers=N, hidden_size=D, num_heads=4, ffn_hidden_size=D_FF, vocab_size=512, seq_len=8
)


def _initial_state(rank, world_size, cases):
    """The gathered initial state dict of each case's model."""
    from megatron.core import parallel_state

    out = []
    for case in cases:
        out.append(gather_canonical(build_case_model(case)))
        parallel_state.destroy_model_parallel()
    return out


def _role_weights(sd: dict, tied: bool) -> dict:
    """role -> list of (weight, gate or None) of the gathered state dict."""
    rows = {role: [] for role in ("qkv", "attn_proj", "fc1", "fc2", "embedding", "output")}
    for i in range(N):
        for name, role in ROLE_OF.items():
            parts = "qkv" if name == "qkv" else [name]
            weight = torch.cat([sd[f"layers.{i}.{p}.weight"] for p in parts])
            rows[role].append((weight, sd.get(f"layers.{i}.{name}.gate")))
    rows["embedding"].append((sd["embedding.weight"], sd.get("embedding.gate")))
    output = sd["embedding.weight"] if tied else sd["output.weight"]
    rows["output"].append((output, sd.get("output.gate")))
    return rows


def _expected_gate(case: Case, role: str, sigma: float) -> float | None:
    """alpha_0 = backbone std / std of the W_bar it multiplies (None: not gated)."""
    stds = BACKBONE_STD[case.backbone](sigma)
    gated = {"embedding": case.gate_embedding, "output": case.gate_output_layer}.get(role, True)
    if not (case.enabled and gated):
        return None
    owner = "embedding" if role == "output" and case.tied else role
    owner_gated = {"embedding": case.gate_embedding}.get(owner, True)
    return stds[role] / (sigma if owner_gated else stds[owner])


GATE_REL = {torch.float64: 1e-12, torch.float32: 1e-7}  # one rounding of the gate's dtype


def _check_initial_state(case: Case, sd: dict, sigma: float) -> None:
    """Gates equal the hand-computed alpha_0 (to one rounding of their dtype); W_bar has std
    sigma when gated, the backbone std otherwise (2%); biases 0; norms gamma 1, beta 0; learned
    positions at the backbone's embedding std."""
    stds = BACKBONE_STD[case.backbone](sigma)
    for role, rows in _role_weights(sd, case.tied).items():
        owner = "embedding" if role == "output" and case.tied else role
        owner_gated = case.enabled and {"embedding": case.gate_embedding}.get(owner, True)
        want_std = sigma if owner_gated else stds[owner]
        want_gate = _expected_gate(case, role, sigma)
        for weight, gate in rows:
            assert abs(weight.std().item() / want_std - 1) < 0.02, (case, role, weight.std())
            if want_gate is None:
                assert gate is None, (case, role)
            else:
                assert gate.dtype == case.dtype, (role, gate.dtype)
                assert math.isclose(gate.item(), want_gate, rel_tol=GATE_REL[case.dtype]), (
                    case, role, gate.item(), want_gate)
    for key, value in sd.items():
        if key.endswith(".bias"):
            assert torch.all(value == 0), key
        elif key.endswith(("ln1.weight", "ln2.weight", "final_norm.weight")):
            assert torch.all(value == 1), key
    assert abs(sd["position.weight"].std().item() / stds["embedding"] - 1) < 0.05


GATED = (("he", False, True), ("small", True, True), ("megatron", False, True),
         ("small", True, False))  # (backbone, tied, gate_embedding)
INIT_CASES = [
    replace(STATS_CASE, tp=2, backbone=backbone, tied=tied, gate_embedding=gate_embedding,
            sigma=sigma)
    for sigma in (None, 1e-3) for backbone, tied, gate_embedding in GATED
] + [replace(STATS_CASE, tp=2, backbone=backbone, tied=tied, enabled=False)
     for backbone, tied, _ in GATED[:3]]


@pytest.mark.parallel
def test_initial_gates_and_stds_match_the_hand_computed_tables():
    results = run_distributed(_initial_state, 2, INIT_CASES)[0]
    for case, sd in zip(INIT_CASES, results):
        _check_initial_state(case, sd, PAPER_SIGMA if case.sigma is None else case.sigma)


def test_initial_gate_table_literals():
    """Spot values of the tables above, in digits: He at the paper's sigma, d = 256."""
    he = Case(backbone="he")
    assert _expected_gate(he, "qkv", PAPER_SIGMA) == pytest.approx(9.882117688, rel=1e-9)
    assert _expected_gate(he, "fc2", PAPER_SIGMA) == pytest.approx(3.493856214, rel=1e-9)
    assert _expected_gate(he, "embedding", 1e-3) == 1.0
    tied_small = Case(backbone="small", tied=True, gate_embedding=False)
    assert _expected_gate(tied_small, "output", 1e-3) == 1.0


def _loss_and_gate_grads(rank, world_size, case, perturbations, rel_step=1e-5):
    """Loss of one batch, autograd gate grads, and losses at gate +/- h (central differences)."""
    from megatron.core import parallel_state

    from megatron_wesar.grads import reduce_gate_grads
    from megatron_wesar.layers import gate_parameters

    model = build_case_model(case)  # float64 with gathered logits
    tokens = case.global_batch(0)[: case.micro_batch_size]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(case.seq_len).unsqueeze(0).expand_as(inputs)

    def loss():
        logits = model(inputs, positions, None)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 labels.reshape(-1))

    loss().backward()
    reduce_gate_grads([model])  # sums the TP partial-sum gate gradients
    gates = gate_parameters(model)
    grads = {name: g.grad.item() for name, g in gates}
    fd = {}
    with torch.no_grad():
        for name, gate in gates[:perturbations]:
            h = rel_step * abs(gate.item())
            gate += h
            plus = loss().item()
            gate -= 2 * h
            minus = loss().item()
            gate += h
            fd[name] = (plus - minus) / (2 * h)
    parallel_state.destroy_model_parallel()
    return grads, fd


@pytest.mark.parametrize(
    "case",
    [Case(num_layers=2), Case(tp=2, sp=True, tied=True, swiglu=True, rope=True)],
    ids=["tp1", "tp2-sp-tied-swiglu-rope"],
)
@pytest.mark.parallel
def test_gate_gradients_match_central_finite_differences(case):
    grads, fd = run_distributed(_loss_and_gate_grads, case.world_size, case, 100)[0]
    assert len(fd) == 4 * case.num_layers + 2
    for name, numeric in fd.items():
        assert math.isclose(grads[name], numeric, rel_tol=1e-6, abs_tol=1e-10), (
            name, grads[name], numeric
        )


def _gate_checkpoint_entries(rank, world_size, case):
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    model = build_case_model(case)
    plain = [k for k in model.state_dict() if k.endswith(".gate")]
    sharded = model.sharded_state_dict()
    entries = {}
    for key, value in sharded.items():
        if key.endswith(".gate"):
            assert isinstance(value, ShardedTensor)
            entries[key] = (tuple(value.global_shape), value.replica_id)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    parallel_state.destroy_model_parallel()
    return plain, entries, tp_rank


@pytest.mark.parallel
def test_gates_are_replicated_entries_of_both_state_dicts():
    case = Case(tp=2, tied=True)
    for plain, entries, tp_rank in run_distributed(_gate_checkpoint_entries, 2, case):
        assert len(plain) == 4 * case.num_layers + 2
        assert set(plain) <= set(entries), set(plain) - set(entries)
        for key, (global_shape, replica_id) in entries.items():
            assert global_shape[-1] == 1, key
            assert replica_id[1] == tp_rank, (key, replica_id)  # replicated over TP


def _non_finite_gate(rank, world_size, case):
    from megatron.core import parallel_state

    from megatron_wesar.layers import NonFiniteGateError

    model = build_case_model(case)
    with torch.no_grad():
        model.decoder.layers[1].mlp.linear_fc2.gate.fill_(float("nan"))
    tokens = case.global_batch(0)[:1]
    positions = torch.arange(case.seq_len).unsqueeze(0)
    try:
        model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
    except NonFiniteGateError as err:
        message = str(err)
    else:
        message = None
    parallel_state.destroy_model_parallel()
    return message


@pytest.mark.parallel
def test_non_finite_gate_raises_naming_the_gate():
    message = run_distributed(_non_finite_gate, 1, Case())[0]
    assert message is not None
    assert "decoder.layers.1.mlp.linear_fc2.gate=nan" in message


def test_parallel_shape_errors():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_wesar.spec import validate_parallel_shapes

    def config(**kw):
        base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64)
        return TransformerConfig(**{**base, **kw})

    with pytest.raises(ValueError, match="hidden_size=30 is not divisible"):
        validate_parallel_shapes(
            config(hidden_size=30, kv_channels=8, tensor_model_parallel_size=4), tp_size=4
        )
    with pytest.raises(ValueError, match="num_attention_heads"):
        config(num_attention_heads=3, kv_channels=8, tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="ffn_hidden_size=66 is not divisible"):
        validate_parallel_shapes(config(ffn_hidden_size=66, tensor_model_parallel_size=4),
                                 tp_size=4)
    with pytest.raises(ValueError, match="tensor-parallel group has 2 ranks"):
        validate_parallel_shapes(config(), tp_size=2)
    with pytest.raises(ValueError, match="vocab_size=63 is not divisible"):
        validate_parallel_shapes(config(tensor_model_parallel_size=2), tp_size=2, vocab_size=63)


class _Built(Exception):
    """Stops `pretrain` right after it built its engine."""


def _driver_initial_states(rank, world_size, argvs):
    """The gathered initial state of the model `pretrain` builds from each argv (stopped before
    the first step)."""
    from megatron.core import parallel_state

    import megatron_wesar.training.pretrain as driver
    from megatron_wesar.training.arguments import parse_pretrain_args

    real_build = driver.build_engine
    states = []

    def build_and_stop(*args, **kwargs):
        states.append(gather_canonical(real_build(*args, **kwargs).module))
        raise _Built

    with mock.patch.object(driver, "build_engine", build_and_stop):
        for argv in argvs:
            try:
                driver.pretrain(parse_pretrain_args(argv), log=lambda line: None)
            except _Built:
                parallel_state.destroy_model_parallel()
    return states


DRIVER_SHAPE = ["--num-layers", str(N), "--hidden-size", str(D), "--ffn-hidden-size", str(D_FF),
                "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "1",
                "--global-batch-size", "1", "--tensor-model-parallel-size", "2"]


DRIVER_CASE = replace(STATS_CASE, dtype=torch.float32)  # the driver trains in fp32 (or bf16)
DRIVER_FLAGS = {  # flags -> the case whose hand-computed table the built model must match
    "defaults": ([], replace(DRIVER_CASE, tied=True)),
    "sigma1e-3-small-untied": (
        ["--wesar-sigma", "1e-3", "--init-method", "small",
         "--untie-embeddings-and-output-weights"],
        replace(DRIVER_CASE, backbone="small", sigma=1e-3)),
    "megatron-no-embedding-gate": (
        ["--init-method", "megatron", "--wesar-no-embedding-gate"],
        replace(DRIVER_CASE, backbone="megatron", tied=True, gate_embedding=False)),
    "baseline-he": (["--no-wesar", "--init-method", "he"],
                    replace(DRIVER_CASE, enabled=False, tied=True)),
}


@pytest.mark.parallel
def test_driver_flags_reach_the_built_model():
    argvs = [DRIVER_SHAPE + flags for flags, _ in DRIVER_FLAGS.values()]
    states = run_distributed(_driver_initial_states, 2, argvs)[0]
    assert len(states) == len(DRIVER_FLAGS)
    for (_, case), sd in zip(DRIVER_FLAGS.values(), states):
        _check_initial_state(case, sd, PAPER_SIGMA if case.sigma is None else case.sigma)


def _initial_weights(rank, world_size, case):
    from megatron.core import parallel_state

    model = build_case_model(case)
    weights = gather_canonical(model)
    parallel_state.destroy_model_parallel()
    return weights


@pytest.mark.parallel
def test_initial_weights_do_not_depend_on_the_parallel_layout():
    base = Case(num_layers=4, tied=False, swiglu=True)
    single = run_distributed(_initial_weights, 1, base)[0]
    for layout in (dict(tp=2, pp=2), dict(pp=4)):
        other = run_distributed(_initial_weights, 4, replace(base, **layout))[0]
        assert other.keys() == single.keys()
        for key, value in single.items():
            assert torch.equal(other[key], value), (layout, key)
