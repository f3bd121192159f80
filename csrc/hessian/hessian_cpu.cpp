// CPU backend of the fused squared-gradient accumulation (see hessian.h).
//
// The output (out x in) is cut into TO x TI tiles handed to OpenMP threads. Inside a tile, for
// each (b, r): M = sum_t g[b,r,t,:]^T x[b,t,:] on the tile (chunks of KC positions), then
// acc_tile += M * M. (T == 1, where the sum is an ordinary GEMM on squared operands, is done by
// torch's BLAS in python/popcomp/ops/backends/cpu/sumsq_outer_acc.py; this loop is also right for T == 1.)
// Extra memory is a few tile-sized buffers per thread, whatever B, R and T are.
#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include "common/parallel.h"
#include "hessian/hessian.h"
#include "hessian/hessian_math.h"

// Function multiversioning of the inner kernels (the build uses no -march flags). The clones
// are chosen by CPU features at load time (x86-64-v4: AVX-512, v3: AVX2+FMA); "arch=<cpu>"
// clones would be chosen by CPU model and never run on AMD parts.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(_WIN32) && \
    __GNUC__ >= 12
#define PC_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(_WIN32)
#define PC_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PC_MULTIVERSION
#endif

namespace popcomp {
namespace hessian {
namespace {

constexpr int TO = 64;  // output rows per tile
constexpr int TI = 256;  // output columns per tile
constexpr int KC = 64;  // positions per packed chunk

typedef float v16 __attribute__((vector_size(64)));

// c[TO][TI] += sum_k a[k][o] * b[k][i]  (a: kc x TO, b: kc x TI, packed, zero padded,
// 64-byte aligned). 8 x 16 register tiles: one zmm per row with AVX-512, two ymm with AVX2.
PC_MULTIVERSION void rank_k_update(float* __restrict c, const float* __restrict a,
                                   const float* __restrict b, int kc) {
  for (int o = 0; o < TO; o += 8) {
    for (int i = 0; i < TI; i += 16) {
      v16 c0, c1, c2, c3, c4, c5, c6, c7;
      std::memcpy(&c0, c + (o + 0) * TI + i, 64);
      std::memcpy(&c1, c + (o + 1) * TI + i, 64);
      std::memcpy(&c2, c + (o + 2) * TI + i, 64);
      std::memcpy(&c3, c + (o + 3) * TI + i, 64);
      std::memcpy(&c4, c + (o + 4) * TI + i, 64);
      std::memcpy(&c5, c + (o + 5) * TI + i, 64);
      std::memcpy(&c6, c + (o + 6) * TI + i, 64);
      std::memcpy(&c7, c + (o + 7) * TI + i, 64);
      for (int k = 0; k < kc; ++k) {
        v16 bv;
        std::memcpy(&bv, b + k * TI + i, 64);
        const float* ak = a + k * TO + o;
        c0 += ak[0] * bv;
        c1 += ak[1] * bv;
        c2 += ak[2] * bv;
        c3 += ak[3] * bv;
        c4 += ak[4] * bv;
        c5 += ak[5] * bv;
        c6 += ak[6] * bv;
        c7 += ak[7] * bv;
      }
      std::memcpy(c + (o + 0) * TI + i, &c0, 64);
      std::memcpy(c + (o + 1) * TI + i, &c1, 64);
      std::memcpy(c + (o + 2) * TI + i, &c2, 64);
      std::memcpy(c + (o + 3) * TI + i, &c3, 64);
      std::memcpy(c + (o + 4) * TI + i, &c4, 64);
      std::memcpy(c + (o + 5) * TI + i, &c5, 64);
      std::memcpy(c + (o + 6) * TI + i, &c6, 64);
      std::memcpy(c + (o + 7) * TI + i, &c7, 64);
    }
  }
}

PC_MULTIVERSION void add_squares(float* __restrict acc, const float* __restrict m) {
#pragma omp simd
  for (int j = 0; j < TO * TI; ++j) acc[j] += m[j] * m[j];
}

template <DType D>
inline float ld(const void* p, int64_t i) {
  if constexpr (D == DType::f32) return static_cast<const float*>(p)[i];
  else if constexpr (D == DType::f16) return half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  else return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
}

// dst[j] = src[base + j * stride], j < n
template <DType D>
inline void pack_row(float* __restrict dst, const void* src, int64_t base, int64_t stride, int n) {
  if (stride == 1) {
    for (int j = 0; j < n; ++j) dst[j] = ld<D>(src, base + j);
  } else {
    for (int j = 0; j < n; ++j) dst[j] = ld<D>(src, base + j * stride);
  }
}

template <DType GD, DType XD>
void tile(const SumSqParams& p, const void* g, const void* x, float* acc, int64_t o0,
          int64_t i0, float* acc_t, float* m, float* pa, float* pb) {
  const int no = (int)std::min<int64_t>(TO, p.out - o0);
  const int ni = (int)std::min<int64_t>(TI, p.in - i0);
  std::fill(acc_t, acc_t + TO * TI, 0.f);
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t r = 0; r < p.R; ++r) {
      std::fill(m, m + TO * TI, 0.f);
      for (int64_t t0 = 0; t0 < p.T; t0 += KC) {
        const int kc = (int)std::min<int64_t>(KC, p.T - t0);
        if (kc < KC || no < TO) std::fill(pa, pa + KC * TO, 0.f);
        if (kc < KC || ni < TI) std::fill(pb, pb + KC * TI, 0.f);
        for (int k = 0; k < kc; ++k) {
          const int64_t t = t0 + k;
          pack_row<GD>(pa + k * TO, g, b * p.g_sb + r * p.g_sr + t * p.g_st + o0 * p.g_so, p.g_so, no);
          pack_row<XD>(pb + k * TI, x, b * p.x_sb + t * p.x_st + i0 * p.x_si, p.x_si, ni);
        }
        rank_k_update(m, pa, pb, kc);
      }
      add_squares(acc_t, m);
    }
  }
  for (int o = 0; o < no; ++o) {
    float* dst = acc + (o0 + o) * p.in + i0;
    const float* src = acc_t + o * TI;
    for (int i = 0; i < ni; ++i) dst[i] += src[i];
  }
}

using TileFn = void (*)(const SumSqParams&, const void*, const void*, float*, int64_t, int64_t,
                        float*, float*, float*, float*);

template <DType GD>
TileFn pick_x(DType xd) {
  switch (xd) {
    case DType::f16: return &tile<GD, DType::f16>;
    case DType::bf16: return &tile<GD, DType::bf16>;
    default: return &tile<GD, DType::f32>;
  }
}

TileFn pick(DType gd, DType xd) {
  switch (gd) {
    case DType::f16: return pick_x<DType::f16>(xd);
    case DType::bf16: return pick_x<DType::bf16>(xd);
    default: return pick_x<DType::f32>(xd);
  }
}

// ---- float64: acc, g and x all float64 (a float64 model's diagonal) ----------------------
// The same tiling; the products are formed and squared in double, in plain loops the compiler
// vectorizes (the float64 path serves precision, not speed).
constexpr int TO64 = 32;  // output rows per tile
constexpr int TI64 = 128;  // output columns per tile

PC_MULTIVERSION void rank_k_update_f64(double* __restrict c, const double* __restrict a,
                                       const double* __restrict b, int kc) {
  for (int o = 0; o < TO64; ++o) {
    double* __restrict co = c + o * TI64;
    for (int k = 0; k < kc; ++k) {
      const double ak = a[k * TO64 + o];
      const double* __restrict bk = b + k * TI64;
#pragma omp simd
      for (int i = 0; i < TI64; ++i) co[i] += ak * bk[i];
    }
  }
}

PC_MULTIVERSION void add_squares_f64(double* __restrict acc, const double* __restrict m) {
#pragma omp simd
  for (int j = 0; j < TO64 * TI64; ++j) acc[j] += m[j] * m[j];
}

void tile_f64(const SumSqParams& p, const double* g, const double* x, double* acc, int64_t o0,
              int64_t i0, double* acc_t, double* m, double* pa, double* pb) {
  const int no = (int)std::min<int64_t>(TO64, p.out - o0);
  const int ni = (int)std::min<int64_t>(TI64, p.in - i0);
  std::fill(acc_t, acc_t + TO64 * TI64, 0.0);
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t r = 0; r < p.R; ++r) {
      std::fill(m, m + TO64 * TI64, 0.0);
      for (int64_t t0 = 0; t0 < p.T; t0 += KC) {
        const int kc = (int)std::min<int64_t>(KC, p.T - t0);
        if (kc < KC || no < TO64) std::fill(pa, pa + KC * TO64, 0.0);
        if (kc < KC || ni < TI64) std::fill(pb, pb + KC * TI64, 0.0);
        for (int k = 0; k < kc; ++k) {
          const int64_t t = t0 + k;
          const double* gs = g + b * p.g_sb + r * p.g_sr + t * p.g_st + o0 * p.g_so;
          const double* xs = x + b * p.x_sb + t * p.x_st + i0 * p.x_si;
          for (int j = 0; j < no; ++j) pa[k * TO64 + j] = gs[j * p.g_so];
          for (int j = 0; j < ni; ++j) pb[k * TI64 + j] = xs[j * p.x_si];
        }
        rank_k_update_f64(m, pa, pb, kc);
      }
      add_squares_f64(acc_t, m);
    }
  }
  for (int o = 0; o < no; ++o) {
    double* dst = acc + (o0 + o) * p.in + i0;
    const double* src = acc_t + o * TI64;
    for (int i = 0; i < ni; ++i) dst[i] += src[i];
  }
}

}  // namespace

