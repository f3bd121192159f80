// CUDA backend of weighted 1-D K-means (HW / DRHW K-means, Bu et al. 2020 eqs. 27, 31).
//
// Pipeline (all rows at once, everything enqueued on the caller's stream, no host sync):
//   A. order-preserving keys (-0.0 folded into +0.0) -> sort per row (CUB radix / segmented
//      sort, weights as values) -> run heads -> inclusive scan -> run starts; weights of
//      equal values summed by cub::DeviceReduce::ReduceByKey (keyed by run id).
//   B. per run: value, row; per row: u, shift = v[u/2]; shifted values and the prefix sums
//      s0, s1, s2 (length u+1 per row) by one cub::DeviceScan::InclusiveScanByKey.
//   C. method exact: the DP  D_m(i) = min_{m<=j<=i} D_{m-1}(j-1) + seg_cost(j, i+1)  per
//      layer by the monotone-argmin divide and conquer of the reference (same recursion:
//      mid = (lo+hi)/2, columns [clo, min(chi, mid)], ties -> smallest j), evaluated level by
//      level for all rows at once; one launch per (layer, level) with a thread, a warp or
//      several warps (partials reduced in order) per node depending on the node width.
//   D. one warp per problem: k >= u / exact boundaries / init (lane 0), lloyd with the
//      assignment searches spread over the lanes (same results as kmeans_math.h's lloyd),
//      then unshift and midpoints.
//   E. labels from the original x (nearest center, ties to the lower one); cost from the
//      distinct values, sum_g W_g (v_g - c_label)^2 in the shifted coordinates as the CPU
//      backend computes it, per-row sums by CUB reductions, plus the diameter penalty.
//
// Workspace: one buffer from the caller, carved by a Plan computed from Params only, so that
// cuda_workspace_bytes() and run_cuda() agree. Upper bounds used: total values N = rows*n,
// total distinct values U = rows * min(n, 65536 for 16-bit inputs).
#include <cub/cub.cuh>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_utils.cuh"
#include "common/hd.h"
#include "kmeans/kmeans.h"
#include "kmeans/kmeans_math.h"
#include "kmeans/dp_levels.h"

namespace popcomp {
namespace kmeans {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;      // grid-stride kernels
constexpr int64_t kMaxPartials = 1 << 15;    // (node, warp) partial argmins per DP level
constexpr int kWarpNodesMin = 4096;          // enough nodes for one warp per node

enum class SortMode : int { single = 0, composite = 1, segmented = 2 };

size_t align_up(size_t x) { return (x + 255) & ~size_t(255); }

int bits_for(uint64_t v) {  // bits needed to represent 0..v
  int b = 0;
  while (b < 64 && (v >> b) != 0) ++b;
  return b;
}

int key_bits(DType t) {
  switch (t) {
    case DType::f64: return 64;
    case DType::f32: return 32;
    default: return 16;
  }
}

// Per-row scratch for kmeans_math.h's Scratch (k+1 int64 x2, k double x3, k+1 double x2, k int).
size_t scratch_row_bytes(int k) {
  size_t b = 2 * size_t(k + 1) * 8 + 3 * size_t(k) * 8 + 2 * size_t(k + 1) * 8 + size_t(k) * 4;
  return (b + 7) & ~size_t(7);
}

struct D3 {
  double a, b, c;
};
struct D3Add {
  __host__ __device__ D3 operator()(const D3& x, const D3& y) const {
    return D3{x.a + y.a, x.b + y.b, x.c + y.c};
  }
};
struct DSum {
  __host__ __device__ double operator()(double x, double y) const { return x + y; }
};

struct Plan {
  int64_t rows = 0, n = 0, N = 0, ucap = 0, U = 0;
  int k = 1;
  int keybits = 32;
  int sort_bits = 32;   // end_bit of the radix sort
  int sort_bytes = 4;   // sizeof the sorted key type: 2, 4 or 8
  SortMode mode = SortMode::single;
  bool need_dp = false;
  int Lmax = 0;         // recursion levels of the DP divide and conquer
  size_t cub_bytes = 0;
  // persistent region
  size_t o_off = 0, o_ustart = 0, o_nruns = 0, o_shift = 0, o_mids = 0, o_cs = 0, o_scratch = 0,
         o_vo = 0, o_vs = 0,
         o_W = 0, o_runrow = 0, o_S0 = 0, o_S1 = 0, o_S2 = 0, o_cub = 0, o_temp = 0;
  // phase A (sort / dedup), relative to o_temp
  size_t a_kA = 0, a_kB = 0, a_wA = 0, a_wB = 0, a_pos = 0, a_runpos = 0, a_uniq = 0, a_end = 0;
  // phase B (prefix sums)
  size_t b_in = 0, b_out = 0, b_end = 0;
  // phase C (DP)
  size_t c_D0 = 0, c_D1 = 0, c_J = 0, c_part = 0, c_end = 0;
  // phase E (cost)
  size_t e_cost = 0, e_end = 0;
  size_t total = 0;
};

// ---------------------------------------------------------------------------------------
// Keys

__device__ __forceinline__ uint64_t raw_key(const void* x, DType t, int64_t i) {
  switch (t) {
    case DType::f64: {
      // -0.0 == +0.0: one distinct value (folded on the bits, immune to optimization)
      uint64_t bits = (uint64_t)__double_as_longlong(static_cast<const double*>(x)[i]);
      if ((bits & 0x7fffffffffffffffull) == 0) bits = 0;
      return double_key(__longlong_as_double((long long)bits));
    }
    case DType::f32: {
      uint32_t bits = __float_as_uint(static_cast<const float*>(x)[i]);
      if ((bits & 0x7fffffffu) == 0) bits = 0;
      return (uint64_t)float_key(__uint_as_float(bits));
    }
    default: {
      uint16_t h = static_cast<const uint16_t*>(x)[i];
      if ((h & 0x7fffu) == 0) h = 0;
      return (uint64_t)half_key(h);
    }
  }
}

__device__ __forceinline__ double key_value(uint64_t key, DType t) {
  switch (t) {
    case DType::f64: {
      uint64_t b = (key & 0x8000000000000000ull) ? (key & 0x7fffffffffffffffull) : ~key;
      return __longlong_as_double((long long)b);
    }
    case DType::f32: return (double)key_to_float((uint32_t)key);
    case DType::f16: return (double)half_bits_to_float(half_key_to_bits((uint32_t)key));
    default: return (double)bf16_bits_to_float(half_key_to_bits((uint32_t)key));
  }
}

template <typename ST>
__global__ void make_keys_kernel(const void* x, DType xt, const void* w, DType wt, int64_t N,
                                 int64_t n, int composite_shift, ST* keys, double* wout) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N;
       i += (int64_t)gridDim.x * blockDim.x) {
    uint64_t key = raw_key(x, xt, i);
    if (composite_shift > 0) key |= (uint64_t)(i / n) << composite_shift;
    keys[i] = (ST)key;
    if (w != nullptr) wout[i] = load_as_double(w, wt, i);
  }
}

