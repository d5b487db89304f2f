// Fused all-reduce of WeSaR gate gradients (docs/design.md section 3).
//
// Every gate gradient is a tiny tensor (usually shape (1,)). Instead of one collective per gate,
// all of them are packed into one fp32 buffer, summed with a single c10d all-reduce and unpacked
// back in place. The non-finite check runs on the values actually written back, so an fp16/bf16
// gradient that overflows when cast back from fp32 is reported too.
#include "gate_reduce.h"

#include <cmath>
#include <cstring>

#include <ATen/Dispatch.h>

namespace megatron_wesar {
namespace {

bool is_supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Dtypes with a smaller range than fp32: the cast back from the fp32 sum may overflow.
bool is_narrow(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

void check_inputs(const std::vector<at::Tensor>& grads) {
  const at::Device device = grads.front().device();
  for (const auto& g : grads) {
    TORCH_CHECK(g.defined(), "allreduce_gate_grads: got an undefined tensor");
    TORCH_CHECK(g.layout() == at::kStrided, "allreduce_gate_grads: expected dense tensors");
    TORCH_CHECK(is_supported(g.scalar_type()),
                "allreduce_gate_grads: expected float32/float64/float16/bfloat16 tensors, got ",
                g.scalar_type());
    TORCH_CHECK(g.device() == device, "allreduce_gate_grads: all tensors must be on one device, got ",
                device, " and ", g.device());
  }
}

// ---- CPU fast path: contiguous tensors, raw loops, memcpy for fp32 --------------------------

void pack_cpu(const std::vector<at::Tensor>& grads, float* out) {
  for (const auto& g : grads) {
    const int64_t n = g.numel();
    if (g.scalar_type() == at::kFloat) {
      std::memcpy(out, g.const_data_ptr<float>(), n * sizeof(float));
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pack_cpu", [&] {
        const scalar_t* src = g.const_data_ptr<scalar_t>();
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(src[i]);
      });
    }
    out += n;
  }
}

bool unpack_cpu(const float* in, const std::vector<at::Tensor>& grads) {
  bool finite = true;
  for (const auto& g : grads) {
    const int64_t n = g.numel();
    if (g.scalar_type() == at::kFloat) {
      std::memcpy(g.data_ptr<float>(), in, n * sizeof(float));
      for (int64_t i = 0; i < n; ++i) finite &= std::isfinite(in[i]);
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "unpack_cpu", [&] {
        scalar_t* dst = g.data_ptr<scalar_t>();
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t v = static_cast<scalar_t>(in[i]);
          dst[i] = v;
          finite &= std::isfinite(static_cast<float>(v));
        }
      });
    }
    // Raw writes bypass ATen, so bump the version counter as an in-place op would.
    g.unsafeGetTensorImpl()->bump_version();
    in += n;
  }
  return !finite;
}

// ---- Generic path: any strides / device, plain ATen ops ---------------------------------------

void pack_generic(const std::vector<at::Tensor>& grads, at::Tensor& flat) {
  int64_t offset = 0;
  for (const auto& g : grads) {
    const int64_t n = g.numel();
    flat.narrow(0, offset, n).view(g.sizes()).copy_(g);
    offset += n;
  }
}

bool unpack_generic(const at::Tensor& flat, const std::vector<at::Tensor>& grads) {
  at::Tensor finite = at::isfinite(flat).all();
  int64_t offset = 0;
  for (const auto& g : grads) {
    const int64_t n = g.numel();
    g.copy_(flat.narrow(0, offset, n).view(g.sizes()));
    if (is_narrow(g.scalar_type())) finite = finite.logical_and(at::isfinite(g).all());
    offset += n;
  }
  return !finite.item<bool>();
}

}  // namespace

bool allreduce_gate_grads(
    const std::vector<at::Tensor>& grads,
    const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  if (grads.empty()) return false;
  TORCH_CHECK(pg, "allreduce_gate_grads: process group is null");
  check_inputs(grads);

  int64_t total = 0;
  bool contiguous = true;
  for (const auto& g : grads) {
    total += g.numel();
    contiguous = contiguous && g.is_contiguous();
  }
  if (total == 0) return false;

  // fp32 buffer; fp64 when any gradient is fp64 (float64 runs stay exact, on the generic path).
  bool any_double = false;
  for (const auto& g : grads) any_double = any_double || g.scalar_type() == at::kDouble;
  const at::Device device = grads.front().device();
  at::Tensor flat = at::empty(
      {total}, at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat).device(device));

  enum class Path { kCpu, kCuda, kGeneric };
  Path path = Path::kGeneric;
  if (contiguous && !any_double && device.is_cpu()) path = Path::kCpu;
#ifdef WITH_CUDA
  at::Tensor table;
  if (contiguous && !any_double && device.is_cuda()) {
    path = Path::kCuda;
    table = make_cuda_table(grads);
  }
#endif

  switch (path) {
    case Path::kCpu: pack_cpu(grads, flat.data_ptr<float>()); break;
#ifdef WITH_CUDA
    case Path::kCuda: pack_cuda(table, flat); break;
#endif
    default: pack_generic(grads, flat); break;
  }

  std::vector<at::Tensor> buffers{flat};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  opts.asyncOp = false;  // as a blocking torch.distributed.all_reduce (NCCL: on the current stream)
  pg->allreduce(buffers, opts)->wait();

  switch (path) {
    case Path::kCpu: return unpack_cpu(flat.const_data_ptr<float>(), grads);
#ifdef WITH_CUDA
    case Path::kCuda: {
      const bool nonfinite = unpack_cuda(table, flat);
      for (const auto& g : grads) g.unsafeGetTensorImpl()->bump_version();
      return nonfinite;
    }
#endif
    default: return unpack_generic(flat, grads);
  }
}

}  // namespace megatron_wesar
