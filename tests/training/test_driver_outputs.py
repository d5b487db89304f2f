"""The pretraining driver's optional inputs and outputs on real gloo ranks: TensorBoard scalars,
a weighted --data-path blend, a Hugging Face --tokenizer-file, the gate learning-rate multiplier
through warm-up and decay, and the gate count of the presets' models.

Every driver run happens in ONE spawn of two ranks (the module fixture `driver`)."""
import json
import math
import random
import traceback
from unittest import mock

import pytest
import torch

from megatron_wesar.training.arguments import parse_pretrain_args
from tests.helpers.distributed import run_distributed

SMALL = ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
         "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--log-interval", "1", "--eval-iters", "1"]
WORLD = 2
WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "rug", "ran"]
TOKENIZER_VOCAB = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
LR, MIN_LR, GATE_LR_MULT = 1e-3, 1e-4, 0.1
# the tiny schedule of the LR runs: warm-up steps and decay steps (= --train-iters)
WARMUP, DECAY = 3, 10


def _group_lrs(engine) -> list:
    """(kinds of its parameters, lr) of every optimizer param group; a parameter's kind is
    'gate', 'matrix' (2-D) or 'vector' (biases, norms)."""
    def kind(p):
        return "gate" if getattr(p, "wesar_gate", False) else "matrix" if p.ndim == 2 else "vector"

    return [(tuple(sorted({kind(p) for p in g["params"]})), g["lr"])
            for g in engine.optimizer.param_groups]


def _run_pretrain(argv) -> dict:
    """Run the driver on `argv`; return its losses, every param group's lr before each step and
    after the last, and the shapes of the word embedding and output layer it built."""
    from megatron_wesar.training import pretrain as driver

    engines, lrs = [], []
    real_build, real_step = driver.build_engine, driver.train_step

    def build_engine(*args, **kwargs):
        engines.append(real_build(*args, **kwargs))
        return engines[-1]

    def train_step(engine, *args, **kwargs):
        lrs.append(_group_lrs(engine))
        return real_step(engine, *args, **kwargs)

    with mock.patch.object(driver, "build_engine", build_engine), \
            mock.patch.object(driver, "train_step", train_step):
        records = driver.pretrain(parse_pretrain_args(argv), log=lambda line: None)
    model = engines[0].module
    lrs.append(_group_lrs(engines[0]))
    return {
        "losses": [r["loss"] for r in records],
        "group_lrs": lrs,
        "embedding_shape": tuple(model.embedding.word_embeddings.weight.shape),
        "output_shape": None if model.output_layer.weight is None else tuple(
            model.output_layer.weight.shape),
        "tied": model.share_embeddings_and_output_weights,
    }


def _preset_gate_counts(presets: dict) -> dict:
    """Number of WeSaR gates of each preset's full-size model, built on the meta device."""
    from megatron.core import parallel_state

    from megatron_wesar.layers import gate_parameters
    from megatron_wesar.spec import build_gpt_model
    from megatron_wesar.training.engine import initialize_parallel
    from megatron_wesar.training.pretrain import build_transformer_config

    counts = {}
    initialize_parallel(1, 1, seed=1)
    for name, argv in presets.items():
        args = parse_pretrain_args(argv)
        with torch.device("meta"):
            model = build_gpt_model(build_transformer_config(args), args.wesar, 256,
                                    args.model.seq_length,
                                    share_embeddings_and_output_weights=True)
        counts[name] = len(gate_parameters(model))
    parallel_state.destroy_model_parallel()
    return counts


