// CPU checks of the pure index arithmetic of the CUDA kernels (built by tests/cpp/CMakeLists.txt
// with the host compiler, run by ctest from tests/test_kernel_index_logic.py; no GPU, no CUDA
// toolkit needed):
//   1. kmeans_cuda.cu phase C: the level-synchronous divide and conquer (dp_levels.h), emulated
//      launch by launch on packed problems in chunks of rows (dp_chunk_rows; arrays indexed
//      from the chunk's local base), equals the recursive divide and conquer bit for bit,
//      writes every row of every layer exactly once, reads only entries written at earlier
//      levels / layers, the mixed kernel's lane and warp scans (node width) and the warp
//      shuffle reduction pick the same column, and the backtracked boundaries
//      (dp_backtrack) reach the optimum of a brute-force DP.
//   2. kmeans_cuda.cu's warp Lloyd: one unchained binary search per boundary equals the chained
//      assign_boundaries() of kmeans_math.h for sorted centers.
//   3. covariance_cuda.cu: tri_index() enumerates the upper-triangular tile pairs once each.
//   4. hessian_cuda.cu: the output tiles (output_tile() over gridDim.x, looped by stride) cover
//      every accumulator element exactly once, for any grid size, also past 65535 x 64 rows.
//   5. kmeans_cuda.cu phase A (sort_keys.h): the composite (row, key) keys and the two stable
//      float64 passes sort exactly as a stable sort by (row, key) does.
//   6. kmeans_cuda.cu phases A, B (fixed_sums.h): the run weights and prefix sums, emulated
//      thread by thread in a shuffled order, are the same bits in every order, equal the CPU's
//      sequential sums bit for bit up to kSumChunk terms, and cover every term once.
//   7. kmeans_cuda.cu's badly scaled rows (scale.h, shared with kmeans_cpu.cpp): the scale
//      decision (row_scale) equals the CPU solver's (scaled exactly when ev or ew is nonzero),
//      the rescaled beta, the cost summed in chunks of kSumChunk values merged in chunk order
//      (scaled_cost_sum, ScaledSumSq::merge) equals the CPU's sequential pass bit for bit up to
//      kSumChunk values and the true cost (long double) beyond, without over- or underflow, and
//      convex_mean stays finite and inside its segment at the ends of the range.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "covariance/covariance_math.h"
#include "hessian/hessian_math.h"
#include "kmeans/dp_levels.h"
#include "kmeans/fixed_sums.h"
#include "kmeans/scale.h"
#include "kmeans/sort_keys.h"

using namespace popcomp;
using namespace popcomp::kmeans;

static int failures = 0;
#define CHECK(cond, ...)                                                  \
  do {                                                                    \
    if (!(cond)) {                                                        \
      if (++failures <= 20) {                                             \
        std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::fprintf(stderr, __VA_ARGS__);                                \
        std::fprintf(stderr, "\n");                                       \
      }                                                                   \
    }                                                                     \
  } while (0)

static bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// Problems packed as kmeans_cuda.cu packs them (prefix sums with one leading zero each).
struct Packed {
  int64_t rows = 0, ucap = 0, U = 0;
  std::vector<int64_t> ustart;
  std::vector<double> vs, S0, S1, S2;
  RowData rd() const { return RowData{ustart.data(), vs.data(), S0.data(), S1.data(), S2.data()}; }
};

static Packed pack(const std::vector<std::vector<double>>& v, const std::vector<std::vector<double>>& w,
                   int64_t ucap) {
  Packed p;
  p.rows = (int64_t)v.size();
  p.ucap = ucap;
  p.U = p.rows * ucap;
  p.ustart.push_back(0);
  for (size_t r = 0; r < v.size(); ++r) {
    p.S0.push_back(0.0);
    p.S1.push_back(0.0);
    p.S2.push_back(0.0);
    for (size_t t = 0; t < v[r].size(); ++t) {
      p.vs.push_back(v[r][t]);
      p.S0.push_back(p.S0.back() + w[r][t]);
      p.S1.push_back(p.S1.back() + w[r][t] * v[r][t]);
      p.S2.push_back(p.S2.back() + w[r][t] * v[r][t] * v[r][t]);
    }
    p.ustart.push_back(p.ustart.back() + (int64_t)v[r].size());
  }
  p.vs.resize(p.U, 0.0);
  return p;
}

// Recursive divide and conquer of one layer (the reference the level form must equal).
static void dnc(const Prefix& P, const double* Dp, double* Dc, int32_t* J, int64_t lo, int64_t hi,
                int64_t clo, int64_t chi) {
  if (lo > hi) return;
  const int64_t mid = (lo + hi) >> 1, hc = std::min(chi, mid);
  double best = std::numeric_limits<double>::infinity();
  int64_t bj = -1;
  for (int64_t j = clo; j <= hc; ++j) {
    const double val = Dp[j - 1] + seg_cost(P, j, mid + 1);
    if (bj < 0 || val < best) {
      best = val;
      bj = j;
    }
  }
  Dc[mid] = best;
  J[mid] = (int32_t)bj;
  dnc(P, Dp, Dc, J, lo, mid - 1, clo, bj);
  dnc(P, Dp, Dc, J, mid + 1, hi, bj, chi);
}

static double partition_cost(const Prefix& P, const std::vector<int64_t>& B) {
  double c = 0.0;
  for (size_t j = 0; j + 1 < B.size(); ++j) c += seg_cost(P, B[j], B[j + 1]);
  return c;
}

// Optimal k-partition cost by the O(k u^2) DP.
static double brute_force(const Prefix& P, int k) {
  const int64_t u = P.u;
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> D(u), E(u);
  for (int64_t i = 0; i < u; ++i) D[i] = seg_cost(P, 0, i + 1);
  for (int m = 1; m < k; ++m) {
    for (int64_t i = 0; i < u; ++i) {
      E[i] = inf;
      for (int64_t j = m; j <= i; ++j) E[i] = std::min(E[i], D[j - 1] + seg_cost(P, j, i + 1));
    }
    std::swap(D, E);
  }
  return D[u - 1];
}

