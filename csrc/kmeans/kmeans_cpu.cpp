// CPU backend of weighted 1-D K-means (HW / DRHW K-means): run_cpu and the per-problem solver.
//
// Per problem: radix sort (common/radix_sort.h; or, for large 16-bit inputs, a 65536-bin
// weighted histogram) to the u sorted distinct values with summed weights, prefix sums, then
//   exact : optimal k-partition by dynamic programming, each layer's row minima found by
//           divide and conquer on the monotone argmin (O(k u log u) evaluations, O(n + k u)
//           memory), split across threads at pivot rows; large problems solve only a band
//           of rows per layer, from what a coarse DP says the answer needs (demand mode:
//           about a fifth of the rows at k = 16, every skipped row or column certified;
//           exact_dp_cpu.cpp); where a bound on that float64 DP's rounding is not negligible
//           next to the cost of its partition (badly scaled data), the DP again in
//           double-double (exact_dp_precise.cpp); centers summed over their segments;
//   lloyd : O(k log u) Lloyd iterations on the prefix sums (lloyd_cpu.cpp; the iterations in
//           kmeans_math.h, shared with CUDA);
// then one pass over the original values for labels and the cost. Each thread keeps its
// buffers between calls (workspace.h).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif
#if defined(__linux__)
#include <sys/resource.h>
#endif

#include "common/elements.h"
#include "common/parallel.h"
#include "common/radix_sort.h"
#include "kmeans/exact_dp_cpu.h"
#include "kmeans/exact_dp_precise.h"
#include "kmeans/kmeans.h"
#include "kmeans/kmeans_math.h"
#include "kmeans/lloyd_cpu.h"
#include "kmeans/scale.h"
#include "kmeans/workspace.h"

namespace popcomp {
namespace kmeans {
namespace {

constexpr int64_t kHistMin = 32768;  // 16-bit inputs at least this long use the histogram
constexpr int64_t kScatterMax = int64_t(1) << 18;  // up to this n, labels by the sort permutation

// Problems whose values or weights lie outside [2^-kScaleExp, 2^kScaleExp] in magnitude are
// solved on values and weights scaled by powers of two: kScaleExp, exponent_of, ScaledSumSq and
// scaled_beta in scale.h (shared with the CUDA kernels).

// Branchless count of the sorted midpoints (padded with +inf to P - 1 entries, P a power of
// two) strictly below x: the nearest-center label, ties to the lower center.
inline int label_pow2(const double* mids, int P, double x) {
  int idx = 0;
  for (int step = P >> 1; step > 0; step >>= 1) idx += (mids[idx + step - 1] < x) ? step : 0;
  return idx;
}

template <DType DX>
struct Solver {
  using E = Elem<DX>;
  using Key = typename E::Key;

  const Params& p;
  Work& w;
  int threads;
  int status = kOk;

  template <DType DW>
  void check_weights(const void* wt, int64_t n) {
    if (!wt) return;
    bool nonfinite = false, negative = false;
    const int nt = threads;
    (void)nt;
#if defined(POPCOMP_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static) reduction(|| : nonfinite, negative) if (nt > 1 && n >= 65536)
#endif
    for (int64_t i = 0; i < n; ++i) {
      nonfinite = nonfinite || !Elem<DW>::finite(wt, i);
      negative = negative || Elem<DW>::negative(wt, i);
    }
    if (nonfinite) status = kNonFiniteW;
    else if (negative) status = kNegativeW;
  }

  // Sorted distinct values and summed weights -> w.v, w.W; for small problems w.idx keeps
  // the sort permutation and w.run the index of each sorted position's distinct value.
  // Returns u.
  template <DType DW>
  int64_t reduce_sorted(const void* x, const void* wt, int64_t n) {
    // Large problems carry the (<= 32-bit) weight itself through the sort instead of the
    // index: gathering weights through a random permutation costs more than the sort.
    const bool carry_w = wt && DW != DType::f64 && n > kScatterMax;
    if constexpr (sizeof(Key) == 4)
      return sort_reduce<DW>(w.k64, w.t64, x, wt, n, carry_w,
                             [](Key k, uint32_t pay) { return (uint64_t)k << 32 | pay; });
    else
      return sort_reduce<DW>(w.kp64, w.tkp64, x, wt, n, carry_w,
                             [](Key k, uint32_t pay) { return KeyPay64{k, pay}; });
  }

