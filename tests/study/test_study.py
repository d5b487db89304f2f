"""The study runner, its summary and its report: the summary's numbers and the rendered report
on a synthetic fixture study (tests/study/fixtures/study_small, see its generate.py), and one small
end-to-end study that trains through the driver."""
import json
import math
import os
import shutil

import pytest

from megatron_wesar.study.summary import (
    format_lr,
    load_metrics,
    parse_run_name,
    run_name,
    spike_counts,
    summarize,
    write_summary,
)

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "study_small")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def study_dir(tmp_path):
    """A writable copy of the fixture study (the inputs only: study.json and runs/)."""
    dst = tmp_path / "study"
    dst.mkdir()
    shutil.copy(os.path.join(FIXTURE, "study.json"), dst / "study.json")
    shutil.copytree(os.path.join(FIXTURE, "runs"), dst / "runs")
    return str(dst)


def _run(summary, method, lr, seed=1):
    (run,) = [r for r in summary["runs"]
              if r["method"] == method and r["lr"] == lr and r["seed"] == seed]
    return run


def test_run_names_round_trip():
    assert format_lr(3e-4) == "3e-4"
    assert format_lr(0.01) == "1e-2"
    assert format_lr(2.5e-4) == "2.5e-4"
    assert run_name("wesar", 3e-4, 1) == "wesar_lr3e-4_s1"
    assert parse_run_name("wesar_lr3e-4_s1") == ("wesar", 3e-4, 1)
    assert parse_run_name("scaled-embed_lr1e-2_s12") == ("scaled-embed", 1e-2, 12)
    assert parse_run_name("notes") is None


def test_summary_of_the_fixture(study_dir):
    summary = summarize(study_dir)
    assert len(summary["runs"]) == 19  # seed 1 on the grid, seeds 2, 3 at best and shared LRs
    assert [r["method"] for r in summary["runs"]] == ["he"] * 7 + ["small"] * 5 + ["wesar"] * 7
    valid = {"he": (2.10, 1.90, 2.30), "small": (2.20, 1.95, 1.85), "wesar": (1.70, 2.40, 2.90)}
    for method, values in valid.items():
        for lr, v in zip((1e-3, 3e-3, 1e-2), values):
            run = _run(summary, method, lr)
            assert run["steps"] == 40
            assert run["final_valid_loss"] == pytest.approx(v)
            # mean of the last 10% (4) steps: V + 0.05 + (0.02 - 0.02 + 0.01 - 0.01) / 4
            assert run["final_train_loss"] == pytest.approx(v + 0.05, abs=1e-6)
            assert run["wesar"] is (method == "wesar")
    # best LR per method at its lowest final validation loss; grid ends flagged
    methods = summary["methods"]
    assert {m: methods[m]["lr"] for m in methods} == {"he": 3e-3, "small": 1e-2, "wesar": 1e-3}
    assert {m: methods[m]["edge"] for m in methods} == {"he": None, "small": "high",
                                                        "wesar": "low"}
    assert methods["wesar"]["final_valid_loss"] == pytest.approx((1.70 + 1.72 + 1.67) / 3)
    assert summary["baseline_methods"] == ["he", "small"]
    assert summary["best_baseline"]["method"] == "small"
    assert summary["best_baseline"]["lr"] == 1e-2
    assert summary["best_baseline"]["final_valid_loss"] == pytest.approx(1.85)
    # steps to the best baseline's final valid loss (1.85): valid at k is V + 0.4 (1 - k/40)
    assert _run(summary, "wesar", 1e-3)["steps_to_best_baseline"] == 30
    assert _run(summary, "small", 1e-2)["steps_to_best_baseline"] == 40
    assert _run(summary, "small", 3e-3)["steps_to_best_baseline"] is None
    assert _run(summary, "he", 3e-3)["steps_to_best_baseline"] is None
    # spikes: the driver's running counts at the last logged step
    loss0 = {"megatron": 0, "zscore": 0, "relmin": 0}
    norm0 = {"megatron": 0, "zscore": 0, "relmedian": 0}
    assert _run(summary, "he", 1e-2)["spikes"] == {"loss": {**loss0, "relmin": 1},
                                                   "grad_norm": norm0}
    assert _run(summary, "small", 1e-2)["spikes"] == {"loss": loss0,
                                                      "grad_norm": {**norm0, "megatron": 2}}
    assert _run(summary, "wesar", 1e-3)["spikes"] == {"loss": loss0, "grad_norm": norm0}
    assert _run(summary, "he", 1e-2)["spike_steps"] == {"loss": {"relmin": [25]}}
    assert _run(summary, "small", 1e-2)["spike_steps"] == {"grad_norm": {"megatron": [15, 33]}}
    assert _run(summary, "he", 1e-2)["max_grad_norm"] == pytest.approx(7.5)
    assert _run(summary, "he", 1e-3)["max_grad_norm"] == pytest.approx(1.5)
    # largest loss / running minimum: the jump at step 25,
    # (5 - 2.55 * 25/36 + 1) / (5 - 2.55 * 24/36)
    he_spike = _run(summary, "he", 1e-2)
    assert he_spike["max_loss_rise"] == pytest.approx((6 - 2.55 * 25 / 36) / 3.3, rel=1e-5)
    assert he_spike["max_loss_rise_step"] == 25
    # update ratios relative to fc1, the spread across roles, gates
    he = _run(summary, "he", 3e-3)
    assert he["update_ratio_rel_fc1"] == pytest.approx({"attn_proj": 2.4, "fc2": 3.0}, rel=1e-5)
    assert he["update_ratio_spread"] == pytest.approx(3.0 / 0.5, rel=1e-5)
    wesar = _run(summary, "wesar", 1e-3)
    assert wesar["update_ratio_rel_fc1"] == pytest.approx({"attn_proj": 1.05, "fc2": 0.98},
                                                          rel=1e-5)
    assert wesar["update_ratio_spread"] == pytest.approx(1.05 / 0.98, rel=1e-5)
    assert wesar["gate_count"] == 10 and he["gate_count"] == 0
    assert wesar["gate_max_rel_change"] == pytest.approx(0.006, rel=1e-3)
    assert he["gate_max_rel_change"] is None
    assert summary["grid"]["small"]["1e-2"]["final_valid_loss"] == pytest.approx(1.85)
    assert summary["grid"]["small"]["1e-2"]["valid_std"] == pytest.approx(0.02)
    assert summary["grid"]["small"]["3e-3"]["valid_std"] is None  # one seed