// The warp forms of a node's argmin: 32 lanes scanning the columns clo + lane, + 32, ... (first
// minimum each), then warp_argmin's shuffle-down tree (a lane past the warp reads its own value).
static void warp_scan(const DpNode& nd, const double* Dp, double* best, int64_t* bj) {
  double v[32];
  int64_t j[32];
  for (int lane = 0; lane < 32; ++lane) {
    v[lane] = std::numeric_limits<double>::infinity();
    j[lane] = std::numeric_limits<int64_t>::max();
    for (int64_t c = nd.clo + lane; c <= nd.hc; c += 32) {
      const double x = dp_val(nd, Dp, c);
      if (x < v[lane]) {
        v[lane] = x;
        j[lane] = c;
      }
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    double nv[32];
    int64_t nj[32];
    for (int lane = 0; lane < 32; ++lane) {
      const int src = lane + off < 32 ? lane + off : lane;
      nv[lane] = v[lane];
      nj[lane] = j[lane];
      if (dp_better(v[src], j[src], v[lane], j[lane])) {
        nv[lane] = v[src];
        nj[lane] = j[src];
      }
    }
    std::memcpy(v, nv, sizeof v);
    std::memcpy(j, nj, sizeof j);
  }
  *best = v[0];
  *bj = j[0];
}

// Emulates run_cuda() phase C for the rows [r0, r1) (dp_init_kernel, then per layer one
// "launch" per level; within a level all nodes read the state left by the previous launches;
// D and the argmins indexed from the chunk's local base, Uc values per layer) and checks it;
// the boundaries backtracked as dp_backtrack_kernel does go to Ball (k + 1 per row).
static void check_chunk(const Packed& pk, int k, int64_t r0, int64_t r1, int64_t Uc,
                        const std::vector<std::vector<std::vector<int32_t>>>& refJ,
                        const std::vector<std::vector<double>>& refD, std::vector<int64_t>& Ball) {
  const RowData rd = pk.rd();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const int64_t U = Uc, g0 = pk.ustart[r0];
  CHECK(pk.ustart[r1] - g0 <= Uc, "rows [%lld, %lld) hold more than Uc values", (long long)r0,
        (long long)r1);
  const int Lmax = dp_levels(pk.ucap);
  std::vector<double> Dp(U, nan), Dc(U, nan);
  std::vector<int32_t> Jall((size_t)std::max(k - 1, 0) * U, -7);
  for (int64_t r = r0; r < r1; ++r) {  // dp_init_kernel
    int64_t base;
    const Prefix P = row_prefix(rd, r, &base);
    if ((int64_t)k >= P.u) continue;
    for (int64_t g = base; g < base + P.u; ++g) Dp[g - g0] = seg_cost(P, 0, g - base + 1);
  }

  struct Out {
    int64_t at;
    double v;
    int32_t j;
  };
  for (int m = 1; m < k; ++m) {
    int32_t* Jm = Jall.data() + (size_t)(m - 1) * U;
    std::vector<int> written(U, 0);
    for (int L = 0; L < Lmax; ++L) {
      const int64_t nodes = (r1 - r0) << L;
      std::vector<Out> outs;
      for (int64_t id = 0; id < nodes; ++id) {
        DpNode nd;
        if (!dp_node(rd, Jm, k, m, L, id, nd, r0)) continue;
        CHECK(nd.lbase == nd.base - g0 && nd.lbase >= 0 && nd.lbase + nd.P.u <= Uc,
              "local base %lld of a problem at %lld (chunk at %lld)", (long long)nd.lbase,
              (long long)nd.base, (long long)g0);
        CHECK(nd.clo >= m && nd.clo <= nd.hc && nd.hc <= nd.mid && nd.mid < nd.P.u,
              "layer %d level %d node %lld: columns [%lld, %lld], mid %lld, u %lld", m, L,
              (long long)id, (long long)nd.clo, (long long)nd.hc, (long long)nd.mid,
              (long long)nd.P.u);
        if (!(nd.clo >= m && nd.clo <= nd.hc)) continue;
        // thread-kernel form; the warp forms reduce (value, column) lexicographically, which
        // gives the same first minimum.
        double best = dp_val(nd, Dp.data(), nd.clo);
        int64_t bj = nd.clo;
        for (int64_t j = nd.clo + 1; j <= nd.hc; ++j) {
          const double v = dp_val(nd, Dp.data(), j);
          if (v < best) {
            best = v;
            bj = j;
          }
        }
        double lb = std::numeric_limits<double>::infinity();
        int64_t lj = std::numeric_limits<int64_t>::max();
        for (int64_t j = nd.hc; j >= nd.clo; --j)  // any order of the lexicographic reduction
          if (dp_better(dp_val(nd, Dp.data(), j), j, lb, lj)) {
            lb = dp_val(nd, Dp.data(), j);
            lj = j;
          }
        CHECK(lj == bj && same_bits(lb, best), "warp reduction differs from the scan");
        double wb;  // the mixed / warp kernels' warp form (a node wider than kNarrow)
        int64_t wj;
        warp_scan(nd, Dp.data(), &wb, &wj);
        CHECK(wj == bj && same_bits(wb, best), "warp scan differs from the lane scan");
        CHECK(!std::isnan(best), "read an unwritten D entry (layer %d level %d)", m, L);
        outs.push_back(Out{nd.lbase + nd.mid, best, (int32_t)bj});
      }
      for (const Out& o : outs) {
        CHECK(written[o.at] == 0, "row written twice (layer %d level %d)", m, L);
        ++written[o.at];
        Dc[o.at] = o.v;
        Jm[o.at] = o.j;
      }
    }
    for (int64_t r = r0; r < r1; ++r) {
      int64_t base;
      const Prefix P = row_prefix(rd, r, &base);
      if ((int64_t)k >= P.u) continue;
      const int64_t lb = base - g0;
      for (int64_t i = 0; i < P.u; ++i) {
        const bool want = i >= m;
        CHECK(written[lb + i] == (want ? 1 : 0), "problem %lld layer %d row %lld written %d times",
              (long long)r, m, (long long)i, written[lb + i]);
        if (want)
          CHECK(Jm[lb + i] == refJ[r][m][i], "problem %lld layer %d row %lld: J %d, recursion %d",
                (long long)r, m, (long long)i, Jm[lb + i], refJ[r][m][i]);
      }
    }
    std::swap(Dp, Dc);
  }
  for (int64_t r = r0; r < r1; ++r) {  // dp_backtrack_kernel, and D of the last layer
    int64_t base;
    const Prefix P = row_prefix(rd, r, &base);
    if ((int64_t)k >= P.u) continue;
    dp_backtrack(Jall.data(), Uc, base - g0, P.u, k, &Ball[(size_t)r * (k + 1)]);
    if (k > 1) CHECK(same_bits(Dp[base - g0 + P.u - 1], refD[r][P.u - 1]), "D of problem %lld", (long long)r);
  }
}

// The whole phase C: the rows in chunks of chunk_rows (the last one shorter), then the
// boundaries against the optimum.
static void check_levels(const Packed& pk, int k, int64_t chunk_rows = 0) {
  const RowData rd = pk.rd();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (chunk_rows <= 0) chunk_rows = pk.rows;
  // the recursive reference, per problem
  std::vector<std::vector<double>> refD(pk.rows);
  std::vector<std::vector<std::vector<int32_t>>> refJ(pk.rows);
  for (int64_t r = 0; r < pk.rows; ++r) {
    int64_t base;
    const Prefix P = row_prefix(rd, r, &base);
    if ((int64_t)k >= P.u) continue;
    std::vector<double> d(P.u), e(P.u, nan);
    for (int64_t i = 0; i < P.u; ++i) d[i] = seg_cost(P, 0, i + 1);
    refJ[r].assign(k, std::vector<int32_t>(P.u, -7));
    for (int m = 1; m < k; ++m) {
      std::fill(e.begin(), e.end(), nan);
      dnc(P, d.data(), e.data(), refJ[r][m].data(), m, P.u - 1, m, P.u - 1);
      std::swap(d, e);
    }
    refD[r] = d;
  }
  std::vector<int64_t> Ball((size_t)pk.rows * (k + 1), -1);
  for (int64_t r0 = 0; r0 < pk.rows; r0 += chunk_rows)
    check_chunk(pk, k, r0, std::min(pk.rows, r0 + chunk_rows), chunk_rows * pk.ucap, refJ, refD,
                Ball);
  for (int64_t r = 0; r < pk.rows; ++r) {  // the boundaries, and the optimum
    int64_t base;
    const Prefix P = row_prefix(rd, r, &base);
    if ((int64_t)k >= P.u) continue;
    const std::vector<int64_t> B(Ball.begin() + r * (k + 1), Ball.begin() + (r + 1) * (k + 1));
    CHECK(B[0] == 0 && B[k] == P.u, "boundary ends of problem %lld", (long long)r);
    for (int j = 0; j < k; ++j) CHECK(B[j] < B[j + 1], "empty cluster %d of problem %lld", j, (long long)r);
    const double opt = brute_force(P, k), got = partition_cost(P, B);
    CHECK(std::fabs(got - opt) <= 1e-9 * (1.0 + std::fabs(opt)), "problem %lld k %d: cost %.17g, optimum %.17g",
          (long long)r, k, got, opt);
  }
}

static void test_dp_levels() {
  std::mt19937_64 rng(12345);
  const int sizes[] = {1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33, 64, 100, 257};
  for (int trial = 0; trial < 60; ++trial) {
    const int rows = 1 + (int)(rng() % 6);
    const int k = 1 + (int)(rng() % 9);
    const bool ties = trial % 2 == 0;  // integer values, equal weights: many equal costs
    std::vector<std::vector<double>> v(rows), w(rows);
    int64_t umax = 1;
    for (int r = 0; r < rows; ++r) {
      const int u = sizes[rng() % (sizeof sizes / sizeof sizes[0])];
      umax = std::max<int64_t>(umax, u);
      double x = -(double)(rng() % 50);
      for (int t = 0; t < u; ++t) {
        x += ties ? 1.0 + (double)(rng() % 3) : 0.01 + std::ldexp((double)(rng() >> 11), -53) * 3.0;
        v[r].push_back(x);
        const uint64_t q = rng() % 10;
        w[r].push_back(ties ? 1.0 : (q == 0 ? 0.0 : 0.1 + (double)q));
      }
      if (!ties) w[r][0] = 1.0;
    }
    // ucap above every u, as with 16-bit inputs (ucap = min(n, 65536) >= u); all rows in one
    // chunk, and in chunks of fewer rows (as dp_chunk_rows gives them for a small budget)
    const Packed pk = pack(v, w, umax + (int64_t)(rng() % 3));
    check_levels(pk, k);
    const int64_t row_bytes = pk.ucap * (16 + 4 * (int64_t)(k - 1));
    const int64_t budget = row_bytes * (1 + (int64_t)(rng() % 3)) + (int64_t)(rng() % 7) - 3;
    const int64_t cr = dp_chunk_rows(pk.rows, row_bytes, budget);
    CHECK(cr >= 1 && cr <= pk.rows && (cr == 1 || cr * row_bytes <= budget) &&
              (cr == pk.rows || (cr + 1) * row_bytes > budget),
          "dp_chunk_rows(%lld, %lld, %lld) = %lld", (long long)pk.rows, (long long)row_bytes,
          (long long)budget, (long long)cr);
    check_levels(pk, k, cr);
  }
  CHECK(dp_chunk_rows(5, 100, 50) == 1, "a row above the budget: chunks of one row");
  CHECK(dp_chunk_rows(5, 100, 1 << 20) == 5, "all rows within the budget: one chunk");
  for (int64_t ucap = 1; ucap <= 5000; ++ucap) {  // depth of the recursion over [1, ucap-1]
    int64_t c = ucap - 1, depth = 0;
    while (c > 0) {
      c = c / 2;  // the larger child of a range of c rows has floor(c / 2) rows
      ++depth;
    }
    CHECK(dp_levels(ucap) >= depth, "dp_levels(%lld) = %d < depth %lld", (long long)ucap,
          dp_levels(ucap), (long long)depth);
  }
}

static void test_unchained_boundaries() {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 2000; ++trial) {
    const int64_t u = 1 + (int64_t)(rng() % 40);
    const int k = 1 + (int)(rng() % 12);
    std::vector<double> v(u), s(u + 1, 0.0), c(k);
    double x = 0.0;
    for (int64_t t = 0; t < u; ++t) v[t] = (x += 1.0 + (double)(rng() % 3));
    for (int j = 0; j < k; ++j)  // on values, on midpoints, duplicated, outside the range
      c[j] = (double)((int64_t)(rng() % (2 * (uint64_t)x + 8)) - 4) * 0.5;
    sort_small(c.data(), k);
    const Prefix P{v.data(), s.data(), s.data(), s.data(), u};
    std::vector<int64_t> B(k + 1), Bw(k + 1);
    assign_boundaries(P, k, c.data(), B.data());
    Bw[0] = 0;
    Bw[k] = u;
    for (int j = 1; j < k; ++j) Bw[j] = upper_bound_d(P.v, 0, P.u, 0.5 * (c[j - 1] + c[j]));
    CHECK(B == Bw, "trial %d: warp boundaries differ from assign_boundaries", trial);
  }
}