  template <DType DW, typename Item, typename Make>
  int64_t sort_reduce(std::vector<Item>& a, std::vector<Item>& tmp, const void* x,
                      const void* wt, int64_t n, bool carry_w, Make make) {
    a.resize(n);
    Item* ap = a.data();
    bool nonfinite = false;
    const int nt = threads;
    (void)nt;
#if defined(POPCOMP_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static) reduction(|| : nonfinite) if (nt > 1 && n >= 65536)
#endif
    for (int64_t i = 0; i < n; ++i) {
      nonfinite = nonfinite || !E::finite(x, i);
      ap[i] = make(E::key(x, i),
                   carry_w ? float_to_bits((float)Elem<DW>::get(wt, i)) : (uint32_t)i);
    }
    if (nonfinite) {
      status = kNonFiniteX;
      return 0;
    }
    check_weights<DW>(wt, n);
    if (status != kOk) return 0;
    radix_sort_items(a, tmp, n, E::key_bits, threads);

    // the runs of equal keys -> w.v, w.vo, w.W
    w.v.resize(n);
    w.vo.resize(n);
    w.W.resize(n);
    // the permutation and run index of each sorted position: only the labels of small
    // problems use them
    const bool runs = n <= kScatterMax;
    if (runs) {
      w.idx.resize(n);
      w.run.resize(n);
    }
    // Weights that did not travel with their keys (float64 weights of large problems),
    // gathered into sorted order first: a loop of independent loads, split across the
    // threads, instead of one load per step of the serial run loop below.
    const double* gwp = nullptr;
    if (wt && !carry_w && !runs) {
      w.gw.resize(n);
      double* g = w.gw.data();
#if defined(POPCOMP_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
#endif
      for (int64_t t = 0; t < n; ++t) g[t] = Elem<DW>::get(wt, sort_pay(ap[t]));
      gwp = g;
    }
    // local pointers: stores through w's vectors would otherwise reload their data pointers
    uint32_t* ip = runs ? w.idx.data() : nullptr;
    uint32_t* rp = runs ? w.run.data() : nullptr;
    double* vp = w.v.data();
    double* vop = w.vo.data();
    double* Wp = w.W.data();
    int64_t u = 0;
    for (int64_t t = 0; t < n;) {
      const Key kk = (Key)sort_key(ap[t]);
      double ws = 0.0;
      do {
        const uint32_t pay = sort_pay(ap[t]);
        ws += carry_w ? (double)bits_to_float(pay)
              : gwp   ? gwp[t]
              : wt    ? Elem<DW>::get(wt, pay)
                      : 1.0;
        if (runs) {
          ip[t] = pay;
          rp[t] = (uint32_t)u;
        }
        ++t;
      } while (t < n && (Key)sort_key(ap[t]) == kk);
      vp[u] = vop[u] = E::value(kk);
      Wp[u] = ws;
      ++u;
    }
    return u;
  }

  template <DType DW>
  int64_t reduce_hist(const void* x, const void* wt, int64_t n) {
    check_weights<DW>(wt, n);
    if (status != kOk) return 0;
    w.hcnt.assign(65536, 0);
    w.hw.assign(65536, 0.0);
    const uint16_t* xb = static_cast<const uint16_t*>(x);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t kk = half_key(xb[i] == 0x8000u ? (uint16_t)0 : xb[i]);
      ++w.hcnt[kk];
      w.hw[kk] += wt ? Elem<DW>::get(wt, i) : 1.0;
    }
    w.v.resize(65536);
    w.vo.resize(65536);
    w.W.resize(65536);
    int64_t u = 0;
    for (uint32_t kk = 0; kk < 65536; ++kk) {
      if (!w.hcnt[kk]) continue;
      const double val = E::value(kk);
      if (!std::isfinite(val)) {
        status = kNonFiniteX;
        return 0;
      }
      w.v[u] = w.vo[u] = val;
      w.W[u] = w.hw[kk];
      ++u;
    }
    return u;
  }