template <typename ST>
__global__ void heads_kernel(const ST* keys, int64_t N, int64_t n, int64_t* flags) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N;
       i += (int64_t)gridDim.x * blockDim.x) {
    flags[i] = (i % n == 0 || keys[i] != keys[i - 1]) ? 1 : 0;
  }
}

// pos = inclusive scan of the head flags: run id of element i is pos[i]-1.
__global__ void run_starts_kernel(const int64_t* pos, int64_t N, int64_t* runpos,
                                  int64_t* nruns) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N;
       i += (int64_t)gridDim.x * blockDim.x) {
    int64_t p = pos[i];
    if (i == 0 || p != pos[i - 1]) runpos[p - 1] = i;
    if (i == N - 1) {
      *nruns = p;
      runpos[p] = N;
    }
  }
}

// Per run g: row, value, weight (run length when unweighted), row starts.
template <typename ST>
__global__ void runs_kernel(const ST* keys, const int64_t* runpos, const int64_t* nruns, int64_t U,
                            int64_t n, int64_t rows, DType xt, int64_t key_mask_bits,
                            bool weighted, double* vo, double* vs, double* W,
                            int32_t* runrow, int64_t* ustart) {
  const int64_t R = *nruns;
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < U;
       g += (int64_t)gridDim.x * blockDim.x) {
    if (g < R) {
      const int64_t i0 = runpos[g];
      const int64_t r = i0 / n;
      uint64_t key = (uint64_t)keys[i0];
      if (key_mask_bits < 64) key &= ((uint64_t)1 << key_mask_bits) - 1;
      const double val = key_value(key, xt);
      vo[g] = val;
      vs[g] = val;
      runrow[g] = (int32_t)r;
      if (!weighted) W[g] = (double)(runpos[g + 1] - i0);
      if (i0 == r * n) ustart[r] = g;
      if (g == 0) ustart[rows] = R;
    } else {
      vo[g] = 0.0;
      vs[g] = 0.0;
      runrow[g] = (int32_t)rows;  // sentinel key for the scan by key
      if (!weighted) W[g] = 0.0;
    }
  }
}

__global__ void shift_kernel(const int64_t* ustart, int64_t rows, const double* vs,
                             double* shift) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows;
       r += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = ustart[r], u = ustart[r + 1] - b;
    shift[r] = vs[b + u / 2];
  }
}

__global__ void shift_values_kernel(const int64_t* nruns, int64_t U, const int32_t* runrow,
                                    const double* shift, const double* W, double* vs, D3* d3) {
  const int64_t R = *nruns;
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < U;
       g += (int64_t)gridDim.x * blockDim.x) {
    if (g < R) {
      const double v = vs[g] - shift[runrow[g]];
      vs[g] = v;
      const double w = W[g];
      d3[g] = D3{w, w * v, w * v * v};
    } else {
      d3[g] = D3{0.0, 0.0, 0.0};
    }
  }
}

