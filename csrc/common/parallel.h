#pragma once
#if defined(POPCOMP_OPENMP)
#include <omp.h>
#endif

namespace popcomp {
inline int max_threads() {
#if defined(POPCOMP_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}
// Threads of the current parallel region (1 outside one or without OpenMP).
inline int team_size() {
#if defined(POPCOMP_OPENMP)
  return omp_get_num_threads();
#else
  return 1;
#endif
}
inline int thread_id() {
#if defined(POPCOMP_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}
}  // namespace popcomp
