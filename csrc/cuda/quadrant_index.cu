// CUDA kernel of quadrant_index (spec §5.1): the quadrant of the official peak of each (image, class) score map.
//
//   G[h, w] = a[b, c, h W + w] * x_sum[b, h W + w]              (rounded to the input dtype, as torch does)
//   row = argmax_h max_w G;  col = argmax_w max_h G;  q = 2 [row >= H / 2] + [col >= W / 2]
//
// max propagates NaN (torch.amax) and argmax takes NaN as the largest value; ties (and several NaNs) resolve to the
// first index (torch.argmax). One warp per (b, c): lanes take rows h = lane, lane + 32, ... (each reduces its row
// over w), then columns the same way; the (value, index) candidates are combined by a warp butterfly whose
// comparison is a strict total order (NaN first, then value, then the smaller index), so the result does not depend
// on the combination order.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace dsrb {
namespace cuda {
namespace {

// a * x_sum in dtype T (the exact product rounded once: the acc type holds the product of two T values exactly for
// half types; for float / double it is the correctly rounded product).
template <typename T>
__device__ __forceinline__ Acc<T> score(T a, T x) {
  return to_acc(from_acc<T>(mul_rn(to_acc(a), to_acc(x))));
}

template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

// True when candidate (v1, i1) beats (v2, i2) for argmax: NaN is the largest value, ties go to the smaller index.
// An index < 0 marks an empty candidate.
template <typename A>
__device__ __forceinline__ bool beats(A v1, int64_t i1, A v2, int64_t i2) {
  if (i1 < 0) return false;
  if (i2 < 0) return true;
  const bool n1 = v1 != v1, n2 = v2 != v2;
  if (n1 != n2) return n1;
  if (!n1 && v1 != v2) return v1 > v2;
  return i1 < i2;
}

template <typename A>
__device__ __forceinline__ int64_t warp_argmax(A v, int64_t i) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) {
    const A ov = __shfl_xor_sync(0xffffffffu, v, m);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, i, m);
    if (beats(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
  return i;
}

constexpr int kRowWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32)
    quadrant_index_kernel(const T* __restrict__ a, const T* __restrict__ x_sum, int64_t* __restrict__ out,
                          int64_t B, int64_t C, int64_t H, int64_t W) {
  using A = Acc<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= B * C) return;
  const int64_t b = row / C;
  const int64_t N = H * W;
  const T* ar = a + row * N;
  const T* xs = x_sum + b * N;

  // Rows: max over w of each row h, then the first arg-max over h.
  A best_v = A(0);
  int64_t best_i = -1;
  for (int64_t h = lane; h < H; h += 32) {
    A m = score(ar[h * W], xs[h * W]);
    for (int64_t w = 1; w < W; ++w) m = nan_max(m, score(ar[h * W + w], xs[h * W + w]));
    if (beats(m, h, best_v, best_i)) {
      best_v = m;
      best_i = h;
    }
  }
  const int64_t r = warp_argmax(best_v, best_i);

  // Columns: max over h of each column w, then the first arg-max over w.
  best_v = A(0);
  best_i = -1;
  for (int64_t w = lane; w < W; w += 32) {
    A m = score(ar[w], xs[w]);
    for (int64_t h = 1; h < H; ++h) m = nan_max(m, score(ar[h * W + w], xs[h * W + w]));
    if (beats(m, w, best_v, best_i)) {
      best_v = m;
      best_i = w;
    }
  }
  const int64_t col = warp_argmax(best_v, best_i);

  if (lane == 0) out[row] = 2 * static_cast<int64_t>(r >= H / 2) + static_cast<int64_t>(col >= W / 2);
}

}  // namespace

int quadrant_index(DType dt, const void* a, const void* x_sum, int64_t* out, int64_t B, int64_t C, int64_t H,
                   int64_t W, void* stream) {
  if (B <= 0 || C <= 0) return 0;
  if (H <= 0 || W <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t blocks = (B * C + kRowWarps - 1) / kRowWarps;
  if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(dt, [&](auto tag) -> int {
    using Ty = decltype(tag);
    quadrant_index_kernel<Ty><<<static_cast<unsigned>(blocks), kRowWarps * 32, 0, st>>>(
        static_cast<const Ty*>(a), static_cast<const Ty*>(x_sum), out, B, C, H, W);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace cuda
}  // namespace dsrb