static void test_tri_index() {
  for (int64_t T = 1; T <= 64; ++T) {
    int64_t pI = 0, pJ = -1;
    std::vector<int> seen(T * T, 0);
    for (int64_t lin = 0; lin < T * (T + 1) / 2; ++lin) {
      int64_t I, J;
      covariance::tri_index(lin, T, &I, &J);
      CHECK(0 <= I && I <= J && J < T, "T %lld lin %lld -> (%lld, %lld)", (long long)T,
            (long long)lin, (long long)I, (long long)J);
      if (!(0 <= I && I <= J && J < T)) continue;
      CHECK(I > pI || (I == pI && J == pJ + 1), "order at T %lld lin %lld", (long long)T, (long long)lin);
      ++seen[I * T + J];
      pI = I;
      pJ = J;
    }
    for (int64_t I = 0; I < T; ++I)
      for (int64_t J = I; J < T; ++J) CHECK(seen[I * T + J] == 1, "pair (%lld, %lld)", (long long)I, (long long)J);
  }
}

// Emulates sumsq_outer_cuda's launch: blocks 0..output_tile_blocks(tiles, cap) - 1, each
// looping t = blockIdx.x, += gridDim.x, and checks each element of out x in is written once.
static void check_tile_cover(int64_t out, int64_t in, int64_t cap) {
  const int64_t TILE = 64;
  const int64_t tiles = hessian::output_tiles(out, in, TILE);
  const int64_t blocks = hessian::output_tile_blocks(tiles, cap);
  CHECK(blocks >= 1 && blocks <= cap && blocks <= tiles, "out %lld in %lld cap %lld: %lld blocks",
        (long long)out, (long long)in, (long long)cap, (long long)blocks);
  std::vector<int> seen((size_t)(out * in), 0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t t = b; t < tiles; t += blocks) {
      const hessian::OutputTile ot = hessian::output_tile(t, out, in, TILE);
      const bool ok = ot.o0 % TILE == 0 && ot.i0 % TILE == 0 && ot.no >= 1 && ot.no <= TILE &&
                      ot.ni >= 1 && ot.ni <= TILE && ot.o0 + ot.no <= out && ot.i0 + ot.ni <= in;
      CHECK(ok, "out %lld in %lld tile %lld: rows %lld+%d, columns %lld+%d", (long long)out,
            (long long)in, (long long)t, (long long)ot.o0, ot.no, (long long)ot.i0, ot.ni);
      if (!ok) continue;
      for (int o = 0; o < ot.no; ++o)
        for (int i = 0; i < ot.ni; ++i) ++seen[(size_t)((ot.o0 + o) * in + ot.i0 + i)];
    }
  for (int64_t e = 0; e < out * in; ++e)
    if (seen[e] != 1) {
      CHECK(seen[e] == 1, "out %lld in %lld cap %lld: element (%lld, %lld) written %d times",
            (long long)out, (long long)in, (long long)cap, (long long)(e / in), (long long)(e % in),
            seen[e]);
      break;
    }
}

