// CPU kernels of spectral pruning: blocked symmetric rank-k accumulation (acc += X^T X, only
// the upper-triangular tiles computed, 16-bit inputs converted while packing) and the lazy
// greedy selection (symmetric matrix-vector products over one triangle). The hot loops are
// compiled twice, for AVX2+FMA and for the baseline ISA, and chosen at run time.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

#include "common/parallel.h"
#if defined(POPCOMP_OPENMP)
#include <omp.h>
#endif
#include "covariance/covariance.h"
#include "covariance/covariance_math.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PC_X86_DISPATCH 1
#define PC_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define PC_TARGET_AVX2
#endif
#if defined(__GNUC__)
#define PC_AI inline __attribute__((always_inline))
#else
#define PC_AI inline
#endif

namespace popcomp {
namespace covariance {
namespace {

bool use_avx2() {
#if defined(PC_X86_DISPATCH)
  static const bool v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return v;
#else
  return false;
#endif
}

// ---- symmetric rank-k accumulation ---------------------------------------------------------
typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
template <typename A> struct Vec;
template <> struct Vec<float> {
  typedef v8f type;
  static constexpr int W = 8;
  static constexpr int64_t KC = 384;
};
template <> struct Vec<double> {
  typedef v4d type;
  static constexpr int W = 4;
  static constexpr int64_t KC = 256;
};
constexpr int MR = 6;

// c (MR x NR) = a^T b over kc samples; a: kc x MR packed, b: kc x NR packed (NR = 2 W).
template <typename A>
PC_AI void micro_body(const A* __restrict a, const A* __restrict b, int64_t kc, A* __restrict c) {
  typedef typename Vec<A>::type VT;
  constexpr int W = Vec<A>::W, NR = 2 * W;
  VT acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = VT{};
  for (int64_t s = 0; s < kc; ++s) {
    VT b0, b1;
    std::memcpy(&b0, b + s * NR, sizeof(VT));
    std::memcpy(&b1, b + s * NR + W, sizeof(VT));
    const A* as = a + s * MR;
    for (int r = 0; r < MR; ++r) {
      const A ar = as[r];
      acc[r][0] += ar * b0;
      acc[r][1] += ar * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    std::memcpy(c + r * NR, &acc[r][0], sizeof(VT));
    std::memcpy(c + r * NR + W, &acc[r][1], sizeof(VT));
  }
}

// All tiles of one NR-wide column panel jp that touch the upper triangle, added into the
// scratch C (row-major m x m; the entries below the diagonal of diagonal tiles are junk).
template <typename A>
PC_AI void panel_body(const A* apack, const A* bpack, int64_t kc, int64_t m, int64_t jp, A* C) {
  constexpr int NR = 2 * Vec<A>::W;
  alignas(64) A c[MR * NR];
  const int64_t j0 = jp * NR;
  const int64_t qn = std::min<int64_t>(NR, m - j0);
  const A* b = bpack + jp * kc * NR;
  for (int64_t ip = 0; ip * MR <= j0 + NR - 1 && ip * MR < m; ++ip) {
    const int64_t i0 = ip * MR;
    micro_body<A>(apack + ip * kc * MR, b, kc, c);
    const int rn = (int)std::min<int64_t>(MR, m - i0);
    for (int r = 0; r < rn; ++r) {
      A* dst = C + (i0 + r) * m + j0;
      const A* src = c + r * NR;
      if (qn == NR) {
#pragma omp simd
        for (int q = 0; q < NR; ++q) dst[q] += src[q];
      } else {
        for (int q = 0; q < qn; ++q) dst[q] += src[q];
      }
    }
  }
}

template <typename A>
PC_TARGET_AVX2 void panel_avx2(const A* ap, const A* bp, int64_t kc, int64_t m, int64_t jp, A* acc) {
  panel_body<A>(ap, bp, kc, m, jp, acc);
}
template <typename A>
void panel_gen(const A* ap, const A* bp, int64_t kc, int64_t m, int64_t jp, A* acc) {
  panel_body<A>(ap, bp, kc, m, jp, acc);
}

// Packs channels [p*P, p*P+P) of samples [n0, n0+kc) as kc x P (zero beyond m).
template <typename A>
void pack_panel(const AccumParams& p, const void* x, int64_t n0, int64_t kc, int64_t pi, int P,
                A* dst) {
  const int64_t c0 = pi * P;
  for (int q = 0; q < P; ++q) {
    const int64_t c = c0 + q;
    if (c >= p.m) {
      for (int64_t s = 0; s < kc; ++s) dst[s * P + q] = A(0);
      continue;
    }
    int64_t n = n0, b = n0 / p.S, s_in = n0 - b * p.S;
    for (int64_t s = 0; s < kc; ++s, ++n) {
      dst[s * P + q] = load_as<A>(x, p.x_dtype, b * p.sB + s_in * p.sS + c * p.sm);
      if (++s_in == p.S) {
        s_in = 0;
        ++b;
      }
    }
  }
}

// Two parallel schemes. With room for one m x m scratch per thread (<= 256 MiB in all) every
// thread takes a contiguous range of the samples and runs all tiles into its own scratch:
// no synchronization until the final reduction. Otherwise the threads share each packed
// chunk of samples and split its column panels (two barriers per chunk).
template <typename A>
void accumulate_impl(const AccumParams& p, const void* x, A* acc, int nt) {
  constexpr int NR = 2 * Vec<A>::W;
  const int64_t KC = Vec<A>::KC;
  const int64_t m = p.m, N = p.B * p.S;
  if (m == 0 || N == 0) return;
  const int64_t na = (m + MR - 1) / MR, nb = (m + NR - 1) / NR;
  const bool by_samples = nt > 1 && (double)nt * m * m * sizeof(A) <= double(256 << 20) &&
                          N >= (int64_t)nt * KC;
  const int nbuf = by_samples ? nt : 1;
  const size_t mm = (size_t)(m * m);
  std::unique_ptr<A[]> C(new A[(size_t)nbuf * mm]);  // upper-triangular products of this call
  auto panel = use_avx2() ? &panel_avx2<A> : &panel_gen<A>;
  std::vector<A> apack, bpack;
  if (!by_samples) {
    apack.resize((size_t)(na * MR * KC));
    bpack.resize((size_t)(nb * NR * KC));
  }
  // each thread's packing buffers (by samples), allocated here: no exception may escape
  // the parallel region
  std::vector<std::vector<A>> tap(by_samples ? nt : 0), tbp(by_samples ? nt : 0);
  for (auto& v : tap) v.resize((size_t)(na * MR * KC));
  for (auto& v : tbp) v.resize((size_t)(nb * NR * KC));
  constexpr int64_t BB = 64;
  const int64_t nbb = (m + BB - 1) / BB;
#pragma omp parallel num_threads(nt)
  {
    const int team = team_size();
    const int tid = thread_id();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < (int64_t)nbuf * m; ++i) std::fill(C.get() + i * m, C.get() + (i + 1) * m, A(0));
    if (by_samples) {
      std::vector<A>& ap = tap[tid];
      std::vector<A>& bp = tbp[tid];
      const int64_t lo = N * tid / team, hi = N * (tid + 1) / team;
      A* Ct = C.get() + (size_t)tid * mm;
      for (int64_t n0 = lo; n0 < hi; n0 += KC) {
        const int64_t kc = std::min(KC, hi - n0);
        for (int64_t q = 0; q < na; ++q) pack_panel<A>(p, x, n0, kc, q, MR, ap.data() + q * kc * MR);
        for (int64_t q = 0; q < nb; ++q) pack_panel<A>(p, x, n0, kc, q, NR, bp.data() + q * kc * NR);
        for (int64_t jp = 0; jp < nb; ++jp) panel(ap.data(), bp.data(), kc, m, jp, Ct);
      }
    } else {
      for (int64_t n0 = 0; n0 < N; n0 += KC) {
        const int64_t kc = std::min(KC, N - n0);
#pragma omp for schedule(static)
        for (int64_t q = 0; q < na + nb; ++q) {
          if (q < na)
            pack_panel<A>(p, x, n0, kc, q, MR, apack.data() + q * kc * MR);
          else
            pack_panel<A>(p, x, n0, kc, q - na, NR, bpack.data() + (q - na) * kc * NR);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < nb; ++r) {
          const int64_t jp = nb - 1 - r;  // largest panels first
          panel(apack.data(), bpack.data(), kc, m, jp, C.get());
        }
      }
    }
#pragma omp barrier
    // acc += C on the upper triangle and C^T on the lower one (C summed over the thread
    // scratches in a fixed order), in 64 x 64 blocks
#pragma omp for schedule(dynamic, 1)
    for (int64_t bi = 0; bi < nbb; ++bi) {
      for (int64_t bj = bi; bj < nbb; ++bj) {
        const int64_t i1 = std::min(m, (bi + 1) * BB), j1 = std::min(m, (bj + 1) * BB);
        for (int64_t i = bi * BB; i < i1; ++i) {
          const int64_t js = std::max(i, bj * BB);
          A* ci = C.get() + i * m;
          for (int b2 = 1; b2 < nbuf; ++b2) {
            const A* cb = C.get() + (size_t)b2 * mm + i * m;
            for (int64_t j = js; j < j1; ++j) ci[j] += cb[j];
          }
          A* ai = acc + i * m;
          for (int64_t j = js; j < j1; ++j) ai[j] += ci[j];
          for (int64_t j = std::max(i + 1, js); j < j1; ++j) acc[j * m + i] += ci[j];
        }
      }
    }
  }
}

// ---- greedy selection ----------------------------------------------------------------------
// y_loc += A[lo:hi, :] x restricted to one triangle: rows i in [lo, hi) contribute
// A_ij x_j (j >= i) to y_i and A_ij x_i (j > i) to y_j.
template <typename T>
PC_AI void symv_rows_body(const T* A, const double* x, double* yl, int64_t m, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) {
    const T* row = A + i * m;
    const double xi = x[i];
    double acc = (double)row[i] * xi;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = i + 1; j < m; ++j) {
      const double a = (double)row[j];
      acc += a * x[j];
      yl[j] += a * xi;
    }
    yl[i] += acc;
  }
}
// r[i0:i1] -= sum_{s<t} coef[s] V[s, i0:i1]   (V: t x m rows)
template <typename T>
PC_AI void lincomb_body(const T* V, const double* coef, int64_t t, int64_t m, double* r, int64_t i0, int64_t i1) {
  for (int64_t s = 0; s < t; ++s) {
    const double a = coef[s];
    const T* row = V + s * m;
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) r[i] -= a * (double)row[i];
  }
}
template <typename T>
PC_AI double dot_body(const T* a, const double* x, int64_t m) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < m; ++i) acc += (double)a[i] * x[i];
  return acc;
}

