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
}  // namespace popcomp
