// CUDA backend of weighted 1-D K-means (HW / DRHW K-means, Bu et al. 2020 eqs. 27, 31).
//
// Pipeline (all rows at once, everything enqueued on the caller's stream, no host sync: no
// CUB entry point that copies to the host, no cudaMemcpy or stream synchronization):
//   A. order-preserving keys (-0.0 folded into +0.0) -> stable CUB radix sort by (row, key):
//      one row: the keys; several rows of 16/32-bit keys: composite 64-bit keys
//      (row << key bits | key); several rows of float64 keys (64 + row bits do not fit 64): two
//      stable passes, by key carrying the element index, then by row (the index's row)
//      carrying the index, and a gather of keys and weights -> run heads -> inclusive scan
//      (integers) -> run starts; the weights of equal values summed in a fixed order
//      (fixed_sums.h: pieces of kSumChunk elements from the run's start, then the pieces).
//   B. per run: value, row; per row: u, the largest weight (CUB max reductions), the power-of-
//      two scale of a badly scaled row (scale.h: values or weights outside [2^-100, 2^100] in
//      magnitude; as the CPU backend), shift = v[u/2]; scaled shifted values and weights, and
//      the prefix sums s0, s1, s2 (length u+1 per row) in a fixed order (fixed_sums.h: chunks of
//      kSumChunk values, chunk offsets per row in sequence). Bit-identical run to run, and equal
//      to the CPU's sequential sums for rows of at most kSumChunk distinct values.
//   C. method exact: the DP  D_m(i) = min_{m<=j<=i} D_{m-1}(j-1) + seg_cost(j, i+1)  per
//      layer by the monotone-argmin divide and conquer of the reference (same recursion:
//      mid = (lo+hi)/2, columns [clo, min(chi, mid)], ties -> smallest j), evaluated level by
//      level for a chunk of rows at once (as many as the DP budget holds; one row at least);
//      one launch per (chunk, layer, level): where nodes are many, a warp per 32 nodes, each
//      node scanned by its lane when at most kNarrow columns wide, by the whole warp otherwise
//      (the width of the node itself decides); where nodes are few, several warps per node
//      (partials reduced in order). The boundaries are backtracked per chunk into the rows'
//      scratch, so the argmin arrays hold one chunk only.
//   D. one warp per problem: k >= u / exact boundaries / init (lane 0), lloyd with the
//      assignment searches spread over the lanes (same results as kmeans_math.h's lloyd; a
//      scaled row with the rescaled beta), then unshift (and unscale) and midpoints. A scaled
//      row that runs no Lloyd step takes its centers in the original coordinates (k >= u: the
//      values; exact: each segment's weighted mean as a convex combination, one lane per
//      center), as the CPU backend.
//   E. labels from the original x (nearest center, ties to the lower one); cost from the
//      distinct values, sum_g W_g (v_g - c_label)^2 in the shifted coordinates as the CPU
//      backend computes it, per-row sums by CUB reductions, plus the diameter penalty. A scaled
//      row's cost is summed without over- or underflow (scale.h's ScaledSumSq, in chunks of
//      kSumChunk values merged in chunk order: the CPU's sequential sum for rows of at most
//      kSumChunk distinct values) and mapped back.
//
// Workspace: one buffer from the caller, carved by a Plan computed from Params and the DP
// budget only, so that cuda_workspace_bytes() and run_cuda() agree. Upper bounds used: total
// values N = rows*n, total distinct values U = rows * min(n, 65536 for 16-bit inputs).
//
// Determinism: every floating-point sum is formed in an order fixed by the input (the sorts
// are stable, the sums above fixed-order, the DP's argmins reduced lexicographically, the
// per-row costs by CUB's segmented / device reductions, which use no atomics), so repeated
// runs on one device give bit-identical results. Compiled with --fmad=false (CMakeLists.txt)
// to round like the CPU build.
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
#include "kmeans/fixed_sums.h"
#include "kmeans/scale.h"
#include "kmeans/sort_keys.h"

namespace popcomp {
namespace kmeans {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;      // grid-stride kernels
constexpr int64_t kMaxPartials = 1 << 15;    // (node, warp) partial argmins per DP level
constexpr int kWarpNodesMin = 4096;          // enough nodes for the mixed kernel
constexpr int64_t kNarrow = 32;              // columns a lane scans alone (wider: the warp)

size_t align_up(size_t x) { return (x + 255) & ~size_t(255); }

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

struct Plan {
  int64_t rows = 0, n = 0, N = 0, ucap = 0, U = 0;
  int64_t nsc = 1;      // fixed-order sum chunks per row: sum_chunks(ucap)
  int64_t pieces = 0;   // upper bound of the run-weight pieces: U + N / kSumChunk
  int64_t dp_rows = 0;  // rows per DP chunk
  int64_t Uc = 0;       // distinct values per DP chunk (upper bound): dp_rows * ucap
  int k = 1;
  int keybits = 32;
  int sort_bits = 32;   // end_bit of the radix sort
  int sort_bytes = 4;   // sizeof the sorted key type: 2, 4 or 8
  SortMode mode = SortMode::single;
  bool need_dp = false;
  int Lmax = 0;         // recursion levels of the DP divide and conquer
  size_t cub_bytes = 0;
  // persistent region
  size_t o_ustart = 0, o_nruns = 0, o_shift = 0, o_wmax = 0, o_rscale = 0, o_mids = 0, o_cs = 0,
         o_scratch = 0, o_vo = 0, o_vs = 0,
         o_W = 0, o_runrow = 0, o_S0 = 0, o_S1 = 0, o_S2 = 0, o_cub = 0, o_temp = 0;
  // phase A (sort / dedup), relative to o_temp
  size_t a_kA = 0, a_kB = 0, a_wA = 0, a_wB = 0, a_pos = 0, a_runpos = 0, a_pend = 0,
         a_psum = 0, a_end = 0;
  // phase B (prefix sums)
  size_t b_tot = 0, b_end = 0;
  // phase C (DP)
  size_t c_D0 = 0, c_D1 = 0, c_J = 0, c_part = 0, c_end = 0;
  // phase E (cost; ssq: the scaled rows' chunk sums, nsc per row)
  size_t e_cost = 0, e_ssq = 0, e_end = 0;
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
    case DType::f64: return key_to_double(key);
    case DType::f32: return (double)key_to_float((uint32_t)key);
    case DType::f16: return (double)half_bits_to_float(half_key_to_bits((uint32_t)key));
    default: return (double)bf16_bits_to_float(half_key_to_bits((uint32_t)key));
  }
}

// keys[i] (with the row above composite_shift when > 0); the payload: the element index when
// idx != nullptr (two-pass sort), else the weight (when weighted).
template <typename ST>
__global__ void make_keys_kernel(const void* x, DType xt, const void* w, DType wt, int64_t N,
                                 int64_t n, int composite_shift, ST* keys, double* wout,
                                 int64_t* idx) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N;
       i += (int64_t)gridDim.x * blockDim.x) {
    uint64_t key = raw_key(x, xt, i);
    if (composite_shift > 0) key = composite_key(key, i / n, composite_shift);
    keys[i] = (ST)key;
    if (idx != nullptr) idx[i] = i;
    else if (w != nullptr) wout[i] = load_as_double(w, wt, i);
  }
}

