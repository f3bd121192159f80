// The one binding file: thin pybind11 wrappers over the torch-free kernels. Tensors travel as
// raw addresses (tensor.data_ptr()) plus sizes and dtype codes; CUDA entry points also take
// the device index and the cudaStream_t (torch.cuda.current_stream().cuda_stream).
//
// The callers (popcomp/ops/backends/{cpu,cuda}/*.py) check the tensors behind the addresses
// first (shapes, dtypes, devices: popcomp/ops/checks.py); every entry point here still checks
// what it can see -- sizes, dtype and enum codes, null addresses, workspace sizes -- and throws
// std::invalid_argument (a ValueError in Python) naming the function and the argument, before
// any kernel runs. Every argument is named (py::arg): the Python callers pass them by keyword.
//
// The codes and constants the Python layer shares with the kernels (dtype codes, the K-means
// enums and status messages, the greedy gain guard) are exported here, from the C++ enums, as
// plain dicts that Python reads (its fallback copy serves only an unbuilt checkout, and
// tests/test_op_checks.py keeps it equal to these; see "codes" in PYBIND11_MODULE).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

#include <cstdint>

#include "common/args.h"
#include "common/parallel.h"
#include "common/runtime.h"
#include "kmeans/exact_dp_precise.h"
#include "kmeans/kmeans.h"
#include "hessian/hessian.h"
#include "covariance/covariance.h"
#include "palettized/palettized.h"

namespace py = pybind11;
using namespace popcomp;

