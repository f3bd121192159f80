// CUDA kernels of spectral pruning. Every launch goes on the caller's stream of the caller's
// device; scratch memory comes from the caller (a torch uint8 tensor); nothing synchronizes
// the host.
//   accumulate: tiled symmetric rank-k update over the upper-triangular 128 x 128 tile pairs
//     (x converted to the accumulator type on load into shared memory), optionally split over
//     the samples into partial products that a second kernel adds in a fixed order.
//   greedy: the residual stays on the device in factored form R = Sigma - V V^T (V kept in
//     both m x k and k x m layouts so that every product is a coalesced warp-per-row dot);
//     five small launches per step (pick, new column, M v, [Sigma; V^T] u, update).
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>

#include "common/cuda_utils.cuh"
#include "covariance/covariance.h"
#include "covariance/covariance_math.h"

namespace popcomp {
namespace covariance {
namespace {

// ---- accumulation ----------------------------------------------------------------------------
constexpr int BT = 128;  // tile edge
constexpr int BK = 8;    // samples per shared-memory stage
constexpr int TM = 8;    // 8 x 8 outputs per thread (rows ty + 16 r, columns tx + 16 c), 16 x 16 threads

int64_t num_tiles(int64_t m) { return (m + BT - 1) / BT; }

// Sample splits: enough blocks to fill the device, at least 1024 samples per split, and at
// most 256 MiB of partial products.
int64_t accumulate_splits(const AccumParams& p, int device) {
  const int64_t N = p.B * p.S;
  const int64_t T = num_tiles(p.m);
  const int64_t pairs = T * (T + 1) / 2;
  int sms = 132;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    sms = 132;
  }
  int64_t want = (2 * (int64_t)sms + pairs - 1) / pairs;
  const int64_t esize = p.acc_dtype == DType::f64 ? 8 : 4;
  const int64_t per = std::max<int64_t>(1, p.m * p.m * esize);
  want = std::min<int64_t>(want, std::max<int64_t>(1, N / 1024));
  want = std::min<int64_t>(want, std::max<int64_t>(1, (int64_t(256) << 20) / per));
  want = std::min<int64_t>(want, 64);
  return std::max<int64_t>(want, 1);
}

template <typename A, int XD>
__global__ void __launch_bounds__(256)
    syrk_kernel(AccumParams p, const void* __restrict__ x, A* __restrict__ out, int64_t T,
                int64_t chunk, int partial) {
  int64_t I, J;
  tri_index(blockIdx.x, T, &I, &J);
  const int64_t m = p.m, N = p.B * p.S;
  const int64_t i0 = I * BT, j0 = J * BT;
  const int64_t nb = (int64_t)blockIdx.y * chunk;
  const int64_t ne = min(N, nb + chunk);
  __shared__ A As[BK][BT];
  __shared__ A Bs[BK][BT];
  __shared__ int64_t base[BK];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  A acc[TM][TM];
#pragma unroll
  for (int r = 0; r < TM; ++r)
#pragma unroll
    for (int c = 0; c < TM; ++c) acc[r][c] = A(0);
  const bool chan_fast = p.sm == 1;
  for (int64_t n0 = nb; n0 < ne; n0 += BK) {
    if (tid < BK) {
      const int64_t n = n0 + tid;
      if (n < ne) {
        const int64_t b = n / p.S, s = n - b * p.S;
        base[tid] = b * p.sB + s * p.sS;
      } else {
        base[tid] = -1;
      }
    }
    __syncthreads();
    for (int e = tid; e < BK * BT; e += 256) {
      const int kk = chan_fast ? e / BT : e % BK;
      const int cc = chan_fast ? e % BT : e / BK;
      const int64_t off = base[kk];
      A va = A(0), vb = A(0);
      if (off >= 0) {
        if (i0 + cc < m) va = load_as<A>(x, (DType)XD, off + (i0 + cc) * p.sm);
        if (j0 + cc < m) vb = load_as<A>(x, (DType)XD, off + (j0 + cc) * p.sm);
      }
      As[kk][cc] = va;
      Bs[kk][cc] = vb;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      A a[TM], b[TM];
#pragma unroll
      for (int r = 0; r < TM; ++r) a[r] = As[kk][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < TM; ++c) b[c] = Bs[kk][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < TM; ++r)
#pragma unroll
        for (int c = 0; c < TM; ++c) acc[r][c] += a[r] * b[c];
    }
    __syncthreads();
  }
  A* dst = partial ? out + (int64_t)blockIdx.y * m * m : out;
#pragma unroll
  for (int r = 0; r < TM; ++r) {
    const int64_t i = i0 + ty + 16 * r;
    if (i >= m) continue;
#pragma unroll
    for (int c = 0; c < TM; ++c) {
      const int64_t j = j0 + tx + 16 * c;
      if (j >= m) continue;
      if (partial) {
        dst[i * m + j] = acc[r][c];
        if (I != J) dst[j * m + i] = acc[r][c];
      } else {
        dst[i * m + j] += acc[r][c];
        if (I != J) dst[j * m + i] += acc[r][c];
      }
    }
  }
}

template <typename A>
__global__ void reduce_partials(const A* __restrict__ part, int64_t splits, int64_t mm,
                                A* __restrict__ acc) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < mm;
       e += (int64_t)gridDim.x * blockDim.x) {
    A s = A(0);
    for (int64_t q = 0; q < splits; ++q) s += part[q * mm + e];
    acc[e] += s;
  }
}

