"""The WeSaR GPT model: init statistics, gate gradients vs finite differences, checkpoint
entries of the gates, and clear errors for bad input."""
import math
from dataclasses import replace
from functools import lru_cache
from unittest import mock

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.gather import gather_canonical
from tests.helpers.oracle_harness import Case, build_case_model

# the reference's (canonical) matrices of a layer -> their roles
ROLE_OF = {"q": "q", "k": "k", "v": "v", "proj": "attn_proj", "fc1": "fc1",
           "fc1_gate": "fc1_gate", "fc1_up": "fc1", "fc2": "fc2"}
PAPER_SIGMA = math.sqrt(4e-5)
# d = 256, N = 2 layers, d_ff = 1024: the backbones' stds written out by hand (residual-output
# matrices carry 1 / sqrt(2N) = 1/2). He's word embedding has the paper's sigma, whatever
# WeSaR's sigma is.
D, N, D_FF = 256, 2, 1024
SMALL = math.sqrt(2 / (5 * D))
BACKBONE_STD = {
    "he": {"q": math.sqrt(1 / D), "k": math.sqrt(1 / D), "v": math.sqrt(1 / D),
           "attn_proj": math.sqrt(1 / D) / 2, "fc1_gate": math.sqrt(1 / D),
           "fc1": math.sqrt(1 / D), "fc2": math.sqrt(2 / D_FF) / 2, "embedding": PAPER_SIGMA,
           "position": PAPER_SIGMA, "output": math.sqrt(1 / D)},
    "small": {"q": SMALL, "k": SMALL, "v": SMALL, "attn_proj": SMALL / 2, "fc1_gate": SMALL,
              "fc1": SMALL, "fc2": SMALL / 2, "embedding": SMALL, "position": SMALL,
              "output": SMALL},
    "megatron": {"q": 0.02, "k": 0.02, "v": 0.02, "attn_proj": 0.01, "fc1_gate": 0.02,
                 "fc1": 0.02, "fc2": 0.01, "embedding": 0.02, "position": 0.02, "output": 0.02},
}
STATS_CASE = Case(  # grouped-query attention: 4 heads, 2 key/value heads
    num_layers=N, hidden_size=D, num_heads=4, num_query_groups=2, ffn_hidden_size=D_FF,
    vocab_size=512, seq_len=8
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
    rows = {role: [] for role in BACKBONE_STD["he"]}
    for i in range(N):
        for name, role in ROLE_OF.items():
            if f"layers.{i}.{name}.weight" in sd:
                rows[role].append((sd[f"layers.{i}.{name}.weight"],
                                   sd.get(f"layers.{i}.{name}.gate")))
    rows["embedding"].append((sd["embedding.weight"], sd.get("embedding.gate")))
    rows["position"].append((sd["position.weight"], sd.get("position.gate")))
    output = sd["embedding.weight"] if tied else sd["output.weight"]
    rows["output"].append((output, sd.get("output.gate")))
    return rows


def _expected_gate(case: Case, role: str, sigma: float) -> float | None:
    """alpha_0 = backbone std / std of the W_bar it multiplies (None: not gated)."""
    stds = BACKBONE_STD[case.backbone]
    gated = {"embedding": case.gate_embedding, "position": case.gate_embedding,
             "output": case.gate_output_layer}.get(role, True)
    if not (case.enabled and gated):
        return None
    owner = "embedding" if role == "output" and case.tied else role
    owner_gated = {"embedding": case.gate_embedding,
                                 "position": case.gate_embedding}.get(owner, True)
    return stds[role] / (sigma if owner_gated else stds[owner])


GATE_REL = {torch.float64: 1e-12, torch.float32: 1e-7}  # one rounding of the gate's dtype


def _check_initial_state(case: Case, sd: dict, sigma: float) -> None:
    """Gates equal the hand-computed alpha_0 (to one rounding of their dtype); W_bar has std
    sigma when gated, the backbone std otherwise (2%; the learned positions as an input embedding,
    gated with the word embedding); biases 0; norms gamma 1, beta 0."""
    stds = BACKBONE_STD[case.backbone]
    for role, rows in _role_weights(sd, case.tied).items():
        assert rows or (role == "fc1_gate" and not case.swiglu), role
        owner = "embedding" if role == "output" and case.tied else role
        owner_gated = case.enabled and {"embedding": case.gate_embedding,
                                 "position": case.gate_embedding}.get(owner, True)
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


GATED = (("he", False, True), ("small", True, True), ("megatron", False, True),
         ("small", True, False))  # (backbone, tied, gate_embedding)
INIT_CASES = [  # SwiGLU (separate gate and up gates) with the second sigma
    replace(STATS_CASE, tp=2, backbone=backbone, tied=tied, gate_embedding=gate_embedding,
            sigma=sigma, swiglu=sigma is not None)
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
    assert _expected_gate(he, "q", PAPER_SIGMA) == pytest.approx(9.882117688, rel=1e-9)
    assert _expected_gate(he, "fc2", PAPER_SIGMA) == pytest.approx(3.493856214, rel=1e-9)
    assert _expected_gate(he, "embedding", PAPER_SIGMA) == 1.0
    assert _expected_gate(he, "embedding", 1e-3) == pytest.approx(6.324555320, rel=1e-9)
    tied_small = Case(backbone="small", tied=True, gate_embedding=False)
    assert _expected_gate(tied_small, "output", 1e-3) == 1.0


def _loss_and_gate_grads(rank, world_size, case, perturbations, rel_step=1e-5):
    """Loss of one batch, autograd gate grads, and losses at gate +/- h (central differences)."""
    from megatron.core import parallel_state

    from megatron_wesar.grads import finalize_model_grads, reduce_gate_grads
    from megatron_wesar.layers import gate_parameters

    model = build_case_model(case)  # float64 with gathered logits
    model.config.finalize_model_grads_func = finalize_model_grads  # reduce_gate_grads below
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


# every gate kind: q, k, v, attention output, fc1 (GeLU) or SwiGLU's gate and up, fc2, the word
# embedding, the learned position table (without RoPE) and the output layer
FD_CASES = {
    "tp1": Case(num_layers=2),
    "tp2-sp-tied-gqa-swiglu-rope": Case(tp=2, sp=True, tied=True, swiglu=True, rope=True,
                                        num_heads=8, num_query_groups=2),
}
GATE_KINDS = {
    "tp1": ("gate_q", "gate_k", "gate_v", "linear_proj.gate", "linear_fc1.gate",
            "linear_fc2.gate", "word_embeddings.gate", "position_embeddings.gate",
            "output_layer.gate"),
    "tp2-sp-tied-gqa-swiglu-rope": ("gate_q", "gate_k", "gate_v", "linear_proj.gate",
                                    "gate_gate", "gate_up", "linear_fc2.gate",
                                    "word_embeddings.gate", "output_layer.gate"),
}


@pytest.mark.parametrize("name", list(FD_CASES))
@pytest.mark.parallel
def test_gate_gradients_match_central_finite_differences(name):
    case = FD_CASES[name]
    grads, fd = run_distributed(_loss_and_gate_grads, case.world_size, case, 100)[0]
    assert len(fd) == case.num_gates
    for kind in GATE_KINDS[name]:
        assert any(gate.endswith(kind) for gate in fd), kind
    for name, numeric in fd.items():
        assert math.isclose(grads[name], numeric, rel_tol=1e-6, abs_tol=1e-10), (
            name, grads[name], numeric
        )


def _gate_checkpoint_entries(rank, world_size, case):
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_wesar.layers import gate_parameters

    model = build_case_model(case)
    plain = [name for name, _ in gate_parameters(model)]
    assert set(plain) <= set(model.state_dict())
    sharded = model.sharded_state_dict()
    entries = {}
    for key, value in sharded.items():
        if key in plain:
            assert isinstance(value, ShardedTensor)
            entries[key] = (tuple(value.global_shape), value.replica_id, value.key)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    parallel_state.destroy_model_parallel()
    return plain, entries, tp_rank


@pytest.mark.parallel
def test_gates_are_replicated_entries_of_both_state_dicts():
    case = Case(tp=2, tied=True, swiglu=True)
    for plain, entries, tp_rank in run_distributed(_gate_checkpoint_entries, 2, case):
        assert len(plain) == case.num_gates
        assert set(plain) <= set(entries), set(plain) - set(entries)
        # one checkpoint key per gate kind (the layers stacked), each gate of a fused layer its own
        keys = {key for _, _, key in entries.values()}
        assert len(keys) == case.num_gates - (case.num_layers - 1) * case.gates_per_layer, keys
        assert "embedding.position_embeddings.gate" in keys, keys
        for part in ("gate_q", "gate_k", "gate_v", "gate_gate", "gate_up"):
            assert sum(key.endswith(f".{part}") for key in keys) == 1, (part, keys)
        for key, (global_shape, replica_id, _) in entries.items():
            assert global_shape[-1] == 1, key
            assert replica_id[1] == tp_rank, (key, replica_id)  # replicated over TP


def _old_format_and_non_finite(rank, world_size, case):
    """(1) Load state dicts of the old format (one gate for a fused layer) into the model: the
    error messages, and whether the model still holds its own gates afterwards. (2) A NaN gate:
    the forward's error message."""
    from megatron.core import parallel_state

    from megatron_wesar.layers import NonFiniteGateError, OldGateFormatError

    model = build_case_model(case)
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    messages = []
    for layer, parts in (("self_attention.linear_qkv", ("q", "k", "v")),
                         ("mlp.linear_fc1", ("gate", "up"))):
        old = dict(before)
        prefix = f"decoder.layers.1.{layer}."
        old[prefix + "gate"] = old.pop(prefix + f"gate_{parts[0]}")
        for part in parts[1:]:
            del old[prefix + f"gate_{part}"]
        try:
            model.load_state_dict(old)
        except OldGateFormatError as err:
            messages.append(str(err))
    unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items()
                    if torch.is_tensor(v))
    with torch.no_grad():
        model.decoder.layers[1].mlp.linear_fc2.gate.fill_(float("nan"))
    tokens = case.global_batch(0)[:1]
    positions = torch.arange(case.seq_len).unsqueeze(0)
    try:
        model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
        non_finite = None
    except NonFiniteGateError as err:
        non_finite = str(err)
    parallel_state.destroy_model_parallel()
    return messages, unchanged, non_finite


@lru_cache(maxsize=None)
def single_process_results():
    return run_distributed(_old_format_and_non_finite, 1, Case(swiglu=True))[0]


@pytest.mark.parallel
def test_old_one_gate_state_dict_is_refused_naming_the_old_format():
    messages, unchanged, _ = single_process_results()
    assert len(messages) == 2 and unchanged
    qkv, fc1 = messages
    assert "decoder.layers.1.self_attention.linear_qkv.gate: " in qkv
    assert "old format with ONE gate" in qkv
    assert "linear_qkv.gate_q, " in qkv and "linear_qkv.gate_v" in qkv
    assert "linear_fc1.gate_gate, decoder.layers.1.mlp.linear_fc1.gate_up" in fc1


@pytest.mark.parallel
def test_non_finite_gate_raises_naming_the_gate():
    message = single_process_results()[2]
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
        ["--wesar-sigma", "1e-3", "--backbone", "small",
         "--untie-embeddings-and-output-weights"],
        replace(DRIVER_CASE, backbone="small", sigma=1e-3)),
    "megatron-no-embedding-gate": (
        ["--backbone", "megatron", "--no-wesar-gate-embedding"],
        replace(DRIVER_CASE, backbone="megatron", tied=True, gate_embedding=False)),
    "baseline-he": (["--no-wesar", "--backbone", "he"],
                    replace(DRIVER_CASE, enabled=False, tied=True)),
}


