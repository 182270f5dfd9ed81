// CUDA kernels of semantic_attention (architecture §3): category-wise attention of semantic decoupling.
//
//   s[b, c, n] = sum_k v[k] tanh(u[b, n, k] e[c, k]);  a = softmax_n(s);  S = a @ x (left to at::bmm in the glue)
//
// Rows. The score is a function of the pair (row r = b*N + n, class c): over the flattened rows the problem is a
// (B*N) x C "matrix product" whose inner operation is v[k] tanh(u e). Tiling the flattened rows (not n within each
// image) wastes nothing at odd N (49 = 7 x 7).
//
// Forward kernels
//  * sa_scores_kernel: one block (128 threads) per tile of 8 rows x 16 classes and per k-split; the k range is
//    staged through shared memory in chunks of KC (64 floats / 32 doubles) of u (8 x KC), e (16 x KC) and v (KC)
//    (the products u e are scaled by 2 log2(e) for the exp2-based tanh); each thread owns one (row, class) output
//    and walks the chunk with 128-bit shared loads (conflict-free: row stride 272 bytes). Small problems split k
//    over a few blocks (grid.y) so that the grid fills the GPU; the partial sums go to a (ksplit, B*C, N) buffer.
//  * sa_softmax_kernel: one warp per (b, c): sums the k-split partials in order, NaN-propagating max, sum of
//    exponentials, a = exp(s - max) / sum in the acc type (for the glue's bmm) and in the input dtype.
// Backward kernels (the glue has computed ga_total = grad_a + grad_S @ x^T and grad_x = a^T @ grad_S)
//  * sa_softmax_bwd_kernel: one warp per (b, c): gs = a * (ga_total - sum_n a ga_total), stored transposed as
//    (C, rows_pad) so that the fused kernel reads the 8 values of a row tile with two 128-bit loads.
//  * sa_bwd_tanh_kernel: the fused tanh-recompute backward, ONE pass over the (row, class, k) triples:
//    block = (row group, k tile of 32); lane = k, the 8 warps split the classes (c = warp, warp + 8, ...); a row
//    tile of 8 rows of u lives in registers. Per class: z = tanh(u e) for the 8 rows, then
//        grad_v partial += g z;  t = g (1 - z^2);  grad_e partial[c, k] += t u;  grad_u partial[r, k] += t e.
//    grad_u of the row tile is summed over the 8 warps through shared memory (fixed order) and written with the
//    factor v[k]; grad_e is accumulated per row group in a (groups, C, I) buffer (each entry owned by one thread),
//    grad_v per group in a (groups, I) buffer.
//  * sa_bwd_finalize_kernel: grad_e = v * sum over groups, grad_v = sum over groups (fixed order).
// No (B, N, C, I) or (B, N, C, D) tensor is ever formed; no atomics anywhere.
//
// tanh: fp32 (and fp16 / bf16, computed in fp32) uses tanh(w) = sign(w) (1 - 2 / (2^(2 log2(e) |w|) + 1)) with the
// MUFU ex2 / rcp approximations (absolute error a few 1e-7; NaN propagates, +-inf saturates to +-1); fp64 uses
// tanh().
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <atomic>
#include <cmath>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace dsrb {
namespace cuda {

const char* cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

namespace {

// ---- tanh ------------------------------------------------------------------------------------------------------------

// The argument of tanh_scaled is 2 log2(e) w, the product u e scaled: an operand pre-scaled instead overflowed past
// 1.2e38 (inf, then tanh(0 * inf) and 0 * inf NaN where the oracle is finite); this is one more multiply a term.
template <typename A>
struct TanhScale;
template <>
struct TanhScale<float> {
  static constexpr float scale = 2.8853900817779268f;  // 2 / ln(2)
};
template <>
struct TanhScale<double> {
  static constexpr double scale = 1.0;
};

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// tanh(w) for w2 = 2 log2(e) w: 1 - 2 / (2^|w2| + 1) with the sign of w2. 2^|w2| >= 1, so no denormal is involved;
// overflow to +inf gives rcp = 0 and +-1; a NaN argument stays NaN through every step.
__device__ __forceinline__ float tanh_scaled(float w2) {
  const float r = rcp_approx(ex2_approx(fabsf(w2)) + 1.0f);
  return copysignf(fmaf(-2.0f, r, 1.0f), w2);
}

__device__ __forceinline__ double tanh_scaled(double w) { return tanh(w); }

// ---- small helpers ---------------------------------------------------------------------------------------------------

// Four consecutive acc values from 16-byte aligned shared memory.
__device__ __forceinline__ void lds4(const float* p, float (&o)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  o[0] = t.x;
  o[1] = t.y;
  o[2] = t.z;
  o[3] = t.w;
}
__device__ __forceinline__ void lds4(const double* p, double (&o)[4]) {
  const double2 t0 = *reinterpret_cast<const double2*>(p);
  const double2 t1 = *reinterpret_cast<const double2*>(p + 2);
  o[0] = t0.x;
  o[1] = t0.y;
  o[2] = t1.x;
  o[3] = t1.y;
}

// Eight consecutive acc values from 32-byte aligned global memory (read-only during the kernel).
__device__ __forceinline__ void ldg8(const float* p, float (&o)[8]) {
  const float4 t0 = __ldg(reinterpret_cast<const float4*>(p));
  const float4 t1 = __ldg(reinterpret_cast<const float4*>(p + 4));
  o[0] = t0.x;
  o[1] = t0.y;
  o[2] = t0.z;
  o[3] = t0.w;
  o[4] = t1.x;
  o[5] = t1.y;
  o[6] = t1.z;
  o[7] = t1.w;
}
__device__ __forceinline__ void ldg8(const double* p, double (&o)[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const double2 t = __ldg(reinterpret_cast<const double2*>(p + 2 * i));
    o[2 * i] = t.x;
    o[2 * i + 1] = t.y;
  }
}

// NaN-propagating max (commutative, so a butterfly reduction gives the same value in every lane).
template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

template <typename A>
__device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, m));
  return x;
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// ---- forward: scores -------------------------------------------------------------------------------------------------

