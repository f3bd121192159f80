// Helpers for the CUDA kernels: error checks that throw (caught by pybind11 as RuntimeError).
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define PC_CUDA_CHECK(expr)                                                              \
  do {                                                                                   \
    cudaError_t _e = (expr);                                                             \
    if (_e != cudaSuccess)                                                               \
      throw std::runtime_error(std::string("popcomp CUDA error: ") + cudaGetErrorString(_e) + \
                               " at " __FILE__ ":" + std::to_string(__LINE__));         \
  } while (0)

namespace popcomp {
// Makes `device` current for the scope and restores the previous device afterwards.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    PC_CUDA_CHECK(cudaGetDevice(&prev));
    if (prev != device) PC_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};
inline cudaStream_t as_stream(void* s) { return reinterpret_cast<cudaStream_t>(s); }
}  // namespace popcomp