def test_protocols_stability_and_proxies_of_the_fixture(study_dir):
    summary = summarize(study_dir)
    # the shared LR: the best baseline's (small) best LR
    assert summary["shared_lr"] == {"lr": 1e-2,
                                    "source": "the best LR of the best baseline, small"}
    best, shared = summary["protocols"]["best"], summary["protocols"]["shared"]
    assert best["lrs"] == {"he": 3e-3, "small": 1e-2, "wesar": 1e-3}
    assert shared["lrs"] == {"he": 1e-2, "small": 1e-2, "wesar": 1e-2}
    assert best["cells"]["he"]["mean"] == pytest.approx(1.90)
    assert best["cells"]["he"]["std"] == pytest.approx(0.02)
    # wesar - he at best LRs, seeds 1, 2, 3: (1.70 - 1.90, 1.72 - 1.92, 1.67 - 1.88)
    diff = best["paired"]["wesar"]["he"]
    assert diff["seeds"] == [1, 2, 3]
    assert diff["diffs"] == pytest.approx([-0.20, -0.20, -0.21])
    sd = math.sqrt(((0.2 - 0.61 / 3) ** 2 * 2 + (0.21 - 0.61 / 3) ** 2) / 2)
    assert diff["std"] == pytest.approx(sd)
    assert diff["half_width"] == pytest.approx(4.303 * sd / math.sqrt(3))
    assert diff["verdict"] == "a lower"
    assert shared["paired"]["wesar"]["small"]["mean"] == pytest.approx(2.90 - 1.85)
    assert shared["paired"]["wesar"]["small"]["verdict"] == "b lower"
    assert set(best["paired"]) == {"wesar"}  # only the non-baseline method is compared
    # Wortsman et al.'s LR sensitivity: mean over LRs of min(L, L0) - min L (no cap reached)
    stability = summary["stability"]
    assert stability["he"]["lr_sensitivity"] == pytest.approx((0.20 + 0.0 + 0.40) / 3)
    assert stability["wesar"]["lr_sensitivity"] == pytest.approx(
        (0.0 + 2.40 + 2.90 - 2 * (1.70 + 1.72 + 1.67) / 3) / 3)
    assert stability["he"]["diverged_lrs"] == [] and stability["he"]["highest_stable_lr"] == 1e-2
    # L0: the first step's loss, 5 - (5 - (V + 0.05) - 0.1) / 36
    assert _run(summary, "he", 1e-3)["initial_loss"] == pytest.approx(
        5 - (5 - 2.15 - 0.1) / 36, rel=1e-5)
    # the proxies: attn = ATTN (1 + 100 lr k / 40), last logged at k = 40
    he = _run(summary, "he", 1e-2)
    assert he["attn_logit_max_final"] == pytest.approx(4.0 * 2)
    assert he["attn_logit_max_peak"] == pytest.approx(4.0 * 2)
    assert he["output_log_z_final"] == pytest.approx(2 - 0.4)
    assert he["output_log_z_absmax_peak"] == pytest.approx(3 + 0.4)
    # the initial gates per role and the regime from the header
    wesar = _run(summary, "wesar", 1e-3)
    assert wesar["sigma_regime"] == "130m" and wesar["sigma"] == 0.0254
    assert wesar["alpha0"]["fc2"] == pytest.approx(0.8) and wesar["alpha0"]["fc1"] == 14.0
    assert he["alpha0"] == {}