__global__ void prefix_scatter_kernel(const int64_t* nruns, const int32_t* runrow,
                                      const int64_t* ustart, const D3* incl, double* S0,
                                      double* S1, double* S2) {
  const int64_t R = *nruns;
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < R;
       g += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = runrow[g];
    const D3 s = incl[g];
    S0[g + r + 1] = s.a;
    S1[g + r + 1] = s.b;
    S2[g + r + 1] = s.c;
    if (g == ustart[r]) {
      S0[g + r] = 0.0;
      S1[g + r] = 0.0;
      S2[g + r] = 0.0;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Exact DP

__global__ void dp_init_kernel(RowData d, const int64_t* nruns, const int32_t* runrow, int k,
                               double* D) {
  const int64_t R = *nruns;
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < R;
       g += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = runrow[g];
    int64_t base;
    Prefix P = row_prefix(d, r, &base);
    if ((int64_t)k >= P.u) continue;
    D[g] = seg_cost(P, 0, g - base + 1);
  }
}

__device__ __forceinline__ void warp_argmin(double& v, int64_t& j) {
  for (int off = 16; off > 0; off >>= 1) {
    double ov = __shfl_down_sync(0xffffffffu, v, off);
    long long oj = __shfl_down_sync(0xffffffffu, (long long)j, off);
    if (dp_better(ov, (int64_t)oj, v, j)) {
      v = ov;
      j = (int64_t)oj;
    }
  }
}

constexpr double kInf = __builtin_huge_val();
constexpr int64_t kNoJ = INT64_MAX;

// One thread per node.
__global__ void dp_level_thread_kernel(RowData d, const double* Dp, double* Dc, int32_t* Jm,
                                       int k, int m, int L, int64_t nodes) {
  for (int64_t id = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; id < nodes;
       id += (int64_t)gridDim.x * blockDim.x) {
    DpNode nd;
    if (!dp_node(d, Jm, k, m, L, id, nd)) continue;
    double best = dp_val(nd, Dp, nd.clo);
    int64_t bj = nd.clo;
    for (int64_t j = nd.clo + 1; j <= nd.hc; ++j) {
      const double v = dp_val(nd, Dp, j);
      if (v < best) {
        best = v;
        bj = j;
      }
    }
    Dc[nd.base + nd.mid] = best;
    Jm[nd.base + nd.mid] = (int32_t)bj;
  }
}

// G warps per node (G = 1: the warp writes the result; G > 1: partials, reduced in order).
__global__ void dp_level_warp_kernel(RowData d, const double* Dp, double* Dc, int32_t* Jm, int k,
                                     int m, int L, int64_t nodes, int G, double* part_v,
                                     int64_t* part_j) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t wid = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5; wid < nodes * G;
       wid += warps) {
    const int64_t id = wid / G;
    const int g = (int)(wid - id * G);
    DpNode nd;
    if (!dp_node(d, Jm, k, m, L, id, nd)) continue;  // uniform across the warp
    double best = kInf;
    int64_t bj = kNoJ;
    for (int64_t j = nd.clo + (int64_t)g * 32 + lane; j <= nd.hc; j += (int64_t)G * 32) {
      const double v = dp_val(nd, Dp, j);
      if (v < best) {
        best = v;
        bj = j;
      }
    }
    warp_argmin(best, bj);
    if (lane == 0) {
      if (G == 1) {
        Dc[nd.base + nd.mid] = best;
        Jm[nd.base + nd.mid] = (int32_t)bj;
      } else {
        part_v[wid] = best;
        part_j[wid] = bj;
      }
    }
  }
}

__global__ void dp_level_reduce_kernel(RowData d, double* Dc, int32_t* Jm, int k, int m, int L,
                                       int64_t nodes, int G, const double* part_v,
                                       const int64_t* part_j) {
  for (int64_t id = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; id < nodes;
       id += (int64_t)gridDim.x * blockDim.x) {
    DpNode nd;
    if (!dp_node(d, Jm, k, m, L, id, nd)) continue;
    double best = kInf;
    int64_t bj = kNoJ;
    for (int g = 0; g < G; ++g) {
      const double v = part_v[id * G + g];
      const int64_t j = part_j[id * G + g];
      if (dp_better(v, j, best, bj)) {
        best = v;
        bj = j;
      }
    }
    Dc[nd.base + nd.mid] = best;
    Jm[nd.base + nd.mid] = (int32_t)bj;
  }
}

// ---------------------------------------------------------------------------------------
// Per-problem solve (one warp per row)

struct SolveArgs {
  RowData d;
  const int32_t* J;  // exact: (k-1) layers of U columns
  int64_t U;
  int64_t rows;
  int k;
  double beta;
  Method method;
  Init init;
  Diameter diameter;
  int max_iter;
  double tol;
  uint64_t seed;
  const double* init_centers;
  unsigned char* scratch;
  size_t scratch_stride;
  double* centers;
  double* mids;
  double* cs;  // sorted centers in the shifted coordinates (for the cost)
  int64_t* n_iter;
  double* shift;
};

// kmeans_math.h's lloyd() run by one warp: the k - 1 binary searches of the assignment step
// are spread over the lanes; everything else (center update, sorting) is done by lane 0 and
// the objective by every lane redundantly (same loads, same value). Same results as lloyd():
// the midpoints of sorted centers are non-decreasing, so each boundary searched over [0, u)
// equals the chained search of assign_boundaries() that starts at the previous boundary.
__device__ __forceinline__ void assign_boundaries_warp(const Prefix& P, int k, const double* c,
                                                       int64_t* B, int lane) {
  if (lane == 0) {
    B[0] = 0;
    B[k] = P.u;
  }
  for (int j = 1 + lane; j < k; j += 32) B[j] = upper_bound_d(P.v, 0, P.u, 0.5 * (c[j - 1] + c[j]));
  __syncwarp();
}

