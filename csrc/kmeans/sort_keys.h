// How the CUDA K-means (kmeans_cuda.cu, phase A) sorts several rows at once by (row, key) with
// CUB's radix sort and no host synchronization: 16/32-bit keys as one composite 64-bit key
// (row above the key bits), float64 keys in two stable passes (by key, then by row). Host and
// device alike: tests/cpp/cuda_logic_test.cpp checks the orders on the CPU.
#pragma once
#include <cstdint>

#include "common/hd.h"

namespace popcomp {
namespace kmeans {

enum class SortMode : int { single = 0, composite = 1, twopass = 2 };

// Bits needed to represent 0..v.
PC_HD int bits_for(uint64_t v) {
  int b = 0;
  while (b < 64 && (v >> b) != 0) ++b;
  return b;
}

// One row: the keys alone; several rows: composite keys when key and row bits fit 64 (always
// for 16/32-bit keys: rows < 2^31), else two passes (float64 keys).
PC_HD SortMode sort_mode(int64_t rows, int keybits) {
  if (rows == 1) return SortMode::single;
  return keybits + bits_for((uint64_t)(rows - 1)) <= 64 ? SortMode::composite : SortMode::twopass;
}

// The composite key of element key `key` (keybits wide) of row `row`, and its end bit.
PC_HD uint64_t composite_key(uint64_t key, int64_t row, int keybits) {
  return key | ((uint64_t)row << keybits);
}
PC_HD int composite_bits(int64_t rows, int keybits) {
  return keybits + bits_for((uint64_t)(rows - 1));
}
// The key of a composite key.
PC_HD uint64_t key_of(uint64_t ckey, int keybits) {
  return keybits < 64 ? ckey & (((uint64_t)1 << keybits) - 1) : ckey;
}

}  // namespace kmeans
}  // namespace popcomp
