// CUDA backend of the palettized matmul and decode (see palettized.h). Every launch goes on the
// caller's stream of the caller's device; no allocation, no host synchronization (CUDA-graph
// capturable).
//
// linear (batch 1..8 per thread block, any M by blocks over the batch): a thread block of 4
// warps computes 4 * RW output rows (RW = rows_per_warp(MT)) for MT rows of x. It walks the
// columns in chunks of 1024: the chunk of x (MT rows, converted to fp32) is staged in shared
// memory, each lane takes one 32-index block of each of its warp's rows -- 4 * bits bytes,
// 128-bit loads where the rows are 16-byte aligned -- decodes it in registers (word_index:
// shifts and masks by constants) and FMAs the looked-up weights with the staged x into RW x MT
// accumulators; a warp-shuffle reduction ends each row. Look-ups: for up to 16 entries
// (bits <= 4) and group sizes that are 0 or a multiple of 32, a table per lane in shared memory
// (entry e of lane l at e * 32 + l: every lane its own bank, no conflicts, no synchronization:
// a lane reads only what it wrote), rebuilt when the lane's codebook changes; otherwise the
// codebook itself through the read-only cache. Other group sizes: the per-column group by a
// GroupCursor, indices by the scalar block_index.
// decode: one thread per output element, rows looped over gridDim.y.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common/args.h"
#include "common/cuda_utils.cuh"
#include "palettized/palettized.h"
#include "palettized/palettized_math.h"

