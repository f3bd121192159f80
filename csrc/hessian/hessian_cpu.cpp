// CPU backend of the fused squared-gradient accumulation (see hessian.h).
//
// The output (out x in) is cut into tiles (TileSize<S>: 64 x 256 for float, 32 x 128 for double)
// handed to OpenMP threads. Inside a tile, for each (b, r): M = sum_t g[b,r,t,:]^T x[b,t,:] on
// the tile (chunks of KC positions), then acc_tile += M * M. The float32 path (acc float32; g, x
// float32/float16/bfloat16) and the float64 path (acc, g, x float64) are the same templates on
// the accumulation scalar S; only the rank-k kernel differs per S. (T == 1, where the sum is
// an ordinary GEMM on squared operands, is done by torch's BLAS in
// python/popcomp/ops/backends/cpu/sumsq_outer_acc.py; this loop is also right for T == 1.)
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

// Tile sizes of the accumulation scalar S: out rows x in columns per tile.
template <class S>
struct TileSize;
template <>
struct TileSize<float> {
  static constexpr int O = 64, I = 256;
};
template <>
struct TileSize<double> {
  static constexpr int O = 32, I = 128;
};
constexpr int KC = 64;  // positions per packed chunk

typedef float v16 __attribute__((vector_size(64)));

// c[TO][TI] += sum_k a[k][o] * b[k][i]  (a: kc x TO, b: kc x TI, packed, zero padded,
// 64-byte aligned). 8 x 16 register tiles: one zmm per row with AVX-512, two ymm with AVX2.
PC_MULTIVERSION void rank_k_update(float* __restrict c, const float* __restrict a,
                                   const float* __restrict b, int kc) {
  constexpr int TO = TileSize<float>::O, TI = TileSize<float>::I;
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

// The same update in double, in plain loops the compiler vectorizes (the float64 path serves
// precision, not speed).
PC_MULTIVERSION void rank_k_update(double* __restrict c, const double* __restrict a,
                                   const double* __restrict b, int kc) {
  constexpr int TO = TileSize<double>::O, TI = TileSize<double>::I;
  for (int o = 0; o < TO; ++o) {
    double* __restrict co = c + o * TI;
    for (int k = 0; k < kc; ++k) {
      const double ak = a[k * TO + o];
      const double* __restrict bk = b + k * TI;
#pragma omp simd
      for (int i = 0; i < TI; ++i) co[i] += ak * bk[i];
    }
  }
}

template <class S>
PC_MULTIVERSION void add_squares(S* __restrict acc, const S* __restrict m) {
#pragma omp simd
  for (int j = 0; j < TileSize<S>::O * TileSize<S>::I; ++j) acc[j] += m[j] * m[j];
}

template <class S, DType D>
inline S ld(const void* p, int64_t i) {
  if constexpr (D == DType::f64) return static_cast<const double*>(p)[i];
  else if constexpr (D == DType::f32) return static_cast<const float*>(p)[i];
  else if constexpr (D == DType::f16) return half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  else return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
}

// dst[j] = src[base + j * stride], j < n
template <class S, DType D>
inline void pack_row(S* __restrict dst, const void* src, int64_t base, int64_t stride, int n) {
  if (stride == 1) {
    for (int j = 0; j < n; ++j) dst[j] = ld<S, D>(src, base + j);
  } else {
    for (int j = 0; j < n; ++j) dst[j] = ld<S, D>(src, base + j * stride);
  }
}

template <class S, DType GD, DType XD>
void tile(const SumSqParams& p, const void* g, const void* x, S* acc, int64_t o0, int64_t i0,
          S* acc_t, S* m, S* pa, S* pb) {
  constexpr int TO = TileSize<S>::O, TI = TileSize<S>::I;
  const int no = (int)std::min<int64_t>(TO, p.out - o0);
  const int ni = (int)std::min<int64_t>(TI, p.in - i0);
  std::fill(acc_t, acc_t + TO * TI, S(0));
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t r = 0; r < p.R; ++r) {
      std::fill(m, m + TO * TI, S(0));
      for (int64_t t0 = 0; t0 < p.T; t0 += KC) {
        const int kc = (int)std::min<int64_t>(KC, p.T - t0);
        if (kc < KC || no < TO) std::fill(pa, pa + KC * TO, S(0));
        if (kc < KC || ni < TI) std::fill(pb, pb + KC * TI, S(0));
        for (int k = 0; k < kc; ++k) {
          const int64_t t = t0 + k;
          pack_row<S, GD>(pa + k * TO, g, b * p.g_sb + r * p.g_sr + t * p.g_st + o0 * p.g_so,
                          p.g_so, no);
          pack_row<S, XD>(pb + k * TI, x, b * p.x_sb + t * p.x_st + i0 * p.x_si, p.x_si, ni);
        }
        rank_k_update(m, pa, pb, kc);
      }
      add_squares<S>(acc_t, m);
    }
  }
  for (int o = 0; o < no; ++o) {
    S* dst = acc + (o0 + o) * p.in + i0;
    const S* src = acc_t + o * TI;
    for (int i = 0; i < ni; ++i) dst[i] += src[i];
  }
}

