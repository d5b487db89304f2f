"""Build and install megatron_wesar.

`pip install --no-build-isolation .` builds against the torch that is already installed.
The C++ extension `megatron_wesar._C` (csrc/) is built with it: CPU always, plus the CUDA
kernels when torch is a CUDA build and the CUDA toolkit is found.
"""
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pip's build isolation hides the installed torch
    raise SystemExit(
        "megatron_wesar compiles its C++ extension against the torch you train with, so torch "
        "must be importable at build time: install torch first, then build without isolation: "
        "`pip install --no-build-isolation .` (or `make install`)."
    ) from exc

CSRC = "csrc"


def gate_reduce_extension():
    """The `megatron_wesar._C` extension: CUDAExtension if CUDA is usable, else CppExtension."""
    sources = [os.path.join(CSRC, "frontend.cpp"), os.path.join(CSRC, "gate_reduce.cpp")]
    if torch.version.cuda is not None and CUDA_HOME is not None:
        sources.append(os.path.join(CSRC, "gate_reduce_cuda.cu"))
        return CUDAExtension(
            "megatron_wesar._C",
            sources,
            define_macros=[("WITH_CUDA", None)],  # tells csrc/ the CUDA kernels are compiled in
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        )
    return CppExtension("megatron_wesar._C", sources, extra_compile_args={"cxx": ["-O3"]})


setup(
    name="megatron_wesar",
    version="0.1.0",
    description="WeSaR (weight scaling as reparameterization) for Megatron-style training",
    packages=find_packages(include=["megatron_wesar", "megatron_wesar.*"]),
    python_requires=">=3.10",
    install_requires=["megatron-core==0.16.1", "numpy"],
    entry_points={"console_scripts": ["megatron-wesar=megatron_wesar.cli:main"]},
    ext_modules=[gate_reduce_extension()],
    cmdclass={"build_ext": BuildExtension},
)
