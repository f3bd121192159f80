// Build and runtime facts reported to Python (popcomp.backends()).
#pragma once
namespace popcomp {
// Number of CUDA devices visible to the CUDA runtime; 0 (never an error) when there is no
// driver, no device, or the build has no CUDA.
int cuda_device_count();
// CUDA runtime version the module was built against (e.g. 13000), 0 without CUDA.
int cuda_build_version();
}  // namespace popcomp
