// The CUDA runtime functions that csrc/cuda/*.cu call, for the host emulation (tests/cuda_emu/cuda_runtime.h).
#include "cuda_runtime.h"

cudaError_t cudaGetLastError() {
  dsrb_emu::ErrorState& s = dsrb_emu::errors();
  std::lock_guard<std::mutex> lock(s.m);
  const cudaError_t err = s.last;
  s.last = cudaSuccess;
  return err;
}

// The message of the latest error set with this code (the emulator's report of a failed launch), else the number.
const char* cudaGetErrorString(cudaError_t err) {
  static thread_local std::string text;
  dsrb_emu::ErrorState& s = dsrb_emu::errors();
  std::lock_guard<std::mutex> lock(s.m);
  text = err == s.text_of ? s.text : "cudaError_t " + std::to_string(static_cast<int>(err));
  return text.c_str();
}

cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

// DSRB_EMU_SMS streaming multiprocessors (default 132, an H200), so the launch plans are those of the target GPU.
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (attr != cudaDevAttrMultiProcessorCount || dev != 0) return cudaErrorInvalidValue;
  const char* env = std::getenv("DSRB_EMU_SMS");
  *value = env != nullptr ? std::atoi(env) : 132;
  return cudaSuccess;
}