__device__ int lloyd_warp(const Prefix& P, int k, double* c, double beta, Diameter dm,
                          int max_iter, double tol, const Scratch& w, double* obj, int lane) {
  if (lane == 0) sort_small(c, k);
  __syncwarp();
  assign_boundaries_warp(P, k, c, w.B, lane);
  double f = objective(P, k, w.B, c, beta, dm);
  int it = 0;
  while (it < max_iter) {
    __syncwarp();  // every lane has read B and c of the previous step
    if (lane == 0) lloyd_center_step(P, k, c, beta, dm, w);
    __syncwarp();
    ++it;
    assign_boundaries_warp(P, k, c, w.B, lane);
    if (lloyd_should_stop(k, w, objective(P, k, w.B, c, beta, dm), tol, &f)) break;
  }
  __syncwarp();
  *obj = f;
  return it;
}

// One warp per problem (lane 0 does the O(k) and O(k^2) parts, the lanes the searches).
__device__ void solve_row(const SolveArgs& a, int64_t r, int lane) {
  const int k = a.k;
  int64_t base;
  const Prefix P = row_prefix(a.d, r, &base);
  const int64_t u = P.u;
  unsigned char* sp = a.scratch + r * a.scratch_stride;
  Scratch s;
  s.B = reinterpret_cast<int64_t*>(sp);
  s.Bprev = s.B + (k + 1);
  s.H = reinterpret_cast<double*>(s.Bprev + (k + 1));
  s.S = s.H + k;
  s.prev = s.S + k;
  s.cumH = s.prev + k;
  s.cumS = s.cumH + (k + 1);
  s.act = reinterpret_cast<int*>(s.cumS + (k + 1));
  double* c = a.centers + r * k;
  const bool all_values = (int64_t)k >= u;
  const bool run_lloyd = all_values || a.method == Method::exact ? a.beta > 0.0 : true;
  if (lane == 0) {
    if (all_values) {
      for (int j = 0; j < k; ++j) c[j] = P.v[(int64_t)j < u ? j : u - 1];
    } else if (a.method == Method::exact) {
      int64_t* B = s.B;
      B[k] = u;
      int64_t i = u - 1;
      for (int m = k - 1; m >= 1; --m) {
        const int64_t j = a.J[(int64_t)(m - 1) * a.U + base + i];
        B[m] = j;
        i = j - 1;
      }
      B[0] = 0;
      for (int j = 0; j < k; ++j) {
        const double H = P.s0[B[j + 1]] - P.s0[B[j]];
        const double S = P.s1[B[j + 1]] - P.s1[B[j]];
        c[j] = H > 0.0 ? S / H : 0.5 * (P.v[B[j]] + P.v[B[j + 1] - 1]);
      }
    } else {
      switch (a.init) {
        case Init::given: {
          const double sh = a.shift[r];
          for (int j = 0; j < k; ++j) c[j] = a.init_centers[r * k + j] - sh;
          break;
        }
        case Init::linear: init_linear(P, k, c); break;
        case Init::quantile: init_quantile(P, k, c); break;
        default: {
          SplitMix64 rng(a.seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(r + 1)));
          init_kmeanspp(P, k, c, rng, s);
          break;
        }
      }
    }
  }
  __syncwarp();
  int it = 0;
  double obj = 0.0;
  if (run_lloyd) it = lloyd_warp(P, k, c, a.beta, a.diameter, a.max_iter, a.tol, s, &obj, lane);
  if (lane != 0) return;
  sort_small(c, k);
  const double sh = a.shift[r];
  for (int j = 0; j < k; ++j) {
    a.cs[r * k + j] = c[j];
    c[j] += sh;
  }
  for (int j = 0; j + 1 < k; ++j) a.mids[r * (k - 1) + j] = 0.5 * (c[j] + c[j + 1]);
  a.n_iter[r] = it;
}

__global__ void solve_kernel(SolveArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t r = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5; r < a.rows; r += warps) {
    solve_row(a, r, lane);  // r is uniform across the warp
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------
// Labels and cost

__global__ void labels_kernel(const void* x, DType xt, int64_t N, int64_t n, int k,
                              const double* mids, int32_t* labels) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / n;
    labels[i] = (int32_t)nearest_label(mids + r * (k - 1), k - 1, load_as_double(x, xt, i));
  }
}

// Cost of every distinct value, W (v - c_label)^2 in the shifted coordinates (as the CPU
// backend); the label from the original value and the midpoints of the final centers.
__global__ void run_cost_kernel(const int64_t* nruns, int64_t U, const int32_t* runrow,
                                const double* vo, const double* vs, const double* W, int k,
                                const double* mids, const double* cs, double* pc) {
  const int64_t R = *nruns;
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < U;
       g += (int64_t)gridDim.x * blockDim.x) {
    if (g < R) {
      const int64_t r = runrow[g];
      const int l = nearest_label(mids + r * (k - 1), k - 1, vo[g]);
      const double d = vs[g] - cs[r * k + l];
      pc[g] = W[g] * d * d;
    } else {
      pc[g] = 0.0;
    }
  }
}