namespace {
template <typename T>
T* ptr(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

// ---- argument checks of the raw entry points (common/args.h; the K-means kernels check
// their own: kmeans::check_args) -------------------------------------------------------------
using args::check_code;
using args::check_dtype;
using args::check_real;
using args::check_size;
using args::require;

void check_ptr(const char* fn, const char* name, uintptr_t a) {
  args::check_ptr(fn, name, reinterpret_cast<const void*>(a));
}

void check_device(const char* fn, int device) {
  require(device >= 0, fn, "device must be a CUDA device index >= 0, got " + std::to_string(device));
}

void check_workspace(const char* fn, uintptr_t ws, size_t bytes, size_t needed) {
  require(bytes >= needed, fn,
          "workspace too small (" + std::to_string(bytes) + " < " + std::to_string(needed) +
              " bytes)");
  require(ws != 0 || bytes == 0, fn, "workspace is a null address");
}

// acc_dtype: 1 (float32 acc; g, x float32/16, bfloat16) or 0 (float64 acc, g and x float64)
void check_sumsq(const char* fn, uintptr_t g, uintptr_t x, uintptr_t acc, int64_t B, int64_t R,
                 int64_t T, int64_t out, int64_t in, const py::tuple& gs, const py::tuple& xs,
                 int g_dtype, int x_dtype, int acc_dtype = 1) {
  check_size(fn, "B", B);
  check_size(fn, "R", R);
  check_size(fn, "T", T);
  check_size(fn, "out_features", out);
  check_size(fn, "in_features", in);
  require(gs.size() == 4, fn, "g_strides must hold 4 strides (b, r, t, o), got " +
                                  std::to_string(gs.size()));
  require(xs.size() == 3, fn, "x_strides must hold 3 strides (b, t, i), got " +
                                  std::to_string(xs.size()));
  check_dtype(fn, "acc_dtype", acc_dtype, 0, 1);
  const int lo = acc_dtype == 0 ? 0 : 1, hi = acc_dtype == 0 ? 0 : 3;
  check_dtype(fn, "g_dtype", g_dtype, lo, hi);
  check_dtype(fn, "x_dtype", x_dtype, lo, hi);
  if (B > 0 && R > 0 && T > 0 && out > 0 && in > 0) {
    check_ptr(fn, "g", g);
    check_ptr(fn, "x", x);
    check_ptr(fn, "acc", acc);
  }
}

void check_cov_sizes(const char* fn, int x_dtype, int64_t B, int64_t S, int64_t m,
                     int acc_dtype) {
  check_size(fn, "B", B);
  check_size(fn, "S", S);
  check_size(fn, "m", m);
  check_dtype(fn, "x_dtype", x_dtype);
  check_dtype(fn, "acc_dtype", acc_dtype, 0, 1);
}

void check_cov_accum(const char* fn, uintptr_t x, int x_dtype, int64_t B, int64_t S, int64_t m,
                     uintptr_t acc, int acc_dtype) {
  check_cov_sizes(fn, x_dtype, B, S, m, acc_dtype);
  if (B > 0 && S > 0 && m > 0) {
    check_ptr(fn, "x", x);
    check_ptr(fn, "acc", acc);
  }
}

void check_greedy_sizes(const char* fn, int dtype, int64_t m, int64_t k) {
  check_size(fn, "m", m);
  check_size(fn, "k", k);
  require(k <= m, fn, "k must be <= m (" + std::to_string(m) + "), got " + std::to_string(k));
  check_dtype(fn, "dtype", dtype, 0, 1);
}

void check_greedy(const char* fn, uintptr_t cov, int dtype, int64_t m, int64_t k, uintptr_t tau,
                  uintptr_t n0, uintptr_t L0, double rel_guard, uintptr_t idx, uintptr_t obj) {
  check_greedy_sizes(fn, dtype, m, k);
  check_real(fn, "rel_guard", rel_guard);
  if (k > 0) {  // M may be null: Z = I
    check_ptr(fn, "cov", cov);
    check_ptr(fn, "tau", tau);
    check_ptr(fn, "n0", n0);
    check_ptr(fn, "L0", L0);
    check_ptr(fn, "idx", idx);
    check_ptr(fn, "obj", obj);
  }
}

kmeans::Params kmeans_params(int64_t rows, int64_t n, int k, double beta, int method, int init,
                             int diameter, int max_iter, double tol, uint64_t seed, int x_dtype,
                             int w_dtype) {
  kmeans::Params p;
  p.rows = rows;
  p.n = n;
  p.k = k;
  p.beta = beta;
  p.method = static_cast<kmeans::Method>(method);
  p.init = static_cast<kmeans::Init>(init);
  p.diameter = static_cast<kmeans::Diameter>(diameter);
  p.max_iter = max_iter;
  p.tol = tol;
  p.seed = seed;
  p.x_dtype = static_cast<DType>(x_dtype);
  p.w_dtype = static_cast<DType>(w_dtype);
  return p;
}

kmeans::Buffers kmeans_buffers(uintptr_t x, uintptr_t w, uintptr_t init_centers,
                               uintptr_t centers, uintptr_t labels, uintptr_t cost,
                               uintptr_t n_iter) {
  kmeans::Buffers b;
  b.x = ptr<const void>(x);
  b.w = ptr<const void>(w);
  b.init_centers = ptr<const double>(init_centers);
  b.centers = ptr<double>(centers);
  b.labels = ptr<int32_t>(labels);
  b.cost = ptr<double>(cost);
  b.n_iter = ptr<int64_t>(n_iter);
  return b;
}
covariance::AccumParams cov_accum_params(int64_t B, int64_t S, int64_t m, int64_t sB, int64_t sS,
                                         int64_t sm, int x_dtype, int acc_dtype) {
  covariance::AccumParams p;
  p.B = B;
  p.S = S;
  p.m = m;
  p.sB = sB;
  p.sS = sS;
  p.sm = sm;
  p.x_dtype = static_cast<DType>(x_dtype);
  p.acc_dtype = static_cast<DType>(acc_dtype);
  return p;
}

// ---- codes and constants shared with the Python layer --------------------------------------
py::dict codes(std::initializer_list<std::pair<const char*, int>> items) {
  py::dict d;
  for (const auto& it : items) d[py::str(it.first)] = it.second;
  return d;
}

covariance::GreedyParams greedy_params(int64_t m, int64_t k, int dtype, double rel_guard) {
  covariance::GreedyParams p;
  p.m = m;
  p.k = k;
  p.dtype = static_cast<DType>(dtype);
  p.rel_guard = rel_guard;
  return p;
}

// ---- palettized matmul (begin) ------------------------------------------------------------
palettized::Params palettized_params(int64_t rows, int64_t in, int bits, int k,
                                     int64_t group_size, int64_t cb_rows, int cb_dtype) {
  palettized::Params p;
  p.rows = rows;
  p.in = in;
  p.bits = bits;
  p.k = k;
  p.group_size = group_size;
  p.cb_rows = cb_rows;
  p.cb_dtype = static_cast<DType>(cb_dtype);
  return p;
}

palettized::LinearArgs palettized_linear_args(uintptr_t x, int64_t x_row_stride, int x_dtype,
                                              int64_t M, uintptr_t packed, uintptr_t codebook,
                                              uintptr_t bias, int bias_dtype, uintptr_t y) {
  palettized::LinearArgs a;
  a.x = ptr<const void>(x);
  a.x_row_stride = x_row_stride;
  a.x_dtype = static_cast<DType>(x_dtype);
  a.M = M;
  a.packed = ptr<const uint8_t>(packed);
  a.codebook = ptr<const void>(codebook);
  a.bias = ptr<const void>(bias);
  a.bias_dtype = static_cast<DType>(bias_dtype);
  a.y = ptr<void>(y);
  return a;
}

palettized::DecodeArgs palettized_decode_args(uintptr_t packed, uintptr_t codebook,
                                              uintptr_t row_ids, int64_t row_begin, int64_t n,
                                              uintptr_t out, int out_dtype) {
  palettized::DecodeArgs a;
  a.packed = ptr<const uint8_t>(packed);
  a.codebook = ptr<const void>(codebook);
  a.row_ids = ptr<const int64_t>(row_ids);
  a.row_begin = row_begin;
  a.n = n;
  a.out = ptr<void>(out);
  a.out_dtype = static_cast<DType>(out_dtype);
  return a;
}
// ---- palettized matmul (end) --------------------------------------------------------------
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "popcomp compiled core (torch-free kernels)";
#if defined(POPCOMP_WITH_CUDA)
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
#if defined(POPCOMP_OPENMP)
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
  m.def("max_threads", &max_threads);

  // ---- codes: read by popcomp/_backend.py (dtype_codes) and popcomp/ops/checks.py --------
  m.attr("dtype_codes") = codes({{"float64", static_cast<int>(DType::f64)},
                                 {"float32", static_cast<int>(DType::f32)},
                                 {"float16", static_cast<int>(DType::f16)},
                                 {"bfloat16", static_cast<int>(DType::bf16)}});
  m.attr("kmeans_methods") = codes({{"lloyd", static_cast<int>(kmeans::Method::lloyd)},
                                    {"exact", static_cast<int>(kmeans::Method::exact)}});
  m.attr("kmeans_inits") = codes({{"kmeans++", static_cast<int>(kmeans::Init::kmeanspp)},
                                  {"linear", static_cast<int>(kmeans::Init::linear)},
                                  {"quantile", static_cast<int>(kmeans::Init::quantile)},
                                  {"given", static_cast<int>(kmeans::Init::given)}});
  m.attr("kmeans_diameters") = codes({{"squared", static_cast<int>(kmeans::Diameter::squared)},
                                      {"linear", static_cast<int>(kmeans::Diameter::linear)}});
  // the exact method's trust bound (exact_dp_precise.h): the CUDA backend, which has no
  // double-double DP, sends the rows that fail it to the CPU
  m.attr("kmeans_exact_trust_ratio") = kmeans::kTrustRatio;
  m.attr("kmeans_status") = codes({{"ok", kmeans::kOk},
                                   {"nonfinite_x", kmeans::kNonFiniteX},
                                   {"nonfinite_w", kmeans::kNonFiniteW},
                                   {"negative_w", kmeans::kNegativeW},
                                   {"zero_w", kmeans::kZeroW}});
  {  // the ValueError message of every failing status of kmeans::Result
    py::dict msg;
    msg[py::int_(static_cast<int>(kmeans::kNonFiniteX))] = "x contains NaN or Inf";
    msg[py::int_(static_cast<int>(kmeans::kNonFiniteW))] = "weights contains NaN or Inf";
    msg[py::int_(static_cast<int>(kmeans::kNegativeW))] =
        "weights must be non-negative (found negative entries)";
    msg[py::int_(static_cast<int>(kmeans::kZeroW))] =
        "weights are all zero: the objective has no minimizer";
    m.attr("kmeans_status_messages") = msg;
  }
  {  // rel_guard of greedy_select_{cpu,cuda} by the dtype of cov
    py::dict g;
    g["float64"] = covariance::kGreedyRelGuardEps * std::numeric_limits<double>::epsilon();
    g["float32"] =
        covariance::kGreedyRelGuardEps * static_cast<double>(std::numeric_limits<float>::epsilon());
    m.attr("greedy_rel_guard") = g;
  }
#if defined(POPCOMP_WITH_CUDA)
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_build_version", &cuda_build_version);
  m.def("cuda_driver_version", &cuda_driver_version);
  m.def("cuda_device_error", &cuda_device_error);
#else
  m.def("cuda_device_count", []() { return 0; });
  m.def("cuda_build_version", []() { return 0; });
  m.def("cuda_driver_version", []() { return 0; });
  m.def("cuda_device_error", []() { return std::string(); });
#endif

  // ---- weighted 1-D K-means -------------------------------------------------------------
  m.def(
      "kmeans1d_cpu",
      [](uintptr_t x, uintptr_t w, int x_dtype, int w_dtype, int64_t rows, int64_t n, int k,
         double beta, int method, int init, int diameter, int max_iter, double tol,
         uint64_t seed, uintptr_t init_centers, uintptr_t centers, uintptr_t labels,
         uintptr_t cost, uintptr_t n_iter, int num_threads) {
        auto p = kmeans_params(rows, n, k, beta, method, init, diameter, max_iter, tol, seed,
                               x_dtype, w_dtype);
        auto r = kmeans::run_cpu(
            p, kmeans_buffers(x, w, init_centers, centers, labels, cost, n_iter), num_threads);
        return std::make_pair(r.status, r.row);
      },
      py::arg("x"), py::arg("w"), py::arg("x_dtype"), py::arg("w_dtype"), py::arg("rows"),
      py::arg("n"), py::arg("k"), py::arg("beta"), py::arg("method"), py::arg("init"),
      py::arg("diameter"), py::arg("max_iter"), py::arg("tol"), py::arg("seed"),
      py::arg("init_centers"), py::arg("centers"), py::arg("labels"), py::arg("cost"),
      py::arg("n_iter"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
#if defined(POPCOMP_WITH_CUDA)
  m.def("kmeans1d_cuda_workspace",
        [](int64_t rows, int64_t n, int k, int method, int x_dtype, int device, size_t dp_budget) {
          auto p = kmeans_params(rows, n, k, 0.0, method, 0, 0, 1, 0.0, 0, x_dtype, x_dtype);
          kmeans::check_params(p, "kmeans1d_cuda_workspace");
          return kmeans::cuda_workspace_bytes(p, device, dp_budget);
        },
        py::arg("rows"), py::arg("n"), py::arg("k"), py::arg("method"), py::arg("x_dtype"),
        py::arg("device") = -1, py::arg("dp_budget") = kmeans::kCudaDpBudget);
  m.def(
      "kmeans1d_cuda",
      [](uintptr_t x, uintptr_t w, int x_dtype, int w_dtype, int64_t rows, int64_t n, int k,
         double beta, int method, int init, int diameter, int max_iter, double tol,
         uint64_t seed, uintptr_t init_centers, uintptr_t centers, uintptr_t labels,
         uintptr_t cost, uintptr_t n_iter, uintptr_t workspace, size_t workspace_bytes,
         int device, uintptr_t stream, size_t dp_budget) {
        const char* fn = "kmeans1d_cuda";
        check_device(fn, device);
        check_workspace(fn, workspace, workspace_bytes, 0);  // its size: run_cuda, from the plan
        auto p = kmeans_params(rows, n, k, beta, method, init, diameter, max_iter, tol, seed,
                               x_dtype, w_dtype);
        kmeans::run_cuda(p, kmeans_buffers(x, w, init_centers, centers, labels, cost, n_iter),
                         ptr<void>(workspace), workspace_bytes, device, ptr<void>(stream),
                         dp_budget);
      },
      py::arg("x"), py::arg("w"), py::arg("x_dtype"), py::arg("w_dtype"), py::arg("rows"),
      py::arg("n"), py::arg("k"), py::arg("beta"), py::arg("method"), py::arg("init"),
      py::arg("diameter"), py::arg("max_iter"), py::arg("tol"), py::arg("seed"),
      py::arg("init_centers"), py::arg("centers"), py::arg("labels"), py::arg("cost"),
      py::arg("n_iter"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"),
      py::arg("stream"), py::arg("dp_budget") = kmeans::kCudaDpBudget,
      py::call_guard<py::gil_scoped_release>());
#endif

  // ---- fused squared per-sample gradients (Fisher / GGN diagonal) -----------------------
  // the workspace sumsq_outer_cuda's caller passes (popcomp/ops/backends/cuda/sumsq_outer_acc.py)
  m.attr("sumsq_outer_cuda_workspace_bytes") = hessian::kSumSqWorkspace;
  // acc[o,i] += sum_b sum_r (sum_t g[b,r,t,o] x[b,t,i])^2; strides in elements.
  auto sumsq_params = [](int64_t B, int64_t R, int64_t T, int64_t out, int64_t in,
                         py::tuple gs, py::tuple xs, int g_dtype, int x_dtype) {
    hessian::SumSqParams p;
    p.B = B; p.R = R; p.T = T; p.out = out; p.in = in;
    p.g_sb = gs[0].cast<int64_t>(); p.g_sr = gs[1].cast<int64_t>();
    p.g_st = gs[2].cast<int64_t>(); p.g_so = gs[3].cast<int64_t>();
    p.x_sb = xs[0].cast<int64_t>(); p.x_st = xs[1].cast<int64_t>(); p.x_si = xs[2].cast<int64_t>();
    p.g_dtype = static_cast<DType>(g_dtype);
    p.x_dtype = static_cast<DType>(x_dtype);
    return p;
  };
  m.def("sumsq_outer_cpu",
        [sumsq_params](uintptr_t g, uintptr_t x, uintptr_t acc, int64_t B, int64_t R, int64_t T,
                       int64_t out, int64_t in, py::tuple gs, py::tuple xs, int g_dtype,
                       int x_dtype, int num_threads, int acc_dtype) {
          check_sumsq("sumsq_outer_cpu", g, x, acc, B, R, T, out, in, gs, xs, g_dtype, x_dtype,
                      acc_dtype);
          auto p = sumsq_params(B, R, T, out, in, gs, xs, g_dtype, x_dtype);
          py::gil_scoped_release release;
          if (acc_dtype == 0)  // float64 acc, g and x
            hessian::sumsq_outer_cpu_f64(p, ptr<const double>(g), ptr<const double>(x),
                                         ptr<double>(acc), num_threads);
          else
            hessian::sumsq_outer_cpu(p, ptr<const void>(g), ptr<const void>(x), ptr<float>(acc),
                                     num_threads);
        },
        py::arg("g"), py::arg("x"), py::arg("acc"), py::arg("B"), py::arg("R"), py::arg("T"),
        py::arg("out_features"), py::arg("in_features"), py::arg("g_strides"),
        py::arg("x_strides"), py::arg("g_dtype"), py::arg("x_dtype"), py::arg("num_threads"),
        py::arg("acc_dtype") = 1);
#if defined(POPCOMP_WITH_CUDA)
  m.def("sumsq_outer_cuda",
        [sumsq_params](uintptr_t g, uintptr_t x, uintptr_t acc, int64_t B, int64_t R, int64_t T,
                       int64_t out, int64_t in, py::tuple gs, py::tuple xs, int g_dtype,
                       int x_dtype, int device, uintptr_t stream, uintptr_t workspace,
                       size_t workspace_bytes, int acc_dtype) {
          check_sumsq("sumsq_outer_cuda", g, x, acc, B, R, T, out, in, gs, xs, g_dtype, x_dtype,
                      acc_dtype);
          check_device("sumsq_outer_cuda", device);
          // any size (null and 0 too): the splits that fit, one pass without room for two
          auto p = sumsq_params(B, R, T, out, in, gs, xs, g_dtype, x_dtype);
          py::gil_scoped_release release;
          if (acc_dtype == 0)  // float64 acc, g and x
            hessian::sumsq_outer_cuda_f64(p, ptr<const double>(g), ptr<const double>(x),
                                          ptr<double>(acc), ptr<void>(workspace),
                                          workspace_bytes, device, ptr<void>(stream));
          else
            hessian::sumsq_outer_cuda(p, ptr<const void>(g), ptr<const void>(x),
                                      ptr<float>(acc), ptr<void>(workspace), workspace_bytes,
                                      device, ptr<void>(stream));
        },
        py::arg("g"), py::arg("x"), py::arg("acc"), py::arg("B"), py::arg("R"), py::arg("T"),
        py::arg("out_features"), py::arg("in_features"), py::arg("g_strides"),
        py::arg("x_strides"), py::arg("g_dtype"), py::arg("x_dtype"), py::arg("device"),
        py::arg("stream"), py::arg("workspace") = 0, py::arg("workspace_bytes") = 0,
        py::arg("acc_dtype") = 1);
#endif

  // ---- spectral pruning: covariance accumulation and greedy selection --------------------
  m.def(
      "covariance_accumulate_cpu",
      [](uintptr_t x, int x_dtype, int64_t B, int64_t S, int64_t mm, int64_t sB, int64_t sS,
         int64_t sm, uintptr_t acc, int acc_dtype, int num_threads) {
        check_cov_accum("covariance_accumulate_cpu", x, x_dtype, B, S, mm, acc, acc_dtype);
        covariance::accumulate_cpu(cov_accum_params(B, S, mm, sB, sS, sm, x_dtype, acc_dtype),
                                   ptr<const void>(x), ptr<void>(acc), num_threads);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("B"), py::arg("S"), py::arg("m"),
      py::arg("stride_b"), py::arg("stride_s"), py::arg("stride_m"), py::arg("acc"),
      py::arg("acc_dtype"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "greedy_select_cpu",
      [](uintptr_t cov, uintptr_t M, int dtype, int64_t mm, int64_t k, uintptr_t tau,
         uintptr_t n0, uintptr_t L0, double rel_guard, uintptr_t idx, uintptr_t obj,
         int num_threads) {
        check_greedy("greedy_select_cpu", cov, dtype, mm, k, tau, n0, L0, rel_guard, idx, obj);
        covariance::greedy_cpu(greedy_params(mm, k, dtype, rel_guard), ptr<const void>(cov),
                               ptr<const void>(M), ptr<const double>(tau),
                               ptr<const double>(n0), ptr<const double>(L0), ptr<int64_t>(idx),
                               ptr<double>(obj), num_threads);
      },
      py::arg("cov"), py::arg("M"), py::arg("dtype"), py::arg("m"), py::arg("k"), py::arg("tau"),
      py::arg("n0"), py::arg("L0"), py::arg("rel_guard"), py::arg("idx"), py::arg("obj"),
      py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
#if defined(POPCOMP_WITH_CUDA)
  m.def("covariance_accumulate_cuda_workspace",
        [](int x_dtype, int64_t B, int64_t S, int64_t mm, int acc_dtype, int device) {
          check_cov_sizes("covariance_accumulate_cuda_workspace", x_dtype, B, S, mm, acc_dtype);
          check_device("covariance_accumulate_cuda_workspace", device);
          return covariance::accumulate_cuda_workspace_bytes(
              cov_accum_params(B, S, mm, 0, 0, 1, x_dtype, acc_dtype), device);
        },
        py::arg("x_dtype"), py::arg("B"), py::arg("S"), py::arg("m"), py::arg("acc_dtype"),
        py::arg("device"));
  m.def(
      "covariance_accumulate_cuda",
      [](uintptr_t x, int x_dtype, int64_t B, int64_t S, int64_t mm, int64_t sB, int64_t sS,
         int64_t sm, uintptr_t acc, int acc_dtype, uintptr_t workspace, size_t workspace_bytes,
         int device, uintptr_t stream) {
        const char* fn = "covariance_accumulate_cuda";
        check_cov_accum(fn, x, x_dtype, B, S, mm, acc, acc_dtype);
        check_device(fn, device);
        // a workspace below accumulate_cuda_workspace_bytes is allowed: one pass, no splits
        check_workspace(fn, workspace, workspace_bytes, 0);
        covariance::accumulate_cuda(cov_accum_params(B, S, mm, sB, sS, sm, x_dtype, acc_dtype),
                                    ptr<const void>(x), ptr<void>(acc), ptr<void>(workspace),
                                    workspace_bytes, device, ptr<void>(stream));
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("B"), py::arg("S"), py::arg("m"),
      py::arg("stride_b"), py::arg("stride_s"), py::arg("stride_m"), py::arg("acc"),
      py::arg("acc_dtype"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("greedy_select_cuda_workspace", [](int dtype, int64_t mm, int64_t k) {
    check_greedy_sizes("greedy_select_cuda_workspace", dtype, mm, k);
    return covariance::greedy_cuda_workspace_bytes(greedy_params(mm, k, dtype, 0.0));
  }, py::arg("dtype"), py::arg("m"), py::arg("k"));
  m.def(
      "greedy_select_cuda",
      [](uintptr_t cov, uintptr_t M, int dtype, int64_t mm, int64_t k, uintptr_t tau,
         uintptr_t n0, uintptr_t L0, double rel_guard, uintptr_t idx, uintptr_t obj,
         uintptr_t workspace, size_t workspace_bytes, int device, uintptr_t stream) {
        const char* fn = "greedy_select_cuda";
        check_greedy(fn, cov, dtype, mm, k, tau, n0, L0, rel_guard, idx, obj);
        check_device(fn, device);
        if (k > 0)
          check_workspace(fn, workspace, workspace_bytes,
                          covariance::greedy_cuda_workspace_bytes(greedy_params(mm, k, dtype, 0.0)));
        covariance::greedy_cuda(greedy_params(mm, k, dtype, rel_guard), ptr<const void>(cov),
                                ptr<const void>(M), ptr<const double>(tau),
                                ptr<const double>(n0), ptr<const double>(L0), ptr<int64_t>(idx),
                                ptr<double>(obj), ptr<void>(workspace), workspace_bytes, device,
                                ptr<void>(stream));
      },
      py::arg("cov"), py::arg("M"), py::arg("dtype"), py::arg("m"), py::arg("k"), py::arg("tau"),
      py::arg("n0"), py::arg("L0"), py::arg("rel_guard"), py::arg("idx"), py::arg("obj"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
#endif
  // ---- palettized matmul (begin) ----------------------------------------------------------
  // y = x W_hat^T (+ bias) and the dense W_hat, read from packed indices (layout v2) and
  // codebooks; csrc/palettized/palettized.h documents shapes and semantics:
  //   packed  uint8 (rows, palettized_row_bytes(in_features, bits))
  //   codebook cb_dtype (cb_rows, k): cb_rows 1 (per tensor) or rows (per channel) with
  //           group_size 0, rows * ceil(in_features / group_size) with group_size > 0
  //   x       (M, in_features) in x_dtype, rows x_row_stride elements apart (last dim
  //           contiguous); y (M, rows) contiguous in x_dtype; bias (rows,) or 0
  //   decode  out (n, in_features) contiguous in out_dtype: rows row_ids[i] (int64, when
  //           row_ids != 0) or row_begin + i
  // dtype codes: dtype_codes (x, bias, out: float32 / float16 / bfloat16; codebook: float32 /
  // float16). num_threads <= 0: all of OpenMP's threads.
  m.attr("palettized_layout_version") = 2;
  m.def("palettized_row_bytes",
        [](int64_t in_features, int bits) {
          check_size("palettized_row_bytes", "in_features", in_features);
          require(bits >= 1 && bits <= 8, "palettized_row_bytes",
                  "bits must be in 1..8, got " + std::to_string(bits));
          return palettized::row_bytes(in_features, bits);
        },
        py::arg("in_features"), py::arg("bits"));
  m.def("palettized_cpu_isa", []() { return std::string(palettized::cpu_isa()); });
  m.def(
      "palettized_linear_cpu",
      [](uintptr_t x, int64_t x_row_stride, int x_dtype, int64_t M, uintptr_t packed,
         uintptr_t codebook, int cb_dtype, int64_t cb_rows, uintptr_t bias, int bias_dtype,
         uintptr_t y, int64_t rows, int64_t in_features, int bits, int k, int64_t group_size,
         int num_threads) {
        palettized::linear_cpu(
            palettized_params(rows, in_features, bits, k, group_size, cb_rows, cb_dtype),
            palettized_linear_args(x, x_row_stride, x_dtype, M, packed, codebook, bias,
                                   bias_dtype, y),
            num_threads);
      },
      py::arg("x"), py::arg("x_row_stride"), py::arg("x_dtype"), py::arg("M"), py::arg("packed"),
      py::arg("codebook"), py::arg("cb_dtype"), py::arg("cb_rows"), py::arg("bias"),
      py::arg("bias_dtype"), py::arg("y"), py::arg("rows"), py::arg("in_features"),
      py::arg("bits"), py::arg("k"), py::arg("group_size"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "palettized_decode_cpu",
      [](uintptr_t packed, uintptr_t codebook, int cb_dtype, int64_t cb_rows, uintptr_t row_ids,
         int64_t row_begin, int64_t n, uintptr_t out, int out_dtype, int64_t rows,
         int64_t in_features, int bits, int k, int64_t group_size, int num_threads) {
        palettized::decode_cpu(
            palettized_params(rows, in_features, bits, k, group_size, cb_rows, cb_dtype),
            palettized_decode_args(packed, codebook, row_ids, row_begin, n, out, out_dtype),
            num_threads);
      },
      py::arg("packed"), py::arg("codebook"), py::arg("cb_dtype"), py::arg("cb_rows"),
      py::arg("row_ids"), py::arg("row_begin"), py::arg("n"), py::arg("out"),
      py::arg("out_dtype"), py::arg("rows"), py::arg("in_features"), py::arg("bits"),
      py::arg("k"), py::arg("group_size"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>());
#if defined(POPCOMP_WITH_CUDA)
  m.def(
      "palettized_linear_cuda",
      [](uintptr_t x, int64_t x_row_stride, int x_dtype, int64_t M, uintptr_t packed,
         uintptr_t codebook, int cb_dtype, int64_t cb_rows, uintptr_t bias, int bias_dtype,
         uintptr_t y, int64_t rows, int64_t in_features, int bits, int k, int64_t group_size,
         int device, uintptr_t stream) {
        check_device("palettized_linear_cuda", device);
        palettized::linear_cuda(
            palettized_params(rows, in_features, bits, k, group_size, cb_rows, cb_dtype),
            palettized_linear_args(x, x_row_stride, x_dtype, M, packed, codebook, bias,
                                   bias_dtype, y),
            device, ptr<void>(stream));
      },
      py::arg("x"), py::arg("x_row_stride"), py::arg("x_dtype"), py::arg("M"), py::arg("packed"),
      py::arg("codebook"), py::arg("cb_dtype"), py::arg("cb_rows"), py::arg("bias"),
      py::arg("bias_dtype"), py::arg("y"), py::arg("rows"), py::arg("in_features"),
      py::arg("bits"), py::arg("k"), py::arg("group_size"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "palettized_decode_cuda",
      [](uintptr_t packed, uintptr_t codebook, int cb_dtype, int64_t cb_rows, uintptr_t row_ids,
         int64_t row_begin, int64_t n, uintptr_t out, int out_dtype, int64_t rows,
         int64_t in_features, int bits, int k, int64_t group_size, int device,
         uintptr_t stream) {
        check_device("palettized_decode_cuda", device);
        palettized::decode_cuda(
            palettized_params(rows, in_features, bits, k, group_size, cb_rows, cb_dtype),
            palettized_decode_args(packed, codebook, row_ids, row_begin, n, out, out_dtype),
            device, ptr<void>(stream));
      },
      py::arg("packed"), py::arg("codebook"), py::arg("cb_dtype"), py::arg("cb_rows"),
      py::arg("row_ids"), py::arg("row_begin"), py::arg("n"), py::arg("out"),
      py::arg("out_dtype"), py::arg("rows"), py::arg("in_features"), py::arg("bits"),
      py::arg("k"), py::arg("group_size"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
#endif
  // ---- palettized matmul (end) ------------------------------------------------------------
}
