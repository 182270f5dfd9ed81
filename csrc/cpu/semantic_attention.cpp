// semantic_attention on the CPU (architecture §3): x (B, N, D), u (B, N, I), e (C, I), v (I) -> S (B, C, D),
// a (B, C, N), and the backward, without any (B, N, C, I) or (B, N, C, D) buffer.
//
// The only expensive part is the score contraction s[b, c, n] = sum_k v[k] tanh(u[b, n, k] e[c, k]) and, in the
// backward, its three gradients with tanh recomputed: both are fused loops over rows r = (b, n), vectorised over k.
// Softmax and the two small batched matrix products (S = a x, and those of the backward) go to ATen.
// Half-precision inputs compute in fp32; fp64 in fp64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "checks.h"
#include "common.h"
#include "ops.h"

// One clone of the hot loops per vector width, chosen at load time by the CPU (GCC/Clang function multiversioning).
// GCC 12 takes the x86-64 levels: v3 is AVX2 with FMA (a bare "avx2" clone has no FMA: its tanh polynomial and sums
// were separate multiplies and adds), v4 AVX-512; the others keep the plain ISA clones.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define DSRB_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define DSRB_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DSRB_VECTOR_CLONES
#endif
// The helpers below must be inlined into each clone to be compiled for its vector width.
#if defined(__GNUC__) || defined(__clang__)
#define DSRB_INLINE inline __attribute__((always_inline))
#else
#define DSRB_INLINE inline
#endif

namespace dsrb {
namespace {

DSRB_INLINE float bit_cast_float(int32_t bits) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(float, bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// tanh as plain arithmetic, so that the loops calling it vectorise (a libm call keeps them scalar):
// tanh(w) = sign(w) E / (E + 2) with E = expm1(2|w|), by Cody-Waite reduction y = n ln2 + r, r in [-ln2/2, ln2/2], and
// expm1(y) = 2^n (r q(r)) + (2^n - 1), q the degree-6 Taylor polynomial of (exp(r) - 1) / r (relative error < 2e-8).
// No cancellation for small |w| (n = 0: E = r q(r) with r = 2|w| exactly), so the relative error is a few ulp for every
// w; 1 - 2 / (exp(2|w|) + 1) had an absolute error of 1e-7, 1e-2 relative at |w| = 1e-5, which the tanh sums of the
// backward (grad v) carried. |w| is clamped at 10, past 9.01 from where tanh rounds to 1 in fp32, so that it returns 1
// exactly there as torch.tanh does: the backward's 1 - z^2 is then 0, not the 1.2e-7 of tanh(9) = 1 - 2^-24, which a
// large u or e turned into a wrong gradient. Every select is a min/max pattern (no branch), and a NaN input flows
// through r into the result.
DSRB_INLINE float tanh_arith(float w) {
  float a = std::fabs(w);
  a = a > 10.0f ? 10.0f : a;              // keeps NaN
  const float y = 2.0f * a;
  const float yi = y < 20.0f ? y : 20.0f;  // NaN -> 20: the integer part must stay defined
  const int32_t n = static_cast<int32_t>(yi * 1.44269504088896341f + 0.5f);  // yi >= 0: truncation rounds
  const float nf = static_cast<float>(n);
  const float r = (y - nf * 0.693145751953125f) - nf * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;                                     // q(r)
  const float scale = bit_cast_float((n + 127) << 23);  // 2^n, n in [0, 29]
  const float em1 = scale * (r * p) + (scale - 1.0f);   // expm1(y) >= 0
  return std::copysign(em1 / (em1 + 2.0f), w);
}

DSRB_INLINE double tanh_arith(double w) { return std::tanh(w); }  // fp64 is for checking, not speed

// s[b, c, n] for rows r = b * N + n in [r0, r1).
template <typename T>
DSRB_INLINE void scores_impl(const T* u, const T* e, const T* v, T* s, int64_t N, int64_t C, int64_t I, int64_t r0,
                        int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / N, n = r % N;
    const T* ur = u + r * I;
    for (int64_t c = 0; c < C; ++c) {
      const T* ec = e + c * I;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < I; ++k) acc += v[k] * tanh_arith(ur[k] * ec[k]);
      s[(b * C + c) * N + n] = acc;
    }
  }
}

// With gs = dL/ds (B, C, N): grad_u rows [r0, r1) (owned), and this chunk's partial grad_e (C, I) and grad_v (I).
// grad_v sums over rows and classes: each row's classes are summed apart first, else one thread's sum ran over
// B N C terms in a row (3,600 at B 2, N 9, C 200: off the torch oracle by 4e-5 relative in float32).
template <typename T>
DSRB_INLINE void score_grads_impl(const T* u, const T* e, const T* v, const T* gs, T* gu, T* ge, T* gv, int64_t N,
                             int64_t C, int64_t I, int64_t r0, int64_t r1) {
  std::vector<T> row_gv(I);
  T* gvr = row_gv.data();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / N, n = r % N;
    const T* ur = u + r * I;
    T* gur = gu + r * I;
    std::fill(row_gv.begin(), row_gv.end(), T(0));
    for (int64_t c = 0; c < C; ++c) {
      const T g = gs[(b * C + c) * N + n];
      const T* ec = e + c * I;
      T* gec = ge + c * I;
#pragma omp simd
      for (int64_t k = 0; k < I; ++k) {
        const T z = tanh_arith(ur[k] * ec[k]);
        const T t = g * v[k] * (T(1) - z * z);  // d/d(u e) of g v tanh(u e)
        gvr[k] += g * z;
        gur[k] += t * ec[k];
        gec[k] += t * ur[k];
      }
    }
#pragma omp simd
    for (int64_t k = 0; k < I; ++k) gv[k] += gvr[k];
  }
}