constexpr int kFwdRows = 8;                          // flattened rows (b*N + n) per tile
constexpr int kFwdClasses = 16;                      // classes per tile
constexpr int kFwdThreads = kFwdRows * kFwdClasses;  // one output per thread
constexpr int kMaxKSplit = 16;

template <typename A>
struct FwdChunk {
  static constexpr int kc = 64;  // k values staged per chunk
};
template <>
struct FwdChunk<double> {
  static constexpr int kc = 32;
};

template <typename T>
__global__ void __launch_bounds__(kFwdThreads)
    sa_scores_kernel(const T* __restrict__ u, const T* __restrict__ e, const T* __restrict__ v,
                     Acc<T>* __restrict__ part, int64_t B, int64_t N, int64_t C, int64_t I, int64_t kper,
                     int64_t c_tiles) {
  using A = Acc<T>;
  constexpr int KC = FwdChunk<A>::kc;
  constexpr int LD = KC + 16 / static_cast<int>(sizeof(A));  // 272-byte rows: 16-byte aligned, no bank conflicts
  __shared__ __align__(16) A u_s[kFwdRows][LD];
  __shared__ __align__(16) A e_s[kFwdClasses][LD];
  __shared__ __align__(16) A v_s[KC];

  const int64_t rows = B * N;
  const int64_t tile = blockIdx.x;
  const int64_t rt = tile / c_tiles;
  const int64_t r0 = rt * kFwdRows;
  const int64_t c0 = (tile - rt * c_tiles) * kFwdClasses;
  const int tid = threadIdx.x;
  const int rl = tid % kFwdRows;
  const int cl = tid / kFwdRows;
  const int64_t kb0 = static_cast<int64_t>(blockIdx.y) * kper;
  const int64_t kb1 = kb0 + kper < I ? kb0 + kper : I;

  A acc = A(0);
  for (int64_t k0 = kb0; k0 < kb1; k0 += KC) {
    __syncthreads();  // the previous chunk has been consumed (block-uniform loop)
    for (int i = tid; i < kFwdRows * KC; i += kFwdThreads) {
      const int rr = i / KC, kk = i % KC;
      const int64_t row = r0 + rr, k = k0 + kk;
      u_s[rr][kk] = (row < rows && k < kb1) ? to_acc(u[row * I + k]) : A(0);
    }
    for (int i = tid; i < kFwdClasses * KC; i += kFwdThreads) {
      const int cc = i / KC, kk = i % KC;
      const int64_t c = c0 + cc, k = k0 + kk;
      e_s[cc][kk] = (c < C && k < kb1) ? to_acc(e[c * I + k]) : A(0);
    }
    for (int i = tid; i < KC; i += kFwdThreads) {
      const int64_t k = k0 + i;
      v_s[i] = k < kb1 ? to_acc(v[k]) : A(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < KC; kk += 4) {
      A uu[4], ee[4], vv[4];
      lds4(&u_s[rl][kk], uu);
      lds4(&e_s[cl][kk], ee);
      lds4(&v_s[kk], vv);
#pragma unroll
      for (int j = 0; j < 4; ++j) acc = fma(vv[j], tanh_scaled(uu[j] * ee[j] * TanhScale<A>::scale), acc);
    }
  }

  const int64_t row = r0 + rl, c = c0 + cl;
  if (row < rows && c < C) {
    const int64_t b = row / N, n = row - b * N;
    part[((static_cast<int64_t>(blockIdx.y) * B + b) * C + c) * N + n] = acc;
  }
}

// ---- forward: softmax --------------------------------------------------------------------------------------------

constexpr int kRowWarps = 8;  // rows (one per warp) per block of the row-wise kernels

template <typename A>
__device__ __forceinline__ A split_score(const A* __restrict__ p, int64_t n, int64_t ksplit, int64_t stride) {
  A s = p[n];
  for (int64_t j = 1; j < ksplit; ++j) s += p[j * stride + n];
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32)
    sa_softmax_kernel(const Acc<T>* __restrict__ part, int64_t ksplit, Acc<T>* __restrict__ a_acc,
                      T* __restrict__ a_out, int64_t R, int64_t N) {
  using A = Acc<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= R) return;  // whole warps only; no block-level synchronisation below
  const int64_t stride = R * N;
  const A* p = part + row * N;

  A m = A(-INFINITY);
  for (int64_t n = lane; n < N; n += 32) m = nan_max(m, split_score(p, n, ksplit, stride));
  m = warp_max(m);
  A sum = A(0);
  for (int64_t n = lane; n < N; n += 32) sum += exp_acc(split_score(p, n, ksplit, stride) - m);
  sum = warp_sum(sum);
  for (int64_t n = lane; n < N; n += 32) {
    const A a = exp_acc(split_score(p, n, ksplit, stride) - m) / sum;
    a_acc[row * N + n] = a;
    if (a_out != nullptr) a_out[row * N + n] = from_acc<T>(a);
  }
}