template <typename A, int XD>
void launch_accumulate(const AccumParams& p, const void* x, A* acc, void* ws, size_t ws_bytes,
                       int device, cudaStream_t st) {
  const int64_t N = p.B * p.S, T = num_tiles(p.m), pairs = T * (T + 1) / 2;
  int64_t splits = accumulate_splits(p, device);
  const size_t need = splits > 1 ? (size_t)splits * p.m * p.m * sizeof(A) : 0;
  if (ws_bytes < need) splits = 1;  // fall back to a single pass
  int64_t chunk = (N + splits - 1) / splits;
  chunk = (chunk + BK - 1) / BK * BK;
  splits = (N + chunk - 1) / chunk;
  dim3 grid((unsigned)pairs, (unsigned)splits);
  if (splits > 1) {
    A* part = static_cast<A*>(ws);
    syrk_kernel<A, XD><<<grid, 256, 0, st>>>(p, x, part, T, chunk, 1);
    PC_CUDA_CHECK(cudaGetLastError());
    const int64_t mm = p.m * p.m;
    const int blocks = (int)std::min<int64_t>((mm + 255) / 256, 4096);
    reduce_partials<A><<<blocks, 256, 0, st>>>(part, splits, mm, acc);
  } else {
    syrk_kernel<A, XD><<<grid, 256, 0, st>>>(p, x, acc, T, chunk, 0);
  }
  PC_CUDA_CHECK(cudaGetLastError());
}

template <typename A>
void dispatch_accumulate(const AccumParams& p, const void* x, A* acc, void* ws, size_t wsb,
                         int device, cudaStream_t st) {
  switch (p.x_dtype) {
    case DType::f64: return launch_accumulate<A, 0>(p, x, acc, ws, wsb, device, st);
    case DType::f32: return launch_accumulate<A, 1>(p, x, acc, ws, wsb, device, st);
    case DType::f16: return launch_accumulate<A, 2>(p, x, acc, ws, wsb, device, st);
    default: return launch_accumulate<A, 3>(p, x, acc, ws, wsb, device, st);
  }
}

// ---- greedy selection ------------------------------------------------------------------------
constexpr int WARPS = 8;  // warps (= rows) per block of the row kernels
constexpr int PICK_THREADS = 1024;

