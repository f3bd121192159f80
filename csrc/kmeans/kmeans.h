// Weighted 1-D K-means with diameter regularization (HW / DRHW K-means, Bu et al. eqs. 27, 31).
// Torch-free interface: raw pointers, sizes, and an explicit CUDA device and stream.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/args.h"
#include "common/hd.h"

namespace popcomp {
namespace kmeans {

enum class Method : int { lloyd = 0, exact = 1 };
enum class Init : int { kmeanspp = 0, linear = 1, quantile = 2, given = 3 };
// squared: beta * (max c - min c)^2 (eq. 31 as written); linear: beta * (max c - min c).
enum class Diameter : int { squared = 0, linear = 1 };

struct Params {
  int64_t rows = 1;       // independent problems
  int64_t n = 0;          // values per problem
  int k = 1;              // centers per problem
  double beta = 0.0;      // diameter penalty
  Method method = Method::lloyd;
  Init init = Init::kmeanspp;
  Diameter diameter = Diameter::squared;
  int max_iter = 300;
  double tol = 0.0;       // stop when the relative objective decrease is <= tol
  uint64_t seed = 0;
  DType x_dtype = DType::f32;
  DType w_dtype = DType::f32;  // ignored when w == nullptr
};

struct Buffers {
  const void* x = nullptr;             // rows x n, contiguous
  const void* w = nullptr;             // rows x n or nullptr (all ones)
  const double* init_centers = nullptr;  // rows x k (Init::given), else nullptr
  double* centers = nullptr;           // out: rows x k, ascending
  int32_t* labels = nullptr;           // out: rows x n
  double* cost = nullptr;              // out: rows
  int64_t* n_iter = nullptr;           // out: rows
};

// Problems with the input found while reading it (the Python layer raises ValueError).
enum Status : int { kOk = 0, kNonFiniteX = 1, kNonFiniteW = 2, kNegativeW = 3, kZeroW = 4 };
struct Result {
  int status = kOk;
  int64_t row = -1;  // first problem (row) with that status
};

// CPU backend (OpenMP across problems, and inside a single large problem). Validates x and w
// (finite, w >= 0, not all zero per row) in the same pass that reads them.
// The checks every entry point runs first (host; std::invalid_argument naming fn and the
// argument): sizes, k, dtype and enum codes, beta and tol finite >= 0, max_iter >= 0 ...
inline void check_params(const Params& p, const char* fn) {
  args::check_size(fn, "rows", p.rows);
  args::check_size(fn, "n", p.n);
  args::require(p.k >= 1, fn, "k must be >= 1, got " + std::to_string(p.k));
  args::check_dtype(fn, "x_dtype", static_cast<int>(p.x_dtype));
  args::check_dtype(fn, "w_dtype", static_cast<int>(p.w_dtype));
  args::check_real(fn, "beta", p.beta);
  args::check_code(fn, "method", static_cast<int>(p.method), 1);
  args::check_code(fn, "init", static_cast<int>(p.init), 3);
  args::check_code(fn, "diameter", static_cast<int>(p.diameter), 1);
  args::require(p.max_iter >= 0, fn, "max_iter must be >= 0, got " + std::to_string(p.max_iter));
  args::check_real(fn, "tol", p.tol);
}
// ... and, for a problem with values, the buffers (init_centers where init 'given' needs it).
inline void check_args(const Params& p, const Buffers& b, const char* fn) {
  check_params(p, fn);
  if (p.rows == 0 || p.n == 0) return;
  args::check_ptr(fn, "x", b.x);
  args::check_ptr(fn, "centers", b.centers);
  args::check_ptr(fn, "labels", b.labels);
  args::check_ptr(fn, "cost", b.cost);
  args::check_ptr(fn, "n_iter", b.n_iter);
  if (p.init == Init::given && p.method == Method::lloyd)
    args::check_ptr(fn, "init_centers (init 'given')", b.init_centers);
}

Result run_cpu(const Params& p, const Buffers& b, int num_threads);

// CUDA backend. `workspace` must hold cuda_workspace_bytes(p, device, dp_budget) bytes of
// device memory (the CUB scratch sizes are queried on `device`; -1: the current device).
// All work is enqueued on `stream` (a cudaStream_t) of `device`; nothing synchronizes the host.
// dp_budget: bytes of the exact DP's workspace (its argmins, (k-1) x 4 bytes per distinct value
// of a row, and two layers of D): rows are solved in chunks that fit it; a single row that
// needs more is solved alone (its need is the floor of the workspace).
constexpr size_t kCudaDpBudget = size_t(1) << 30;
size_t cuda_workspace_bytes(const Params& p, int device = -1, size_t dp_budget = kCudaDpBudget);
void run_cuda(const Params& p, const Buffers& b, void* workspace, size_t workspace_bytes,
              int device, void* stream, size_t dp_budget = kCudaDpBudget);

}  // namespace kmeans
}  // namespace popcomp
