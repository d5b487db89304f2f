// Fused all-reduce of WeSaR gate gradients: pack -> one c10d all-reduce -> unpack.
#pragma once

#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace megatron_wesar {

// Sums every tensor in `grads` over `pg` with a single all-reduce on one fp32 buffer (fp64 when any
// tensor is fp64) and writes the result back in place (cast to each tensor's dtype). Returns true if any written-back value
// is non-finite. An empty list performs no collective and returns false.
bool allreduce_gate_grads(
    const std::vector<at::Tensor>& grads,
    const c10::intrusive_ptr<c10d::ProcessGroup>& pg);

#ifdef WITH_CUDA
// CUDA pack/unpack kernels (gate_reduce_cuda.cu). `grads` are contiguous and on one CUDA device.
// The table describes them (data pointer, offset in the flat buffer, dtype) for the kernels.
at::Tensor make_cuda_table(const std::vector<at::Tensor>& grads);
// Casts every element into `flat` (fp32, one slot per element of the grads, in order).
void pack_cuda(const at::Tensor& table, at::Tensor& flat);
// Casts `flat` back into the grads; returns true if any written-back value is non-finite.
bool unpack_cuda(const at::Tensor& table, const at::Tensor& flat);
#endif

}  // namespace megatron_wesar