// Two-pass sort, between the passes: the row of each element, from its index.
__global__ void row_keys_kernel(const int64_t* idx, int64_t N, int64_t n, uint32_t* rowk) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N;
       i += (int64_t)gridDim.x * blockDim.x)
    rowk[i] = (uint32_t)(idx[i] / n);
}

// Two-pass sort, after the passes: keys (and weights) in (row, key) order from the indices.
__global__ void gather_kernel(const void* x, DType xt, const void* w, DType wt,
                              const int64_t* idx, int64_t N, uint64_t* keys, double* wout) {
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < N;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = idx[t];
    keys[t] = raw_key(x, xt, i);
    if (w != nullptr) wout[t] = load_as_double(w, wt, i);
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

// Run weights in a fixed order (fixed_sums.h). pend[g] = pieces of run g (then scanned).
__global__ void piece_count_kernel(const int64_t* runpos, const int64_t* nruns, int64_t U,
                                   int64_t* pend) {
  const int64_t R = *nruns;
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < U;
       g += (int64_t)gridDim.x * blockDim.x)
    pend[g] = g < R ? sum_chunks(runpos[g + 1] - runpos[g]) : 0;
}

__global__ void piece_sum_kernel(const double* w, const int64_t* runpos, const int64_t* nruns,
                                 const int64_t* pend, int64_t pieces_max, double* psum) {
  const int64_t R = *nruns;
  const int64_t P = R > 0 ? pend[R - 1] : 0;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < P && p < pieces_max;
       p += (int64_t)gridDim.x * blockDim.x) {
    const int64_t g = piece_run(pend, R, p);
    const int64_t pfirst = g > 0 ? pend[g - 1] : 0;
    psum[p] = piece_sum(w, runpos[g], runpos[g + 1], pfirst, p);
  }
}

__global__ void run_weight_kernel(const int64_t* nruns, const int64_t* pend, const double* psum,
                                  double* W) {
  const int64_t R = *nruns;
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < R;
       g += (int64_t)gridDim.x * blockDim.x) {
    const int64_t pfirst = g > 0 ? pend[g - 1] : 0;
    W[g] = run_total(psum, pfirst, pend[g] - pfirst);
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
      const double val = key_value(key_of((uint64_t)keys[i0], (int)key_mask_bits), xt);
      vo[g] = val;
      vs[g] = val;
      runrow[g] = (int32_t)r;
      if (!weighted) W[g] = (double)(runpos[g + 1] - i0);
      if (i0 == r * n) ustart[r] = g;
      if (g == 0) ustart[rows] = R;
    } else {
      vo[g] = 0.0;
      vs[g] = 0.0;
      runrow[g] = (int32_t)rows;  // no row: past the last run
      W[g] = 0.0;  // (one row: the max reduction of the weights runs over all U entries)
    }
  }
}

// Per row: the scale (from the largest |value|, at either end of the sorted values, and the
// largest weight wmax) and the shift, the middle value in the scaled coordinates.
__global__ void shift_kernel(const int64_t* ustart, int64_t rows, const double* vs,
                             const double* wmax, RowScale* rscale, double* shift) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows;
       r += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = ustart[r], u = ustart[r + 1] - b;
    const double v0 = fabs(vs[b]), v1 = fabs(vs[b + u - 1]);
    const RowScale rs = row_scale(v0 < v1 ? v1 : v0, wmax[r]);
    rscale[r] = rs;
    const double m = vs[b + u / 2];
    shift[r] = rs.ev != 0 ? ldexp(m, rs.ev) : m;
  }
}

// The values scaled and shifted, the weights scaled (powers of two: exact but for underflow,
// as on the CPU).
__global__ void shift_values_kernel(const int64_t* nruns, const int32_t* runrow,
                                    const RowScale* rscale, const double* shift, double* vs,
                                    double* W) {
  const int64_t R = *nruns;
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < R;
       g += (int64_t)gridDim.x * blockDim.x) {
    const int32_t r = runrow[g];
    const RowScale rs = rscale[r];
    const double v = vs[g];
    vs[g] = (rs.ev != 0 ? ldexp(v, rs.ev) : v) - shift[r];
    if (rs.ew != 0) W[g] = ldexp(W[g], rs.ew);
  }
}

