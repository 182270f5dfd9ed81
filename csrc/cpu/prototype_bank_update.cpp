// prototype_bank_update, CPU kernel (contract: dsrb/ops/prototype_bank_update.py).
//   sums (C, 4, D) float, counts (C, 4) int64, S (B, C, D), T (B, C) in S's dtype, quadrant (B, C) int64, cap >= 0
//   ->  new sums (C, 4, D) in sums' dtype, new counts (C, 4) int64; the inputs are not modified.
// Every (b, c) with T[b, c] == 1 adds S[b, c] to bucket (c, quadrant[b, c]) while that bucket holds fewer than cap
// samples, meeting b in increasing order. The cap makes a sample's fate depend on the earlier ones, so each task owns
// whole classes and walks b in order: one writer per output element and a fixed summation order (deterministic).
#include "../checks.h"
#include "../ops.h"
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

namespace dsrb {

std::tuple<Tensor, Tensor> prototype_bank_update_cpu(const Tensor& sums_, const Tensor& counts_, const Tensor& S_,
                                                     const Tensor& T_, const Tensor& quadrant_, int64_t cap) {
  checks::prototype_bank_update(sums_, counts_, S_, T_, quadrant_, cap, c10::DeviceType::CPU);
  const Tensor sums = sums_.contiguous(), counts = counts_.contiguous(), S = S_.contiguous(), T = T_.contiguous(),
               quadrant = quadrant_.contiguous();
  const int64_t B = S.size(0), C = S.size(1), D = S.size(2);
  Tensor new_sums = at::empty({C, 4, D}, sums.options());
  Tensor new_counts = at::empty({C, 4}, counts.options());
  const int64_t* cnt_in = counts.data_ptr<int64_t>();
  const int64_t* quad = quadrant.data_ptr<int64_t>();
  int64_t* cnt_out = new_counts.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S.scalar_type(), "prototype_bank_update_cpu", [&] {
    using s_t = scalar_t;
    using s_opmath_t = at::opmath_type<s_t>;
    const s_t* s = S.data_ptr<s_t>();
    const s_t* t = T.data_ptr<s_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sums.scalar_type(), "prototype_bank_update_cpu", [&] {
      // Accumulate in the opmath type of sums; S is first rounded to sums' dtype, as the torch backend's S.to(...).
      using opmath_t = at::opmath_type<scalar_t>;
      const scalar_t* sm = sums.data_ptr<scalar_t>();
      scalar_t* out = new_sums.data_ptr<scalar_t>();
      const int64_t grain = cpu::grain_for(B * D);
      at::parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
        std::vector<opmath_t> acc(4 * D);  // the batch's kept samples, added to sums at the end (torch's order)
        for (int64_t c = begin; c < end; ++c) {
          std::fill(acc.begin(), acc.end(), opmath_t(0));
          int64_t cnt[4];
          for (int q = 0; q < 4; ++q) cnt[q] = cnt_in[c * 4 + q];
          for (int64_t b = 0; b < B; ++b) {
            const int64_t r = b * C + c;
            const int64_t q = quad[r];
            TORCH_CHECK(q >= 0 && q <= 3, "argument 'quadrant': expected values in [0, 3], got ", q, " at index (",
                        b, ", ", c, ")");
            if (static_cast<s_opmath_t>(t[r]) != s_opmath_t(1) || cnt[q] >= cap) continue;
            ++cnt[q];
            const s_t* src = s + r * D;
            opmath_t* dst = acc.data() + q * D;
            for (int64_t d = 0; d < D; ++d) {
              dst[d] += static_cast<opmath_t>(static_cast<scalar_t>(static_cast<s_opmath_t>(src[d])));
            }
          }
          for (int q = 0; q < 4; ++q) cnt_out[c * 4 + q] = cnt[q];
          for (int64_t i = 0; i < 4 * D; ++i) {
            out[c * 4 * D + i] = static_cast<scalar_t>(static_cast<opmath_t>(sm[c * 4 * D + i]) + acc[i]);
          }
        }
      });
    });
  });
  return {new_sums, new_counts};
}

}  // namespace dsrb
