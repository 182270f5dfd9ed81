// Device helpers shared by the CUDA kernels (csrc/cuda/*.cu): accumulation types (fp32 for the half types, fp64
// for fp64), conversions, torch-like rounding of each elementwise operation to the tensor dtype (no FMA contraction),
// warp sums, and the dtype dispatch of the host launchers. Plain CUDA: no torch header. Internal linkage, so each
// .cu (compiled on its own) gets its own copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launchers.h"

namespace dsrb {
namespace cuda {
namespace {

template <typename T>
struct AccT {
  using type = float;
};
template <>
struct AccT<double> {
  using type = double;
};
template <typename T>
using Acc = typename AccT<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(Acc<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// x rounded to T, kept in the acc type.
template <typename T>
__device__ __forceinline__ Acc<T> rnd(Acc<T> x) {
  return to_acc(from_acc<T>(x));
}

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

// torch's a * b, a + b, a - b on tensors of dtype T (computed in the acc type, rounded to T).
template <typename T>
__device__ __forceinline__ Acc<T> tmul(Acc<T> a, Acc<T> b) {
  return rnd<T>(mul_rn(a, b));
}
template <typename T>
__device__ __forceinline__ Acc<T> tadd(Acc<T> a, Acc<T> b) {
  return rnd<T>(add_rn(a, b));
}
template <typename T>
__device__ __forceinline__ Acc<T> tsub(Acc<T> a, Acc<T> b) {
  return rnd<T>(sub_rn(a, b));
}

// One warp blends a row: o[d] = coef * s[d] + om * other[d] (om = 1 - coef), each product and the sum rounded to T
// as torch computes them on tensors of dtype T.
template <typename T>
__device__ __forceinline__ void blend_row(T* o, const T* s, const T* other, Acc<T> coef, Acc<T> om, int64_t lane,
                                          int64_t D) {
  for (int64_t d = lane; d < D; d += 32)
    o[d] = from_acc<T>(tadd<T>(tmul<T>(coef, to_acc(s[d])), tmul<T>(om, to_acc(other[d]))));
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

template <typename F>
int dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::Float32:
      return f(float{});
    case DType::Float16:
      return f(__half{});
    case DType::BFloat16:
      return f(__nv_bfloat16{});
    case DType::Float64:
      return f(double{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

constexpr int64_t kMaxGridX = 2147483647;

}  // namespace
}  // namespace cuda
}  // namespace dsrb
