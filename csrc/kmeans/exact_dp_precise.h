// The exact DP of 1-D K-means in double-double arithmetic: the check that says when the float64
// DP (exact_dp_cpu.h) cannot be trusted, and the slower DP that replaces it there.
//
// The float64 DP evaluates cost(a, b) = (s2[b] - s2[a]) - (s1[b] - s1[a])^2 / (s0[b] - s0[a])
// from prefix sums: each evaluation has an absolute error of about
//   eps (W v_max^2 + S2)       (eps = 2^-53; W, S2: total weight and sum of W v^2; v_max the
//                               largest |value| of positive weight, all centred on the median),
// so its partition is optimal to within a few such errors per cluster (in practice far less:
// much of the error is common to the partitions compared). Where that is not negligible next to
// the optimum D itself (badly scaled data: a few values ~1e6 times the rest, weights spread
// over ~1e10, or k close to the number of distinct values), the partition can be measurably
// above the optimum. The precise DP keeps the prefix sums as double-double numbers (the exact
// difference value - median, the exact products W v and W v^2) and evaluates each cost in
// double-double, which shrinks that error to about 2^-104 (W v_max^2 + S2): exact to rounding
// by that bound up to a ratio (W v_max^2 + S2) / D of about 1e16, and on every test case up to
// 1e24 (values 1e7 times the rest with weights spread over 1e10).
#pragma once
#include <cstdint>

#include "kmeans/workspace.h"

namespace popcomp {
namespace kmeans {

// The float64 DP's partition is trusted when eps (W v_max^2 + S2) <= kTrustRatio D, D its cost
// (from sums over each segment, not from prefix sums). Calibrated in tests/test_kmeans.py
// ("badly scaled data"): on ordinary rows (Gaussian, Laplace, Student-t, weight rows with
// 50-sigma outliers, k <= 256, up to 1e6 values, weights spread over 1e2) the ratio stays below
// about 2e-8 (it can reach ~1e-5 where k is close to u, which the precise DP then solves at
// little cost); on near-ties built to defeat it, the float64 DP's excess over the optimum was
// at most about a tenth of the ratio.
constexpr double kTrustRatio = 1e-6;

// Whether the partition B[0..k] of the u sorted centred values v with weights W (k < u), found
// by the float64 DP, is optimal to rounding: false when the bound above says it may not be.
// Also writes c[j], the weighted mean of segment j summed over the segment (not from prefix
// sums, which lose digits on badly scaled data; the midpoint of a segment of zero weight):
// one pass over the values.
bool fast_partition_trusted(const double* v, const double* W, int64_t u, int k,
                            const int64_t* B, double* c);

// Optimal boundaries B[0..k] of the u sorted distinct values into k contiguous clusters (k < u),
// by the DP in double-double arithmetic. The centred values are formed exactly from the
// values x_t 2^ev (x: w.vo, the original values; ev: the power of two of the scaled problem, 0
// if none) less shift, with the weights w.W. Uses w.pdd (the prefix sums), w.d, w.D1, w.J.
void exact_partition_precise(Work& w, int64_t u, int k, int threads, int ev, double shift,
                             int64_t* B);

}  // namespace kmeans
}  // namespace popcomp