template <typename T>
PC_TARGET_AVX2 void symv_rows_avx2(const T* A, const double* x, double* yl, int64_t m, int64_t lo, int64_t hi) {
  symv_rows_body<T>(A, x, yl, m, lo, hi);
}
template <typename T>
void symv_rows_gen(const T* A, const double* x, double* yl, int64_t m, int64_t lo, int64_t hi) {
  symv_rows_body<T>(A, x, yl, m, lo, hi);
}
template <typename T>
PC_TARGET_AVX2 void lincomb_avx2(const T* V, const double* c, int64_t t, int64_t m, double* r, int64_t i0, int64_t i1) {
  lincomb_body<T>(V, c, t, m, r, i0, i1);
}
template <typename T>
void lincomb_gen(const T* V, const double* c, int64_t t, int64_t m, double* r, int64_t i0, int64_t i1) {
  lincomb_body<T>(V, c, t, m, r, i0, i1);
}
template <typename T>
PC_TARGET_AVX2 double dot_avx2(const T* a, const double* x, int64_t m) {
  return dot_body<T>(a, x, m);
}
template <typename T>
double dot_gen(const T* a, const double* x, int64_t m) {
  return dot_body<T>(a, x, m);
}

template <typename T>
struct Greedy {
  int64_t m, k;
  int nt;
  const T* S;
  std::vector<int64_t> bounds;  // triangle rows per thread (equal areas)
  std::vector<double> ybuf;     // nt x m
  decltype(&symv_rows_gen<T>) symv_rows;
  decltype(&lincomb_gen<T>) lincomb;
  decltype(&dot_gen<T>) dot;

