// Host emulation of the CUDA built-ins and runtime calls that csrc/cuda/*.cu use, for the tests only
// (tests/cuda_emulator.py compiles those sources with the host compiler against this header, in place of the
// toolkit's cuda_runtime.h; cuda_fp16.h and cuda_bf16.h are the toolkit's own, which work in host code).
//
// Model: a launch runs its blocks one after another, in a pseudo-random order. The threads of a block are fibers
// (ucontext) on the calling thread, switched at barriers: each runs until it reaches __syncthreads, a warp shuffle
// or its end, and a barrier opens when every thread (every lane of the warp) that has not returned is waiting at it.
// Within each barrier round the threads run in a pseudo-random order, different from launch to launch, so a missing
// barrier (a thread reading shared memory that another writes in the same round), or blocks that write one place,
// show up as a wrong or non-deterministic result.
// __shared__ is a static local here: one copy per kernel, used by one block at a time, as on an SM. Each block finds
// it filled with 0xFF bytes (NaN in every floating type, -1 in every signed integer; tests/cuda_emulator.py adds the
// call after each declaration), as a GPU leaves it undefined: a read before any write shows up, instead of a static's
// zeros or the previous block's values.
// What the emulator reports as a launch error (cudaErrorLaunchFailure, message in cudaGetErrorString), where a GPU
// would be undefined or would hang:
//  * __syncthreads reached at two different source lines in one barrier round (divergent barrier);
//  * a warp shuffle with a mask other than all lanes, or while some lanes of the warp have returned or are missing
//    (block size not a multiple of 32), or reached at two different source lines;
//  * threads waiting at barriers that can never open (deadlock): the launch is abandoned, never a hang;
//  * more threads per block than the kernel's __launch_bounds__ (a GPU refuses the launch; here the kernel returns
//    at once);
//  * an __ldg from an address that is not a multiple of the loaded type's alignment (a GPU faults).
// Not emulated: dynamic shared memory, streams (launches are synchronous), more than one device and atomics. The PTX
// approximations (ex2.approx, rcp.approx) carry a modelled error of a few ulp (ulp_error below).
#pragma once

// cuda_runtime_api.h: declarations of the runtime calls (tests/cuda_emu/runtime.cpp defines those used) and, through
// crt/host_defines.h, __device__, __global__, __forceinline__ and __align__ for a host compiler.
#include <cuda_runtime_api.h>
#include <vector_types.h>  // dim3, uint3, float4, double2

#include <math.h>  // libstdc++'s: the float overloads (fma, exp, ...) in the global namespace, as CUDA has them

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#undef __shared__
#define __shared__ static
#define __syncthreads() ::dsrb_emu::syncthreads(__LINE__)
#define __shfl_xor_sync(...) ::dsrb_emu::shfl_xor(__LINE__, __VA_ARGS__)

// Set by the scheduler each time it resumes a thread.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

// Correctly rounded host arithmetic (the tests compile with -ffp-contract=off: no hidden FMA).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }

namespace dsrb_emu {

// ---- errors ---------------------------------------------------------------------------------------------------------

struct ErrorState {
  std::mutex m;
  cudaError_t last = cudaSuccess;  // what cudaGetLastError returns (and clears)
  cudaError_t text_of = cudaSuccess;
  std::string text;  // the message of the latest error set, of code text_of
};
inline ErrorState& errors() {
  static ErrorState s;
  return s;
}

inline void set_error(cudaError_t err, const std::string& text) {
  ErrorState& s = errors();
  std::lock_guard<std::mutex> lock(s.m);
  if (s.last == cudaSuccess) {  // the first error since the last cudaGetLastError
    s.last = s.text_of = err;
    s.text = text;
  }
}

// A kernel did something undefined on a GPU: the launch fails with this message.
template <typename... A>
void report(const char* fmt, A... args) {
  char buf[256];
  std::snprintf(buf, sizeof buf, fmt, args...);
  set_error(cudaErrorLaunchFailure, std::string("CUDA emulator: ") + buf);
}

}  // namespace dsrb_emu

