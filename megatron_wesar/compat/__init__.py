"""Compatibility layers for running megatron-core where it does not run as shipped."""
from megatron_wesar.compat.cpu import cpu_compat_active, disable_cpu_compat, enable_cpu_compat

__all__ = ["enable_cpu_compat", "disable_cpu_compat", "cpu_compat_active"]
