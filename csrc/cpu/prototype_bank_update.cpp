// prototype_bank_update, CPU kernels (contract: dsrb/ops/prototype_bank_update.py).
//   sums (C, 4, D) float, counts (C, 4) int64, S (B, C, D), T (B, C) in S's dtype, quadrant (B, C) int64, cap >= 0
//   prototype_bank_update_cpu:   ->  new sums (C, 4, D) in sums' dtype, new counts (C, 4) int64; inputs unchanged.
//   prototype_bank_update_cpu_:  the same update written into sums and counts (contiguous), touching only the buckets
//                                the batch reaches; T of any real dtype, its values and the quadrants checked (errors
//                                raised before anything is written).
// Every (b, c) with T[b, c] == 1 adds S[b, c] to bucket (c, quadrant[b, c]) while that bucket holds fewer than cap
// samples, meeting b in increasing order. The cap makes a sample's fate depend on the earlier ones, so each task owns
// whole classes and walks b in order: one writer per output element and a fixed summation order (deterministic).
// A reached bucket becomes sums + (0 + S[b1] + S[b2] + ...), the batch's samples summed first (torch's order), that sum
// rounded to the sums' dtype before it is added.
#include "../checks.h"
#include "../ops.h"
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

namespace dsrb {
namespace {

// The batch's kept samples of class c, per bucket, into acc (4, D) in opmath_t (S rounded to sums' dtype first, as
// the torch backend's S.to(...)); counts advance in cnt. reached[q]: bucket q got a sample (only those are written).
// positive(r): T of flat (b, c) index r is +1.
template <typename s_t, typename scalar_t, typename Positive, typename opmath_t = at::opmath_type<scalar_t>>
void gather_class(const s_t* s, const Positive& positive, const int64_t* quad, int64_t B, int64_t C, int64_t D,
                  int64_t c, int64_t cap, int64_t* cnt, bool* reached, opmath_t* acc) {
  using s_opmath_t = at::opmath_type<s_t>;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = b * C + c;
    const int64_t q = quad[r];
    TORCH_CHECK_VALUE(q >= 0 && q <= 3, "argument 'quadrant': expected values in [0, 3], got ", checks::text(q),
                      " at index (", checks::text(b), ", ", checks::text(c), ")");
    if (!positive(r) || cnt[q] >= cap) continue;
    ++cnt[q];
    const s_t* __restrict__ src = s + r * D;
    opmath_t* __restrict__ dst = acc + q * D;
    const auto as_sums = [](s_t v) {
      return static_cast<opmath_t>(static_cast<scalar_t>(static_cast<s_opmath_t>(v)));
    };
    if (reached[q]) {
      for (int64_t d = 0; d < D; ++d) dst[d] += as_sums(src[d]);
    } else {  // the first sample: 0 + S, as a zero-initialised sum gives (-0 becomes +0)
      for (int64_t d = 0; d < D; ++d) dst[d] = opmath_t(0) + as_sums(src[d]);
      reached[q] = true;
    }
  }
}

// For each class of the chunk: gather the batch (gather_class), then finish(c, cnt, reached, acc) writes it.
// work_per_class: the elements a class costs on average (class_work): how many classes a thread takes.
template <typename s_t, typename scalar_t, typename Positive, typename Finish>
void for_each_class(const Tensor& S, const Positive& positive, const Tensor& quadrant, const int64_t* cnt_in,
                    int64_t cap, int64_t work_per_class, const Finish& finish) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = S.size(0), C = S.size(1), D = S.size(2);
  const s_t* s = S.data_ptr<s_t>();
  const int64_t* quad = quadrant.data_ptr<int64_t>();
  at::parallel_for(0, C, cpu::grain_for(work_per_class), [&](int64_t begin, int64_t end) {
    std::unique_ptr<opmath_t[]> acc(new opmath_t[4 * D]);  // uninitialised: a bucket is written before it is read
    for (int64_t c = begin; c < end; ++c) {
      int64_t cnt[4] = {cnt_in[c * 4], cnt_in[c * 4 + 1], cnt_in[c * 4 + 2], cnt_in[c * 4 + 3]};
      bool reached[4] = {false, false, false, false};
      gather_class<s_t, scalar_t>(s, positive, quad, B, C, D, c, cap, cnt, reached, acc.get());
      finish(c, cnt, reached, acc.get());
    }
  });
}