// ---- backward: softmax backward ------------------------------------------------------------------------------------

template <typename A>
__global__ void __launch_bounds__(kRowWarps * 32)
    sa_softmax_bwd_kernel(const A* __restrict__ a, const A* __restrict__ ga, A* __restrict__ gs, int64_t B,
                          int64_t C, int64_t N, int64_t rows_pad) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= B * C) return;
  const int64_t b = row / C, c = row - b * C;
  const A* ar = a + row * N;
  const A* gr = ga + row * N;
  A dot = A(0);
  for (int64_t n = lane; n < N; n += 32) dot = fma(ar[n], gr[n], dot);
  dot = warp_sum(dot);
  A* out = gs + c * rows_pad;
  for (int64_t n = lane; n < N; n += 32) out[b * N + n] = ar[n] * (gr[n] - dot);
  if (b == B - 1) {
    for (int64_t j = B * N + lane; j < rows_pad; j += 32) out[j] = A(0);  // padding rows of the last tile
  }
}

// ---- backward: fused tanh recompute -------------------------------------------------------------------------------

constexpr int kBwdRows = 8;    // rows per row tile (registers)
constexpr int kBwdWarps = 8;   // warps per block; they split the classes
constexpr int kBwdThreads = kBwdWarps * 32;
constexpr int kBwdK = 32;      // k values per block (one per lane)
static_assert(kBwdRows * kBwdK == kBwdThreads, "the grad_u epilogue maps one element per thread");