@pytest.mark.parallel
def test_driver_flags_reach_the_built_model():
    argvs = [DRIVER_SHAPE + flags for flags, _ in DRIVER_FLAGS.values()]
    states = run_distributed(_driver_initial_states, 2, argvs)[0]
    assert len(states) == len(DRIVER_FLAGS)
    for (_, case), sd in zip(DRIVER_FLAGS.values(), states):
        _check_initial_state(case, sd, PAPER_SIGMA if case.sigma is None else case.sigma)


def _initial_weights(rank, world_size, cases):
    """The canonical (gathered) initial weights of each case's model, built one after another
    on the same ranks."""
    from megatron.core import parallel_state

    out = []
    for case in cases:
        out.append(gather_canonical(build_case_model(case)))
        parallel_state.destroy_model_parallel()
    return out


@pytest.mark.parallel
def test_initial_weights_do_not_depend_on_the_parallel_layout():
    base = Case(num_layers=4, tied=False, swiglu=True)
    layouts = (dict(), dict(tp=2, pp=2), dict(pp=4))  # DP 4, TP 2 x PP 2, PP 4 on 4 ranks
    reference, *others = run_distributed(
        _initial_weights, 4, [replace(base, **layout) for layout in layouts])[0]
    for layout, other in zip(layouts[1:], others):
        assert other.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(other[key], value), (layout, key)
