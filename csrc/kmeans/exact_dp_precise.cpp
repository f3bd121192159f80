// The double-double exact DP of 1-D K-means and the check that calls for it (exact_dp_precise.h).
// Error-free transforms (TwoSum, Fast2Sum, TwoProd by fused multiply-add) build prefix sums of
// the exact terms W, W v, W v^2 as double-double numbers; a segment's sums are their differences
// (AccurateDWPlusDW of Joldes, Muller and Popescu: relative error <= 3 u^2 of the exact
// difference of the stored numbers), and its cost q - s^2 / w is evaluated in double-double.
// Each layer is solved by divide and conquer on the monotone argmin, clamped from below by the
// previous layer's argmin (Knuth), split across threads at pivot rows as exact_dp_cpu.cpp does.
#include "kmeans/exact_dp_precise.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/parallel.h"
#include "kmeans/dp_split.h"
#include "kmeans/exact_dp_cpu.h"

// The error-free transforms need every product and sum rounded on its own: no contraction of
// a * b + c into a fused multiply-add behind their back (the fused ones are explicit).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace popcomp {
namespace kmeans {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
// fused multiply-add in hardware where the CPU has it (else the library's fma, exact as well)
#define PC_PRECISE_TARGET __attribute__((target_clones("fma", "default")))
#else
#define PC_PRECISE_TARGET
#endif
#define PC_INLINE inline __attribute__((always_inline))

// s + e = a + b exactly (|e| <= ulp(s) / 2), any a, b.
PC_INLINE void two_sum(double a, double b, double& s, double& e) {
  s = a + b;
  const double bb = s - a;
  e = (a - (s - bb)) + (b - bb);
}
// The same where |a| >= |b| (or a = 0).
PC_INLINE void fast_two_sum(double a, double b, double& s, double& e) {
  s = a + b;
  e = b - (s - a);
}
// p + e = a b exactly (barring underflow).
PC_INLINE void two_prod(double a, double b, double& p, double& e) {
  p = a * b;
  e = std::fma(a, b, -p);
}
// (h, l) = (ah, al) - (bh, bl): AccurateDWPlusDW, relative error <= 3 u^2 of the exact result.
PC_INLINE void dd_sub(double ah, double al, double bh, double bl, double& h, double& l) {
  double s, e, t, f;
  two_sum(ah, -bh, s, e);
  two_sum(al, -bl, t, f);
  e += t;
  fast_two_sum(s, e, s, e);
  e += f;
  fast_two_sum(s, e, h, l);
}
PC_INLINE void dd_add(double ah, double al, double bh, double bl, double& h, double& l) {
  dd_sub(ah, al, -bh, -bl, h, l);
}

// Cost of a segment from its double-double weight, first and second moments:
// q - s^2 / w = q - m s with m = s / w to double-double accuracy; the result to about
// u |result| + 6 u^2 |q|. Zero weight gives zero, rounding below zero is clamped.
PC_INLINE double seg_cost_dd(double wh, double wl, double sh, double sl, double qh, double ql) {
  const double wd = wh > 0.0 ? wh : 1.0;
  const double m0 = sh / wd;
  double p, pe;
  two_prod(m0, wd, p, pe);
  // s - m0 w: sh - p is exact (Sterbenz: p is sh to within 2 ulp)
  const double r = ((sh - p) - pe) + (sl - m0 * wl);
  const double m1 = r / wd;
  double P0, Pe;
  two_prod(m0, sh, P0, Pe);
  const double P1 = Pe + (m0 * sl + m1 * sh);
  const double c = (qh - P0) + (ql - P1);  // qh - P0 exact where they cancel (Sterbenz)
  return wh > 0.0 && c > 0.0 ? c : 0.0;
}

// One layer of the precise DP: D_m(i) = min_{j in [m, i]} d[j] + cost(j, i), d[j] = D_{m-1}(j-1).
struct PLayer {
  const double *w0, *w1, *s0, *s1, *q0, *q1;  // prefix sums (index t: the first t values)
  const double* d;
  const int32_t* Jlow;  // J_{m-1} (Knuth's lower bound) or nullptr
  double* dnext;        // dnext[i + 1] = D_m(i)
  int32_t* J;
};

constexpr int kBlock = 64;

// Row i over columns [max(clo, J_{m-1}(i)), min(chi, i)]: the leftmost least value. Values of a
// block of columns first (independent evaluations), then their minimum.
PC_INLINE void row(const PLayer& L, int64_t i, int64_t clo, int64_t chi) {
  if (chi > i) chi = i;
  if (L.Jlow && L.Jlow[i] > clo) clo = L.Jlow[i] <= chi ? L.Jlow[i] : chi;
  const double aw0 = L.w0[i + 1], aw1 = L.w1[i + 1], as0 = L.s0[i + 1], as1 = L.s1[i + 1],
               aq0 = L.q0[i + 1], aq1 = L.q1[i + 1];
  double best = kInf;
  int64_t bj = clo;
  alignas(64) double vals[kBlock];
  for (int64_t lo = clo; lo <= chi; lo += kBlock) {
    const int n = (int)std::min<int64_t>(kBlock, chi - lo + 1);
    for (int t = 0; t < n; ++t) {
      const int64_t j = lo + t;
      double wh, wl, sh, sl, qh, ql;
      dd_sub(aw0, aw1, L.w0[j], L.w1[j], wh, wl);
      dd_sub(as0, as1, L.s0[j], L.s1[j], sh, sl);
      dd_sub(aq0, aq1, L.q0[j], L.q1[j], qh, ql);
      vals[t] = L.d[j] + seg_cost_dd(wh, wl, sh, sl, qh, ql);
    }
    for (int t = 0; t < n; ++t)
      if (vals[t] < best) {
        best = vals[t];
        bj = lo + t;
      }
  }
  L.dnext[i + 1] = best;
  L.J[i] = (int32_t)bj;
}

// Rows [rlo, rhi] with columns within [clo, chi]: divide and conquer on the monotone argmin
// (explicit stack, the smaller half first: O(log u) deep).
PC_PRECISE_TARGET void solve(const PLayer& L, int64_t rlo, int64_t rhi, int64_t clo,
                             int64_t chi) {
  struct Seg {
    int64_t rlo, rhi, clo, chi;
  };
  Seg stack[72];
  int top = 0;
  stack[top++] = Seg{rlo, rhi, clo, chi};
  while (top > 0) {
    Seg g = stack[--top];
    while (g.rlo <= g.rhi) {
      const int64_t mid = (g.rlo + g.rhi) >> 1;
      row(L, mid, g.clo, g.chi);
      const int64_t jm = L.J[mid];
      if (mid - g.rlo < g.rhi - mid) {
        stack[top++] = Seg{mid + 1, g.rhi, jm, g.chi};
        g = Seg{g.rlo, mid - 1, g.clo, jm};
      } else {
        stack[top++] = Seg{g.rlo, mid - 1, g.clo, jm};
        g = Seg{mid + 1, g.rhi, jm, g.chi};
      }
    }
  }
}

// The first layer: d[i + 1] = cost(0, i).
PC_PRECISE_TARGET void first_layer(const PLayer& L, int64_t u, int T) {
  (void)T;
#if defined(POPCOMP_OPENMP)
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
#endif
  for (int64_t i = 0; i < u; ++i)
    L.dnext[i + 1] = seg_cost_dd(L.w0[i + 1], L.w1[i + 1], L.s0[i + 1], L.s1[i + 1],
                                 L.q0[i + 1], L.q1[i + 1]);
}

}  // namespace

