// CUDA kernels of prototype_blend (PPRB, architecture §3): location-sensitive prototype blending.
//
//   p[b, c] = bank[c, (quadrant[b, c] - shift[b, c]) mod 4]     (non-negative remainder)
//   S2 = select ? beta S + (1 - beta) p : S;   T2 = select ? 1 - beta : T
//
// Elementwise arithmetic follows the torch backend operation by operation (each product / sum rounded to the dtype,
// no FMA contraction).
//  * forward: one warp per (b, c) row, lanes along D.
//  * backward, kernel 1: one warp per (b, c) row: grad_S = grad_S2 * (select ? beta : 1) and the grad_beta partial
//    of the row, select ? sum_d grad_S2 (S - p) - (detach_target ? 0 : grad_T2) : 0 (summed by the glue).
//  * backward, kernel 2 (only when the bank needs a gradient): one thread per (c, d) destination walks b in
//    increasing order and adds grad_S2 * (1 - beta) of the selected (b, c) into the register of its bucket; the four
//    buckets of (c, d) are written at the end (zeros where nothing was selected). Accumulation in the acc type.
// The bucket is computed as ((q - s) % 4 + 4) % 4, always in [0, 3]: no index value can read out of bounds.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace dsrb {
namespace cuda {
namespace {

// (q - s) mod 4 in [0, 3] for any int64 values.
__device__ __forceinline__ int64_t bucket_of(int64_t q, int64_t s) {
  const int64_t r = (q - s) % 4;
  return r < 0 ? r + 4 : r;
}

constexpr int kRowWarps = 8;
constexpr int kBankThreads = 256;

// ---- kernels -------------------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32)
    pb_forward_kernel(const T* __restrict__ S, const T* __restrict__ Tg, const T* __restrict__ beta,
                      const T* __restrict__ bank, const int64_t* __restrict__ quadrant,
                      const int64_t* __restrict__ shift, const bool* __restrict__ select, T* __restrict__ S2,
                      T* __restrict__ T2, int64_t B, int64_t C, int64_t D) {
  using A = Acc<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= B * C) return;
  const int64_t c = row % C;
  const T* s = S + row * D;
  T* o = S2 + row * D;
  if (!select[row]) {
    for (int64_t d = lane; d < D; d += 32) o[d] = s[d];
    if (lane == 0) T2[row] = Tg[row];
    return;
  }
  const T* p = bank + (c * 4 + bucket_of(quadrant[row], shift[row])) * D;
  const A bt = to_acc(beta[0]);
  const A om = tsub<T>(A(1), bt);
  blend_row<T>(o, s, p, bt, om, lane, D);
  if (lane == 0) T2[row] = from_acc<T>(om);
}

template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32)
    pb_backward_rows_kernel(const T* __restrict__ gS2, const T* __restrict__ gT2, const T* __restrict__ S,
                            const T* __restrict__ beta, const T* __restrict__ bank,
                            const int64_t* __restrict__ quadrant, const int64_t* __restrict__ shift,
                            const bool* __restrict__ select, T* __restrict__ grad_S,
                            Acc<T>* __restrict__ row_partial, int64_t B, int64_t C, int64_t D, bool detach_target) {
  using A = Acc<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= B * C) return;
  const int64_t c = row % C;
  const bool sel = select[row];
  const T* g = gS2 + row * D;
  T* out = grad_S + row * D;
  if (!sel) {
    // coefficient 1: grad_S2 * 1 is grad_S2 itself
    for (int64_t d = lane; d < D; d += 32) out[d] = g[d];
    if (lane == 0) row_partial[row] = A(0);
    return;
  }
  const A bt = to_acc(beta[0]);
  const T* s = S + row * D;
  const T* p = bank + (c * 4 + bucket_of(quadrant[row], shift[row])) * D;
  A part = A(0);
  for (int64_t d = lane; d < D; d += 32) {
    const A gd = to_acc(g[d]);
    out[d] = from_acc<T>(tmul<T>(gd, bt));
    part += mul_rn(gd, sub_rn(to_acc(s[d]), to_acc(p[d])));  // unrounded (fp32 for half): S - p may pass 65504
  }
  part = warp_sum(part);
  if (lane == 0) row_partial[row] = part - (detach_target ? A(0) : to_acc(gT2[row]));
}

