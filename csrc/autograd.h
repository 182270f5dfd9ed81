// Autograd of the extension's differentiable ops, in C++ (architecture §5).
//
// dsrb::<op>_<backend> gets an Autograd kernel that runs the op below autograd and records a node whose backward
// calls dsrb::<op>_<backend>_backward, both through the dispatcher (so fake tensors, torch.compile and opcheck see the
// two ops as they are). Same maths as the Python autograd of the torch and triton backends (dsrb/ops/<op>.py): the
// upstream gradients of unused outputs arrive as zeros, only S/x, u, e, v, alpha, beta and (when it requires grad)
// the bank get gradients. In C++ rather than through torch.library.register_autograd because the Python autograd
// costs about 60 us of host time per forward+backward (measured on the 2-core CPU machine at a tiny shape): on a GPU,
// at the benchmark sizes, that is of the order of the fused kernels' own time (an estimate, not a measurement).
//
// Use, with a backend name of static storage (a template argument):
//   inline constexpr char kCpu[] = "cpu";
//   TORCH_LIBRARY_IMPL(dsrb, Autograd, m) { dsrb::autograd::register_ops<kCpu>(m); }
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <tuple>
#include <type_traits>

namespace dsrb::autograd {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A new autograd node held as this torch holds them: std::shared_ptr in older releases, c10::intrusive_ptr in newer.
using NodePtr = std::invoke_result_t<const torch::autograd::function_constructor&, torch::autograd::edge_list&&>;
template <class N, class... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<N>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<N>(std::forward<Args>(args)...);
  }
}

// The backward kernels have no derivative of their own. They run without autograd, and under create_graph=True their
// results get a node that raises when differentiated, linked to what they depend on (the saved inputs and the
// incoming gradients): double backward is this error, never the silent zeros of kernels autograd cannot see.
// ``create_graph``: whether grad mode was on when the backward was called.
template <class... Grads>
variable_list once_differentiable(bool create_graph, const char* op, variable_list depends_on, Grads&&... grads) {
  variable_list out{std::forward<Grads>(grads)...};
  if (!create_graph) return out;
  const std::string msg = std::string("dsrb::") + op + ": the extension's backward cannot be differentiated "
      "(double backward, or a gradient of a gradient taken with create_graph=True); no backend of dsrb supports it";
  return torch::autograd::wrap_outputs(depends_on, std::move(out), [&](torch::autograd::edge_list&& next) {
    return make_node<torch::autograd::Error>(msg, std::move(next));
  });
}

// Saved inputs and incoming gradients: what a backward's results depend on.
inline variable_list inputs_of(const variable_list& saved, const variable_list& grad) {
  variable_list all = saved;
  all.insert(all.end(), grad.begin(), grad.end());
  return all;
}

// "<op>_<backend>" and the typed dispatcher handle of "dsrb::<op>_<backend><suffix>".
inline std::string op_name(const char* op, const char* backend) { return std::string(op) + "_" + backend; }

template <class Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* op, const char* backend, const char* suffix = "") {
  return c10::Dispatcher::singleton().findSchemaOrThrow(("dsrb::" + op_name(op, backend) + suffix).c_str(), "")
      .typed<Sig>();
}

template <const char* Backend>
struct SemanticAttention : torch::autograd::Function<SemanticAttention<Backend>> {
  static constexpr const char* kOp = "semantic_attention";
  using Fwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&);
  using Bwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, const Tensor&, const Tensor&);

  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& u, const Tensor& e,
                               const Tensor& v) {
    static const auto op = find_op<Fwd>(kOp, Backend);
    at::AutoDispatchBelowADInplaceOrView below;
    auto [S, a] = op.call(x, u, e, v);
    ctx->save_for_backward({x, u, e, v, a});
    return {S, a};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    static const auto op = find_op<Bwd>(kOp, Backend, "_backward");
    const auto s = ctx->get_saved_variables();
    const bool create_graph = at::GradMode::is_enabled();
    auto [gx, gu, ge, gv] = [&] {
      at::NoGradGuard no_grad;
      return op.call(grad[0], grad[1], s[0], s[1], s[2], s[3], s[4]);
    }();
    return once_differentiable(create_graph, kOp, inputs_of(s, grad), gx, gu, ge, gv);
  }

  static std::tuple<Tensor, Tensor> kernel(const Tensor& x, const Tensor& u, const Tensor& e, const Tensor& v) {
    auto out = SemanticAttention::apply(x, u, e, v);
    return {out[0], out[1]};
  }
};

