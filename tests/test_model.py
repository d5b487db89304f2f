"""The WeSaR GPT model: init statistics, gate gradients vs finite differences, checkpoint
entries of the gates, and clear errors for bad input."""
import math
from dataclasses import replace

import pytest
import torch

from distributed import run_distributed
from gather import gather_canonical
from oracle_harness import Case, build_case_model

ROLE_OF = {"qkv": "qkv", "proj": "attn_proj", "fc1": "fc1", "fc2": "fc2"}
STATS_CASE = Case(
    num_layers=2, hidden_size=256, num_heads=4, ffn_hidden_size=1024, vocab_size=512, seq_len=8
)


def _init_statistics(rank, world_size, cases):
    from megatron.core import parallel_state

    from megatron_wesar.config import WeSaRConfig
    from megatron_wesar.init import ModelShape, sigma_role

    out = []
    for case in cases:
        model = build_case_model(case)
        sd = gather_canonical(model)
        shape = ModelShape(case.hidden_size, case.num_layers, case.ffn_hidden_size)
        wesar = WeSaRConfig(backbone=case.backbone, enabled=case.enabled)
        rows = []
        for i in range(case.num_layers):
            for name, role in ROLE_OF.items():
                if name == "qkv":
                    weight = torch.cat([sd[f"layers.{i}.{p}.weight"] for p in "qkv"])
                else:
                    weight = sd[f"layers.{i}.{name}.weight"]
                rows.append((role, weight.std().item(), sd.get(f"layers.{i}.{name}.gate")))
        rows.append(("embedding", sd["embedding.weight"].std().item(), sd.get("embedding.gate")))
        if not case.tied:
            rows.append(("output", sd["output.weight"].std().item(), sd.get("output.gate")))
        else:
            rows.append(("output", sd["embedding.weight"].std().item(), sd.get("output.gate")))
        out.append([(r, std, None if g is None else g.item(), sigma_role(r, shape, wesar)) for r, std, g in rows])
        parallel_state.destroy_model_parallel()
    return out


def test_initial_statistics_per_gated_matrix():
    from megatron_wesar.config import DEFAULT_SIGMA

    cases = [
        replace(STATS_CASE, tp=2, backbone=backbone, tied=tied)
        for backbone, tied in (("he", False), ("small", True), ("megatron", False))
    ]
    baseline = [replace(case, enabled=False) for case in cases]
    results = run_distributed(_init_statistics, 2, cases + baseline)[0]
    for case, rows in zip(cases + baseline, results):
        for role, std, gate, role_std in rows:
            if case.enabled:
                assert abs(std / DEFAULT_SIGMA - 1) < 0.02, (case.backbone, role, std)
                assert gate is not None
                # alpha_0 * sigma = sigma_role (for a tied output: times std of the shared W_bar)
                assert math.isclose(gate * DEFAULT_SIGMA, role_std, rel_tol=1e-12), (role, gate)
            else:
                assert gate is None
                assert abs(std / role_std - 1) < 0.02, (case.backbone, role, std, role_std)


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
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

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
        validate_parallel_shapes(config(ffn_hidden_size=66, tensor_model_parallel_size=4), tp_size=4)
    with pytest.raises(ValueError, match="tensor-parallel group has 2 ranks"):
        validate_parallel_shapes(config(), tp_size=2)
    with pytest.raises(ValueError, match="vocab_size=63 is not divisible"):
        validate_parallel_shapes(config(tensor_model_parallel_size=2), tp_size=2, vocab_size=63)


def _initial_weights(rank, world_size, case):
    from megatron.core import parallel_state

    model = build_case_model(case)
    weights = gather_canonical(model)
    parallel_state.destroy_model_parallel()
    return weights


def test_initial_weights_do_not_depend_on_the_parallel_layout():
    base = Case(num_layers=4, tied=False, swiglu=True)
    single = run_distributed(_initial_weights, 1, base)[0]
    for layout in (dict(tp=2, pp=2), dict(pp=4)):
        other = run_distributed(_initial_weights, 4, replace(base, **layout))[0]
        assert other.keys() == single.keys()
        for key, value in single.items():
            assert torch.equal(other[key], value), (layout, key)