static void test_hessian_tiles() {
  const int64_t sizes[] = {1, 2, 63, 64, 65, 127, 128, 129, 200, 333};
  const int64_t caps[] = {1, 2, 3, 7, 64, hessian::kMaxGridX};
  for (int64_t out : sizes)
    for (int64_t in : sizes)
      for (int64_t cap : caps) check_tile_cover(out, in, cap);
  check_tile_cover(65535 * 64 + 1, 1, hessian::kMaxGridX);  // 65536 row tiles: past gridDim.y
  check_tile_cover(65535 * 64 + 1, 3, 1000);
  // sizes too large to enumerate: the grid fits gridDim.x, and tile numbers map one to one onto
  // tile origins (o0 / 64) * tiles_i + i0 / 64, the last one ending at the last row and column
  const int64_t big[][2] = {{65535LL * 64 + 1, 1}, {1LL << 31, 64}, {1LL << 40, (1LL << 20) + 5},
                            {(1LL << 36) + 3, 1LL << 26}};
  std::mt19937_64 rng(99);
  for (const auto& sz : big) {
    const int64_t out = sz[0], in = sz[1], TILE = 64;
    const int64_t tiles = hessian::output_tiles(out, in, TILE), ti = hessian::ceil_div(in, TILE);
    CHECK(tiles == hessian::ceil_div(out, TILE) * ti, "tiles of %lld x %lld", (long long)out, (long long)in);
    const int64_t blocks = hessian::output_tile_blocks(tiles);
    CHECK(blocks >= 1 && blocks <= hessian::kMaxGridX && blocks <= tiles, "%lld blocks", (long long)blocks);
    for (int k = 0; k < 10000; ++k) {
      const int64_t t = k == 0 ? tiles - 1 : k == 1 ? 0 : (int64_t)(rng() % (uint64_t)tiles);
      const hessian::OutputTile ot = hessian::output_tile(t, out, in, TILE);
      CHECK((ot.o0 / TILE) * ti + ot.i0 / TILE == t && ot.o0 % TILE == 0 && ot.i0 % TILE == 0 &&
                ot.no >= 1 && ot.no <= TILE && ot.ni >= 1 && ot.ni <= TILE,
            "%lld x %lld tile %lld", (long long)out, (long long)in, (long long)t);
      if (t == tiles - 1)
        CHECK(ot.o0 + ot.no == out && ot.i0 + ot.ni == in, "last tile of %lld x %lld", (long long)out,
              (long long)in);
    }
  }
}

