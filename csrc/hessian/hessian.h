// Fused accumulation of squared per-sample weight gradients (empirical Fisher / GGN diagonal)
// for layers whose weight gradient is a sum of outer products: Linear, and Conv on unfolded
// patches. Torch-free interface: raw pointers, sizes, element strides, dtype codes.
//
//   acc[o, i] += sum_b sum_r ( sum_t g[b, r, t, o] * x[b, t, i] )^2
//
// b: samples, r: "columns" per sample (1 for the Fisher; classes of the loss Hessian's
// square-root factor for the GGN; Monte-Carlo draws for ggn_mc), t: positions inside a sample
// (sequence tokens, conv output pixels). acc is float32, contiguous (out x in); g and x may be
// float32, float16 or bfloat16 with arbitrary element strides (no copy, no upcast copy). acc, g
// and x may also all be float64 (sumsq_outer_cpu_f64, sumsq_outer_cuda_f64).
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/hd.h"

namespace popcomp {
namespace hessian {

struct SumSqParams {
  int64_t B = 0, R = 1, T = 1, out = 0, in = 0;
  // element strides of g (b, r, t, o) and x (b, t, i)
  int64_t g_sb = 0, g_sr = 0, g_st = 0, g_so = 1;
  int64_t x_sb = 0, x_st = 0, x_si = 1;
  DType g_dtype = DType::f32;
  DType x_dtype = DType::f32;
};

// CPU backend: output tiles distributed over OpenMP threads, loop over samples inside a tile
// (the op sends T == 1 to torch's BLAS instead: a GEMM on squared operands).
void sumsq_outer_cpu(const SumSqParams& p, const void* g, const void* x, float* acc,
                     int num_threads);

// CPU backend, float64: acc, g and x all float64 (g_dtype == x_dtype == f64), same layout; the
// products formed and squared in double (a float64 model's diagonal, no float32 rounding).
void sumsq_outer_cpu_f64(const SumSqParams& p, const double* g, const double* x, double* acc,
                         int num_threads);

// CUDA backend: one thread block per 64x64 output tile, samples looped inside the block, the
// per-sample product squared in registers. Enqueued on `stream` of `device`; no allocation.
// workspace (device memory, may be null): room for the per-split partial sums (out x in
// elements of acc's type each) when samples are split to fill the GPU; they are added in a fixed
// order, so repeated runs are bit-identical. With kSumSqWorkspace bytes, as many splits as fill
// a GPU of up to ~128 SMs (fewer with less; half as many in float64).
constexpr size_t kSumSqWorkspace = size_t(16) << 20;
void sumsq_outer_cuda(const SumSqParams& p, const void* g, const void* x, float* acc,
                      void* workspace, size_t workspace_bytes, int device, void* stream);

// CUDA backend, float64: acc, g and x all float64 (g_dtype == x_dtype == f64), the same kernel
// and split design with the products formed, squared and summed in double.
void sumsq_outer_cuda_f64(const SumSqParams& p, const double* g, const double* x, double* acc,
                          void* workspace, size_t workspace_bytes, int device, void* stream);

}  // namespace hessian
}  // namespace popcomp