template <const char* Backend>
struct InstanceBlend : torch::autograd::Function<InstanceBlend<Backend>> {
  static constexpr const char* kOp = "instance_blend";
  using Fwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool);
  using Bwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, bool);

  static variable_list forward(AutogradContext* ctx, const Tensor& S, const Tensor& T, const Tensor& alpha,
                               const Tensor& partner, bool detach_target) {
    static const auto op = find_op<Fwd>(kOp, Backend);
    at::AutoDispatchBelowADInplaceOrView below;
    auto [S1, T1] = op.call(S, T, alpha, partner, detach_target);
    ctx->save_for_backward({S, T, alpha, partner});
    ctx->saved_data["detach_target"] = detach_target;
    return {S1, T1};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    static const auto op = find_op<Bwd>(kOp, Backend, "_backward");
    const auto s = ctx->get_saved_variables();
    const bool create_graph = at::GradMode::is_enabled();
    auto [gS, galpha] = [&] {
      at::NoGradGuard no_grad;
      return op.call(grad[0], grad[1], s[0], s[1], s[2], s[3], ctx->saved_data["detach_target"].toBool());
    }();
    return once_differentiable(create_graph, kOp, inputs_of(s, grad), gS, Tensor(), galpha, Tensor(), Tensor());
  }

  static std::tuple<Tensor, Tensor> kernel(const Tensor& S, const Tensor& T, const Tensor& alpha,
                                           const Tensor& partner, bool detach_target) {
    auto out = InstanceBlend::apply(S, T, alpha, partner, detach_target);
    return {out[0], out[1]};
  }
};

template <const char* Backend>
struct PrototypeBlend : torch::autograd::Function<PrototypeBlend<Backend>> {
  static constexpr const char* kOp = "prototype_blend";
  using Fwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, const Tensor&, bool);
  using Bwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool,
                                                 bool);

  static variable_list forward(AutogradContext* ctx, const Tensor& S, const Tensor& T, const Tensor& beta,
                               const Tensor& bank, const Tensor& quadrant, const Tensor& shift, const Tensor& select,
                               bool detach_target) {
    static const auto op = find_op<Fwd>(kOp, Backend);
    at::AutoDispatchBelowADInplaceOrView below;
    auto [S2, T2] = op.call(S, T, beta, bank, quadrant, shift, select, detach_target);
    ctx->save_for_backward({S, beta, bank, quadrant, shift, select});
    ctx->saved_data["detach_target"] = detach_target;
    return {S2, T2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    static const auto op = find_op<Bwd>(kOp, Backend, "_backward");
    const auto s = ctx->get_saved_variables();
    const bool bank_grad = ctx->needs_input_grad(3);
    const bool create_graph = at::GradMode::is_enabled();
    auto [gS, gbeta, gbank] = [&] {
      at::NoGradGuard no_grad;
      return op.call(grad[0], grad[1], s[0], s[1], s[2], s[3], s[4], s[5], ctx->saved_data["detach_target"].toBool(),
                     bank_grad);
    }();
    return once_differentiable(create_graph, kOp, inputs_of(s, grad), gS, Tensor(), gbeta,
                               bank_grad ? gbank : Tensor(), Tensor(), Tensor(), Tensor(), Tensor());
  }

  static std::tuple<Tensor, Tensor> kernel(const Tensor& S, const Tensor& T, const Tensor& beta, const Tensor& bank,
                                           const Tensor& quadrant, const Tensor& shift, const Tensor& select,
                                           bool detach_target) {
    auto out = PrototypeBlend::apply(S, T, beta, bank, quadrant, shift, select, detach_target);
    return {out[0], out[1]};
  }
};

// The Autograd kernels of one backend's three differentiable ops.
template <const char* Backend>
void register_ops(torch::Library& m) {
  m.impl(op_name(SemanticAttention<Backend>::kOp, Backend).c_str(), TORCH_FN(SemanticAttention<Backend>::kernel));
  m.impl(op_name(InstanceBlend<Backend>::kOp, Backend).c_str(), TORCH_FN(InstanceBlend<Backend>::kernel));
  m.impl(op_name(PrototypeBlend<Backend>::kOp, Backend).c_str(), TORCH_FN(PrototypeBlend<Backend>::kernel));
}

}  // namespace dsrb::autograd
