// CPU backend of the fused squared-gradient accumulation (see hessian.h).
//
// The output (out x in) is cut into TO x TI tiles handed to OpenMP threads. Inside a tile:
//   T == 1: acc_tile += sum_b (sum_r g[b,r,o]^2) * x[b,i]^2, a GEMM over samples on squared,
//           packed operands (chunks of KB samples);
//   T  > 1: for each (b, r): M = sum_t g[b,r,t,:]^T x[b,t,:] on the tile (chunks of KT
//           positions), then acc_tile += M * M.
// Extra memory is a few tile-sized buffers per thread, whatever B, R and T are.
#include <algorithm>
#include <vector>

#include "common/parallel.h"
#include "hessian/hessian.h"
#include "hessian/hessian_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(_WIN32)
#define PC_MULTIVERSION __attribute__((target_clones("arch=haswell", "default")))
#else
#define PC_MULTIVERSION
#endif

namespace popcomp {
namespace hessian {
namespace {

constexpr int TO = 64;  // output rows per tile
constexpr int TI = 64;  // output columns per tile
constexpr int KC = 64;  // samples (T == 1) or positions (T > 1) per packed chunk

// c[TO][TI] += sum_k a[k][o] * b[k][i]  (a: kc x TO, b: kc x TI, packed, zero padded)
PC_MULTIVERSION void rank_k_update(float* __restrict c, const float* __restrict a,
                                   const float* __restrict b, int kc) {
  for (int o = 0; o < TO; o += 4) {
    float* c0 = c + (o + 0) * TI;
    float* c1 = c + (o + 1) * TI;
    float* c2 = c + (o + 2) * TI;
    float* c3 = c + (o + 3) * TI;
    for (int k = 0; k < kc; ++k) {
      const float a0 = a[k * TO + o + 0], a1 = a[k * TO + o + 1];
      const float a2 = a[k * TO + o + 2], a3 = a[k * TO + o + 3];
      const float* bk = b + k * TI;
#pragma omp simd
      for (int i = 0; i < TI; ++i) {
        const float bv = bk[i];
        c0[i] += a0 * bv;
        c1[i] += a1 * bv;
        c2[i] += a2 * bv;
        c3[i] += a3 * bv;
      }
    }
  }
}

PC_MULTIVERSION void add_squares(float* __restrict acc, const float* __restrict m) {
#pragma omp simd
  for (int j = 0; j < TO * TI; ++j) acc[j] += m[j] * m[j];
}

void tile(const SumSqParams& p, const void* g, const void* x, float* acc, int64_t o0,
          int64_t i0, float* acc_t, float* m, float* pa, float* pb) {
  const int no = (int)std::min<int64_t>(TO, p.out - o0);
  const int ni = (int)std::min<int64_t>(TI, p.in - i0);
  std::fill(acc_t, acc_t + TO * TI, 0.f);
  if (p.T == 1) {
    for (int64_t b0 = 0; b0 < p.B; b0 += KC) {
      const int kc = (int)std::min<int64_t>(KC, p.B - b0);
      std::fill(pa, pa + KC * TO, 0.f);
      std::fill(pb, pb + KC * TI, 0.f);
      for (int k = 0; k < kc; ++k) {
        const int64_t b = b0 + k;
        for (int64_t r = 0; r < p.R; ++r) {
          const int64_t base = b * p.g_sb + r * p.g_sr;
          for (int o = 0; o < no; ++o) {
            const float v = load_f(g, p.g_dtype, base + (o0 + o) * p.g_so);
            pa[k * TO + o] += v * v;
          }
        }
        for (int i = 0; i < ni; ++i) {
          const float v = load_f(x, p.x_dtype, b * p.x_sb + (i0 + i) * p.x_si);
          pb[k * TI + i] = v * v;
        }
      }
      rank_k_update(acc_t, pa, pb, kc);
    }
  } else {
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t r = 0; r < p.R; ++r) {
        std::fill(m, m + TO * TI, 0.f);
        for (int64_t t0 = 0; t0 < p.T; t0 += KC) {
          const int kc = (int)std::min<int64_t>(KC, p.T - t0);
          std::fill(pa, pa + KC * TO, 0.f);
          std::fill(pb, pb + KC * TI, 0.f);
          for (int k = 0; k < kc; ++k) {
            const int64_t t = t0 + k;
            const int64_t gb = b * p.g_sb + r * p.g_sr + t * p.g_st;
            for (int o = 0; o < no; ++o) pa[k * TO + o] = load_f(g, p.g_dtype, gb + (o0 + o) * p.g_so);
            const int64_t xb = b * p.x_sb + t * p.x_st;
            for (int i = 0; i < ni; ++i) pb[k * TI + i] = load_f(x, p.x_dtype, xb + (i0 + i) * p.x_si);
          }
          rank_k_update(m, pa, pb, kc);
        }
        add_squares(acc_t, m);
      }
    }
  }
  for (int o = 0; o < no; ++o) {
    float* dst = acc + (o0 + o) * p.in + i0;
    const float* src = acc_t + o * TI;
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
#if defined(POPCOMP_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
  {
    std::vector<float> acc_t(TO * TI), m(TO * TI), pa(KC * TO), pb(KC * TI);
#if defined(POPCOMP_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t t = 0; t < ntiles; ++t) {
      tile(p, g, x, acc, (t / ti) * TO, (t % ti) * TI, acc_t.data(), m.data(), pa.data(),
           pb.data());
    }
  }
  (void)nt;
}

}  // namespace hessian
}  // namespace popcomp
