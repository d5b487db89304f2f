"""Torch-native FP8 GEMMs for the gated linear layers, the gate folded into the GEMM's scale.

With `config.fp8` set ("e4m3" or "hybrid", Megatron-LM's `--fp8-format`) and the local layers
(`--transformer-impl local`), every gated transformer linear (qkv, attention output, fc1, fc2)
runs its three GEMMs through `torch._scaled_mm` with per-tensor dynamic scaling (the
"tensorwise" recipe): the activation and W_bar are quantized to e4m3, the output gradient to
e5m2 under "hybrid" (e4m3 under "e4m3"). Each tensor's scale is its amax over the whole logical
tensor (a MAX all-reduce over the TP group, so TP = 2 computes what TP = 1 computes) divided by
the format's largest value. The output layer stays in the model's dtype, as on the TE path.

What is quantized is W_bar, never W_eff: the gate alpha multiplies the weight's dequantization
scale (a (1,) gate) or the output's per-column scale (a fused layer's gates, `FusedLayout`), so
forward costs no pass of its own. In backward the output gradient is quantized once as the
gradient of W_eff's output times the gate(s) (folded into its dequantization scale for a (1,)
gate, multiplied in before quantizing for per-column gates); that one tensor feeds both the input
gradient and W_bar's gradient G = alpha-scaled g^T x. The gate's gradient is the exact analytic
value for the quantized operands: sum over each column of G * W_bar (dequantized) / alpha, one
weight-sized dot product, TP partial (each rank holds a shard of W_bar).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

FORMATS = ("e4m3", "hybrid")
RECIPES = ("tensorwise",)  # the recipes this backend implements
FP8_ROLES = ("qkv", "attn_proj", "fc1", "fc2")  # the transformer linears; not the output layer


class Fp8UnavailableError(RuntimeError):
    """FP8 was asked for where it cannot run (never replaced by a silent bf16 run)."""


@dataclass(frozen=True)
class Fp8Recipe:
    """The torch-native FP8 recipe of one layer: `fmt` ("e4m3": every GEMM operand in e4m3;
    "hybrid": output gradients in e5m2) with per-tensor dynamic scaling."""

    fmt: str

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"fp8 format must be one of {FORMATS}, got {self.fmt!r}")

    @property
    def forward_dtype(self) -> torch.dtype:
        """The FP8 dtype of activations and W_bar."""
        return torch.float8_e4m3fn

    @property
    def grad_dtype(self) -> torch.dtype:
        """The FP8 dtype of output gradients."""
        return torch.float8_e5m2 if self.fmt == "hybrid" else torch.float8_e4m3fn


def recipe_for(config, role: str) -> Fp8Recipe | None:
    """The FP8 recipe of a local gated linear of `role` under `config` (a TransformerConfig), or
    None when it runs in the model's dtype. Raises Fp8UnavailableError where FP8 is asked for but
    this backend cannot give it."""
    fmt = getattr(config, "fp8", None)
    if not fmt or role not in FP8_ROLES:
        return None
    check_supported(config)
    return Fp8Recipe(str(fmt))


def check_supported(config) -> None:
    """Raise Fp8UnavailableError naming why `config`'s FP8 settings cannot run on the
    torch-native backend (the recipe, fp8_param, the params dtype, a GPU without FP8 GEMMs,
    torch without _scaled_mm)."""
    recipe = getattr(config, "fp8_recipe", "tensorwise")
    recipe = getattr(recipe, "value", recipe)
    problems = []
    if recipe not in RECIPES:
        problems.append(f"fp8_recipe {recipe!r} (it implements {', '.join(RECIPES)}; "
                        "delayed, mxfp8 and blockwise need --transformer-impl transformer_engine)")
    if getattr(config, "fp8_param", False):
        problems.append("fp8_param (FP8 parameters / --fp8-param-gather need Transformer Engine)")
    if config.params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        problems.append(f"params_dtype {config.params_dtype} (fp32, bf16 or fp16 only)")
    on_gpu = torch.cuda.is_available() and not config.use_cpu_initialization
    if on_gpu and torch.cuda.get_device_capability() < (8, 9):
        problems.append(f"the GPU {torch.cuda.get_device_name()} (FP8 GEMMs need compute "
                        "capability 8.9 or later: Ada, Hopper, Blackwell)")
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        problems.append(f"torch {torch.__version__} (no torch._scaled_mm / float8 dtypes)")
    if problems:
        raise Fp8UnavailableError(
            "the torch-native FP8 backend (--transformer-impl local) cannot run "
            + "; ".join(problems)
        )


def group_size(group) -> int:
    """The size of process group `group` (1 for None or without torch.distributed)."""
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def amaxes(tensors, group) -> torch.Tensor:
    """The fp32 amax of each tensor, maxed over `group` (one collective for all of them)."""
    values = torch.stack([t.detach().abs().amax().float() for t in tensors])
    if group_size(group) > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return values


def quantize(tensor: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype):
    """(q, d): `tensor` in FP8 `dtype` with per-tensor dequantization scale d = amax / max(dtype)
    (fp32, 0-dim), so that q * d approximates tensor; an all-zero tensor gets d = 1 / max."""
    fmax = torch.finfo(dtype).max
    d = torch.where(amax > 0, amax, torch.ones_like(amax)) / fmax
    q = (tensor.float() / d).clamp_(-fmax, fmax).to(dtype)
    return q, d


def check_cuda_gemm_shape(a, b_t) -> None:
    """Raise Fp8UnavailableError unless the GEMM a @ b_t.T fits CUDA's FP8 GEMMs: contraction
    and output sizes multiples of 16 (CPU has no such rule)."""
    contraction, columns = a.shape[1], b_t.shape[0]
    if contraction % 16 or columns % 16:
        raise Fp8UnavailableError(
            f"an FP8 GEMM of [{a.shape[0]} x {contraction}] by [{contraction} x {columns}] on "
            "CUDA: its contraction and output sizes must be multiples of 16; so must the hidden "
            "size, each linear's output features per TP rank and the tokens per micro-batch "
            "(micro-batch size x sequence length)")


def scaled_mm(a, b_t, scale_a, scale_b, out_dtype):
    """a @ b_t.T in FP8 via torch._scaled_mm with fp32 dequantization scales: `scale_a` 0-dim
    (per tensor) and `scale_b` 0-dim or of shape (N,) (per output column; `scale_a` is then
    expanded per row). _scaled_mm's per-column (row-wise) scaling gives a bf16 output only on
    CUDA, so for any other `out_dtype` the columns are scaled after a per-tensor GEMM."""
    if a.is_cuda:
        check_cuda_gemm_shape(a, b_t)
    scale_a = scale_a.float()
    scale_b = scale_b.float()
    if scale_b.numel() > 1 and out_dtype != torch.bfloat16:
        one = torch.ones((), dtype=torch.float32, device=scale_b.device)
        return (scaled_mm(a, b_t, scale_a, one, torch.float32) * scale_b).to(out_dtype)
    if scale_b.numel() > 1:
        scale_a = scale_a.reshape(1, 1).expand(a.shape[0], 1).contiguous()
        scale_b = scale_b.reshape(1, -1)
    else:
        scale_a, scale_b = scale_a.reshape(()), scale_b.reshape(())
    # _scaled_mm wants a row-major and b column-major
    return torch._scaled_mm(a.contiguous(), b_t.contiguous().t(), scale_a=scale_a,
                            scale_b=scale_b, out_dtype=out_dtype)


def _unrounded_quantize(tensor, amax, dtype):
    """quantize without the rounding: the tensor in fp32 with dequantization scale 1."""
    return tensor.float(), torch.ones((), dtype=torch.float32, device=tensor.device)


def _unrounded_scaled_mm(a, b_t, scale_a, scale_b, out_dtype):
    """scaled_mm in fp32 on unrounded operands (same scale conventions)."""
    scale_b = scale_b.float().reshape(1, -1) if scale_b.numel() > 1 else scale_b.float()
    return ((a.float() @ b_t.float().T) * scale_a.float() * scale_b).to(out_dtype)


@contextmanager
def without_rounding():
    """Within the block the FP8 layers run their whole arithmetic (the gate folded into the
    GEMM's scale, the gate gradient on the GEMM operands, the TP amax collective) on unrounded
    fp32 tensors: a diagnostic that tells FP8 rounding apart from the rest of the FP8 path
    (tests/test_fp8.py holds it to the dense reference; bench/fp8_gradient_error.py compares
    gradients with and without the rounding). Not thread-safe: it swaps module functions."""
    global quantize, scaled_mm
    rounded = quantize, scaled_mm
    quantize, scaled_mm = _unrounded_quantize, _unrounded_scaled_mm
    try:
        yield
    finally:
        quantize, scaled_mm = rounded


class Fp8GatedLinear(torch.autograd.Function):
    """out = (x W_bar^T) * scale in FP8 (see the module docstring), on this rank's shards.

    x: [..., K]; weight: [N, K] (W_bar); scale: None, a (1,) gate or a per-column (N,) scale;
    `group`: the TP group over which amaxes are maxed (None: no collective).
    `accumulate_in_main_grad`: add W_bar's gradient into `weight.main_grad` (megatron's
    gradient-accumulation fusion protocol) instead of returning it.
    """

    @staticmethod
    def forward(ctx, x, weight, scale, recipe, group, accumulate_in_main_grad):
        out_shape = (*x.shape[:-1], weight.shape[0])
        x2 = x.reshape(-1, x.shape[-1])
        amax_x, amax_w = amaxes([x2, weight], group)
        xq, dx = quantize(x2, amax_x, recipe.forward_dtype)
        wq, dw = quantize(weight, amax_w, recipe.forward_dtype)
        one = torch.ones(1, dtype=torch.float32, device=x.device)
        col = one if scale is None else scale.detach().float()
        out = scaled_mm(xq, wq, dx, dw * col, x.dtype)
        ctx.save_for_backward(xq, wq, dx, dw, col)
        ctx.recipe, ctx.group, ctx.x_dtype = recipe, group, x.dtype
        ctx.has_scale, ctx.fused = scale is not None, accumulate_in_main_grad
        ctx.weight = weight if accumulate_in_main_grad else None
        ctx.weight_dtype = weight.dtype
        return out.reshape(out_shape)

    @staticmethod
    def backward(ctx, grad):
        xq, wq, dx, dw, col = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gs = g2 if col.numel() == 1 else g2.float() * col  # the gradient of x W_bar^T
        (amax_g,) = amaxes([gs], ctx.group)
        gq, dg = quantize(gs, amax_g, ctx.recipe.grad_dtype)
        if col.numel() == 1:
            dg = dg * col.reshape(())
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = scaled_mm(gq, wq.t(), dg, dw, ctx.x_dtype).reshape(
                *grad.shape[:-1], wq.shape[1])
        grad_w_bar = scaled_mm(gq.t(), xq.t(), dg, dx, torch.float32)  # [N, K]
        grad_scale = None
        if ctx.has_scale and ctx.needs_input_grad[2]:
            acc = torch.float64 if ctx.x_dtype == torch.float64 else torch.float32
            per_column = (grad_w_bar.to(acc) * wq.to(acc)).sum(1) * dw.to(acc) / col.to(acc)
            grad_scale = per_column.sum().reshape(1) if col.numel() == 1 else per_column
            grad_scale = grad_scale.float()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            if ctx.fused:
                weight = ctx.weight
                weight.main_grad.add_(grad_w_bar.to(weight.main_grad.dtype))
                if hasattr(weight, "grad_added_to_main_grad"):  # megatron DDP's protocol
                    weight.grad_added_to_main_grad = True
                    grad_weight = torch.zeros_like(weight)
            else:
                grad_weight = grad_w_bar.to(ctx.weight_dtype)
        return grad_x, grad_weight, grad_scale, None, None, None


def fp8_linear(x, weight, scale, recipe: Fp8Recipe, group=None,
               accumulate_in_main_grad: bool = False) -> torch.Tensor:
    """(x W_bar^T) * scale computed in FP8 (Fp8GatedLinear); `scale` None for an ungated
    layer."""
    return Fp8GatedLinear.apply(x, weight, scale, recipe, group, accumulate_in_main_grad)
