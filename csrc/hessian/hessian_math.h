// Small helpers shared by the CPU loop and the CUDA kernel of the fused squared-gradient op.
#pragma once
#include <cstdint>

#include "common/hd.h"

namespace popcomp {
namespace hessian {

PC_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Output tiles of the CUDA kernel: the out x in accumulator in tile x tile blocks, numbered
// with the input tile fastest (neighbouring blocks share their rows of g). The numbers run
// over gridDim.x (up to 2^31 - 1 blocks), each block looping t = blockIdx.x, += gridDim.x, so
// any number of tiles is covered; 65535 (the gridDim.y limit) no longer bounds either side.
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1

PC_HD int64_t output_tiles(int64_t out, int64_t in, int64_t tile) {
  return ceil_div(out, tile) * ceil_div(in, tile);
}

// Blocks on gridDim.x for `tiles` tiles (at most max_blocks; the kernel loops over the rest).
PC_HD int64_t output_tile_blocks(int64_t tiles, int64_t max_blocks = kMaxGridX) {
  return tiles < max_blocks ? tiles : max_blocks;
}

// Tile t: rows [o0, o0 + no) and columns [i0, i0 + ni) of the accumulator.
struct OutputTile {
  int64_t o0, i0;
  int no, ni;
};

PC_HD OutputTile output_tile(int64_t t, int64_t out, int64_t in, int64_t tile) {
  const int64_t tiles_i = ceil_div(in, tile);
  OutputTile r;
  r.o0 = (t / tiles_i) * tile;
  r.i0 = (t % tiles_i) * tile;
  r.no = (int)(out - r.o0 < tile ? out - r.o0 : tile);
  r.ni = (int)(in - r.i0 < tile ? in - r.i0 : tile);
  return r;
}

}  // namespace hessian
}  // namespace popcomp