// sums + batch sum, the batch sum first rounded to the sums' dtype: two roundings in half precision, as the op
// contract (the torch backend's sums + acc.to(sums.dtype), the triton and CUDA kernels). Rounded once, a half bank
// differed from them in about a third of its elements.
template <typename scalar_t, typename opmath_t>
scalar_t plus_rounded(scalar_t sum, opmath_t add) {
  return static_cast<scalar_t>(static_cast<opmath_t>(sum) + static_cast<opmath_t>(static_cast<scalar_t>(add)));
}

// out[d] = in[d] + add[d] (add null: + 0), rounded to scalar_t.
template <typename scalar_t, typename opmath_t>
void add_row(const scalar_t* __restrict__ in, const opmath_t* __restrict__ add, scalar_t* __restrict__ out,
             int64_t D) {
  if (add != nullptr) {
    for (int64_t d = 0; d < D; ++d) out[d] = plus_rounded(in[d], add[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(static_cast<opmath_t>(in[d]) + opmath_t(0));
  }
}

// row[d] += add[d] in place, rounded to scalar_t (the same arithmetic as add_row).
template <typename scalar_t, typename opmath_t>
void add_into(scalar_t* __restrict__ row, const opmath_t* __restrict__ add, int64_t D) {
  for (int64_t d = 0; d < D; ++d) row[d] = plus_rounded(row[d], add[d]);
}

// The elements a class costs on average: its B targets, its share of the batch's known positives (each read into the
// accumulator and added once more to its bucket: 2 D), and `written` per class. Only the positives' rows of S are
// read: at the demo shape a batch is a few thousand elements, which a parallel region would cost more than it saves
// (and, on a loaded machine, stall on a descheduled thread), where B * D per class counted every row.
inline int64_t class_work(int64_t positives, int64_t B, int64_t C, int64_t D, int64_t written) {
  return B + (positives * 2 * D) / std::max<int64_t>(C, 1) + written;
}

#define DSRB_DISPATCH_BANK(S, sums, ...)                                                                   \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S.scalar_type(), "prototype_bank_update_cpu", [&] { \
    using s_t = scalar_t;                                                                                  \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sums.scalar_type(), "prototype_bank_update_cpu", \
                                    __VA_ARGS__);                                                          \
  })

}  // namespace

std::tuple<Tensor, Tensor> prototype_bank_update_cpu(const Tensor& sums_, const Tensor& counts_, const Tensor& S_,
                                                     const Tensor& T_, const Tensor& quadrant_, int64_t cap) {
  checks::prototype_bank_update(sums_, counts_, S_, T_, quadrant_, cap, c10::DeviceType::CPU);
  const Tensor sums = sums_.contiguous(), counts = counts_.contiguous(), S = S_.contiguous(), T = T_.contiguous(),
               quadrant = quadrant_.contiguous();
  const int64_t C = S.size(1), D = S.size(2);
  Tensor new_sums = at::empty({C, 4, D}, sums.options());
  Tensor new_counts = at::empty({C, 4}, counts.options());
  const int64_t* cnt_in = counts.data_ptr<int64_t>();
  int64_t* cnt_out = new_counts.data_ptr<int64_t>();

  DSRB_DISPATCH_BANK(S, sums, [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* in = sums.data_ptr<scalar_t>();
    scalar_t* out = new_sums.data_ptr<scalar_t>();
    const s_t* t = T.data_ptr<s_t>();
    const auto positive = [t](int64_t r) { return static_cast<at::opmath_type<s_t>>(t[r]) == 1; };
    int64_t positives = 0;
    for (int64_t r = 0; r < T.numel(); ++r) positives += positive(r) ? 1 : 0;
    // Every bucket is written: sums + the batch's sum where reached, sums + 0 elsewhere (as torch's sums + einsum).
    const int64_t work = class_work(positives, S.size(0), C, D, 4 * D);
    for_each_class<s_t, scalar_t>(S, positive, quadrant, cnt_in, cap, work, [&](int64_t c, const int64_t* cnt,
                                                                                const bool* reached,
                                                                                const opmath_t* acc) {
      for (int q = 0; q < 4; ++q) {
        cnt_out[c * 4 + q] = cnt[q];
        const int64_t row = (c * 4 + q) * D;
        add_row(in + row, reached[q] ? acc + q * D : static_cast<const opmath_t*>(nullptr), out + row, D);
      }
    });
  });
  return {new_sums, new_counts};
}