__device__ __forceinline__ double warp_sum(double s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

template <typename T, typename X>
__device__ __forceinline__ double warp_dot(const T* __restrict__ a, const X* __restrict__ b,
                                           int64_t n, int lane) {
  double s = 0.0;
#pragma unroll 4
  for (int64_t q = lane; q < n; q += 32) s += (double)a[q] * (double)b[q];
  return warp_sum(s);
}

struct GreedyWs {
  void* V;     // m x k (T)
  void* Vt;    // k x m (T)
  double* v;   // m
  double* u;   // m
  double* y;   // m
  double* c;   // k + 1
  double* n;   // m
  double* diag;
  double* sjj;
  int* chosen;
  double* pval;   // row blocks
  int64_t* pidx;  // row blocks
  int64_t* j;     // 1
  double* inv;    // 1
};

size_t align_up(size_t b) { return (b + 255) / 256 * 256; }

size_t carve(const GreedyParams& p, char* base, GreedyWs* w) {
  const size_t es = p.dtype == DType::f64 ? 8 : 4;
  const int64_t m = p.m, k = p.k, nb = (m + WARPS - 1) / WARPS;
  size_t off = 0;
  auto take = [&](size_t bytes) {
    char* q = base ? base + off : nullptr;
    off += align_up(bytes);
    return q;
  };
  char* V = take(es * m * k);
  char* Vt = take(es * m * k);
  char* v = take(8 * m);
  char* u = take(8 * m);
  char* y = take(8 * m);
  char* c = take(8 * (k + 1));
  char* n = take(8 * m);
  char* diag = take(8 * m);
  char* sjj = take(8 * m);
  char* chosen = take(4 * m);
  char* pval = take(8 * nb);
  char* pidx = take(8 * nb);
  char* j = take(8);
  char* inv = take(8);
  if (w) {
    w->V = V;
    w->Vt = Vt;
    w->v = (double*)v;
    w->u = (double*)u;
    w->y = (double*)y;
    w->c = (double*)c;
    w->n = (double*)n;
    w->diag = (double*)diag;
    w->sjj = (double*)sjj;
    w->chosen = (int*)chosen;
    w->pval = (double*)pval;
    w->pidx = (int64_t*)pidx;
    w->j = (int64_t*)j;
    w->inv = (double*)inv;
  }
  return off;
}

// Block-level argmax of one gain per warp (lane 0 holds it), ties to the lowest index.
__device__ __forceinline__ void block_argmax_rows(double g, int64_t i, double* pval,
                                                  int64_t* pidx) {
  __shared__ double sv[WARPS];
  __shared__ int64_t si[WARPS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sv[warp] = g;
    si[warp] = i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double bv = sv[0];
    int64_t bi = si[0];
    for (int q = 1; q < WARPS; ++q)
      if (better(sv[q], si[q], bv, bi)) {
        bv = sv[q];
        bi = si[q];
      }
    pval[blockIdx.x] = bv;
    pidx[blockIdx.x] = bi;
  }
}

template <typename T>
__global__ void greedy_init(const T* __restrict__ S, const double* __restrict__ n0,
                            const double* __restrict__ tau, int64_t m, double rel, GreedyWs w) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = (int64_t)blockIdx.x * WARPS + warp;
  double g = -2.0;  // rows past m never win
  int64_t gi = m;
  if (i < m && lane == 0) {
    const double s = (double)S[i * m + i];
    w.n[i] = n0[i];
    w.diag[i] = s;
    w.sjj[i] = s;
    w.chosen[i] = 0;
    g = greedy_gain(n0[i], s, tau[i], s, rel, false);
    gi = i;
  }
  block_argmax_rows(g, gi, w.pval, w.pidx);
}

