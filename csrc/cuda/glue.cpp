// CUDA entry points of the dsrb extension (architecture §3-§5) and their registration as dsrb::<op>_cuda.
//
// Plain C++ against ATen: argument checks (csrc/checks.h), .contiguous() inputs, outputs allocated with ATen on the
// input's device, a device guard, torch's current CUDA stream (stream_of), then the raw-pointer launchers of
// csrc/cuda/*.cu (csrc/cuda/launchers.h). No c10/cuda or ATen/cuda header: this file compiles and links against the
// CPU build of torch; the ATen calls made here (bmm, baddbmm, sum, ...) dispatch to torch's CUDA kernels at run time.
//
// Index values (partner, quadrant, shift) are not checked here: reading them would cost a device synchronisation per
// call. The public API checks them (dsrb.ops, validate=True), and the kernels never read out of bounds whatever the
// values (an out-of-range partner blends nothing; a bucket is always taken modulo 4; another quadrant is skipped).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <tuple>

#include "autograd.h"
#include "checks.h"
#include "cuda/launchers.h"
#include "no_autocast.h"
#include "ops.h"

namespace dsrb {
namespace {

using cuda::DType;
#ifdef DSRB_CUDA_EMULATION
// tests/cuda_emulator.py builds this file with the kernels run on the CPU (tests/cuda_emu/): the same entry
// points on CPU tensors, registered as dsrb_emu::<op>_cuda so that they sit beside the real extension.
constexpr c10::DeviceType kCUDA = c10::DeviceType::CPU;
#define DSRB_CUDA_LIBRARY dsrb_emu
#define DSRB_CUDA_KEY CPU
#else
constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;
#define DSRB_CUDA_LIBRARY dsrb
#define DSRB_CUDA_KEY CUDA
#endif

DType dtype_tag(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::Float32;
    case at::kHalf:
      return DType::Float16;
    case at::kBFloat16:
      return DType::BFloat16;
    case at::kDouble:
      return DType::Float64;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, "argument '", name, "': dtype ", t.scalar_type(),
                   " is not supported by the CUDA backend (float16, bfloat16, float32, float64)");
}

// fp32 accumulation for the half types, fp64 for fp64.
at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

#ifndef DSRB_CUDA_EMULATION
// torch's current CUDA stream through AOTInductor's C shim (torch/csrc/inductor/aoti_torch/c/shim.h): a stable C
// ABI that libtorch_cuda.so exports in every torch this project supports (2.6 to 2.13), where the C++ route
// (at::accelerator::getCurrentStream(...).native_handle()) exists only from torch 2.11. Looked up at run time in the
// libtorch_cuda.so that `import torch` has loaded, so the CPU build of torch, which has no such library, still links.
using CurrentStreamFn = int32_t (*)(int32_t device_index, void** ret_stream);

CurrentStreamFn current_stream_fn() {
  static const CurrentStreamFn fn = [] {
    void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
    return lib ? reinterpret_cast<CurrentStreamFn>(dlsym(lib, "aoti_torch_get_current_cuda_stream")) : nullptr;
  }();
  return fn;
}
#endif

void* stream_of(const at::Tensor& t) {
#ifdef DSRB_CUDA_EMULATION
  (void)t;
  return nullptr;
#else
  const CurrentStreamFn fn = current_stream_fn();
  TORCH_CHECK(fn != nullptr, "dsrb: the cuda backend found no aoti_torch_get_current_cuda_stream in a loaded "
              "libtorch_cuda.so (is this a CUDA build of torch?)");
  void* stream = nullptr;
  TORCH_CHECK(fn(t.device().index(), &stream) == 0, "dsrb: torch could not give the current CUDA stream of ",
              t.device());
  return stream;
#endif
}

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, "dsrb::", op, "_cuda: CUDA error: ", cuda::cuda_error_string(err));
}

// The checks of the tensors that only the backward entry points take (upstream gradients).
void check_grad(const at::Tensor& g, const char* name, const at::Tensor& like, const char* like_name,
                std::initializer_list<int64_t> sizes) {
  checks::shape(g, name, sizes);
  checks::same_device(g, name, like, like_name);
  checks::dtype(g, name, like.scalar_type(), "the dtype of 'S'");
}

}  // namespace