namespace popcomp {
namespace palettized {
namespace {

constexpr int kThreads = kCudaWarps * 32;
constexpr int kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

// What both kernels read about the weight (weight_args).
struct WArgs {
  const uint8_t* packed;
  const void* cb;
  int64_t rows, in, rb, groups, group_size, cb_rows;
  int k, bits;
  DType cbt;
};

WArgs weight_args(const Params& p, const uint8_t* packed, const void* cb) {
  WArgs w;
  w.packed = packed;
  w.cb = cb;
  w.rows = p.rows;
  w.in = p.in;
  w.rb = row_bytes(p.in, p.bits);
  w.groups = groups_per_row(p.in, p.group_size);
  w.group_size = p.group_size;
  w.cb_rows = p.cb_rows;
  w.k = p.k;
  w.bits = p.bits;
  w.cbt = p.cb_dtype;
  return w;
}

struct KArgs : WArgs {
  const void* x;
  const void* bias;
  void* y;
  int64_t nblocks, xstride, M;
  int tail;
  int vec;  // 16: rows 16-byte aligned (uint4 loads); 8: 8-byte aligned (uint2); 4: words
  DType xt, bt;
};

// Mode of the look-up: kTable (bits <= 4, a block in one codebook), kDirect (bits >= 5, a block
// in one codebook), kGeneral (any group size).
enum Mode : int { kTable = 0, kDirect = 1, kGeneral = 2 };

template <int BITS>
__device__ __forceinline__ void load_block(const uint8_t* p, int vec, uint32_t (&w)[BITS]) {
  if constexpr (BITS % 4 == 0) {
    if (vec == 16) {
#pragma unroll
      for (int j = 0; j < BITS / 4; ++j) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + j);
        w[4 * j] = v.x;
        w[4 * j + 1] = v.y;
        w[4 * j + 2] = v.z;
        w[4 * j + 3] = v.w;
      }
      return;
    }
  }
  if constexpr (BITS % 2 == 0) {
    if (vec >= 8) {
#pragma unroll
      for (int j = 0; j < BITS / 2; ++j) {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(p) + j);
        w[2 * j] = v.x;
        w[2 * j + 1] = v.y;
      }
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < BITS; ++j) w[j] = __ldg(reinterpret_cast<const unsigned int*>(p) + j);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// BITS: compile-time bits for kTable / kDirect (0 with kGeneral: a.bits at run time).
template <int BITS, int MT, int MODE>
__global__ void __launch_bounds__(kThreads, MODE == kTable ? 4 : 3) linear_kernel(KArgs a) {
  constexpr int RW = rows_per_warp(MT);
  constexpr int NT = MODE == kTable ? (1 << BITS) : 1;
  __shared__ __align__(16) float xs[MT][32 * kCudaXStride];
  __shared__ float tab[MODE == kTable ? kCudaWarps * RW * NT * 32 : 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row0 = warp_row0(blockIdx.x, warp, RW);
  int64_t row[RW];
#pragma unroll
  for (int rr = 0; rr < RW; ++rr) {  // rows past the end repeat the last row (never stored)
    row[rr] = row0 + rr < a.rows ? row0 + rr : a.rows - 1;
  }
  for (int64_t m0 = (int64_t)blockIdx.y * MT; m0 < a.M; m0 += (int64_t)gridDim.y * MT) {
    float acc[RW][MT];
#pragma unroll
    for (int rr = 0; rr < RW; ++rr)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[rr][m] = 0.f;
    int64_t tab_group[RW];
#pragma unroll
    for (int rr = 0; rr < RW; ++rr) tab_group[rr] = -1;
    for (int64_t c0 = 0; c0 < a.in; c0 += kCudaChunk) {
      __syncthreads();  // every warp is done with the previous chunk
      for (int e = threadIdx.x; e < MT * kCudaChunk; e += kThreads) {
        const int m = e / kCudaChunk, col = e % kCudaChunk;
        const int64_t gc = c0 + col;
        float v = 0.f;
        if (m0 + m < a.M && gc < a.in) v = load_as_float(a.x, a.xt, (m0 + m) * a.xstride + gc);
        xs[m][x_slot(col)] = v;
      }
      __syncthreads();
      const int64_t b = c0 / kBlock + lane;  // this lane's block
      if (b >= a.nblocks) continue;
      const int valid = b == a.nblocks - 1 ? a.tail : kBlock;  // columns of the block that exist
      const float* xl = &xs[0][lane * kCudaXStride];
      if constexpr (MODE == kGeneral) {
#pragma unroll
        for (int rr = 0; rr < RW; ++rr) {
          const uint8_t* blk = a.packed + row[rr] * a.rb + b * 4 * a.bits;
          GroupCursor cur(b * kBlock, a.group_size);
          for (int i = 0; i < valid; ++i) {
            const int idx = block_index(blk, a.bits, i);
            const float w = codebook_value(a.cb, a.cbt, row[rr] * a.groups + cur.at(b * kBlock + i), a.k, idx);
#pragma unroll
            for (int m = 0; m < MT; ++m) acc[rr][m] = fmaf(w, xl[m * 32 * kCudaXStride + i], acc[rr][m]);
          }
        }
      } else {
        uint32_t wd[RW][BITS];
#pragma unroll
        for (int rr = 0; rr < RW; ++rr) load_block<BITS>(a.packed + row[rr] * a.rb + b * (4 * BITS), a.vec, wd[rr]);
        const int64_t gi = a.group_size > 0 ? b * kBlock / a.group_size : 0;
        const char* cbp[RW];  // kDirect: the codebook row of each row
#pragma unroll
        for (int rr = 0; rr < RW; ++rr) {
          const int64_t cbrow = codebook_row_of_group(row[rr], gi, a.group_size, a.groups, a.cb_rows);
          if constexpr (MODE == kTable) {
            if (cbrow != tab_group[rr]) {  // this lane's column of the table
              float* t = tab + (warp * RW + rr) * NT * 32 + lane;
#pragma unroll
              for (int e = 0; e < NT; ++e) t[e * 32] = codebook_value(a.cb, a.cbt, cbrow, a.k, e);
              tab_group[rr] = cbrow;
            }
          } else {
            cbp[rr] = static_cast<const char*>(a.cb) + cbrow * a.k * (a.cbt == DType::f16 ? 2 : 4);
          }
        }
        const bool cb16 = a.cbt == DType::f16;
#pragma unroll
        for (int q = 0; q < kBlock / 4; ++q) {
          float4 xv[MT];
#pragma unroll
          for (int m = 0; m < MT; ++m)
            xv[m] = *reinterpret_cast<const float4*>(xl + m * 32 * kCudaXStride + 4 * q);
#pragma unroll
          for (int rr = 0; rr < RW; ++rr) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const int i = 4 * q + j;
              const int idx = word_index<BITS>(wd[rr], i);
              float w;
              if constexpr (MODE == kTable) {
                w = tab[((warp * RW + rr) * NT + (idx & (NT - 1))) * 32 + lane];
              } else {
                w = idx >= a.k ? 0.f
                    : cb16     ? half_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(cbp[rr]) + idx))
                               : __ldg(reinterpret_cast<const float*>(cbp[rr]) + idx);
              }
              if (i >= valid) w = 0.f;  // padded columns (x is 0 there, the weight may be inf)
#pragma unroll
              for (int m = 0; m < MT; ++m) {
                const float xm = j == 0 ? xv[m].x : j == 1 ? xv[m].y : j == 2 ? xv[m].z : xv[m].w;
                acc[rr][m] = fmaf(w, xm, acc[rr][m]);
              }
            }
          }
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < RW; ++rr) {
      const float bias = a.bias ? load_as_float(a.bias, a.bt, row[rr]) : 0.f;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float s = warp_sum(acc[rr][m]);
        if (lane == 0 && row0 + rr < a.rows && m0 + m < a.M)
          store_as(a.y, a.xt, (m0 + m) * a.rows + row0 + rr, s + bias);
      }
    }
  }
}

struct DArgs : WArgs {
  const int64_t* row_ids;
  void* out;
  int64_t row_begin, n;
  DType ot;
};