def test_summary_json_is_strict_json(study_dir):
    write_summary(study_dir)
    with open(os.path.join(study_dir, "summary.json")) as f:
        text = f.read()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert {"runs", "config", "methods", "grid", "best_baseline"} <= set(data)
    run = data["runs"][0]
    for key in ("method", "lr", "seed", "final_train_loss", "final_valid_loss", "spikes",
                "max_grad_norm", "steps_to_best_baseline", "update_ratio_spread"):
        assert key in run


def test_metrics_edge_cases(tmp_path):
    """Torn last line, no optional keys, no spike counts (rules run on the series), divergence."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"run": {"wesar": False, "train_iters": 130}})]
    for it in range(1, 131):
        loss = 3.0 if it != 120 else 30.0
        lines.append(json.dumps({"iteration": it, "loss": loss, "grad_norm": 1.0, "lr": 1e-3}))
    lines.append('{"iteration": 131, "loss": 2.')  # a run still writing
    path.write_text("\n".join(lines) + "\n")
    metrics = load_metrics(str(path))
    assert len(metrics.steps) == 130 and metrics.evals == [] and metrics.logged == []
    counts = spike_counts(metrics)
    assert counts["loss"] == {"megatron": 1, "zscore": 1, "relmin": 1}
    assert counts["grad_norm"] == {"megatron": 0, "zscore": 0, "relmedian": 0}
    with open(path, "a") as f:
        f.write(json.dumps({"iteration": 131, "loss": float("nan"), "grad_norm": float("inf"),
                            "lr": 1e-3}) + "\n")
    from megatron_wesar.study.summary import summarize_run

    run = summarize_run("he", 1e-3, 1, load_metrics(str(path)))
    assert run["final_valid_loss"] is None and run["update_ratio_spread"] is None
    assert run["nonfinite_steps"] == 2 and math.isnan(run["final_train_loss"])
    assert run["max_grad_norm"] == 1.0
    # the loss rose to 10x its first value at step 120; the run diverged at step 131
    assert run["peak_loss_over_initial"] == 10.0 and run["diverged"]
    assert run["attn_logit_max_peak"] is None and run["alpha0"] == {}
    from megatron_wesar.study.summary import stability

    cells = {1e-3: {"final_valid_loss": math.inf, "diverged_seeds": [1]}}
    assert stability([run], {"he": cells})["he"] == {
        "initial_loss": 3.0, "lr_sensitivity": None, "diverged_lrs": [1e-3],
        "highest_stable_lr": None, "blowup_lrs": [1e-3]}


def test_report_renders_from_the_fixture(study_dir, capsys):
    from megatron_wesar.cli import main

    assert main(["report", study_dir]) == 0
    assert "report.md" in capsys.readouterr().out
    with open(os.path.join(study_dir, "report.md")) as f:
        report = f.read()
    for heading in ("## Findings", "## Best learning rate per method",
                    "## Final validation loss: learning rate x method", "## Spike counts per rule",
                    "## Update ratios at each method's best LR"):
        assert heading in report
    # the tables' rows (every method in each) and the numbers behind them
    assert "| wesar | 1e-3 | 1.747 | 1.697 | best | 30, 30, 30 | lowest LR of the grid |" in report
    assert "| small | 2.200 | 1.950 | **1.850** |" in report
    # he at 1e-2: the +1.0 loss jump at step 25 over the running minimum (3.30): 4.229 / 3.30
    he_row = "| he | 7 | 0 | 0 | 1 | 0 | 0 | 0 | 0 | 1.02x | 1.28x (LR 1e-2, step 25) | 7.50 |"
    assert he_row in report
    for method, rel in (("he", "2.40x | 3.00x"), ("small", "2.00x | 2.50x"),
                        ("wesar", "1.05x | 0.98x")):
        assert any(line.startswith(f"| {method} |") and rel in line
                   for line in report.splitlines())
    assert "wesar reaches the lowest final validation loss" in report
    assert ("loss/relmin flagged 1 of 760 steps (0.1%) in 1 of 19 runs: he at LR 1e-2 seed 1 "
            "(steps 25)") in report and "No training loss spikes" not in report
    # the regime and alpha_0, both protocols side by side, paired differences, stability, proxies
    assert "| wesar | 130m | 0.0254 |" in report
    assert "its gates start below 1 for fc2 0.80" in report
    assert "| he | 3e-3 | 1.900 ± 0.020 (3 seeds) | 2.300 ± 0.020 (3 seeds) |" in report
    assert "| wesar - small | -0.153 ± 0.014 (3 seeds): wesar lower | +1.050 ± 0.000 (3 seeds): " \
           "small lower |" in report
    assert ("the claim that wesar beats every baseline outside seed noise holds at each "
            "method's own best LR and not at the shared LR 1e-2") in report
    assert "| he | 4.924 | 0.200 | none | 1e-2 | none | 0.99x |" in report
    assert ("Instabilities of the baselines (training-loss spike rules, loss above "
            "1.1x its first step's value L0, divergence): he at LR 1e-2 (loss spike (relmin)). "
            "Under the same "
            "protocol wesar had none of these at any LR.") in report
    assert "| he | 1e-2 | highest stable LR | 8.00 | 8.00 | 1.60 | 3.40 |" in report
    assert "Rules megatron, zscore flagged none of its steps" in report
    for name in ("loss_curves.png", "lr_sensitivity.png", "update_ratios.png", "gates.png",
                 "instability_proxies.png"):
        path = os.path.join(study_dir, name)
        assert f"]({name})" in report
        with open(path, "rb") as f:
            data = f.read()
        assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 5000
    assert os.path.isfile(os.path.join(study_dir, "summary.json"))


def test_report_says_no_spikes_plainly(study_dir):
    """Without any flagged step the Findings say so; without gated runs there is no gate plot."""
    from megatron_wesar.study.report import render_report

    runs = os.path.join(study_dir, "runs")
    for name in os.listdir(runs):
        if name.startswith("wesar"):
            shutil.rmtree(os.path.join(runs, name))
            continue
        path = os.path.join(runs, name, "metrics.jsonl")
        records = [json.loads(line) for line in open(path)]
        for rec in records:
            for key in list(rec):
                if key.startswith(("spikes/", "spike/")):
                    rec[key] = 0.0
        with open(path, "w") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in records)
    report = open(render_report(study_dir)).read()
    assert ("No spikes: no rule (loss: megatron, zscore, relmin; grad_norm: megatron, zscore, "
            "relmedian) flagged any step") in report
    assert "No training loss spikes" not in report  # one plain sentence when nothing fired
    assert "gates.png" not in report and not os.path.exists(os.path.join(study_dir, "gates.png"))


def test_study_presets_are_valid_driver_configs(tmp_path):
    from megatron_wesar.options import to_argv
    from megatron_wesar.study.runner import METHODS, parse_study_args
    from megatron_wesar.training.arguments import PretrainConfig, parse_pretrain_args

    assert parse_study_args(["--preset", "tiny-long"]).methods == [
        "he", "small", "megatron", "scaled-embed", "embed-ln", "wesar"]
    config = parse_study_args(["--preset", "tiny", "--dir", str(tmp_path),
                               "--methods", ",".join(METHODS), "--", "--swiglu"])
    assert len(config.plan()) == 6 * 3 and len(config.grid()) == 6 * 3 * 3  # seeds_at "best"
    for method, lr, seed in config.grid():
        run = config.run_config(method, lr, seed)
        assert run.training.lr == lr and run.training.seed == seed
        assert run.wesar.enabled is (method == "wesar")
        assert run.model.embedding_variant == (
            method if method in ("scaled-embed", "embed-ln") else "none")
        assert run.parallel.tensor_model_parallel_size == 2 and run.model.seq_length == 64
        assert run.model.swiglu  # the flags after `--` reach every run
        assert run.wesar.sigma_regime == "130m" and run.training.min_lr is None
        # the flags the report shows reproduce the run's configuration
        flags = [*config.pretrain_args(), *to_argv(PretrainConfig, METHODS[method].overrides),
                 "--lr", repr(lr), "--seed", str(seed),
                 "--metrics-file", config.metrics_path(method, lr, seed)]
        assert parse_pretrain_args(flags) == run
    assert parse_study_args([]).methods == ["he", "small", "megatron", "wesar"]  # the demo's
    with pytest.raises(SystemExit):
        parse_study_args(["--methods", "he,embed-rms"])
    with pytest.raises(SystemExit):  # the shared LR must be one of the grid's
        parse_study_args(["--lrs", "1e-3,1e-2", "--shared-lr", "3e-3"])
    # the instability preset: no clipping, a constant LR after its short warm-up
    unstable = parse_study_args(["--preset", "instability", "--sigma-regime", "1.3b"])
    run = unstable.run_config("he", 0.3, 1)
    assert run.training.clip_grad == 0 and run.training.min_lr == 0.3
    assert run.training.lr_warmup_iters == 5 and run.wesar.sigma_regime == "1.3b"
    assert "--sigma-regime 1.3b" in unstable.description


def test_seeds_after_the_first_follow_the_best_and_shared_lrs(study_dir):
    from megatron_wesar.study.runner import parse_study_args

    config = parse_study_args(["--dir", study_dir, "--methods", "he,small,wesar",
                               "--lrs", "1e-3,3e-3,1e-2", "--seeds", "1,2,3"])
    assert config.seeds_at == "best"
    assert config.plan() == [(m, lr, 1) for lr in (1e-3, 3e-3, 1e-2)
                             for m in ("he", "small", "wesar")]
    # best LRs of the fixture: he 3e-3, small 1e-2, wesar 1e-3; shared: 1e-2 (small's)
    followup = config.followup_plan(summarize(study_dir))
    assert followup == [(m, lr, s) for s in (2, 3) for m, lr in (
        ("wesar", 1e-3), ("he", 3e-3), ("he", 1e-2), ("small", 1e-2), ("wesar", 1e-2))]
    grid = parse_study_args(["--dir", study_dir, "--seeds-at", "grid", "--seeds", "1,2"])
    assert len(grid.plan()) == 2 * 4 * 3 and grid.followup_plan(summarize(study_dir)) == []


def test_best_lr_is_selected_on_the_seeds_of_the_whole_grid():
    """A cell that later seeds ran cannot lose its place to a one-seed cell by their noise: the
    LR is chosen on the seeds every LR has, its loss reported over all its seeds."""
    from megatron_wesar.study.summary import best_lrs

    cells = {"he": {
        1e-3: {"final_valid_loss": 2.2, "final_train_loss": 2.3, "seeds": [1, 2, 3],
               "valid_by_seed": [2.0, 2.3, 2.3]},
        1e-2: {"final_valid_loss": 2.1, "final_train_loss": 2.2, "seeds": [1],
               "valid_by_seed": [2.1]}}}
    best = best_lrs(cells)["he"]
    assert best["lr"] == 1e-3 and best["final_valid_loss"] == 2.2


def test_statistics_by_hand():
    from megatron_wesar.study.statistics import lr_sensitivity, paired_difference, seed_spread

    assert seed_spread([1.0, 2.0, 3.0, math.inf]) == {"mean": 2.0, "std": 1.0, "n": 3,
                                                      "diverged": 1}
    # differences 0.1, 0.3, 0.2: mean 0.2, sd 0.1, half width t(2) 0.1 / sqrt(3)
    diff = paired_difference({1: 1.1, 2: 1.3, 3: 1.2, 4: 9.0}, {1: 1.0, 2: 1.0, 3: 1.0})
    assert diff["seeds"] == [1, 2, 3] and diff["mean"] == pytest.approx(0.2)
    assert diff["half_width"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert diff["verdict"] == "within noise"  # 0.2 < 0.248: the interval holds 0
    tight = paired_difference({1: 1.0, 2: 1.1, 3: 1.2}, {1: 1.2, 2: 1.29, 3: 1.41})
    assert tight["mean"] == pytest.approx(-0.2) and tight["verdict"] == "a lower"
    assert paired_difference({1: 1.0}, {1: 2.0})["verdict"] == "one seed"
    assert paired_difference({1: 1.0}, {2: 2.0})["verdict"] == "no common seed"
    # min(L, L0) - min L over the grid; a diverged (inf) or missing cell counts as L0 = 5
    assert lr_sensitivity({1e-3: 3.0, 1e-2: 2.0, 1e-1: math.inf, 1.0: 7.0}, 5.0) == \
        pytest.approx((1.0 + 0.0 + 3.0 + 3.0) / 4)
    assert lr_sensitivity({1e-3: math.inf}, 5.0) is None


# --------------------------------------------------------------------------- end to end

E2E_ARGS = ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
            "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "4",
            "--global-batch-size", "4", "--lr-warmup-iters", "1", "--log-interval", "3",
            "--eval-interval", "3", "--eval-iters", "1", "--tensor-model-parallel-size", "1"]


def _study(rank, world_size, out_dir):
    import contextlib
    import io

    from megatron_wesar.study.runner import parse_study_args, run_study

    argv = ["--dir", out_dir, "--methods", "he,wesar", "--lrs", "1e-3,1e-2", "--seeds", "1,2",
            "--seeds-at", "best", "--train-iters", "6", "--", *E2E_ARGS]
    lines = []
    run_study(parse_study_args(argv), log=lines.append)
    mtimes = {p: os.path.getmtime(p) for p in _metrics_files(out_dir)}
    again = []  # a second call keeps the complete runs
    with contextlib.redirect_stdout(io.StringIO()):
        run_study(parse_study_args(argv), log=again.append)
    assert {p: os.path.getmtime(p) for p in _metrics_files(out_dir)} == mtimes
    return lines, again


def _spread_from_metrics(out_dir, run):
    """Mean over the logged steps of max / min over roles of the per-role mean update ratio,
    recomputed from the run's metrics file."""
    name = f"{run['method']}_lr{format_lr(run['lr'])}_s{run['seed']}"
    spreads = []
    for line in open(os.path.join(out_dir, "runs", name, "metrics.jsonl")):
        record = json.loads(line)
        means = [v for k, v in record.items() if k.startswith("update_ratio_mean/")]
        if means:
            spreads.append(max(means) / min(means))
    assert len(spreads) == 2  # logged at iterations 3 and 6
    return sum(spreads) / len(spreads)


