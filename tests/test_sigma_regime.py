"""--wesar-sigma-regime: sigma at the paper model's relative position between the backbone's
smallest (W_d) and largest (q/k/v, W_u) std, computed here from the He formulas by hand."""
import math

import pytest

from megatron_wesar.training.arguments import parse_pretrain_args

PAPER = {"130m": (768, 12), "1.3b": (2048, 24), "13b": (5120, 40)}  # d, N; d_ff = 4d


def he_span(d, n):
    """log std of W_d (sqrt(2/d_ff)/sqrt(2N) with d_ff = 4d) and of q (sqrt(1/d)) under He."""
    return math.log(math.sqrt(2 / (4 * d)) / math.sqrt(2 * n)), math.log(math.sqrt(1 / d))


@pytest.mark.parametrize("regime, alpha_wd", [("130m", 0.82), ("1.3b", 0.36), ("13b", 0.17)])
def test_the_paper_models_keep_the_papers_sigma(regime, alpha_wd):
    d, n = PAPER[regime]
    config = parse_pretrain_args(["--preset", regime, "--wesar-sigma-regime", regime])
    assert config.wesar.sigma == pytest.approx(math.sqrt(4e-5), rel=1e-12)
    assert config.wesar.sigma_regime == regime
    low, _ = he_span(d, n)
    assert math.exp(low) / config.wesar.sigma == pytest.approx(alpha_wd, abs=0.005)  # alpha_0


@pytest.mark.parametrize("regime", list(PAPER))
def test_a_small_model_gets_the_same_relative_position(regime):
    low, high = he_span(*PAPER[regime])
    position = (math.log(math.sqrt(4e-5)) - low) / (high - low)
    tiny_low, tiny_high = he_span(128, 4)  # the tiny preset (d_ff = 4d)
    expected = math.exp(tiny_low + position * (tiny_high - tiny_low))
    config = parse_pretrain_args(["--wesar-sigma-regime", regime])
    assert config.wesar.sigma == pytest.approx(expected, rel=1e-12)
    assert math.exp(tiny_low) < config.wesar.sigma < math.exp(tiny_high)  # between the stds


def test_an_explicit_sigma_wins_and_a_bad_regime_is_refused(capsys):
    config = parse_pretrain_args(["--wesar-sigma-regime", "13b", "--wesar-sigma", "0.01"])
    assert config.wesar.sigma == 0.01
    assert parse_pretrain_args([]).wesar.sigma == math.sqrt(4e-5)  # no regime: the paper's
    with pytest.raises(SystemExit):
        parse_pretrain_args(["--wesar-sigma-regime", "7b"])
    assert "invalid choice: '7b'" in capsys.readouterr().err