template <typename T>
__global__ void __launch_bounds__(kBankThreads)
    pb_backward_bank_kernel(const T* __restrict__ gS2, const T* __restrict__ beta,
                            const int64_t* __restrict__ quadrant, const int64_t* __restrict__ shift,
                            const bool* __restrict__ select, T* __restrict__ grad_bank, int64_t B, int64_t C,
                            int64_t D) {
  using A = Acc<T>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kBankThreads + threadIdx.x;
  if (idx >= C * D) return;
  const int64_t c = idx / D, d = idx - c * D;
  const A om = tsub<T>(A(1), to_acc(beta[0]));
  A acc[4] = {A(0), A(0), A(0), A(0)};
  for (int64_t b = 0; b < B; ++b) {
    const int64_t row = b * C + c;
    if (!select[row]) continue;
    const int64_t q = bucket_of(quadrant[row], shift[row]);
    const A x = tmul<T>(to_acc(gS2[row * D + d]), om);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (q == i) acc[i] = add_rn(acc[i], x);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) grad_bank[(c * 4 + i) * D + d] = from_acc<T>(acc[i]);
}

// ---- host ----------------------------------------------------------------------------------------------------------

}  // namespace

int prototype_blend_forward(DType dt, const void* S, const void* T, const void* beta, const void* bank,
                            const int64_t* quadrant, const int64_t* shift, const bool* select, void* S2, void* T2,
                            int64_t B, int64_t C, int64_t D, void* stream) {
  if (B <= 0 || C <= 0) return 0;
  const int64_t blocks = (B * C + kRowWarps - 1) / kRowWarps;
  if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(dt, [&](auto tag) -> int {
    using Ty = decltype(tag);
    pb_forward_kernel<Ty><<<static_cast<unsigned>(blocks), kRowWarps * 32, 0, st>>>(
        static_cast<const Ty*>(S), static_cast<const Ty*>(T), static_cast<const Ty*>(beta),
        static_cast<const Ty*>(bank), quadrant, shift, select, static_cast<Ty*>(S2), static_cast<Ty*>(T2), B, C, D);
    return static_cast<int>(cudaGetLastError());
  });
}

int prototype_blend_backward(DType dt, const void* grad_S2, const void* grad_T2, const void* S, const void* beta,
                             const void* bank, const int64_t* quadrant, const int64_t* shift, const bool* select,
                             void* grad_S, void* row_partial, void* grad_bank, int64_t B, int64_t C, int64_t D,
                             bool detach_target, void* stream) {
  if (C <= 0) return 0;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(dt, [&](auto tag) -> int {
    using Ty = decltype(tag);
    using A = Acc<Ty>;
    if (B > 0) {
      const int64_t blocks = (B * C + kRowWarps - 1) / kRowWarps;
      if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
      pb_backward_rows_kernel<Ty><<<static_cast<unsigned>(blocks), kRowWarps * 32, 0, st>>>(
          static_cast<const Ty*>(grad_S2), static_cast<const Ty*>(grad_T2), static_cast<const Ty*>(S),
          static_cast<const Ty*>(beta), static_cast<const Ty*>(bank), quadrant, shift, select,
          static_cast<Ty*>(grad_S), static_cast<A*>(row_partial), B, C, D, detach_target);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return static_cast<int>(err);
    }
    if (grad_bank != nullptr && D > 0) {  // B == 0 still writes the zeros of grad_bank
      const int64_t blocks = (C * D + kBankThreads - 1) / kBankThreads;
      if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
      pb_backward_bank_kernel<Ty><<<static_cast<unsigned>(blocks), kBankThreads, 0, st>>>(
          static_cast<const Ty*>(grad_S2), static_cast<const Ty*>(beta), quadrant, shift, select,
          static_cast<Ty*>(grad_bank), B, C, D);
      return static_cast<int>(cudaGetLastError());
    }
    return 0;
  });
}

}  // namespace cuda
}  // namespace dsrb
