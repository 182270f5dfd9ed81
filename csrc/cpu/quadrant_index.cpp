// quadrant_index, CPU kernel (contract: dsrb/ops/quadrant_index.py).
//   a (B, C, N), x_sum (B, N) in a's dtype, height * width == N  ->  (B, C) int64 in [0, 3]
// G[b, c, h, w] = a[b, c, h * W + w] * x_sum[b, h * W + w]; row = argmax_h max_w G, col = argmax_w max_h G (first
// index on ties, NaN counts as the maximum and the first NaN wins, as torch.amax/argmax);
// quadrant = 2 * (row >= H / 2) + (col >= W / 2). One (b, c) map per iteration of a parallel loop.
#include "../checks.h"
#include "../ops.h"
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace dsrb {
namespace {

// torch.amax: a NaN anywhere makes the maximum NaN.
template <typename T>
inline T nan_max(T m, T v) {
  return (v > m || std::isnan(v)) ? v : m;
}

// torch.argmax: first maximum, where the first NaN beats every number.
template <typename T>
int64_t first_argmax(const T* v, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (std::isnan(v[best])) break;
    if (v[i] > v[best] || std::isnan(v[i])) best = i;
  }
  return best;
}

}  // namespace

Tensor quadrant_index_cpu(const Tensor& a_, const Tensor& x_sum_, int64_t height, int64_t width) {
  checks::quadrant_index(a_, x_sum_, height, width, c10::DeviceType::CPU);
  const Tensor a = a_.contiguous(), x_sum = x_sum_.contiguous();
  const int64_t B = a.size(0), C = a.size(1), N = a.size(2), H = height, W = width;
  Tensor out = at::empty({B, C}, a.options().dtype(at::kLong));
  int64_t* q = out.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "quadrant_index_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* px = x_sum.data_ptr<scalar_t>();
    const int64_t grain = cpu::grain_for(N);
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> row_max(H), col_max(W);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* ar = pa + r * N;
        const scalar_t* xr = px + (r / C) * N;
        for (int64_t h = 0; h < H; ++h) {
          opmath_t rm = 0;
          for (int64_t w = 0; w < W; ++w) {
            const int64_t n = h * W + w;
            // Rounded to a's dtype, like the torch backend's product, so ties and the order are the same.
            const opmath_t g = static_cast<opmath_t>(
                static_cast<scalar_t>(static_cast<opmath_t>(ar[n]) * static_cast<opmath_t>(xr[n])));
            rm = w == 0 ? g : nan_max(rm, g);
            col_max[w] = h == 0 ? g : nan_max(col_max[w], g);
          }
          row_max[h] = rm;
        }
        const int64_t row = first_argmax(row_max.data(), H), col = first_argmax(col_max.data(), W);
        q[r] = 2 * (row >= H / 2 ? 1 : 0) + (col >= W / 2 ? 1 : 0);
      }
    });
  });
  return out;
}

}  // namespace dsrb