__global__ void offsets_kernel(int64_t rows, int64_t n, int64_t* off) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r <= rows;
       r += (int64_t)gridDim.x * blockDim.x)
    off[r] = r * n;
}

__global__ void penalty_kernel(int64_t rows, int k, const double* centers, double beta,
                               Diameter dm, double* cost) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows;
       r += (int64_t)gridDim.x * blockDim.x)
    cost[r] = cost[r] + diameter_penalty(centers[r * k + k - 1] - centers[r * k], beta, dm);
}

// ---------------------------------------------------------------------------------------
// Planning (sizes from Params only) and the CUB calls

unsigned grid_for(int64_t items, int threads = kThreads) {
  int64_t b = (items + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > kMaxBlocks) b = kMaxBlocks;
  return (unsigned)b;
}

template <typename ST>
size_t sort_temp_bytes(const Plan& pl, bool pairs) {
  size_t bytes = 0;
  const ST* kin = nullptr;
  ST* kout = nullptr;
  const double* vin = nullptr;
  double* vout = nullptr;
  const int64_t* off = nullptr;
  if (pl.mode == SortMode::segmented) {
    if (pairs)
      PC_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairs(nullptr, bytes, kin, kout, vin, vout,
                                                              pl.N, pl.rows, off, off + 1));
    else
      PC_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortKeys(nullptr, bytes, kin, kout, pl.N,
                                                             pl.rows, off, off + 1));
  } else {
    if (pairs)
      PC_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, kin, kout, vin, vout, pl.N, 0,
                                                    pl.sort_bits));
    else
      PC_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(nullptr, bytes, kin, kout, pl.N, 0,
                                                   pl.sort_bits));
  }
  return bytes;
}

template <typename ST>
void sort_run(const Plan& pl, void* temp, size_t temp_bytes, const ST* kin, ST* kout,
              const double* vin, double* vout, const int64_t* off, cudaStream_t st) {
  size_t bytes = temp_bytes;
  if (pl.mode == SortMode::segmented) {
    if (vin != nullptr)
      PC_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairs(temp, bytes, kin, kout, vin, vout,
                                                              pl.N, pl.rows, off, off + 1, st));
    else
      PC_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortKeys(temp, bytes, kin, kout, pl.N,
                                                             pl.rows, off, off + 1, st));
  } else {
    if (vin != nullptr)
      PC_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, bytes, kin, kout, vin, vout, pl.N, 0,
                                                    pl.sort_bits, st));
    else
      PC_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(temp, bytes, kin, kout, pl.N, 0,
                                                   pl.sort_bits, st));
  }
}

size_t sort_temp_any(const Plan& pl, bool pairs) {
  switch (pl.sort_bytes) {
    case 2: return sort_temp_bytes<uint16_t>(pl, pairs);
    case 4: return sort_temp_bytes<uint32_t>(pl, pairs);
    default: return sort_temp_bytes<uint64_t>(pl, pairs);
  }
}