// A GPU faults on a load from an address that is not a multiple of the type's alignment (16 bytes for a float4):
// the host would read it anyway.
template <typename T>
inline T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0)
    ::dsrb_emu::report("__ldg of a %zu-byte type from the misaligned address %p (a GPU faults: misaligned address)",
                       sizeof(T), static_cast<const void*>(p));
  return *p;
}
static_assert(alignof(float4) == 16 && alignof(double2) == 16, "the toolkit's vector types keep their alignment");

namespace dsrb_emu {

// ---- threads of a block ---------------------------------------------------------------------------------------------

enum class Wait { None, Sync, Warp, Done };

struct Fiber {
  ucontext_t uc;
  Wait wait = Wait::None;
  int line = 0;
};

// Runs the blocks of one launch. The scheduler (run_block) resumes the runnable fibers one after another; a fiber
// gives control back when it waits at a barrier (wait_at) or returns.
class Runner {
 public:
  Runner(std::function<void()> body, dim3 grid, dim3 block)
      : body_(std::move(body)), grid_(grid), block_(block), n_(block.x * block.y * block.z), fibers_(n_),
        stacks_(new char[static_cast<size_t>(n_) * kStack]) {}

  // The runner of the launch in progress (launches are serialised).
  static Runner*& active() {
    static Runner* r = nullptr;
    return r;
  }

  // The blocks in a pseudo-random order too: two blocks that write one place, or one that reads what another
  // writes, give results that change from launch to launch.
  void run(uint64_t seed) {
    active() = this;
    std::vector<uint3> blocks;
    for (unsigned z = 0; z < grid_.z; ++z)
      for (unsigned y = 0; y < grid_.y; ++y)
        for (unsigned x = 0; x < grid_.x; ++x) blocks.push_back(uint3{x, y, z});
    uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
    shuffle(blocks, state);
    for (size_t i = 0; i < blocks.size() && ok_; ++i) run_block(blocks[i], state + i);
    active() = nullptr;
  }

  // Called by the current fiber: wait at the block barrier (Sync) or its warp's barrier (Warp).
  void wait_at(Wait kind, int line) {
    Fiber& f = fibers_[cur_];
    f.wait = kind;
    f.line = line;
    swapcontext(&f.uc, &sched_);
  }

  // Lanes of the current thread's warp that have not returned.
  int warp_present() const {
    const int w = cur_ / 32;
    int n = 0;
    for (int t = 32 * w; t < n_ && t < 32 * w + 32; ++t) n += fibers_[t].wait != Wait::Done;
    return n;
  }

  // Counts the blocks run (by every launch): which block a __shared__ array was last poisoned for.
  static uint64_t& block_serial() {
    static uint64_t n = 0;
    return n;
  }

  int lane() const { return cur_ % 32; }
  unsigned char* slot(int lane) { return slots_[cur_ / 32 * 32 + lane].data(); }

 private:
  static constexpr size_t kStack = 256 * 1024;

  static void entry() {
    Runner* r = active();
    r->body_();
    r->fibers_[r->cur_].wait = Wait::Done;
    swapcontext(&r->fibers_[r->cur_].uc, &r->sched_);
  }