template <class S>
using TileFn = void (*)(const SumSqParams&, const void*, const void*, S*, int64_t, int64_t, S*,
                        S*, S*, S*);

template <DType GD>
TileFn<float> pick_x(DType xd) {
  switch (xd) {
    case DType::f16: return &tile<float, GD, DType::f16>;
    case DType::bf16: return &tile<float, GD, DType::bf16>;
    default: return &tile<float, GD, DType::f32>;
  }
}

TileFn<float> pick(DType gd, DType xd) {
  switch (gd) {
    case DType::f16: return pick_x<DType::f16>(xd);
    case DType::bf16: return pick_x<DType::bf16>(xd);
    default: return pick_x<DType::f32>(xd);
  }
}

// Runs fn over all tiles of acc (p.out x p.in) on num_threads OpenMP threads.
template <class S>
void run_tiles(const SumSqParams& p, TileFn<S> fn, const void* g, const void* x, S* acc,
               int num_threads) {
  constexpr int TO = TileSize<S>::O, TI = TileSize<S>::I;
  const int64_t to = ceil_div(p.out, TO), ti = ceil_div(p.in, TI);
  const int64_t ntiles = to * ti;
  int nt = std::max(1, (int)std::min<int64_t>(num_threads, ntiles));
  struct alignas(64) Bufs {
    S acc_t[TO * TI], m[TO * TI], pa[KC * TO], pb[KC * TI];
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

}  // namespace

void sumsq_outer_cpu(const SumSqParams& p, const void* g, const void* x, float* acc,
                     int num_threads) {
  if (p.B <= 0 || p.R <= 0 || p.T <= 0 || p.out <= 0 || p.in <= 0) return;
  if (p.g_dtype == DType::f64 || p.x_dtype == DType::f64)
    throw std::invalid_argument("sumsq_outer_cpu: g and x must be float32, float16 or bfloat16");
  run_tiles<float>(p, pick(p.g_dtype, p.x_dtype), g, x, acc, num_threads);
}

void sumsq_outer_cpu_f64(const SumSqParams& p, const double* g, const double* x, double* acc,
                         int num_threads) {
  if (p.B <= 0 || p.R <= 0 || p.T <= 0 || p.out <= 0 || p.in <= 0) return;
  if (p.g_dtype != DType::f64 || p.x_dtype != DType::f64)
    throw std::invalid_argument("sumsq_outer_cpu_f64: g and x must be float64");
  run_tiles<double>(p, &tile<double, DType::f64, DType::f64>, g, x, acc, num_threads);
}

}  // namespace hessian
}  // namespace popcomp
