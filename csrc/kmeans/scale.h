// The power-of-two rescaling of badly scaled K-means problems, shared by the CPU solver
// (kmeans_cpu.cpp) and the CUDA kernels (kmeans_cuda.cu), host and device alike.
//
// A problem whose values or weights lie outside [2^-kScaleExp, 2^kScaleExp] in magnitude is
// solved on values and weights scaled by powers of two (exact), so that no sum of squares
// over- or underflows: the optimal labels are invariant to a positive scale of the weights and
// to an affine map of the values. The penalty is rescaled with them (scaled_beta), the centers
// are mapped back by ldexp (or, where no Lloyd step runs, formed in the original coordinates),
// and the cost is summed without over- or underflow (ScaledSumSq) and mapped back.
#pragma once
#include <cfloat>
#include <cmath>

#include "common/hd.h"
#include "kmeans/kmeans.h"
#include "kmeans/kmeans_math.h"

namespace popcomp {
namespace kmeans {

constexpr int kScaleExp = 100;

// Exponent e with 2^(e-1) <= |a| < 2^e (0 for a = 0).
PC_HD int exponent_of(double a) {
  int e = 0;
  frexp(a, &e);
  return a == 0.0 ? 0 : e;
}

// The scale of one problem from its largest |value| and its largest (summed) weight: values
// times 2^ev, weights times 2^ew, powers of two that bring both near 1 when either lies outside
// [2^-kScaleExp, 2^kScaleExp] (both 0 otherwise). A problem is scaled exactly when ev or ew is
// nonzero: a value (weight) exponent outside the range is itself nonzero.
struct RowScale {
  int ev = 0;
  int ew = 0;
  PC_HD bool scaled() const { return ev != 0 || ew != 0; }
};

PC_HD RowScale row_scale(double vmax, double wmax) {
  const int evx = exponent_of(vmax), ewx = exponent_of(wmax);
  const bool scaled = (vmax != 0.0 && (evx > kScaleExp || evx < -kScaleExp)) ||
                      (wmax != 0.0 && (ewx > kScaleExp || ewx < -kScaleExp));
  RowScale s;
  s.ev = scaled && vmax != 0.0 ? -evx : 0;
  s.ew = scaled && wmax != 0.0 ? -ewx : 0;
  return s;
}

// The penalty beta > 0 of the scaled problem, whose objective is the original one times
// 2^(ew + 2 ev): capped at the largest double (update_centers handles a huge beta).
PC_HD double scaled_beta(double beta, Diameter dm, int ev, int ew) {
  const double bs = ldexp(beta, dm == Diameter::squared ? ew : ew + ev);
  return bs <= DBL_MAX ? bs : DBL_MAX;
}

// Sum of r_t^2 without over- or underflow (LAPACK's dnrm2 scaling): the value is
// scale^2 * ssq.
struct ScaledSumSq {
  double scale = 0.0, ssq = 1.0;
  PC_HD void add(double r) {
    r = fabs(r);
    if (r == 0.0) return;
    if (scale < r) {
      const double q = scale / r;
      ssq = 1.0 + ssq * q * q;
      scale = r;
    } else {
      const double q = r / scale;
      ssq += q * q;
    }
  }
  // adds the terms of o (the sum of two partial sums)
  PC_HD void merge(const ScaledSumSq& o) {
    if (o.scale == 0.0) return;
    if (scale < o.scale) {
      const double q = scale / o.scale;
      ssq = o.ssq + ssq * q * q;
      scale = o.scale;
    } else {
      const double q = o.scale / scale;
      ssq += o.ssq * q * q;
    }
  }
  // scale^2 * ssq * 2^e, rounded once at the end (inf only when the value exceeds the range)
  PC_HD double value_times_pow2(int e) const {
    if (scale == 0.0) return 0.0;
    int es = 0;
    const double m = frexp(scale, &es);
    return ldexp(m * m * ssq, 2 * es + e);
  }
};

// The cost of the distinct values [t0, t1) of a scaled problem, in its scaled coordinates and
// without over- or underflow: sum_t (sqrt(W_t) (vo_t 2^ev - cs_l))^2, vo the original values,
// W the scaled weights, cs the sorted centers in the scaled coordinates (from the original
// ones) and l the nearest center of vo_t by the km1 midpoints of the original centers (ties to
// the lower one). The CPU sums a whole problem in sequence; the CUDA kernels sum chunks of
// kSumChunk values and merge them in chunk order.
PC_HD ScaledSumSq scaled_cost_sum(const double* vo, const double* W, int64_t t0, int64_t t1,
                                  int ev, const double* mids, int km1, const double* cs) {
  ScaledSumSq acc;
  for (int64_t t = t0; t < t1; ++t) {
    const double xv = vo[t];
    acc.add(sqrt(W[t]) * (ldexp(xv, ev) - cs[nearest_label(mids, km1, xv)]));
  }
  return acc;
}

// The center of the segment [a, e) of a scaled problem where no Lloyd step runs (the exact
// method at beta = 0): its weighted mean in the original coordinates as a convex combination
// of the original values vo by the (scaled) weights W, summed in sequence: no overflow, and no
// underflow of a cluster of tiny values (the midpoint of its ends when its weight is 0).
PC_HD double convex_mean(const double* vo, const double* W, int64_t a, int64_t e) {
  double H = 0.0;
  for (int64_t t = a; t < e; ++t) H += W[t];
  double m = 0.0;
  if (H > 0.0) {
    for (int64_t t = a; t < e; ++t) m += (W[t] / H) * vo[t];
  } else {
    m = 0.5 * vo[a] + 0.5 * vo[e - 1];
  }
  return m;
}

// c[j] = convex_mean of segment [B[j], B[j + 1]) for the k segments of a partition.
PC_HD void segment_means(const double* v, const double* W, const int64_t* B, int k, double* c) {
  for (int j = 0; j < k; ++j) c[j] = convex_mean(v, W, B[j], B[j + 1]);
}

}  // namespace kmeans
}  // namespace popcomp
