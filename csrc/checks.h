// Argument checks shared by the CPU and CUDA entry points: every message names the argument, what was expected and
// what was given (architecture §10). Shape/dtype/device checks only; value checks that need data (index ranges,
// target values) are done by each kernel where it reads the value, so a bad value is an error, never a bad read.
// A wrong dtype raises TORCH_CHECK_TYPE (Python's TypeError), any other breach TORCH_CHECK_VALUE (ValueError): the
// errors of the Python twins (dsrb/_checks.py, dsrb/ops/_common.py), so one call fails alike in every backend.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>

namespace dsrb {
namespace checks {

// Numbers and sizes reach the messages as text made here (std::to_string, snprintf: no locale facet), never through
// std::ostream's number formatting compiled into this library. On the GPU machine, where the extension was built by
// that machine's own g++ (/opt/gcc), every cpu-kernel error whose message streamed a number killed the process with
// SIGSEGV, while those without one raised (GPU session of 2026-12-05, benchmarks/RESULTS.md); the cause there is not
// established.
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
std::string text(T v) {
  return std::to_string(v);
}

inline std::string text(double v) {  // as std::ostream writes a double by default ("%g"): 0.5, 3, nan
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

inline std::string text(c10::IntArrayRef sizes) {  // as c10 prints sizes: [2, 4, 5]
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

inline void device(const at::Tensor& t, const char* name, c10::DeviceType type) {
  TORCH_CHECK_VALUE(t.device().type() == type, "argument '", name, "': expected a ", c10::DeviceTypeName(type, true),
                    " tensor, got one on ", t.device());
}

// The dtypes every kernel computes in, as the Python twins' check_tensor(kind="float"): at::isFloatingType also takes
// float8 and float4, which semantic_attention_cpu computed in and returned, and the other kernels' dispatch refused
// with an error naming no argument.
inline void floating(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble, "argument '", name,
                   "': expected a floating-point tensor (float16, bfloat16, float32 or float64), got ", s);
}

inline void dtype(const at::Tensor& t, const char* name, at::ScalarType want, const char* why) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, "argument '", name, "': expected dtype ", want, " (", why, "), got ",
                   t.scalar_type());
}

// sizes: -1 matches any size.
inline void shape(const at::Tensor& t, const char* name, std::initializer_list<int64_t> sizes) {
  bool ok = t.dim() == static_cast<int64_t>(sizes.size());
  int64_t i = 0;
  for (int64_t want : sizes) {
    if (ok && want >= 0 && t.size(i) != want) ok = false;
    ++i;
  }
  if (!ok) {
    std::string expected = "(";
    i = 0;
    for (int64_t want : sizes) expected += (i++ ? ", " : "") + (want < 0 ? std::string("*") : std::to_string(want));
    expected += ")";
    TORCH_CHECK_VALUE(false, "argument '", name, "': expected shape ", expected, ", got ", text(t.sizes()));
  }
}

inline void same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "argument '", name, "': expected it on ", ref.device(),
                    " (the device of '", ref_name, "'), got ", t.device());
}

// ---- per op --------------------------------------------------------------------------------------------------------

inline void semantic_attention(const at::Tensor& x, const at::Tensor& u, const at::Tensor& e, const at::Tensor& v,
                               c10::DeviceType type) {
  device(x, "x", type);
  floating(x, "x");
  shape(x, "x", {-1, -1, -1});
  TORCH_CHECK_VALUE(x.size(1) > 0, "argument 'x': expected at least one spatial position, got N = 0");
  shape(u, "u", {x.size(0), x.size(1), -1});
  shape(e, "e", {-1, u.size(2)});
  shape(v, "v", {u.size(2)});
  for (auto [t, n] : {std::pair<const at::Tensor&, const char*>{u, "u"}, {e, "e"}, {v, "v"}}) {
    same_device(t, n, x, "x");
    dtype(t, n, x.scalar_type(), "the dtype of 'x'");
  }
}

inline void semantic_attention_backward(const at::Tensor& grad_S, const at::Tensor& grad_a, const at::Tensor& x,
                                        const at::Tensor& u, const at::Tensor& e, const at::Tensor& v,
                                        const at::Tensor& a, c10::DeviceType type) {
  semantic_attention(x, u, e, v, type);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), C = e.size(0);
  shape(grad_S, "grad_S", {B, C, D});
  shape(grad_a, "grad_a", {B, C, N});
  shape(a, "a", {B, C, N});
  for (auto [t, n] : {std::pair<const at::Tensor&, const char*>{grad_S, "grad_S"}, {grad_a, "grad_a"}, {a, "a"}}) {
    same_device(t, n, x, "x");
    dtype(t, n, x.scalar_type(), "the dtype of 'x'");
  }
}

// S (B, C, D) float on `type`; T (B, C) in S's dtype; the coefficient floating, of any floating dtype (rounded to
// S's for the arithmetic; its gradient comes in its own dtype).
inline void blend(const at::Tensor& S, const at::Tensor& T, const at::Tensor& coef, const char* coef_name,
                  c10::DeviceType type) {
  device(S, "S", type);
  floating(S, "S");
  shape(S, "S", {-1, -1, -1});
  shape(T, "T", {S.size(0), S.size(1)});
  same_device(T, "T", S, "S");
  dtype(T, "T", S.scalar_type(), "the dtype of 'S'");
  TORCH_CHECK_VALUE(coef.numel() == 1 && coef.dim() <= 1, "argument '", coef_name,
                    "': expected a one-element tensor of shape () or (1,), got ", text(coef.sizes()));
  // Any floating dtype, float8 included, as the public ops take it: it is rounded to S's dtype.
  TORCH_CHECK_TYPE(at::isFloatingType(coef.scalar_type()), "argument '", coef_name,
                   "': expected a floating-point tensor, got ", coef.scalar_type());
  same_device(coef, coef_name, S, "S");
}