// 5. The (row, key) sorts of phase A against a stable sort by (row, key): composite keys for
// 16/32-bit keys (any row count below 2^31), two stable LSD passes for float64 keys.
static void test_sort_keys() {
  CHECK(sort_mode(1, 64) == SortMode::single && sort_mode(1, 16) == SortMode::single, "one row");
  for (int keybits : {16, 32}) {
    CHECK(sort_mode(((int64_t)1 << 31) - 2, keybits) == SortMode::composite, "%d-bit keys", keybits);
    CHECK(composite_bits(((int64_t)1 << 31) - 2, keybits) <= 64, "composite bits");
  }
  CHECK(sort_mode(2, 64) == SortMode::twopass, "float64 keys, two rows");
  CHECK(bits_for(0) == 0 && bits_for(1) == 1 && bits_for(2) == 2 && bits_for(255) == 8 &&
            bits_for(256) == 9, "bits_for");
  std::mt19937_64 rng(31);
  for (int trial = 0; trial < 200; ++trial) {
    const int keybits = trial % 3 == 0 ? 16 : trial % 3 == 1 ? 32 : 64;
    const int64_t rows = 2 + (int64_t)(rng() % 40), n = 1 + (int64_t)(rng() % 30);
    std::vector<uint64_t> key(rows * n);
    for (auto& kk : key) {  // few distinct values: many equal keys (stability matters)
      if (keybits == 64) {
        const double vals[] = {-1.5, -0.0, 0.0, 2.25, 1e300, -3e-310, 7.0};
        kk = double_key(vals[rng() % 7] == 0.0 ? 0.0 : vals[rng() % 7]);
      } else {
        kk = (rng() % 5) * (keybits == 16 ? 9000u : 900000000u) + (rng() % 2);
      }
    }
    // the reference: indices stably sorted by (row, key)
    std::vector<int64_t> ref(rows * n);
    for (int64_t i = 0; i < rows * n; ++i) ref[i] = i;
    std::stable_sort(ref.begin(), ref.end(), [&](int64_t a, int64_t b) {
      return a / n != b / n ? a / n < b / n : key[a] < key[b];
    });
    std::vector<int64_t> got(rows * n);
    for (int64_t i = 0; i < rows * n; ++i) got[i] = i;
    if (sort_mode(rows, keybits) == SortMode::composite) {
      std::vector<uint64_t> ck(rows * n);
      for (int64_t i = 0; i < rows * n; ++i) {
        ck[i] = composite_key(key[i], i / n, keybits);
        CHECK(key_of(ck[i], keybits) == key[i], "key_of");
        CHECK(composite_bits(rows, keybits) == 64 || (ck[i] >> composite_bits(rows, keybits)) == 0,
              "composite key above its end bit");
      }
      std::stable_sort(got.begin(), got.end(), [&](int64_t a, int64_t b) { return ck[a] < ck[b]; });
    } else {
      CHECK(keybits == 64, "two passes for %d-bit keys", keybits);
      std::stable_sort(got.begin(), got.end(), [&](int64_t a, int64_t b) { return key[a] < key[b]; });
      std::stable_sort(got.begin(), got.end(), [&](int64_t a, int64_t b) { return a / n < b / n; });
    }
    CHECK(got == ref, "trial %d (%d-bit keys, %lld rows): order differs from (row, key)", trial,
          keybits, (long long)rows);
  }
}