Plan make_plan(const Params& p) {
  // the parameters were checked by check_params (kmeans.h); a plan needs values
  if (p.rows < 1 || p.n < 1) throw std::invalid_argument("kmeans1d cuda: rows and n must be >= 1");
  if (p.rows >= ((int64_t)1 << 31) - 1)
    throw std::invalid_argument("kmeans1d cuda: too many rows");
  Plan pl;
  pl.rows = p.rows;
  pl.n = p.n;
  pl.N = p.rows * p.n;
  pl.k = p.k;
  pl.keybits = key_bits(p.x_dtype);
  pl.ucap = pl.keybits == 16 ? std::min<int64_t>(p.n, 65536) : p.n;
  pl.U = p.rows * pl.ucap;
  if ((pl.ucap + 1) >= ((int64_t)1 << 31))
    throw std::invalid_argument("kmeans1d cuda: more than 2^31 - 2 values per problem");
  if (p.rows == 1) {
    pl.mode = SortMode::single;
    pl.sort_bits = pl.keybits;
    pl.sort_bytes = pl.keybits / 8;
  } else if (pl.keybits <= 32 && p.n >= (1 << 16) && pl.keybits + bits_for(p.rows - 1) <= 64) {
    pl.mode = SortMode::composite;  // few large rows: one radix sort on (row, key)
    pl.sort_bits = pl.keybits + bits_for(p.rows - 1);
    pl.sort_bytes = 8;
  } else {
    pl.mode = SortMode::segmented;
    pl.sort_bits = pl.keybits;
    pl.sort_bytes = pl.keybits / 8;
  }
#if CUB_VERSION < 300000
  // Before CCCL 3 (CUDA 13) several of the CUB entry points used here (DeviceSegmentedSort in
  // particular) take an int item count: larger inputs would be silently truncated.
  if (pl.N > (int64_t)INT32_MAX || pl.U + pl.rows > (int64_t)INT32_MAX)
    throw std::invalid_argument(
        "kmeans1d cuda: more than 2^31 - 1 values in all needs a build with CUDA 13 (CCCL 3)");
#endif
  pl.need_dp = p.method == Method::exact && (int64_t)p.k < pl.ucap && p.k > 1;
  pl.Lmax = dp_levels(pl.ucap);

  // CUB temporary storage: the largest of all calls.
  size_t cub = std::max(sort_temp_any(pl, true), sort_temp_any(pl, false));
  {
    size_t b = 0;
    int64_t* pos = nullptr;
    PC_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, b, pos, pos, pl.N));
    cub = std::max(cub, b);
  }
  {
    size_t b = 0;
    const int64_t* kin = nullptr;
    int64_t* uo = nullptr;
    const double* vin = nullptr;
    double* ao = nullptr;
    int64_t* nr = nullptr;
    PC_CUDA_CHECK(cub::DeviceReduce::ReduceByKey(nullptr, b, kin, uo, vin, ao, nr, DSum(), pl.N));
    cub = std::max(cub, b);
  }
  {
    size_t b = 0;
    const int32_t* kin = nullptr;
    const D3* vin = nullptr;
    D3* vo = nullptr;
    PC_CUDA_CHECK(cub::DeviceScan::InclusiveScanByKey(nullptr, b, kin, vin, vo, D3Add(), pl.U,
                                                      ::cuda::std::equal_to<>()));
    cub = std::max(cub, b);
  }
  {
    size_t b = 0;
    const double* in = nullptr;
    double* out = nullptr;
    if (pl.rows == 1) {
      PC_CUDA_CHECK(cub::DeviceReduce::Sum(nullptr, b, in, out, pl.U));
    } else {
      const int64_t* off = nullptr;
      PC_CUDA_CHECK(cub::DeviceSegmentedReduce::Sum(nullptr, b, in, out, pl.rows, off, off + 1));
    }
    cub = std::max(cub, b);
  }
  // Slack: the sizes are queried on the current device, which may differ from the one run on.
  pl.cub_bytes = cub + cub / 4 + (1 << 20);

  const size_t rows = (size_t)p.rows, N = (size_t)pl.N, U = (size_t)pl.U;
  size_t o = 0;
  auto take = [&o](size_t bytes) {
    size_t at = o;
    o += align_up(bytes);
    return at;
  };
  pl.o_off = take((rows + 1) * 8);
  pl.o_ustart = take((rows + 1) * 8);
  pl.o_nruns = take(8);
  pl.o_shift = take(rows * 8);
  pl.o_mids = take(rows * (size_t)std::max(p.k - 1, 1) * 8);
  pl.o_cs = take(rows * (size_t)p.k * 8);
  pl.o_scratch = take(rows * scratch_row_bytes(p.k));
  pl.o_vo = take(U * 8);
  pl.o_vs = take(U * 8);
  pl.o_W = take(U * 8);
  pl.o_runrow = take(U * 4);
  pl.o_S0 = take((U + rows) * 8);
  pl.o_S1 = take((U + rows) * 8);
  pl.o_S2 = take((U + rows) * 8);
  pl.o_cub = take(pl.cub_bytes);
  pl.o_temp = o;

  size_t a = 0;
  auto tk = [&a](size_t bytes) {
    size_t at = a;
    a += align_up(bytes);
    return at;
  };
  pl.a_kA = tk(N * pl.sort_bytes);
  pl.a_kB = tk(N * pl.sort_bytes);
  pl.a_wA = tk(N * 8);
  pl.a_wB = tk(N * 8);
  pl.a_pos = tk(N * 8);
  pl.a_runpos = tk((U + 1) * 8);
  pl.a_uniq = tk(U * 8);
  pl.a_end = a;

  a = 0;
  pl.b_in = tk(U * sizeof(D3));
  pl.b_out = tk(U * sizeof(D3));
  pl.b_end = a;

  a = 0;
  if (pl.need_dp) {
    pl.c_D0 = tk(U * 8);
    pl.c_D1 = tk(U * 8);
    pl.c_J = tk((size_t)(p.k - 1) * U * 4);
    pl.c_part = tk((size_t)kMaxPartials * 16);
  }
  pl.c_end = a;

  a = 0;
  pl.e_cost = tk(U * 8);
  pl.e_end = a;

  pl.total = pl.o_temp + std::max(std::max(pl.a_end, pl.b_end), std::max(pl.c_end, pl.e_end));
  return pl;
}

