// Per-problem math of weighted 1-D K-means shared by the CPU loop and the CUDA kernels.
//
// A problem is reduced to u sorted distinct values v[0..u) (shifted by a constant for
// precision) with aggregated weights, and prefix sums s0, s1, s2 of length u+1:
//   s0[t] = sum_{p<t} W_p,  s1[t] = sum_{p<t} W_p v_p,  s2[t] = sum_{p<t} W_p v_p^2.
// Every function here is O(k log u) or O(k^2) per call and runs on host and device alike.
#pragma once
#include <cstdint>

#include "common/hd.h"
#include "kmeans/kmeans.h"

namespace popcomp {
namespace kmeans {

struct Prefix {
  const double* v;
  const double* s0;
  const double* s1;
  const double* s2;
  int64_t u;
};

// Scratch for the per-problem routines below, each array of length k (+1 where noted).
struct Scratch {
  int64_t* B;      // k+1 boundaries
  int64_t* Bprev;  // k+1
  double* H;       // k   cluster weights
  double* S;       // k   cluster weighted sums
  double* prev;    // k   previous centers
  double* cumH;    // k+1
  double* cumS;    // k+1
  int* act;        // k   active cluster indices
};

PC_HD double seg_weight(const Prefix& P, int64_t a, int64_t b) { return P.s0[b] - P.s0[a]; }

// Within-cluster weighted sum of squares of [a, b) around its weighted mean.
PC_HD double seg_cost(const Prefix& P, int64_t a, int64_t b) {
  double w = P.s0[b] - P.s0[a];
  if (!(w > 0.0)) return 0.0;
  double s = P.s1[b] - P.s1[a];
  double c = (P.s2[b] - P.s2[a]) - s * s / w;
  return c > 0.0 ? c : 0.0;
}

// Weighted sum of squares of [a, b) around the point c (stable form).
PC_HD double seg_cost_at(const Prefix& P, int64_t a, int64_t b, double c) {
  double w = P.s0[b] - P.s0[a];
  if (!(w > 0.0)) return 0.0;
  double m = (P.s1[b] - P.s1[a]) / w;
  return seg_cost(P, a, b) + w * (c - m) * (c - m);
}

// First index t in [lo, hi) with a[t] > x (hi if none).
PC_HD int64_t upper_bound_d(const double* a, int64_t lo, int64_t hi, double x) {
  int64_t n = hi - lo;
  while (n > 0) {
    int64_t half = n >> 1;
    if (a[lo + half] <= x) {
      lo += half + 1;
      n -= half + 1;
    } else {
      n = half;
    }
  }
  return lo;
}

// Index of the nearest center for x given the k-1 midpoints of sorted centers; a value on a
// midpoint goes to the lower center. Equals the number of midpoints strictly below x.
PC_HD int nearest_label(const double* mids, int km1, double x) {
  int lo = 0, n = km1;
  while (n > 0) {
    int half = n >> 1;
    if (mids[lo + half] < x) {
      lo += half + 1;
      n -= half + 1;
    } else {
      n = half;
    }
  }
  return lo;
}

PC_HD double diameter_penalty(double d, double beta, Diameter dm) {
  return dm == Diameter::squared ? beta * d * d : beta * d;
}

PC_HD void sort_small(double* c, int k) {
  for (int i = 1; i < k; ++i) {
    double t = c[i];
    int j = i - 1;
    while (j >= 0 && c[j] > t) {
      c[j + 1] = c[j];
      --j;
    }
    c[j + 1] = t;
  }
}

// Exact center update for a fixed assignment (clusters in ascending order of their means):
//   minimize_c  sum_j H_j (c_j - m_j)^2 + penalty(max c - min c),   m_j = S_j / H_j.
// The minimizer clips every mean to an interval [a, b]; (a, b) solves a convex problem whose
// stationarity conditions are linear once the sets of clusters clamped to a (the lowest p)
// and to b (the highest q) are known. Candidates are tried by increasing p + q, so the common
// case (only the extreme clusters move) costs O(1); shrinking past interior centers is the
// case p > 1 or q > 1. Clusters with H_j = 0 keep their previous center, clipped to [a, b].
PC_HD void update_centers(int k, const double* H, const double* S, const double* prev,
                          double beta, Diameter dm, double* c, const Scratch& w) {
  int A = 0;
  for (int j = 0; j < k; ++j) {
    c[j] = prev[j];
    if (H[j] > 0.0) {
      w.act[A++] = j;
      c[j] = S[j] / H[j];
    }
  }
  if (!(beta > 0.0) || A < 2) {
    if (beta > 0.0 && A == 1) {  // one active cluster: its center is the only one that matters
      double m = c[w.act[0]];
      for (int j = 0; j < k; ++j) c[j] = m;
    }
    return;
  }
  w.cumH[0] = 0.0;
  w.cumS[0] = 0.0;
  for (int t = 0; t < A; ++t) {
    w.cumH[t + 1] = w.cumH[t] + H[w.act[t]];
    w.cumS[t + 1] = w.cumS[t] + S[w.act[t]];
  }
  const double mlo = c[w.act[0]], mhi = c[w.act[A - 1]];
  double lo = mlo, hi = mhi;
  if (mhi > mlo) {
    const double eps = 1e-12 * ((mhi > 0 ? mhi : -mhi) + (mlo > 0 ? mlo : -mlo) + (mhi - mlo));
    bool found = false;
    for (int s = 2; s <= A && !found; ++s) {
      for (int p = 1; p < s && !found; ++p) {
        const int q = s - p;
        const double HL = w.cumH[p], SL = w.cumS[p];
        const double HU = w.cumH[A] - w.cumH[A - q], SU = w.cumS[A] - w.cumS[A - q];
        double a, b;
        if (dm == Diameter::squared) {
          if (beta <= 1.0) {
            const double det = HL * HU + beta * (HL + HU);
            a = (SL * (HU + beta) + beta * SU) / det;
            b = (beta * SL + (HL + beta) * SU) / det;
          } else {  // the same, divided by beta: no overflow at huge beta (a = b at the limit)
            const double det = HL * (HU / beta) + (HL + HU);
            a = (SL * (HU / beta + 1.0) + SU) / det;
            b = (SL + (HL / beta + 1.0) * SU) / det;
          }
        } else {
          a = (SL + 0.5 * beta) / HL;
          b = (SU - 0.5 * beta) / HU;
          if (!(a < b)) continue;
        }
        const double m_lastlow = c[w.act[p - 1]], m_firstup = c[w.act[A - q]];
        if (a < m_lastlow - eps || b > m_firstup + eps) continue;
        if (p < A - q) {
          if (a > c[w.act[p]] + eps || b < c[w.act[A - q - 1]] - eps) continue;
        } else if (a > b + eps) {
          continue;
        }
        lo = a;
        hi = b;
        found = true;
      }
    }
    if (!found) {  // every center collapses to the weighted mean (linear penalty, large beta)
      lo = hi = w.cumS[A] / w.cumH[A];
    }
    if (lo > hi) lo = hi = 0.5 * (lo + hi);
  }
  for (int j = 0; j < k; ++j) c[j] = c[j] < lo ? lo : (c[j] > hi ? hi : c[j]);
}

// Boundaries of the nearest-center partition of the sorted values for sorted centers c.
PC_HD void assign_boundaries(const Prefix& P, int k, const double* c, int64_t* B) {
  B[0] = 0;
  B[k] = P.u;
  for (int j = 1; j < k; ++j) {
    B[j] = upper_bound_d(P.v, B[j - 1], P.u, 0.5 * (c[j - 1] + c[j]));
  }
}

PC_HD double objective(const Prefix& P, int k, const int64_t* B, const double* c, double beta,
                       Diameter dm) {
  double f = 0.0;
  for (int j = 0; j < k; ++j) f += seg_cost_at(P, B[j], B[j + 1], c[j]);
  return f + diameter_penalty(c[k - 1] - c[0], beta, dm);
}

// The center half of a Lloyd step: cluster sums of the current boundaries, the exact
// center update, sorted centers; the boundaries are saved to w.Bprev.
PC_HD void lloyd_center_step(const Prefix& P, int k, double* c, double beta, Diameter dm,
                             const Scratch& w) {
  for (int j = 0; j < k; ++j) {
    w.H[j] = P.s0[w.B[j + 1]] - P.s0[w.B[j]];
    w.S[j] = P.s1[w.B[j + 1]] - P.s1[w.B[j]];
    w.prev[j] = c[j];
  }
  update_centers(k, w.H, w.S, w.prev, beta, dm, c, w);
  sort_small(c, k);
  for (int j = 0; j <= k; ++j) w.Bprev[j] = w.B[j];
}

// After the assignment half: updates *f with the new objective fn; true when Lloyd stops
// (assignment unchanged, or relative decrease <= tol).
PC_HD bool lloyd_should_stop(int k, const Scratch& w, double fn, double tol, double* f) {
  bool same = true;
  for (int j = 0; j <= k; ++j) same = same && (w.B[j] == w.Bprev[j]);
  const double dec = *f - fn;
  if (fn < *f) *f = fn;
  return same || (tol > 0.0 && dec <= tol * (fn > 0 ? fn : -fn));
}

// Lloyd iterations (HW K-means; DRHW K-means when beta > 0) on prefix sums: each iteration
// is O(k log u). c holds k centers (any order) on entry and sorted centers on exit. The
// objective never increases: both the assignment and the exact center update are optimal
// for the other fixed. Returns the number of iterations; *obj gets the final objective.
PC_HD int lloyd(const Prefix& P, int k, double* c, double beta, Diameter dm, int max_iter,
                double tol, const Scratch& w, double* obj) {
  sort_small(c, k);
  assign_boundaries(P, k, c, w.B);
  double f = objective(P, k, w.B, c, beta, dm);
  int it = 0;
  while (it < max_iter) {
    lloyd_center_step(P, k, c, beta, dm, w);
    ++it;
    assign_boundaries(P, k, c, w.B);
    if (lloyd_should_stop(k, w, objective(P, k, w.B, c, beta, dm), tol, &f)) break;
  }
  *obj = f;
  return it;
}

// Smallest t in [lo, hi) with s0[t+1] > r (weighted sampling / quantiles on prefix sums).
PC_HD int64_t weighted_pick(const Prefix& P, int64_t lo, int64_t hi, double r) {
  int64_t t = upper_bound_d(P.s0, lo + 1, hi + 1, r) - 1;
  return t < lo ? lo : (t >= hi ? hi - 1 : t);
}

// Center initializations on the sorted values. c gets k sorted centers.
PC_HD void init_linear(const Prefix& P, int k, double* c) {
  const double a = P.v[0], b = P.v[P.u - 1];
  if (k == 1) {
    c[0] = P.s0[P.u] > 0 ? P.s1[P.u] / P.s0[P.u] : 0.5 * (a + b);
    return;
  }
  for (int j = 0; j < k; ++j) c[j] = a + (b - a) * (double)j / (double)(k - 1);
}

PC_HD void init_quantile(const Prefix& P, int k, double* c) {
  const double tot = P.s0[P.u];
  for (int j = 0; j < k; ++j) c[j] = P.v[weighted_pick(P, 0, P.u, tot * (j + 0.5) / k)];
}

// k-means++ (D^2 sampling, weighted by W) in O(k^2 + k log u) using the prefix sums: the mass
// of each nearest-center interval is a prefix-sum expression, and the point inside the
// chosen interval is found by binary search on its (monotone) cumulative mass.
PC_HD void init_kmeanspp(const Prefix& P, int k, double* c, SplitMix64& rng, const Scratch& w) {
  const double tot = P.s0[P.u];
  c[0] = P.v[weighted_pick(P, 0, P.u, rng.uniform() * tot)];
  int m = 1;
  while (m < k) {
    assign_boundaries(P, m, c, w.B);
    double total = 0.0;
    for (int j = 0; j < m; ++j) {
      w.H[j] = seg_cost_at(P, w.B[j], w.B[j + 1], c[j]);
      total += w.H[j];
    }
    if (!(total > 0.0)) break;
    double r = rng.uniform() * total;
    int j = 0;
    while (j < m - 1 && r >= w.H[j]) r -= w.H[j++];
    const int64_t a = w.B[j], b = w.B[j + 1];
    const double cj = c[j];
    int64_t lo = a, n = b - a;  // smallest t in [a, b) with mass(a, t+1) > r
    while (n > 0) {
      int64_t half = n >> 1, t = lo + half;
      double ws = P.s0[t + 1] - P.s0[a], s1 = P.s1[t + 1] - P.s1[a], s2 = P.s2[t + 1] - P.s2[a];
      double mass = s2 - 2.0 * cj * s1 + cj * cj * ws;
      if (mass <= r) {
        lo = t + 1;
        n -= half + 1;
      } else {
        n = half;
      }
    }
    if (lo >= b) lo = b - 1;
    c[m++] = P.v[lo];
    sort_small(c, m);
  }
  for (int j = m; j < k; ++j) c[j] = c[m - 1];
}

}  // namespace kmeans
}  // namespace popcomp
