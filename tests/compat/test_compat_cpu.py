"""megatron-core on CPU/gloo through megatron_wesar.compat.cpu, and megatron_wesar.norm.TorchNorm.

The distributed cases spawn real gloo process groups: one 2-rank group for tensor parallelism
with sequence parallelism, DDP and the (distributed) optimizer; one 4-rank group for the
pipeline schedule with tied embeddings (PP2 x TP2) and dist_checkpointing. Each group runs
several configurations one after the other and the tests compare their numbers.
"""
import logging

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.distributed import run_distributed

SEQ, MBS, HIDDEN, HEADS, VOCAB, LAYERS = 32, 2, 64, 4, 128, 2
NUM_MB, STEPS, SEED = 2, 3, 1234
RTOL = 1e-5


# ----------------------------------------------------------------------------------------------
# Helpers that run inside the spawned ranks.


def _config(tp, pp, sp, bf16=False):
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
        use_cpu_initialization=True,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def _gpt(tp, pp, sp, tied, seed, torch_norm=True, bf16=False):
    """A small GPTModel on this rank's stage; local spec, norms TorchNorm (or megatron's)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from megatron_wesar.norm import TorchNorm

    config = _config(tp, pp, sp, bf16)
    spec = get_gpt_layer_local_spec()
    if torch_norm:
        spec.submodules.input_layernorm = TorchNorm
        spec.submodules.pre_mlp_layernorm = TorchNorm
        spec = TransformerBlockSubmodules(
            layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=TorchNorm
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = GPTModel(
        config,
        spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=tied,
    )
    return model, config


def _trainable(
    tp, pp, sp, tied, overlap, distopt, seed=SEED, torch_norm=True, init_from=None, bf16=False
):
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    gpt, config = _gpt(tp, pp, sp, tied, seed, torch_norm, bf16)
    if init_from is not None:
        gpt.load_state_dict(dist_checkpointing.load(gpt.sharded_state_dict(), init_from))
    if bf16:
        gpt = Float16Module(config, gpt)
    ddp_config = DistributedDataParallelConfig(
        overlap_grad_reduce=overlap, use_distributed_optimizer=distopt, grad_reduce_in_fp32=bf16
    )
    model = DDP(config, ddp_config, gpt)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    if overlap:
        config.grad_sync_func = model.start_grad_sync
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-3,
            weight_decay=0.01,
            clip_grad=1.0,
            use_distributed_optimizer=distopt,
            log_num_zeros_in_grad=True,
            bf16=bf16,
            params_dtype=config.params_dtype,
        ),
        [model],
    )
    return model, optimizer


def _batches(seed, n):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=gen) for _ in range(n)]


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    position_ids = torch.arange(SEQ).expand(MBS, -1)
    # attention_mask=None: the causal mask comes from megatron's get_default_causal_mask.
    output = model(batch[:, :-1], position_ids, None, labels=batch[:, 1:])

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

    return output, loss_func


def _train(model, optimizer, batches):
    """STEPS optimizer steps of NUM_MB microbatches; per-step loss (last stage) and stats."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_backward = get_forward_backward_func()
    losses, grad_norms, num_zeros = [], [], []
    for step in range(STEPS):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(
            forward_step_func=_forward_step,
            data_iterator=iter(batches[step * NUM_MB : (step + 1) * NUM_MB]),
            model=[model],
            num_microbatches=NUM_MB,
            seq_length=SEQ,
            micro_batch_size=MBS,
        )
        ok, grad_norm, zeros = optimizer.step()
        assert ok
        losses.append(sum(o["loss"].item() for o in out) / NUM_MB if out else None)
        grad_norms.append(grad_norm)
        num_zeros.append(zeros)
    return losses, grad_norms, num_zeros


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _tp_dp_group(rank, world_size):
    """2 ranks: TP2+SP (with/without overlap), then DP2 with/without the distributed optimizer."""
    from megatron.core import parallel_state as ps

    from megatron_wesar.compat import enable_cpu_compat

    assert enable_cpu_compat()
    out = {}

    # (a) TP=2 with sequence parallelism, overlapped grad reduce, plain optimizer.
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    model, opt = _trainable(tp=2, pp=1, sp=True, tied=False, overlap=True, distopt=False)
    norm = model.module.decoder.final_layernorm
    out["sp_marks"] = [getattr(p, "sequence_parallel", None) for p in norm.parameters()]
    out["tp2"] = _train(model, opt, _batches(0, NUM_MB * STEPS))
    # Replicated (TP-duplicated) params after 3 steps: equal across TP ranks only if the
    # sequence-parallel norm gradients were summed over TP.
    out["tp2_norms"] = _params(model.module.decoder)
    ps.destroy_model_parallel()

    # The same setup without overlap, one batch repeated: the loss must go down.
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    model, opt = _trainable(tp=2, pp=1, sp=True, tied=False, overlap=False, distopt=False)
    out["repeat"] = _train(model, opt, _batches(3, NUM_MB) * STEPS)[0]
    ps.destroy_model_parallel()

    # Reference for (a): TP=1, DP=2 with the same data on both ranks = single-process run.
    ps.initialize_model_parallel()
    model, opt = _trainable(tp=1, pp=1, sp=False, tied=False, overlap=False, distopt=False)
    out["tp1"] = _train(model, opt, _batches(0, NUM_MB * STEPS))
    ps.destroy_model_parallel()

    # (c) DP=2 with different data per rank: plain optimizer vs distributed optimizer.
    # bf16 with fp32 main params: Float16OptimizerWithFloat16Params / DistributedOptimizer.
    for name, overlap, distopt, bf16 in (
        ("dp_plain_overlap", True, False, False),
        ("dp_dist", False, True, False),
        ("dp_dist_overlap", True, True, False),
        ("dp_bf16", False, False, True),
        ("dp_bf16_dist", True, True, True),
    ):
        ps.initialize_model_parallel()
        model, opt = _trainable(
            tp=1, pp=1, sp=False, tied=False, overlap=overlap, distopt=distopt, bf16=bf16
        )
        out[name + "_class"] = [type(o).__name__ for o in opt.chained_optimizers]
        losses, grad_norms, _ = _train(model, opt, _batches(100 + rank, NUM_MB * STEPS))
        out[name] = (losses, grad_norms, _params(model.module))
        ps.destroy_model_parallel()
    return out


