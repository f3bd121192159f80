// Spectral pruning kernels (Suzuki et al. 2020, sec. 2.1): covariance accumulation and the
// greedy selection of the most informative units. Torch-free interface: raw pointers, sizes,
// dtype codes (common/hd.h) and, for CUDA, an explicit device and stream.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/hd.h"

namespace popcomp {
namespace covariance {

// ---- covariance accumulation -------------------------------------------------------------
// Samples are given as a strided 3-D view (B, S, m): element (b, s, c) of the sample
// n = b * S + s and channel c is at x + b*sB + s*sS + c*sm (strides in elements). A plain
// (N, m) matrix is B = 1, S = N; a Conv2d input (B, C, H, W) is S = H*W with sm = H*W
// (NCHW) or sm = 1 (channels last), so no copy of the activations is ever made.
//   acc (m x m, contiguous, f32 or f64) += sum_n x_n x_n^T
// The products are formed and summed in the accumulator type (the 16-bit inputs are
// converted on load, panel by panel). acc is updated in both triangles; only the products
// with i <= j are computed.
struct AccumParams {
  int64_t B = 1, S = 0, m = 0;
  int64_t sB = 0, sS = 0, sm = 1;
  DType x_dtype = DType::f32;
  DType acc_dtype = DType::f32;
};

void accumulate_cpu(const AccumParams& p, const void* x, void* acc, int num_threads);

size_t accumulate_cuda_workspace_bytes(const AccumParams& p, int device);
void accumulate_cuda(const AccumParams& p, const void* x, void* acc, void* workspace,
                     size_t workspace_bytes, int device, void* stream);

// ---- greedy selection ----------------------------------------------------------------------
// Greedy minimization of L(J) = Tr[M (S - S_FJ (S_JJ + diag(tau_J))^-1 S_JF)] over |J| = k,
// M = theta I + (1 - theta) Z^T Z symmetric PSD (nullptr: M = I). The residual
// R = S - sum_s v_s v_s^T is kept in factored (lazy) form: each step picks
//   j* = argmax_j (R[:,j]^T M R[:,j]) / (R_jj + tau_j)   (ties: lowest index; chosen indices
// are never picked again), forms v = R[:,j*] / sqrt(R_j*j* + tau_j*) and updates the
// numerators n_j = R[:,j]^T M R[:,j], the diagonal R_jj and the objective by rank-one
// formulas. A step reads S once (one triangle on the CPU), M once when given, and V three
// times: O(m^2 + m t) per step, O(k m^2) in all, no inverse.
//   n0:  R[:,j]^T M R[:,j] at R = S (m doubles);  L0: Tr[M S] (1 double).
//   out: idx (k int64, the order of selection), obj (k doubles, L after each step).
// The greedy gain guard (covariance_math.h, greedy_explained): a unit whose residual variance
// and ridge are both within this many machine epsilons (of cov's dtype) of S_jj scores 0; the
// bindings pass rel_guard = kGreedyRelGuardEps * eps(dtype) (popcomp's greedy_rel_guard).
constexpr double kGreedyRelGuardEps = 1e3;

struct GreedyParams {
  int64_t m = 0;
  int64_t k = 0;
  DType dtype = DType::f32;  // of cov and M: f32 or f64
  double rel_guard = 0.0;    // gain 0 when tau_j and R_jj are both <= rel_guard * S_jj
};

void greedy_cpu(const GreedyParams& p, const void* cov, const void* M, const double* tau,
                const double* n0, const double* L0, int64_t* idx, double* obj, int num_threads);

size_t greedy_cuda_workspace_bytes(const GreedyParams& p);
void greedy_cuda(const GreedyParams& p, const void* cov, const void* M, const double* tau,
                 const double* n0, const double* L0, int64_t* idx, double* obj, void* workspace,
                 size_t workspace_bytes, int device, void* stream);

}  // namespace covariance
}  // namespace popcomp
