// Helpers shared by the CPU kernels of the blends, the quadrant index and the bank update.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>

#include <algorithm>
#include <cstdint>

namespace dsrb {
namespace cpu {

// Elements per parallel chunk (ATen's GRAIN_SIZE, which lives in the heavy TensorIterator.h).
constexpr int64_t kGrainSize = 32768;

// Items per parallel chunk when each item touches `elements` values: about kGrainSize elements a chunk.
inline int64_t grain_for(int64_t elements) { return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(elements, 1)); }

// sum_d g[d] * (s[d] - p[d]) with 8 interleaved partials: vectorisable without -ffast-math, and more accurate than a
// single running sum.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
opmath_t dot_diff(const scalar_t* g, const scalar_t* s, const scalar_t* p, int64_t D) {
  opmath_t lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int k = 0; k < 8; ++k) {
      lane[k] += static_cast<opmath_t>(g[d + k]) *
                 (static_cast<opmath_t>(s[d + k]) - static_cast<opmath_t>(p[d + k]));
    }
  }
  opmath_t tail = 0;
  for (; d < D; ++d) {
    tail += static_cast<opmath_t>(g[d]) * (static_cast<opmath_t>(s[d]) - static_cast<opmath_t>(p[d]));
  }
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])) + tail;
}

// A blend coefficient's gradient, reduced in double: rounded to the op-math type (as the torch backend's sum is),
// then to the coefficient's own dtype (a float32 alpha with fp16 S gets no fp16 overflow), in its shape.
template <typename opmath_t>
at::Tensor coefficient_grad(double total, const at::Tensor& coef) {
  const auto op_dtype = c10::CppTypeToScalarType<opmath_t>::value;
  return at::full(coef.sizes(), static_cast<double>(static_cast<opmath_t>(total)), coef.options().dtype(op_dtype))
      .to(coef.scalar_type());
}

}  // namespace cpu
}  // namespace dsrb