// ---- semantic_attention ----------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> semantic_attention_cuda(const Tensor& x_, const Tensor& u_, const Tensor& e_,
                                                   const Tensor& v_) {
  checks::semantic_attention(x_, u_, e_, v_, kCUDA);
  const DType dt = dtype_tag(x_, "x");
  c10::DeviceGuard guard(x_.device());
  const Tensor x = x_.contiguous(), u = u_.contiguous(), e = e_.contiguous(), v = v_.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), C = e.size(0), I = e.size(1);
  const auto opts = x.options();
  const at::ScalarType acc = acc_type(x.scalar_type());
  if (B == 0 || C == 0) return {at::empty({B, C, D}, opts), at::empty({B, C, N}, opts)};

  int64_t ksplit = 1;
  check_launch(cuda::sa_forward_plan(dt, B, N, C, I, &ksplit), "semantic_attention");
  Tensor partial = at::empty({ksplit, B * C, N}, opts.dtype(acc));
  Tensor a_acc = at::empty({B, C, N}, opts.dtype(acc));
  const bool same = acc == x.scalar_type();
  Tensor a = same ? a_acc : at::empty({B, C, N}, opts);
  check_launch(cuda::sa_forward(dt, u.data_ptr(), e.data_ptr(), v.data_ptr(), partial.data_ptr(), a_acc.data_ptr(),
                                same ? nullptr : a.data_ptr(), B, N, C, I, ksplit, stream_of(x)),
               "semantic_attention");
  Tensor S = at::bmm(a_acc, x.to(acc)).to(x.scalar_type()).contiguous();
  return {S, a};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> semantic_attention_cuda_backward(const Tensor& grad_S_,
                                                                            const Tensor& grad_a_, const Tensor& x_,
                                                                            const Tensor& u_, const Tensor& e_,
                                                                            const Tensor& v_, const Tensor& a_) {
  checks::semantic_attention_backward(grad_S_, grad_a_, x_, u_, e_, v_, a_, kCUDA);
  const DType dt = dtype_tag(x_, "x");
  c10::DeviceGuard guard(x_.device());
  const Tensor x = x_.contiguous(), u = u_.contiguous(), e = e_.contiguous(), v = v_.contiguous();
  const int64_t B = x.size(0), N = x.size(1), C = e.size(0), D = x.size(2), I = e.size(1);
  const at::ScalarType acc = acc_type(x.scalar_type());

  // Not the hot spot (O(B C N D) matrix products): cuBLAS through ATen, in the acc type.
  const Tensor xa = x.to(acc);
  const Tensor aa = a_.to(acc).contiguous();
  const Tensor gS = grad_S_.to(acc).contiguous();
  Tensor grad_x = at::bmm(aa.transpose(1, 2), gS).to(x.scalar_type()).contiguous();
  if (B == 0 || C == 0 || I == 0) {
    return {grad_x, at::zeros({B, N, I}, u.options()), at::zeros({C, I}, e.options()), at::zeros({I}, v.options())};
  }
  const Tensor ga_total = at::baddbmm(grad_a_.to(acc), gS, xa.transpose(1, 2)).contiguous();  // (B, C, N)

  int64_t rows_pad = 0, groups = 1;
  check_launch(cuda::sa_backward_plan(dt, B, N, C, D, I, &rows_pad, &groups), "semantic_attention_backward");
  const auto wopts = x.options().dtype(acc);
  Tensor gs = at::empty({C, rows_pad}, wopts);
  Tensor pe = at::empty({groups, C, I}, wopts);
  Tensor pv = at::empty({groups, I}, wopts);
  Tensor grad_u = at::empty({B, N, I}, u.options());
  Tensor grad_e = at::empty({C, I}, e.options());
  Tensor grad_v = at::empty({I}, v.options());
  check_launch(cuda::sa_backward(dt, u.data_ptr(), e.data_ptr(), v.data_ptr(), aa.data_ptr(), ga_total.data_ptr(),
                                 gs.data_ptr(), pe.data_ptr(), pv.data_ptr(), grad_u.data_ptr(), grad_e.data_ptr(),
                                 grad_v.data_ptr(), B, N, C, I, rows_pad, groups, stream_of(x)),
               "semantic_attention_backward");
  return {grad_x, grad_u, grad_e, grad_v};
}

