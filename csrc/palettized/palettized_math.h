// Host/device math of the palettized kernels: layout v2 of the packed indices (the pieces of a
// 32-index block and the scalar decode of one index or a whole block), codebook addressing (element loads and the float -> fp16 / bf16 rounding of the outputs
// are common/hd.h's).
//
// Layout v2 (also described in python/popcomp/quantize/packing.py): a row is padded to a multiple of 32 indices
// (pad index 0) and cut into blocks of 32; a block takes 4 * bits bytes. bits is written as a
// sum of "pieces" of widths 8 (bits == 8 alone) or 4, 2, 1 in descending order -- exactly the set
// bits of `bits` -- each piece laid out as a pure piece of its width w: 4 * w bytes, byte
// t < 4w holding the indices t + j * 4w (j < 8 / w) in its bits [j w, (j + 1) w). The first
// piece holds the low bits of each index: idx = p0 | p1 << w0 | p2 << (w0 + w1).
#pragma once
#include <cstdint>

#include "common/hd.h"

namespace popcomp {
namespace palettized {

constexpr int kBlock = 32;  // indices per block

// ---- pieces of layout v2 -------------------------------------------------------------------
PC_HD constexpr int piece_count(int bits) {
  return (bits & 1) + ((bits >> 1) & 1) + ((bits >> 2) & 1) + ((bits >> 3) & 1);
}
// Width of piece i (0 = the low bits of the index): the i-th highest set bit of `bits`.
PC_HD constexpr int piece_width(int bits, int i) {
  int seen = 0;
  for (int w = 8; w >= 1; w >>= 1)
    if (bits & w) {
      if (seen == i) return w;
      ++seen;
    }
  return 0;
}
// Bit offset of piece i inside the index (sum of the widths before it); its byte offset inside
// the block is 4 times that.
PC_HD constexpr int piece_shift(int bits, int i) {
  int s = 0;
  for (int j = 0; j < i; ++j) s += piece_width(bits, j);
  return s;
}

// Index i (0..31) of the block at `blk` (4 * bits bytes).
PC_HD int block_index(const uint8_t* blk, int bits, int i) {
  int idx = 0, shift = 0;
  for (int w = 8; w >= 1; w >>= 1) {
    if (!(bits & w)) continue;
    const int per = 4 * w;  // bytes of this piece
    const int field = (blk[i % per] >> ((i / per) * w)) & ((1 << w) - 1);
    idx |= field << shift;
    shift += w;
    blk += per;
  }
  return idx;
}

// All 32 indices of the block at `blk`.
PC_HD void decode_block(const uint8_t* blk, int bits, uint8_t* idx) {
  for (int i = 0; i < kBlock; ++i) idx[i] = 0;
  int shift = 0;
  for (int w = 8; w >= 1; w >>= 1) {
    if (!(bits & w)) continue;
    const int per = 4 * w, mask = (1 << w) - 1;
    for (int t = 0; t < per; ++t) {
      const int byte = blk[t];
      for (int j = 0; j < 8 / w; ++j) idx[t + j * per] |= (uint8_t)(((byte >> (j * w)) & mask) << shift);
    }
    shift += w;
    blk += per;
  }
}

// Index i of a block held as 32-bit words (bytes little-endian: byte t is bits [8 (t % 4),
// 8 (t % 4) + 8) of word t / 4), as the CUDA kernels hold it in registers; with i a constant
// (an unrolled loop) every shift and mask folds to constants.
template <int BITS, int P = 0>
PC_HD int word_index(const uint32_t* w, int i) {
  if constexpr (P >= piece_count(BITS)) {
    return 0;
  } else {
    constexpr int wd = piece_width(BITS, P), per = 4 * wd, off = 4 * piece_shift(BITS, P);
    const int byte = off + i % per;
    const int field = (int)(w[byte / 4] >> (8 * (byte % 4) + (i / per) * wd)) & ((1 << wd) - 1);
    return (field << piece_shift(BITS, P)) | word_index<BITS, P + 1>(w, i);
  }
}

// ---- codebook addressing -----------------------------------------------------------------
// Codebook row of group gi of weight row r (gi counts the groups of the row; 0 without
// groups): per tensor (cb_rows == 1 with group_size 0), per channel (row r) or per group (row
// r * groups + gi).
PC_HD int64_t codebook_row_of_group(int64_t r, int64_t gi, int64_t group_size, int64_t groups,
                                    int64_t cb_rows) {
  if (group_size > 0) return r * groups + gi;
  return cb_rows == 1 ? 0 : r;
}
// Codebook row of element (r, c).
PC_HD int64_t codebook_row(int64_t r, int64_t c, int64_t group_size, int64_t groups,
                           int64_t cb_rows) {
  return codebook_row_of_group(r, group_size > 0 ? c / group_size : 0, group_size, groups,
                               cb_rows);
}

// Whether a block of 32 columns may straddle two codebooks (group_size > 0 and not a multiple
// of 32): the kernels then take their general path (per-column groups, scalar look-ups).
PC_HD bool general_groups(int64_t group_size) {
  return group_size > 0 && group_size % kBlock != 0;
}

// Walks the columns of a row from c0 on, one at a time, keeping the group (c / group_size)
// without a division per column (group_size > 0).
struct GroupCursor {
  int64_t group, next;  // group of the current column; first column of the next group
  int64_t g;
  PC_HD GroupCursor(int64_t c0, int64_t group_size)
      : group(c0 / group_size), next((c0 / group_size + 1) * group_size), g(group_size) {}
  // the group of column c, called for c0, c0 + 1, ... in order
  PC_HD int64_t at(int64_t c) {
    if (c == next) {
      ++group;
      next += g;
    }
    return group;
  }
};

// ---- the CUDA linear kernel's work split (palettized_cuda.cu; checked on the CPU by
// tests/cpp/palettized_test.cpp) --------------------------------------------------------------
// A thread block of kCudaWarps warps takes rows_per_warp(MT) output rows per warp and MT rows of
// x; it walks the columns in chunks of kCudaChunk (one 32-index block per lane), staging the
// chunk of x as fp32 in shared memory with kCudaXStride floats per lane (32 + 4 padding: a
// lane's float4 reads of its block hit distinct banks within each quarter warp).
constexpr int kCudaWarps = 4;
constexpr int kCudaChunk = 32 * kBlock;
constexpr int kCudaXStride = 36;
PC_HD constexpr int rows_per_warp(int mt) { return mt <= 2 ? 4 : mt == 4 ? 2 : 1; }
// shared-memory slot of column col (0 <= col < kCudaChunk) of the staged chunk
PC_HD constexpr int x_slot(int col) { return (col / kBlock) * kCudaXStride + col % kBlock; }
// first output row of warp `warp` of thread block `bx`
PC_HD int64_t warp_row0(int64_t bx, int warp, int rw) { return (bx * kCudaWarps + warp) * rw; }

// Entry e of the codebook row at `row` (fp32 or fp16), 0 when e >= k.
PC_HD float codebook_value(const void* cb, DType t, int64_t row, int k, int e) {
  if (e >= k) return 0.f;
  const int64_t i = row * k + e;
  return t == DType::f16 ? half_bits_to_float(static_cast<const uint16_t*>(cb)[i])
                         : static_cast<const float*>(cb)[i];
}


}  // namespace palettized
}  // namespace popcomp