  void run_block(uint3 bid, uint64_t seed) {
    ++block_serial();
    slots_.assign(static_cast<size_t>((n_ + 31) / 32) * 32, {});
    for (int t = 0; t < n_; ++t) {
      Fiber& f = fibers_[t];
      f.wait = Wait::None;
      getcontext(&f.uc);
      f.uc.uc_stack.ss_sp = stacks_.get() + static_cast<size_t>(t) * kStack;
      f.uc.uc_stack.ss_size = kStack;
      f.uc.uc_link = nullptr;
      makecontext(&f.uc, &Runner::entry, 0);
    }
    std::vector<int> order(n_);
    for (int t = 0; t < n_; ++t) order[t] = t;
    uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
    for (;;) {
      shuffle(order, state);  // a new order each round
      for (int t : order) {
        if (fibers_[t].wait != Wait::None) continue;
        cur_ = t;
        threadIdx = uint3{t % block_.x, (t / block_.x) % block_.y, t / (block_.x * block_.y)};
        blockIdx = bid;
        blockDim = block_;
        gridDim = grid_;
        swapcontext(&sched_, &fibers_[t].uc);
      }
      if (!open_barriers()) return;
    }
  }

  // Fisher-Yates with a xorshift generator (state must not be 0).
  template <typename V>
  static void shuffle(std::vector<V>& v, uint64_t& state) {
    for (size_t i = v.size(); i > 1; --i) {
      state ^= state << 13, state ^= state >> 7, state ^= state << 17;
      std::swap(v[i - 1], v[state % i]);
    }
  }

  // Opens the barriers that every present thread has reached; false when the block is done or deadlocked.
  bool open_barriers() {
    int present = 0, at_sync = 0;
    for (const Fiber& f : fibers_) present += f.wait != Wait::Done, at_sync += f.wait == Wait::Sync;
    if (present == 0) return false;
    bool opened = false;
    if (at_sync == present) {
      open(0, n_, Wait::Sync, "__syncthreads");
      return true;
    }
    for (int w = 0; w * 32 < n_; ++w) {
      const int t1 = std::min(n_, 32 * w + 32);
      int live = 0, waiting = 0;
      for (int t = 32 * w; t < t1; ++t) {
        live += fibers_[t].wait != Wait::Done;
        waiting += fibers_[t].wait == Wait::Warp;
      }
      if (waiting > 0 && waiting == live) {
        open(32 * w, t1, Wait::Warp, "__shfl_xor_sync");
        opened = true;
      }
    }
    if (!opened) {
      int sync_line = 0, warp_line = 0;
      for (const Fiber& f : fibers_) {
        if (f.wait == Wait::Sync) sync_line = f.line;
        if (f.wait == Wait::Warp) warp_line = f.line;
      }
      report("deadlock: threads wait at __syncthreads (line %d) and at a warp shuffle (line %d) at once", sync_line,
             warp_line);
      ok_ = false;  // the fibers are abandoned
    }
    return opened;
  }

  void open(int t0, int t1, Wait kind, const char* what) {
    int line = -1;
    for (int t = t0; t < t1; ++t) {
      Fiber& f = fibers_[t];
      if (f.wait != kind) continue;
      if (line >= 0 && f.line != line)
        report("divergent %s: reached at lines %d and %d in one round", what, line, f.line);
      line = f.line;
      f.wait = Wait::None;
    }
  }

  std::function<void()> body_;
  const dim3 grid_, block_;
  const int n_;
  std::vector<Fiber> fibers_;
  std::unique_ptr<char[]> stacks_;
  std::vector<std::array<unsigned char, 8>> slots_;
  ucontext_t sched_;
  int cur_ = 0;
  bool ok_ = true;  // false after a deadlock: the remaining blocks are not run
};

// Called after each __shared__ declaration by every thread that reaches it: the first thread of a block to get there
// (before any thread of the block can have written the array) fills it with 0xFF bytes.
inline void block_shared(void* p, size_t bytes) {
  static std::vector<std::pair<void*, uint64_t>> last;  // (array, block serial it was poisoned for)
  const uint64_t serial = Runner::block_serial();
  auto it = std::find_if(last.begin(), last.end(), [p](const auto& e) { return e.first == p; });
  if (it == last.end()) it = last.insert(last.end(), {p, 0});
  if (it->second != serial) {
    std::memset(p, 0xFF, bytes);
    it->second = serial;
  }
}

// The check tests/cuda_emulator.py puts at the top of each kernel with __launch_bounds__(max_threads[, min_blocks]):
// a GPU refuses a launch of more threads per block than the bound the kernel was compiled for.
inline bool within_launch_bounds(int line, unsigned max_threads, int = 0) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  if (threads <= max_threads) return true;
  report("launch of %u threads per block, over the __launch_bounds__(%u) of the kernel at line %d (a GPU refuses it: "
         "too many resources requested for launch)", threads, max_threads, line);
  return false;
}