  Greedy(int64_t m_, int64_t k_, int nt_, const T* S_) : m(m_), k(k_), nt(nt_), S(S_) {
    const bool avx = use_avx2();
    symv_rows = avx ? &symv_rows_avx2<T> : &symv_rows_gen<T>;
    lincomb = avx ? &lincomb_avx2<T> : &lincomb_gen<T>;
    dot = avx ? &dot_avx2<T> : &dot_gen<T>;
    bounds.assign(nt + 1, m);
    bounds[0] = 0;
    const double total = 0.5 * (double)m * (double)(m + 1);
    int64_t i = 0;
    double area = 0.0;
    for (int q = 1; q < nt; ++q) {
      const double target = total * q / nt;
      while (i < m && area < target) area += (double)(m - i++);
      bounds[q] = i;
    }
    ybuf.assign((size_t)nt * m, 0.0);
  }

  // One parallel region for the whole selection; per step three barriers (five with M):
  // every thread finds the argmax itself (identical result), then
  //   B: v over element chunks | C: triangle rows of S u and the dots c_s = v_s . u |
  //   E: y = sum of the per-thread partials, w = y - V^T c, updates of n and diag.
  void run(const T* M, const double* tau, const double* n0, double L0, double rel_guard,
           int64_t* idx, double* obj) {
    const int64_t CH = 1024;  // element chunk of the vector loops
    std::vector<T> Vt((size_t)k * m);
    std::vector<double> n(n0, n0 + m), diag(m), sjj(m), v(m), u(m), c(k + 1);
    std::vector<double> ubuf(M != nullptr ? (size_t)nt * m : 0);
    std::vector<char> chosen(m, 0);
    for (int64_t i = 0; i < m; ++i) sjj[i] = diag[i] = (double)S[i * m + i];
    const int64_t nch = (m + CH - 1) / CH;
    // each thread's column buffer, allocated here: no exception may escape the region
    std::vector<std::vector<double>> cols(nt, std::vector<double>(k + 1));
#pragma omp parallel num_threads(nt)
    {
      const int team = team_size();
      const int tid = thread_id();
      std::vector<double>& col = cols[tid];
      double L = L0;
      for (int64_t t = 0; t < k; ++t) {
        int64_t j = 0;
        double best = -std::numeric_limits<double>::infinity();
        for (int64_t i = 0; i < m; ++i) {
          const double g = greedy_gain(n[i], diag[i], tau[i], sjj[i], rel_guard, chosen[i] != 0);
          if (better(g, i, best, j)) {
            best = g;
            j = i;
          }
        }
        const double d = greedy_pivot(diag[j], tau[j], sjj[j], rel_guard);
        const double inv = d > 0.0 ? 1.0 / std::sqrt(d) : 0.0;
        for (int64_t s = 0; s < t; ++s) col[s] = (double)Vt[s * m + j];
        T* vt = Vt.data() + t * m;
        // B: v = (S[j, :] - V^T V[:, j]) / sqrt(d), rounded to T as stored
#pragma omp for schedule(static)
        for (int64_t q = 0; q < nch; ++q) {
          const int64_t i0 = q * CH, i1 = std::min(m, i0 + CH);
          for (int64_t i = i0; i < i1; ++i) v[i] = (double)S[j * m + i];
          lincomb(Vt.data(), col.data(), t, m, v.data(), i0, i1);
          for (int64_t i = i0; i < i1; ++i) {
            vt[i] = (T)(v[i] * inv);
            v[i] = (double)vt[i];
          }
        }
        const double* up = v.data();
        if (M != nullptr) {  // u = M v
          for (int q = tid; q < nt; q += team) {
            double* ul = ubuf.data() + (size_t)q * m;
            std::fill(ul, ul + m, 0.0);
            symv_rows(M, v.data(), ul, m, bounds[q], bounds[q + 1]);
          }
#pragma omp barrier
#pragma omp for schedule(static)
          for (int64_t i = 0; i < m; ++i) {
            double s = 0.0;
            for (int r = 0; r < nt; ++r) s += ubuf[(size_t)r * m + i];
            u[i] = s;
          }
          up = u.data();
        }
        // C: S u over one triangle; c_s = v_s . u (s <= t)
        if (tid == 0) {
          idx[t] = j;
          chosen[j] = 1;
        }
        for (int q = tid; q < nt; q += team) {
          double* yl = ybuf.data() + (size_t)q * m;
          std::fill(yl, yl + m, 0.0);
          symv_rows(S, up, yl, m, bounds[q], bounds[q + 1]);
        }
#pragma omp for schedule(static) nowait
        for (int64_t s = 0; s <= t; ++s) c[s] = dot(Vt.data() + s * m, up, m);
#pragma omp barrier
        const double g = c[t];  // v^T M v
        L -= g;
        if (tid == 0) obj[t] = L;
        // E: w = R u = S u - V (V^T u); rank-one updates of the numerators and the diagonal
#pragma omp for schedule(static)
        for (int64_t q = 0; q < nch; ++q) {
          const int64_t i0 = q * CH, i1 = std::min(m, i0 + CH);
          double* w = ybuf.data();  // partial 0 becomes y, then w, in place
          for (int r = 1; r < nt; ++r) {
            const double* yr = ybuf.data() + (size_t)r * m;
            for (int64_t i = i0; i < i1; ++i) w[i] += yr[i];
          }
          lincomb(Vt.data(), c.data(), t, m, w, i0, i1);
          for (int64_t i = i0; i < i1; ++i) {
            n[i] = update_numerator(n[i], v[i], w[i], g);
            diag[i] -= v[i] * v[i];
          }
        }
      }
    }
  }
};

}  // namespace

