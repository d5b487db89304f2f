"""WeSaRConfig validation and the per-role init scales of docs/design.md section 1."""
import math

import pytest

from megatron_wesar.config import DEFAULT_SIGMA, WeSaRConfig
from megatron_wesar.init import (
    ROLES,
    ModelShape,
    gate_initial_value,
    is_gated,
    sigma_role,
    weight_std,
)

SHAPE = ModelShape(hidden_size=512, num_layers=8, ffn_hidden_size=2048)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -1e-3}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"backbone": "xavier"}, "backbone"),
        ({"gate_lr_mult": -1.0}, "gate_lr_mult"),
        ({"init_method_std": 0.0}, "init_method_std"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeSaRConfig(**kwargs)


def test_default_sigma_is_the_papers():
    assert WeSaRConfig().sigma == DEFAULT_SIGMA == math.sqrt(4e-5)


@pytest.mark.parametrize(
    "backbone, expected",
    [
        (
            "he",
            {
                "q": math.sqrt(1 / 512),
                "k": math.sqrt(1 / 512),
                "v": math.sqrt(1 / 512),
                "attn_proj": math.sqrt(1 / (2 * 8 * 512)),
                "fc1_gate": math.sqrt(1 / 512),
                "fc1": math.sqrt(1 / 512),
                "fc2": math.sqrt(2 / 2048) / math.sqrt(16),
                "embedding": math.sqrt(4e-5),
                "position": math.sqrt(4e-5),
                "output": math.sqrt(1 / 512),
            },
        ),
        (
            "small",
            {
                "q": math.sqrt(2 / (5 * 512)),
                "k": math.sqrt(2 / (5 * 512)),
                "v": math.sqrt(2 / (5 * 512)),
                "attn_proj": math.sqrt(2 / (5 * 512)) / math.sqrt(16),
                "fc1_gate": math.sqrt(2 / (5 * 512)),
                "fc1": math.sqrt(2 / (5 * 512)),
                "fc2": math.sqrt(2 / (5 * 512)) / math.sqrt(16),
                "embedding": math.sqrt(2 / (5 * 512)),
                "position": math.sqrt(2 / (5 * 512)),
                "output": math.sqrt(2 / (5 * 512)),
            },
        ),
        (
            "megatron",
            {
                "q": 0.02,
                "k": 0.02,
                "v": 0.02,
                "attn_proj": 0.02 / math.sqrt(16),
                "fc1_gate": 0.02,
                "fc1": 0.02,
                "fc2": 0.02 / math.sqrt(16),
                "embedding": 0.02,
                "position": 0.02,
                "output": 0.02,
            },
        ),
    ],
)
def test_sigma_role_matches_the_design_table(backbone, expected):
    assert sorted(expected) == sorted(ROLES)
    for sigma in (DEFAULT_SIGMA, 1e-3):  # a baseline std never depends on WeSaR's sigma
        wesar = WeSaRConfig(backbone=backbone, sigma=sigma)
        for role, value in expected.items():
            assert sigma_role(role, SHAPE, wesar) == pytest.approx(value, rel=1e-15), role


def test_gate_carries_the_role_scale():
    wesar = WeSaRConfig(backbone="he")
    for role in ROLES:
        alpha0 = gate_initial_value(role, SHAPE, wesar)
        assert alpha0 * wesar.sigma == pytest.approx(sigma_role(role, SHAPE, wesar), rel=1e-15)
    assert gate_initial_value("embedding", SHAPE, wesar) == 1.0
    # He's embedding std is the paper's constant: another sigma moves the gate, not the std
    other = WeSaRConfig(backbone="he", sigma=1e-3)
    assert gate_initial_value("embedding", SHAPE, other) == pytest.approx(
        math.sqrt(4e-5) / 1e-3, rel=1e-15)


def test_tied_output_gate_is_relative_to_the_embedding_weight():
    wesar = WeSaRConfig(backbone="small", gate_embedding=False)
    alpha0 = gate_initial_value("output", SHAPE, wesar, weight_role="embedding")
    assert alpha0 * weight_std("embedding", SHAPE, wesar) == pytest.approx(
        sigma_role("output", SHAPE, wesar), rel=1e-15
    )


def test_baseline_and_optional_gates():
    baseline = WeSaRConfig(enabled=False)
    assert not any(is_gated(r, baseline) for r in ROLES)
    assert weight_std("fc2", SHAPE, baseline) == sigma_role("fc2", SHAPE, baseline)
    partial = WeSaRConfig(gate_embedding=False, gate_output_layer=False)
    assert not is_gated("embedding", partial) and not is_gated("output", partial)
    assert all(is_gated(r, partial) for r in ("q", "k", "v", "fc1_gate", "fc1"))


def test_unknown_role_is_rejected():
    with pytest.raises(ValueError, match="role"):
        sigma_role("lm_head", SHAPE, WeSaRConfig())