template <typename ST>
void phase_sort(const Plan& pl, const Params& p, const Buffers& b, unsigned char* ws,
                cudaStream_t st) {
  unsigned char* T = ws + pl.o_temp;
  ST* kA = reinterpret_cast<ST*>(T + pl.a_kA);
  ST* kB = reinterpret_cast<ST*>(T + pl.a_kB);
  double* wA = reinterpret_cast<double*>(T + pl.a_wA);
  double* wB = reinterpret_cast<double*>(T + pl.a_wB);
  int64_t* pos = reinterpret_cast<int64_t*>(T + pl.a_pos);
  int64_t* runpos = reinterpret_cast<int64_t*>(T + pl.a_runpos);
  int64_t* uniq = reinterpret_cast<int64_t*>(T + pl.a_uniq);
  int64_t* off = reinterpret_cast<int64_t*>(ws + pl.o_off);
  int64_t* ustart = reinterpret_cast<int64_t*>(ws + pl.o_ustart);
  int64_t* nruns = reinterpret_cast<int64_t*>(ws + pl.o_nruns);
  double* vo = reinterpret_cast<double*>(ws + pl.o_vo);
  double* vs = reinterpret_cast<double*>(ws + pl.o_vs);
  double* W = reinterpret_cast<double*>(ws + pl.o_W);
  int32_t* runrow = reinterpret_cast<int32_t*>(ws + pl.o_runrow);
  void* cubtmp = ws + pl.o_cub;
  const bool weighted = b.w != nullptr;

  const int shiftc = pl.mode == SortMode::composite ? pl.keybits : 0;
  make_keys_kernel<ST><<<grid_for(pl.N), kThreads, 0, st>>>(b.x, p.x_dtype, b.w, p.w_dtype, pl.N,
                                                            pl.n, shiftc, kA, wA);
  PC_CUDA_CHECK(cudaGetLastError());
  sort_run<ST>(pl, cubtmp, pl.cub_bytes, kA, kB, weighted ? wA : nullptr, wB, off, st);
  heads_kernel<ST><<<grid_for(pl.N), kThreads, 0, st>>>(kB, pl.N, pl.n, pos);
  PC_CUDA_CHECK(cudaGetLastError());
  {
    size_t bytes = pl.cub_bytes;
    PC_CUDA_CHECK(cub::DeviceScan::InclusiveSum(cubtmp, bytes, pos, pos, pl.N, st));
  }
  run_starts_kernel<<<grid_for(pl.N), kThreads, 0, st>>>(pos, pl.N, runpos, nruns);
  PC_CUDA_CHECK(cudaGetLastError());
  if (weighted) {
    // Sum of the weights of each run, keyed by run id (pos); writes nruns again (same value).
    size_t bytes = pl.cub_bytes;
    PC_CUDA_CHECK(cub::DeviceReduce::ReduceByKey(cubtmp, bytes, static_cast<const int64_t*>(pos),
                                                 uniq, static_cast<const double*>(wB), W, nruns,
                                                 DSum(), pl.N, st));
  }
  runs_kernel<ST><<<grid_for(pl.U), kThreads, 0, st>>>(kB, runpos, nruns, pl.U, pl.n, pl.rows,
                                                       p.x_dtype, pl.keybits, weighted, vo, vs,
                                                       W, runrow, ustart);
  PC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

size_t cuda_workspace_bytes(const Params& p, int device) {
  // The CUB scratch sizes depend on the device (SM count, PTX version): query them on the one
  // run_cuda() will use, which recomputes the plan under the same guard.
  if (device < 0) return make_plan(p).total;
  DeviceGuard guard(device);
  return make_plan(p).total;
}

void run_cuda(const Params& p, const Buffers& b, void* workspace, size_t workspace_bytes,
              int device, void* stream) {
  check_args(p, b, "kmeans1d_cuda");
  if (p.rows == 0 || p.n == 0) return;
  DeviceGuard guard(device);
  const Plan pl = make_plan(p);
  if (workspace_bytes < pl.total)
    throw std::invalid_argument("kmeans1d cuda: workspace too small (" +
                                std::to_string(workspace_bytes) + " < " +
                                std::to_string(pl.total) + " bytes)");
  cudaStream_t st = as_stream(stream);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  unsigned char* T = ws + pl.o_temp;

  int64_t* off = reinterpret_cast<int64_t*>(ws + pl.o_off);
  int64_t* ustart = reinterpret_cast<int64_t*>(ws + pl.o_ustart);
  int64_t* nruns = reinterpret_cast<int64_t*>(ws + pl.o_nruns);
  double* shift = reinterpret_cast<double*>(ws + pl.o_shift);
  double* mids = reinterpret_cast<double*>(ws + pl.o_mids);
  double* cs = reinterpret_cast<double*>(ws + pl.o_cs);
  unsigned char* scratch = ws + pl.o_scratch;
  double* vo = reinterpret_cast<double*>(ws + pl.o_vo);
  double* vs = reinterpret_cast<double*>(ws + pl.o_vs);
  double* W = reinterpret_cast<double*>(ws + pl.o_W);
  int32_t* runrow = reinterpret_cast<int32_t*>(ws + pl.o_runrow);
  double* S0 = reinterpret_cast<double*>(ws + pl.o_S0);
  double* S1 = reinterpret_cast<double*>(ws + pl.o_S1);
  double* S2 = reinterpret_cast<double*>(ws + pl.o_S2);
  void* cubtmp = ws + pl.o_cub;

  offsets_kernel<<<grid_for(p.rows + 1), kThreads, 0, st>>>(p.rows, p.n, off);
  PC_CUDA_CHECK(cudaGetLastError());

  // A. sort, deduplicate, weights of distinct values.
  switch (pl.sort_bytes) {
    case 2: phase_sort<uint16_t>(pl, p, b, ws, st); break;
    case 4: phase_sort<uint32_t>(pl, p, b, ws, st); break;
    default: phase_sort<uint64_t>(pl, p, b, ws, st); break;
  }

  // B. shift and prefix sums.
  shift_kernel<<<grid_for(p.rows, 128), 128, 0, st>>>(ustart, p.rows, vs, shift);
  PC_CUDA_CHECK(cudaGetLastError());
  {
    D3* d3in = reinterpret_cast<D3*>(T + pl.b_in);
    D3* d3out = reinterpret_cast<D3*>(T + pl.b_out);
    shift_values_kernel<<<grid_for(pl.U), kThreads, 0, st>>>(nruns, pl.U, runrow, shift, W, vs,
                                                             d3in);
    PC_CUDA_CHECK(cudaGetLastError());
    size_t bytes = pl.cub_bytes;
    PC_CUDA_CHECK(cub::DeviceScan::InclusiveScanByKey(cubtmp, bytes, static_cast<const int32_t*>(runrow),
                                                      static_cast<const D3*>(d3in), d3out, D3Add(),
                                                      pl.U, ::cuda::std::equal_to<>(), st));
    prefix_scatter_kernel<<<grid_for(pl.U), kThreads, 0, st>>>(nruns, runrow, ustart, d3out, S0,
                                                               S1, S2);
    PC_CUDA_CHECK(cudaGetLastError());
  }
  RowData rd{ustart, vs, S0, S1, S2};

  // C. exact DP (boundaries of the beta = 0 optimum).
  const int32_t* J = nullptr;
  if (pl.need_dp) {
    double* Dp = reinterpret_cast<double*>(T + pl.c_D0);
    double* Dc = reinterpret_cast<double*>(T + pl.c_D1);
    int32_t* Jall = reinterpret_cast<int32_t*>(T + pl.c_J);
    double* part_v = reinterpret_cast<double*>(T + pl.c_part);
    int64_t* part_j = reinterpret_cast<int64_t*>(T + pl.c_part + (size_t)kMaxPartials * 8);
    J = Jall;
    dp_init_kernel<<<grid_for(pl.U), kThreads, 0, st>>>(rd, nruns, runrow, p.k, Dp);
    PC_CUDA_CHECK(cudaGetLastError());
    for (int m = 1; m < p.k; ++m) {
      int32_t* Jm = Jall + (int64_t)(m - 1) * pl.U;
      for (int L = 0; L < pl.Lmax; ++L) {
        const int64_t nodes = p.rows << L;
        const int64_t avg = std::max<int64_t>(pl.ucap >> L, 1);  // columns per node, roughly
        if (avg <= 32) {
          dp_level_thread_kernel<<<grid_for(nodes), kThreads, 0, st>>>(rd, Dp, Dc, Jm, p.k, m, L,
                                                                       nodes);
        } else {
          int64_t G = 1;
          if (nodes < kWarpNodesMin) {
            G = std::min<int64_t>(kMaxPartials / nodes, std::max<int64_t>(avg / 256, 1));
            G = std::max<int64_t>(G, 1);
          }
          const int64_t threads = nodes * G * 32;
          dp_level_warp_kernel<<<grid_for(threads), kThreads, 0, st>>>(
              rd, Dp, Dc, Jm, p.k, m, L, nodes, (int)G, part_v, part_j);
          if (G > 1) {
            PC_CUDA_CHECK(cudaGetLastError());
            dp_level_reduce_kernel<<<grid_for(nodes), kThreads, 0, st>>>(
                rd, Dc, Jm, p.k, m, L, nodes, (int)G, part_v, part_j);
          }
        }
        PC_CUDA_CHECK(cudaGetLastError());
      }
      std::swap(Dp, Dc);
    }
  }

  // D. one warp per problem.
  {
    SolveArgs a;
    a.d = rd;
    a.J = J;
    a.U = pl.U;
    a.rows = p.rows;
    a.k = p.k;
    a.beta = p.beta;
    a.method = p.method;
    a.init = p.init;
    a.diameter = p.diameter;
    a.max_iter = p.max_iter;
    a.tol = p.tol;
    a.seed = p.seed;
    a.init_centers = b.init_centers;
    a.scratch = scratch;
    a.scratch_stride = scratch_row_bytes(p.k);
    a.centers = b.centers;
    a.mids = mids;
    a.cs = cs;
    a.n_iter = b.n_iter;
    a.shift = shift;
    solve_kernel<<<grid_for(p.rows * 32, 128), 128, 0, st>>>(a);
    PC_CUDA_CHECK(cudaGetLastError());
  }

  // E. labels over the original values; cost from the distinct values.
  {
    labels_kernel<<<grid_for(pl.N), kThreads, 0, st>>>(b.x, p.x_dtype, pl.N, p.n, p.k, mids,
                                                       b.labels);
    PC_CUDA_CHECK(cudaGetLastError());
    double* pc = reinterpret_cast<double*>(T + pl.e_cost);
    run_cost_kernel<<<grid_for(pl.U), kThreads, 0, st>>>(nruns, pl.U, runrow, vo, vs, W, p.k,
                                                         mids, cs, pc);
    PC_CUDA_CHECK(cudaGetLastError());
    size_t bytes = pl.cub_bytes;
    const int64_t* cus = ustart;
    if (p.rows == 1) {
      PC_CUDA_CHECK(cub::DeviceReduce::Sum(cubtmp, bytes, static_cast<const double*>(pc), b.cost,
                                           pl.U, st));
    } else {
      PC_CUDA_CHECK(cub::DeviceSegmentedReduce::Sum(cubtmp, bytes, static_cast<const double*>(pc),
                                                    b.cost, p.rows, cus, cus + 1, st));
    }
    penalty_kernel<<<grid_for(p.rows, 128), 128, 0, st>>>(p.rows, p.k, b.centers, p.beta,
                                                          p.diameter, b.cost);
    PC_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace kmeans
}  // namespace popcomp
