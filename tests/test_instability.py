"""The instability proxies (megatron_wesar.instability) against values computed by hand: the
largest attention logit from each layer's q and k (split by hand from linear_qkv's output, grouped-
query attention, heads sharded over TP=2) and log Z from torch.logsumexp of the gathered
vocab-parallel logits."""
import math

import pytest
import torch

from megatron_wesar.instability import attention_logit_max
from tests.helpers.distributed import run_distributed
from tests.helpers.oracle_harness import Case

CASE = Case(tp=2, dtype=torch.float32, num_heads=4, num_query_groups=2, seq_len=12,
            micro_batch_size=3)


def test_attention_logit_max_ignores_masked_pairs():
    """The causal triangle leaves the future keys out of the max; an explicit mask (True:
    masked) replaces the triangle, as in megatron's softmax."""
    query = torch.zeros(3, 1, 1, 2)
    key = torch.zeros(3, 1, 1, 2)
    query[0, 0, 0] = torch.tensor([1.0, 0.0])
    key[2, 0, 0] = torch.tensor([50.0, 0.0])  # only query 0 x key 2 is large: a future key
    key[0, 0, 0] = torch.tensor([3.0, 0.0])
    assert attention_logit_max(query, key, 0.5, None, causal=True).item() == 1.5
    assert attention_logit_max(query, key, 0.5, None, causal=False).item() == 25.0
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    mask[..., 0, 0] = True
    assert attention_logit_max(query, key, 0.5, mask, causal=True).item() == 25.0
    mask[..., 0, 2] = True
    assert attention_logit_max(query, key, 0.5, mask, causal=True).item() == 0.0


def _rank(rank, world_size, case):
    from megatron.core import parallel_state

    from megatron_wesar.instability import InstabilityMonitor
    from tests.helpers.oracle_harness import build_case_model

    model = build_case_model(case)
    monitor = InstabilityMonitor(model)
    mixed, logits = {}, []
    for layer in model.decoder.layers:
        layer.self_attention.linear_qkv.register_forward_hook(
            lambda m, a, out, i=layer.layer_number - 1: mixed.__setitem__(i, out[0].detach()))
    model.output_layer.register_forward_hook(lambda m, a, out: logits.append(out[0].detach()))
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, case.vocab_size, (case.micro_batch_size, case.seq_len),
                           generator=gen)
    positions = torch.arange(case.seq_len).expand_as(tokens)
    with torch.no_grad():
        model(tokens, positions, None)  # not enabled: measures nothing
        assert monitor.read() == {}
        monitor.enable()
        model(tokens, positions, None)
        monitor.disable()
        hooks = sum(len(m._forward_pre_hooks) for m in monitor.attention)
        model(tokens, positions, None)  # disabled again: adds nothing to the measurement
    read = monitor.read()
    parallel_state.destroy_model_parallel()
    return {"read": read, "mixed": mixed, "logits": logits[1], "hooks_left": hooks}


def _layer_max_by_hand(mixed, case):
    """Max over heads, batch and causal pairs of q.k / sqrt(hn), q and k split from this rank's
    linear_qkv output [s, b, groups * (heads per group + 2) * hn]."""
    hn = case.hidden_size // case.num_heads
    per_group = case.num_heads // case.num_query_groups
    s, b, width = mixed.shape
    groups = width // ((per_group + 2) * hn)
    blocks = mixed.reshape(s, b, groups, per_group + 2, hn)
    best = -math.inf
    for g in range(groups):
        key = blocks[:, :, g, per_group]  # [s, b, hn]
        for h in range(per_group):
            query = blocks[:, :, g, h]
            for batch in range(b):
                for i in range(s):
                    for j in range(i + 1):
                        logit = float(query[i, batch] @ key[j, batch]) / math.sqrt(hn)
                        best = max(best, logit)
    return best


@pytest.mark.parallel
def test_tp2_attention_logit_max_and_log_z_match_hand_computation():
    results = run_distributed(_rank, CASE.world_size, CASE, timeout=300)
    read = results[0]["read"]
    assert results[1]["read"] == read  # TP ranks agree
    # the metrics-file contract: every key starts with one of the two prefixes
    assert read and all(k.startswith(("attn_logit_max", "output_log_z")) for k in read)
    assert all(r["hooks_left"] == 0 for r in results)
    layers = sorted(results[0]["mixed"])
    assert layers == list(range(CASE.num_layers))
    for layer in layers:  # heads are sharded: the max over both ranks' heads
        expected = max(_layer_max_by_hand(r["mixed"][layer], CASE) for r in results)
        assert read[f"attn_logit_max/layer_{layer}"] == pytest.approx(expected, rel=1e-5)
    assert read["attn_logit_max"] == max(read[f"attn_logit_max/layer_{i}"] for i in layers)
    logits = torch.cat([r["logits"] for r in results], dim=-1).double()  # the whole vocabulary
    assert logits.shape[-1] == CASE.vocab_size
    log_z = torch.logsumexp(logits, dim=-1)
    assert read["output_log_z_mean"] == pytest.approx(log_z.mean().item(), rel=1e-5)
    assert read["output_log_z_absmax"] == pytest.approx(log_z.abs().max().item(), rel=1e-5)
    local_only = torch.logsumexp(results[0]["logits"].double(), dim=-1).mean().item()
    assert abs(local_only - read["output_log_z_mean"]) > 1e-3  # the TP reduction matters
