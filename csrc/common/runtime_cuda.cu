// The CUDA build and runtime facts of runtime.h (device count, runtime and driver versions).
#include <cuda_runtime.h>

#include "common/runtime.h"

namespace popcomp {
int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}
int cuda_build_version() { return CUDART_VERSION; }
int cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}
std::string cuda_device_error() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaSuccess) return std::string();
  cudaGetLastError();
  return std::string(cudaGetErrorString(e)) + " (" + cudaGetErrorName(e) + ")";
}
}  // namespace popcomp
