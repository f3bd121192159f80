// The exact DP of 1-D K-means on the CPU: layer solvers per instruction set, demand mode.
// Each layer's rows are solved by divide and conquer on the monotone argmin (dp_layer.inc,
// compiled once for AVX-512 and once portable with AVX2 clones, picked at run time); large
// problems solve only the band of rows a coarse DP says the answer needs, every skipped row or
// column certified (exact_dp_cpu.h).
#include "kmeans/exact_dp_cpu.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

#include "common/parallel.h"
#include "kmeans/dp_split.h"

namespace popcomp {
namespace kmeans {
namespace {

// Row i's columns [clo, chi] clamped as every layer solver clamps them: at most i, at least
// J_{m-1}(i) (but never above chi).
inline __attribute__((always_inline)) void clamp(const DnC& L, int64_t i, int64_t& clo,
                                                 int64_t& chi) {
  if (chi > i) chi = i;
  if (L.Jlow && L.Jlow[i] > clo) clo = L.Jlow[i] <= chi ? L.Jlow[i] : chi;
}

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define PC_X86_DISPATCH 1
#endif

namespace dp_portable {
#if defined(PC_X86_DISPATCH)
#define PC_LAYER_TARGET __attribute__((target_clones("avx2", "default")))
#else
#define PC_LAYER_TARGET
#endif
constexpr int kBlock = 256;
// Values of a block of columns first (a loop the compiler vectorizes), then their minimum
// with independent chains, then the first column attaining it.
inline __attribute__((always_inline)) void scan(const DnC& L, int64_t i, int64_t lo0, int64_t hi,
                                                double& best, int64_t& bj) {
  const double* __restrict s0 = L.s0;
  const double* __restrict s1 = L.s1;
  const double* __restrict s2 = L.s2;
  const double* __restrict d = L.d;
  const double a0 = s0[i + 1], a1 = s1[i + 1], a2 = s2[i + 1];
  alignas(64) double vals[kBlock];
  for (int64_t lo = lo0; lo <= hi; lo += kBlock) {
    const int n = (int)std::min<int64_t>(kBlock, hi - lo + 1);
    for (int t = 0; t < n; ++t)
      vals[t] = d[lo + t] + seg_cost_dp(a0 - s0[lo + t], a1 - s1[lo + t], a2 - s2[lo + t]);
    double m4[4] = {kInf, kInf, kInf, kInf};
    int t = 0;
    for (; t + 4 <= n; t += 4)
      for (int l = 0; l < 4; ++l) m4[l] = vals[t + l] < m4[l] ? vals[t + l] : m4[l];
    for (; t < n; ++t) m4[0] = vals[t] < m4[0] ? vals[t] : m4[0];
    const double mn = std::min(std::min(m4[0], m4[1]), std::min(m4[2], m4[3]));
    if (mn < best || (mn == best && lo < bj)) {
      int f = 0;
      while (vals[f] != mn) ++f;
      if (mn < best || lo + f < bj) bj = lo + f;
      best = mn;
    }
  }
}
constexpr bool kPairRows = false;
inline void pair4(const DnC&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) {}
// Rows [r1, r2] (at most 8 NV) whose argmins all lie in columns [c0, c1]: one pass over
// those columns with the rows in lanes (a loop the compiler vectorizes), each lane keeping
// the first least value over its row's clamped range. The same values, compared in the same
// column order, as scan() over each row's range.
template <int NV>
inline __attribute__((always_inline)) void group(const DnC& L, int64_t r1, int64_t r2,
                                                 int64_t c0, int64_t c1) {
  constexpr int G = 8 * NV;
  const int n = (int)(r2 - r1 + 1);
  alignas(64) double a0[G], a1[G], a2[G], best[G];
  alignas(64) int64_t lo[G], hi[G], bj[G];
  for (int t = 0; t < G; ++t) {
    const int64_t i = r1 + (t < n ? t : n - 1);
    a0[t] = L.s0[i + 1];
    a1[t] = L.s1[i + 1];
    a2[t] = L.s2[i + 1];
    int64_t clo = c0, chi = c1;
    clamp(L, i, clo, chi);
    lo[t] = clo;
    hi[t] = chi;
    best[t] = kInf;
    bj[t] = clo;
  }
  for (int64_t c = c0; c <= c1; ++c) {
    const double e0 = L.s0[c], e1 = L.s1[c], e2 = L.s2[c], dc = L.d[c];
    for (int t = 0; t < G; ++t) {
      const double v = dc + seg_cost_dp(a0[t] - e0, a1[t] - e1, a2[t] - e2);
      const bool lt = c >= lo[t] && c <= hi[t] && v < best[t];
      best[t] = lt ? v : best[t];
      bj[t] = lt ? c : bj[t];
    }
  }
  for (int t = 0; t < n; ++t) {
    L.dnext[r1 + t + 1] = best[t];
    L.J[r1 + t] = (int32_t)bj[t];
  }
}
#include "kmeans/dp_layer.inc"
#undef PC_LAYER_TARGET
}  // namespace dp_portable

#if defined(PC_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl")
namespace dp_avx512 {
#define PC_LAYER_TARGET
// Segment costs of eight (w, s, q) at once, as seg_cost_dp: zero weight gives zero, rounding
// below zero is clamped.
inline __attribute__((always_inline)) __m512d seg_cost8(__m512d w, __m512d s, __m512d q) {
  const __m512d zero = _mm512_setzero_pd();
  w = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(w, zero, _CMP_GT_OQ), _mm512_set1_pd(1.0), w);
  return _mm512_max_pd(_mm512_sub_pd(q, _mm512_div_pd(_mm512_mul_pd(s, s), w)), zero);
}
// Eight columns a step in registers: running minimum and its column per lane (strict <
// keeps the first), a masked final step, then the least column among the lanes at the
// minimum. No stores and no second pass; rows of at most 4 columns take one 4-wide step.
inline __attribute__((always_inline)) void scan(const DnC& L, int64_t i, int64_t lo, int64_t hi,
                                                double& best_out, int64_t& bj_out) {
  if (hi < lo) return;
  if (hi - lo < 4) {  // most rows: one 4-wide step (half the divider time of an 8-wide one)
    const __mmask8 m = (__mmask8)((1u << (hi - lo + 1)) - 1);
    const __m256d zero4 = _mm256_setzero_pd(), one4 = _mm256_set1_pd(1.0),
                  inf4 = _mm256_set1_pd(kInf);
    __m256d w = _mm256_sub_pd(_mm256_set1_pd(L.s0[i + 1]), _mm256_mask_loadu_pd(one4, m, L.s0 + lo));
    const __m256d s = _mm256_sub_pd(_mm256_set1_pd(L.s1[i + 1]), _mm256_maskz_loadu_pd(m, L.s1 + lo));
    const __m256d q = _mm256_sub_pd(_mm256_set1_pd(L.s2[i + 1]), _mm256_maskz_loadu_pd(m, L.s2 + lo));
    w = _mm256_mask_blend_pd(_mm256_cmp_pd_mask(w, zero4, _CMP_GT_OQ), one4, w);
    const __m256d c = _mm256_max_pd(_mm256_sub_pd(q, _mm256_div_pd(_mm256_mul_pd(s, s), w)), zero4);
    const __m256d v = _mm256_mask_blend_pd(
        m, inf4, _mm256_add_pd(_mm256_mask_loadu_pd(inf4, m, L.d + lo), c));
    alignas(32) double vv[4];
    _mm256_store_pd(vv, v);
    int f = 0;
    for (int t = 1; t < 4; ++t) f = vv[t] < vv[f] ? t : f;
    if (vv[f] < best_out || (vv[f] == best_out && lo + f < bj_out)) {
      best_out = vv[f];
      bj_out = lo + f;
    }
    return;
  }
  const __m512d a0 = _mm512_set1_pd(L.s0[i + 1]), a1 = _mm512_set1_pd(L.s1[i + 1]),
                a2 = _mm512_set1_pd(L.s2[i + 1]);
  const __m512d one = _mm512_set1_pd(1.0), inf = _mm512_set1_pd(kInf);
  __m512d best = inf;
  __m512i bidx = _mm512_setzero_si512();
  __m512i idx = _mm512_add_epi64(_mm512_set1_epi64(lo), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  auto step = [&](__mmask8 m, int64_t j) {
    const __m512d c = seg_cost8(_mm512_sub_pd(a0, _mm512_mask_loadu_pd(one, m, L.s0 + j)),
                                _mm512_sub_pd(a1, _mm512_maskz_loadu_pd(m, L.s1 + j)),
                                _mm512_sub_pd(a2, _mm512_maskz_loadu_pd(m, L.s2 + j)));
    const __m512d v = _mm512_add_pd(_mm512_mask_loadu_pd(inf, m, L.d + j), c);
    const __mmask8 lt = _mm512_mask_cmp_pd_mask(m, v, best, _CMP_LT_OQ);
    best = _mm512_mask_blend_pd(lt, best, v);
    bidx = _mm512_mask_blend_epi64(lt, bidx, idx);
    idx = _mm512_add_epi64(idx, _mm512_set1_epi64(8));
  };
  int64_t j = lo;
  for (; j + 8 <= hi + 1; j += 8) step((__mmask8)0xff, j);
  if (j <= hi) step((__mmask8)((1u << (hi - j + 1)) - 1), j);
  const double mn = _mm512_reduce_min_pd(best);
  const __mmask8 at = _mm512_cmp_pd_mask(best, _mm512_set1_pd(mn), _CMP_EQ_OQ);
  const int64_t col = _mm512_mask_reduce_min_epi64(at, bidx);
  if (mn < best_out || (mn == best_out && col < bj_out)) {
    best_out = mn;
    bj_out = col;
  }
}
// Two rows of at most four columns each in one 8-wide step: row i1 in lanes 0-3 over
// [lo1, hi1], row i2 in lanes 4-7 over [lo2, hi2]; each half's least value and its first lane
// give D_m and the leftmost argmin, bit for bit what the 4-wide step of scan() gives.
constexpr bool kPairRows = true;
inline __attribute__((always_inline)) __m512d two(__m256d lo, __m256d hi) {
  return _mm512_insertf64x4(_mm512_castpd256_pd512(lo), hi, 1);
}
inline __attribute__((always_inline)) void pair4(const DnC& L, int64_t i1, int64_t lo1,
                                                 int64_t hi1, int64_t i2, int64_t lo2,
                                                 int64_t hi2) {
  const __mmask8 m1 = (__mmask8)((1u << (hi1 - lo1 + 1)) - 1);
  const __mmask8 m2 = (__mmask8)((1u << (hi2 - lo2 + 1)) - 1);
  const __mmask8 m = (__mmask8)(m1 | (m2 << 4));
  const __m256d one4 = _mm256_set1_pd(1.0), inf4 = _mm256_set1_pd(kInf);
  const __m512d a0 = two(_mm256_set1_pd(L.s0[i1 + 1]), _mm256_set1_pd(L.s0[i2 + 1]));
  const __m512d a1 = two(_mm256_set1_pd(L.s1[i1 + 1]), _mm256_set1_pd(L.s1[i2 + 1]));
  const __m512d a2 = two(_mm256_set1_pd(L.s2[i1 + 1]), _mm256_set1_pd(L.s2[i2 + 1]));
  const __m512d inf = _mm512_set1_pd(kInf);
  const __m512d c = seg_cost8(_mm512_sub_pd(a0, two(_mm256_mask_loadu_pd(one4, m1, L.s0 + lo1),
                                                   _mm256_mask_loadu_pd(one4, m2, L.s0 + lo2))),
                              _mm512_sub_pd(a1, two(_mm256_maskz_loadu_pd(m1, L.s1 + lo1),
                                                   _mm256_maskz_loadu_pd(m2, L.s1 + lo2))),
                              _mm512_sub_pd(a2, two(_mm256_maskz_loadu_pd(m1, L.s2 + lo1),
                                                   _mm256_maskz_loadu_pd(m2, L.s2 + lo2))));
  const __m512d dv = two(_mm256_mask_loadu_pd(inf4, m1, L.d + lo1), _mm256_mask_loadu_pd(inf4, m2, L.d + lo2));
  const __m512d v = _mm512_mask_blend_pd(m, inf, _mm512_add_pd(dv, c));
  // least value of each half in all its lanes, then the first lane holding it
  __m512d t = _mm512_min_pd(v, _mm512_permutex_pd(v, 0x4e));
  t = _mm512_min_pd(t, _mm512_permute_pd(t, 0x55));
  const unsigned eq = (unsigned)_mm512_cmp_pd_mask(v, t, _CMP_EQ_OQ);
  L.dnext[i1 + 1] = _mm512_cvtsd_f64(t);
  L.dnext[i2 + 1] = _mm256_cvtsd_f64(_mm512_extractf64x4_pd(t, 1));
  L.J[i1] = (int32_t)(lo1 + (__builtin_ctz((eq & 0xfu) | 0x10u) & 3));
  L.J[i2] = (int32_t)(lo2 + (__builtin_ctz((eq >> 4) | 0x10u) & 3));
}
// Rows [r1, r2] (at most 8 NV) whose argmins all lie in columns [c0, c1]: the rows in the
// lanes of NV vectors, one step per column (its data broadcast), each lane keeping the first
// least value over its row's clamped range (strict <, columns ascending): the values and
// order of scan() over each row's range. About one evaluation per row and column of the
// shared range, with no per-row reduction or branch.
template <int NV>
inline __attribute__((always_inline)) void group(const DnC& L, int64_t r1, int64_t r2,
                                                 int64_t c0, int64_t c1) {
  __mmask8 rm[NV];
  __m512d a0[NV], a1[NV], a2[NV], best[NV];
  __m512i lo[NV], hi[NV], bj[NV];
  for (int h = 0; h < NV; ++h) {
    const int64_t f = r1 + 8 * h;  // first row of these lanes
    const int64_t nr = r2 - f + 1;
    rm[h] = (__mmask8)(nr >= 8 ? 0xffu : nr > 0 ? (1u << nr) - 1 : 0u);
    a0[h] = _mm512_maskz_loadu_pd(rm[h], L.s0 + f + 1);
    a1[h] = _mm512_maskz_loadu_pd(rm[h], L.s1 + f + 1);
    a2[h] = _mm512_maskz_loadu_pd(rm[h], L.s2 + f + 1);
    const __m512i rows =
        _mm512_add_epi64(_mm512_set1_epi64(f), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
    // each row's columns clamped as clamp() does: [min(max(c0, J_{m-1}(i)), hi), hi],
    // hi = min(c1, i)
    hi[h] = _mm512_min_epi64(_mm512_set1_epi64(c1), rows);
    lo[h] = _mm512_set1_epi64(c0);
    if (L.Jlow)
      lo[h] = _mm512_max_epi64(
          lo[h], _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(rm[h], L.Jlow + f)));
    lo[h] = _mm512_min_epi64(lo[h], hi[h]);
    best[h] = _mm512_set1_pd(kInf);
    bj[h] = lo[h];
  }
  for (int64_t c = c0; c <= c1; ++c) {
    const __m512i cv = _mm512_set1_epi64(c);
    const __m512d e0 = _mm512_set1_pd(L.s0[c]), e1 = _mm512_set1_pd(L.s1[c]),
                  e2 = _mm512_set1_pd(L.s2[c]), dc = _mm512_set1_pd(L.d[c]);
    for (int h = 0; h < NV; ++h) {
      const __m512d v = _mm512_add_pd(
          dc, seg_cost8(_mm512_sub_pd(a0[h], e0), _mm512_sub_pd(a1[h], e1),
                        _mm512_sub_pd(a2[h], e2)));
      const __mmask8 in = _mm512_cmp_epi64_mask(lo[h], cv, _MM_CMPINT_LE) &
                          _mm512_cmp_epi64_mask(hi[h], cv, _MM_CMPINT_NLT);
      const __mmask8 lt = _mm512_mask_cmp_pd_mask(in, v, best[h], _CMP_LT_OQ);
      best[h] = _mm512_mask_blend_pd(lt, best[h], v);
      bj[h] = _mm512_mask_blend_epi64(lt, bj[h], cv);
    }
  }
  for (int h = 0; h < NV; ++h) {
    _mm512_mask_storeu_pd(L.dnext + r1 + 8 * h + 1, rm[h], best[h]);
    _mm256_mask_storeu_epi32(L.J + r1 + 8 * h, rm[h], _mm512_cvtepi64_epi32(bj[h]));
  }
}
#include "kmeans/dp_layer.inc"
#undef PC_LAYER_TARGET
}  // namespace dp_avx512
#pragma GCC pop_options
#endif

// Smallest row x in [lo, hi] with J[x] >= target (J non-decreasing there), or hi + 1.
int64_t first_at_least(const int32_t* J, int64_t lo, int64_t hi, int64_t target) {
  return std::lower_bound(J + lo, J + hi + 1, target,
                          [](int32_t j, int64_t t) { return (int64_t)j < t; }) - J;
}

// demand_hint's coarse problem and margins (exact_dp_cpu.h):
constexpr int64_t kGroup = 32;
constexpr int64_t kMarginRows = 3 * kGroup;  // margin: this many rows or 1/16 of the cluster
constexpr double kCoarseSlack = 4;   // the coarse DP's own upper demands: this many times wider

}  // namespace

std::vector<std::pair<const char*, LayerFn>> layer_solvers() {
  std::vector<std::pair<const char*, LayerFn>> s{{"portable", &dp_portable::solve}};
#if defined(PC_X86_DISPATCH)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
    s.push_back({"avx512", &dp_avx512::solve});
#endif
  return s;
}

LayerFn layer_solver() {
  static const LayerFn f = layer_solvers().back().second;
  return f;
}

bool dp_layers(Work& w, int64_t u, int k, int threads, const int64_t* G,
               const int64_t* X, LayerValues* out, int* why) {
  auto refuse = [why](int r) {
    if (why) *why = r;
    return false;
  };
  const double* s0 = w.s0.data();
  const double* s1 = w.s1.data();
  const double* s2 = w.s2.data();
  const LayerFn solve = layer_solver();
  w.d.resize(u + 1);
  w.D1.resize(u + 1);
  w.J.resize((size_t)k * u);
  double* d = w.d.data();
  double* dnext = w.D1.data();
#if !defined(POPCOMP_OPENMP)
  threads = 1;  // the row split below needs a team of threads
#endif
  const int T = threads > 1 && u - k > 16384 ? threads : 1;
  d[0] = kInf;
#if defined(POPCOMP_OPENMP)
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
#endif
  for (int64_t i = 0; i < u; ++i) d[i + 1] = seg_cost_dp(s0[i + 1], s1[i + 1], s2[i + 1]);
  const int64_t nb = u / kPB;
  w.blocks.resize(4 * (size_t)nb + (size_t)T * (nb + 1));
  double* bd = w.blocks.data();
  double* b0 = bd + nb;
  double* b1 = b0 + nb;
  double* b2 = b1 + nb;
  for (int64_t b = 0; b < nb; ++b) {
    b0[b] = s0[b * kPB + kPB - 1];
    b1[b] = s1[b * kPB + kPB - 1];
    b2[b] = s2[b * kPB + kPB - 1];
  }
  // The prefix sums are in coordinates centred on the median; their rounding bounds that of
  // any segment cost or DP value.
  const double margin = 1e-12 * (std::fabs(s2[u]) + std::fabs(s1[u]) + 1e-300);
  int64_t Lprev = 0;    // lowest solved row of the previous layer (the base layer: all rows)
  int64_t Hprev = u - 1;  // its highest solved row
  int64_t top = u - 1;  // highest row of the previous layer known exact
  double Ttop = kInf;   // D of that row less the margin (the base layer: no cap)
  for (int m = 1; m < k; ++m) {
    const int64_t rfull = u - 1 - (k - 1 - m);  // the layer's last row
    const int64_t rhi = X && m < k - 1 ? std::min(rfull, X[m]) : rfull;
    const int32_t* Jprev = m > 1 ? w.J.data() + (size_t)(m - 1) * u : nullptr;
    int64_t rlo = m, clo = m;
    if (G) {
      if (Lprev + 1 > m) {  // columns below Lprev + 1 were skipped
        clo = Lprev + 1;
        // (the previous layer's argmins are set up to row rhi; past its last solved row
        // Hprev they are only lower bounds)
        const int64_t xhi = std::min(rfull - 1, rhi);
        if (xhi < Lprev) return refuse(3);  // the upper demand below the lower one
        rlo = first_at_least(Jprev, Lprev, xhi, clo);
        if (rlo > xhi) return refuse(Hprev < xhi ? 3 : 1);
      }
      if (m < k - 1 && G[m] > rlo) rlo = G[m];
      if (rlo > rhi) return refuse(rhi < rfull || Hprev < rfull - 1 ? 3 : 1);
    }
    const int64_t cap = std::min(top + 1, rfull);  // columns j <= cap: D_{m-1}(j-1) exact
    const int64_t chi = std::min(rhi, cap);
    for (int64_t b = clo / kPB; b < nb && b * kPB <= chi; ++b) bd[b] = d[b * kPB];
    DnC L{s0, s1, s2, d, Jprev, dnext, w.J.data() + (size_t)m * u, nb > 0 ? bd : nullptr,
          b0, b1, b2, b2 + nb, margin};
    if (m == k - 1) {  // only the last row matters
      solve(L, u - 1, u - 1, clo, chi);
      if (u - 1 > cap && !(dnext[u] <= Ttop)) return refuse(2);
      if (out) {
        out->D[(size_t)m * u + u - 1] = dnext[u];
        out->top[m] = u - 1;
      }
      break;
    }
    if (worth_splitting(T, rlo, rhi)) {
      // split the rows at pivots solved first; the parts between them are independent
      std::vector<int64_t> piv(split_parts(T) + 1);
      solve_split(T, piv.data(), rlo, rhi, clo, chi, L.J, [&](int tid) {
        DnC Lt = L;
        Lt.lb = L.lb + (size_t)tid * (nb + 1);
        return [Lt, solve](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
          solve(Lt, r0, r1, c0, c1);
        };
      });
    } else {
      solve(L, rlo, rhi, clo, chi);
    }
    // the rows known exact: all up to the cap, then while D_m stays at most Ttop
    int64_t x = rhi;
    if (rhi > cap) {
      int64_t i = std::max(rlo, cap + 1);
      while (i <= rhi && dnext[i + 1] <= Ttop) ++i;
      x = i - 1;
      if (x < rlo) return refuse(2);
    }
    // The next layer reads J_m as its Knuth lower bound at rows up to its own last row, past
    // those solved here: give them J_m(rhi), a lower bound of theirs, not what an earlier
    // problem left in the reused workspace.
    const int64_t rnext = X && m + 1 < k - 1 ? std::min(rfull + 1, X[m + 1]) : rfull + 1;
    for (int64_t i = rhi + 1; i <= rnext && i < u; ++i) L.J[i] = L.J[rhi];
    if (out) {
      for (int64_t i = rlo; i <= rhi; ++i) out->D[(size_t)m * u + i] = dnext[i + 1];
      out->top[m] = x;
    }
    Hprev = rhi;
    top = x;
    Ttop = dnext[x + 1] - margin;
    // D_m becomes d of the next layer, which reads it at rows [rlo, top] only
    std::swap(d, dnext);
    Lprev = rlo;
  }
  return true;
}

bool demand_hint(Work& w, int64_t u, int k, int threads, int64_t* G, int64_t* X,
                 double slack) {
  const int64_t E = std::min<int64_t>(4 * (int64_t)k, u / 8);
  std::vector<int64_t> start;  // first value of each coarse element
  start.reserve(2 * E + u / kGroup + 2);
  for (int64_t f = 0; f < E; ++f) start.push_back(f);
  for (int64_t f = E; f < u - E; f += kGroup) start.push_back(f);
  for (int64_t f = u - E; f < u; ++f) start.push_back(f);
  const int64_t uc = (int64_t)start.size();
  start.push_back(u);
  if (uc < 8 * (int64_t)k || uc * 4 > u) return false;
  if (!w.coarse) w.coarse = std::make_unique<Work>();
  Work& c = *w.coarse;  // kept with w: fresh pages would cost more than the coarse DP
  c.s0.resize(uc + 1);
  c.s1.resize(uc + 1);
  c.s2.resize(uc + 1);
  for (int64_t t = 0; t <= uc; ++t) {  // prefix sums at the element edges: exact segment costs
    c.s0[t] = w.s0[start[t]];
    c.s1[t] = w.s1[start[t]];
    c.s2[t] = w.s2[start[t]];
  }
  c.Dl.resize((size_t)k * uc);
  c.top.assign(k, -1);
  const double* Dc = c.Dl.data();
  const int64_t* top = c.top.data();
  LayerValues vals{c.Dl.data(), c.top.data()};
  // in demand mode itself where it is large enough, with upper demands wide enough for the
  // rows X below is drawn from to be among those it knows exact
  solve_layers(c, uc, k, threads, &vals, kCoarseSlack * slack);
  std::vector<int64_t> chain(k);  // the coarse backtrack's row of each layer
  int64_t x = uc - 2;
  for (int m = k - 2; m >= 1; --m) {
    const int64_t rh = uc - 1 - (k - 1 - m);
    if (x > rh) x = rh;
    chain[m] = x;
    const int64_t jc = c.J[(size_t)m * uc + x];  // coarse start of the last cluster
    const int64_t len = start[x + 1] - start[jc];
    const int64_t g = start[jc] - 1 - std::max<int64_t>(kMarginRows, len / 16);
    G[m] = g > m ? g : m;
    x = jc - 1;
  }
  double tau = Dc[(size_t)(k - 1) * uc + uc - 1];  // >= D_{k-1}(u - 1)
  for (int m = k - 2; m >= 1; --m) {
    const int64_t rh = uc - 1 - (k - 1 - m);
    const int64_t rt = std::min(rh, top[m]);  // the coarse rows known exact end here
    const double* Dm = Dc + (size_t)m * uc;
    const double target = tau + slack * std::fabs(tau);
    // the first coarse row from the chain up whose D reaches the target (D non-decreasing)
    const int64_t r = chain[m] > rt ? rt + 1
                      : std::partition_point(Dm + chain[m], Dm + rt + 1,
                                             [&](double v) { return v < target; }) - Dm;
    if (r > rt) {  // not reached: the layer's every row; past the coarse top row (a
      X[m] = u;    // single value) D_m is bounded by nothing known here
      tau = rt == rh ? Dm[rh] : kInf;
    } else {
      X[m] = start[r + 1] - 1;
      tau = Dm[r];  // >= D_m(X[m])
    }
  }
  return true;
}

void solve_layers(Work& w, int64_t u, int k, int threads, LayerValues* out, double slack) {
  if (k >= 3 && u >= kDemandMin) {
    std::vector<int64_t> G(k, 0), X(k, 0);
    if (demand_hint(w, u, k, threads, G.data(), X.data(), slack)) {
      int why = 2;
      if (dp_layers(w, u, k, threads, G.data(), X.data(), out, &why)) return;
      const int first = why;
      // lower demands too high (tight, well separated clusters): the upper ones alone
      if (first != 2 && dp_layers(w, u, k, threads, nullptr, X.data(), out)) return;
      // upper demands too low: the lower ones alone (not when those were to blame)
      if (first != 1 && dp_layers(w, u, k, threads, G.data(), nullptr, out)) return;
    }
  }
  dp_layers(w, u, k, threads, nullptr, nullptr, out);
}

void backtrack(const Work& w, int64_t u, int k, int64_t* B) {
  B[k] = u;
  int64_t i = u - 1;
  for (int m = k - 1; m >= 1; --m) {
    const int64_t j = w.J[(size_t)m * u + i];
    B[m] = j;
    i = j - 1;
  }
  B[0] = 0;
}

void exact_partition(Work& w, int64_t u, int k, int threads, int64_t* B) {
  solve_layers(w, u, k, threads);
  backtrack(w, u, k, B);
}

}  // namespace kmeans
}  // namespace popcomp