// Prefix sums in a fixed order (fixed_sums.h): thread id = (row, chunk) of nsc chunks per row.
__global__ void chunk_total_kernel(const int64_t* ustart, int64_t rows, int64_t nsc,
                                   const double* vs, const double* W, Sum3* tot) {
  for (int64_t id = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; id < rows * nsc;
       id += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = id / nsc, c = id - r * nsc;
    const int64_t b = ustart[r], u = ustart[r + 1] - b;
    if (c < sum_chunks(u)) tot[id] = chunk_total(vs, W, b, u, c);
  }
}

__global__ void chunk_offsets_kernel(const int64_t* ustart, int64_t rows, int64_t nsc,
                                     Sum3* tot) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows;
       r += (int64_t)gridDim.x * blockDim.x)
    chunk_offsets(tot + r * nsc, sum_chunks(ustart[r + 1] - ustart[r]));
}

__global__ void chunk_scan_kernel(const int64_t* ustart, int64_t rows, int64_t nsc,
                                  const double* vs, const double* W, const Sum3* off, double* S0,
                                  double* S1, double* S2) {
  for (int64_t id = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; id < rows * nsc;
       id += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = id / nsc, c = id - r * nsc;
    const int64_t b = ustart[r], u = ustart[r + 1] - b;
    if (c < sum_chunks(u))
      chunk_scan(vs, W, b, u, c, off[id], S0 + b + r, S1 + b + r, S2 + b + r);
  }
}

// ---------------------------------------------------------------------------------------
// Exact DP

// D of layer 0 for the rows [r0, r1) (indexed from ustart[r0]).
__global__ void dp_init_kernel(RowData d, int64_t r0, int64_t r1, const int32_t* runrow, int k,
                               double* D) {
  const int64_t g0 = d.ustart[r0], g1 = d.ustart[r1];
  for (int64_t g = g0 + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < g1;
       g += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = runrow[g];
    int64_t base;
    Prefix P = row_prefix(d, r, &base);
    if ((int64_t)k >= P.u) continue;
    D[g - g0] = seg_cost(P, 0, g - base + 1);
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

// The argmin over the columns [clo + first, hc] by steps of `step` (first minimum).
__device__ __forceinline__ void scan_columns(const DpNode& nd, const double* Dp, int64_t first,
                                             int64_t step, double& best, int64_t& bj) {
  best = kInf;
  bj = kNoJ;
  for (int64_t j = nd.clo + first; j <= nd.hc; j += step) {
    const double v = dp_val(nd, Dp, j);
    if (v < best) {
      best = v;
      bj = j;
    }
  }
}

// Many nodes: warp w takes the nodes 32 w .. 32 w + 31 (node id = 32 w + lane). A node of at
// most kNarrow columns is scanned by its lane; each wider one by the whole warp, one after the
// other (the width of the node decides, not the level's average).
__global__ void dp_level_mixed_kernel(RowData d, int64_t r0, const double* Dp, double* Dc,
                                      int32_t* Jm, int k, int m, int L, int64_t nodes) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t w = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5; w * 32 < nodes;
       w += warps) {  // uniform across the warp
    const int64_t id = w * 32 + lane;
    DpNode nd;
    const bool valid = id < nodes && dp_node(d, Jm, k, m, L, id, nd, r0);
    const bool wide = valid && nd.hc - nd.clo + 1 > kNarrow;
    if (valid && !wide) {
      double best;
      int64_t bj;
      scan_columns(nd, Dp, 0, 1, best, bj);
      Dc[nd.lbase + nd.mid] = best;
      Jm[nd.lbase + nd.mid] = (int32_t)bj;
    }
    for (unsigned mask = __ballot_sync(0xffffffffu, wide); mask != 0; mask &= mask - 1) {
      DpNode wn;  // the same node for every lane (reads only earlier levels' entries)
      dp_node(d, Jm, k, m, L, w * 32 + (__ffs(mask) - 1), wn, r0);
      double best;
      int64_t bj;
      scan_columns(wn, Dp, lane, 32, best, bj);
      warp_argmin(best, bj);
      if (lane == 0) {
        Dc[wn.lbase + wn.mid] = best;
        Jm[wn.lbase + wn.mid] = (int32_t)bj;
      }
    }
  }
}

// Few wide nodes: G warps per node (G = 1: the warp writes the result; G > 1: partials,
// reduced in order).
__global__ void dp_level_warp_kernel(RowData d, int64_t r0, const double* Dp, double* Dc,
                                     int32_t* Jm, int k, int m, int L, int64_t nodes, int G,
                                     double* part_v, int64_t* part_j) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t wid = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5; wid < nodes * G;
       wid += warps) {
    const int64_t id = wid / G;
    const int g = (int)(wid - id * G);
    DpNode nd;
    if (!dp_node(d, Jm, k, m, L, id, nd, r0)) continue;  // uniform across the warp
    double best;
    int64_t bj;
    scan_columns(nd, Dp, (int64_t)g * 32 + lane, (int64_t)G * 32, best, bj);
    warp_argmin(best, bj);
    if (lane == 0) {
      if (G == 1) {
        Dc[nd.lbase + nd.mid] = best;
        Jm[nd.lbase + nd.mid] = (int32_t)bj;
      } else {
        part_v[wid] = best;
        part_j[wid] = bj;
      }
    }
  }
}