def _driver_runs(rank, world_size, runs, presets):
    """Every driver run (a failed one gives its traceback), then the presets' gate counts."""
    from megatron.core import parallel_state

    summaries = {}
    for name, argv in runs.items():
        try:
            summaries[name] = _run_pretrain(argv)
        except Exception:  # noqa: BLE001 - reported by that run's test, the others go on
            summaries[name] = {"error": traceback.format_exc()}
            parallel_state.destroy_model_parallel()
    return summaries, _preset_gate_counts(presets)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Indexed datasets: 'a' = documents of 'a' bytes, 'b' = of 'b' bytes (byte tokenizer),
    'words' = random sentences under a WordLevel tokenizer.json (path 'tokenizer')."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_wesar.data.preprocess import preprocess
    from megatron_wesar.data.tokenizers import ByteTokenizer, build_tokenizer

    root = tmp_path_factory.mktemp("corpora")
    paths = {"tokenizer": str(root / "tokenizer.json")}
    tokenizer = Tokenizer(models.WordLevel(TOKENIZER_VOCAB, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(paths["tokenizer"])
    rng = random.Random(0)
    texts = {
        "a": ["a" * 40] * 100,
        "b": ["b" * 40] * 100,
        "words": [" ".join(rng.choices(WORDS, k=12)) for _ in range(100)],
    }
    for name, documents in texts.items():
        (root / f"{name}.txt").write_text("\n\n".join(documents))
        paths[name] = str(root / name)
        tok = build_tokenizer(paths["tokenizer"]) if name == "words" else ByteTokenizer()
        preprocess([str(root / f"{name}.txt")], paths[name], tok)
    return paths


def blend_args(corpora, train_iters: int):
    """Arguments of a run on the 0.3 'a' + 0.7 'b' blend."""
    return SMALL + ["--train-iters", str(train_iters),
                    "--data-path", "0.3", corpora["a"], "0.7", corpora["b"]]


@pytest.fixture(scope="module")
def driver(corpora, tmp_path_factory):
    """The driver runs (their summaries by name), the presets' gate counts and the output
    directory (metrics.jsonl, tb/) of the 'gate_lr' run."""
    out = tmp_path_factory.mktemp("driver")
    runs = {
        "tokenizer": SMALL + ["--train-iters", "3", "--data-path", corpora["words"],
                              "--tokenizer-file", corpora["tokenizer"],
                              "--tensor-model-parallel-size", "2",
                              "--untie-embeddings-and-output-weights"],
        "gate_lr": SMALL + ["--train-iters", str(DECAY), "--lr-warmup-iters", str(WARMUP),
                            "--lr", str(LR), "--wesar-gate-lr-mult", str(GATE_LR_MULT),
                            "--tensor-model-parallel-size", "2", "--data-path", corpora["b"],
                            "--eval-interval", "5", "--metrics-file", str(out / "metrics.jsonl"),
                            "--tensorboard-dir", str(out / "tb")],
        "no_wesar": SMALL + ["--train-iters", "2", "--lr-warmup-iters", "0", "--lr", str(LR),
                             "--no-wesar", "--wesar-gate-lr-mult", str(GATE_LR_MULT),
                             "--data-path", corpora["b"]],
        "blend": blend_args(corpora, 4),
    }
    presets = {
        "130m": ["--preset", "130m"],
        "1.3b": ["--preset", "1.3b"],
        "13b": ["--preset", "13b"],
        "13b_no_embedding_gate": ["--preset", "13b", "--no-wesar-gate-embedding"],
        "13b_no_wesar": ["--preset", "13b", "--no-wesar"],
    }
    results = run_distributed(_driver_runs, WORLD, runs, presets)
    return {"ranks": [r[0] for r in results], "gates": results[0][1], "out": out}


def _finite(values) -> bool:
    """At least one value, and all of them finite."""
    return len(values) > 0 and all(math.isfinite(v) for v in values)


def run_on_every_rank(driver, name: str) -> list:
    """The summaries of driver run `name` on every rank; fails with the run's traceback."""
    runs = [rank[name] for rank in driver["ranks"]]
    for run in runs:
        assert "error" not in run, run.get("error")
    return runs


@pytest.mark.parallel
def test_tensorboard_scalars_match_the_jsonl_metrics(driver):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_on_every_rank(driver, "gate_lr")
    metrics = driver["out"] / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = {r["iteration"]: r for r in lines if "loss" in r}
    valid = {r["iteration"]: r["valid_loss"] for r in lines if "valid_loss" in r}
    assert len(lines) == 1 + DECAY + 2  # the run header, the steps, 2 evaluations: one rank
    assert sorted(steps) == list(range(1, DECAY + 1)) and sorted(valid) == [5, 10]
    files = list((driver["out"] / "tb").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents.")  # rank 0 only
    events = EventAccumulator(str(driver["out"] / "tb"))
    events.Reload()
    for tag, expected in (("loss", {i: r["loss"] for i, r in steps.items()}),
                          ("lr", {i: r["lr"] for i, r in steps.items()}),
                          ("valid_loss", valid)):
        scalars = {e.step: e.value for e in events.Scalars(tag)}
        assert sorted(scalars) == sorted(expected), tag
        for step, value in expected.items():  # TensorBoard stores float32
            assert math.isclose(scalars[step], value, rel_tol=1e-6), (tag, step)


@pytest.mark.parallel
def test_weighted_data_path_trains(driver):
    for run in run_on_every_rank(driver, "blend"):
        assert len(run["losses"]) == 4 and _finite(run["losses"])


def test_weighted_data_path_draws_from_both_datasets_by_weight(corpora):
    from megatron_wesar.training.pretrain import build_data

    data = build_data(parse_pretrain_args(blend_args(corpora, 100)))
    draws = {"a": 0, "b": 0}
    for step in range(100):
        batch = data.train_batch(step, 4)
        for tokens, labels in zip(batch["tokens"], batch["labels"]):
            seen = set(tokens.tolist()) | set(labels.tolist())
            assert seen in ({ord("a")}, {ord("b")}, {0, ord("a")}, {0, ord("b")}), seen
            draws["a" if ord("a") in seen else "b"] += 1
    assert abs(draws["a"] / 400 - 0.3) < 0.02, draws


@pytest.mark.parallel
def test_tokenizer_file_sets_the_vocabulary_padded_to_tensor_parallel(driver):
    # 11 tokens padded to 12 for TP=2: 6 rows on each rank, the untied output layer alike
    for run in run_on_every_rank(driver, "tokenizer"):
        assert run["embedding_shape"] == (6, 32) and run["output_shape"] == (6, 32)
        assert not run["tied"]
        assert len(run["losses"]) == 3 and _finite(run["losses"])


def expected_lr(step: int, max_lr: float = LR, min_lr: float = MIN_LR, warmup: int = WARMUP,
                decay: int = DECAY) -> float:
    """Linear warm-up from 0 to max_lr, then cosine to min_lr at `decay` steps."""
    if warmup and step <= warmup:
        return max_lr * step / warmup
    return min_lr + 0.5 * (1 + math.cos(math.pi * (step - warmup) / (decay - warmup))) * (
        max_lr - min_lr)


@pytest.mark.parallel
def test_gate_lr_multiplier_holds_through_warmup_and_decay(driver):
    steps = run_on_every_rank(driver, "gate_lr")[0]["group_lrs"]
    assert len(steps) == DECAY + 1  # before every step, and after the last (the floor)
    assert [round(expected_lr(n) / LR, 4) for n in (1, 3, 6, 10)] == [0.3333, 1.0, 0.6501, 0.1]
    for step, groups in enumerate(steps):
        kinds = [kind for kind, _ in groups]
        assert ("gate",) in kinds and any("matrix" in kind for kind in kinds), kinds
        for kind, lr in groups:
            assert "gate" not in kind or kind == ("gate",), kind  # gates only in their own group
            mult = GATE_LR_MULT if kind == ("gate",) else 1.0
            assert math.isclose(lr, mult * expected_lr(step), rel_tol=1e-9, abs_tol=1e-15), (
                step, kind, lr)


@pytest.mark.parallel
def test_no_wesar_has_no_gates_and_no_lr_multiplier(driver):
    steps = run_on_every_rank(driver, "no_wesar")[0]["group_lrs"]
    assert len(steps) == 3
    for step, groups in enumerate(steps):
        for kind, lr in groups:
            assert "gate" not in kind
            assert math.isclose(lr, expected_lr(step, warmup=0, decay=2)), (step, kind, lr)


@pytest.mark.parallel
def test_preset_models_have_six_gates_per_layer_plus_embeddings_and_output(driver):
    # q, k, v, attention output, fc1, fc2 per layer (GeLU presets), the word embedding, the
    # learned position table and the output layer; --no-wesar-gate-embedding ungates both inputs
    assert driver["gates"] == {"130m": 6 * 12 + 3, "1.3b": 6 * 24 + 3, "13b": 6 * 40 + 3,
                               "13b_no_embedding_gate": 6 * 40 + 1, "13b_no_wesar": 0}