DSRB_VECTOR_CLONES void scores(const float* u, const float* e, const float* v, float* s, int64_t N, int64_t C,
                               int64_t I, int64_t r0, int64_t r1) {
  scores_impl(u, e, v, s, N, C, I, r0, r1);
}
void scores(const double* u, const double* e, const double* v, double* s, int64_t N, int64_t C, int64_t I,
            int64_t r0, int64_t r1) {
  scores_impl(u, e, v, s, N, C, I, r0, r1);
}

DSRB_VECTOR_CLONES void score_grads(const float* u, const float* e, const float* v, const float* gs, float* gu,
                                    float* ge, float* gv, int64_t N, int64_t C, int64_t I, int64_t r0, int64_t r1) {
  score_grads_impl(u, e, v, gs, gu, ge, gv, N, C, I, r0, r1);
}
void score_grads(const double* u, const double* e, const double* v, const double* gs, double* gu, double* ge,
                 double* gv, int64_t N, int64_t C, int64_t I, int64_t r0, int64_t r1) {
  score_grads_impl(u, e, v, gs, gu, ge, gv, N, C, I, r0, r1);
}

// Rows (b, n) per parallel chunk of the score loops: a row costs C I tanh terms, each a few elementwise operations.
// At small sizes the loops run on one thread: a parallel region there cost more than its work, many times more when
// other processes hold the cores (a descheduled thread stalls the region's barrier).
int64_t score_row_grain(int64_t C, int64_t I) { return cpu::grain_for(4 * C * I); }

