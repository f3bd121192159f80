// CUDA backend of the fused squared-gradient accumulation (see hessian.h).
//
// The kernels are templates on the accumulation scalar S: float (acc float32; g, x float32,
// float16 or bfloat16, loaded as float) or double (acc, g and x float64, every product and
// square in double). One 256-thread block owns a 64 x 64 tile of the output, each thread a
// 4 x 4 register tile.
// Tiles are numbered over gridDim.x (output_tile() in hessian_math.h; a block loops over tiles
// blockIdx.x + k gridDim.x, so any output size fits the grid). The block loops over its range
// of samples:
//   T == 1: acc += sum_b (sum_r g[b,r,o]^2) x[b,i]^2, staged in shared memory 16 samples at a
//           time (a GEMM over samples on squared operands);
//   T  > 1: for each (b, r) the 4 x 4 per-sample product M = sum_t g x^T is built in registers
//           from 16-position shared-memory chunks, then squared into the accumulator registers.
// When the output has too few tiles to fill the GPU, samples are split over gridDim.z: split z
// stores its partial tiles in slab z of the caller's workspace, and a second kernel adds the
// slabs into acc in split order (no atomics: repeated runs on one device are bit-identical).
// At most as many splits as the workspace holds slabs (one split, written straight into acc,
// when it holds fewer than two). Every launch on `stream`; no host synchronization.
#include <algorithm>
#include <stdexcept>

#include "common/cuda_utils.cuh"
#include "hessian/hessian.h"
#include "hessian/hessian_math.h"

namespace popcomp {
namespace hessian {
namespace {

constexpr int TILE = 64;
constexpr int KC = 16;
constexpr int THREADS = 256;

// Element i of src as S: float from a float32/16-bit buffer of dtype dt; double from a float64
// buffer (the float64 path takes float64 operands only).
template <typename S>
__device__ __forceinline__ S load_s(const void* src, DType dt, int64_t i);
template <>
__device__ __forceinline__ float load_s<float>(const void* src, DType dt, int64_t i) {
  return load_as_float(src, dt, i);
}
template <>
__device__ __forceinline__ double load_s<double>(const void* src, DType, int64_t i) {
  return static_cast<const double*>(src)[i];
}

__device__ __forceinline__ float fma_s(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_s(double a, double b, double c) { return fma(a, b, c); }

// Stage a KC x TILE chunk: dst[k][j] = src(k, j) (zero outside the valid range). The element
// order follows whichever of the two strides is 1, so that global loads coalesce.
template <typename S, bool Square, bool SumR>
__device__ __forceinline__ void stage(S (*dst)[TILE], const void* src, DType dt, int64_t base,
                                      int64_t sk, int64_t sj, int kc, int nj, int64_t R,
                                      int64_t sr) {
  const int tid = threadIdx.x;
  const bool j_fast = (sj == 1) || (sk != 1);
#pragma unroll
  for (int e0 = 0; e0 < KC * TILE; e0 += THREADS) {
    const int e = e0 + tid;
    const int k = j_fast ? e / TILE : e % KC;
    const int j = j_fast ? e % TILE : e / KC;
    S v = S(0);
    if (k < kc && j < nj) {
      const int64_t off = base + k * sk + j * sj;
      if (SumR) {
        for (int64_t r = 0; r < R; ++r) {
          const S u = load_s<S>(src, dt, off + r * sr);
          v += u * u;
        }
      } else {
        v = load_s<S>(src, dt, off);
        if (Square) v = v * v;
      }
    }
    dst[k][j] = v;
  }
}

// c[u][v] += sum_k sa[k][ty + 16u] * sb[k][tx + 16v]: the 4x4 register tile of a thread.
template <typename S>
__device__ __forceinline__ void tile_fma(const S (*sa)[TILE], const S (*sb)[TILE], int ty, int tx,
                                         S (&c)[4][4]) {
#pragma unroll
  for (int k = 0; k < KC; ++k) {
    S av[4], bv[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) av[u] = sa[k][ty + 16 * u];
#pragma unroll
    for (int v = 0; v < 4; ++v) bv[v] = sb[k][tx + 16 * v];
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < 4; ++v) c[u][v] = fma_s(av[u], bv[v], c[u][v]);
  }
}

// One output tile (rows o0.., columns i0..) over samples [b_begin, b_end), added into acc.
template <typename S>
__device__ __forceinline__ void tile_sumsq(const SumSqParams& p, const void* __restrict__ g,
                                           const void* __restrict__ x, S* __restrict__ acc,
                                           S (*sa)[TILE], S (*sb)[TILE], int64_t o0, int64_t i0,
                                           int no, int ni, int ty, int tx, int64_t b_begin,
                                           int64_t b_end) {
  S a[4][4];
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) a[u][v] = S(0);

