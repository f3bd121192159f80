// Index arithmetic of the CUDA exact DP (kmeans_cuda.cu, phase C): the divide and conquer on
// the monotone argmin of one DP layer, evaluated level by level for all problems at once.
// Host and device alike, so that tests/test_kernel_index_logic.py checks it on the CPU.
//
// Data layout (all problems packed): problem r has u_r = ustart[r+1] - ustart[r] sorted
// distinct values at vs[ustart[r] ..), and prefix sums s0/s1/s2 of length u_r + 1 at
// S*[ustart[r] + r ..) (one extra leading zero per problem). The DP runs on chunks of
// consecutive problems [r0, r1) (as many as the DP workspace budget holds): its D and argmin
// arrays are indexed from the chunk's first value, ustart[r0] (the "local base").
#pragma once
#include <cstdint>

#include "common/hd.h"
#include "kmeans/kmeans_math.h"

namespace popcomp {
namespace kmeans {

struct RowData {
  const int64_t* ustart;  // rows + 1
  const double* vs;
  const double* S0;
  const double* S1;
  const double* S2;
};

PC_HD Prefix row_prefix(const RowData& d, int64_t r, int64_t* base) {
  const int64_t b = d.ustart[r];
  *base = b;
  Prefix P;
  P.v = d.vs + b;
  P.s0 = d.S0 + b + r;
  P.s1 = d.S1 + b + r;
  P.s2 = d.S2 + b + r;
  P.u = d.ustart[r + 1] - b;
  return P;
}

// Recursion levels needed for the rows [m, u-1] of any layer m >= 1 of any problem with at
// most ucap distinct values: floor(log2(max(ucap - 1, 1))) + 1.
PC_HD int dp_levels(int64_t ucap) {
  uint64_t cnt = (uint64_t)(ucap - 1 > 1 ? ucap - 1 : 1);
  int b = 0;
  while (b < 64 && (cnt >> b) != 0) ++b;
  return b;
}

struct DpNode {
  Prefix P;
  int64_t base, lbase, mid, clo, hc;  // base: ustart[r]; lbase: base - ustart[r0]
};

// Node t of recursion level L of problem r = r0 + (id >> L) in layer m (rows [m, u-1] of the
// layer).
// Mirrors the reference: mid = (lo + hi) / 2; left child [lo, mid-1] with columns
// [clo, J(mid)], right child [mid+1, hi] with columns [J(mid), chi]; so clo = J(lo-1),
// chi = J(hi+1) (layer bounds at the ends), and the evaluated columns are [clo, min(chi, mid)].
// Jm holds the argmins of layer m, indexed like vs; rows lo-1 and hi+1 are mids of earlier
// levels; Jm is indexed from the chunk's local base. False when the node does not exist
// (empty range, or k >= u: no DP for problem r).
PC_HD bool dp_node(const RowData& d, const int32_t* Jm, int k, int m, int L, int64_t id,
                   DpNode& nd, int64_t r0 = 0) {
  const int64_t r = r0 + (id >> L);
  const int64_t t = id & (((int64_t)1 << L) - 1);
  nd.P = row_prefix(d, r, &nd.base);
  nd.lbase = nd.base - d.ustart[r0];
  const int64_t u = nd.P.u;
  if ((int64_t)k >= u) return false;
  int64_t lo = m, hi = u - 1;
  for (int b = L - 1; b >= 0; --b) {
    if (lo > hi) return false;
    const int64_t mid = (lo + hi) >> 1;
    if ((t >> b) & 1) lo = mid + 1;
    else hi = mid - 1;
  }
  if (lo > hi) return false;
  nd.mid = (lo + hi) >> 1;
  nd.clo = lo > m ? (int64_t)Jm[nd.lbase + lo - 1] : (int64_t)m;
  const int64_t chi = hi < u - 1 ? (int64_t)Jm[nd.lbase + hi + 1] : u - 1;
  nd.hc = chi < nd.mid ? chi : nd.mid;
  return true;
}

// D_{m-1}(j-1) + cost of the cluster [j, mid] (Dp indexed from the chunk's local base).
PC_HD double dp_val(const DpNode& nd, const double* Dp, int64_t j) {
  return Dp[nd.lbase + j - 1] + seg_cost(nd.P, j, nd.mid + 1);
}

// (val, j) lexicographic: smaller value, ties to the smaller column.
PC_HD bool dp_better(double v1, int64_t j1, double v2, int64_t j2) {
  return v1 < v2 || (v1 == v2 && j1 < j2);
}

// Problems per DP chunk: as many as fit `budget` bytes at dp_row_bytes each (at least one).
PC_HD int64_t dp_chunk_rows(int64_t rows, int64_t row_bytes, int64_t budget) {
  int64_t c = row_bytes > 0 ? budget / row_bytes : rows;
  if (c < 1) c = 1;
  return c < rows ? c : rows;
}

// The boundaries B[0..k] of the optimal k-partition of a problem with u > k distinct values,
// from the argmins of layers 1..k-1 (layer m at J + (m-1) * Uc, indexed from the local base).
PC_HD void dp_backtrack(const int32_t* J, int64_t Uc, int64_t lbase, int64_t u, int k,
                        int64_t* B) {
  B[k] = u;
  int64_t i = u - 1;
  for (int m = k - 1; m >= 1; --m) {
    const int64_t j = J[(int64_t)(m - 1) * Uc + lbase + i];
    B[m] = j;
    i = j - 1;
  }
  B[0] = 0;
}

}  // namespace kmeans
}  // namespace popcomp