// 6. The fixed-order sums of phases A and B, each "thread" run in a shuffled order.
static void test_fixed_sums() {
  std::mt19937_64 rng(77);
  const int64_t C = kSumChunk;
  // prefix sums: rows of u values, some longer than a chunk
  for (int trial = 0; trial < 12; ++trial) {
    const int64_t rows = 1 + (int64_t)(rng() % 4);
    std::vector<int64_t> ustart{0};
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t lens[] = {1, 2, 31, C - 1, C, C + 1, 2 * C + 17, 3 * C};
      ustart.push_back(ustart.back() + lens[rng() % 8]);
    }
    const int64_t U = ustart.back();
    std::vector<double> vs(U), W(U);
    for (int64_t g = 0; g < U; ++g) {
      vs[g] = std::ldexp((double)(int64_t)(rng() >> 11) - (double)(1LL << 52), -50);
      W[g] = (rng() % 5 == 0) ? 0.0 : std::ldexp((double)(rng() >> 11), -53) * 3.0;
    }
    int64_t ucap = 1;
    for (int64_t r = 0; r < rows; ++r) ucap = std::max(ucap, ustart[r + 1] - ustart[r]);
    const int64_t nsc = sum_chunks(ucap);
    std::vector<double> S[2][3];
    for (int rep = 0; rep < 2; ++rep) {
      for (auto& s3 : S[rep]) s3.assign(U + rows, std::numeric_limits<double>::quiet_NaN());
      std::vector<Sum3> tot(rows * nsc);
      std::vector<int64_t> ids(rows * nsc);
      for (int64_t i = 0; i < rows * nsc; ++i) ids[i] = i;
      std::shuffle(ids.begin(), ids.end(), rng);
      for (int64_t id : ids) {  // chunk_total_kernel
        const int64_t r = id / nsc, c = id % nsc, b = ustart[r], u = ustart[r + 1] - b;
        if (c < sum_chunks(u)) tot[id] = chunk_total(vs.data(), W.data(), b, u, c);
      }
      for (int64_t r = 0; r < rows; ++r)  // chunk_offsets_kernel
        chunk_offsets(tot.data() + r * nsc, sum_chunks(ustart[r + 1] - ustart[r]));
      std::shuffle(ids.begin(), ids.end(), rng);
      for (int64_t id : ids) {  // chunk_scan_kernel
        const int64_t r = id / nsc, c = id % nsc, b = ustart[r], u = ustart[r + 1] - b;
        if (c < sum_chunks(u))
          chunk_scan(vs.data(), W.data(), b, u, c, tot[id], S[rep][0].data() + b + r,
                     S[rep][1].data() + b + r, S[rep][2].data() + b + r);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = ustart[r], u = ustart[r + 1] - b;
      double a0 = 0.0, a1 = 0.0, a2 = 0.0;  // the CPU's loop (kmeans_cpu.cpp)
      for (int64_t t = 0; t <= u; ++t) {
        if (t > 0) {
          const double vv = vs[b + t - 1], ww = W[b + t - 1];
          a0 = a0 + ww;
          a1 = a1 + ww * vv;
          a2 = a2 + ww * vv * vv;
        }
        const double seq[3] = {a0, a1, a2};
        for (int q = 0; q < 3; ++q) {
          const double got = S[0][q][b + r + t];
          CHECK(same_bits(got, S[1][q][b + r + t]), "prefix sum %d of row %lld at %lld differs between runs",
                q, (long long)r, (long long)t);
          if (u <= C)
            CHECK(same_bits(got, seq[q]), "row %lld (u %lld <= chunk): s%d[%lld] = %.17g, sequential %.17g",
                  (long long)r, (long long)u, q, (long long)t, got, seq[q]);
          else
            CHECK(std::fabs(got - seq[q]) <= 1e-12 * (1.0 + std::fabs(seq[q]) + (double)t),
                  "row %lld: s%d[%lld] = %.17g, sequential %.17g", (long long)r, q, (long long)t, got, seq[q]);
        }
      }
    }
  }
  // run weights: runs of 1 .. 3 chunks and more, pieces numbered over all runs
  for (int trial = 0; trial < 12; ++trial) {
    std::vector<int64_t> runpos{0};
    const int64_t R = 1 + (int64_t)(rng() % 40);
    for (int64_t g = 0; g < R; ++g) {
      const int64_t lens[] = {1, 2, 5, C - 1, C, C + 1, 3 * C + 2};
      runpos.push_back(runpos.back() + lens[rng() % 7]);
    }
    const int64_t N = runpos.back();
    std::vector<double> w(N);
    for (auto& x : w) x = std::ldexp((double)(rng() >> 11), -53) * 7.0;
    std::vector<int64_t> pend(R);
    for (int64_t g = 0; g < R; ++g) pend[g] = sum_chunks(runpos[g + 1] - runpos[g]);  // counts
    for (int64_t g = 1; g < R; ++g) pend[g] += pend[g - 1];                          // scanned
    const int64_t P = pend[R - 1];
    CHECK(P <= R + N / C, "pieces %lld above the plan's bound", (long long)P);
    std::vector<double> psum(P, std::numeric_limits<double>::quiet_NaN());
    std::vector<int64_t> cover(N, 0);
    std::vector<int64_t> ps(P);
    for (int64_t p = 0; p < P; ++p) ps[p] = p;
    std::shuffle(ps.begin(), ps.end(), rng);
    for (int64_t p : ps) {  // piece_sum_kernel
      const int64_t g = piece_run(pend.data(), R, p);
      const int64_t pfirst = g > 0 ? pend[g - 1] : 0;
      CHECK(g < R && pfirst <= p && p < pend[g], "piece %lld -> run %lld", (long long)p, (long long)g);
      if (!(g < R)) continue;
      psum[p] = piece_sum(w.data(), runpos[g], runpos[g + 1], pfirst, p);
      const int64_t a = runpos[g] + (p - pfirst) * C;
      for (int64_t i = a; i < std::min(runpos[g + 1], a + C); ++i) ++cover[i];
    }
    for (int64_t i = 0; i < N; ++i)
      if (cover[i] != 1) {
        CHECK(cover[i] == 1, "element %lld in %lld pieces", (long long)i, (long long)cover[i]);
        break;
      }
    for (int64_t g = 0; g < R; ++g) {  // run_weight_kernel
      const int64_t pfirst = g > 0 ? pend[g - 1] : 0;
      const double got = run_total(psum.data(), pfirst, pend[g] - pfirst);
      double seq = 0.0;  // the CPU's run loop
      for (int64_t i = runpos[g]; i < runpos[g + 1]; ++i) seq += w[i];
      if (runpos[g + 1] - runpos[g] <= C)
        CHECK(same_bits(got, seq), "run %lld of %lld elements: %.17g, sequential %.17g", (long long)g,
              (long long)(runpos[g + 1] - runpos[g]), got, seq);
      else
        CHECK(std::fabs(got - seq) <= 1e-12 * seq, "run %lld: %.17g, sequential %.17g", (long long)g, got, seq);
    }
  }
}

