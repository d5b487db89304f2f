"""WeSaR in Megatron-LM (docs/megatron-lm.md). Two ways in:

- `pretrain_gpt.py ... --spec megatron_wesar.megatron_lm wesar_layer_spec`: gates the
  transformer layers only (layer_spec.wesar_layer_spec, settings read when the layers are
  built).
- `python -m megatron_wesar.megatron_lm <pretrain_gpt.py arguments> --wesar ...`: Megatron-LM's
  own pretrain() with the whole model gated, the `--wesar-*` arguments, the gate-aware
  finalize_model_grads and the gate optimizer overrides (entry.main).

Importing this package does not import megatron.training.
"""
from .layer_spec import wesar_layer_spec

__all__ = ["wesar_layer_spec"]