bool fast_partition_trusted(const double* v, const double* W, int64_t u, int k,
                            const int64_t* B, double* c) {
  // One pass: each segment's weight H, sum S and sum of squares Q, summed over the segment.
  // Its cost Q - S^2 / H is then off by about eps Q, below the bound formed from the totals,
  // so where the bound is at most kTrustRatio times the cost, the cost is that accurate.
  double wt = 0.0, s2 = 0.0, D = 0.0;
  for (int j = 0; j < k; ++j) {
    const int64_t a = B[j], e = B[j + 1];
    double H = 0.0, S = 0.0, Q = 0.0;
#if defined(POPCOMP_OPENMP)
#pragma omp simd reduction(+ : H, S, Q)
#endif
    for (int64_t t = a; t < e; ++t) {
      const double hv = W[t] * v[t];
      H += W[t];
      S += hv;
      Q += hv * v[t];
    }
    double m = 0.5 * v[a] + 0.5 * v[e - 1];
    if (H > 0.0) {
      m = S / H;
      const double cj = Q - S * m;
      D += cj > 0.0 ? cj : 0.0;
    }
    c[j] = m;
    wt += H;
    s2 += Q;
  }
  // the largest |value| of positive weight (values of zero weight add nothing to the sums)
  int64_t lo = 0, hi = u - 1;
  while (lo < hi && !(W[lo] > 0.0)) ++lo;
  while (hi > lo && !(W[hi] > 0.0)) --hi;
  const double vmax = std::max(std::fabs(v[lo]), std::fabs(v[hi]));
  const double bound = 0x1p-53 * (wt * vmax * vmax + s2);
  if (!(bound > 0.0)) return true;  // every value where the median is, or no weight
  if (D > 0.0) return bound <= kTrustRatio * D;
  // a cost of zero is optimal where it is no underflow: at most one value of positive weight
  // per segment (zero-weight values, k at least the values of positive weight)
  for (int j = 0; j < k; ++j) {
    int64_t pos = 0;
    for (int64_t t = B[j]; t < B[j + 1]; ++t) pos += W[t] > 0.0;
    if (pos > 1) return false;
  }
  return true;
}