  template <DType DW>
  void solve(int64_t row, const Buffers& b) {
    const int64_t n = p.n;
    const int k = p.k;
    const size_t es = DX == DType::f64 ? 8 : (DX == DType::f32 ? 4 : 2);
    const size_t ws_ = DW == DType::f64 ? 8 : (DW == DType::f32 ? 4 : 2);
    const void* x = static_cast<const char*>(b.x) + (size_t)row * n * es;
    const void* wt = b.w ? static_cast<const char*>(b.w) + (size_t)row * n * ws_ : nullptr;
    const bool hist = (DX == DType::f16 || DX == DType::bf16) && n >= kHistMin;
    const int64_t u = hist ? reduce_hist<DW>(x, wt, n) : reduce_sorted<DW>(x, wt, n);
    if (status != kOk) return;

    // Scale of the problem: powers of two that bring the largest |value| and the largest
    // weight near 1 when either lies outside [2^-kScaleExp, 2^kScaleExp].
    double wmax = 0.0;
    {
      const double* Wp = w.W.data();
      for (int64_t t = 0; t < u; ++t) wmax = Wp[t] > wmax ? Wp[t] : wmax;
    }
    const double vmax = std::max(std::fabs(w.v[0]), std::fabs(w.v[u - 1]));
    const RowScale rs = row_scale(vmax, wmax);
    const bool scaled = rs.scaled();
    const int ev = rs.ev;  // values times 2^ev
    const int ew = rs.ew;  // weights times 2^ew
    if (scaled) {
      double* vp = w.v.data();
      double* Wp = w.W.data();
      for (int64_t t = 0; t < u; ++t) {
        vp[t] = std::ldexp(vp[t], ev);
        Wp[t] = std::ldexp(Wp[t], ew);
      }
    }
    const double shift = w.v[u / 2];
    w.s0.resize(u + 1);
    w.s1.resize(u + 1);
    w.s2.resize(u + 1);
    {
      double* vp = w.v.data();
      const double* Wp = w.W.data();
      double* p0 = w.s0.data();
      double* p1 = w.s1.data();
      double* p2 = w.s2.data();
      double a0 = 0.0, a1 = 0.0, a2 = 0.0;
      p0[0] = p1[0] = p2[0] = 0.0;
      for (int64_t t = 0; t < u; ++t) {
        const double vv = vp[t] - shift, ww = Wp[t];
        vp[t] = vv;
        p0[t + 1] = a0 = a0 + ww;
        p1[t + 1] = a1 = a1 + ww * vv;
        p2[t + 1] = a2 = a2 + ww * vv * vv;
      }
    }
    if (!(w.s0[u] > 0.0)) {
      status = kZeroW;
      return;
    }
    // the penalty in the scaled problem
    Params ps = p;
    if (scaled && p.beta > 0.0) ps.beta = scaled_beta(p.beta, p.diameter, ev, ew);
    const Prefix P{w.v.data(), w.s0.data(), w.s1.data(), w.s2.data(), u};
    const Scratch sc = w.scratch(k);
    w.c.resize(k);
    double* c = w.c.data();
    int iters = 0;
    double obj = 0.0;
    const bool drhw = ps.beta > 0.0;
    double* out_c = b.centers + (size_t)row * k;
    bool direct = false;  // out_c already holds the centers in the original coordinates
    if (k >= u) {
      for (int j = 0; j < k; ++j) c[j] = w.v[j < u ? j : u - 1];
      if (drhw) {
        iters = lloyd(P, k, c, ps.beta, ps.diameter, ps.max_iter, ps.tol, sc, &obj);
      } else if (scaled) {  // every value its own center, exactly
        for (int j = 0; j < k; ++j) out_c[j] = w.vo[j < u ? j : u - 1];
        direct = true;
      }
    } else if (p.method == Method::exact) {
      exact_partition(w, u, k, threads, sc.B);
      // centers summed over their segments, not from prefix-sum differences (which lose
      // digits on badly scaled data); where the bound on the float64 DP's error is not
      // negligible next to the cost of its partition, the DP again in double-double
      if (!fast_partition_trusted(w.v.data(), w.W.data(), u, k, sc.B, c)) {
        exact_partition_precise(w, u, k, threads, ev, shift, sc.B);
        segment_means(w.v.data(), w.W.data(), sc.B, k, c);
      }
      if (drhw) {
        iters = lloyd(P, k, c, ps.beta, ps.diameter, ps.max_iter, ps.tol, sc, &obj);
      } else if (scaled) {
        // each center the weighted mean of its segment in the original coordinates (a convex
        // combination: no overflow, no underflow of a cluster of tiny values)
        segment_means(w.vo.data(), w.W.data(), sc.B, k, out_c);
        direct = true;
      }
    } else {
      if (scaled && p.init == Init::given) {  // the initial centers in the scaled coordinates
        std::vector<double> init_s(k);
        for (int j = 0; j < k; ++j)
          init_s[j] = std::ldexp(b.init_centers[(size_t)row * k + j], ev);
        iters = lloyd_centers(ps, P, 0, init_s.data(), shift, sc, c, &obj);  // (row: rng only)
      } else {
        iters = lloyd_centers(ps, P, row, b.init_centers, shift, sc, c, &obj);
      }
    }
    if (!direct) {
      sort_small(c, k);
      for (int j = 0; j < k; ++j) out_c[j] = scaled ? std::ldexp(c[j] + shift, -ev) : c[j] + shift;
    } else {
      sort_small(out_c, k);
    }
    // (beta = 0: no term, also where the diameter overflows to inf)
    const double pen =
        p.beta > 0.0 ? diameter_penalty(out_c[k - 1] - out_c[0], p.beta, p.diameter) : 0.0;
    int32_t* lab = b.labels + (size_t)row * n;

    // Label of every distinct value (nearest center in the original coordinates, ties to the
    // lower center) by one merge pass, and the cost from the aggregated weights.
    int Pw = 1;
    while (Pw < k) Pw <<= 1;
    w.mids.assign(Pw, kInf);
    for (int j = 0; j + 1 < k; ++j) w.mids[j] = 0.5 * out_c[j] + 0.5 * out_c[j + 1];
    w.ulab.resize(u);
    double cost = 0.0;
    if (!scaled) {
      // (the original values less the returned centers: a value near its center gives an
      // exact difference, where the centred values were each rounded once)
      const double* vop = w.vo.data();
      const double* Wp = w.W.data();
      const double* mids = w.mids.data();
      int32_t* ul = w.ulab.data();
      int l = 0;
      for (int64_t t = 0; t < u; ++t) {
        const double xv = vop[t];
        while (l < k - 1 && mids[l] < xv) ++l;
        ul[t] = l;
        const double d = xv - out_c[l];
        cost += Wp[t] * d * d;
      }
    } else {
      // the cost of the scaled problem without over- or underflow of its squares, mapped back
      std::vector<double> cs(k);
      for (int j = 0; j < k; ++j) cs[j] = std::ldexp(out_c[j], ev);
      const double* vop = w.vo.data();
      const double* Wp = w.W.data();
      const double* mids = w.mids.data();
      int32_t* ul = w.ulab.data();
      ScaledSumSq acc;
      int l = 0;
      for (int64_t t = 0; t < u; ++t) {
        const double xv = vop[t];
        while (l < k - 1 && mids[l] < xv) ++l;
        ul[t] = l;
        acc.add(std::sqrt(Wp[t]) * (std::ldexp(xv, ev) - cs[l]));
      }
      cost = acc.value_times_pow2(-ew - 2 * ev);
    }
    const int nt = threads;
    if (hist) {
      w.lut.assign(65536, 0);
      for (uint32_t kk = 0, t = 0; kk < 65536; ++kk)
        if (w.hcnt[kk]) w.lut[kk] = w.ulab[t++];
      const uint16_t* xb = static_cast<const uint16_t*>(x);
      const int32_t* lut = w.lut.data();
#if defined(POPCOMP_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
#endif
      for (int64_t i = 0; i < n; ++i) lab[i] = lut[half_key(xb[i] == 0x8000u ? (uint16_t)0 : xb[i])];
    } else if (n <= kScatterMax) {
      const uint32_t* idx = w.idx.data();
      const uint32_t* run = w.run.data();
      const int32_t* ul = w.ulab.data();
      for (int64_t t = 0; t < n; ++t) lab[idx[t]] = ul[run[t]];
    } else {
      const double* mids = w.mids.data();
#if defined(POPCOMP_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
#endif
      for (int64_t i = 0; i < n; ++i) lab[i] = label_pow2(mids, Pw, E::get(x, i));
    }
    (void)nt;
    b.cost[row] = cost + pen;
    b.n_iter[row] = iters;
  }
};
}  // namespace

// Bytes of memory the process may still take (MemAvailable; 0 if unknown).
static size_t available_memory() {
  size_t avail = 0;
#if defined(__linux__)
  if (FILE* f = std::fopen("/proc/meminfo", "r")) {
    char line[256];
    while (std::fgets(line, sizeof line, f)) {
      unsigned long long kb = 0;
      if (std::sscanf(line, "MemAvailable: %llu kB", &kb) == 1) {
        avail = (size_t)kb * 1024;
        break;
      }
    }
    std::fclose(f);
  }
#endif
#if defined(__linux__)
  // a cgroup's memory limit (containers), less what the cgroup uses
  {
    unsigned long long mx = 0, cur = 0;
    FILE* f = std::fopen("/sys/fs/cgroup/memory.max", "r");
    FILE* g = std::fopen("/sys/fs/cgroup/memory.current", "r");
    if (f && g && std::fscanf(f, "%llu", &mx) == 1 && std::fscanf(g, "%llu", &cur) == 1) {
      const size_t left = mx > cur ? (size_t)(mx - cur) : 0;
      if (avail == 0 || left < avail) avail = left > 0 ? left : 1;
    }
    if (f) std::fclose(f);
    if (g) std::fclose(g);
  }
  // the address-space limit (ulimit -v), less what the process maps
  {
    struct rlimit rl;
    unsigned long long pages = 0;
    FILE* f = std::fopen("/proc/self/statm", "r");
    if (f && getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        std::fscanf(f, "%llu", &pages) == 1) {
      const size_t used = (size_t)pages * (size_t)sysconf(_SC_PAGE_SIZE);
      const size_t left = (size_t)rl.rlim_cur > used ? (size_t)rl.rlim_cur - used : 0;
      if (avail == 0 || left < avail) avail = left > 0 ? left : 1;
    }
    if (f) std::fclose(f);
  }
#endif
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGE_SIZE)
  if (avail == 0) {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    if (pages > 0 && page > 0) avail = (size_t)pages * (size_t)page / 2;
  }
#endif
  return avail;
}

