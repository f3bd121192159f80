// The fixed-order sums of the CUDA K-means (kmeans_cuda.cu): the weights of the runs of equal
// values and the prefix sums s0, s1, s2 of each problem, added in an order fixed by the data
// alone (chunks of kSumChunk terms, each added in sequence by one thread, then the chunk
// results in chunk order), so that repeated runs are bit-identical, and a sum of at most
// kSumChunk terms is added exactly as the CPU backend adds it (in sequence from 0.0). Host and
// device alike: tests/cpp/cuda_logic_test.cpp runs these bodies on the CPU.
#pragma once
#include <cstdint>

#include "common/hd.h"

namespace popcomp {
namespace kmeans {

// Terms one thread adds in sequence. Problems (and runs) of at most this many distinct values
// (elements) are summed bit for bit as the CPU does (kmeans_cpu.cpp: a sequential loop).
constexpr int64_t kSumChunk = 4096;

PC_HD int64_t sum_chunks(int64_t len) { return (len + kSumChunk - 1) / kSumChunk; }

// ---- run weights: run g holds the sorted elements [start_g, end_g); its pieces are the
// chunks [start_g + j C, min(end_g, start_g + (j+1) C)), numbered over all runs in run order
// (pend = inclusive scan of the per-run piece counts sum_chunks(end_g - start_g)).

// The run of piece p: the first g in [0, R) with pend[g] > p.
PC_HD int64_t piece_run(const int64_t* pend, int64_t R, int64_t p) {
  int64_t lo = 0, n = R;
  while (n > 0) {
    const int64_t h = n >> 1;
    if (pend[lo + h] > p) {
      n = h;
    } else {
      lo += h + 1;
      n -= h + 1;
    }
  }
  return lo;
}

// The sum of piece p of run g (whose pieces are numbered from pfirst on): 0.0 + w[a] + ...
PC_HD double piece_sum(const double* w, int64_t start, int64_t end, int64_t pfirst, int64_t p) {
  const int64_t a = start + (p - pfirst) * kSumChunk;
  const int64_t b = a + kSumChunk < end ? a + kSumChunk : end;
  double s = 0.0;
  for (int64_t i = a; i < b; ++i) s += w[i];
  return s;
}

// The weight of a run of cnt >= 1 pieces psum[pfirst ..): the piece sums in piece order.
PC_HD double run_total(const double* psum, int64_t pfirst, int64_t cnt) {
  double s = psum[pfirst];
  for (int64_t j = 1; j < cnt; ++j) s += psum[pfirst + j];
  return s;
}

// ---- prefix sums of a problem with u shifted distinct values vs[b ..), weights W[b ..):
// chunk c holds the values [c C, min(u, (c+1) C)); the terms are W, W v and W v v, as the CPU
// forms them.
struct Sum3 {
  double a, b, c;
};

// The chunk's own totals (from 0.0).
PC_HD Sum3 chunk_total(const double* vs, const double* W, int64_t b, int64_t u, int64_t c) {
  const int64_t t0 = c * kSumChunk, t1 = t0 + kSumChunk < u ? t0 + kSumChunk : u;
  double a0 = 0.0, a1 = 0.0, a2 = 0.0;
  for (int64_t t = t0; t < t1; ++t) {
    const double v = vs[b + t], w = W[b + t];
    a0 = a0 + w;
    a1 = a1 + w * v;
    a2 = a2 + w * v * v;
  }
  return Sum3{a0, a1, a2};
}

// In place: the totals of the nc chunks of a problem -> the sums of the chunks before each,
// added in chunk order (loaded 8 at a time: one thread walks the chunks of a long row).
PC_HD void chunk_offsets(Sum3* tot, int64_t nc) {
  double a0 = 0.0, a1 = 0.0, a2 = 0.0;
  for (int64_t c0 = 0; c0 < nc; c0 += 8) {
    Sum3 t[8];
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int q = 0; q < 8; ++q)
      if (c0 + q < nc) t[q] = tot[c0 + q];
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int q = 0; q < 8; ++q)
      if (c0 + q < nc) {
        tot[c0 + q] = Sum3{a0, a1, a2};
        a0 = a0 + t[q].a;
        a1 = a1 + t[q].b;
        a2 = a2 + t[q].c;
      }
  }
}

// The prefix sums of chunk c from its offset: s*[t + 1] for its values t (s* = S* + b + r, the
// problem's prefix sums; s*[0] = 0 is written by the thread of chunk 0).
PC_HD void chunk_scan(const double* vs, const double* W, int64_t b, int64_t u, int64_t c,
                      Sum3 off, double* s0, double* s1, double* s2) {
  const int64_t t0 = c * kSumChunk, t1 = t0 + kSumChunk < u ? t0 + kSumChunk : u;
  double a0 = off.a, a1 = off.b, a2 = off.c;
  if (c == 0) s0[0] = s1[0] = s2[0] = 0.0;
  for (int64_t t = t0; t < t1; ++t) {
    const double v = vs[b + t], w = W[b + t];
    s0[t + 1] = a0 = a0 + w;
    s1[t + 1] = a1 = a1 + w * v;
    s2[t + 1] = a2 = a2 + w * v * v;
  }
}

}  // namespace kmeans
}  // namespace popcomp