// g <- a * (g - sum_n a g) per (image, class) row: the softmax backward, in place.
template <typename T>
void softmax_backward_rows(const T* a, T* g, int64_t rows, int64_t N) {
  at::parallel_for(0, rows, cpu::grain_for(2 * N), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* ar = a + r * N;
      T* gr = g + r * N;
      T dot = 0;
      for (int64_t n = 0; n < N; ++n) dot += ar[n] * gr[n];
      for (int64_t n = 0; n < N; ++n) gr[n] = ar[n] * (gr[n] - dot);
    }
  });
}

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor prep(const at::Tensor& t, at::ScalarType type) { return t.to(type).contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> semantic_attention_cpu(const at::Tensor& x, const at::Tensor& u,
                                                          const at::Tensor& e, const at::Tensor& v) {
  checks::semantic_attention(x, u, e, v, c10::DeviceType::CPU);
  const auto type = compute_type(x);
  const at::Tensor xc = prep(x, type), uc = prep(u, type), ec = prep(e, type), vc = prep(v, type);
  const int64_t B = x.size(0), N = x.size(1), C = e.size(0), I = e.size(1);
  at::Tensor s = at::empty({B, C, N}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(type, "semantic_attention_cpu", [&] {
    const scalar_t *pu = uc.const_data_ptr<scalar_t>(), *pe = ec.const_data_ptr<scalar_t>(),
                   *pv = vc.const_data_ptr<scalar_t>();
    scalar_t* ps = s.data_ptr<scalar_t>();
    at::parallel_for(0, B * N, score_row_grain(C, I),
                     [&](int64_t r0, int64_t r1) { scores(pu, pe, pv, ps, N, C, I, r0, r1); });
  });
  at::Tensor a = at::_softmax(s, -1, false);
  at::Tensor S = at::bmm(a, xc);
  return {S.to(x.scalar_type()).contiguous(), a.to(x.scalar_type()).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> semantic_attention_cpu_backward(
    const at::Tensor& grad_S, const at::Tensor& grad_a, const at::Tensor& x, const at::Tensor& u, const at::Tensor& e,
    const at::Tensor& v, const at::Tensor& a) {
  checks::semantic_attention_backward(grad_S, grad_a, x, u, e, v, a, c10::DeviceType::CPU);
  const auto type = compute_type(x);
  const at::Tensor xc = prep(x, type), uc = prep(u, type), ec = prep(e, type), vc = prep(v, type);
  const at::Tensor ac = prep(a, type), gS = prep(grad_S, type), ga = prep(grad_a, type);
  const int64_t B = x.size(0), N = x.size(1), C = e.size(0), I = e.size(1);

  at::Tensor grad_x = at::bmm(ac.transpose(1, 2), gS);        // through S = a x
  at::Tensor gs = at::baddbmm(ga, gS, xc.transpose(1, 2));     // dL/da (B, C, N), then dL/ds in place below

  // Rows are split into P fixed chunks; each chunk owns its grad_u rows and accumulates its own grad_e, grad_v
  // partials, summed in chunk order below: no atomics, the same result on every run with the same thread count.
  // No more chunks than the work fills (score_row_grain rows each).
  const int64_t rows = B * N;
  const int64_t filled = (rows + score_row_grain(C, I) - 1) / score_row_grain(C, I);
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), filled));
  at::Tensor grad_u = at::zeros({B, N, I}, xc.options());
  at::Tensor ge_part = at::zeros({P, C, I}, xc.options());
  at::Tensor gv_part = at::zeros({P, I}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(type, "semantic_attention_cpu_backward", [&] {
    softmax_backward_rows(ac.const_data_ptr<scalar_t>(), gs.data_ptr<scalar_t>(), B * C, N);
    const scalar_t *pu = uc.const_data_ptr<scalar_t>(), *pe = ec.const_data_ptr<scalar_t>(),
                   *pv = vc.const_data_ptr<scalar_t>(), *pgs = gs.const_data_ptr<scalar_t>();
    scalar_t *pgu = grad_u.data_ptr<scalar_t>(), *pge = ge_part.data_ptr<scalar_t>(),
             *pgv = gv_part.data_ptr<scalar_t>();
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        score_grads(pu, pe, pv, pgs, pgu, pge + p * C * I, pgv + p * I, N, C, I, rows * p / P, rows * (p + 1) / P);
      }
    });
  });
  return {grad_x.to(x.scalar_type()).contiguous(), grad_u.to(u.scalar_type()).contiguous(),
          ge_part.sum(0).to(e.scalar_type()).contiguous(), gv_part.sum(0).to(v.scalar_type()).contiguous()};
}

}  // namespace dsrb
