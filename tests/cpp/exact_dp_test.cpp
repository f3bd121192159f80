// CPU checks of the exact DP's demand mode (csrc/kmeans/exact_dp_cpu.cpp, dp_layers with
// hints): whatever the hints (lower demands G, upper demands X), dp_layers either refuses
// (returns false) or gives boundaries identical to the plain DP that solves every row;
// exact_partition (coarse-DP hints, fallback) always gives them. Random problems of several
// shapes, sizes below and above kDemandMin (some large enough for the coarse DP's own demand
// mode), 1 to 3 threads; and every layer solver against brute force. Built by
// tests/cpp/CMakeLists.txt (ctest; run by tests/test_kernel_index_logic.py); exit 1 on failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

#include "kmeans/exact_dp_cpu.h"

using namespace popcomp::kmeans;

namespace {

int failures = 0;

void fail(const char* what, int trial) {
  std::printf("FAIL %s (trial %d)\n", what, trial);
  ++failures;
}

// Prefix sums of sorted distinct values (centred, as Solver::solve does) with weights.
void make_problem(std::mt19937_64& g, int dist, int64_t n, bool zero_weights, Work& w) {
  std::normal_distribution<double> nd;
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  std::cauchy_distribution<double> cd;
  std::vector<double> centres(1 + g() % 12);
  for (double& c : centres) c = 10.0 * nd(g);
  std::vector<double> v((size_t)n);
  for (double& x : v) {
    switch (dist) {
      case 0: x = nd(g); break;
      case 1: x = ud(g); break;
      case 2: x = cd(g); break;  // heavy tails: outliers in clusters of their own
      default: x = centres[g() % centres.size()] + 0.1 * nd(g); break;  // tight mixture
    }
    x = (float)x;
  }
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  const int64_t u = (int64_t)v.size();
  const double shift = v[u / 2];
  w.v.resize(u);
  w.s0.assign(u + 1, 0.0);
  w.s1.assign(u + 1, 0.0);
  w.s2.assign(u + 1, 0.0);
  for (int64_t t = 0; t < u; ++t) {
    const double x = v[t] - shift;
    const double h = zero_weights && ud(g) < 0.3 ? 0.0 : (double)(float)(0.01 + ud(g));
    w.v[t] = x;
    w.s0[t + 1] = w.s0[t] + h;
    w.s1[t + 1] = w.s1[t] + h * x;
    w.s2[t + 1] = w.s2[t] + h * x * x;
  }
}

std::vector<int64_t> backtrack(const Work& w, int64_t u, int k) {
  std::vector<int64_t> B(k + 1);
  B[k] = u;
  int64_t i = u - 1;
  for (int m = k - 1; m >= 1; --m) {
    B[m] = w.J[(size_t)m * u + i];
    i = B[m] - 1;
  }
  B[0] = 0;
  return B;
}

// What an earlier problem could leave in a reused workspace: arbitrary argmins and values.
void scribble(Work& w, std::mt19937_64& g) {
  for (size_t i = 0; i < w.J.size(); ++i) w.J[i] = (int32_t)(g() % (w.J.size() + 1));
  for (double& v : w.d) v = (double)(g() % 1000) - 500.0;
  for (double& v : w.D1) v = (double)(g() % 1000) - 500.0;
}

// One layer m of the plain DP (rows [m, u-1], every column [m, i] allowed) by the layer
// solver f, from d[j] = D_{m-1}(j-1) and J_{m-1} (nullptr for m = 1), as dp_layers sets it up.
void layer_with(LayerFn f, const Work& w, int64_t u, int m, const double* d,
                const int32_t* Jlow, double* dnext, int32_t* J) {
  const int64_t nb = u / kPB;
  std::vector<double> blocks(5 * (size_t)nb + 1);
  double* bd = blocks.data();
  double* b0 = bd + nb;
  double* b1 = b0 + nb;
  double* b2 = b1 + nb;
  for (int64_t b = 0; b < nb; ++b) {
    bd[b] = d[b * kPB];
    b0[b] = w.s0[b * kPB + kPB - 1];
    b1[b] = w.s1[b * kPB + kPB - 1];
    b2[b] = w.s2[b * kPB + kPB - 1];
  }
  const double margin = 1e-12 * (std::fabs(w.s2[u]) + std::fabs(w.s1[u]) + 1e-300);
  DnC L{w.s0.data(), w.s1.data(), w.s2.data(), d, Jlow, dnext, J,
        nb > 0 ? bd : nullptr, b0, b1, b2, b2 + nb, margin};
  f(L, m, u - 1, m, u - 1);
}

// Every layer solver against brute force: each row's D_m(i) and leftmost argmin over all of
// [m, i] (no monotonicity, no Knuth bound), the same value formula. A solver's D_m(i) must be
// the value of the column it returns and equal the brute-force minimum (a different column
// only at a tie within rounding). Layers chained from the brute-force values.
void check_layer_solvers(int trial, const Work& w, int64_t u, int k) {
  const std::vector<std::pair<const char*, LayerFn>> solvers = layer_solvers();
  const double* s0 = w.s0.data();
  const double* s1 = w.s1.data();
  const double* s2 = w.s2.data();
  auto val = [&](const double* d, int64_t j, int64_t i) {
    return d[j] + seg_cost_dp(s0[i + 1] - s0[j], s1[i + 1] - s1[j], s2[i + 1] - s2[j]);
  };
  std::vector<double> d(u + 1), dn(u + 1), dx(u + 1);
  std::vector<int32_t> Jb((size_t)k * u), Jx(u);
  d[0] = kInf;
  for (int64_t i = 0; i < u; ++i) d[i + 1] = seg_cost_dp(s0[i + 1], s1[i + 1], s2[i + 1]);
  for (int m = 1; m < k; ++m) {
    int32_t* J = Jb.data() + (size_t)m * u;
    dn[0] = kInf;
    for (int64_t i = 0; i < m; ++i) dn[i + 1] = kInf;
    for (int64_t i = m; i < u; ++i) {
      double best = kInf;
      int64_t bj = m;
      for (int64_t j = m; j <= i; ++j) {
        const double v = val(d.data(), j, i);
        if (v < best) {
          best = v;
          bj = j;
        }
      }
      dn[i + 1] = best;
      J[i] = (int32_t)bj;
    }
    for (const auto& sv : solvers) {
      std::fill(dx.begin(), dx.end(), -1.0);
      std::fill(Jx.begin(), Jx.end(), -1);
      layer_with(sv.second, w, u, m, d.data(), m > 1 ? Jb.data() + (size_t)(m - 1) * u : nullptr,
                 dx.data(), Jx.data());
      int bad = 0;
      for (int64_t i = m; i < u && !bad; ++i) {
        const int64_t j = Jx[i];
        const double ref = dn[i + 1];
        if (j < m || j > i || dx[i + 1] != val(d.data(), j, i) ||
            std::fabs(dx[i + 1] - ref) > 1e-13 * std::fabs(ref) + 1e-300 ||
            (j != J[i] && dx[i + 1] != ref && std::fabs(dx[i + 1] - ref) > 4e-16 * std::fabs(ref)))
          bad = 1;
      }
      if (bad) {
        std::printf("  layer %d of %d, u = %lld, solver %s\n", m, k, (long long)u, sv.first);
        fail("layer solver differs from brute force", trial);
      }
    }
    std::swap(d, dn);
  }
}

}  // namespace

