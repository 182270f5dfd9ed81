// Host entry points of the dsrb extension, one per op x device (architecture §3, §5).
//
// Names: <op>_cpu (csrc/cpu/<op>.cpp) and <op>_cuda (csrc/cuda/glue.cpp, launching csrc/cuda/<op>.cu). They are
// registered in csrc/registration.cpp (CPU) and csrc/cuda/glue.cpp (CUDA) as the ops dsrb::<op>_<backend>, with the
// same schemas as the Python-defined backends (dsrb/ops/<op>.py); autograd is registered in C++ (csrc/autograd.h),
// fakes from Python.
//
// Every entry point validates its arguments with TORCH_CHECK messages naming the argument (csrc/checks.h), accepts
// any strides, and returns contiguous outputs in the dtype the Python contract states. Half-precision inputs
// accumulate in fp32; fp64 inputs compute in fp64 (for gradcheck).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace dsrb {

using at::Tensor;

// ---- CPU ---------------------------------------------------------------------------------------------------------
// x (B, N, D), u (B, N, I), e (C, I), v (I)  ->  S (B, C, D), a (B, C, N)
std::tuple<Tensor, Tensor> semantic_attention_cpu(const Tensor& x, const Tensor& u, const Tensor& e, const Tensor& v);
// -> grad_x (B, N, D), grad_u (B, N, I), grad_e (C, I), grad_v (I)
std::tuple<Tensor, Tensor, Tensor, Tensor> semantic_attention_cpu_backward(
    const Tensor& grad_S, const Tensor& grad_a, const Tensor& x, const Tensor& u, const Tensor& e, const Tensor& v,
    const Tensor& a);

// S (B, C, D), T (B, C) in S's dtype, alpha () in S's dtype, partner (B) int64 -> S1 (B, C, D), T1 (B, C)
std::tuple<Tensor, Tensor> instance_blend_cpu(const Tensor& S, const Tensor& T, const Tensor& alpha,
                                              const Tensor& partner, bool detach_target);
// -> grad_S (B, C, D), grad_alpha (alpha's shape)
std::tuple<Tensor, Tensor> instance_blend_cpu_backward(const Tensor& grad_S1, const Tensor& grad_T1, const Tensor& S,
                                                       const Tensor& T, const Tensor& alpha, const Tensor& partner,
                                                       bool detach_target);

// S (B, C, D), T (B, C), beta (), bank (C, 4, D), quadrant/shift (B, C) int64, select (B, C) bool -> S2, T2
std::tuple<Tensor, Tensor> prototype_blend_cpu(const Tensor& S, const Tensor& T, const Tensor& beta,
                                               const Tensor& bank, const Tensor& quadrant, const Tensor& shift,
                                               const Tensor& select, bool detach_target);
// -> grad_S (B, C, D), grad_beta (beta's shape), grad_bank (C, 4, D) (zeros when bank_grad is false)
std::tuple<Tensor, Tensor, Tensor> prototype_blend_cpu_backward(
    const Tensor& grad_S2, const Tensor& grad_T2, const Tensor& S, const Tensor& beta, const Tensor& bank,
    const Tensor& quadrant, const Tensor& shift, const Tensor& select, bool detach_target, bool bank_grad);

// a (B, C, N), x_sum (B, N) in a's dtype, height * width == N -> (B, C) int64 in [0, 3]
Tensor quadrant_index_cpu(const Tensor& a, const Tensor& x_sum, int64_t height, int64_t width);

// sums (C, 4, D) float, counts (C, 4) int64, S (B, C, D), T (B, C), quadrant (B, C) int64, cap >= 0
// -> new sums (sums' dtype), new counts (int64); inputs untouched
std::tuple<Tensor, Tensor> prototype_bank_update_cpu(const Tensor& sums, const Tensor& counts, const Tensor& S,
                                                     const Tensor& T, const Tensor& quadrant, int64_t cap);
// The same update in place (sums, counts contiguous; T of any real dtype): T's values and the quadrants are checked
// (ValueError) before anything is written, then only the buckets the batch reaches are written
void prototype_bank_update_cpu_(Tensor& sums, Tensor& counts, const Tensor& S, const Tensor& T, const Tensor& quadrant,
                                int64_t cap);

// ---- CUDA (same signatures; built only when nvcc is found) --------------------------------------------------------
std::tuple<Tensor, Tensor> semantic_attention_cuda(const Tensor& x, const Tensor& u, const Tensor& e, const Tensor& v);
std::tuple<Tensor, Tensor, Tensor, Tensor> semantic_attention_cuda_backward(
    const Tensor& grad_S, const Tensor& grad_a, const Tensor& x, const Tensor& u, const Tensor& e, const Tensor& v,
    const Tensor& a);
std::tuple<Tensor, Tensor> instance_blend_cuda(const Tensor& S, const Tensor& T, const Tensor& alpha,
                                               const Tensor& partner, bool detach_target);
std::tuple<Tensor, Tensor> instance_blend_cuda_backward(const Tensor& grad_S1, const Tensor& grad_T1, const Tensor& S,
                                                        const Tensor& T, const Tensor& alpha, const Tensor& partner,
                                                        bool detach_target);
std::tuple<Tensor, Tensor> prototype_blend_cuda(const Tensor& S, const Tensor& T, const Tensor& beta,
                                                const Tensor& bank, const Tensor& quadrant, const Tensor& shift,
                                                const Tensor& select, bool detach_target);
std::tuple<Tensor, Tensor, Tensor> prototype_blend_cuda_backward(
    const Tensor& grad_S2, const Tensor& grad_T2, const Tensor& S, const Tensor& beta, const Tensor& bank,
    const Tensor& quadrant, const Tensor& shift, const Tensor& select, bool detach_target, bool bank_grad);
Tensor quadrant_index_cuda(const Tensor& a, const Tensor& x_sum, int64_t height, int64_t width);
std::tuple<Tensor, Tensor> prototype_bank_update_cuda(const Tensor& sums, const Tensor& counts, const Tensor& S,
                                                      const Tensor& T, const Tensor& quadrant, int64_t cap);

}  // namespace dsrb
