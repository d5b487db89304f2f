"""Whether apex's fused kernels are here: the one test that the local spec's norm choice and the
start-up notice share.

megatron-core 0.16.1 reads apex once, at import: its local GPT spec uses the apex-backed
`FusedLayerNorm` when `import apex` succeeds, and megatron.core.optimizer takes Transformer
Engine's FusedAdam, else apex's, else torch's AdamW. This package's driver builds its optimizer
with megatron-core's `get_megatron_optimizer`, so it gets that choice as it is; the norm is
chosen here, by what `FusedLayerNorm` actually runs (apex's Python function and its CUDA
kernel), not by the name `apex` alone (PyPI's `apex` is another project).
"""
from __future__ import annotations

import importlib

# what megatron-core's FusedLayerNorm (non-persistent kernel) imports and then calls
APEX_FUSED_LAYER_NORM = ("apex.normalization.fused_layer_norm", "fused_layer_norm_cuda")


def apex_available() -> bool:
    """True when apex's fused LayerNorm and its CUDA kernel (fused_layer_norm_cuda) import."""
    try:
        for name in APEX_FUSED_LAYER_NORM:
            importlib.import_module(name)
    except ImportError:
        return False
    return True
