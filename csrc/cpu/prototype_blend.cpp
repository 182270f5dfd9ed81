// prototype_blend, CPU kernels (contract: dsrb/ops/prototype_blend.py).
//   forward:  S (B, C, D), T (B, C), beta (), bank (C, 4, D), quadrant/shift (B, C) int64, select (B, C) bool
//             ->  S2 (B, C, D), T2 (B, C)
//   backward: grad_S2 (B, C, D), grad_T2 (B, C), S, beta, bank, quadrant, shift, select
//             ->  grad_S (B, C, D), grad_beta (beta's shape), grad_bank (C, 4, D)
// p[b, c] = bank[c, (quadrant[b, c] - shift[b, c]) mod 4]; selected rows become beta * S + (1 - beta) * p with target
// 1 - beta. Rows are independent (parallel over rows); grad_bank is gathered per bank row, visiting b in increasing
// order, so every output element has one writer and a fixed summation order (deterministic, no atomics).
#include "../checks.h"
#include "../ops.h"
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

namespace dsrb {
namespace {

// Bank bucket (quadrant - shift) mod 4 of every (b, c), validating both indices before the bank is read.
std::vector<uint8_t> buckets(const Tensor& quadrant, const Tensor& shift, int64_t B, int64_t C) {
  const int64_t* q = quadrant.data_ptr<int64_t>();
  const int64_t* s = shift.data_ptr<int64_t>();
  std::vector<uint8_t> out(B * C);
  for (int64_t r = 0; r < B * C; ++r) {
    TORCH_CHECK_VALUE(q[r] >= 0 && q[r] <= 3, "argument 'quadrant': expected values in [0, 3], got ",
                      checks::text(q[r]), " at index (", checks::text(r / C), ", ", checks::text(r % C), ")");
    TORCH_CHECK_VALUE(s[r] >= 1 && s[r] <= 3, "argument 'shift': expected values in [1, 3], got ", checks::text(s[r]),
                      " at index (", checks::text(r / C), ", ", checks::text(r % C), ")");
    out[r] = static_cast<uint8_t>((q[r] - s[r] + 4) % 4);  // q - s >= -3: the non-negative remainder
  }
  return out;
}

}  // namespace

std::tuple<Tensor, Tensor> prototype_blend_cpu(const Tensor& S_, const Tensor& T_, const Tensor& beta_,
                                               const Tensor& bank_, const Tensor& quadrant_, const Tensor& shift_,
                                               const Tensor& select_, bool detach_target) {
  checks::prototype_blend(S_, T_, beta_, bank_, quadrant_, shift_, select_, c10::DeviceType::CPU);
  (void)detach_target;  // only the backward depends on it
  const Tensor S = S_.contiguous(), T = T_.contiguous(), beta = beta_.to(S_.scalar_type()).contiguous(),
               bank = bank_.contiguous(), select = select_.contiguous();
  const int64_t B = S.size(0), C = S.size(1), D = S.size(2);
  Tensor S2 = at::empty({B, C, D}, S.options());
  Tensor T2 = at::empty({B, C}, S.options());
  const std::vector<uint8_t> bucket = buckets(quadrant_.contiguous(), shift_.contiguous(), B, C);
  const bool* sel = select.data_ptr<bool>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S.scalar_type(), "prototype_blend_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* s = S.data_ptr<scalar_t>();
    const scalar_t* t = T.data_ptr<scalar_t>();
    const scalar_t* bk = bank.data_ptr<scalar_t>();
    scalar_t* s2 = S2.data_ptr<scalar_t>();
    scalar_t* t2 = T2.data_ptr<scalar_t>();
    const opmath_t be = static_cast<opmath_t>(beta.data_ptr<scalar_t>()[0]);
    // 1 - beta rounded to S's dtype, as the torch backend forms it.
    const scalar_t one_minus_s = static_cast<scalar_t>(opmath_t(1) - be);
    const opmath_t omb = static_cast<opmath_t>(one_minus_s);

    at::parallel_for(0, B * C, cpu::grain_for(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = r % C;
        const scalar_t* src = s + r * D;
        scalar_t* dst = s2 + r * D;
        if (sel[r]) {
          const scalar_t* p = bk + (c * 4 + bucket[r]) * D;
          for (int64_t d = 0; d < D; ++d) {
            dst[d] = static_cast<scalar_t>(be * static_cast<opmath_t>(src[d]) + omb * static_cast<opmath_t>(p[d]));
          }
          t2[r] = one_minus_s;
        } else {
          std::copy(src, src + D, dst);
          t2[r] = t[r];
        }
      }
    });
  });
  return {S2, T2};
}