  if (p.T == 1) {
    for (int64_t b0 = b_begin; b0 < b_end; b0 += KC) {
      const int kc = (int)min((int64_t)KC, b_end - b0);
      stage<S, false, true>(sa, g, p.g_dtype, b0 * p.g_sb + o0 * p.g_so, p.g_sb, p.g_so, kc, no,
                            p.R, p.g_sr);
      stage<S, true, false>(sb, x, p.x_dtype, b0 * p.x_sb + i0 * p.x_si, p.x_sb, p.x_si, kc, ni, 1,
                            0);
      __syncthreads();
      tile_fma(sa, sb, ty, tx, a);
      __syncthreads();
    }
  } else {
    for (int64_t b = b_begin; b < b_end; ++b) {
      for (int64_t r = 0; r < p.R; ++r) {
        S m[4][4];
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int v = 0; v < 4; ++v) m[u][v] = S(0);
        for (int64_t t0 = 0; t0 < p.T; t0 += KC) {
          const int kc = (int)min((int64_t)KC, p.T - t0);
          stage<S, false, false>(sa, g, p.g_dtype,
                                 b * p.g_sb + r * p.g_sr + t0 * p.g_st + o0 * p.g_so, p.g_st,
                                 p.g_so, kc, no, 1, 0);
          stage<S, false, false>(sb, x, p.x_dtype, b * p.x_sb + t0 * p.x_st + i0 * p.x_si, p.x_st,
                                 p.x_si, kc, ni, 1, 0);
          __syncthreads();
          tile_fma(sa, sb, ty, tx, m);
          __syncthreads();
        }
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int v = 0; v < 4; ++v) a[u][v] = fma_s(m[u][v], m[u][v], a[u][v]);
      }
    }
  }
  // one split: add into acc; several: store into this split's slab (acc points at it)
  const bool slab = gridDim.z > 1;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int o = ty + 16 * u;
    if (o >= no) continue;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int i = tx + 16 * v;
      if (i >= ni) continue;
      S* dst = acc + (o0 + o) * p.in + (i0 + i);
      if (slab) *dst = a[u][v];
      else *dst += a[u][v];
    }
  }
}

// acc, or with several splits the slabs (split z at slabs + z * out * in).
template <typename S>
__global__ void __launch_bounds__(THREADS)
sumsq_outer_kernel(SumSqParams p, const void* __restrict__ g, const void* __restrict__ x,
                   S* __restrict__ acc, int64_t samples_per_split) {
  __shared__ S sa[KC][TILE];
  __shared__ S sb[KC][TILE];
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t b_begin = (int64_t)blockIdx.z * samples_per_split;
  const int64_t b_end = min(p.B, b_begin + samples_per_split);
  const int64_t tiles = output_tiles(p.out, p.in, TILE);
  S* dst = gridDim.z > 1 ? acc + (int64_t)blockIdx.z * p.out * p.in : acc;
  // t is uniform over the block: the __syncthreads() below are reached by every thread
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const OutputTile ot = output_tile(t, p.out, p.in, TILE);
    tile_sumsq<S>(p, g, x, dst, sa, sb, ot.o0, ot.i0, ot.no, ot.ni, ty, tx, b_begin, b_end);
  }
}

// acc[e] += the splits' partials of element e, added in split order.
template <typename S>
__global__ void sumsq_reduce_kernel(const S* __restrict__ slabs, int64_t elems, int64_t splits,
                                    S* __restrict__ acc) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < elems;
       e += (int64_t)gridDim.x * blockDim.x) {
    S s = slabs[e];
    for (int64_t z = 1; z < splits; ++z) s += slabs[z * elems + e];
    acc[e] += s;
  }
}

// The launches for the accumulation scalar S (acc of S; the slabs of S in the workspace); every
// size > 0 (the callers return early otherwise).
template <typename S>
void launch(const SumSqParams& p, const void* g, const void* x, S* acc, void* workspace,
            size_t workspace_bytes, int device, void* stream) {
  DeviceGuard guard(device);
  int sms = 0;
  PC_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t tiles = output_tiles(p.out, p.in, TILE);
  // Split the samples when the tiles alone leave the GPU idle (target ~4 blocks per SM), but
  // keep at least 16 samples' work (or one sample for T > 1) per split.
  const int64_t min_per = p.T == 1 ? 64 : 1;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>((4LL * sms + tiles - 1) / tiles,
                                                          ceil_div(p.B, min_per)));
  splits = std::min<int64_t>(splits, 65535);
  const int64_t elems = p.out * p.in;
  const int64_t slabs = workspace != nullptr ? (int64_t)(workspace_bytes / (sizeof(S) * elems)) : 0;
  splits = std::max<int64_t>(1, std::min(splits, slabs));  // as many as the workspace holds
  const int64_t per = ceil_div(p.B, splits);
  splits = ceil_div(p.B, per);
  cudaStream_t st = as_stream(stream);
  dim3 grid((unsigned)output_tile_blocks(tiles), 1u, (unsigned)splits);
  S* dst = splits > 1 ? static_cast<S*>(workspace) : acc;
  sumsq_outer_kernel<S><<<grid, THREADS, 0, st>>>(p, g, x, dst, per);
  PC_CUDA_CHECK(cudaGetLastError());
  if (splits > 1) {
    const int64_t blocks = std::min<int64_t>(ceil_div(elems, THREADS), 4LL * sms);
    sumsq_reduce_kernel<S><<<(unsigned)blocks, THREADS, 0, st>>>(dst, elems, splits, acc);
    PC_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace

void sumsq_outer_cuda(const SumSqParams& p, const void* g, const void* x, float* acc,
                      void* workspace, size_t workspace_bytes, int device, void* stream) {
  if (p.B <= 0 || p.R <= 0 || p.T <= 0 || p.out <= 0 || p.in <= 0) return;
  if (p.g_dtype == DType::f64 || p.x_dtype == DType::f64)
    throw std::invalid_argument("sumsq_outer_cuda: g and x must be float32, float16 or bfloat16");
  launch<float>(p, g, x, acc, workspace, workspace_bytes, device, stream);
}

void sumsq_outer_cuda_f64(const SumSqParams& p, const double* g, const double* x, double* acc,
                          void* workspace, size_t workspace_bytes, int device, void* stream) {
  if (p.B <= 0 || p.R <= 0 || p.T <= 0 || p.out <= 0 || p.in <= 0) return;
  if (p.g_dtype != DType::f64 || p.x_dtype != DType::f64)
    throw std::invalid_argument("sumsq_outer_cuda_f64: g and x must be float64");
  launch<double>(p, g, x, acc, workspace, workspace_bytes, device, stream);
}

}  // namespace hessian
}  // namespace popcomp
