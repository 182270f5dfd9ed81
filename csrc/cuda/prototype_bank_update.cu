// CUDA kernel of prototype_bank_update (spec §5.1, §5.2 item 7): capped per-(class, quadrant) sums and counts.
//
// Every (b, c) with T[b, c] == 1 is a candidate of bucket (c, quadrant[b, c]); within the batch the candidates of a
// bucket are met in increasing b, and a candidate is kept while counts[c, q] + (earlier candidates) < cap.
// new_sums = sums + sum of the kept S[b, c] (converted to the sums' dtype by the glue); new_counts = counts + kept.
//
// One thread per destination (c, d) walks b = 0 .. B-1 in order with the four running counts of class c and four
// accumulators (acc type) in registers, and writes the four buckets of (c, d); C more threads do the same walk for
// the counts alone (so that D == 0 still updates the counts). No atomics, fixed order, inputs untouched.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace dsrb {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bank_update_kernel(const T* __restrict__ sums, const int64_t* __restrict__ counts, const T* __restrict__ S,
                       const bool* __restrict__ positive, const int64_t* __restrict__ quadrant,
                       T* __restrict__ new_sums, int64_t* __restrict__ new_counts, int64_t B, int64_t C, int64_t D,
                       int64_t cap) {
  using A = Acc<T>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t CD = C * D;
  if (idx >= CD + C) return;
  const bool counts_only = idx >= CD;
  const int64_t c = counts_only ? idx - CD : idx / D;
  const int64_t d = counts_only ? 0 : idx - c * D;

  int64_t run[4], kept[4];
  A acc[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    run[i] = counts[c * 4 + i];  // counts + the kept candidates: at most cap, so it never overflows
    kept[i] = 0;
    acc[i] = A(0);
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t row = b * C + c;
    if (!positive[row]) continue;
    const int64_t q = quadrant[row];  // validated by the glue; other values are skipped, never used as an index
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (q == i) {
        if (run[i] < cap) {
          ++kept[i];
          ++run[i];  // only when kept: a count near INT64_MAX counting every candidate wrapped round to keep more
          if (!counts_only) acc[i] = add_rn(acc[i], to_acc(S[row * D + d]));
        }
      }
    }
  }
  if (counts_only) {
#pragma unroll
    for (int i = 0; i < 4; ++i) new_counts[c * 4 + i] = counts[c * 4 + i] + kept[i];
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t o = (c * 4 + i) * D + d;
      // torch: sums + einsum(...), the einsum result being in the sums' dtype
      new_sums[o] = from_acc<T>(add_rn(to_acc(sums[o]), to_acc(from_acc<T>(acc[i]))));
    }
  }
}

}  // namespace

int prototype_bank_update(DType dt, const void* sums, const int64_t* counts, const void* S, const bool* positive,
                          const int64_t* quadrant, void* new_sums, int64_t* new_counts, int64_t B, int64_t C,
                          int64_t D, int64_t cap, void* stream) {
  if (C <= 0) return 0;
  const int64_t items = C * (D > 0 ? D : 0) + C;
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(dt, [&](auto tag) -> int {
    using Ty = decltype(tag);
    bank_update_kernel<Ty><<<static_cast<unsigned>(blocks), kThreads, 0, st>>>(
        static_cast<const Ty*>(sums), counts, static_cast<const Ty*>(S), positive, quadrant,
        static_cast<Ty*>(new_sums), new_counts, B < 0 ? 0 : B, C, D > 0 ? D : 0, cap);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace cuda
}  // namespace dsrb