// ---- instance_blend ------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> instance_blend_cuda(const Tensor& S_, const Tensor& T_, const Tensor& alpha_,
                                               const Tensor& partner_, bool detach_target) {
  (void)detach_target;  // forward values do not depend on it
  checks::instance_blend(S_, T_, alpha_, partner_, kCUDA);
  const DType dt = dtype_tag(S_, "S");
  c10::DeviceGuard guard(S_.device());
  const Tensor S = S_.contiguous(), T = T_.contiguous(), alpha = alpha_.to(S_.scalar_type()).contiguous(),
               partner = partner_.contiguous();
  const int64_t B = S.size(0), C = S.size(1), D = S.size(2);
  Tensor S1 = at::empty({B, C, D}, S.options());
  Tensor T1 = at::empty({B, C}, S.options());
  if (B == 0 || C == 0) return {S1, T1};
  check_launch(cuda::instance_blend_forward(dt, S.data_ptr(), T.data_ptr(), alpha.data_ptr(),
                                            partner.data_ptr<int64_t>(), S1.data_ptr(), T1.data_ptr(), B, C, D,
                                            stream_of(S)),
               "instance_blend");
  return {S1, T1};
}

std::tuple<Tensor, Tensor> instance_blend_cuda_backward(const Tensor& grad_S1_, const Tensor& grad_T1_,
                                                        const Tensor& S_, const Tensor& T_, const Tensor& alpha_,
                                                        const Tensor& partner_, bool detach_target) {
  checks::instance_blend(S_, T_, alpha_, partner_, kCUDA);
  const int64_t B = S_.size(0), C = S_.size(1), D = S_.size(2);
  check_grad(grad_S1_, "grad_S1", S_, "S", {B, C, D});
  check_grad(grad_T1_, "grad_T1", S_, "S", {B, C});
  const DType dt = dtype_tag(S_, "S");
  c10::DeviceGuard guard(S_.device());
  const Tensor S = S_.contiguous(), T = T_.contiguous(), alpha = alpha_.to(S_.scalar_type()).contiguous(),
               partner = partner_.contiguous();
  const Tensor gS1 = grad_S1_.contiguous(), gT1 = grad_T1_.contiguous();
  Tensor grad_S = at::empty({B, C, D}, S.options());
  if (B == 0 || C == 0) {
    return {grad_S, at::zeros(alpha_.sizes(), alpha_.options())};
  }
  const at::ScalarType acc = acc_type(S.scalar_type());
  Tensor row_partial = at::empty({B * C}, S.options().dtype(acc));
  check_launch(cuda::instance_blend_backward(dt, gS1.data_ptr(), gT1.data_ptr(), S.data_ptr(), T.data_ptr(),
                                             alpha.data_ptr(), partner.data_ptr<int64_t>(), grad_S.data_ptr(),
                                             row_partial.data_ptr(), B, C, D, detach_target, stream_of(S)),
               "instance_blend_backward");
  Tensor grad_alpha = at::sum(row_partial).to(alpha_.scalar_type()).reshape(alpha_.sizes()).contiguous();
  return {grad_S, grad_alpha};
}

// ---- prototype_blend -------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> prototype_blend_cuda(const Tensor& S_, const Tensor& T_, const Tensor& beta_,
                                                const Tensor& bank_, const Tensor& quadrant_, const Tensor& shift_,
                                                const Tensor& select_, bool detach_target) {
  (void)detach_target;  // forward values do not depend on it
  checks::prototype_blend(S_, T_, beta_, bank_, quadrant_, shift_, select_, kCUDA);
  const DType dt = dtype_tag(S_, "S");
  c10::DeviceGuard guard(S_.device());
  const Tensor S = S_.contiguous(), T = T_.contiguous(), beta = beta_.to(S_.scalar_type()).contiguous(),
               bank = bank_.contiguous();
  const Tensor quadrant = quadrant_.contiguous(), shift = shift_.contiguous(), select = select_.contiguous();
  const int64_t B = S.size(0), C = S.size(1), D = S.size(2);
  Tensor S2 = at::empty({B, C, D}, S.options());
  Tensor T2 = at::empty({B, C}, S.options());
  if (B == 0 || C == 0) return {S2, T2};
  check_launch(cuda::prototype_blend_forward(dt, S.data_ptr(), T.data_ptr(), beta.data_ptr(), bank.data_ptr(),
                                             quadrant.data_ptr<int64_t>(), shift.data_ptr<int64_t>(),
                                             select.data_ptr<bool>(), S2.data_ptr(), T2.data_ptr(), B, C, D,
                                             stream_of(S)),
               "prototype_blend");
  return {S2, T2};
}