def _metrics_files(out_dir):
    runs = os.path.join(out_dir, "runs")
    return sorted(os.path.join(runs, n, "metrics.jsonl") for n in os.listdir(runs))


@pytest.mark.parallel
def test_small_study_end_to_end(tmp_path):
    from tests.helpers.distributed import run_distributed

    out_dir = str(tmp_path / "study")
    lines, again = run_distributed(_study, 1, out_dir, timeout=300)[0]
    progress = [line for line in lines if line.startswith("[")]
    summary = json.load(open(os.path.join(out_dir, "summary.json")))
    # seed 2 at each method's best LR of seed 1 and at the shared LR (he's best)
    best = {m: summary["methods"][m]["lr"] for m in ("he", "wesar")}
    seed2 = sorted({("he", best["he"]), ("wesar", best["wesar"]), ("wesar", best["he"])})
    assert sorted((r["method"], r["lr"]) for r in summary["runs"] if r["seed"] == 2) == seed2
    total = 4 + len(seed2)
    assert len(progress) == total and progress[-1].startswith(f"[##########] {total}/{total}")
    assert all("(kept" in line for line in again if line.startswith("["))
    assert sorted((r["method"], r["lr"]) for r in summary["runs"] if r["seed"] == 1) == [
        ("he", 1e-3), ("he", 1e-2), ("wesar", 1e-3), ("wesar", 1e-2)]
    assert summary["protocols"]["shared"]["lrs"] == {"he": best["he"], "wesar": best["he"]}
    for run in summary["runs"]:
        assert run["steps"] == 6
        assert math.isfinite(run["final_train_loss"]) and math.isfinite(run["final_valid_loss"])
        assert [i for i, _ in run["valid_curve"]] == [3, 6]
        assert run["update_ratio_spread"] == pytest.approx(_spread_from_metrics(out_dir, run))
        assert set(run["spikes"]) == {"loss", "grad_norm"}
        assert (run["gate_count"] > 0) is (run["method"] == "wesar")
        assert run["attn_logit_max_peak"] > 0 and math.isfinite(run["output_log_z_final"])
        assert bool(run["alpha0"]) is (run["method"] == "wesar")
    assert set(summary["methods"]) == {"he", "wesar"}
    report = open(os.path.join(out_dir, "report.md")).read()
    assert "## Findings" in report and "| wesar |" in report
    for name in ("loss_curves.png", "lr_sensitivity.png", "update_ratios.png", "gates.png",
                 "instability_proxies.png"):
        assert open(os.path.join(out_dir, name), "rb").read(8) == PNG_SIGNATURE