void prototype_bank_update_cpu_(Tensor& sums, Tensor& counts, const Tensor& S_, const Tensor& T_,
                                const Tensor& quadrant_, int64_t cap) {
  checks::prototype_bank_update(sums, counts, S_, T_, quadrant_, cap, c10::DeviceType::CPU, /*in_place=*/true);
  // A float8 T, which the other backends take, is compared in float32 (exact widening), as the dispatch has no float8.
  const Tensor S = S_.contiguous(), T = (at::isFloat8Type(T_.scalar_type()) ? T_.to(at::kFloat) : T_).contiguous(),
               quadrant = quadrant_.contiguous();
  const int64_t C = S.size(1), D = S.size(2), n = T.numel();
  // Every value is checked before anything is written, so an error leaves sums and counts as they were. T holds
  // -1, 0 or +1 (compared in T's dtype, as torch compares it with those numbers); positive[r]: T == +1.
  std::vector<uint8_t> positive(n);
  int64_t positives = 0;
  AT_DISPATCH_V2(T.scalar_type(), "prototype_bank_update_cpu_", AT_WRAP([&] {
    const scalar_t* t = T.data_ptr<scalar_t>();
    const auto zero = static_cast<scalar_t>(0), one = static_cast<scalar_t>(1), minus_one = static_cast<scalar_t>(-1);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK_VALUE(t[i] == zero || t[i] == one || t[i] == minus_one,
                        "argument 'T': expected values in {-1, 0, 1}, found ",
                        checks::text(static_cast<double>(t[i])), " at index (", checks::text(i / C), ", ",
                        checks::text(i % C), ")");
      positive[i] = t[i] == one;
      positives += positive[i];
    }
  }), AT_EXPAND(AT_ALL_TYPES), AT_EXPAND(AT_BAREBONES_UNSIGNED_TYPES), at::kHalf, at::kBFloat16, at::kBool);
  const int64_t* quad = quadrant.data_ptr<int64_t>();
  if (n > 0) {
    const auto [lo, hi] = std::minmax_element(quad, quad + n);
    TORCH_CHECK_VALUE(*lo >= 0 && *hi <= 3, "argument 'quadrant': expected values in [0, 3], found range [",
                      checks::text(*lo), ", ", checks::text(*hi), "]");
  }
  int64_t* cnt = counts.data_ptr<int64_t>();
  const uint8_t* pos = positive.data();

  DSRB_DISPATCH_BANK(S, sums, [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* out = sums.data_ptr<scalar_t>();
    // Only the reached buckets are written (sums + the batch's sum); the others are left as they are.
    const int64_t work = class_work(positives, S.size(0), C, D, 0);
    for_each_class<s_t, scalar_t>(S, [pos](int64_t r) { return pos[r] != 0; }, quadrant, cnt, cap, work,
                                  [&](int64_t c, const int64_t* new_cnt, const bool* reached, const opmath_t* acc) {
                                    for (int q = 0; q < 4; ++q) {
                                      cnt[c * 4 + q] = new_cnt[q];
                                      const int64_t row = (c * 4 + q) * D;
                                      if (reached[q]) add_into(out + row, acc + q * D, D);
                                    }
                                  });
  });
}

#undef DSRB_DISPATCH_BANK

}  // namespace dsrb