__global__ void dp_level_reduce_kernel(RowData d, int64_t r0, double* Dc, int32_t* Jm, int k,
                                       int m, int L, int64_t nodes, int G, const double* part_v,
                                       const int64_t* part_j) {
  for (int64_t id = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; id < nodes;
       id += (int64_t)gridDim.x * blockDim.x) {
    DpNode nd;
    if (!dp_node(d, Jm, k, m, L, id, nd, r0)) continue;
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
    Dc[nd.lbase + nd.mid] = best;
    Jm[nd.lbase + nd.mid] = (int32_t)bj;
  }
}

// The boundaries of the rows [r0, r1) into their scratch (Scratch::B, read by solve_row).
__global__ void dp_backtrack_kernel(const int64_t* ustart, int64_t r0, int64_t r1, int k,
                                    const int32_t* J, int64_t Uc, unsigned char* scratch,
                                    size_t scratch_stride) {
  for (int64_t r = r0 + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < r1;
       r += (int64_t)gridDim.x * blockDim.x) {
    const int64_t u = ustart[r + 1] - ustart[r];
    if ((int64_t)k >= u) continue;
    int64_t* B = reinterpret_cast<int64_t*>(scratch + r * scratch_stride);
    dp_backtrack(J, Uc, ustart[r] - ustart[r0], u, k, B);
  }
}

// ---------------------------------------------------------------------------------------
// Per-problem solve (one warp per row)

struct SolveArgs {
  RowData d;
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
  double* cs;  // sorted centers in the shifted coordinates (scaled rows: scaled, unshifted)
  int64_t* n_iter;
  double* shift;
  const RowScale* rscale;
  const double* vo;  // the original distinct values
  const double* W;   // their (scaled) weights
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

// One warp per problem (lane 0 does the O(k) and O(k^2) parts, the lanes the searches). The
// steps of the CPU backend's solve() (kmeans_cpu.cpp), scaled rows included.
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
  const RowScale rs = a.rscale[r];
  const bool scaled = rs.scaled();
  // the penalty of the scaled problem (its objective is the original one times 2^(ew + 2 ev))
  const double beta =
      scaled && a.beta > 0.0 ? scaled_beta(a.beta, a.diameter, rs.ev, rs.ew) : a.beta;
  const bool all_values = (int64_t)k >= u;
  const bool exact = a.method == Method::exact;
  const bool run_lloyd = all_values || exact ? beta > 0.0 : true;
  // a scaled row without Lloyd steps: its centers formed in the original coordinates
  const bool direct = scaled && !run_lloyd;
  if (lane == 0) {
    if (all_values) {
      if (direct) {  // every value its own center, exactly
        for (int j = 0; j < k; ++j) c[j] = a.vo[base + ((int64_t)j < u ? j : u - 1)];
      } else {
        for (int j = 0; j < k; ++j) c[j] = P.v[(int64_t)j < u ? j : u - 1];
      }
    } else if (exact) {
      int64_t* B = s.B;  // backtracked by dp_backtrack_kernel (k > 1)
      if (k == 1) {
        B[0] = 0;
        B[1] = u;
      }
      if (!direct) {
        for (int j = 0; j < k; ++j) {
          const double H = P.s0[B[j + 1]] - P.s0[B[j]];
          const double S = P.s1[B[j + 1]] - P.s1[B[j]];
          c[j] = H > 0.0 ? S / H : 0.5 * (P.v[B[j]] + P.v[B[j + 1] - 1]);
        }
      }
    } else {
      switch (a.init) {
        case Init::given: {  // (a scaled row: the initial centers in the scaled coordinates)
          const double sh = a.shift[r];
          for (int j = 0; j < k; ++j) {
            const double c0 = a.init_centers[r * k + j];
            c[j] = (scaled ? ldexp(c0, rs.ev) : c0) - sh;
          }
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
  if (direct && exact && !all_values) {
    // each center the weighted mean of its segment in the original coordinates, as a convex
    // combination (scale.h; no overflow, no underflow of a cluster of tiny values): one lane
    // per center, each sum in sequence as on the CPU
    const int64_t* B = s.B;
    for (int j = lane; j < k; j += 32)
      c[j] = convex_mean(a.vo, a.W, base + B[j], base + B[j + 1]);
    __syncwarp();
  }
  int it = 0;
  double obj = 0.0;
  if (run_lloyd) it = lloyd_warp(P, k, c, beta, a.diameter, a.max_iter, a.tol, s, &obj, lane);
  if (lane != 0) return;
  sort_small(c, k);
  const double sh = a.shift[r];
  if (!scaled) {
    for (int j = 0; j < k; ++j) {
      a.cs[r * k + j] = c[j];
      c[j] += sh;
    }
  } else {
    // back to the original coordinates (direct: already there); the cost pass takes the
    // centers in the scaled coordinates, from the original ones as the CPU does
    if (!direct)
      for (int j = 0; j < k; ++j) c[j] = ldexp(c[j] + sh, -rs.ev);
    for (int j = 0; j < k; ++j) a.cs[r * k + j] = ldexp(c[j], rs.ev);
  }
  for (int j = 0; j + 1 < k; ++j) a.mids[r * (k - 1) + j] = 0.5 * c[j] + 0.5 * c[j + 1];
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
// (0 for the values of scaled rows: their cost is summed by scaled_cost_*_kernel.)
__global__ void run_cost_kernel(const int64_t* nruns, int64_t U, const int32_t* runrow,
                                const RowScale* rscale, const double* vo, const double* vs,
                                const double* W, int k, const double* mids, const double* cs,
                                double* pc) {
  const int64_t R = *nruns;
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < U;
       g += (int64_t)gridDim.x * blockDim.x) {
    if (g < R && !rscale[runrow[g]].scaled()) {
      const int64_t r = runrow[g];
      const int l = nearest_label(mids + r * (k - 1), k - 1, vo[g]);
      const double d = vs[g] - cs[r * k + l];
      pc[g] = W[g] * d * d;
    } else {
      pc[g] = 0.0;
    }
  }
}

// Scaled rows: the cost of chunk c (kSumChunk distinct values) of row r, thread id = (r, c) of
// nsc chunks per row: sum_g (sqrt(W_g) (v_g 2^ev - cs_label))^2 without over- or underflow, in
// the scaled problem (scaled weights W, centers cs scaled from the original ones).
__global__ void scaled_cost_chunk_kernel(const int64_t* ustart, int64_t rows, int64_t nsc,
                                         const RowScale* rscale, const double* vo,
                                         const double* W, int k, const double* mids,
                                         const double* cs, ScaledSumSq* part) {
  for (int64_t id = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; id < rows * nsc;
       id += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = id / nsc, c = id - r * nsc;
    const RowScale rs = rscale[r];
    if (!rs.scaled()) continue;
    const int64_t b = ustart[r], u = ustart[r + 1] - b;
    if (c >= sum_chunks(u)) continue;
    const int64_t t0 = c * kSumChunk, t1 = t0 + kSumChunk < u ? t0 + kSumChunk : u;
    part[id] =
        scaled_cost_sum(vo, W, b + t0, b + t1, rs.ev, mids + r * (k - 1), k - 1, cs + r * k);
  }
}

// Scaled rows: the chunk sums merged in chunk order, mapped back to the original problem
// (times 2^-(ew + 2 ev)) into cost[r] (replacing the CUB sum of the zeros run_cost_kernel left).
__global__ void scaled_cost_row_kernel(const int64_t* ustart, int64_t rows, int64_t nsc,
                                       const RowScale* rscale, const ScaledSumSq* part,
                                       double* cost) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows;
       r += (int64_t)gridDim.x * blockDim.x) {
    const RowScale rs = rscale[r];
    if (!rs.scaled()) continue;
    const int64_t nc = sum_chunks(ustart[r + 1] - ustart[r]);
    ScaledSumSq acc = part[r * nsc];
    for (int64_t c = 1; c < nc; ++c) acc.merge(part[r * nsc + c]);
    cost[r] = acc.value_times_pow2(-rs.ew - 2 * rs.ev);
  }
}

// (beta = 0: no term, as on the CPU, also where the diameter overflows to inf: 0 * inf = NaN)
__global__ void penalty_kernel(int64_t rows, int k, const double* centers, double beta,
                               Diameter dm, double* cost) {
  if (!(beta > 0.0)) return;
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

// CUB scratch of one stable radix sort of N keys (with values: pairs) on the bits [0, bits).
template <typename K, typename V>
size_t radix_temp(int64_t N, int bits, bool pairs) {
  size_t bytes = 0;
  const K* kin = nullptr;
  K* kout = nullptr;
  const V* vin = nullptr;
  V* vout = nullptr;
  if (pairs)
    PC_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, kin, kout, vin, vout, N, 0,
                                                  bits));
  else
    PC_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(nullptr, bytes, kin, kout, N, 0, bits));
  return bytes;
}