// Bytes one exact solve of k centers over n values needs at most (the k x u argmin table,
// the sort items, the values, weights and prefix sums; the double-double prefix sums of the
// precise DP, exact_dp_precise.h).
static double exact_bytes(int64_t n, int k) {
  return 4.0 * (double)k * (double)n + 128.0 * (double)n;
}

Result run_cpu(const Params& p, const Buffers& b, int num_threads) {
  check_args(p, b, "kmeans1d_cpu");
  Result res;
  if (p.rows == 0 || p.n == 0) return res;  // nothing to solve
  if (p.n > (int64_t)0xffffffffll) throw std::invalid_argument("kmeans1d: n must be < 2^32");
  if (p.method == Method::exact && (double)p.k * (double)p.n > 4e9)
    throw std::invalid_argument("kmeans1d: method 'exact' needs k * n < 4e9 (its k x n argmin "
                                "table), got k = " + std::to_string(p.k) + ", n = " +
                                std::to_string(p.n) + "; use method 'lloyd' or fewer values");
  int T = std::min(1024, std::max(1, num_threads));  // more threads crash OpenMP runtimes
  if (p.method == Method::exact && p.k < p.n) {
    // the exact method's table, per thread that solves a problem: fewer threads when they
    // would not fit in the memory available, a clear error when one does not
    const size_t avail = available_memory();
    const double need = exact_bytes(p.n, p.k);
    if (avail > 0) {
      const double budget = 0.8 * (double)avail;
      if (need > budget)
        throw std::invalid_argument(
            "kmeans1d: method 'exact' with k = " + std::to_string(p.k) + " and n = " +
            std::to_string(p.n) + " needs about " + std::to_string((long long)(need / 1048576.0)) +
            " MiB (a k x n table), more than the " +
            std::to_string((long long)(budget / 1048576.0)) +
            " MiB of memory available; use method 'lloyd' or fewer values per problem");
      if (p.rows >= T && T > 1 && need * T > budget)
        T = std::max(1, (int)(budget / need));
    }
  }
  const bool outer = p.rows >= T && T > 1;
  const DType dw = b.w ? p.w_dtype : p.x_dtype;
  int64_t bad_row = p.rows;
  int bad_status = kOk;
  // An exception inside the parallel region (std::bad_alloc of a workspace) is caught there,
  // the thread's workspace released, and the first one rethrown after the region.
  std::exception_ptr error;
  std::mutex error_mutex;
  dispatch_dtype(p.x_dtype, "kmeans1d", [&](auto dx) {
    dispatch_dtype(dw, "kmeans1d", [&](auto dwt) {
      constexpr DType DX = decltype(dx)::value;
      constexpr DType DW = decltype(dwt)::value;
      if (outer) {
        bool failed = false;
#if defined(POPCOMP_OPENMP)
#pragma omp parallel num_threads(T)
#endif
        {
          Work& w = thread_work();
          Solver<DX> s{p, w, 1};
#if defined(POPCOMP_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
          for (int64_t r = 0; r < p.rows; ++r) {
            bool stop;
#if defined(POPCOMP_OPENMP)
#pragma omp atomic read
#endif
            stop = failed;
            if (stop) continue;
            try {
              s.status = kOk;
              s.template solve<DW>(r, b);
            } catch (...) {
              {
                std::lock_guard<std::mutex> g(error_mutex);
                if (!error) error = std::current_exception();
              }
#if defined(POPCOMP_OPENMP)
#pragma omp atomic write
#endif
              failed = true;
              w = Work();  // the failed problem's buffers are not kept
              continue;
            }
            if (s.status != kOk) {
#if defined(POPCOMP_OPENMP)
#pragma omp critical(popcomp_kmeans_status)
#endif
              if (r < bad_row) {
                bad_row = r;
                bad_status = s.status;
              }
            }
          }
          trim_work(w);
        }
      } else {
        Work& w = thread_work();
        Solver<DX> s{p, w, T};
        try {
          for (int64_t r = 0; r < p.rows && bad_status == kOk; ++r) {
            s.template solve<DW>(r, b);
            if (s.status != kOk) {
              bad_row = r;
              bad_status = s.status;
            }
          }
        } catch (...) {
          w = Work();  // the failed problem's buffers are not kept
          throw;
        }
        trim_work(w);
      }
    });
  });
  if (error) std::rethrow_exception(error);
  if (bad_status != kOk) {
    res.status = bad_status;
    res.row = bad_row;
  }
  return res;
}

}  // namespace kmeans
}  // namespace popcomp
