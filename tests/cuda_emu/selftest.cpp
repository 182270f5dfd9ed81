// Kernels with a known defect, and one without, that show the emulator (cuda_runtime.h) catches what it claims to;
// compiled into the emulator library (after the same source rewrite as csrc/cuda/*.cu) as dsrb_emu::selftest.
#include <cuda_runtime.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

namespace {

constexpr int kThreads = 64;
constexpr int kBlocks = 8;

// out[block] = sum of what the block's threads stored; the threads' values differ per block, so a read before the
// others have written (no barrier) sees another block's values.
__global__ void shared_sum(int* out, bool barrier) {
  __shared__ int buf[kThreads];
  buf[threadIdx.x] = static_cast<int>(blockIdx.x * 1000 + threadIdx.x);
  if (barrier) __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (int i = 0; i < kThreads; ++i) s += buf[i];
    out[blockIdx.x] = s;
  }
}

// out[block] = sum of a shared array of which only the even entries were written: the odd ones are undefined on a
// GPU, NaN here (without the emulator's fill, a static's zeros or the previous block's values would pass unseen).
__global__ void shared_uninitialized(float* out) {
  __shared__ float buf[kThreads];
  if (threadIdx.x % 2 == 0) buf[threadIdx.x] = 1.0f;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int i = 0; i < kThreads; ++i) s += buf[i];
    out[blockIdx.x] = s;
  }
}

__global__ void partial_warp_shuffle(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void barrier_deadlock(float* out) {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  }
}

// Compiled for at most 32 threads per block; launched with kThreads it must fail as on a GPU.
__global__ void __launch_bounds__(32) over_launch_bounds(float* out) { out[threadIdx.x] = 1.0f; }

// A 16-byte load from an address 4 bytes past a 16-byte boundary: a GPU faults.
__global__ void misaligned_load(const float* in, float* out) {
  const float4 t = __ldg(reinterpret_cast<const float4*>(in + 1));
  out[threadIdx.x] = t.x;
}

// Reads one element past the end of its input: only an AddressSanitizer build (DSRB_EMU_SANITIZE=address) runs it.
__global__ void read_past_end(const float* in, float* out, int n) {
  if (threadIdx.x == 0) out[0] = in[n];
}

at::Tensor selftest(std::string name) {
  at::Tensor out = at::zeros({kBlocks * kThreads}, at::kFloat);
  if (name == "shared_sum" || name == "shared_sum_no_barrier") {
    out = at::zeros({kBlocks}, at::kInt);
    shared_sum<<<kBlocks, kThreads>>>(out.data_ptr<int>(), name == "shared_sum");
  } else if (name == "shared_uninitialized") {
    out = at::zeros({kBlocks}, at::kFloat);
    shared_uninitialized<<<kBlocks, kThreads>>>(out.data_ptr<float>());
  } else if (name == "partial_warp_shuffle") {
    partial_warp_shuffle<<<1, kThreads>>>(out.data_ptr<float>());
  } else if (name == "divergent_barrier") {
    divergent_barrier<<<1, kThreads>>>(out.data_ptr<float>());
  } else if (name == "barrier_deadlock") {
    barrier_deadlock<<<1, kThreads>>>(out.data_ptr<float>());
  } else if (name == "over_launch_bounds") {
    over_launch_bounds<<<1, kThreads>>>(out.data_ptr<float>());
  } else if (name == "misaligned_load") {
    at::Tensor in = at::ones({8}, at::kFloat);  // the allocator's alignment: at least 16 bytes
    misaligned_load<<<1, 32>>>(in.data_ptr<float>(), out.data_ptr<float>());
  } else if (name == "read_past_end") {
    at::Tensor in = at::ones({5}, at::kFloat);
    read_past_end<<<1, 32>>>(in.data_ptr<float>(), out.data_ptr<float>(), 5);
  } else {
    TORCH_CHECK(false, "argument 'name': unknown self-test ", name);
  }
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsrb_emu, m) { m.def("selftest(str name) -> Tensor", &selftest); }
