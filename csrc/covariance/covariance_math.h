// Small per-element formulas of spectral pruning shared by the CPU loops and the CUDA kernels.
#pragma once
#include <cstdint>

#include "common/hd.h"

namespace popcomp {
namespace covariance {

// Load element i of a 16/32/64-bit float buffer in the compute type A (float or double).
template <typename A>
PC_HD A load_as(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::f64: return (A) static_cast<const double*>(p)[i];
    case DType::f32: return (A) static_cast<const float*>(p)[i];
    case DType::f16: return (A)half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return (A)bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}

// Decrease of the objective when unit j joins J: n_j / (R_jj + tau_j), where
// n_j = R[:,j]^T M R[:,j]. Units already chosen score -1 (never chosen again). A unit whose
// residual variance vanishes (R_jj <= rel_guard * S_jj) with a ridge at the same rounding
// level or below (tau_j <= rel_guard * S_jj, tau_j = 0 included) scores 0: its numerator is
// then pure rounding noise divided by rounding noise (with a tiny tau_j > 0 the quotient
// could otherwise beat every genuine gain).
PC_HD bool greedy_explained(double diag, double tau, double s_jj, double rel_guard) {
  return tau <= rel_guard * s_jj && diag <= rel_guard * s_jj;
}
PC_HD double greedy_gain(double n, double diag, double tau, double s_jj, double rel_guard,
                         bool chosen) {
  if (chosen) return -1.0;
  const double d = diag + tau;
  if (!(d > 0.0)) return 0.0;
  if (greedy_explained(diag, tau, s_jj, rel_guard)) return 0.0;
  const double g = n / d;
  return g > 0.0 ? g : 0.0;
}

// Pivot R_jj + tau_j of the chosen unit j, or 0 (no rank-one update: R is left as it is) when
// it is not positive or the unit is explained: its residual column is rounding noise, which
// 1/sqrt(pivot) would amplify (without bound for a tiny tau_j > 0) into the residual.
PC_HD double greedy_pivot(double diag, double tau, double s_jj, double rel_guard) {
  const double d = diag + tau;
  return d > 0.0 && !greedy_explained(diag, tau, s_jj, rel_guard) ? d : 0.0;
}

// Argmax with ties to the lowest index.
PC_HD bool better(double v, int64_t i, double bv, int64_t bi) {
  return v > bv || (v == bv && i < bi);
}

// Rank-one update of the numerator n_j = r_j^T M r_j when R loses v v^T:
//   n_j' = n_j - 2 v_j (R M v)_j + v_j^2 (v^T M v).
PC_HD double update_numerator(double n, double vj, double wj, double g) {
  return n - 2.0 * vj * wj + vj * vj * g;
}

// Mapping of a linear index over the upper-triangular tile pairs (I <= J) of a T x T grid.
PC_HD void tri_index(int64_t lin, int64_t T, int64_t* I, int64_t* J) {
  // rows I hold T - I pairs; walk rows (T is small: tiles, not elements)
  int64_t i = 0;
  while (lin >= T - i) {
    lin -= T - i;
    ++i;
  }
  *I = i;
  *J = i + lin;
}

}  // namespace covariance
}  // namespace popcomp
