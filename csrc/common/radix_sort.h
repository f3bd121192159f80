// Stable LSD radix sort of (key, payload) items on the host, split across a team of threads.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/parallel.h"

namespace popcomp {

// A key travels with its 32-bit payload (kmeans_cpu.cpp: the value's index or its weight's
// float bits) in one item: a 32-bit key packed above the payload in a uint64_t, a 64-bit key
// (float64 inputs) beside it in a KeyPay64. One store per item and 256 buckets a pass keep the
// scatter within the TLB and write-combining reach (2x faster here than 11-bit digits over
// separate key and payload arrays).
struct KeyPay64 {
  uint64_t key;
  uint32_t pay;
};
inline uint64_t sort_key(uint64_t item) { return item >> 32; }
inline uint32_t sort_pay(uint64_t item) { return (uint32_t)item; }
inline uint64_t sort_key(const KeyPay64& item) { return item.key; }
inline uint32_t sort_pay(const KeyPay64& item) { return item.pay; }

// Scatter offsets of thread t of a team for one pass of a parallel LSD sort, from the
// team's digit counts hist[q nb + b]: digit-major, then thread order (the sort stays
// stable). Every thread derives the same totals; returns true when one digit holds all n
// items, a pass every thread then skips.
inline bool team_offsets(const uint32_t* hist, size_t nb, int team, int t, int64_t n,
                         uint32_t* off) {
  bool trivial = false;
  uint32_t base = 0;
  for (size_t b = 0; b < nb; ++b) {
    uint32_t tot = 0, before = 0;
    for (int q = 0; q < team; ++q) {
      const uint32_t c = hist[(size_t)q * nb + b];
      tot += c;
      if (q < t) before += c;
    }
    if (tot == (uint32_t)n) trivial = true;
    off[b] = base + before;
    base += tot;
  }
  return trivial;
}

// Stable sort of the first n items by their keys of key_bits bits: insertion sort below 64
// items, else LSD with 8-bit digits split across a team of threads (per pass each thread
// counts the digits of its part, takes its offsets from team_offsets and scatters its part).
template <typename Item>
void radix_sort_items(std::vector<Item>& a, std::vector<Item>& tmp, int64_t n, int key_bits,
                      int threads) {
  Item* const src0 = a.data();
  if (n < 64) {
    for (int64_t i = 1; i < n; ++i) {
      const Item v = src0[i];
      int64_t j = i - 1;
      for (; j >= 0 && sort_key(src0[j]) > sort_key(v); --j) src0[j + 1] = src0[j];
      src0[j + 1] = v;
    }
    return;
  }
  constexpr int digit = 8;
  constexpr size_t nb = size_t(1) << digit;
  const int passes = (key_bits + digit - 1) / digit;
  tmp.resize(n);
#if defined(POPCOMP_OPENMP)
  const int T = threads > 1 && n >= (int64_t(1) << 16) ? threads : 1;
#else
  const int T = 1;
  (void)threads;
#endif
  std::vector<uint32_t> hist((size_t)T * nb);
  Item* const dst0 = tmp.data();
  bool swapped = false;
#if defined(POPCOMP_OPENMP)
#pragma omp parallel num_threads(T) if (T > 1)
#endif
  {
    const int team = team_size(), t = thread_id();
    const int64_t lo = n * t / team, hi = n * (t + 1) / team;
    uint32_t off[nb];
    Item* src = src0;
    Item* dst = dst0;
    for (int p = 0; p < passes; ++p) {
      const int sh = p * digit;
      uint32_t* h = &hist[(size_t)t * nb];
      std::fill(h, h + nb, 0u);
      for (int64_t i = lo; i < hi; ++i) ++h[(sort_key(src[i]) >> sh) & (nb - 1)];
#if defined(POPCOMP_OPENMP)
#pragma omp barrier
#endif
      if (!team_offsets(hist.data(), nb, team, t, n, off)) {
        for (int64_t i = lo; i < hi; ++i) {
          const Item v = src[i];
          dst[off[(sort_key(v) >> sh) & (nb - 1)]++] = v;
        }
        std::swap(src, dst);
      }
#if defined(POPCOMP_OPENMP)
#pragma omp barrier  // the scatter is done before anyone counts the next pass
#endif
    }
    if (t == 0) swapped = src != src0;
  }
  if (swapped) std::memcpy(src0, dst0, (size_t)n * sizeof(Item));
}

}  // namespace popcomp