void sumsq_outer_cpu(const SumSqParams& p, const void* g, const void* x, float* acc,
                     int num_threads) {
  if (p.B <= 0 || p.R <= 0 || p.T <= 0 || p.out <= 0 || p.in <= 0) return;
  const int64_t to = ceil_div(p.out, TO), ti = ceil_div(p.in, TI);
  const int64_t ntiles = to * ti;
  int nt = std::max(1, (int)std::min<int64_t>(num_threads, ntiles));
  if (p.g_dtype == DType::f64 || p.x_dtype == DType::f64)
    throw std::invalid_argument("sumsq_outer_cpu: g and x must be float32, float16 or bfloat16");
  const TileFn fn = pick(p.g_dtype, p.x_dtype);
  struct alignas(64) Bufs {
    float acc_t[TO * TI], m[TO * TI], pa[KC * TO], pb[KC * TI];
  };
  // allocated here, outside the parallel region: no exception may escape it
  std::vector<std::unique_ptr<Bufs>> bufs(nt);
  for (auto& b : bufs) b.reset(new Bufs);
#if defined(POPCOMP_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
  {
    Bufs* buf = bufs[thread_id()].get();
#if defined(POPCOMP_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t t = 0; t < ntiles; ++t) {
      fn(p, g, x, acc, (t / ti) * TO, (t % ti) * TI, buf->acc_t, buf->m, buf->pa, buf->pb);
    }
  }
}