void exact_partition_precise(Work& w, int64_t u, int k, int threads, int ev, double shift,
                             int64_t* B) {
  // prefix sums of the exact terms as double-double numbers, six arrays of u + 1
  w.pdd.resize(6 * (size_t)(u + 1));
  double* P = w.pdd.data();
  const size_t N = (size_t)(u + 1);
  double *w0 = P, *w1 = P + N, *s0 = P + 2 * N, *s1 = P + 3 * N, *q0 = P + 4 * N,
         *q1 = P + 5 * N;
  {
    const double* vo = w.vo.data();
    const double* Wp = w.W.data();
    double a0 = 0.0, a1 = 0.0, b0 = 0.0, b1 = 0.0, c0 = 0.0, c1 = 0.0;
    w0[0] = w1[0] = s0[0] = s1[0] = q0[0] = q1[0] = 0.0;
    for (int64_t t = 0; t < u; ++t) {
      const double x = ev ? std::ldexp(vo[t], ev) : vo[t];  // as Solver::solve scales it
      const double h = Wp[t];
      double hi, lo;  // x - shift = hi + lo exactly
      two_sum(x, -shift, hi, lo);
      double p, e;
      // W v = W hi + W lo
      two_prod(h, hi, p, e);
      fast_two_sum(p, e + h * lo, p, e);
      dd_add(b0, b1, p, e, b0, b1);
      // W v^2 = W (hi^2 + lo (2 hi + lo))
      double sq, se;
      two_prod(hi, hi, sq, se);
      fast_two_sum(sq, se + lo * (2.0 * hi + lo), sq, se);
      two_prod(h, sq, p, e);
      fast_two_sum(p, e + h * se, p, e);
      dd_add(c0, c1, p, e, c0, c1);
      dd_add(a0, a1, h, 0.0, a0, a1);
      w0[t + 1] = a0;
      w1[t + 1] = a1;
      s0[t + 1] = b0;
      s1[t + 1] = b1;
      q0[t + 1] = c0;
      q1[t + 1] = c1;
    }
  }
  w.d.resize(u + 1);
  w.D1.resize(u + 1);
  w.J.resize((size_t)k * u);
  double* d = w.d.data();
  double* dnext = w.D1.data();
#if !defined(POPCOMP_OPENMP)
  threads = 1;
#endif
  const int T = threads > 1 && u - k > 4096 ? threads : 1;
  std::vector<int64_t> piv(split_parts(T) + 1);  // (allocated here: nothing may throw in the region)
  PLayer L{w0, w1, s0, s1, q0, q1, nullptr, nullptr, d, nullptr};
  first_layer(L, u, T);  // into d
  d[0] = kInf;
  for (int m = 1; m < k; ++m) {
    L.d = d;
    L.dnext = dnext;
    L.Jlow = m > 1 ? w.J.data() + (size_t)(m - 1) * u : nullptr;
    L.J = w.J.data() + (size_t)m * u;
    if (m == k - 1) {  // only the last row matters
      solve(L, u - 1, u - 1, m, u - 1);
      break;
    }
    // rows [m, u - 1] (those above u - 1 - (k - 1 - m) cost little and keep J_m defined
    // wherever the next layer reads it as a lower bound)
    const int64_t rlo = m, rhi = u - 1;
    if (worth_splitting(T, rlo, rhi)) {
      solve_split(T, piv.data(), rlo, rhi, rlo, rhi, L.J, [&L](int) {
        return [&L](int64_t r0, int64_t r1, int64_t c0, int64_t c1) { solve(L, r0, r1, c0, c1); };
      });
    } else {
      solve(L, rlo, rhi, rlo, rhi);
    }
    std::swap(d, dnext);
  }
  backtrack(w, u, k, B);
}

}  // namespace kmeans
}  // namespace popcomp