template <typename T>
__global__ void __launch_bounds__(kBwdThreads)
    sa_bwd_tanh_kernel(const T* __restrict__ u, const T* __restrict__ e, const T* __restrict__ v,
                       const Acc<T>* __restrict__ gs, T* __restrict__ grad_u, Acc<T>* pe, Acc<T>* __restrict__ pv,
                       int64_t rows, int64_t C, int64_t I, int64_t rows_pad, int64_t row_tiles, int64_t groups,
                       int64_t k_tiles) {
  using A = Acc<T>;
  __shared__ A red[kBwdWarps][kBwdRows][kBwdK];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t g = blockIdx.x / k_tiles;
  const int64_t kt = blockIdx.x - g * k_tiles;
  const int64_t k = kt * kBwdK + lane;
  const bool kval = k < I;
  // Row tiles [t_begin, t_end) of this group; groups <= row_tiles, so every group has at least one tile.
  const int64_t t_begin = g * row_tiles / groups;
  const int64_t t_end = (g + 1) * row_tiles / groups;

  A acc_v = A(0);
  for (int64_t t = t_begin; t < t_end; ++t) {  // block-uniform loop
    const int64_t r0 = t * kBwdRows;
    A us[kBwdRows], au[kBwdRows];
#pragma unroll
    for (int r = 0; r < kBwdRows; ++r) {
      const int64_t row = r0 + r;
      us[r] = (kval && row < rows) ? to_acc(u[row * I + k]) : A(0);
      au[r] = A(0);
    }
    const bool first = t == t_begin;
    for (int64_t c = warp; c < C; c += kBwdWarps) {
      const A ec = kval ? to_acc(e[c * I + k]) : A(0);
      A* pe_ptr = pe + (g * C + c) * I + k;
      A prev = A(0);
      if (!first && kval) prev = *pe_ptr;  // this thread's own earlier partial: no cross-thread dependency
      A gg[kBwdRows];
      ldg8(gs + c * rows_pad + r0, gg);  // zero in padding rows
      A ae = A(0);
#pragma unroll
      for (int r = 0; r < kBwdRows; ++r) {
        // Padding rows (B N not a multiple of kBwdRows) add nothing: tanh(0 * inf) would be NaN, and 0 * NaN too.
        const A z = r0 + r < rows ? tanh_scaled(us[r] * ec * TanhScale<A>::scale) : A(0);
        const A gz = gg[r] * z;
        acc_v += gz;
        const A tt = gg[r] * fma(-z, z, A(1));  // g (1 - z^2); g - gz z would be inf - inf = NaN for an infinite g
        ae = fma(tt, us[r], ae);
        au[r] = fma(tt, ec, au[r]);
      }
      if (kval) *pe_ptr = prev + ae;
    }
#pragma unroll
    for (int r = 0; r < kBwdRows; ++r) red[warp][r][lane] = au[r];
    __syncthreads();
    {
      const int r = threadIdx.x / kBwdK, l = threadIdx.x % kBwdK;
      const int64_t row = r0 + r, kk = kt * kBwdK + l;
      if (row < rows && kk < I) {
        A s = red[0][r][l];
#pragma unroll
        for (int w = 1; w < kBwdWarps; ++w) s += red[w][r][l];
        grad_u[row * I + kk] = from_acc<T>(s * to_acc(v[kk]));
      }
    }
    __syncthreads();  // red is rewritten by the next tile
  }
  red[warp][0][lane] = acc_v;
  __syncthreads();
  if (warp == 0 && kval) {
    A s = red[0][0][lane];
#pragma unroll
    for (int w = 1; w < kBwdWarps; ++w) s += red[w][0][lane];
    pv[g * I + k] = s;
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    sa_bwd_finalize_kernel(const Acc<T>* __restrict__ pe, const Acc<T>* __restrict__ pv, const T* __restrict__ v,
                           T* __restrict__ grad_e, T* __restrict__ grad_v, int64_t groups, int64_t C, int64_t I) {
  using A = Acc<T>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t CI = C * I;
  if (idx < CI) {
    const int64_t k = idx % I;
    A s = pe[idx];
    for (int64_t g = 1; g < groups; ++g) s += pe[g * CI + idx];
    grad_e[idx] = from_acc<T>(s * to_acc(v[k]));
  } else if (idx < CI + I) {
    const int64_t k = idx - CI;
    A s = pv[k];
    for (int64_t g = 1; g < groups; ++g) s += pv[g * I + k];
    grad_v[k] = from_acc<T>(s);
  }
}

// ---- host helpers ------------------------------------------------------------------------------------------------

// Streaming multiprocessors of the current device (cached per device).
int current_sm_count(int* out) {
  static std::atomic<int> cache[64];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (dev >= 0 && dev < 64) {
    const int cached = cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) {
      *out = cached;
      return 0;
    }
  }
  int sms = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (sms < 1) sms = 1;
  if (dev >= 0 && dev < 64) cache[dev].store(sms, std::memory_order_relaxed);
  *out = sms;
  return 0;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t chunk_of(DType dt) { return dt == DType::Float64 ? FwdChunk<double>::kc : FwdChunk<float>::kc; }

// k range per split (a multiple of the chunk) for a given split count request.
int64_t k_per_split(int64_t I, int64_t ksplit, int64_t kc) {
  if (I <= 0) return kc;
  return cdiv(cdiv(I, ksplit), kc) * kc;
}

}  // namespace

// ---- launchers -----------------------------------------------------------------------------------------------------

int sa_forward_plan(DType dt, int64_t B, int64_t N, int64_t C, int64_t I, int64_t* ksplit) {
  *ksplit = 1;
  if (B <= 0 || N <= 0 || C <= 0 || I <= 0) return 0;
  int sms = 0;
  if (int err = current_sm_count(&sms)) return err;
  const int64_t kc = chunk_of(dt);
  const int64_t tiles = cdiv(B * N, kFwdRows) * cdiv(C, kFwdClasses);
  const int64_t target = 8 * static_cast<int64_t>(sms);  // ~8 blocks of 4 warps per SM
  int64_t want = tiles >= target ? 1 : cdiv(target, tiles);
  const int64_t max_split = cdiv(I, kc) < kMaxKSplit ? cdiv(I, kc) : kMaxKSplit;
  if (want > max_split) want = max_split;
  if (want < 1) want = 1;
  *ksplit = cdiv(I, k_per_split(I, want, kc));  // no empty split
  return 0;
}

int sa_forward(DType dt, const void* u, const void* e, const void* v, void* partial, void* a_acc, void* a_out,
               int64_t B, int64_t N, int64_t C, int64_t I, int64_t ksplit, void* stream) {
  if (B <= 0 || N <= 0 || C <= 0) return 0;
  if (ksplit < 1 || ksplit > 65535) return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(dt, [&](auto tag) -> int {
    using T = decltype(tag);
    using A = Acc<T>;
    const int64_t kc = FwdChunk<A>::kc;
    const int64_t kper = k_per_split(I, ksplit, kc);
    if (I > 0 && cdiv(I, kper) != ksplit) return static_cast<int>(cudaErrorInvalidValue);  // not from the plan
    const int64_t c_tiles = cdiv(C, kFwdClasses);
    const int64_t tiles = cdiv(B * N, kFwdRows) * c_tiles;
    if (tiles > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
    sa_scores_kernel<T><<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(ksplit)), kFwdThreads, 0, st>>>(
        static_cast<const T*>(u), static_cast<const T*>(e), static_cast<const T*>(v), static_cast<A*>(partial), B,
        N, C, I, kper, c_tiles);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
    const int64_t R = B * C;
    const int64_t blocks = cdiv(R, kRowWarps);
    if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
    sa_softmax_kernel<T><<<static_cast<unsigned>(blocks), kRowWarps * 32, 0, st>>>(
        static_cast<const A*>(partial), ksplit, static_cast<A*>(a_acc), static_cast<T*>(a_out), R, N);
    return static_cast<int>(cudaGetLastError());
  });
}

int sa_backward_plan(DType dt, int64_t B, int64_t N, int64_t C, int64_t D, int64_t I, int64_t* rows_pad,
                     int64_t* groups) {
  (void)dt;
  const int64_t rows = B > 0 && N > 0 ? B * N : 0;
  const int64_t row_tiles = cdiv(rows, kBwdRows);
  *rows_pad = row_tiles * kBwdRows;
  *groups = 1;
  if (row_tiles <= 0 || C <= 0 || I <= 0) return 0;
  int sms = 0;
  if (int err = current_sm_count(&sms)) return err;
  const int64_t k_tiles = cdiv(I, kBwdK);
  const int64_t g0 = cdiv(4 * static_cast<int64_t>(sms), k_tiles);  // ~4 blocks of 8 warps per SM
  // Few tiles: one tile per group balances best. Many: at least two tiles per group keeps the partials small.
  int64_t g = row_tiles <= 2 * g0 ? row_tiles : g0;
  // The (groups, C, I) partial of grad_e stays within 4 * B * C * (N + D) elements (the O(B C (N + D)) budget).
  int64_t cap = 4 * B * (N + (D > 0 ? D : 0)) / I;
  if (cap < 1) cap = 1;
  if (g > cap) g = cap;
  if (g > row_tiles) g = row_tiles;
  if (g < 1) g = 1;
  *groups = g;
  return 0;
}

int sa_backward(DType dt, const void* u, const void* e, const void* v, const void* a_acc, const void* ga_total,
                void* gs, void* pe, void* pv, void* grad_u, void* grad_e, void* grad_v, int64_t B, int64_t N,
                int64_t C, int64_t I, int64_t rows_pad, int64_t groups, void* stream) {
  if (B <= 0 || N <= 0 || C <= 0 || I <= 0) return 0;
  const int64_t rows = B * N;
  const int64_t row_tiles = cdiv(rows, kBwdRows);
  if (rows_pad != row_tiles * kBwdRows || groups < 1 || groups > row_tiles)
    return static_cast<int>(cudaErrorInvalidValue);  // not from the plan
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(dt, [&](auto tag) -> int {
    using T = decltype(tag);
    using A = Acc<T>;
    const int64_t R = B * C;
    const int64_t sblocks = cdiv(R, kRowWarps);
    const int64_t k_tiles = cdiv(I, kBwdK);
    const int64_t fblocks = cdiv(C * I + I, 256);
    if (sblocks > kMaxGridX || groups * k_tiles > kMaxGridX || fblocks > kMaxGridX)
      return static_cast<int>(cudaErrorInvalidConfiguration);
    sa_softmax_bwd_kernel<A><<<static_cast<unsigned>(sblocks), kRowWarps * 32, 0, st>>>(
        static_cast<const A*>(a_acc), static_cast<const A*>(ga_total), static_cast<A*>(gs), B, C, N, rows_pad);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
    sa_bwd_tanh_kernel<T><<<static_cast<unsigned>(groups * k_tiles), kBwdThreads, 0, st>>>(
        static_cast<const T*>(u), static_cast<const T*>(e), static_cast<const T*>(v), static_cast<const A*>(gs),
        static_cast<T*>(grad_u), static_cast<A*>(pe), static_cast<A*>(pv), rows, C, I, rows_pad, row_tiles, groups,
        k_tiles);
    err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
    sa_bwd_finalize_kernel<T><<<static_cast<unsigned>(fblocks), 256, 0, st>>>(
        static_cast<const A*>(pe), static_cast<const A*>(pv), static_cast<const T*>(v), static_cast<T*>(grad_e),
        static_cast<T*>(grad_v), groups, C, I);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace cuda
}  // namespace dsrb
