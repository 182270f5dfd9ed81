// Host launchers of the dsrb CUDA kernels (architecture §5): plain functions on raw device pointers, compiled by nvcc
// in csrc/cuda/<op>.cu and called by csrc/cuda/glue.cpp (compiled by the host compiler against any torch build).
//
// This header must stay free of CUDA and torch headers. Conventions shared by every launcher:
//  * every tensor is a contiguous device buffer; sizes are int64_t; `dt` is the dtype of the floating-point inputs
//    (outputs in that dtype too unless said otherwise);
//  * "acc" buffers hold the accumulation type: double for DType::Float64, float for the other three dtypes;
//  * `stream` is the cudaStream_t to launch on (the current torch stream), passed as void*;
//  * the return value is 0 on success, otherwise the cudaError_t value (cuda_error_string turns it into text);
//  * index inputs (partner, quadrant, shift) are validated by the glue; the kernels additionally never read out of
//    bounds whatever their values are;
//  * an empty problem launches nothing and returns 0;
//  * no floating-point atomics: every reduction runs in a fixed order, so results are bitwise reproducible.
#pragma once

#include <cstdint>

namespace dsrb {
namespace cuda {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// Text of a cudaError_t value returned by a launcher.
const char* cuda_error_string(int err);

// ---- semantic_attention ------------------------------------------------------------------------------------------
// Forward, in two calls around the glue's allocations:
//  sa_forward_plan: number of k-splits of the score kernel -> workspace `partial` of (ksplit, B*C, N) acc values.
//  sa_forward:      partial <- scores s[b,c,n] = sum_k v[k] tanh(u[b,n,k] e[c,k]) (k-split partial sums);
//                   a_acc (B, C, N) acc <- softmax over n; a_out (B, C, N) in dt <- a_acc (nullptr when dt is the
//                   acc type: a_acc is then the output). S = a_acc @ x is left to the glue (at::bmm).
// u (B, N, I), e (C, I), v (I) in dt.
int sa_forward_plan(DType dt, int64_t B, int64_t N, int64_t C, int64_t I, int64_t* ksplit);
int sa_forward(DType dt, const void* u, const void* e, const void* v, void* partial, void* a_acc, void* a_out,
               int64_t B, int64_t N, int64_t C, int64_t I, int64_t ksplit, void* stream);

// Backward. The glue computes ga_total = grad_a + grad_S @ x^T (B, C, N) acc and grad_x = a^T @ grad_S.
//  sa_backward_plan: rows_pad (B*N rounded up to the row tile) and groups (row groups of the fused kernel)
//                    -> workspaces gs (C, rows_pad) acc, pe (groups, C, I) acc, pv (groups, I) acc.
//  sa_backward:      gs <- a * (ga_total - sum_n a * ga_total) (transposed to (C, B*N), zero padded);
//                    then, recomputing z = tanh(u e) tile by tile: grad_u (B, N, I) in dt, per-group partial sums of
//                    grad_e and grad_v; then grad_e (C, I) and grad_v (I) in dt.
// a_acc and ga_total (B, C, N) acc; requires B, C, I >= 1.
int sa_backward_plan(DType dt, int64_t B, int64_t N, int64_t C, int64_t D, int64_t I, int64_t* rows_pad,
                     int64_t* groups);
int sa_backward(DType dt, const void* u, const void* e, const void* v, const void* a_acc, const void* ga_total,
                void* gs, void* pe, void* pv, void* grad_u, void* grad_e, void* grad_v, int64_t B, int64_t N,
                int64_t C, int64_t I, int64_t rows_pad, int64_t groups, void* stream);

// ---- instance_blend ----------------------------------------------------------------------------------------------
// S (B, C, D), T (B, C), alpha (1 element) in dt; partner (B) int64 -> S1 (B, C, D), T1 (B, C) in dt.
int instance_blend_forward(DType dt, const void* S, const void* T, const void* alpha, const int64_t* partner,
                           void* S1, void* T1, int64_t B, int64_t C, int64_t D, void* stream);
// -> grad_S (B, C, D) in dt; row_partial (B*C) acc whose sum is grad_alpha.
int instance_blend_backward(DType dt, const void* grad_S1, const void* grad_T1, const void* S, const void* T,
                            const void* alpha, const int64_t* partner, void* grad_S, void* row_partial, int64_t B,
                            int64_t C, int64_t D, bool detach_target, void* stream);

// ---- prototype_blend ---------------------------------------------------------------------------------------------
// S (B, C, D), T (B, C), beta (1 element), bank (C, 4, D) in dt; quadrant, shift (B, C) int64; select (B, C) bool.
int prototype_blend_forward(DType dt, const void* S, const void* T, const void* beta, const void* bank,
                            const int64_t* quadrant, const int64_t* shift, const bool* select, void* S2, void* T2,
                            int64_t B, int64_t C, int64_t D, void* stream);
// -> grad_S (B, C, D) in dt; row_partial (B*C) acc whose sum is grad_beta; grad_bank (C, 4, D) in dt when not null.
int prototype_blend_backward(DType dt, const void* grad_S2, const void* grad_T2, const void* S, const void* beta,
                             const void* bank, const int64_t* quadrant, const int64_t* shift, const bool* select,
                             void* grad_S, void* row_partial, void* grad_bank, int64_t B, int64_t C, int64_t D,
                             bool detach_target, void* stream);

// ---- quadrant_index ----------------------------------------------------------------------------------------------
// a (B, C, H*W), x_sum (B, H*W) in dt -> out (B, C) int64.
int quadrant_index(DType dt, const void* a, const void* x_sum, int64_t* out, int64_t B, int64_t C, int64_t H,
                   int64_t W, void* stream);

// ---- prototype_bank_update ---------------------------------------------------------------------------------------
// sums (C, 4, D) and S (B, C, D) both in dt (the glue converts S to the sums' dtype); counts (C, 4) int64;
// positive (B, C) bool (T == 1); quadrant (B, C) int64 -> new_sums (C, 4, D) in dt, new_counts (C, 4) int64.
int prototype_bank_update(DType dt, const void* sums, const int64_t* counts, const void* S, const bool* positive,
                          const int64_t* quadrant, void* new_sums, int64_t* new_counts, int64_t B, int64_t C,
                          int64_t D, int64_t cap, void* stream);

}  // namespace cuda
}  // namespace dsrb
