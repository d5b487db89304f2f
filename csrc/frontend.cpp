// Python bindings for megatron_wesar._C.
#include <torch/extension.h>

#include "gate_reduce.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_wesar fused kernels: one-collective all-reduce of WeSaR gate gradients";
  // The GIL is released for the whole call (pack, collective wait, unpack): nothing in it touches
  // Python objects, and other Python threads can run while the collective is in flight.
  m.def("allreduce_gate_grads", &megatron_wesar::allreduce_gate_grads,
        "Sum the given gradients over the process group with ONE fp32 all-reduce, in place.\n"
        "Returns True if any reduced value is non-finite. An empty list runs no collective.",
        py::arg("grads"), py::arg("group"), py::call_guard<py::gil_scoped_release>());
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
