// Schemas and CPU implementations of the extension's ops (architecture §4, §5).
//
// Each backend is its own op, dsrb::<op>_<backend> (+ _backward), with the same schema as the Python-defined
// backends in dsrb/ops/<op>.py (a test compares them); the CUDA ops are defined in csrc/cuda/glue.cpp. Autograd is
// registered here in C++ (csrc/autograd.h), fakes from Python (dsrb/ops).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include "autograd.h"
#include "no_autocast.h"
#include "ops.h"

namespace {
constexpr char kCpu[] = "cpu";

// The in-place bank update is as safe as any in-place torch op when called directly through torch.ops: its
// Autograd kernel refuses to write a tensor that requires grad while grad mode is on, and its ADInplaceOrView kernel
// bumps the version counters of sums and counts (in inference mode too), so a graph that saved them fails loudly in
// backward instead of using the new values.
using BankUpdateFn = void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);

const c10::TypedOperatorHandle<BankUpdateFn>& bank_update_op() {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("dsrb::prototype_bank_update_cpu_", "")
      .typed<BankUpdateFn>();
  return op;
}

void bank_update_autograd(at::Tensor& sums, at::Tensor& counts, const at::Tensor& S, const at::Tensor& T,
                          const at::Tensor& quadrant, int64_t cap) {
  TORCH_CHECK_VALUE(!(c10::GradMode::is_enabled() && (sums.requires_grad() || counts.requires_grad())),
                    "argument '", sums.requires_grad() ? "sums" : "counts",
                    "': expected a tensor that does not require grad (the bank update is not differentiable; update "
                    "it under torch.no_grad(), or pass a detached tensor)");
  at::AutoDispatchBelowAutograd guard;
  bank_update_op().call(sums, counts, S, T, quadrant, cap);
}

void bank_update_version_bump(at::Tensor& sums, at::Tensor& counts, const at::Tensor& S, const at::Tensor& T,
                              const at::Tensor& quadrant, int64_t cap) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    bank_update_op().call(sums, counts, S, T, quadrant, cap);
  }
  torch::autograd::increment_version(sums);
  torch::autograd::increment_version(counts);
}
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

TORCH_LIBRARY_IMPL(dsrb, Autograd, m) {
  dsrb::autograd::register_ops<kCpu>(m);
  m.impl("prototype_bank_update_cpu_", TORCH_FN(bank_update_autograd));
}

TORCH_LIBRARY_IMPL(dsrb, ADInplaceOrView, m) {
  m.impl("prototype_bank_update_cpu_", TORCH_FN(bank_update_version_bump));
}