std::tuple<Tensor, Tensor, Tensor> prototype_blend_cuda_backward(const Tensor& grad_S2_, const Tensor& grad_T2_,
                                                                 const Tensor& S_, const Tensor& beta_,
                                                                 const Tensor& bank_, const Tensor& quadrant_,
                                                                 const Tensor& shift_, const Tensor& select_,
                                                                 bool detach_target, bool bank_grad) {
  // The forward's checks with grad_T2 in the place of T (same shape, device and dtype), then grad_S2's.
  checks::device(S_, "S", kCUDA);
  checks::floating(S_, "S");
  checks::shape(S_, "S", {-1, -1, -1});
  const int64_t B = S_.size(0), C = S_.size(1), D = S_.size(2);
  check_grad(grad_S2_, "grad_S2", S_, "S", {B, C, D});
  check_grad(grad_T2_, "grad_T2", S_, "S", {B, C});
  checks::prototype_blend(S_, grad_T2_, beta_, bank_, quadrant_, shift_, select_, kCUDA);
  const DType dt = dtype_tag(S_, "S");
  c10::DeviceGuard guard(S_.device());
  const Tensor S = S_.contiguous(), beta = beta_.to(S_.scalar_type()).contiguous(), bank = bank_.contiguous();
  const Tensor quadrant = quadrant_.contiguous(), shift = shift_.contiguous(), select = select_.contiguous();
  const Tensor gS2 = grad_S2_.contiguous(), gT2 = grad_T2_.contiguous();
  Tensor grad_S = at::empty({B, C, D}, S.options());
  Tensor grad_bank = bank_grad && B > 0 ? at::empty({C, 4, D}, bank.options()) : at::zeros({C, 4, D}, bank.options());
  if (B == 0 || C == 0) return {grad_S, at::zeros(beta_.sizes(), beta_.options()), grad_bank};
  const at::ScalarType acc = acc_type(S.scalar_type());
  Tensor row_partial = at::empty({B * C}, S.options().dtype(acc));
  check_launch(cuda::prototype_blend_backward(dt, gS2.data_ptr(), gT2.data_ptr(), S.data_ptr(), beta.data_ptr(),
                                              bank.data_ptr(), quadrant.data_ptr<int64_t>(),
                                              shift.data_ptr<int64_t>(), select.data_ptr<bool>(), grad_S.data_ptr(),
                                              row_partial.data_ptr(), bank_grad ? grad_bank.data_ptr() : nullptr, B,
                                              C, D, detach_target, stream_of(S)),
               "prototype_blend_backward");
  Tensor grad_beta = at::sum(row_partial).to(beta_.scalar_type()).reshape(beta_.sizes()).contiguous();
  return {grad_S, grad_beta, grad_bank};
}

// ---- quadrant_index ------------------------------------------------------------------------------------------------

Tensor quadrant_index_cuda(const Tensor& a_, const Tensor& x_sum_, int64_t height, int64_t width) {
  checks::quadrant_index(a_, x_sum_, height, width, kCUDA);
  const DType dt = dtype_tag(a_, "a");
  c10::DeviceGuard guard(a_.device());
  const Tensor a = a_.contiguous(), x_sum = x_sum_.contiguous();
  const int64_t B = a.size(0), C = a.size(1);
  Tensor out = at::empty({B, C}, a.options().dtype(at::kLong));
  if (B == 0 || C == 0) return out;
  check_launch(cuda::quadrant_index(dt, a.data_ptr(), x_sum.data_ptr(), out.data_ptr<int64_t>(), B, C, height, width,
                                    stream_of(a)),
               "quadrant_index");
  return out;
}

