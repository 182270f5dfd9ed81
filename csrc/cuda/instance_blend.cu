// CUDA kernels of instance_blend (IPRB, architecture §3): masked cross-image blending of pooled features.
//
//   blend[b, c] = T[b, c] == 0 && T[partner[b], c] == 1
//   S1 = blend ? alpha S + (1 - alpha) S[partner] : S;   T1 = blend ? 1 - alpha : T
//
// Elementwise arithmetic follows the torch backend operation by operation (each product / sum rounded to the dtype,
// no FMA contraction), so for an image with at most one source the results are those of the torch backend.
//
// Layout: one warp per (b, c) row, lanes along D, 8 rows per block.
//  * forward: S1 row and T1 entry.
//  * backward: grad_S row = own term grad_S1[b] * (blend ? alpha : 1), then the sources b' (partner[b'] == b,
//    found by walking b' = 0 .. B-1 in ascending order, as the Triton kernel does: any partner vector, repeats and
//    self-pairs included, no inverse map to build) that blended class c add grad_S1[b'] * (1 - alpha);
//    accumulation in the acc type (fp32 for half types) over chunks of 4 values per lane held in registers, one
//    rounding at the end. The warp also writes the grad_alpha partial of its row,
//    blend ? sum_d grad_S1 (S - S[partner]) - (detach_target ? 0 : grad_T1) : 0, summed by the glue (at::sum).
// Deterministic: every output element is written by one thread, every sum runs in a fixed order.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace dsrb {
namespace cuda {
namespace {

constexpr int kRowWarps = 8;
constexpr int kPerLane = 4;  // grad_S values per lane held in registers while the sources are walked

// ---- kernels -------------------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32)
    ib_forward_kernel(const T* __restrict__ S, const T* __restrict__ Tg, const T* __restrict__ alpha,
                      const int64_t* __restrict__ partner, T* __restrict__ S1, T* __restrict__ T1, int64_t B,
                      int64_t C, int64_t D) {
  using A = Acc<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= B * C) return;
  const int64_t b = row / C, c = row - b * C;
  const int64_t p = partner[b];
  const bool pvalid = p >= 0 && p < B;  // validated by the glue; never read out of bounds regardless
  const A t = to_acc(Tg[row]);
  const bool blend = pvalid && t == A(0) && to_acc(Tg[(pvalid ? p : 0) * C + c]) == A(1);
  const T* s = S + row * D;
  T* o = S1 + row * D;
  if (!blend) {
    for (int64_t d = lane; d < D; d += 32) o[d] = s[d];
    if (lane == 0) T1[row] = Tg[row];
    return;
  }
  const A a = to_acc(alpha[0]);
  const A om = tsub<T>(A(1), a);
  const T* sp = S + (p * C + c) * D;
  blend_row<T>(o, s, sp, a, om, lane, D);
  if (lane == 0) T1[row] = from_acc<T>(om);
}

template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32)
    ib_backward_kernel(const T* __restrict__ gS1, const T* __restrict__ gT1, const T* __restrict__ S,
                       const T* __restrict__ Tg, const T* __restrict__ alpha, const int64_t* __restrict__ partner,
                       T* __restrict__ grad_S, Acc<T>* __restrict__ row_partial, int64_t B, int64_t C, int64_t D,
                       bool detach_target) {
  using A = Acc<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= B * C) return;
  const int64_t b = row / C, c = row - b * C;
  const int64_t p = partner[b];
  const bool pvalid = p >= 0 && p < B;
  const A t_own = to_acc(Tg[row]);
  const bool blend = pvalid && t_own == A(0) && to_acc(Tg[(pvalid ? p : 0) * C + c]) == A(1);
  const A a = to_acc(alpha[0]);
  const A om = tsub<T>(A(1), a);
  const A coef = blend ? a : A(1);  // torch: 1 - w + w * alpha
  const T* g = gS1 + row * D;

  // grad_alpha partial of this row.
  A part = A(0);
  if (blend) {
    const T* s = S + row * D;
    const T* sp = S + (p * C + c) * D;
    for (int64_t d = lane; d < D; d += 32)
      part += mul_rn(to_acc(g[d]), sub_rn(to_acc(s[d]), to_acc(sp[d])));  // unrounded: S - S[p] may pass 65504
  }
  part = warp_sum(part);
  if (lane == 0) row_partial[row] = blend ? part - (detach_target ? A(0) : to_acc(gT1[row])) : A(0);

  // Sources b' of image b (partner[b'] == b) blend class c iff T[b', c] == 0 and T[b, c] == 1.
  const int64_t sources_end = t_own == A(1) ? B : 0;  // no source can blend this class otherwise

  T* out = grad_S + row * D;
  for (int64_t d0 = 0; d0 < D; d0 += 32 * kPerLane) {
    A acc[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = d0 + i * 32 + lane;
      acc[i] = d < D ? tmul<T>(to_acc(g[d]), coef) : A(0);
    }
    for (int64_t bp = 0; bp < sources_end; ++bp) {  // warp-uniform
      if (partner[bp] != b || to_acc(Tg[bp * C + c]) != A(0)) continue;
      const T* gp = gS1 + (bp * C + c) * D;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t d = d0 + i * 32 + lane;
        if (d < D) acc[i] = add_rn(acc[i], tmul<T>(to_acc(gp[d]), om));
      }
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = d0 + i * 32 + lane;
      if (d < D) out[d] = from_acc<T>(acc[i]);
    }
  }
}

// ---- host ----------------------------------------------------------------------------------------------------------

}  // namespace

int instance_blend_forward(DType dt, const void* S, const void* T, const void* alpha, const int64_t* partner,
                           void* S1, void* T1, int64_t B, int64_t C, int64_t D, void* stream) {
  if (B <= 0 || C <= 0) return 0;
  const int64_t blocks = (B * C + kRowWarps - 1) / kRowWarps;
  if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(dt, [&](auto tag) -> int {
    using Ty = decltype(tag);
    ib_forward_kernel<Ty><<<static_cast<unsigned>(blocks), kRowWarps * 32, 0, st>>>(
        static_cast<const Ty*>(S), static_cast<const Ty*>(T), static_cast<const Ty*>(alpha), partner,
        static_cast<Ty*>(S1), static_cast<Ty*>(T1), B, C, D);
    return static_cast<int>(cudaGetLastError());
  });
}

int instance_blend_backward(DType dt, const void* grad_S1, const void* grad_T1, const void* S, const void* T,
                            const void* alpha, const int64_t* partner, void* grad_S, void* row_partial, int64_t B,
                            int64_t C, int64_t D, bool detach_target, void* stream) {
  if (B <= 0 || C <= 0) return 0;
  const int64_t blocks = (B * C + kRowWarps - 1) / kRowWarps;
  if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(dt, [&](auto tag) -> int {
    using Ty = decltype(tag);
    using A = Acc<Ty>;
    ib_backward_kernel<Ty><<<static_cast<unsigned>(blocks), kRowWarps * 32, 0, st>>>(
        static_cast<const Ty*>(grad_S1), static_cast<const Ty*>(grad_T1), static_cast<const Ty*>(S),
        static_cast<const Ty*>(T), static_cast<const Ty*>(alpha), partner, static_cast<Ty*>(grad_S),
        static_cast<A*>(row_partial), B, C, D, detach_target);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace cuda
}  // namespace dsrb