inline void syncthreads(int line) { Runner::active()->wait_at(Wait::Sync, line); }

template <typename T>
inline T shfl_xor(int line, unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a value of at most 8 bytes");
  Runner& r = *Runner::active();
  if (mask != 0xffffffffu || width != 32)
    report("__shfl_xor_sync at line %d: only full-warp shuffles are emulated", line);
  std::memcpy(r.slot(r.lane()), &value, sizeof(T));
  r.wait_at(Wait::Warp, line);
  const int present = r.warp_present();
  if (present != 32) report("__shfl_xor_sync at line %d with %d of 32 lanes present", line, present);
  T out;
  std::memcpy(&out, r.slot((r.lane() ^ lane_mask) & 31), sizeof(T));
  r.wait_at(Wait::Warp, line);  // nobody overwrites a slot before every lane has read
  return out;
}

// ---- PTX ------------------------------------------------------------------------------------------------------------

inline float ftz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }

// The approximations' own error, modelled: the exact result moved by up to max_ulp units in the last place, by an
// amount that is a fixed function of the input's bits (as the hardware's error is). The bounds used, 2 ulp for
// ex2.approx and 1 for rcp.approx, are this emulator's assumption, not a measurement of the GPU.
inline float ulp_error(float y, float x, int max_ulp) {
  if (!std::isfinite(y) || y == 0.0f) return y;
  uint32_t h, b;
  std::memcpy(&h, &x, 4);
  h *= 0x9E3779B1u;
  h ^= h >> 15;
  std::memcpy(&b, &y, 4);
  b += static_cast<uint32_t>(static_cast<int>(h % (2 * max_ulp + 1)) - max_ulp);
  float out;
  std::memcpy(&out, &b, 4);
  return std::isfinite(out) ? out : y;
}
inline float ptx_ex2_approx_ftz_f32(float x) { return ftz(ulp_error(std::exp2(ftz(x)), x, 2)); }
inline float ptx_rcp_approx_ftz_f32(float x) { return ftz(ulp_error(1.0f / ftz(x), x, 1)); }

// ---- launches -------------------------------------------------------------------------------------------------------

struct Config {
  dim3 grid, block;
  size_t smem;
};
inline Config config(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) { return {grid, block, smem}; }

// One launch at a time, from any host thread: the built-in variables and __shared__ storage exist once.
inline std::mutex launch_mutex;
inline uint64_t launch_count = 0;  // seeds each launch's thread order

// kernel<<<grid, block, smem, stream>>>(args...), synchronously, on the calling thread.
template <typename... P, typename... Args>
void launch(const Config& cfg, void (*kernel)(P...), Args&&... args) {
  static_assert(sizeof...(P) == sizeof...(Args), "kernel argument count");
  const std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(args)...);
  const dim3 g = cfg.grid, b = cfg.block;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (threads == 0 || threads > 1024 || b.z > 64 || g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 ||
      g.z > 65535) {
    set_error(cudaErrorInvalidConfiguration, "invalid configuration argument");
    return;
  }
  if (cfg.smem != 0) {
    set_error(cudaErrorInvalidValue, "CUDA emulator: dynamic shared memory is not emulated");
    return;
  }
  std::lock_guard<std::mutex> lock(launch_mutex);
  Runner([&] { std::apply(kernel, params); }, g, b).run(++launch_count);
}

}  // namespace dsrb_emu