// One stable radix sort (keys only when vin is null); no host synchronization.
template <typename K, typename V>
void radix_sort(void* temp, size_t temp_bytes, const K* kin, K* kout, const V* vin, V* vout,
                int64_t N, int bits, cudaStream_t st) {
  size_t bytes = temp_bytes;
  if (vin != nullptr)
    PC_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, bytes, kin, kout, vin, vout, N, 0, bits,
                                                  st));
  else
    PC_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(temp, bytes, kin, kout, N, 0, bits, st));
}

size_t sort_temp(const Plan& pl) {
  switch (pl.mode) {
    case SortMode::twopass:
      return std::max(radix_temp<uint64_t, int64_t>(pl.N, 64, true),
                      radix_temp<uint32_t, int64_t>(pl.N, bits_for(pl.rows - 1), true));
    default:
      switch (pl.sort_bytes) {
        case 2: return std::max(radix_temp<uint16_t, double>(pl.N, pl.sort_bits, true),
                                radix_temp<uint16_t, double>(pl.N, pl.sort_bits, false));
        case 4: return std::max(radix_temp<uint32_t, double>(pl.N, pl.sort_bits, true),
                                radix_temp<uint32_t, double>(pl.N, pl.sort_bits, false));
        default: return std::max(radix_temp<uint64_t, double>(pl.N, pl.sort_bits, true),
                                 radix_temp<uint64_t, double>(pl.N, pl.sort_bits, false));
      }
  }
}

// Bytes of DP workspace per row: D of two layers and the argmins of k - 1 layers.
int64_t dp_row_bytes(int64_t ucap, int k) { return ucap * (16 + 4 * (int64_t)(k - 1)); }

