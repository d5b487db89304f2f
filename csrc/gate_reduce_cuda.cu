// CUDA pack / unpack (+ non-finite check) kernels for the fused gate-gradient all-reduce.
//
// The gradients are described by a small int64 table of shape (3, n) on the device:
//   row 0: data pointer, row 1: first slot in the flat fp32 buffer, row 2: dtype code.
// One grid-stride kernel covers all elements of all tensors; each thread finds its tensor by a
// binary search over the (sorted) start offsets. Gate lists are small, so one launch per
// direction and a single flag read-back are all the overhead there is.
#include "gate_reduce.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace megatron_wesar {
namespace {

enum DTypeCode : int64_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

int64_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "allreduce_gate_grads: unsupported dtype ", t);
  }
}

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

int num_blocks(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks));
}

// Index of the tensor holding flat slot i: the last t with start[t] <= i.
__device__ __forceinline__ int64_t find_tensor(const int64_t* start, int64_t n, int64_t i) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (start[mid] <= i) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__global__ void pack_kernel(const int64_t* table, int64_t n, float* flat, int64_t total) {
  const int64_t* ptr = table;
  const int64_t* start = table + n;
  const int64_t* code = table + 2 * n;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t t = find_tensor(start, n, i);
    const int64_t j = i - start[t];
    const void* p = reinterpret_cast<const void*>(ptr[t]);
    float v;
    switch (code[t]) {
      case kF32: v = static_cast<const float*>(p)[j]; break;
      case kF64: v = static_cast<float>(static_cast<const double*>(p)[j]); break;
      case kF16: v = static_cast<float>(static_cast<const at::Half*>(p)[j]); break;
      default: v = static_cast<float>(static_cast<const at::BFloat16*>(p)[j]); break;
    }
    flat[i] = v;
  }
}

__global__ void unpack_kernel(const int64_t* table, int64_t n, const float* flat, int64_t total,
                              int* nonfinite) {
  const int64_t* ptr = table;
  const int64_t* start = table + n;
  const int64_t* code = table + 2 * n;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t t = find_tensor(start, n, i);
    const int64_t j = i - start[t];
    void* p = reinterpret_cast<void*>(ptr[t]);
    const float v = flat[i];
    float written;  // the value as stored, back in fp32 (exact for every supported dtype)
    switch (code[t]) {
      case kF32: static_cast<float*>(p)[j] = v; written = v; break;
      case kF64: static_cast<double*>(p)[j] = static_cast<double>(v); written = v; break;
      case kF16: {
        const at::Half h(v);
        static_cast<at::Half*>(p)[j] = h;
        written = static_cast<float>(h);
        break;
      }
      default: {
        const at::BFloat16 b(v);
        static_cast<at::BFloat16*>(p)[j] = b;
        written = static_cast<float>(b);
        break;
      }
    }
    if (!isfinite(written)) *nonfinite = 1;  // benign race: every writer stores 1
  }
}

}  // namespace

at::Tensor make_cuda_table(const std::vector<at::Tensor>& grads) {
  std::vector<const at::Tensor*> live;  // zero-element tensors own no slot
  live.reserve(grads.size());
  for (const auto& g : grads) {
    if (g.numel() > 0) live.push_back(&g);
  }
  const int64_t n = static_cast<int64_t>(live.size());
  at::Tensor host = at::empty({3, n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  int64_t offset = 0;
  for (int64_t t = 0; t < n; ++t) {
    h[t] = reinterpret_cast<int64_t>(live[t]->data_ptr());
    h[n + t] = offset;
    h[2 * n + t] = dtype_code(live[t]->scalar_type());
    offset += live[t]->numel();
  }
  // Pinned + non_blocking: the caching host allocator keeps `host` alive until the copy is done.
  return host.to(grads.front().device(), at::kLong, /*non_blocking=*/true);
}

void pack_cuda(const at::Tensor& table, at::Tensor& flat) {
  const c10::cuda::CUDAGuard guard(flat.device());
  const int64_t total = flat.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  pack_kernel<<<num_blocks(total), kThreads, 0, stream>>>(
      table.const_data_ptr<int64_t>(), table.size(1), flat.data_ptr<float>(), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool unpack_cuda(const at::Tensor& table, const at::Tensor& flat) {
  const c10::cuda::CUDAGuard guard(flat.device());
  const int64_t total = flat.numel();
  at::Tensor flag = at::zeros({1}, flat.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  unpack_kernel<<<num_blocks(total), kThreads, 0, stream>>>(
      table.const_data_ptr<int64_t>(), table.size(1), flat.const_data_ptr<float>(), total,
      flag.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return flag.item<int>() != 0;  // synchronises with the stream
}

}  // namespace megatron_wesar
