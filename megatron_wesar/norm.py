"""The norms of the local layer spec: a plain-PyTorch LayerNorm / RMSNorm with sequence
parallelism (`TorchNorm`), or megatron-core's apex-backed FusedLayerNorm where apex is here
(`local_norm`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from .accelerators import apex_available
from .layers import parameter_device


class TorchNorm(torch.nn.Module):
    """LayerNorm or RMSNorm (per `config.normalization`) built the way megatron builds norms.

    Drop-in for a layer spec's `input_layernorm`, `pre_mlp_layernorm` or a block's final
    `layer_norm`: constructed as `TorchNorm(config, hidden_size, eps=...)`. Unlike megatron's
    `WrappedTorchNorm` it supports `config.sequence_parallel=True`: under sequence parallelism
    each tensor-parallel rank normalises a different slice of the sequence, so its weight and
    bias get partial gradients; they are marked `sequence_parallel = True` (as megatron's fused
    norms mark theirs), which makes `finalize_model_grads` sum them over the TP group.

    Parameters are created with `config.params_dtype`, on CPU when
    `config.use_cpu_initialization` is set or CUDA is absent, else on the current CUDA device.
    `config.layernorm_zero_centered_gamma` stores gamma - 1 (initialised to zero) and applies
    `weight + 1`. RMSNorm has no bias. The extra keyword arguments of megatron's norm interface
    (`persist_layer_norm`, `zero_centered_gamma`, `normalization`) are accepted and, as in
    megatron's FusedLayerNorm, the config decides.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
    ):
        super().__init__()
        self.config = config
        self.normalization = config.normalization
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(
                f"TorchNorm supports normalization 'LayerNorm' or 'RMSNorm', "
                f"not {self.normalization!r}"
            )
        self.hidden_size = hidden_size
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        factory = dict(dtype=config.params_dtype, device=parameter_device(config))
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, **factory))
        if self.normalization == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.empty(hidden_size, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        self.sequence_parallel = config.sequence_parallel
        for param in self.parameters():
            param.sequence_parallel = self.sequence_parallel

    def reset_parameters(self) -> None:
        """gamma = 1 (stored as 0 when zero-centred), beta = 0."""
        with torch.no_grad():
            self.weight.fill_(0.0 if self.zero_centered_gamma else 1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        if self.normalization == "LayerNorm":
            return F.layer_norm(x, (self.hidden_size,), weight, self.bias, self.eps)
        return F.rms_norm(x, (self.hidden_size,), weight, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalization}, {self.hidden_size}, eps={self.eps}, "
            f"zero_centered_gamma={self.zero_centered_gamma}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class ApexFusedNorm:
    """megatron-core's apex-backed FusedLayerNorm, built as TorchNorm is
    (`ApexFusedNorm(config, hidden_size, eps=...)`), its parameters in `config.params_dtype` on
    the device the other parameters are created on (FusedLayerNorm makes them fp32 on the CPU
    and leaves the move to Megatron-LM's model.cuda() / Float16Module, which this package does
    not call). FusedLayerNorm is LayerNorm only: under RMSNorm this gives a TorchNorm, as
    megatron-core's local spec gives RMSNorm torch's norm."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        if config.normalization != "LayerNorm":
            return TorchNorm(config, hidden_size, eps, **kwargs)
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        norm = FusedLayerNorm(config, hidden_size, eps, **kwargs)
        return norm.to(device=parameter_device(config), dtype=config.params_dtype)


def local_norm() -> type:
    """The norm class of the local spec: ApexFusedNorm where apex's fused LayerNorm imports
    (`accelerators.apex_available`), else TorchNorm."""
    return ApexFusedNorm if apex_available() else TorchNorm
