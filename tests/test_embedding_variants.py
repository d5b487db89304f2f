"""The paper's embedding-side baselines (Scaled Embed, Embed LN): what they compute at init, and
that they train the same at TP = 1 and at TP = 2 with sequence parallelism (the Embed LN norm's
gradients are partial sums over the TP group there)."""
import math

import pytest
import torch

from megatron_wesar.embedding_variants import apply_embedding_variant
from tests.helpers.distributed import run_distributed

D, SEQ, STEPS = 64, 16, 3
OVERRIDES = {
    "model.num_layers": 2, "model.hidden_size": D, "model.ffn_hidden_size": 4 * D,
    "model.num_attention_heads": 4, "model.seq_length": SEQ, "training.micro_batch_size": 4,
    "training.global_batch_size": 4, "training.lr_warmup_iters": 0, "training.lr": 3e-3,
    "wesar.enabled": False,
}


def _train(rank, world_size, variant, tp, sp):
    """Initial embedding facts and STEPS training losses of the `variant` baseline, and its
    embedding-norm weight after training (Embed LN)."""
    from megatron.core import parallel_state

    from megatron_wesar.data.sources import EmbeddedCorpus, microbatches
    from megatron_wesar.training.arguments import pretrain_config
    from megatron_wesar.training.engine import build_engine, initialize_parallel, train_step
    from megatron_wesar.training.pretrain import build_optimizer_config, build_transformer_config

    config = pretrain_config({**OVERRIDES, "model.embedding_variant": variant,
                              "parallel.tensor_model_parallel_size": tp,
                              "parallel.sequence_parallel": sp})
    initialize_parallel(tp, 1, seed=5)
    engine = build_engine(build_transformer_config(config), config.wesar, 256, SEQ,
                          build_optimizer_config(config), init_seed=5,
                          embedding_variant=variant)
    model = engine.model[0].module
    embedding = model.embedding
    tokens = torch.arange(SEQ).reshape(1, SEQ) * 7 % 256
    positions = torch.arange(SEQ).reshape(1, SEQ)
    with torch.no_grad():
        word = embedding.word_embeddings(tokens)  # [1, s, h] (hooks included), TP-reduced
        # [s, 1, h]; under sequence parallelism scattered, so checked at TP = 1 only
        out = None if sp else embedding(input_ids=tokens, position_ids=positions)
    init = {"weight_std": embedding.word_embeddings.weight.std().item(), "word": word,
            "out": out, "position": embedding.position_embeddings(positions)}
    data = EmbeddedCorpus(SEQ, 5, max_bytes=200_000)
    dp = parallel_state.get_data_parallel_world_size()
    micro = config.training.micro_batch_size // dp
    losses = []
    for step in range(STEPS):
        batch = data.train_batch(step, config.training.global_batch_size)
        result = train_step(engine, microbatches(batch, parallel_state.get_data_parallel_rank(),
                                                 dp, micro), 1, micro, SEQ)
        losses.append(result.loss)
    norm = getattr(embedding, "embedding_norm", None)
    trained_norm = None if norm is None else norm.weight.detach().clone()
    parallel_state.destroy_model_parallel()
    return init, losses, trained_norm


def _all_runs(rank, world_size):
    return {(variant, tp): _train(rank, world_size, variant, tp, tp > 1)
            for variant in ("none", "scaled-embed", "embed-ln") for tp in (1, 2)}


@pytest.fixture(scope="module")
def runs():
    """Each variant at TP = 1 (DP = 2) and at TP = 2 with sequence parallelism, per rank."""
    return run_distributed(_all_runs, 2)


@pytest.mark.parallel
def test_scaled_embed_scales_the_word_embedding_by_sqrt_d(runs):
    (plain, _, _), (scaled, _, _) = runs[0][("none", 1)], runs[0][("scaled-embed", 1)]
    # the same draw, rescaled to std sqrt(2/(5d)), then multiplied by sqrt(d) in forward
    assert plain["weight_std"] == pytest.approx(math.sqrt(4e-5), rel=0.05)  # He's embedding std
    assert scaled["weight_std"] == pytest.approx(math.sqrt(2 / (5 * D)), rel=0.05)
    ratio = math.sqrt(2 / (5 * D)) / math.sqrt(4e-5) * math.sqrt(D)
    torch.testing.assert_close(scaled["word"], plain["word"] * ratio, rtol=1e-5, atol=1e-7)
    expected = scaled["word"].transpose(0, 1) + scaled["position"].transpose(0, 1)
    torch.testing.assert_close(scaled["out"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parallel
def test_embed_ln_normalises_the_embedding_output(runs):
    (plain, _, _), (normed, _, _) = runs[0][("none", 1)], runs[0][("embed-ln", 1)]
    torch.testing.assert_close(normed["word"], plain["word"])  # the init is He's, unchanged
    out = normed["out"]
    expected = torch.nn.functional.layer_norm(plain["out"], (D,), eps=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parallel
@pytest.mark.parametrize("variant", ["scaled-embed", "embed-ln"])
def test_variants_train_the_same_at_tp2_with_sequence_parallelism(runs, variant):
    (_, losses1, norm1), (_, losses2, norm2) = runs[0][(variant, 1)], runs[0][(variant, 2)]
    assert all(math.isfinite(v) for v in losses1)
    assert losses1 != runs[0][("none", 1)][1]  # the variant changes the model
    assert losses2 == pytest.approx(losses1, rel=1e-4)
    if variant == "embed-ln":
        assert not torch.equal(norm1, torch.ones(D))  # it trained
        torch.testing.assert_close(norm2, norm1, rtol=1e-4, atol=1e-6)  # TP-summed gradients
        torch.testing.assert_close(runs[1][(variant, 2)][2], norm2)  # replicated over TP


def test_an_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="must be one of"):
        apply_embedding_variant(torch.nn.Module(), "embed-rms", 0.02)
