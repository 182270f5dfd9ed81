// quadrant_index, CPU kernel (contract: dsrb/ops/quadrant_index.py).
//   a (B, C, N), x_sum (B, N) in a's dtype, height * width == N  ->  (B, C) int64 in [0, 3]
// G[b, c, h, w] = a[b, c, h * W + w] * x_sum[b, h * W + w]; row = argmax_h max_w G, col = argmax_w max_h G (first
// index on ties, NaN counts as the maximum and the first NaN wins, as torch.amax/argmax);
// quadrant = 2 * (row >= H / 2) + (col >= W / 2). One (b, c) map per iteration of a parallel loop.
//
// Branch-free: each score becomes an integer key with the same order (keys equal exactly when the scores compare
// equal, every NaN the largest key), so the maxima are integer maxima and the argmax a conditional move. Branches on
// the values mispredict on every new map: they made the kernel about 4x slower on fresh data than on a repeated one.
#include "../checks.h"
#include "../ops.h"
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace dsrb {
namespace {

template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = int32_t;
};
template <>
struct KeyOf<double> {
  using type = int64_t;
};

// Order-preserving integer key of a score: for numbers, key(u) < key(v) iff u < v and key(u) == key(v) iff u == v
// (-0 is first made +0); every NaN, whatever its sign and payload, maps to the largest key, so it is the maximum and
// the first NaN wins, as in torch.amax/argmax.
template <typename opmath_t>
inline typename KeyOf<opmath_t>::type order_key(opmath_t g) {
  using key_t = typename KeyOf<opmath_t>::type;
  constexpr int kShift = 8 * sizeof(key_t) - 1;
  constexpr key_t kMagnitude = std::numeric_limits<key_t>::max();
  key_t bits;
  const opmath_t canonical = g + opmath_t(0);  // -0 + 0 == +0; not folded away without -fno-signed-zeros
  std::memcpy(&bits, &canonical, sizeof(bits));
  const key_t key = bits ^ ((bits >> kShift) & kMagnitude);  // negative numbers: reverse the magnitude order
  return g != g ? kMagnitude : key;
}

// First index of the maximum of v[0, n), n >= 1.
template <typename key_t>
inline int64_t first_argmax(const key_t* v, int64_t n) {
  key_t best = v[0];
  int64_t index = 0;
  for (int64_t i = 1; i < n; ++i) {
    const bool greater = v[i] > best;
    best = greater ? v[i] : best;
    index = greater ? i : index;
  }
  return index;
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
    using key_t = typename KeyOf<opmath_t>::type;
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* px = x_sum.data_ptr<scalar_t>();
    const int64_t grain = cpu::grain_for(4 * N);  // a score costs a few elementwise operations
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<key_t> key(N), row_max(H), col_max(W);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* ar = pa + r * N;
        const scalar_t* xr = px + (r / C) * N;
        for (int64_t n = 0; n < N; ++n) {
          // Rounded to a's dtype, like the torch backend's product, so ties and the order are the same.
          key[n] = order_key(static_cast<opmath_t>(
              static_cast<scalar_t>(static_cast<opmath_t>(ar[n]) * static_cast<opmath_t>(xr[n]))));
        }
        std::copy(key.begin(), key.begin() + W, col_max.begin());
        for (int64_t h = 0; h < H; ++h) {
          const key_t* kr = key.data() + h * W;
          key_t m = kr[0];
          for (int64_t w = 0; w < W; ++w) {
            m = std::max(m, kr[w]);
            col_max[w] = std::max(col_max[w], kr[w]);
          }
          row_max[h] = m;
        }
        const int64_t row = first_argmax(row_max.data(), H), col = first_argmax(col_max.data(), W);
        q[r] = 2 * (row >= H / 2 ? 1 : 0) + (col >= W / 2 ? 1 : 0);
      }
    });
  });
  return out;
}

}  // namespace dsrb
