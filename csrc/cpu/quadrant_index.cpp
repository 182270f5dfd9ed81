// quadrant_index, CPU kernel (contract: dsrb/ops/quadrant_index.py).
//   a (B, C, N), x_sum (B, N) in a's dtype, height * width == N  ->  (B, C) int64 in [0, 3]
// G[b, c, h, w] = a[b, c, h * W + w] * x_sum[b, h * W + w]; row = argmax_h max_w G, col = argmax_w max_h G (first
// index on ties, NaN counts as the maximum and the first NaN wins, as torch.amax/argmax);
// quadrant = 2 * (row >= H / 2) + (col >= W / 2). A block of kLanes maps per iteration of a parallel loop.
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

// Maps per block. A block's keys are stored lane-major (key[n * kLanes + j] for its map j), so that every step below
// is one operation over kLanes maps, which the compiler vectorises; a map at a time, the rows and columns (7 long at
// the COCO shape) are too short for vectors. 4 int32 keys fill one 16-byte vector of the baseline x86-64 build: 35 %
// faster than a map at a time at the COCO shape, where 8 lanes were 25 % faster and 16 slower (2026-12-06, AMD EPYC).
constexpr int64_t kLanes = 4;

// The quadrants of maps r0 .. r0 + count - 1 (count <= kLanes; the lanes past count repeat the last map and are not
// stored). key: N * kLanes, col_max: W * kLanes of scratch.
template <typename scalar_t, typename opmath_t, typename key_t>
void quadrant_block(const scalar_t* pa, const scalar_t* px, int64_t r0, int64_t count, int64_t C, int64_t N,
                    int64_t H, int64_t W, key_t* key, key_t* col_max, int64_t* q) {
  constexpr int64_t L = kLanes;
  const scalar_t* ar[L];
  const scalar_t* xr[L];
  for (int64_t j = 0; j < L; ++j) {
    const int64_t r = r0 + std::min(j, count - 1);
    ar[j] = pa + r * N;
    xr[j] = px + (r / C) * N;
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < L; ++j) {
      // Rounded to a's dtype, like the torch backend's product, so ties and the order are the same.
      key[n * L + j] = order_key(static_cast<opmath_t>(
          static_cast<scalar_t>(static_cast<opmath_t>(ar[j][n]) * static_cast<opmath_t>(xr[j][n]))));
    }
  }
  // Row maxima, their first argmax (a later row replaces the best only when strictly greater) and column maxima.
  auto row_max = [&](int64_t h, key_t* m) {
    const key_t* kr = key + h * W * L;
    std::copy(kr, kr + L, m);
    for (int64_t w = 1; w < W; ++w) {
      for (int64_t j = 0; j < L; ++j) m[j] = std::max(m[j], kr[w * L + j]);
    }
  };
  key_t best_row[L], row[L], best_col[L], col[L], m[L];
  row_max(0, best_row);
  std::fill(row, row + L, key_t(0));
  std::copy(key, key + W * L, col_max);
  for (int64_t h = 1; h < H; ++h) {
    row_max(h, m);
    for (int64_t j = 0; j < L; ++j) {
      const bool greater = m[j] > best_row[j];
      best_row[j] = greater ? m[j] : best_row[j];
      row[j] = greater ? static_cast<key_t>(h) : row[j];
    }
    const key_t* kr = key + h * W * L;
    for (int64_t i = 0; i < W * L; ++i) col_max[i] = std::max(col_max[i], kr[i]);
  }
  std::copy(col_max, col_max + L, best_col);
  std::fill(col, col + L, key_t(0));
  for (int64_t w = 1; w < W; ++w) {
    for (int64_t j = 0; j < L; ++j) {
      const bool greater = col_max[w * L + j] > best_col[j];
      best_col[j] = greater ? col_max[w * L + j] : best_col[j];
      col[j] = greater ? static_cast<key_t>(w) : col[j];
    }
  }
  for (int64_t j = 0; j < count; ++j) {
    q[r0 + j] = 2 * (row[j] >= H / 2 ? 1 : 0) + (col[j] >= W / 2 ? 1 : 0);
  }
}

}  // namespace

Tensor quadrant_index_cpu(const Tensor& a_, const Tensor& x_sum_, int64_t height, int64_t width) {
  checks::quadrant_index(a_, x_sum_, height, width, c10::DeviceType::CPU);
  // Below fp64 the row and column indices live in the int32 lanes of the keys: a larger one would wrap around into a
  // wrong quadrant. Checked before a's copy (an expanded a of that size costs nothing until then).
  TORCH_CHECK_VALUE(a_.scalar_type() == at::kDouble ||
                        std::max(height, width) <= static_cast<int64_t>(std::numeric_limits<int32_t>::max()),
                    "arguments 'height', 'width': the cpu kernel takes each at most 2147483647 for a of dtype ",
                    a_.scalar_type(), " (float64: any), got ", checks::text(height), " x ", checks::text(width));
  const Tensor a = a_.contiguous(), x_sum = x_sum_.contiguous();
  const int64_t B = a.size(0), C = a.size(1), N = a.size(2), H = height, W = width;
  Tensor out = at::empty({B, C}, a.options().dtype(at::kLong));
  int64_t* q = out.data_ptr<int64_t>();
  const int64_t maps = B * C, blocks = (maps + kLanes - 1) / kLanes;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "quadrant_index_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using key_t = typename KeyOf<opmath_t>::type;
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* px = x_sum.data_ptr<scalar_t>();
    const int64_t grain = cpu::grain_for(4 * N * kLanes);  // a score costs a few elementwise operations
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      std::vector<key_t> key(N * kLanes), col_max(W * kLanes);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t r0 = blk * kLanes;
        quadrant_block<scalar_t, opmath_t>(pa, px, r0, std::min(kLanes, maps - r0), C, N, H, W, key.data(),
                                           col_max.data(), q);
      }
    });
  });
  return out;
}

}  // namespace dsrb
