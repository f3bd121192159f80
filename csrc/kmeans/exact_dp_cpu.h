// The exact DP of 1-D K-means on the CPU: the optimal partition of a problem's sorted values.
// Input: the prefix sums w.s0, w.s1, w.s2 of the u sorted distinct values (kmeans_math.h);
// the layer solvers (one per instruction set, dp_layer.inc) and the demand mode that skips the
// rows the answer cannot use are in exact_dp_cpu.cpp.
#pragma once
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "kmeans/workspace.h"

namespace popcomp {
namespace kmeans {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Layer m of the DP:  D_m(i) = min_{j in [m, i]}  D_{m-1}(j-1) + cost(j, i),  and the leftmost
// argmin J_m(i) is non-decreasing in i (the cost is Monge). Each layer is solved by divide and
// conquer on that monotonicity down to cache-sized segments, then row strides within them and
// groups of rows sharing a bracket at the finest strides (dp_layer.inc); every row scans a
// contiguous column range at vector throughput.
constexpr int64_t kPB = 64;           // columns per lower-bound block of a wide row
constexpr int64_t kPruneMin = 2048;   // rows with at least this many columns use the blocks
constexpr int64_t kCacheRows = 16384;  // segments of fewer rows are solved stride by stride
// rows between solved ones solved together (group() in dp_layer.inc):
constexpr int64_t kGroupRows = 8;   // groups of kGroupRows - 1 rows, blocks of twice that
constexpr int64_t kGroupCols = 32;  // a group's bracket has fewer columns (else strides)
constexpr int64_t kBlockCols = 16;  // a block's bracket has fewer (else split)
constexpr int64_t kDemandMin = 2048;    // problems this large skip the rows the answer cannot use

struct DnC {
  const double* s0;
  const double* s1;
  const double* s2;
  const double* d;      // d[j] = D_{m-1}(j - 1)
  const int32_t* Jlow;  // J_{m-1}: J_m(i) >= J_{m-1}(i) (Knuth), or nullptr for m = 1
  double* dnext;        // dnext[i + 1] = D_m(i): the next layer's d
  int32_t* J;
  // Lower-bound blocks (nullptr when u < kPB): bd[b] = d[b kPB], the first column of block b;
  // b0/b1/b2[b] = s0/s1/s2[b kPB + kPB - 1], its last column; lb: this thread's scratch.
  const double* bd;
  const double* b0;
  const double* b1;
  const double* b2;
  double* lb;
  double margin;  // rounding slack of a block's lower bound (absolute)
};

// Cost of one segment from its weight, first and second moments (the DP's form: zero weight
// gives zero, rounding below zero is clamped).
inline __attribute__((always_inline)) double seg_cost_dp(double w, double s, double q) {
  const double c = q - s * s / (w > 0.0 ? w : 1.0);
  return c > 0.0 ? c : 0.0;
}

// One layer solver: rows [rlo, rhi] of a layer, columns within [clo, chi] (dp_layer.inc).
using LayerFn = void (*)(const DnC&, int64_t, int64_t, int64_t, int64_t);
// Every layer solver built in that this CPU runs, named, the fastest last (for tests).
std::vector<std::pair<const char*, LayerFn>> layer_solvers();
// The fastest of them.
LayerFn layer_solver();

// Layers 1..k-1 of the DP into w.J (layer m's argmins at w.J[m u + i]).
// Without G, every row of every layer. With G ("demand" mode), layer m solves only rows
// [L_m, rhi] and reads only columns j >= L_{m-1} + 1, i.e. rows of layer m - 1 it solved:
//   L_m = max(G[m], the first row x with J_{m-1}(x) >= L_{m-1} + 1).
// For i >= L_m the leftmost argmin J_m(i) >= J_m(x) >= J_{m-1}(x) >= L_{m-1} + 1 (monotone
// argmin and Knuth's bound), so the skipped columns cannot hold it and every solved row is
// exact whatever G is. The backtrack from row u - 1 stays on solved rows: J_m(i) - 1 >=
// L_{m-1} for every solved row i.
// With X as well, layer m also stops at row X[m] (an upper demand), and the next layer reads
// only columns j <= top + 1, top the highest row of layer m known exact. A row i above that
// cap is exact when its least value over the columns it read is at most D_m(top) - margin:
// every other column costs at least D_m(j - 1) >= D_m(top) (D_m is non-decreasing, and a
// cluster's cost is not negative). The rows known exact form a prefix of the rows solved (D
// is non-decreasing in the row), the next layer's cap. Below a cap the argmins are still
// lower bounds of the true ones, so the Knuth bounds stay valid.
// Returns false when some layer has no row left to solve that way or row u - 1 of the last
// layer is not known exact (hints too high or too low); the caller then solves without them.
// *why (when given) then says which: 1 the lower demands G (wrong without X as well), 2 the
// upper ones (a row was not known exact), 3 either (a layer's rows past the lower demand
// start above the upper one, or only the argmins of rows the previous layer skipped could
// say where). With out (a coarse run for demand_hint), D_m(i) of every solved row also goes
// to out->D[m u + i] and the highest row of layer m known exact to out->top[m] (m = 1..k-1).
struct LayerValues {
  double* D;
  int64_t* top;
};
bool dp_layers(Work& w, int64_t u, int k, int threads, const int64_t* G,
               const int64_t* X = nullptr, LayerValues* out = nullptr, int* why = nullptr);

// Demand hints for dp_layers, G[1..k-2] and X[1..k-2]: the rows of each layer that
// the answer is expected to need. The last layer reads only row u - 1, whose columns start at
// J_{k-1}(u - 1) >= J_{k-2}(u - 2), so layer k - 2 is needed from about J_{k-2}(u - 2) - 1 on,
// layer k - 3 from J_{k-3} of that row, and so on down: layer m from about u m / (k - 1).
// From above, row u - 1 of the last layer is known exact once layer k - 2 reaches a row x
// with D_{k-2}(x) >= D_{k-1}(u - 1), layer k - 3 must reach D_{k-2}(x), and so on down: for
// values of even density D_m(x) grows as x^3 / (m + 1)^2, so layer m is needed only up to
// about u ((m + 1) / k)^(2/3), and each layer solves a band of rows instead of the rows from
// the band up. Both are estimated by the same DP on a coarse problem (single values within
// 4k of either end, where outliers take clusters of their own; groups of kGroup values
// between them: a few percent of the work): G from its backtrack, less a margin; X from its
// D values, which bound the fine ones from above (a coarse partition is a fine one), plus a
// relative slack for the fine ones being lower. A wrong estimate costs time only (dp_layers
// checks every row it skips). Returns false where the problem is too small for that to pay.
constexpr double kCapSlack = 4e-3;  // relative slack of the upper demands
bool demand_hint(Work& w, int64_t u, int k, int threads, int64_t* G, int64_t* X,
                 double slack = kCapSlack);

// The DP's layers into w.J: in demand mode where the problem is large enough, else (or when
// the hints were wrong) every row. out: see dp_layers; slack: that of the upper demands.
void solve_layers(Work& w, int64_t u, int k, int threads, LayerValues* out = nullptr,
                  double slack = kCapSlack);

// The boundaries B[0..k] of the partition the argmins w.J of layers 1..k-1 give (from row u - 1
// of the last layer down).
void backtrack(const Work& w, int64_t u, int k, int64_t* B);

// Optimal boundaries B[0..k] of the u sorted values into k contiguous clusters (k < u).
void exact_partition(Work& w, int64_t u, int k, int threads, int64_t* B);

}  // namespace kmeans
}  // namespace popcomp