void sumsq_outer_cpu_f64(const SumSqParams& p, const double* g, const double* x, double* acc,
                         int num_threads) {
  if (p.B <= 0 || p.R <= 0 || p.T <= 0 || p.out <= 0 || p.in <= 0) return;
  if (p.g_dtype != DType::f64 || p.x_dtype != DType::f64)
    throw std::invalid_argument("sumsq_outer_cpu_f64: g and x must be float64");
  const int64_t to = ceil_div(p.out, TO64), ti = ceil_div(p.in, TI64);
  const int64_t ntiles = to * ti;
  int nt = std::max(1, (int)std::min<int64_t>(num_threads, ntiles));
  struct alignas(64) Bufs {
    double acc_t[TO64 * TI64], m[TO64 * TI64], pa[KC * TO64], pb[KC * TI64];
  };
  std::vector<std::unique_ptr<Bufs>> bufs(nt);  // outside the parallel region (see above)
  for (auto& b : bufs) b.reset(new Bufs);
#if defined(POPCOMP_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
  {
    Bufs* buf = bufs[thread_id()].get();
#if defined(POPCOMP_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t t = 0; t < ntiles; ++t) {
      tile_f64(p, g, x, acc, (t / ti) * TO64, (t % ti) * TI64, buf->acc_t, buf->m, buf->pa,
               buf->pb);
    }
  }
}

}  // namespace hessian
}  // namespace popcomp
