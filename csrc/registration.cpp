// Schemas and CPU implementations of the extension's ops (architecture §4, §5).
//
// Each backend is its own op, dsrb::<op>_<backend> (+ _backward), with the same schema as the Python-defined
// backends in dsrb/ops/<op>.py (a test compares them); the CUDA ops are defined in csrc/cuda/glue.cpp. Autograd is
// registered here in C++ (csrc/autograd.h), fakes from Python (dsrb/ops).
#include <torch/library.h>

#include "autograd.h"
#include "no_autocast.h"
#include "ops.h"

namespace {
constexpr char kCpu[] = "cpu";
}  // namespace

TORCH_LIBRARY_FRAGMENT(dsrb, m) {
  m.def("semantic_attention_cpu(Tensor x, Tensor u, Tensor e, Tensor v) -> (Tensor, Tensor)");
  m.def("semantic_attention_cpu_backward(Tensor grad_S, Tensor grad_a, Tensor x, Tensor u, Tensor e, Tensor v, "
        "Tensor a) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("instance_blend_cpu(Tensor S, Tensor T, Tensor alpha, Tensor partner, bool detach_target) -> (Tensor, Tensor)");
  m.def("instance_blend_cpu_backward(Tensor grad_S1, Tensor grad_T1, Tensor S, Tensor T, Tensor alpha, "
        "Tensor partner, bool detach_target) -> (Tensor, Tensor)");
  m.def("prototype_blend_cpu(Tensor S, Tensor T, Tensor beta, Tensor bank, Tensor quadrant, Tensor shift, "
        "Tensor select, bool detach_target) -> (Tensor, Tensor)");
  m.def("prototype_blend_cpu_backward(Tensor grad_S2, Tensor grad_T2, Tensor S, Tensor beta, Tensor bank, "
        "Tensor quadrant, Tensor shift, Tensor select, bool detach_target, bool bank_grad) -> (Tensor, Tensor, Tensor)");
  m.def("quadrant_index_cpu(Tensor a, Tensor x_sum, int height, int width) -> Tensor");
  m.def("prototype_bank_update_cpu(Tensor sums, Tensor counts, Tensor S, Tensor T, Tensor quadrant, int cap) "
        "-> (Tensor, Tensor)");
  // In place (dsrb.ops.prototype_bank_update_, the bank's per-batch update); CPU only, the other backends copy.
  m.def("prototype_bank_update_cpu_(Tensor(a!) sums, Tensor(b!) counts, Tensor S, Tensor T, Tensor quadrant, "
        "int cap) -> ()");
}

TORCH_LIBRARY_IMPL(dsrb, CPU, m) {
  m.impl("semantic_attention_cpu", dsrb::no_autocast<&dsrb::semantic_attention_cpu>);
  m.impl("semantic_attention_cpu_backward", dsrb::no_autocast<&dsrb::semantic_attention_cpu_backward>);
  m.impl("instance_blend_cpu", dsrb::no_autocast<&dsrb::instance_blend_cpu>);
  m.impl("instance_blend_cpu_backward", dsrb::no_autocast<&dsrb::instance_blend_cpu_backward>);
  m.impl("prototype_blend_cpu", dsrb::no_autocast<&dsrb::prototype_blend_cpu>);
  m.impl("prototype_blend_cpu_backward", dsrb::no_autocast<&dsrb::prototype_blend_cpu_backward>);
  m.impl("quadrant_index_cpu", dsrb::no_autocast<&dsrb::quadrant_index_cpu>);
  m.impl("prototype_bank_update_cpu", dsrb::no_autocast<&dsrb::prototype_bank_update_cpu>);
  m.impl("prototype_bank_update_cpu_", dsrb::no_autocast<&dsrb::prototype_bank_update_cpu_>);
}

TORCH_LIBRARY_IMPL(dsrb, Autograd, m) { dsrb::autograd::register_ops<kCpu>(m); }
