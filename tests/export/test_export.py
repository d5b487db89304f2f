"""Export of WeSaR checkpoints (megatron_wesar.export): parity of the Hugging Face and plain
Megatron exports with the gated model, the import round trip, and the refusals.

The scenario (tests/export/scenario.py) runs once on 2 gloo ranks; the Hugging Face models are
loaded here with transformers. Parity is max |logits - gated logits| / max |gated logits| over
a 2 x 32 batch, float32 weights; a gate changed by 0.1% must break it.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.export import scenario
from tests.helpers.distributed import run_distributed

PARITY = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The scenario's results and its directory."""
    root = tmp_path_factory.mktemp("export")
    return run_distributed(scenario.run, 2, str(root))[0], root


def relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference|."""
    return float((value.double() - reference).abs().max() / reference.abs().max())


def hf_logits(directory) -> torch.Tensor:
    """Logits of the Hugging Face model `directory`, loaded by transformers with nothing
    missing, unexpected or reinitialised."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True,
                                                       dtype=torch.float32)
    assert not any(info.values()), info
    with torch.no_grad():
        return model.eval()(scenario.tokens()).logits


@pytest.mark.parallel
@pytest.mark.parametrize("name, architecture", [("gpt2", "GPT2LMHeadModel"),
                                                ("llama", "LlamaForCausalLM")])
def test_hf_export_matches_gated_model(exported, name, architecture):
    results, root = exported
    with open(root / name / "hf" / "config.json") as f:
        config = json.load(f)
    assert config["architectures"] == [architecture]
    gated = results[name]["gated"]
    difference = relative_difference(hf_logits(root / name / "hf"), gated)
    print(f"{name}: HF vs gated max relative difference {difference:.2e}")
    assert difference <= PARITY
    assert relative_difference(hf_logits(root / name / "hf_perturbed"), gated) > 10 * PARITY


@pytest.mark.parallel
def test_tied_embedding_with_two_gates_becomes_two_matrices(exported):
    results, root = exported
    gates = results["gpt2"]["gates"]
    assert gates["embedding.word_embeddings.gate"] != gates["output_layer.gate"]
    with open(root / "gpt2" / "hf" / "config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is False
    with open(root / "gpt2" / "megatron" / "wesar_export.json") as f:
        assert json.load(f)["tied_embeddings"] is False


@pytest.mark.parallel
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_megatron_export_loads_in_other_layouts(exported, name):
    results, _ = exported
    gated = results[name]["gated"]
    for layout in ("plain_tp1", "plain_tp2", "plain_pp2"):
        difference = relative_difference(results[layout][name], gated)
        print(f"{name}: {layout} vs gated max relative difference {difference:.2e}")
        assert difference <= PARITY


@pytest.mark.parallel
def test_round_trip_gives_identical_tensors(exported):
    from safetensors.torch import load_file

    results, root = exported
    name = "gpt2"  # the Llama mapping's round trip: test_layout.py; its import: the next test
    for code, err in results["round_trip"][name]:
        assert code == 0, err
    first = load_file(root / name / "hf_tied" / "model.safetensors")
    again = load_file(root / name / "hf_again" / "model.safetensors")
    assert "lm_head.weight" not in again  # tied stays tied (both gates 1)
    assert sorted(first) == sorted(again)
    assert all(torch.equal(first[key], again[key]) for key in first)
    with open(root / name / "hf_again" / "config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is True
    tokenizer = "tokenizer.json"
    assert (root / name / "hf" / tokenizer).read_text() == (
        root / name / "hf_again" / tokenizer).read_text()


@pytest.mark.parallel
def test_rescaled_import_has_common_sigma_and_same_model(exported):
    results, _ = exported
    trip = results["round_trip"]
    assert trip["rescaled"][0] == 0, trip["rescaled"][1]
    sigma = trip["rescaled_sigma"]
    assert all(abs(std / sigma - 1) < 1e-5 for std in trip["rescaled_stds"].values())
    assert relative_difference(trip["rescaled_logits"], results["llama"]["gated"]) <= PARITY
    assert len(trip["resumed_losses"]) == 2
    assert all(map(torch.isfinite, torch.tensor(trip["resumed_losses"])))


@pytest.mark.parallel
def test_bad_input_is_named_and_nothing_is_half_written(exported):
    results, root = exported
    refusals = results["refusals"]
    assert refusals["no_tracker"][0] == 1
    assert "latest_checkpointed_iteration.txt" in refusals["no_tracker"][1]
    assert refusals["baseline"][0] == 1 and "without WeSaR" in refusals["baseline"][1]
    assert refusals["exists"][0] == 1 and "already exists" in refusals["exists"][1]
    code, message = refusals["other_shape"]
    assert code == 1 and "checkpoint (2, 128, 64), this model (2, 256, 64)" in message
    assert not any(".tmp-" in name for name in refusals["left"])
    assert not any(os.path.exists(root / name) for name in "xyz")
