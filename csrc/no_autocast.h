// Autocast stops at the extension's kernels: each computes in its inputs' dtype (half precision accumulating in fp32),
// the dtype the fake implementations declare, as the Python backends do (dsrb/ops/_registry.py, without_autocast).
// The ops have no Autocast kernel, so a call under torch.autocast reaches a kernel uncast, but the ATen calls inside
// it (at::bmm, softmax) would still be autocast: a backward run under autocast got bf16 products where fp32 was
// expected (an error), and a forward's products were rounded to bf16. Each kernel is registered as
// no_autocast<&kernel>, which runs it with the autocast dispatch keys excluded.
#pragma once

#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <utility>

namespace dsrb {

template <auto Kernel>
struct NoAutocast;

template <class R, class... Args, R (*Kernel)(Args...)>
struct NoAutocast<Kernel> {
  static R call(Args... args) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    return Kernel(std::forward<Args>(args)...);
  }
};

template <auto Kernel>
constexpr auto no_autocast = &NoAutocast<Kernel>::call;

}  // namespace dsrb
