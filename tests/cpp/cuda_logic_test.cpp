// CPU checks of the pure index arithmetic of the CUDA kernels (built by tests/cpp/CMakeLists.txt
// with the host compiler, run by ctest from tests/test_kernel_index_logic.py; no GPU, no CUDA
// toolkit needed):
//   1. kmeans_cuda.cu phase C: the level-synchronous divide and conquer (dp_levels.h), emulated
//      launch by launch on packed problems, equals the recursive divide and conquer bit for bit,
//      writes every row of every layer exactly once, reads only entries written at earlier
//      levels / layers, and reaches the optimum of a brute-force DP.
//   2. kmeans_cuda.cu's warp Lloyd: one unchained binary search per boundary equals the chained
//      assign_boundaries() of kmeans_math.h for sorted centers.
//   3. covariance_cuda.cu: tri_index() enumerates the upper-triangular tile pairs once each.
//   4. hessian_cuda.cu: the output tiles (output_tile() over gridDim.x, looped by stride) cover
//      every accumulator element exactly once, for any grid size, also past 65535 x 64 rows.
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

// Emulates run_cuda() phase C (dp_init_kernel, then per layer one "launch" per level; within a
// level all nodes read the state left by the previous launches) and checks it.
static void check_levels(const Packed& pk, int k) {
  const RowData rd = pk.rd();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const int64_t U = pk.U;
  const int Lmax = dp_levels(pk.ucap);
  std::vector<double> Dp(U, nan), Dc(U, nan);
  std::vector<int32_t> Jall((size_t)std::max(k - 1, 0) * U, -7);
  for (int64_t r = 0; r < pk.rows; ++r) {  // dp_init_kernel
    int64_t base;
    const Prefix P = row_prefix(rd, r, &base);
    if ((int64_t)k >= P.u) continue;
    for (int64_t g = base; g < base + P.u; ++g) Dp[g] = seg_cost(P, 0, g - base + 1);
  }
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

  struct Out {
    int64_t at;
    double v;
    int32_t j;
  };
  for (int m = 1; m < k; ++m) {
    int32_t* Jm = Jall.data() + (size_t)(m - 1) * U;
    std::vector<int> written(U, 0);
    for (int L = 0; L < Lmax; ++L) {
      const int64_t nodes = pk.rows << L;
      std::vector<Out> outs;
      for (int64_t id = 0; id < nodes; ++id) {
        DpNode nd;
        if (!dp_node(rd, Jm, k, m, L, id, nd)) continue;
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
        CHECK(!std::isnan(best), "read an unwritten D entry (layer %d level %d)", m, L);
        outs.push_back(Out{nd.base + nd.mid, best, (int32_t)bj});
      }
      for (const Out& o : outs) {
        CHECK(written[o.at] == 0, "row written twice (layer %d level %d)", m, L);
        ++written[o.at];
        Dc[o.at] = o.v;
        Jm[o.at] = o.j;
      }
    }
    for (int64_t r = 0; r < pk.rows; ++r) {
      int64_t base;
      const Prefix P = row_prefix(rd, r, &base);
      if ((int64_t)k >= P.u) continue;
      for (int64_t i = 0; i < P.u; ++i) {
        const bool want = i >= m;
        CHECK(written[base + i] == (want ? 1 : 0), "problem %lld layer %d row %lld written %d times",
              (long long)r, m, (long long)i, written[base + i]);
        if (want)
          CHECK(Jm[base + i] == refJ[r][m][i], "problem %lld layer %d row %lld: J %d, recursion %d",
                (long long)r, m, (long long)i, Jm[base + i], refJ[r][m][i]);
      }
    }
    std::swap(Dp, Dc);
  }
  for (int64_t r = 0; r < pk.rows; ++r) {  // backtrack as solve_row() does, and the optimum
    int64_t base;
    const Prefix P = row_prefix(rd, r, &base);
    if ((int64_t)k >= P.u) continue;
    const int64_t u = P.u;
    std::vector<int64_t> B(k + 1);
    B[k] = u;
    int64_t i = u - 1;
    for (int m = k - 1; m >= 1; --m) {
      const int64_t j = Jall[(size_t)(m - 1) * U + base + i];
      B[m] = j;
      i = j - 1;
    }
    B[0] = 0;
    for (int j = 0; j < k; ++j) CHECK(B[j] < B[j + 1], "empty cluster %d of problem %lld", j, (long long)r);
    if (k > 1) CHECK(same_bits(Dp[base + u - 1], refD[r][u - 1]), "D of problem %lld", (long long)r);
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
    // ucap above every u, as with 16-bit inputs (ucap = min(n, 65536) >= u)
    check_levels(pack(v, w, umax + (int64_t)(rng() % 3)), k);
  }
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

int main() {
  test_dp_levels();
  test_unchained_boundaries();
  test_tri_index();
  test_hessian_tiles();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