int main() {
  const int ks[] = {3, 4, 5, 8, 16, 33};
  int refused = 0, hinted = 0, cap_tries = 0, cap_ok = 0, cap_other = 0;
  for (int trial = 0; trial < 96; ++trial) {
    std::mt19937_64 g(1000 + trial);
    const int dist = trial % 4;
    // a few problems large enough for the coarse DP to run in demand mode itself
    const int64_t n = trial % 48 == 1 ? 600000 + (int64_t)(g() % 100000)
                      : trial % 3 == 0 ? 200 + (int64_t)(g() % 3000)
                                       : 16384 + (int64_t)(g() % 60000);
    const int k = ks[g() % 6];
    const int threads = 1 + trial % 3;  // 3: parts not a multiple of the team
    Work w;
    make_problem(g, dist, n, trial % 5 == 0, w);
    const int64_t u = (int64_t)w.v.size();
    if (u <= k + 2) continue;
    dp_layers(w, u, k, 1, nullptr);
    const std::vector<int64_t> ref = backtrack(w, u, k);

    // exact_partition: coarse hints with its fallback
    std::vector<int64_t> B(k + 1);
    scribble(w, g);
    exact_partition(w, u, k, threads, B.data());
    if (B != ref) fail("exact_partition differs from the plain DP", trial);

    // arbitrary hints: low, near the true demand, too high, random
    std::vector<int64_t> N(k, 0);  // the demand chain of the plain DP's argmins
    {
      dp_layers(w, u, k, 1, nullptr);
      int64_t x = u - 2;
      for (int m = k - 2; m >= 1; --m) {
        const int64_t rh = u - 1 - (k - 1 - m);
        if (x > rh) x = rh;
        N[m] = std::max<int64_t>(m, w.J[(size_t)m * u + x] - 1);
        x = N[m];
      }
    }
    for (int kind = 0; kind < 4; ++kind) {
      std::vector<int64_t> G(k, 0);
      for (int m = 1; m <= k - 2; ++m) {
        const int64_t rh = u - 1 - (k - 1 - m);
        switch (kind) {
          case 0: G[m] = m; break;
          case 1: G[m] = N[m]; break;
          case 2: G[m] = std::min<int64_t>(rh, N[m] + 1 + (int64_t)(g() % 50)); break;
          default: G[m] = m + (int64_t)(g() % (uint64_t)(rh - m + 1)); break;
        }
      }
      scribble(w, g);
      const bool ok = dp_layers(w, u, k, threads, G.data());
      if (!ok) {
        ++refused;
        if (kind <= 1) fail("refused hints at or below the true demand", trial);
        continue;
      }
      ++hinted;
      if (backtrack(w, u, k) != ref) fail("hinted DP differs from the plain DP", trial);
    }

    // upper demands: the coarse DP's (as exact_partition takes them), then arbitrary ones
    // (too low, random, near): refused or identical to the plain DP
    std::vector<int64_t> G0(k, 0), X0(k, 0);
    if (k >= 3 && u >= kDemandMin && demand_hint(w, u, k, threads, G0.data(), X0.data())) {
      ++cap_tries;
      int why = 0;
      scribble(w, g);
      if (dp_layers(w, u, k, threads, G0.data(), X0.data(), nullptr, &why)) {
        ++cap_ok;
        if (backtrack(w, u, k) != ref) fail("capped DP differs from the plain DP", trial);
      } else if (why == 1 && (scribble(w, g), dp_layers(w, u, k, threads, G0.data()))) {
        fail("refusal blamed on the lower demands, which hold without the upper ones", trial);
      }
      // the upper demands alone (exact_partition's second try)
      scribble(w, g);
      if (dp_layers(w, u, k, threads, nullptr, X0.data())) {
        ++cap_other;
        if (backtrack(w, u, k) != ref) fail("DP with upper demands alone differs", trial);
      }
      for (int kind = 0; kind < 4; ++kind) {
        std::vector<int64_t> X(k, 0);
        const int low = 1 + (int)(g() % (uint64_t)(k - 2));  // kind 3: this layer's is low
        for (int m = 1; m <= k - 2; ++m) {
          const int64_t lo = std::min<int64_t>(G0[m], u - 1);
          switch (kind) {
            case 0: X[m] = lo + (X0[m] - lo) / 2; break;
            case 1: X[m] = lo + (int64_t)(g() % (uint64_t)(u - lo)); break;
            case 2: X[m] = X0[m] - (int64_t)(g() % 64); break;
            default: X[m] = m == low ? lo + (X0[m] - lo) / 4 : X0[m]; break;
          }
        }
        scribble(w, g);
        if (!dp_layers(w, u, k, threads, G0.data(), X.data())) continue;
        ++cap_other;
        if (backtrack(w, u, k) != ref) fail("DP with other upper demands differs", trial);
      }
    }
  }
  std::printf("upper demands: coarse hints taken %d of %d, other hints taken %d\n", cap_ok,
              cap_tries, cap_other);
  // the coarse DP's upper demands must usually hold, or the fast path is silently lost
  if (cap_ok * 4 < cap_tries * 3) fail("the coarse DP's upper demands were refused too often", -1);
  // the layer solvers themselves (strides, row groups, pairs, wide rows) against brute force
  for (int trial = 0; trial < 32; ++trial) {
    std::mt19937_64 g(5000 + trial);
    // small problems with many clusters (clusters of a few values: brackets past the row)
    const bool small = trial < 12;
    const int64_t n = small ? 3 + trial * 6 : 300 + (int64_t)(g() % 2700);
    const int k = small ? 2 + (int)(g() % (uint64_t)std::min<int64_t>(n - 1, 40)) : 2 + (int)(g() % 7);
    Work w;
    make_problem(g, trial % 4, n, trial % 5 == 0, w);
    const int64_t u = (int64_t)w.v.size();
    if (u <= k) continue;
    check_layer_solvers(trial, w, u, k);
  }
  std::printf("hinted runs %d, refused %d, failures %d\n", hinted, refused, failures);
  return failures ? 1 : 0;
}
