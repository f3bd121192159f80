// The rows of one layer of the exact K-means DP split across threads at pivot rows, shared by
// the float64 DP (exact_dp_cpu.cpp) and the double-double one (exact_dp_precise.cpp).
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/parallel.h"

namespace popcomp {
namespace kmeans {

// Parts of a layer's rows for T threads: 8 per thread, a power of two (taken as threads come
// free).
inline int split_parts(int T) {
  int P = 8;
  while (P < 8 * T) P *= 2;
  return P;
}

// Whether rows [rlo, rhi] are worth splitting across T threads.
inline bool worth_splitting(int T, int64_t rlo, int64_t rhi) {
  return T > 1 && rhi - rlo + 1 >= 64 * (int64_t)split_parts(T);
}

// Rows [rlo, rhi] of a layer, their argmins within columns [clo, chi], split into
// P = split_parts(T) parts at P - 1 pivot rows: the pivots first, coarse to fine (the argmin of
// each lies between those of its solved neighbours at -h and +h, the argmin being monotone in
// the row), then the parts between them, independent of each other. make(thread) gives each
// thread its solver, called as solve(r0, r1, c0, c1) for rows [r0, r1] and columns [c0, c1];
// J: the layer's argmins, written by the solvers. piv: P + 1 entries of the caller's (nothing
// here allocates: no exception can start inside the parallel region).
template <class MakeSolver>
void solve_split(int T, int64_t* piv, int64_t rlo, int64_t rhi, int64_t clo, int64_t chi,
                 const int32_t* J, MakeSolver make) {
  const int P = split_parts(T);
  piv[0] = rlo - 1;
  piv[P] = rhi + 1;
  for (int q = 1; q < P; ++q) piv[q] = rlo + (rhi - rlo + 1) * q / P;
  (void)T;
#if defined(POPCOMP_OPENMP)
#pragma omp parallel num_threads(T)
#endif
  {
    auto solve = make(thread_id());
    for (int h = P / 2; h >= 1; h >>= 1) {
#if defined(POPCOMP_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
      for (int q = h; q < P; q += 2 * h) {
        const int64_t c0 = q - h == 0 ? clo : J[piv[q - h]];
        const int64_t c1 = q + h == P ? std::min(piv[q], chi) : J[piv[q + h]];
        solve(piv[q], piv[q], c0, c1);
      }
    }
#if defined(POPCOMP_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
    for (int q = 0; q < P; ++q) {
      const int64_t c0 = q == 0 ? clo : J[piv[q]];
      const int64_t c1 = q == P - 1 ? chi : J[piv[q + 1]];
      solve(piv[q] + 1, piv[q + 1] - 1, c0, c1);
    }
  }
}

}  // namespace kmeans
}  // namespace popcomp