void accumulate_cpu(const AccumParams& p, const void* x, void* acc, int num_threads) {
  // small products are not worth the fork/join and barriers (costly on busy machines)
  const double work = (double)p.B * (double)p.S * (double)p.m * (double)p.m;
  const int nt = work < 3e7 ? 1 : std::min(1024, std::max(1, num_threads));  // (1024: a sane cap)
  if (p.acc_dtype == DType::f64)
    accumulate_impl<double>(p, x, static_cast<double*>(acc), nt);
  else if (p.acc_dtype == DType::f32)
    accumulate_impl<float>(p, x, static_cast<float*>(acc), nt);
  else
    throw std::invalid_argument("covariance accumulator must be float32 or float64");
}

void greedy_cpu(const GreedyParams& p, const void* cov, const void* M, const double* tau,
                const double* n0, const double* L0, int64_t* idx, double* obj, int num_threads) {
  // a step over a small residual is shorter than a few barriers: one thread below m ~ 1500
  const int nt = (double)p.m * (double)p.m < 2.2e6 ? 1 : std::min(1024, std::max(1, num_threads));
  if (p.k <= 0 || p.m <= 0) return;
  if (p.k > p.m) throw std::invalid_argument("greedy_select: k > m");
  if (p.dtype == DType::f64) {
    Greedy<double> g(p.m, p.k, nt, static_cast<const double*>(cov));
    g.run(static_cast<const double*>(M), tau, n0, *L0, p.rel_guard, idx, obj);
  } else if (p.dtype == DType::f32) {
    Greedy<float> g(p.m, p.k, nt, static_cast<const float*>(cov));
    g.run(static_cast<const float*>(M), tau, n0, *L0, p.rel_guard, idx, obj);
  } else {
    throw std::invalid_argument("greedy_select: cov must be float32 or float64");
  }
}

}  // namespace covariance
}  // namespace popcomp