Plan make_plan(const Params& p, size_t dp_budget) {
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
  pl.mode = sort_mode(p.rows, pl.keybits);
  if (pl.mode == SortMode::single) {
    pl.sort_bits = pl.keybits;
    pl.sort_bytes = pl.keybits / 8;
  } else if (pl.mode == SortMode::composite) {  // one radix sort on (row, key)
    pl.sort_bits = composite_bits(p.rows, pl.keybits);
    pl.sort_bytes = 8;
  } else {  // float64: by key, then (stable) by row
    pl.sort_bits = 64;
    pl.sort_bytes = 8;
  }
#if CUB_VERSION < 300000
  // Before CCCL 3 (CUDA 13) several of the CUB entry points used here take an int item count:
  // larger inputs would be silently truncated.
  if (pl.N > (int64_t)INT32_MAX || pl.U + pl.rows > (int64_t)INT32_MAX)
    throw std::invalid_argument(
        "kmeans1d cuda: more than 2^31 - 1 values in all needs a build with CUDA 13 (CCCL 3)");
#endif
  pl.need_dp = p.method == Method::exact && (int64_t)p.k < pl.ucap && p.k > 1;
  pl.Lmax = dp_levels(pl.ucap);
  pl.nsc = sum_chunks(pl.ucap);
  pl.pieces = pl.U + pl.N / kSumChunk + 1;
  pl.dp_rows = dp_chunk_rows(pl.rows, dp_row_bytes(pl.ucap, p.k),
                             (int64_t)std::min<size_t>(dp_budget, (size_t)INT64_MAX));
  pl.Uc = pl.dp_rows * pl.ucap;

  // CUB temporary storage: the largest of all calls.
  size_t cub = sort_temp(pl);
  {
    size_t b = 0;
    int64_t* pos = nullptr;
    PC_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, b, pos, pos, pl.N));
    cub = std::max(cub, b);
    PC_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, b, pos, pos, pl.U));
    cub = std::max(cub, b);
  }
  {
    size_t b = 0;
    const double* in = nullptr;
    double* out = nullptr;
    if (pl.rows == 1) {
      PC_CUDA_CHECK(cub::DeviceReduce::Sum(nullptr, b, in, out, pl.U));
      cub = std::max(cub, b);
      b = 0;
      PC_CUDA_CHECK(cub::DeviceReduce::Max(nullptr, b, in, out, pl.U));
    } else {
      const int64_t* off = nullptr;
      PC_CUDA_CHECK(cub::DeviceSegmentedReduce::Sum(nullptr, b, in, out, pl.rows, off, off + 1));
      cub = std::max(cub, b);
      b = 0;
      PC_CUDA_CHECK(cub::DeviceSegmentedReduce::Max(nullptr, b, in, out, pl.rows, off, off + 1));
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
  pl.o_ustart = take((rows + 1) * 8);
  pl.o_nruns = take(8);
  pl.o_shift = take(rows * 8);
  pl.o_wmax = take(rows * 8);
  pl.o_rscale = take(rows * sizeof(RowScale));
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
  // two-pass sort: the indices travel in wA / wB, the rows in the two halves of pos
  pl.a_kA = tk(N * pl.sort_bytes);
  pl.a_kB = tk(N * pl.sort_bytes);
  pl.a_wA = tk(N * 8);
  pl.a_wB = tk(N * 8);
  pl.a_pos = tk(N * 8);
  pl.a_runpos = tk((U + 1) * 8);
  pl.a_pend = tk(U * 8);
  pl.a_psum = tk((size_t)pl.pieces * 8);
  pl.a_end = a;

  a = 0;
  pl.b_tot = tk(rows * (size_t)pl.nsc * sizeof(Sum3));
  pl.b_end = a;

  a = 0;
  if (pl.need_dp) {
    const size_t Uc = (size_t)pl.Uc;
    pl.c_D0 = tk(Uc * 8);
    pl.c_D1 = tk(Uc * 8);
    pl.c_J = tk((size_t)(p.k - 1) * Uc * 4);
    pl.c_part = tk((size_t)kMaxPartials * 16);
  }
  pl.c_end = a;

  a = 0;
  pl.e_cost = tk(U * 8);
  pl.e_ssq = tk(rows * (size_t)pl.nsc * sizeof(ScaledSumSq));
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
  int64_t* pend = reinterpret_cast<int64_t*>(T + pl.a_pend);
  double* psum = reinterpret_cast<double*>(T + pl.a_psum);
  int64_t* ustart = reinterpret_cast<int64_t*>(ws + pl.o_ustart);
  int64_t* nruns = reinterpret_cast<int64_t*>(ws + pl.o_nruns);
  double* vo = reinterpret_cast<double*>(ws + pl.o_vo);
  double* vs = reinterpret_cast<double*>(ws + pl.o_vs);
  double* W = reinterpret_cast<double*>(ws + pl.o_W);
  int32_t* runrow = reinterpret_cast<int32_t*>(ws + pl.o_runrow);
  void* cubtmp = ws + pl.o_cub;
  const bool weighted = b.w != nullptr;

  if (pl.mode == SortMode::twopass) {  // (ST is uint64_t here: sort_bytes 8)
    uint64_t* k64A = reinterpret_cast<uint64_t*>(kA);
    uint64_t* k64B = reinterpret_cast<uint64_t*>(kB);
    int64_t* idxA = reinterpret_cast<int64_t*>(wA);
    int64_t* idxB = reinterpret_cast<int64_t*>(wB);
    uint32_t* rowA = reinterpret_cast<uint32_t*>(pos);
    uint32_t* rowB = rowA + pl.N;
    make_keys_kernel<uint64_t><<<grid_for(pl.N), kThreads, 0, st>>>(
        b.x, p.x_dtype, nullptr, p.w_dtype, pl.N, pl.n, 0, k64A, nullptr, idxA);
    PC_CUDA_CHECK(cudaGetLastError());
    radix_sort<uint64_t, int64_t>(cubtmp, pl.cub_bytes, k64A, k64B, idxA, idxB, pl.N, 64, st);
    row_keys_kernel<<<grid_for(pl.N), kThreads, 0, st>>>(idxB, pl.N, pl.n, rowA);
    PC_CUDA_CHECK(cudaGetLastError());
    radix_sort<uint32_t, int64_t>(cubtmp, pl.cub_bytes, rowA, rowB, idxB, idxA, pl.N,
                                  bits_for(pl.rows - 1), st);
    gather_kernel<<<grid_for(pl.N), kThreads, 0, st>>>(b.x, p.x_dtype, b.w, p.w_dtype, idxA,
                                                       pl.N, k64B, wB);
    PC_CUDA_CHECK(cudaGetLastError());
  } else {
    const int shiftc = pl.mode == SortMode::composite ? pl.keybits : 0;
    make_keys_kernel<ST><<<grid_for(pl.N), kThreads, 0, st>>>(
        b.x, p.x_dtype, b.w, p.w_dtype, pl.N, pl.n, shiftc, kA, wA, nullptr);
    PC_CUDA_CHECK(cudaGetLastError());
    radix_sort<ST, double>(cubtmp, pl.cub_bytes, kA, kB, weighted ? wA : nullptr, wB, pl.N,
                           pl.sort_bits, st);
  }
  heads_kernel<ST><<<grid_for(pl.N), kThreads, 0, st>>>(kB, pl.N, pl.n, pos);
  PC_CUDA_CHECK(cudaGetLastError());
  {
    size_t bytes = pl.cub_bytes;
    PC_CUDA_CHECK(cub::DeviceScan::InclusiveSum(cubtmp, bytes, pos, pos, pl.N, st));
  }
  run_starts_kernel<<<grid_for(pl.N), kThreads, 0, st>>>(pos, pl.N, runpos, nruns);
  PC_CUDA_CHECK(cudaGetLastError());
  runs_kernel<ST><<<grid_for(pl.U), kThreads, 0, st>>>(kB, runpos, nruns, pl.U, pl.n, pl.rows,
                                                       p.x_dtype, pl.keybits, weighted, vo, vs,
                                                       W, runrow, ustart);
  PC_CUDA_CHECK(cudaGetLastError());
  if (weighted) {  // the weight of each run, in a fixed order (fixed_sums.h)
    piece_count_kernel<<<grid_for(pl.U), kThreads, 0, st>>>(runpos, nruns, pl.U, pend);
    PC_CUDA_CHECK(cudaGetLastError());
    size_t bytes = pl.cub_bytes;
    PC_CUDA_CHECK(cub::DeviceScan::InclusiveSum(cubtmp, bytes, pend, pend, pl.U, st));
    piece_sum_kernel<<<grid_for(pl.pieces), kThreads, 0, st>>>(wB, runpos, nruns, pend,
                                                               pl.pieces, psum);
    PC_CUDA_CHECK(cudaGetLastError());
    run_weight_kernel<<<grid_for(pl.U), kThreads, 0, st>>>(nruns, pend, psum, W);
    PC_CUDA_CHECK(cudaGetLastError());
  }
}

// One layer's level L for the rows [r0, r0 + rc): the kernel by the node widths (see the top).
void dp_level(const Plan& pl, const RowData& rd, int64_t r0, int64_t rc, const double* Dp,
              double* Dc, int32_t* Jm, int k, int m, int L, double* part_v, int64_t* part_j,
              cudaStream_t st) {
  const int64_t nodes = rc << L;
  const int64_t avg = std::max<int64_t>(pl.ucap >> L, 1);  // columns per node, roughly
  if (avg <= kNarrow) {
    dp_level_mixed_kernel<<<grid_for(nodes), kThreads, 0, st>>>(rd, r0, Dp, Dc, Jm, k, m, L,
                                                                nodes);
  } else {
    int64_t G = 1;
    if (nodes < kWarpNodesMin)
      G = std::max<int64_t>(std::min<int64_t>(kMaxPartials / nodes, std::max<int64_t>(avg / 256, 1)), 1);
    dp_level_warp_kernel<<<grid_for(nodes * G * 32), kThreads, 0, st>>>(
        rd, r0, Dp, Dc, Jm, k, m, L, nodes, (int)G, part_v, part_j);
    if (G > 1) {
      PC_CUDA_CHECK(cudaGetLastError());
      dp_level_reduce_kernel<<<grid_for(nodes), kThreads, 0, st>>>(rd, r0, Dc, Jm, k, m, L, nodes,
                                                                   (int)G, part_v, part_j);
    }
  }
  PC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

size_t cuda_workspace_bytes(const Params& p, int device, size_t dp_budget) {
  // The CUB scratch sizes depend on the device (SM count, PTX version): query them on the one
  // run_cuda() will use, which recomputes the plan under the same guard.
  if (device < 0) return make_plan(p, dp_budget).total;
  DeviceGuard guard(device);
  return make_plan(p, dp_budget).total;
}

void run_cuda(const Params& p, const Buffers& b, void* workspace, size_t workspace_bytes,
              int device, void* stream, size_t dp_budget) {
  check_args(p, b, "kmeans1d_cuda");
  if (p.rows == 0 || p.n == 0) return;
  DeviceGuard guard(device);
  const Plan pl = make_plan(p, dp_budget);
  if (workspace_bytes < pl.total)
    throw std::invalid_argument("kmeans1d cuda: workspace too small (" +
                                std::to_string(workspace_bytes) + " < " +
                                std::to_string(pl.total) + " bytes)");
  cudaStream_t st = as_stream(stream);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  unsigned char* T = ws + pl.o_temp;

  int64_t* ustart = reinterpret_cast<int64_t*>(ws + pl.o_ustart);
  int64_t* nruns = reinterpret_cast<int64_t*>(ws + pl.o_nruns);
  double* shift = reinterpret_cast<double*>(ws + pl.o_shift);
  double* wmax = reinterpret_cast<double*>(ws + pl.o_wmax);
  RowScale* rscale = reinterpret_cast<RowScale*>(ws + pl.o_rscale);
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

  // A. sort, deduplicate, weights of distinct values.
  switch (pl.sort_bytes) {
    case 2: phase_sort<uint16_t>(pl, p, b, ws, st); break;
    case 4: phase_sort<uint32_t>(pl, p, b, ws, st); break;
    default: phase_sort<uint64_t>(pl, p, b, ws, st); break;
  }

  // B. the largest weight of each row (exact in any order; one row: over all U entries, zero
  // past the runs), the scale of each row, shift, and prefix sums (fixed order).
  {
    size_t bytes = pl.cub_bytes;
    const int64_t* cus = ustart;
    if (p.rows == 1) {
      PC_CUDA_CHECK(cub::DeviceReduce::Max(cubtmp, bytes, static_cast<const double*>(W), wmax,
                                           pl.U, st));
    } else {
      PC_CUDA_CHECK(cub::DeviceSegmentedReduce::Max(cubtmp, bytes, static_cast<const double*>(W),
                                                    wmax, p.rows, cus, cus + 1, st));
    }
  }
  shift_kernel<<<grid_for(p.rows, 128), 128, 0, st>>>(ustart, p.rows, vs, wmax, rscale, shift);
  PC_CUDA_CHECK(cudaGetLastError());
  shift_values_kernel<<<grid_for(pl.U), kThreads, 0, st>>>(nruns, runrow, rscale, shift, vs, W);
  PC_CUDA_CHECK(cudaGetLastError());
  {
    Sum3* tot = reinterpret_cast<Sum3*>(T + pl.b_tot);
    chunk_total_kernel<<<grid_for(p.rows * pl.nsc, 128), 128, 0, st>>>(ustart, p.rows, pl.nsc,
                                                                      vs, W, tot);
    PC_CUDA_CHECK(cudaGetLastError());
    chunk_offsets_kernel<<<grid_for(p.rows, 128), 128, 0, st>>>(ustart, p.rows, pl.nsc, tot);
    PC_CUDA_CHECK(cudaGetLastError());
    chunk_scan_kernel<<<grid_for(p.rows * pl.nsc, 128), 128, 0, st>>>(ustart, p.rows, pl.nsc, vs,
                                                                     W, tot, S0, S1, S2);
    PC_CUDA_CHECK(cudaGetLastError());
  }
  RowData rd{ustart, vs, S0, S1, S2};

  // C. exact DP (boundaries of the beta = 0 optimum), by chunks of dp_rows rows.
  if (pl.need_dp) {
    double* D0 = reinterpret_cast<double*>(T + pl.c_D0);
    double* D1 = reinterpret_cast<double*>(T + pl.c_D1);
    int32_t* J = reinterpret_cast<int32_t*>(T + pl.c_J);
    double* part_v = reinterpret_cast<double*>(T + pl.c_part);
    int64_t* part_j = reinterpret_cast<int64_t*>(T + pl.c_part + (size_t)kMaxPartials * 8);
    for (int64_t r0 = 0; r0 < p.rows; r0 += pl.dp_rows) {
      const int64_t r1 = std::min(p.rows, r0 + pl.dp_rows), rc = r1 - r0;
      double* Dp = D0;
      double* Dc = D1;
      dp_init_kernel<<<grid_for(rc * pl.ucap), kThreads, 0, st>>>(rd, r0, r1, runrow, p.k, Dp);
      PC_CUDA_CHECK(cudaGetLastError());
      for (int m = 1; m < p.k; ++m) {
        int32_t* Jm = J + (int64_t)(m - 1) * pl.Uc;
        for (int L = 0; L < pl.Lmax; ++L)
          dp_level(pl, rd, r0, rc, Dp, Dc, Jm, p.k, m, L, part_v, part_j, st);
        std::swap(Dp, Dc);
      }
      dp_backtrack_kernel<<<grid_for(rc, 128), 128, 0, st>>>(ustart, r0, r1, p.k, J, pl.Uc,
                                                             scratch, scratch_row_bytes(p.k));
      PC_CUDA_CHECK(cudaGetLastError());
    }
  }

  // D. one warp per problem.
  {
    SolveArgs a;
    a.d = rd;
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
    a.rscale = rscale;
    a.vo = vo;
    a.W = W;
    solve_kernel<<<grid_for(p.rows * 32, 128), 128, 0, st>>>(a);
    PC_CUDA_CHECK(cudaGetLastError());
  }

  // E. labels over the original values; cost from the distinct values.
  {
    labels_kernel<<<grid_for(pl.N), kThreads, 0, st>>>(b.x, p.x_dtype, pl.N, p.n, p.k, mids,
                                                       b.labels);
    PC_CUDA_CHECK(cudaGetLastError());
    double* pc = reinterpret_cast<double*>(T + pl.e_cost);
    run_cost_kernel<<<grid_for(pl.U), kThreads, 0, st>>>(nruns, pl.U, runrow, rscale, vo, vs, W,
                                                         p.k, mids, cs, pc);
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
    // scaled rows: their cost without over- or underflow, in place of the sum above
    ScaledSumSq* part = reinterpret_cast<ScaledSumSq*>(T + pl.e_ssq);
    scaled_cost_chunk_kernel<<<grid_for(p.rows * pl.nsc, 128), 128, 0, st>>>(
        ustart, p.rows, pl.nsc, rscale, vo, W, p.k, mids, cs, part);
    PC_CUDA_CHECK(cudaGetLastError());
    scaled_cost_row_kernel<<<grid_for(p.rows, 128), 128, 0, st>>>(ustart, p.rows, pl.nsc, rscale,
                                                                  part, b.cost);
    PC_CUDA_CHECK(cudaGetLastError());
    penalty_kernel<<<grid_for(p.rows, 128), 128, 0, st>>>(p.rows, p.k, b.centers, p.beta,
                                                          p.diameter, b.cost);
    PC_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace kmeans
}  // namespace popcomp