// ---- prototype_bank_update -------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> prototype_bank_update_cuda(const Tensor& sums_, const Tensor& counts_, const Tensor& S_,
                                                      const Tensor& T_, const Tensor& quadrant_, int64_t cap) {
  checks::prototype_bank_update(sums_, counts_, S_, T_, quadrant_, cap, kCUDA);
  const DType dt = dtype_tag(sums_, "sums");
  dtype_tag(S_, "S");
  c10::DeviceGuard guard(S_.device());
  const Tensor sums = sums_.contiguous(), counts = counts_.contiguous(), quadrant = quadrant_.contiguous();
  const int64_t B = S_.size(0), C = S_.size(1), D = S_.size(2);
  Tensor new_sums = at::empty({C, 4, D}, sums.options());
  Tensor new_counts = at::empty({C, 4}, counts.options());
  if (C == 0) return {new_sums, new_counts};
  if (B == 0) {
    new_sums.copy_(sums);
    new_counts.copy_(counts);
    return {new_sums, new_counts};
  }
  // As the torch backend: S is converted to the sums' dtype, the candidates are T == 1 in T's own dtype.
  const Tensor S = S_.to(sums.scalar_type()).contiguous();
  const Tensor positive = T_.eq(1).contiguous();
  check_launch(cuda::prototype_bank_update(dt, sums.data_ptr(), counts.data_ptr<int64_t>(), S.data_ptr(),
                                           positive.data_ptr<bool>(), quadrant.data_ptr<int64_t>(),
                                           new_sums.data_ptr(), new_counts.data_ptr<int64_t>(), B, C, D, cap,
                                           stream_of(S)),
               "prototype_bank_update");
  return {new_sums, new_counts};
}

}  // namespace dsrb

// ---- registration ----------------------------------------------------------------------------------------------------

TORCH_LIBRARY_FRAGMENT(DSRB_CUDA_LIBRARY, m) {
  m.def("semantic_attention_cuda(Tensor x, Tensor u, Tensor e, Tensor v) -> (Tensor, Tensor)");
  m.def(
      "semantic_attention_cuda_backward(Tensor grad_S, Tensor grad_a, Tensor x, Tensor u, Tensor e, Tensor v, "
      "Tensor a) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "instance_blend_cuda(Tensor S, Tensor T, Tensor alpha, Tensor partner, bool detach_target) -> (Tensor, "
      "Tensor)");
  m.def(
      "instance_blend_cuda_backward(Tensor grad_S1, Tensor grad_T1, Tensor S, Tensor T, Tensor alpha, "
      "Tensor partner, bool detach_target) -> (Tensor, Tensor)");
  m.def(
      "prototype_blend_cuda(Tensor S, Tensor T, Tensor beta, Tensor bank, Tensor quadrant, Tensor shift, "
      "Tensor select, bool detach_target) -> (Tensor, Tensor)");
  m.def(
      "prototype_blend_cuda_backward(Tensor grad_S2, Tensor grad_T2, Tensor S, Tensor beta, Tensor bank, "
      "Tensor quadrant, Tensor shift, Tensor select, bool detach_target, bool bank_grad) -> (Tensor, Tensor, "
      "Tensor)");
  m.def("quadrant_index_cuda(Tensor a, Tensor x_sum, int height, int width) -> Tensor");
  m.def(
      "prototype_bank_update_cuda(Tensor sums, Tensor counts, Tensor S, Tensor T, Tensor quadrant, int cap) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(DSRB_CUDA_LIBRARY, DSRB_CUDA_KEY, m) {
  m.impl("semantic_attention_cuda", dsrb::no_autocast<&dsrb::semantic_attention_cuda>);
  m.impl("semantic_attention_cuda_backward", dsrb::no_autocast<&dsrb::semantic_attention_cuda_backward>);
  m.impl("instance_blend_cuda", dsrb::no_autocast<&dsrb::instance_blend_cuda>);
  m.impl("instance_blend_cuda_backward", dsrb::no_autocast<&dsrb::instance_blend_cuda_backward>);
  m.impl("prototype_blend_cuda", dsrb::no_autocast<&dsrb::prototype_blend_cuda>);
  m.impl("prototype_blend_cuda_backward", dsrb::no_autocast<&dsrb::prototype_blend_cuda_backward>);
  m.impl("quadrant_index_cuda", dsrb::no_autocast<&dsrb::quadrant_index_cuda>);
  m.impl("prototype_bank_update_cuda", dsrb::no_autocast<&dsrb::prototype_bank_update_cuda>);
}

#ifndef DSRB_CUDA_EMULATION
namespace {
constexpr char kCuda[] = "cuda";
}  // namespace

TORCH_LIBRARY_IMPL(dsrb, Autograd, m) { dsrb::autograd::register_ops<kCuda>(m); }
#endif
