// Build and runtime facts reported to Python (popcomp.backends()).
#pragma once
#include <string>

namespace popcomp {
// Number of CUDA devices visible to the CUDA runtime; 0 (never an error) when there is no
// driver, no device, or the build has no CUDA.
int cuda_device_count();
// CUDA runtime version the module was built against (e.g. 13000), 0 without CUDA.
int cuda_build_version();
// Latest CUDA version the installed driver supports (cudaDriverGetVersion, e.g. 12040); 0
// without a driver or without CUDA. The statically linked runtime needs >= cuda_build_version().
int cuda_driver_version();
// Why the CUDA runtime cannot use a device: the message of cudaGetDeviceCount's error ("CUDA
// driver version is insufficient for CUDA runtime version", ...), empty when it succeeds.
std::string cuda_device_error();
}  // namespace popcomp