def test_spike_table_counts_what_a_spike_policy_did(study_dir):
    """Skipped steps and rewinds get their columns once any run has one, summed per method."""
    from megatron_wesar.study.summary import summarize
    from megatron_wesar.study.tables import table_spikes

    summary = summarize(study_dir)
    assert "rewinds" not in table_spikes(summary)  # no policy acted in the fixture
    he = [r for r in summary["runs"] if r["method"] == "he"]
    he[0]["rewinds"], he[1]["skipped_steps"] = 2, 3
    table = table_spikes(summary).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    row = next([c.strip() for c in line.strip("|").split("|")] for line in table
               if line.startswith("| he |"))
    assert row[header.index("skipped steps")] == "3" and row[header.index("rewinds")] == "2"


def test_fp8_quantization_table_only_for_runs_with_fp8_statistics(study_dir):
    """The report shows the FP8 quantization error per role (mean over the logged steps, seed
    means at each method's best LR) once some run's metrics hold the FP8 statistics."""
    from megatron_wesar.metric_keys import FP8_QUANT_REL_ERROR, FP8_WEIGHT_SCALE, role_mean_key
    from megatron_wesar.study.report import render_report

    with open(render_report(study_dir)) as f:
        assert "## FP8 quantization of the weights" not in f.read()
    # he: errors 3% then 5% on q, 2% on fc2 at the logged steps, scales 4x apart; wesar: 2.6%
    # and one scale on both; small: no FP8
    errors = {"he": {"q": (0.03, 0.05), "fc2": (0.02, 0.02)},
              "wesar": {"q": (0.026, 0.026), "fc2": (0.026, 0.026)}}
    scales = {"he": {"q": 8e-4, "fc2": 2e-4}, "wesar": {"q": 2.5e-4, "fc2": 2.5e-4}}
    for run in os.listdir(os.path.join(study_dir, "runs")):
        method = run.split("_lr")[0]
        if method not in errors:
            continue
        path = os.path.join(study_dir, "runs", run, "metrics.jsonl")
        with open(path) as f:
            records = [json.loads(line) for line in f]
        logged = 0
        for record in records:
            if "tokens_per_s" in record:
                for role, values in errors[method].items():
                    record[role_mean_key(FP8_QUANT_REL_ERROR, role)] = values[logged % 2]
                    record[role_mean_key(FP8_WEIGHT_SCALE, role)] = scales[method][role]
                logged += 1
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    summary = write_summary(study_dir)
    assert _run(summary, "he", 1e-3)["fp8_quant_rel_error"] == pytest.approx(
        {"q": 0.04, "fc2": 0.02})
    assert _run(summary, "small", 1e-3)["fp8_quant_rel_error"] == {}
    with open(render_report(study_dir, summary)) as f:
        report = f.read()
    assert "## FP8 quantization of the weights" in report
    assert ("| method | LR | q | fc2 | error spread (max/min over roles) | scale spread (max/min "
            "over roles) |") in report
    assert "| he | 3e-3 | 4.00% | 2.00% | 2.00x | 4.00x |" in report
    assert "| wesar | 1e-3 | 2.60% | 2.60% | 1.00x | 1.00x |" in report
    assert "| small | 1e-2 | n/a | n/a | n/a | n/a |" in report