std::tuple<Tensor, Tensor, Tensor> prototype_blend_cpu_backward(
    const Tensor& grad_S2_, const Tensor& grad_T2_, const Tensor& S_, const Tensor& beta_, const Tensor& bank_,
    const Tensor& quadrant_, const Tensor& shift_, const Tensor& select_, bool detach_target, bool bank_grad) {
  // The backward takes no T: grad_T2 is checked first under its own name, then stands in for T (a (B, C) tensor in
  // S's dtype) in the forward's checks, where it can no longer fail.
  checks::device(S_, "S", c10::DeviceType::CPU);
  checks::floating(S_, "S");
  checks::shape(S_, "S", {-1, -1, -1});
  const int64_t B = S_.size(0), C = S_.size(1), D = S_.size(2);
  checks::shape(grad_S2_, "grad_S2", {B, C, D});
  checks::same_device(grad_S2_, "grad_S2", S_, "S");
  checks::dtype(grad_S2_, "grad_S2", S_.scalar_type(), "the dtype of 'S'");
  checks::shape(grad_T2_, "grad_T2", {B, C});
  checks::same_device(grad_T2_, "grad_T2", S_, "S");
  checks::dtype(grad_T2_, "grad_T2", S_.scalar_type(), "the dtype of 'S'");
  checks::prototype_blend(S_, grad_T2_, beta_, bank_, quadrant_, shift_, select_, c10::DeviceType::CPU);

  const Tensor gS2 = grad_S2_.contiguous(), gT2 = grad_T2_.contiguous(), S = S_.contiguous(),
               beta = beta_.to(S_.scalar_type()).contiguous(), bank = bank_.contiguous(),
               select = select_.contiguous();
  Tensor grad_S = at::empty({B, C, D}, S.options());
  Tensor grad_beta;
  Tensor grad_bank = at::zeros({C, 4, D}, bank.options());
  const std::vector<uint8_t> bucket = buckets(quadrant_.contiguous(), shift_.contiguous(), B, C);
  const bool* sel = select.data_ptr<bool>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S.scalar_type(), "prototype_blend_cpu_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* g = gS2.data_ptr<scalar_t>();
    const scalar_t* gt = gT2.data_ptr<scalar_t>();
    const scalar_t* s = S.data_ptr<scalar_t>();
    const scalar_t* bk = bank.data_ptr<scalar_t>();
    scalar_t* gs = grad_S.data_ptr<scalar_t>();
    const opmath_t be = static_cast<opmath_t>(beta.data_ptr<scalar_t>()[0]);
    const opmath_t omb = static_cast<opmath_t>(static_cast<scalar_t>(opmath_t(1) - be));
    std::vector<opmath_t> partial(B * C, opmath_t(0));  // grad_beta contribution of each row

    at::parallel_for(0, B * C, cpu::grain_for(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* gr = g + r * D;
        scalar_t* out = gs + r * D;
        if (sel[r]) {
          partial[r] = cpu::dot_diff(gr, s + r * D, bk + ((r % C) * 4 + bucket[r]) * D, D);
          for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(static_cast<opmath_t>(gr[d]) * be);
        } else {
          std::copy(gr, gr + D, out);
        }
      }
    });

    // Fixed-order reduction of the row partials (double: B * C terms, negligible cost).
    double total = 0;
    for (int64_t r = 0; r < B * C; ++r) total += static_cast<double>(partial[r]);
    if (!detach_target) {
      double target = 0;  // dT2/dbeta = -1 at selected entries
      for (int64_t r = 0; r < B * C; ++r) {
        if (sel[r]) target += static_cast<double>(static_cast<opmath_t>(gt[r]));
      }
      total -= target;
    }
    grad_beta = cpu::coefficient_grad<opmath_t>(total, beta_);

    if (bank_grad) {
      // One task per bank row (c, q): it gathers its selected rows in increasing b (the index_add order).
      scalar_t* gb = grad_bank.data_ptr<scalar_t>();
      const int64_t grain = cpu::grain_for(B * D / 4);
      at::parallel_for(0, C * 4, grain, [&](int64_t begin, int64_t end) {
        std::vector<opmath_t> acc(D);
        for (int64_t k = begin; k < end; ++k) {
          const int64_t c = k / 4, q = k % 4;
          bool any = false;
          for (int64_t b = 0; b < B; ++b) {
            const int64_t r = b * C + c;
            if (!sel[r] || bucket[r] != q) continue;
            if (!any) {
              std::fill(acc.begin(), acc.end(), opmath_t(0));
              any = true;
            }
            const scalar_t* gr = g + r * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<opmath_t>(gr[d]) * omb;
          }
          if (any) {
            scalar_t* out = gb + k * D;
            for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(acc[d]);
          }
        }
      });
    }
  });
  return {grad_S, grad_beta, grad_bank};
}

}  // namespace dsrb