__global__ void greedy_pick(int64_t nblocks, int64_t t, const double* __restrict__ tau, double rel,
                            int64_t* __restrict__ idx, GreedyWs w) {
  __shared__ double sv[PICK_THREADS / 32];
  __shared__ int64_t si[PICK_THREADS / 32];
  double bv = -3.0;
  int64_t bi = INT64_MAX;
  for (int64_t q = threadIdx.x; q < nblocks; q += blockDim.x)
    if (better(w.pval[q], w.pidx[q], bv, bi)) {
      bv = w.pval[q];
      bi = w.pidx[q];
    }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const double ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const long long oi = __shfl_xor_sync(0xffffffffu, (long long)bi, o);
    if (better(ov, (int64_t)oi, bv, bi)) {
      bv = ov;
      bi = (int64_t)oi;
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    bv = sv[0];
    bi = si[0];
    for (int q = 1; q < (int)(blockDim.x / 32); ++q)
      if (better(sv[q], si[q], bv, bi)) {
        bv = sv[q];
        bi = si[q];
      }
    idx[t] = bi;
    w.chosen[bi] = 1;
    *w.j = bi;
    const double d = greedy_pivot(w.diag[bi], tau[bi], w.sjj[bi], rel);
    *w.inv = d > 0.0 ? 1.0 / sqrt(d) : 0.0;  // as the CPU kernel (rsqrt is not correctly rounded)
  }
}

// v = (S[j,:] - V V[j,:t]^T) / sqrt(d), stored (rounded to T) as column t of V and row t of Vt.
template <typename T>
__global__ void greedy_column(const T* __restrict__ S, int64_t m, int64_t k, int64_t t, GreedyWs w) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = (int64_t)blockIdx.x * WARPS + warp;
  if (i >= m) return;
  const int64_t j = *w.j;
  const T* V = static_cast<const T*>(w.V);
  const double dot = t > 0 ? warp_dot(V + i * k, V + j * k, t, lane) : 0.0;
  if (lane == 0) {
    const double r = (double)S[j * m + i] - dot;
    const T vt = (T)(r * *w.inv);
    static_cast<T*>(w.V)[i * k + t] = vt;
    static_cast<T*>(w.Vt)[t * m + i] = vt;
    w.v[i] = (double)vt;
  }
}

// y[i] = A[i,:] . x for rows [0, m); c[s] = Vt[s,:] . x for rows m + s, s <= t (when Vt).
template <typename T>
__global__ void greedy_gemv(const T* __restrict__ A, const double* __restrict__ x, int64_t m,
                            double* __restrict__ y, const T* __restrict__ Vt, int64_t t,
                            double* __restrict__ c) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = (int64_t)blockIdx.x * WARPS + warp;
  if (row < m) {
    const double s = warp_dot(A + row * m, x, m, lane);
    if (lane == 0) y[row] = s;
  } else if (Vt != nullptr && row - m <= t) {
    const int64_t s_ = row - m;
    const double s = warp_dot(Vt + s_ * m, x, m, lane);
    if (lane == 0) c[s_] = s;
  }
}

// w_i = y_i - V[i,:t] . c[:t]; rank-one updates of n and diag; gains; block argmax; objective.
template <typename T>
__global__ void greedy_update(int64_t m, int64_t k, int64_t t, const double* __restrict__ tau,
                              double rel, const double* __restrict__ L0, double* __restrict__ obj,
                              GreedyWs w) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = (int64_t)blockIdx.x * WARPS + warp;
  const double g = w.c[t];
  double gain = -2.0;
  int64_t gi = m;
  if (i < m) {
    const T* V = static_cast<const T*>(w.V);
    const double dot = t > 0 ? warp_dot(V + i * k, w.c, t, lane) : 0.0;
    if (lane == 0) {
      const double wi = w.y[i] - dot;
      const double vi = w.v[i];
      const double n = update_numerator(w.n[i], vi, wi, g);
      const double dg = w.diag[i] - vi * vi;
      w.n[i] = n;
      w.diag[i] = dg;
      gain = greedy_gain(n, dg, tau[i], w.sjj[i], rel, w.chosen[i] != 0);
      gi = i;
    }
  }
  block_argmax_rows(gain, gi, w.pval, w.pidx);
  if (blockIdx.x == 0 && threadIdx.x == 0) obj[t] = (t > 0 ? obj[t - 1] : L0[0]) - g;
}

