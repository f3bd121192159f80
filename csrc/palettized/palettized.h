// Palettized (lookup-table) matmul: y = x W_hat^T (+ bias), W_hat[r, c] = codebook[g(r, c), idx[r, c]]
// read straight from packed indices (layout v2, palettized_math.h) and the codebooks, never a
// dense weight. Torch-free interface: raw pointers, sizes, dtype codes (common/hd.h) and, for
// CUDA, an explicit device and stream.
//
// Shapes (all contiguous unless a stride is given; elements, not bytes):
//   packed   uint8 (rows, row_bytes(in, bits)), layout v2
//   codebook cb_dtype (cb_rows, k):
//              group_size == 0: cb_rows == 1 (per tensor) or cb_rows == rows (per channel);
//              group_size == g > 0: cb_rows == rows * ceil(in / g) (per group, row-major by
//              (row, group): element (r, c) uses codebook row r * ceil(in / g) + c / g)
//   linear   x (M, in) in x_dtype, element (m, c) at x[m * x_row_stride + c]; bias (rows,) in
//            bias_dtype or null; y (M, rows) contiguous in x_dtype (fp32 accumulation)
//   decode   out (n, in) contiguous in out_dtype: out[i] = W_hat[row_ids[i]] (row_ids given)
//            or W_hat[row_begin + i] (row_ids null)
// An index >= k (never written by the packer; rejected at load time) reads the value 0.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/args.h"
#include "common/hd.h"

