// instance_blend, CPU kernels (contract: dsrb/ops/instance_blend.py).
//   forward:  S (B, C, D), T (B, C), alpha (), partner (B) int64  ->  S1 (B, C, D), T1 (B, C)
//   backward: grad_S1 (B, C, D), grad_T1 (B, C), S, T, alpha, partner
//             ->  grad_S (B, C, D), grad_alpha (alpha's shape)
// blend[b, c] = T[b, c] == 0 && T[partner[b], c] == 1; blended rows become
// alpha * S[b, c] + (1 - alpha) * S[partner[b], c] with target 1 - alpha. Rows (b, c) are independent, so both
// passes parallelise over rows; every output element is written by exactly one thread, and grad_alpha is reduced from
// per-row partials in a fixed order (deterministic).
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
namespace {

// Partner indices, validated before any row is read through them.
std::vector<int64_t> read_partner(const Tensor& partner, int64_t B) {
  const int64_t* p = partner.data_ptr<int64_t>();
  std::vector<int64_t> out(p, p + B);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(out[b] >= 0 && out[b] < B, "argument 'partner': expected values in [0, ", checks::text(B - 1),
                      "], got ", checks::text(out[b]), " at index ", checks::text(b));
  }
  return out;
}

// (B * C) blend mask; B * C is small next to the (B, C, D) features, so it is built serially.
template <typename scalar_t>
std::vector<uint8_t> blend_mask(const scalar_t* T, const std::vector<int64_t>& partner, int64_t B, int64_t C) {
  using opmath_t = at::opmath_type<scalar_t>;
  std::vector<uint8_t> w(B * C);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      w[b * C + c] = static_cast<opmath_t>(T[b * C + c]) == opmath_t(0) &&
                     static_cast<opmath_t>(T[partner[b] * C + c]) == opmath_t(1);
    }
  }
  return w;
}

}  // namespace

std::tuple<Tensor, Tensor> instance_blend_cpu(const Tensor& S_, const Tensor& T_, const Tensor& alpha_,
                                              const Tensor& partner_, bool detach_target) {
  checks::instance_blend(S_, T_, alpha_, partner_, c10::DeviceType::CPU);
  (void)detach_target;  // only the backward depends on it
  const Tensor S = S_.contiguous(), T = T_.contiguous(), alpha = alpha_.to(S_.scalar_type()).contiguous(),
               partner_t = partner_.contiguous();
  const int64_t B = S.size(0), C = S.size(1), D = S.size(2);
  Tensor S1 = at::empty({B, C, D}, S.options());
  Tensor T1 = at::empty({B, C}, S.options());
  const std::vector<int64_t> partner = read_partner(partner_t, B);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S.scalar_type(), "instance_blend_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* s = S.data_ptr<scalar_t>();
    const scalar_t* t = T.data_ptr<scalar_t>();
    scalar_t* s1 = S1.data_ptr<scalar_t>();
    scalar_t* t1 = T1.data_ptr<scalar_t>();
    const opmath_t a = static_cast<opmath_t>(alpha.data_ptr<scalar_t>()[0]);
    // 1 - alpha rounded to S's dtype, as the torch backend forms it.
    const scalar_t one_minus_s = static_cast<scalar_t>(opmath_t(1) - a);
    const opmath_t oma = static_cast<opmath_t>(one_minus_s);
    const std::vector<uint8_t> w = blend_mask(t, partner, B, C);

    at::parallel_for(0, B * C, cpu::grain_for(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / C, c = r % C;
        const scalar_t* src = s + r * D;
        scalar_t* dst = s1 + r * D;
        if (w[r]) {
          const scalar_t* other = s + (partner[b] * C + c) * D;
          for (int64_t d = 0; d < D; ++d) {
            dst[d] = static_cast<scalar_t>(a * static_cast<opmath_t>(src[d]) + oma * static_cast<opmath_t>(other[d]));
          }
          t1[r] = one_minus_s;
        } else {
          std::copy(src, src + D, dst);
          t1[r] = t[r];
        }
      }
    });
  });
  return {S1, T1};
}