// 7. The scaled rows of kmeans_cuda.cu (scale.h).
static void test_scaled_rows() {
  std::mt19937_64 rng(91);
  // the scale decision: the CPU solver's formula (kmeans_cpu.cpp, solve()) against row_scale
  const double edges[] = {0.0,
                          1.0,
                          0.75,
                          std::ldexp(1.0, 100),
                          std::nextafter(std::ldexp(1.0, 100), 0.0),
                          std::ldexp(1.0, -101),
                          std::nextafter(std::ldexp(1.0, -101), 0.0),
                          1e200,
                          1e-200,
                          1e308,
                          std::numeric_limits<double>::max(),
                          std::numeric_limits<double>::denorm_min(),
                          std::ldexp(1.0, -1060),
                          3.0,
                          4294967296.0};
  std::vector<double> probes(std::begin(edges), std::end(edges));
  for (int i = 0; i < 200; ++i)
    probes.push_back(std::ldexp(1.0 + (double)(rng() % 1000) / 1000.0, (int)(rng() % 2100) - 1070));
  for (double vmax : probes)
    for (double wmax : probes) {
      const int evx = exponent_of(vmax), ewx = exponent_of(wmax);
      const bool scaled = (vmax != 0.0 && (evx > kScaleExp || evx < -kScaleExp)) ||
                          (wmax != 0.0 && (ewx > kScaleExp || ewx < -kScaleExp));
      const int ev = scaled && vmax != 0.0 ? -evx : 0, ew = scaled && wmax != 0.0 ? -ewx : 0;
      const RowScale rs = row_scale(vmax, wmax);
      CHECK(rs.scaled() == scaled && rs.ev == ev && rs.ew == ew,
            "row_scale(%.17g, %.17g) = (%d, %d, %d), CPU (%d, %d, %d)", vmax, wmax,
            (int)rs.scaled(), rs.ev, rs.ew, (int)scaled, ev, ew);
      if (rs.scaled() && vmax != 0.0) {
        const double s = std::ldexp(vmax, rs.ev);
        CHECK(s >= 0.5 && s < 1.0, "vmax %.17g scaled to %.17g", vmax, s);
      }
      if (rs.scaled() && wmax != 0.0) {
        const double s = std::ldexp(wmax, rs.ew);
        CHECK(s >= 0.5 && s < 1.0, "wmax %.17g scaled to %.17g", wmax, s);
      }
    }
  CHECK(!row_scale(std::nextafter(std::ldexp(1.0, 100), 0.0), 1.0).scaled(), "below 2^100 scaled");
  CHECK(row_scale(std::ldexp(1.0, 100), 1.0).scaled(), "2^100 not scaled");
  CHECK(!row_scale(1.0, std::ldexp(1.0, -101)).scaled(), "2^-101 scaled");
  CHECK(row_scale(1.0, std::nextafter(std::ldexp(1.0, -101), 0.0)).scaled(), "below 2^-101 not scaled");
  // the rescaled penalty: the CPU's expression, capped at the largest double
  const double betas[] = {1e-300, 1e-3, 1.0, 7.5, 1e200, 1e308};
  for (double beta : betas)
    for (int ev : {-1000, -101, 0, 3, 101, 1000})
      for (int ew : {-1000, -1, 0, 1, 664, 1000})
        for (Diameter dm : {Diameter::squared, Diameter::linear}) {
          const double bs = std::ldexp(beta, dm == Diameter::squared ? ew : ew + ev);
          const double cpu = std::isfinite(bs) ? bs : std::numeric_limits<double>::max();
          CHECK(same_bits(scaled_beta(beta, dm, ev, ew), cpu), "scaled_beta(%g, %d, %d, %d)", beta,
                (int)dm, ev, ew);
        }

  // the cost of scaled rows: chunks merged in order (scaled_cost_chunk/row_kernel) against the
  // CPU's sequential pass and the true cost
  const int64_t C = kSumChunk;
  const double vscales[] = {1e150, 1e-150, 1e-300, 1e300, 1.0};
  const double wscales[] = {1.0, 1e200, 1e-200, 1e300};
  for (int trial = 0; trial < 24; ++trial) {
    const int64_t lens[] = {1, 3, 40, C - 1, C, C + 1, 2 * C + 5};
    const int64_t u = lens[rng() % 7];
    const double vsc = vscales[rng() % 5], wsc = wscales[rng() % 4];
    const int k = 1 + (int)(rng() % 7);
    std::normal_distribution<double> nd;
    std::uniform_real_distribution<double> ud(0.5, 1.5);
    std::vector<double> vo(u), W(u), Wo(u);
    for (int64_t t = 0; t < u; ++t) vo[t] = nd(rng) * vsc;
    std::sort(vo.begin(), vo.end());
    for (int64_t t = 0; t < u; ++t) Wo[t] = (rng() % 9 == 0) ? 0.0 : ud(rng) * wsc;
    double wmax = 0.0;
    for (double w : Wo) wmax = std::max(wmax, w);
    const double vmax = std::max(std::fabs(vo[0]), std::fabs(vo[u - 1]));
    const RowScale rs = row_scale(vmax, wmax);
    for (int64_t t = 0; t < u; ++t) W[t] = rs.ew != 0 ? std::ldexp(Wo[t], rs.ew) : Wo[t];
    // sorted centers in the original coordinates (some values, some between), their midpoints
    std::vector<double> oc(k);
    for (int j = 0; j < k; ++j) oc[j] = vo[rng() % u] * (j % 2 ? 1.0 : 0.999);
    std::sort(oc.begin(), oc.end());
    std::vector<double> mids(std::max(k - 1, 1)), cs(k);
    for (int j = 0; j + 1 < k; ++j) mids[j] = 0.5 * oc[j] + 0.5 * oc[j + 1];
    for (int j = 0; j < k; ++j) cs[j] = std::ldexp(oc[j], rs.ev);
    const int e = -rs.ew - 2 * rs.ev;
    // the kernels: chunks in a shuffled order, merged in chunk order
    const int64_t nc = sum_chunks(u);
    std::vector<ScaledSumSq> part(nc);
    std::vector<int64_t> ids(nc);
    for (int64_t c = 0; c < nc; ++c) ids[c] = c;
    std::shuffle(ids.begin(), ids.end(), rng);
    for (int64_t c : ids)
      part[c] = scaled_cost_sum(vo.data(), W.data(), c * C, std::min(u, (c + 1) * C), rs.ev,
                                mids.data(), k - 1, cs.data());
    ScaledSumSq acc = part[0];
    for (int64_t c = 1; c < nc; ++c) acc.merge(part[c]);
    const double got = acc.value_times_pow2(e);
    // the CPU's pass (kmeans_cpu.cpp: the merge over the midpoints, one ScaledSumSq)
    ScaledSumSq seq;
    int l = 0;
    for (int64_t t = 0; t < u; ++t) {
      const double xv = vo[t];
      while (l < k - 1 && mids[l] < xv) ++l;
      seq.add(std::sqrt(W[t]) * (std::ldexp(xv, rs.ev) - cs[l]));
    }
    const double cpu = seq.value_times_pow2(e);
    // the true cost in long double (its range holds these squares)
    long double ref = 0.0L;
    for (int64_t t = 0; t < u; ++t) {
      const long double d = (long double)vo[t] - (long double)oc[nearest_label(mids.data(), k - 1, vo[t])];
      ref += (long double)Wo[t] * d * d;
    }
    if (u <= C)
      CHECK(same_bits(got, cpu), "u %lld: chunked %.17g, CPU %.17g", (long long)u, got, cpu);
    else
      CHECK(got == cpu || std::fabs(got - cpu) <= 1e-13 * cpu, "u %lld: chunked %.17g, CPU %.17g",
            (long long)u, got, cpu);
    const bool in_range = ref < (long double)std::numeric_limits<double>::max() &&
                          ref > (long double)std::numeric_limits<double>::min() * 1e3L;
    if (in_range)
      CHECK(std::fabs((long double)got - ref) <= 1e-12L * ref, "u %lld vscale %g wscale %g: %.17g, true %.17Lg",
            (long long)u, vsc, wsc, got, ref);
    else if (ref >= (long double)std::numeric_limits<double>::max())
      CHECK(got == std::numeric_limits<double>::infinity(), "cost %.17Lg above the range: %.17g", ref, got);
  }
  // ScaledSumSq::merge of partial sums spanning the range equals one sequential sum closely
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<double> r(1 + rng() % 300);
    for (auto& x : r) x = std::ldexp(1.0 + (double)(rng() % 4096) / 4096.0, (int)(rng() % 1200) - 600);
    ScaledSumSq one, a, b;
    const size_t cut = rng() % (r.size() + 1);
    long double ref = 0.0L;
    for (size_t i = 0; i < r.size(); ++i) {
      one.add(r[i]);
      (i < cut ? a : b).add(r[i]);
      ref += (long double)r[i] * (long double)r[i];
    }
    a.merge(b);
    const double va = a.value_times_pow2(-1400), vo1 = one.value_times_pow2(-1400);
    const long double want = std::ldexp(ref, -1400);
    CHECK(std::fabs((long double)va - want) <= 1e-14L * want, "merged %.17g, true %.17Lg", va, want);
    CHECK(std::fabs((long double)vo1 - want) <= 1e-14L * want, "sequential %.17g, true %.17Lg", vo1, want);
  }
  // convex_mean at the ends of the range: finite, inside the segment, the weighted mean
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t n = 1 + (int64_t)(rng() % 50);
    const double sc = trial % 2 ? 1.5e308 : 1e-300;
    std::vector<double> vo(n), W(n);
    std::uniform_real_distribution<double> ud(0.0, 1.0);
    for (int64_t t = 0; t < n; ++t) vo[t] = (ud(rng) * 0.6 + 0.4) * sc * (trial % 4 < 2 ? 1.0 : -1.0);
    std::sort(vo.begin(), vo.end());
    long double sw = 0.0L, swv = 0.0L;
    for (int64_t t = 0; t < n; ++t) {
      W[t] = trial % 5 == 0 ? 0.0 : ud(rng);
      sw += W[t];
      swv += (long double)W[t] * vo[t];
    }
    const double m = convex_mean(vo.data(), W.data(), 0, n);
    CHECK(std::isfinite(m) && m >= vo[0] && m <= vo[n - 1], "convex_mean %.17g outside [%.17g, %.17g]", m,
          vo[0], vo[n - 1]);
    const long double want = sw > 0.0L ? swv / sw : 0.5L * vo[0] + 0.5L * vo[n - 1];
    CHECK(std::fabs((long double)m - want) <= 1e-13L * std::fabs(want), "convex_mean %.17g, true %.17Lg", m, want);
  }
}

int main() {
  test_dp_levels();
  test_unchained_boundaries();
  test_tri_index();
  test_hessian_tiles();
  test_sort_keys();
  test_fixed_sums();
  test_scaled_rows();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