namespace popcomp {
namespace palettized {

struct Params {
  int64_t rows = 0;        // rows of W_hat (output features)
  int64_t in = 0;          // columns of W_hat (input features)
  int bits = 4;            // bits per index, 1..8
  int k = 16;              // entries per codebook row, 1..2^bits
  int64_t group_size = 0;  // 0: per tensor / per channel; g > 0: a codebook per g inputs of a row
  int64_t cb_rows = 1;     // rows of the codebook (see above)
  DType cb_dtype = DType::f32;  // f32 or f16
};

struct LinearArgs {
  const void* x = nullptr;
  int64_t x_row_stride = 0;  // elements between x rows (any value >= 0 when M == 1)
  DType x_dtype = DType::f32;  // f32, f16 or bf16; also the dtype of y
  int64_t M = 0;               // rows of x
  const uint8_t* packed = nullptr;
  const void* codebook = nullptr;
  const void* bias = nullptr;  // (rows,) or null
  DType bias_dtype = DType::f32;  // f32, f16 or bf16 (ignored without bias)
  void* y = nullptr;
};

struct DecodeArgs {
  const uint8_t* packed = nullptr;
  const void* codebook = nullptr;
  const int64_t* row_ids = nullptr;  // n row numbers in [0, rows), or null: rows row_begin + i
  int64_t row_begin = 0;
  int64_t n = 0;                      // rows to decode
  void* out = nullptr;                // (n, in) contiguous
  DType out_dtype = DType::f32;       // f32, f16 or bf16
};

// ---- sizes of layout v2 ------------------------------------------------------------------
inline int64_t padded_in(int64_t in) { return (in + 31) / 32 * 32; }
inline int64_t row_bytes(int64_t in, int bits) { return padded_in(in) / 32 * 4 * bits; }
inline int64_t blocks_per_row(int64_t in) { return padded_in(in) / 32; }
// columns of a row's last block that exist (1..32; 0 when in == 0)
inline int last_block_columns(int64_t in) {
  const int64_t nb = blocks_per_row(in);
  return (int)(in - (nb > 0 ? nb - 1 : 0) * 32);
}
inline int64_t groups_per_row(int64_t in, int64_t group_size) {
  return group_size > 0 ? (in + group_size - 1) / group_size : 1;
}

// ---- argument checks (host; std::invalid_argument naming fn and the argument) -------------
inline void check_params(const Params& p, const char* fn) {
  args::check_size(fn, "rows", p.rows);
  args::check_size(fn, "in_features", p.in);
  args::require(p.bits >= 1 && p.bits <= 8, fn,
                "bits must be in 1..8, got " + std::to_string(p.bits));
  args::require(p.k >= 1 && p.k <= (1 << p.bits), fn,
                "k must be in 1..2^bits = " + std::to_string(1 << p.bits) + ", got " +
                    std::to_string(p.k));
  args::require(p.group_size >= 0, fn,
                "group_size must be >= 0 (0: per tensor / per channel), got " +
                    std::to_string(p.group_size));
  args::check_dtype(fn, "cb_dtype", static_cast<int>(p.cb_dtype), 1, 2);
  if (p.group_size == 0) {
    args::require(p.cb_rows == 1 || p.cb_rows == p.rows, fn,
                  "cb_rows must be 1 (per tensor) or rows = " + std::to_string(p.rows) +
                      " (per channel) with group_size 0, got " + std::to_string(p.cb_rows));
  } else {
    const int64_t want = p.rows * groups_per_row(p.in, p.group_size);
    args::require(p.cb_rows == want, fn,
                  "cb_rows must be rows * ceil(in_features / group_size) = " +
                      std::to_string(want) + ", got " + std::to_string(p.cb_rows));
  }
}

inline void check_linear(const Params& p, const LinearArgs& a, const char* fn) {
  check_params(p, fn);
  args::check_size(fn, "M", a.M);
  args::check_dtype(fn, "x_dtype", static_cast<int>(a.x_dtype), 1, 3);
  if (a.bias) args::check_dtype(fn, "bias_dtype", static_cast<int>(a.bias_dtype), 1, 3);
  args::require(a.M <= 1 || a.x_row_stride >= 0, fn,
                "x_row_stride must be >= 0, got " + std::to_string(a.x_row_stride));
  if (a.M == 0 || p.rows == 0) return;
  args::check_ptr(fn, "y", a.y);
  if (p.in == 0) return;
  args::check_ptr(fn, "x", a.x);
  args::check_ptr(fn, "packed", a.packed);
  args::check_ptr(fn, "codebook", a.codebook);
}

inline void check_decode(const Params& p, const DecodeArgs& a, const char* fn) {
  check_params(p, fn);
  args::check_size(fn, "n", a.n);
  args::check_dtype(fn, "out_dtype", static_cast<int>(a.out_dtype), 1, 3);
  if (!a.row_ids)
    args::require(a.row_begin >= 0 && a.row_begin + a.n <= p.rows, fn,
                  "row_begin + n must be in 0..rows = " + std::to_string(p.rows) +
                      " (row_begin " + std::to_string(a.row_begin) + ", n " +
                      std::to_string(a.n) + ")");
  if (a.n == 0 || p.in == 0) return;
  args::check_ptr(fn, "out", a.out);
  args::check_ptr(fn, "packed", a.packed);
  args::check_ptr(fn, "codebook", a.codebook);
}

// ---- CPU (OpenMP over output rows; AVX-512 / AVX2 / portable chosen at run time) ----------
// num_threads <= 0: all of OpenMP's threads. decode_cpu checks row_ids (each in [0, rows))
// before decoding and throws std::invalid_argument naming row_ids.
void linear_cpu(const Params& p, const LinearArgs& a, int num_threads);
void decode_cpu(const Params& p, const DecodeArgs& a, int num_threads);
// The instruction set the CPU kernels use on this machine: "avx512", "avx2" or "portable".
const char* cpu_isa();

// ---- CUDA (all pointers device memory of `device`; enqueued on `stream`; no allocation, no
// host synchronization: CUDA-graph capturable). decode_cuda writes zeros for row_ids outside
// [0, rows) (the caller validates them; the host cannot see device memory without a sync).
void linear_cuda(const Params& p, const LinearArgs& a, int device, void* stream);
void decode_cuda(const Params& p, const DecodeArgs& a, int device, void* stream);

}  // namespace palettized
}  // namespace popcomp