inline void index(const at::Tensor& t, const char* name, const at::Tensor& S, std::initializer_list<int64_t> sizes,
                  at::ScalarType want = at::kLong) {
  shape(t, name, sizes);
  same_device(t, name, S, "S");
  dtype(t, name, want, want == at::kBool ? "a mask" : "an index");
}

inline void instance_blend(const at::Tensor& S, const at::Tensor& T, const at::Tensor& alpha,
                           const at::Tensor& partner, c10::DeviceType type) {
  blend(S, T, alpha, "alpha", type);
  index(partner, "partner", S, {S.size(0)});
}

inline void prototype_blend(const at::Tensor& S, const at::Tensor& T, const at::Tensor& beta, const at::Tensor& bank,
                            const at::Tensor& quadrant, const at::Tensor& shift, const at::Tensor& select,
                            c10::DeviceType type) {
  blend(S, T, beta, "beta", type);
  const int64_t B = S.size(0), C = S.size(1), D = S.size(2);
  shape(bank, "bank", {C, 4, D});
  same_device(bank, "bank", S, "S");
  dtype(bank, "bank", S.scalar_type(), "the dtype of 'S'");
  index(quadrant, "quadrant", S, {B, C});
  index(shift, "shift", S, {B, C});
  index(select, "select", S, {B, C}, at::kBool);
}

inline void quadrant_index(const at::Tensor& a, const at::Tensor& x_sum, int64_t height, int64_t width,
                           c10::DeviceType type) {
  device(a, "a", type);
  floating(a, "a");
  shape(a, "a", {-1, -1, -1});
  shape(x_sum, "x_sum", {a.size(0), a.size(2)});
  same_device(x_sum, "x_sum", a, "a");
  dtype(x_sum, "x_sum", a.scalar_type(), "the dtype of 'a'");
  // width <= N / height first: the product of two huge ints must not wrap around to N.
  TORCH_CHECK_VALUE(height >= 1 && width >= 1 && width <= a.size(2) / height && height * width == a.size(2),
                    "arguments 'height', 'width': expected height * width == N = ", text(a.size(2)), ", got ",
                    text(height), " x ", text(width));
}

// The functional form takes T in S's dtype; the in-place form (in_place) takes T of any real dtype and needs sums and
// counts contiguous (they are written in place).
inline void prototype_bank_update(const at::Tensor& sums, const at::Tensor& counts, const at::Tensor& S,
                                  const at::Tensor& T, const at::Tensor& quadrant, int64_t cap,
                                  c10::DeviceType type, bool in_place = false) {
  device(S, "S", type);
  floating(S, "S");
  shape(S, "S", {-1, -1, -1});
  const int64_t B = S.size(0), C = S.size(1), D = S.size(2);
  shape(sums, "sums", {C, 4, D});
  floating(sums, "sums");
  same_device(sums, "sums", S, "S");
  index(counts, "counts", S, {C, 4});
  if (in_place) {
    TORCH_CHECK_VALUE(sums.is_contiguous(), "argument 'sums': expected a contiguous tensor (it is updated in place)");
    TORCH_CHECK_VALUE(counts.is_contiguous(),
                      "argument 'counts': expected a contiguous tensor (it is updated in place)");
  }
  shape(T, "T", {B, C});
  same_device(T, "T", S, "S");
  if (in_place) {
    TORCH_CHECK_TYPE(!at::isComplexType(T.scalar_type()), "argument 'T': expected a real tensor, got ",
                     T.scalar_type());
  } else {
    dtype(T, "T", S.scalar_type(), "the dtype of 'S'");
  }
  index(quadrant, "quadrant", S, {B, C});
  TORCH_CHECK_VALUE(cap >= 0, "argument 'cap': expected a non-negative integer, got ", text(cap));
  if (in_place) {  // the kernel reads S, T and quadrant while it writes sums and counts
    const std::pair<const at::Tensor*, const char*> written[] = {{&sums, "sums"}, {&counts, "counts"}};
    const std::pair<const at::Tensor*, const char*> read[] = {{&S, "S"}, {&T, "T"}, {&quadrant, "quadrant"}};
    for (const auto& [w, w_name] : written) {
      for (const auto& [r, r_name] : read) {
        const auto status = at::get_overlap_status(*w, *r);
        const bool shared = status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial ||
                            (status == at::MemOverlapStatus::TooHard && w->is_alias_of(*r));
        TORCH_CHECK_VALUE(!shared, "argument '", w_name, "': it shares memory with '", r_name,
                          "', which the in-place update reads while it writes '", w_name, "'");
      }
    }
    const auto both = at::get_overlap_status(sums, counts);  // each would overwrite the other's values
    TORCH_CHECK_VALUE(both != at::MemOverlapStatus::Full && both != at::MemOverlapStatus::Partial &&
                    !(both == at::MemOverlapStatus::TooHard && sums.is_alias_of(counts)),
                      "argument 'counts': it shares memory with 'sums'; the bank update writes both");
  }
}

}  // namespace checks
}  // namespace dsrb
