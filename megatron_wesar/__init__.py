"""WeSaR (weight scaling as reparameterization) for megatron-core: see README.md and docs/."""
import torch  # noqa: F401  (loads libc10 / libtorch, which the compiled extension `_C` links to)