__global__ void __launch_bounds__(256) decode_kernel(DArgs a) {
  const int64_t c = (int64_t)blockIdx.x * 256 + threadIdx.x;
  if (c >= a.in) return;
  for (int64_t i = blockIdx.y; i < a.n; i += gridDim.y) {
    const int64_t r = a.row_ids ? a.row_ids[i] : a.row_begin + i;
    float v = 0.f;
    if (r >= 0 && r < a.rows) {
      const uint8_t* blk = a.packed + r * a.rb + (c / kBlock) * 4 * a.bits;
      const int idx = block_index(blk, a.bits, (int)(c % kBlock));
      v = codebook_value(a.cb, a.cbt, codebook_row(r, c, a.group_size, a.groups, a.cb_rows), a.k, idx);
    }
    store_as(a.out, a.ot, i * a.in + c, v);
  }
}

// ---- launch --------------------------------------------------------------------------------
using LinearKernel = void (*)(KArgs);

template <int MT>
LinearKernel pick(int bits, int mode) {
  if (mode == kGeneral) return &linear_kernel<0, MT, kGeneral>;
  switch (bits) {
    case 1: return &linear_kernel<1, MT, kTable>;
    case 2: return &linear_kernel<2, MT, kTable>;
    case 3: return &linear_kernel<3, MT, kTable>;
    case 4: return &linear_kernel<4, MT, kTable>;
    case 5: return &linear_kernel<5, MT, kDirect>;
    case 6: return &linear_kernel<6, MT, kDirect>;
    case 7: return &linear_kernel<7, MT, kDirect>;
    default: return &linear_kernel<8, MT, kDirect>;
  }
}

}  // namespace

void linear_cuda(const Params& p, const LinearArgs& a, int device, void* stream) {
  const char* fn = "palettized_linear_cuda";
  check_linear(p, a, fn);
  if (a.M == 0 || p.rows == 0) return;
  args::require(reinterpret_cast<uintptr_t>(a.packed) % 4 == 0, fn,
                "packed must be 4-byte aligned (the start of a uint8 tensor's storage or of a row)");
  KArgs k;
  static_cast<WArgs&>(k) = weight_args(p, a.packed, a.codebook);
  k.x = a.x;
  k.bias = a.bias;
  k.y = a.y;
  k.nblocks = blocks_per_row(p.in);
  k.xstride = a.x_row_stride;
  k.M = a.M;
  k.tail = last_block_columns(p.in);
  const uintptr_t base = reinterpret_cast<uintptr_t>(a.packed);
  k.vec = (base % 16 == 0 && k.rb % 16 == 0) ? 16 : (base % 8 == 0 && k.rb % 8 == 0) ? 8 : 4;
  k.xt = a.x_dtype;
  k.bt = a.bias_dtype;
  const int mode = general_groups(p.group_size) ? kGeneral : p.bits <= 4 ? kTable : kDirect;
  const int mt = a.M <= 1 ? 1 : a.M == 2 ? 2 : a.M <= 4 ? 4 : 8;
  LinearKernel f = mt == 1 ? pick<1>(p.bits, mode)
                   : mt == 2 ? pick<2>(p.bits, mode)
                   : mt == 4 ? pick<4>(p.bits, mode)
                             : pick<8>(p.bits, mode);
  const int64_t rows_per_block = (int64_t)kCudaWarps * rows_per_warp(mt);
  const int64_t gx = (p.rows + rows_per_block - 1) / rows_per_block;
  args::require(gx <= kMaxGridX, fn, "rows must be <= " + std::to_string(kMaxGridX * rows_per_block) +
                                         " for one launch, got " + std::to_string(p.rows));
  const dim3 grid((unsigned)gx, (unsigned)std::min<int64_t>((a.M + mt - 1) / mt, kMaxGridY));
  DeviceGuard guard(device);
  f<<<grid, kThreads, 0, as_stream(stream)>>>(k);
  PC_CUDA_CHECK(cudaGetLastError());
}

void decode_cuda(const Params& p, const DecodeArgs& a, int device, void* stream) {
  const char* fn = "palettized_decode_cuda";
  check_decode(p, a, fn);
  if (a.n == 0 || p.in == 0) return;
  DArgs d;
  static_cast<WArgs&>(d) = weight_args(p, a.packed, a.codebook);
  d.row_ids = a.row_ids;
  d.out = a.out;
  d.row_begin = a.row_begin;
  d.n = a.n;
  d.ot = a.out_dtype;
  const int64_t gx = (p.in + 255) / 256;
  args::require(gx <= kMaxGridX, fn, "in_features must be <= " + std::to_string(kMaxGridX * 256) +
                                         " for one launch, got " + std::to_string(p.in));
  const dim3 grid((unsigned)gx, (unsigned)std::min<int64_t>(a.n, kMaxGridY));
  DeviceGuard guard(device);
  decode_kernel<<<grid, 256, 0, as_stream(stream)>>>(d);
  PC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace palettized
}  // namespace popcomp