std::tuple<Tensor, Tensor> instance_blend_cpu_backward(const Tensor& grad_S1_, const Tensor& grad_T1_,
                                                       const Tensor& S_, const Tensor& T_, const Tensor& alpha_,
                                                       const Tensor& partner_, bool detach_target) {
  checks::instance_blend(S_, T_, alpha_, partner_, c10::DeviceType::CPU);
  const int64_t B = S_.size(0), C = S_.size(1), D = S_.size(2);
  checks::shape(grad_S1_, "grad_S1", {B, C, D});
  checks::same_device(grad_S1_, "grad_S1", S_, "S");
  checks::dtype(grad_S1_, "grad_S1", S_.scalar_type(), "the dtype of 'S'");
  checks::shape(grad_T1_, "grad_T1", {B, C});
  checks::same_device(grad_T1_, "grad_T1", S_, "S");
  checks::dtype(grad_T1_, "grad_T1", S_.scalar_type(), "the dtype of 'S'");

  const Tensor gS1 = grad_S1_.contiguous(), gT1 = grad_T1_.contiguous(), S = S_.contiguous(), T = T_.contiguous(),
               alpha = alpha_.to(S_.scalar_type()).contiguous(), partner_t = partner_.contiguous();
  Tensor grad_S = at::empty({B, C, D}, S.options());
  Tensor grad_alpha;
  const std::vector<int64_t> partner = read_partner(partner_t, B);

  // Inverse of partner as CSR lists: the images b' with partner[b'] == b, in increasing b' order, so each grad_S row
  // gathers its partner contributions itself (no scatter, no atomics) in the torch backend's index_add order.
  std::vector<int64_t> start(B + 1, 0), from(B);
  for (int64_t b = 0; b < B; ++b) ++start[partner[b] + 1];
  for (int64_t b = 0; b < B; ++b) start[b + 1] += start[b];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t b = 0; b < B; ++b) from[fill[partner[b]]++] = b;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S.scalar_type(), "instance_blend_cpu_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* g = gS1.data_ptr<scalar_t>();
    const scalar_t* gt = gT1.data_ptr<scalar_t>();
    const scalar_t* s = S.data_ptr<scalar_t>();
    scalar_t* gs = grad_S.data_ptr<scalar_t>();
    const opmath_t a = static_cast<opmath_t>(alpha.data_ptr<scalar_t>()[0]);
    const opmath_t oma = static_cast<opmath_t>(static_cast<scalar_t>(opmath_t(1) - a));
    const std::vector<uint8_t> w = blend_mask(T.data_ptr<scalar_t>(), partner, B, C);
    std::vector<opmath_t> partial(B * C, opmath_t(0));  // grad_alpha contribution of each row

    at::parallel_for(0, B * C, cpu::grain_for(D), [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> acc(D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / C, c = r % C;
        const scalar_t* gr = g + r * D;
        scalar_t* out = gs + r * D;
        const opmath_t m = w[r] ? a : opmath_t(1);
        if (w[r]) partial[r] = cpu::dot_diff(gr, s + r * D, s + (partner[b] * C + c) * D, D);
        bool gathered = false;
        for (int64_t i = start[b]; i < start[b + 1]; ++i) {
          const int64_t src = from[i];
          if (!w[src * C + c]) continue;
          if (!gathered) {
            for (int64_t d = 0; d < D; ++d) acc[d] = static_cast<opmath_t>(gr[d]) * m;
            gathered = true;
          }
          const scalar_t* gsrc = g + (src * C + c) * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<opmath_t>(gsrc[d]) * oma;
        }
        if (gathered) {
          for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(acc[d]);
        } else {
          for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(static_cast<opmath_t>(gr[d]) * m);
        }
      }
    });

    // Fixed-order reduction of the row partials (double: B * C terms, negligible cost).
    double total = 0;
    for (int64_t r = 0; r < B * C; ++r) total += static_cast<double>(partial[r]);
    if (!detach_target) {
      double target = 0;  // dT1/dalpha = -1 at blended entries
      for (int64_t r = 0; r < B * C; ++r) {
        if (w[r]) target += static_cast<double>(static_cast<opmath_t>(gt[r]));
      }
      total -= target;
    }
    grad_alpha = cpu::coefficient_grad<opmath_t>(total, alpha_);
  });
  return {grad_S, grad_alpha};
}

}  // namespace dsrb