def _pipeline_group(rank, world_size, ckpt_dir):
    """4 ranks: PP2 x TP2 (+SP) with tied embeddings and dist checkpoints, then the PP1 reference.

    Megatron initialises each pipeline stage from the same seed, so a PP=2 model does not start
    from the PP=1 model's weights; the reference loads the PP2 x TP2 initial checkpoint
    (resharded) instead, through dist_checkpointing.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_wesar.compat import enable_cpu_compat

    assert enable_cpu_compat()
    out = {}
    data = _batches(7, NUM_MB * STEPS)

    # (b) PP=2 x TP=2, sequence parallel, tied embeddings, overlapped grad reduce.
    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    model, opt = _trainable(tp=2, pp=2, sp=True, tied=True, overlap=True, distopt=False)
    gpt = model.module
    dist_checkpointing.save(gpt.sharded_state_dict(), f"{ckpt_dir}/init")
    out["pp_losses"], out["pp_grad_norms"], _ = _train(model, opt, data)
    out["is_embedding_stage"] = ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage()
    out["tied_weight"] = gpt.shared_embedding_or_output_weight().detach().clone()

    # (d) dist_checkpointing: save, load into a fresh model built from another seed.
    trained = _params(gpt)
    dist_checkpointing.save(gpt.sharded_state_dict(), f"{ckpt_dir}/trained")
    fresh, _ = _gpt(tp=2, pp=2, sp=True, tied=True, seed=SEED + 1)
    before = _params(fresh)
    out["fresh_differs"] = any(not torch.equal(before[n], trained[n]) for n in trained)
    sharded = fresh.sharded_state_dict()
    fresh.load_state_dict(dist_checkpointing.load(sharded, f"{ckpt_dir}/trained"))
    loaded = _params(fresh)
    out["ckpt_names_match"] = sorted(loaded) == sorted(trained)
    out["ckpt_max_diff"] = max((loaded[n] - trained[n]).abs().max().item() for n in trained)
    ps.destroy_model_parallel()

    # Single-process reference: PP=1, TP=1 (DP=4, identical data), megatron's own local spec
    # and norm, started from the PP2 x TP2 initial weights.
    ps.initialize_model_parallel()
    model, opt = _trainable(
        tp=1, pp=1, sp=False, tied=True, overlap=False, distopt=False, torch_norm=False,
        init_from=f"{ckpt_dir}/init",
    )
    out["ref_losses"], out["ref_grad_norms"], _ = _train(model, opt, data)
    # The trained PP2 x TP2 checkpoint, resharded into TP1/PP1, equals the reference's weights.
    fresh, _ = _gpt(tp=1, pp=1, sp=False, tied=True, seed=SEED + 1, torch_norm=False)
    sharded = fresh.sharded_state_dict()
    fresh.load_state_dict(dist_checkpointing.load(sharded, f"{ckpt_dir}/trained"))
    ref, loaded = _params(model.module), _params(fresh)
    out["reshard_max_diff"] = max((loaded[n] - ref[n]).abs().max().item() for n in ref)
    ps.destroy_model_parallel()
    return out


# ----------------------------------------------------------------------------------------------
# Distributed tests.


@pytest.fixture(scope="module")
def tp_dp_results():
    return run_distributed(_tp_dp_group, 2)


@pytest.fixture(scope="module")
def pipeline_results(tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("ckpt")  # dist_checkpointing needs psutil: a requirement
    (ckpt_dir / "init").mkdir()
    (ckpt_dir / "trained").mkdir()
    return run_distributed(_pipeline_group, 4, str(ckpt_dir))


def _close(a, b, rtol=RTOL):
    return abs(a - b) <= rtol * max(abs(a), abs(b))


@pytest.mark.parallel
def test_tp2_sequence_parallel_training_matches_tp1(tp_dp_results):
    r0, r1 = tp_dp_results
    assert r0["sp_marks"] == [True, True]
    tp2_losses, tp2_norms, tp2_zeros = r0["tp2"]
    tp1_losses, tp1_norms, tp1_zeros = r0["tp1"]
    assert r1["tp2"][0] == tp2_losses  # both TP ranks see the same loss
    assert all(torch.isfinite(torch.tensor(tp2_losses)))
    assert tp2_norms[0] > 1.0  # clip_grad=1.0 is active
    # Megatron's CPU init is TP-invariant: step 0 equals the TP=1 run; later steps too.
    assert _close(tp2_losses[0], tp1_losses[0], 1e-6), (tp2_losses, tp1_losses)
    for a, b in zip(tp2_losses + tp2_norms, tp1_losses + tp1_norms):
        assert _close(a, b), (tp2_losses, tp1_losses, tp2_norms, tp1_norms)
    # count_zeros_fp32 ran and deduplicated TP replicas (later steps: a stray exact zero or two).
    assert tp2_zeros[0] == tp1_zeros[0] > 0
    assert all(abs(a - b) <= 2 for a, b in zip(tp2_zeros, tp1_zeros)), (tp2_zeros, tp1_zeros)
    # TP-replicated norm params stay identical across the two TP ranks after 3 steps.
    norms0, norms1 = r0["tp2_norms"], r1["tp2_norms"]
    replicated = [n for n in norms0 if "layernorm" in n]
    assert len(replicated) == 2 * LAYERS * 2 + 2
    for name in replicated:
        assert torch.equal(norms0[name], norms1[name]), name


@pytest.mark.parallel
def test_loss_decreases_on_repeated_batch(tp_dp_results):
    """The full TP=2/SP step actually trains: repeating one batch makes its loss go down."""
    losses = tp_dp_results[0]["repeat"]
    assert losses[0] > losses[1] > losses[2], losses


@pytest.mark.parallel
def test_distributed_optimizer_matches_plain_optimizer(tp_dp_results):
    for rank, result in enumerate(tp_dp_results):
        assert result["dp_dist_class"] == ["DistributedOptimizer"]
        plain_losses, plain_norms, plain_params = result["dp_plain_overlap"]
        for name in ("dp_dist", "dp_dist_overlap"):
            losses, norms, params = result[name]
            for a, b in zip(losses + norms, plain_losses + plain_norms):
                assert _close(a, b), (rank, name, losses, plain_losses, norms, plain_norms)
            for n, p in params.items():
                torch.testing.assert_close(p, plain_params[n], rtol=1e-5, atol=1e-6)
    # Different data per rank, yet one model: the params agree across the DP ranks.
    p0, p1 = tp_dp_results[0]["dp_dist"][2], tp_dp_results[1]["dp_dist"][2]
    assert tp_dp_results[0]["dp_dist"][0] != tp_dp_results[1]["dp_dist"][0]
    for n in p0:
        assert torch.equal(p0[n], p1[n]), n


@pytest.mark.parallel
def test_bf16_mixed_precision_optimizers(tp_dp_results):
    for result in tp_dp_results:
        assert result["dp_bf16_class"] == ["Float16OptimizerWithFloat16Params"]
        assert result["dp_bf16_dist_class"] == ["DistributedOptimizer"]
        fp32_losses = result["dp_plain_overlap"][0]
        plain_losses, plain_norms, plain_params = result["dp_bf16"]
        dist_losses, dist_norms, dist_params = result["dp_bf16_dist"]
        assert all(p.dtype == torch.bfloat16 for p in plain_params.values())
        for a, b in zip(plain_losses, fp32_losses):
            assert _close(a, b, 2e-2), (plain_losses, fp32_losses)
        # Same fp32 main-param math with and without sharding the optimizer.
        for a, b in zip(dist_losses + dist_norms, plain_losses + plain_norms):
            assert _close(a, b, 1e-4), (dist_losses, plain_losses, dist_norms, plain_norms)
        for n, p in dist_params.items():
            torch.testing.assert_close(p, plain_params[n], rtol=1e-2, atol=1e-3)


@pytest.mark.parallel
def test_pipeline_tied_embeddings_match_single_process(pipeline_results):
    last = [r for r in pipeline_results if r["pp_losses"][0] is not None]
    assert len(last) == 2  # the two TP ranks of the last stage
    assert all(torch.isfinite(torch.tensor(r["pp_losses"])).all() for r in last)
    # Tied word embedding: the first-stage and last-stage copies start equal (the last stage
    # zero-initialises its copy and all-reduces it) and stay equal.
    world = len(pipeline_results)
    for tp_rank in range(2):
        first, last_stage = pipeline_results[tp_rank], pipeline_results[world // 2 + tp_rank]
        assert first["is_embedding_stage"] and last_stage["is_embedding_stage"]
        assert torch.equal(first["tied_weight"], last_stage["tied_weight"])
        assert first["tied_weight"].abs().sum() > 0
    for r in last:
        for a, b in zip(r["pp_losses"], r["ref_losses"]):
            assert _close(a, b), (r["pp_losses"], r["ref_losses"])
    for r in pipeline_results:
        for a, b in zip(r["pp_grad_norms"], r["ref_grad_norms"]):
            assert _close(a, b), (r["pp_grad_norms"], r["ref_grad_norms"])


@pytest.mark.parallel
def test_dist_checkpoint_roundtrip(pipeline_results):
    for r in pipeline_results:
        assert r["fresh_differs"]
        assert r["ckpt_names_match"]
        assert r["ckpt_max_diff"] == 0.0
        # PP2 x TP2 checkpoint loaded into TP1/PP1 equals the TP1 model trained the same way.
        assert r["reshard_max_diff"] < 5e-5, r["reshard_max_diff"]


# ----------------------------------------------------------------------------------------------
# In-process tests.


@pytest.fixture
def compat_off():
    """Run with the layer disabled; restore whatever state the process had."""
    from megatron_wesar.compat import cpu

    was_active = cpu.cpu_compat_active()
    cpu.disable_cpu_compat()
    yield cpu
    cpu.disable_cpu_compat()
    if was_active:
        cpu.enable_cpu_compat(force=True)


def _snapshot(cpu):
    targets = [(owner, name) for owner, name, _new, _why in cpu._patches()]
    return {(id(owner), name): vars(owner)[name] for owner, name in targets}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU-only machine says")
def test_initialize_parallel_needs_the_layer_enabled_explicitly(compat_off):
    from megatron_wesar.training.engine import initialize_parallel

    with pytest.raises(RuntimeError, match=r"megatron_wesar.compat.enable_cpu_compat\(\)"):
        initialize_parallel(1, 1, seed=0)


def test_importing_the_library_patches_nothing():
    """Only entry points (and an explicit call) enable the layer: a fresh process that imports
    and builds configs with the library keeps torch.cuda and megatron-core untouched."""
    import subprocess
    import sys

    code = ("import torch, megatron_wesar.training.pretrain, megatron_wesar.study.runner\n"
            "from megatron_wesar.compat import cpu_compat_active\n"
            "original = torch.cuda.current_device\n"
            "assert not cpu_compat_active() and torch.cuda.current_device is original\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_inactive_when_cuda_available(compat_off, monkeypatch):
    cpu = compat_off
    from megatron.core.optimizer import optimizer as megatron_optimizer

    before = _snapshot(cpu)
    alias_before = megatron_optimizer.get_grad_norm_fp32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu.enable_cpu_compat() is False
    assert cpu.cpu_compat_active() is False
    assert _snapshot(cpu) == before
    assert megatron_optimizer.get_grad_norm_fp32 is alias_before
    # Forced, it patches (including the `from ... import` copies), and it undoes exactly.
    assert cpu.enable_cpu_compat(force=True) is True
    assert cpu.enable_cpu_compat() is True  # idempotent
    after = _snapshot(cpu)
    assert all(after[key] is not before[key] for key in before)
    assert megatron_optimizer.get_grad_norm_fp32 is not alias_before
    cpu.disable_cpu_compat()
    assert _snapshot(cpu) == before
    assert megatron_optimizer.get_grad_norm_fp32 is alias_before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what raises without CUDA")
def test_cuda_requests_redirected_only_while_active(compat_off):
    cpu = compat_off
    from megatron.core.transformer import utils as tutils

    with pytest.raises((AssertionError, RuntimeError)):
        tutils.get_default_causal_mask(4)
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    assert cpu.enable_cpu_compat() is True
    assert torch.cuda.current_device() == torch.device("cpu")
    mask = tutils.get_default_causal_mask(4)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).triu(1))
    # Outside the wrapped functions nothing is redirected.
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_rng_tracker_forks_cpu_streams(compat_off, caplog):
    cpu = compat_off
    from megatron.core.tensor_parallel import random as mrandom

    cpu.enable_cpu_compat(force=True)
    seed, tp_rank = 123, 1
    mrandom.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
    tracker = mrandom.get_cuda_rng_tracker()
    expected_default = torch.Generator().manual_seed(seed)
    expected_tp = torch.Generator().manual_seed(seed + 2718 + tp_rank)
    with caplog.at_level(logging.WARNING):
        with tracker.fork():
            inside = torch.rand(5)
        outside = torch.rand(5)
        with tracker.fork():
            inside_again = torch.rand(5)
    assert torch.equal(inside, torch.rand(5, generator=expected_tp))
    assert torch.equal(inside_again, torch.rand(5, generator=expected_tp))
    assert torch.equal(outside, torch.rand(5, generator=expected_default))
    assert "CPU RNG state changed" not in caplog.text


def _norm_config(normalization="LayerNorm", sp=False, zero_centered=False, dtype=torch.float32):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        tensor_model_parallel_size=2 if sp else 1,
        sequence_parallel=sp,
        normalization=normalization,
        layernorm_zero_centered_gamma=zero_centered,
        params_dtype=dtype,
        use_cpu_initialization=True,
    )


@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_torch_norm_matches_reference(normalization, zero_centered):
    from megatron_wesar.norm import TorchNorm

    norm = TorchNorm(_norm_config(normalization, zero_centered=zero_centered), HIDDEN, eps=1e-6)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SEQ, MBS, HIDDEN, generator=gen, dtype=torch.float64).float()
    # Identity at init (gamma = 1, beta = 0), whatever the storage of gamma.
    assert torch.equal(norm.weight, torch.full((HIDDEN,), 0.0 if zero_centered else 1.0))
    gamma = 1.0 + 0.1 * torch.randn(HIDDEN, generator=gen)
    beta = 0.1 * torch.randn(HIDDEN, generator=gen)
    with torch.no_grad():
        norm.weight.copy_(gamma - 1.0 if zero_centered else gamma)
        if normalization == "LayerNorm":
            norm.bias.copy_(beta)
    y = norm(x)
    if normalization == "LayerNorm":
        ref = F.layer_norm(x, (HIDDEN,), gamma, beta, 1e-6)
        assert [n for n, _ in norm.named_parameters()] == ["weight", "bias"]
    else:
        ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gamma
        assert [n for n, _ in norm.named_parameters()] == ["weight"]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_torch_norm_sequence_parallel_marks_and_dtype():
    from megatron_wesar.norm import TorchNorm

    plain = TorchNorm(_norm_config(sp=False), HIDDEN)
    assert [p.sequence_parallel for p in plain.parameters()] == [False, False]
    sp = TorchNorm(_norm_config(sp=True, dtype=torch.bfloat16), HIDDEN)
    assert [p.sequence_parallel for p in sp.parameters()] == [True, True]
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in sp.parameters())
    assert sp(torch.randn(4, HIDDEN, dtype=torch.bfloat16)).dtype == torch.bfloat16
    rms = TorchNorm(_norm_config("RMSNorm", sp=True), HIDDEN)
    assert [p.sequence_parallel for p in rms.parameters()] == [True]


def test_torch_norm_rejects_other_normalization():
    from megatron_wesar.norm import TorchNorm

    config = _norm_config()
    config.normalization = "L2Norm"
    with pytest.raises(ValueError, match="LayerNorm' or 'RMSNorm"):
        TorchNorm(config, HIDDEN)