template <typename T>
void launch_greedy(const GreedyParams& p, const T* S, const T* M, const double* tau,
                   const double* n0, const double* L0, int64_t* idx, double* obj, void* ws,
                   cudaStream_t st) {
  GreedyWs w;
  carve(p, static_cast<char*>(ws), &w);
  const int64_t m = p.m, k = p.k;
  const int64_t nb = (m + WARPS - 1) / WARPS;
  const int threads = WARPS * 32;
  greedy_init<T><<<(unsigned)nb, threads, 0, st>>>(S, n0, tau, m, p.rel_guard, w);
  PC_CUDA_CHECK(cudaGetLastError());
  for (int64_t t = 0; t < k; ++t) {
    greedy_pick<<<1, PICK_THREADS, 0, st>>>(nb, t, tau, p.rel_guard, idx, w);
    greedy_column<T><<<(unsigned)nb, threads, 0, st>>>(S, m, k, t, w);
    const double* u = w.v;
    if (M != nullptr) {
      greedy_gemv<T><<<(unsigned)nb, threads, 0, st>>>(M, w.v, m, w.u, nullptr, 0, nullptr);
      u = w.u;
    }
    const int64_t rows = m + t + 1;
    greedy_gemv<T><<<(unsigned)((rows + WARPS - 1) / WARPS), threads, 0, st>>>(
        S, u, m, w.y, static_cast<const T*>(w.Vt), t, w.c);
    greedy_update<T><<<(unsigned)nb, threads, 0, st>>>(m, k, t, tau, p.rel_guard, L0, obj, w);
    PC_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace

size_t accumulate_cuda_workspace_bytes(const AccumParams& p, int device) {
  const int64_t splits = accumulate_splits(p, device);
  const size_t es = p.acc_dtype == DType::f64 ? 8 : 4;
  return splits > 1 ? (size_t)splits * p.m * p.m * es : 0;
}

void accumulate_cuda(const AccumParams& p, const void* x, void* acc, void* workspace,
                     size_t workspace_bytes, int device, void* stream) {
  if (p.m == 0 || p.B * p.S == 0) return;
  DeviceGuard guard(device);
  cudaStream_t st = as_stream(stream);
  if (p.acc_dtype == DType::f64)
    dispatch_accumulate<double>(p, x, static_cast<double*>(acc), workspace, workspace_bytes,
                                device, st);
  else if (p.acc_dtype == DType::f32)
    dispatch_accumulate<float>(p, x, static_cast<float*>(acc), workspace, workspace_bytes,
                               device, st);
  else
    throw std::invalid_argument("covariance accumulator must be float32 or float64");
}

size_t greedy_cuda_workspace_bytes(const GreedyParams& p) { return carve(p, nullptr, nullptr); }

void greedy_cuda(const GreedyParams& p, const void* cov, const void* M, const double* tau,
                 const double* n0, const double* L0, int64_t* idx, double* obj, void* workspace,
                 size_t workspace_bytes, int device, void* stream) {
  if (p.k <= 0 || p.m <= 0) return;
  if (p.k > p.m) throw std::invalid_argument("greedy_select: k > m");
  if (workspace_bytes < greedy_cuda_workspace_bytes(p))
    throw std::invalid_argument("greedy_select: workspace too small");
  DeviceGuard guard(device);
  cudaStream_t st = as_stream(stream);
  if (p.dtype == DType::f64)
    launch_greedy<double>(p, static_cast<const double*>(cov), static_cast<const double*>(M), tau,
                          n0, L0, idx, obj, workspace, st);
  else if (p.dtype == DType::f32)
    launch_greedy<float>(p, static_cast<const float*>(cov), static_cast<const float*>(M), tau,
                         n0, L0, idx, obj, workspace, st);
  else
    throw std::invalid_argument("greedy_select: cov must be float32 or float64");
}

}  // namespace covariance
}  // namespace popcomp
