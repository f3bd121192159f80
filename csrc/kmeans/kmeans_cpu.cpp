// CPU backend of weighted 1-D K-means (HW / DRHW K-means).
//
// Per problem: radix sort (or, for large 16-bit inputs, a 65536-bin weighted histogram) to the
// u sorted distinct values with summed weights, prefix sums, then
//   exact : optimal k-partition by dynamic programming, each layer's row minima found by
//           divide and conquer on the monotone argmin (O(k u log u) evaluations, O(n + k u)
//           memory), split across threads at pivot rows; large problems solve only a band
//           of rows per layer, from what a coarse DP says the answer needs (demand mode:
//           about a fifth of the rows at k = 16, every skipped row or column certified);
//   lloyd : O(k log u) Lloyd iterations on the prefix sums (kmeans_math.h, shared with CUDA);
// then one pass over the original values for labels and the cost.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <vector>
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

#include "common/parallel.h"
#include "kmeans/kmeans.h"
#include "kmeans/kmeans_math.h"

namespace popcomp {
namespace kmeans {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kHistMin = 32768;  // 16-bit inputs at least this long use the histogram
constexpr int64_t kScatterMax = int64_t(1) << 18;  // up to this n, labels by the sort permutation

// ---- element access --------------------------------------------------------------------
// 16-bit pattern with -0 folded into +0 (equal values share one key).
inline uint16_t fold_zero(const void* p, int64_t i) {
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return h == 0x8000u ? (uint16_t)0 : h;
}
template <DType D>
struct Elem;
template <>
struct Elem<DType::f64> {
  using Key = uint64_t;
  static constexpr int key_bits = 64;
  static double get(const void* p, int64_t i) { return static_cast<const double*>(p)[i]; }
  static bool finite(const void* p, int64_t i) { return std::isfinite(get(p, i)); }
  static bool negative(const void* p, int64_t i) { return get(p, i) < 0.0; }
  static Key key(const void* p, int64_t i) { return double_key(get(p, i) + 0.0); }  // -0 -> +0
  static double value(Key k) {
    uint64_t b = (k & 0x8000000000000000ull) ? (k & 0x7fffffffffffffffull) : ~k;
    double d;
    std::memcpy(&d, &b, 8);
    return d;
  }
};
template <>
struct Elem<DType::f32> {
  using Key = uint32_t;
  static constexpr int key_bits = 32;
  static double get(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
  static bool finite(const void* p, int64_t i) { return std::isfinite(static_cast<const float*>(p)[i]); }
  static bool negative(const void* p, int64_t i) { return static_cast<const float*>(p)[i] < 0.0f; }
  static Key key(const void* p, int64_t i) {
    return float_key(static_cast<const float*>(p)[i] + 0.0f);  // -0 -> +0
  }
  static double value(Key k) { return key_to_float(k); }
};
// 16-bit checks read the bits: an all-ones exponent is Inf/NaN; a set sign bit on a nonzero
// magnitude is negative (-0 is not).
template <uint16_t ExpMask>
struct Bits16 {
  static bool finite(const void* p, int64_t i) {
    return (static_cast<const uint16_t*>(p)[i] & ExpMask) != ExpMask;
  }
  static bool negative(const void* p, int64_t i) {
    const uint16_t h = static_cast<const uint16_t*>(p)[i];
    return (h & 0x8000u) && (h & 0x7fffu);
  }
};
template <>
struct Elem<DType::f16> : Bits16<0x7c00u> {
  using Key = uint32_t;
  static constexpr int key_bits = 16;
  static double get(const void* p, int64_t i) {
    return half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  }
  static Key key(const void* p, int64_t i) { return half_key(fold_zero(p, i)); }
  static double value(Key k) { return half_bits_to_float(half_key_to_bits(k)); }
};
template <>
struct Elem<DType::bf16> : Bits16<0x7f80u> {
  using Key = uint32_t;
  static constexpr int key_bits = 16;
  static double get(const void* p, int64_t i) {
    return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  }
  static Key key(const void* p, int64_t i) { return half_key(fold_zero(p, i)); }
  static double value(Key k) { return bf16_bits_to_float(half_key_to_bits(k)); }
};

template <typename F>
void dispatch(DType t, F&& f) {
  switch (t) {
    case DType::f64: f(std::integral_constant<DType, DType::f64>{}); break;
    case DType::f32: f(std::integral_constant<DType, DType::f32>{}); break;
    case DType::f16: f(std::integral_constant<DType, DType::f16>{}); break;
    case DType::bf16: f(std::integral_constant<DType, DType::bf16>{}); break;
    default: throw std::invalid_argument("kmeans1d: unsupported dtype code");
  }
}

// ---- LSD radix sort of (key, payload) items ---------------------------------------------
// A key travels with its 32-bit payload (the value's index, or its weight's float bits) in
// one item: a 32-bit key packed above the payload in a uint64_t, a 64-bit key (float64
// inputs) beside it in a KeyPay64. One store per item and 256 buckets a pass keep the scatter
// within the TLB and write-combining reach (2x faster here than 11-bit digits over separate
// key and payload arrays).
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

// ---- per-thread workspace ------------------------------------------------------------------
// An array whose elements are left uninitialized when it grows (std::vector zeroes them):
// for the DP's k x u argmin table, of which each call writes and reads only the bands it
// solves, zeroing would touch every page of it (1 GB at k = 256, u = 1e6) on every call that
// grows it.
template <typename T>
struct RawArray {
  std::unique_ptr<T[]> p;
  size_t n = 0, cap = 0;
  void resize(size_t m) {
    if (m > cap) {
      p.reset(new T[m]);  // default-initialized: no stores
      cap = m;
    }
    n = m;
  }
  T* data() { return p.get(); }
  const T* data() const { return p.get(); }
  size_t size() const { return n; }
  size_t capacity() const { return cap; }
  T& operator[](size_t i) { return p[i]; }
  const T& operator[](size_t i) const { return p[i]; }
};

struct Work {
  std::vector<uint64_t> k64, t64;       // sort items of 32-bit keys
  std::vector<KeyPay64> kp64, tkp64;    // sort items of 64-bit keys
  std::vector<uint32_t> idx;            // the sort permutation (small problems)
  std::vector<uint32_t> hcnt;
  std::vector<double> hw;
  std::vector<double> v, vo, W, s0, s1, s2;
  std::vector<double> D1, d, blocks;
  RawArray<int32_t> J;                  // the DP's argmins, k x u
  std::vector<int64_t> Bk, Bk2;
  std::vector<double> dk[6];
  std::vector<int> act;
  std::vector<double> c, mids;
  std::vector<int32_t> lut, ulab;
  std::vector<uint32_t> run;
  std::vector<double> gw;               // weights in sorted order (those not carried)
  std::vector<double> Dl;               // a coarse problem's D values (demand_hint)
  std::vector<int64_t> top;             // and its highest rows known exact
  std::unique_ptr<Work> coarse;         // the coarse problem of demand_hint, kept for reuse

  // Bytes held (to bound what a thread keeps between calls).
  size_t bytes() const {
    size_t b = 0;
    auto add = [&b](const auto& v) { b += v.capacity() * sizeof(v[0]); };
    add(k64); add(t64); add(kp64); add(tkp64); add(idx); add(hcnt); add(hw);
    add(v); add(vo); add(W); add(s0); add(s1); add(s2); add(D1); add(d); add(blocks); add(J); add(ulab);
    add(run); add(lut); add(gw); add(Dl); add(top);
    return b + (coarse ? coarse->bytes() : 0);
  }

  Scratch scratch(int k) {
    Bk.resize(k + 1);
    Bk2.resize(k + 1);
    for (auto& d : dk) d.resize(k + 1);
    act.resize(k + 1);
    return Scratch{Bk.data(), Bk2.data(), dk[0].data(), dk[1].data(), dk[2].data(),
                   dk[3].data(), dk[4].data(), act.data()};
  }
};

// ---- exact DP ------------------------------------------------------------------------------
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

// Row i's columns [clo, chi] clamped as every layer solver clamps them: at most i, at least
// J_{m-1}(i) (but never above chi).
inline __attribute__((always_inline)) void clamp(const DnC& L, int64_t i, int64_t& clo,
                                                 int64_t& chi) {
  if (chi > i) chi = i;
  if (L.Jlow && L.Jlow[i] > clo) clo = L.Jlow[i] <= chi ? L.Jlow[i] : chi;
}

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define PC_X86_DISPATCH 1
#endif

namespace dp_portable {
#if defined(PC_X86_DISPATCH)
#define PC_LAYER_TARGET __attribute__((target_clones("avx2", "default")))
#else
#define PC_LAYER_TARGET
#endif
constexpr int kBlock = 256;
// Values of a block of columns first (a loop the compiler vectorizes), then their minimum
// with independent chains, then the first column attaining it.
inline __attribute__((always_inline)) void scan(const DnC& L, int64_t i, int64_t lo0, int64_t hi,
                                                double& best, int64_t& bj) {
  const double* __restrict s0 = L.s0;
  const double* __restrict s1 = L.s1;
  const double* __restrict s2 = L.s2;
  const double* __restrict d = L.d;
  const double a0 = s0[i + 1], a1 = s1[i + 1], a2 = s2[i + 1];
  alignas(64) double vals[kBlock];
  for (int64_t lo = lo0; lo <= hi; lo += kBlock) {
    const int n = (int)std::min<int64_t>(kBlock, hi - lo + 1);
    for (int t = 0; t < n; ++t)
      vals[t] = d[lo + t] + seg_cost_dp(a0 - s0[lo + t], a1 - s1[lo + t], a2 - s2[lo + t]);
    double m4[4] = {kInf, kInf, kInf, kInf};
    int t = 0;
    for (; t + 4 <= n; t += 4)
      for (int l = 0; l < 4; ++l) m4[l] = vals[t + l] < m4[l] ? vals[t + l] : m4[l];
    for (; t < n; ++t) m4[0] = vals[t] < m4[0] ? vals[t] : m4[0];
    const double mn = std::min(std::min(m4[0], m4[1]), std::min(m4[2], m4[3]));
    if (mn < best || (mn == best && lo < bj)) {
      int f = 0;
      while (vals[f] != mn) ++f;
      if (mn < best || lo + f < bj) bj = lo + f;
      best = mn;
    }
  }
}
constexpr bool kPairRows = false;
inline void pair4(const DnC&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) {}
// Rows [r1, r2] (at most 8 NV) whose argmins all lie in columns [c0, c1]: one pass over
// those columns with the rows in lanes (a loop the compiler vectorizes), each lane keeping
// the first least value over its row's clamped range. The same values, compared in the same
// column order, as scan() over each row's range.
template <int NV>
inline __attribute__((always_inline)) void group(const DnC& L, int64_t r1, int64_t r2,
                                                 int64_t c0, int64_t c1) {
  constexpr int G = 8 * NV;
  const int n = (int)(r2 - r1 + 1);
  alignas(64) double a0[G], a1[G], a2[G], best[G];
  alignas(64) int64_t lo[G], hi[G], bj[G];
  for (int t = 0; t < G; ++t) {
    const int64_t i = r1 + (t < n ? t : n - 1);
    a0[t] = L.s0[i + 1];
    a1[t] = L.s1[i + 1];
    a2[t] = L.s2[i + 1];
    int64_t clo = c0, chi = c1;
    clamp(L, i, clo, chi);
    lo[t] = clo;
    hi[t] = chi;
    best[t] = kInf;
    bj[t] = clo;
  }
  for (int64_t c = c0; c <= c1; ++c) {
    const double e0 = L.s0[c], e1 = L.s1[c], e2 = L.s2[c], dc = L.d[c];
    for (int t = 0; t < G; ++t) {
      const double v = dc + seg_cost_dp(a0[t] - e0, a1[t] - e1, a2[t] - e2);
      const bool lt = c >= lo[t] && c <= hi[t] && v < best[t];
      best[t] = lt ? v : best[t];
      bj[t] = lt ? c : bj[t];
    }
  }
  for (int t = 0; t < n; ++t) {
    L.dnext[r1 + t + 1] = best[t];
    L.J[r1 + t] = (int32_t)bj[t];
  }
}
#include "kmeans/dp_layer.inc"
#undef PC_LAYER_TARGET
}  // namespace dp_portable

#if defined(PC_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl")
namespace dp_avx512 {
#define PC_LAYER_TARGET
// Segment costs of eight (w, s, q) at once, as seg_cost_dp: zero weight gives zero, rounding
// below zero is clamped.
inline __attribute__((always_inline)) __m512d seg_cost8(__m512d w, __m512d s, __m512d q) {
  const __m512d zero = _mm512_setzero_pd();
  w = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(w, zero, _CMP_GT_OQ), _mm512_set1_pd(1.0), w);
  return _mm512_max_pd(_mm512_sub_pd(q, _mm512_div_pd(_mm512_mul_pd(s, s), w)), zero);
}
// Eight columns a step in registers: running minimum and its column per lane (strict <
// keeps the first), a masked final step, then the least column among the lanes at the
// minimum. No stores and no second pass; rows of at most 4 columns take one 4-wide step.
inline __attribute__((always_inline)) void scan(const DnC& L, int64_t i, int64_t lo, int64_t hi,
                                                double& best_out, int64_t& bj_out) {
  if (hi < lo) return;
  if (hi - lo < 4) {  // most rows: one 4-wide step (half the divider time of an 8-wide one)
    const __mmask8 m = (__mmask8)((1u << (hi - lo + 1)) - 1);
    const __m256d zero4 = _mm256_setzero_pd(), one4 = _mm256_set1_pd(1.0),
                  inf4 = _mm256_set1_pd(kInf);
    __m256d w = _mm256_sub_pd(_mm256_set1_pd(L.s0[i + 1]), _mm256_mask_loadu_pd(one4, m, L.s0 + lo));
    const __m256d s = _mm256_sub_pd(_mm256_set1_pd(L.s1[i + 1]), _mm256_maskz_loadu_pd(m, L.s1 + lo));
    const __m256d q = _mm256_sub_pd(_mm256_set1_pd(L.s2[i + 1]), _mm256_maskz_loadu_pd(m, L.s2 + lo));
    w = _mm256_mask_blend_pd(_mm256_cmp_pd_mask(w, zero4, _CMP_GT_OQ), one4, w);
    const __m256d c = _mm256_max_pd(_mm256_sub_pd(q, _mm256_div_pd(_mm256_mul_pd(s, s), w)), zero4);
    const __m256d v = _mm256_mask_blend_pd(
        m, inf4, _mm256_add_pd(_mm256_mask_loadu_pd(inf4, m, L.d + lo), c));
    alignas(32) double vv[4];
    _mm256_store_pd(vv, v);
    int f = 0;
    for (int t = 1; t < 4; ++t) f = vv[t] < vv[f] ? t : f;
    if (vv[f] < best_out || (vv[f] == best_out && lo + f < bj_out)) {
      best_out = vv[f];
      bj_out = lo + f;
    }
    return;
  }
  const __m512d a0 = _mm512_set1_pd(L.s0[i + 1]), a1 = _mm512_set1_pd(L.s1[i + 1]),
                a2 = _mm512_set1_pd(L.s2[i + 1]);
  const __m512d one = _mm512_set1_pd(1.0), inf = _mm512_set1_pd(kInf);
  __m512d best = inf;
  __m512i bidx = _mm512_setzero_si512();
  __m512i idx = _mm512_add_epi64(_mm512_set1_epi64(lo), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  auto step = [&](__mmask8 m, int64_t j) {
    const __m512d c = seg_cost8(_mm512_sub_pd(a0, _mm512_mask_loadu_pd(one, m, L.s0 + j)),
                                _mm512_sub_pd(a1, _mm512_maskz_loadu_pd(m, L.s1 + j)),
                                _mm512_sub_pd(a2, _mm512_maskz_loadu_pd(m, L.s2 + j)));
    const __m512d v = _mm512_add_pd(_mm512_mask_loadu_pd(inf, m, L.d + j), c);
    const __mmask8 lt = _mm512_mask_cmp_pd_mask(m, v, best, _CMP_LT_OQ);
    best = _mm512_mask_blend_pd(lt, best, v);
    bidx = _mm512_mask_blend_epi64(lt, bidx, idx);
    idx = _mm512_add_epi64(idx, _mm512_set1_epi64(8));
  };
  int64_t j = lo;
  for (; j + 8 <= hi + 1; j += 8) step((__mmask8)0xff, j);
  if (j <= hi) step((__mmask8)((1u << (hi - j + 1)) - 1), j);
  const double mn = _mm512_reduce_min_pd(best);
  const __mmask8 at = _mm512_cmp_pd_mask(best, _mm512_set1_pd(mn), _CMP_EQ_OQ);
  const int64_t col = _mm512_mask_reduce_min_epi64(at, bidx);
  if (mn < best_out || (mn == best_out && col < bj_out)) {
    best_out = mn;
    bj_out = col;
  }
}
// Two rows of at most four columns each in one 8-wide step: row i1 in lanes 0-3 over
// [lo1, hi1], row i2 in lanes 4-7 over [lo2, hi2]; each half's least value and its first lane
// give D_m and the leftmost argmin, bit for bit what the 4-wide step of scan() gives.
constexpr bool kPairRows = true;
inline __attribute__((always_inline)) __m512d two(__m256d lo, __m256d hi) {
  return _mm512_insertf64x4(_mm512_castpd256_pd512(lo), hi, 1);
}
inline __attribute__((always_inline)) void pair4(const DnC& L, int64_t i1, int64_t lo1,
                                                 int64_t hi1, int64_t i2, int64_t lo2,
                                                 int64_t hi2) {
  const __mmask8 m1 = (__mmask8)((1u << (hi1 - lo1 + 1)) - 1);
  const __mmask8 m2 = (__mmask8)((1u << (hi2 - lo2 + 1)) - 1);
  const __mmask8 m = (__mmask8)(m1 | (m2 << 4));
  const __m256d one4 = _mm256_set1_pd(1.0), inf4 = _mm256_set1_pd(kInf);
  const __m512d a0 = two(_mm256_set1_pd(L.s0[i1 + 1]), _mm256_set1_pd(L.s0[i2 + 1]));
  const __m512d a1 = two(_mm256_set1_pd(L.s1[i1 + 1]), _mm256_set1_pd(L.s1[i2 + 1]));
  const __m512d a2 = two(_mm256_set1_pd(L.s2[i1 + 1]), _mm256_set1_pd(L.s2[i2 + 1]));
  const __m512d inf = _mm512_set1_pd(kInf);
  const __m512d c = seg_cost8(_mm512_sub_pd(a0, two(_mm256_mask_loadu_pd(one4, m1, L.s0 + lo1),
                                                   _mm256_mask_loadu_pd(one4, m2, L.s0 + lo2))),
                              _mm512_sub_pd(a1, two(_mm256_maskz_loadu_pd(m1, L.s1 + lo1),
                                                   _mm256_maskz_loadu_pd(m2, L.s1 + lo2))),
                              _mm512_sub_pd(a2, two(_mm256_maskz_loadu_pd(m1, L.s2 + lo1),
                                                   _mm256_maskz_loadu_pd(m2, L.s2 + lo2))));
  const __m512d dv = two(_mm256_mask_loadu_pd(inf4, m1, L.d + lo1), _mm256_mask_loadu_pd(inf4, m2, L.d + lo2));
  const __m512d v = _mm512_mask_blend_pd(m, inf, _mm512_add_pd(dv, c));
  // least value of each half in all its lanes, then the first lane holding it
  __m512d t = _mm512_min_pd(v, _mm512_permutex_pd(v, 0x4e));
  t = _mm512_min_pd(t, _mm512_permute_pd(t, 0x55));
  const unsigned eq = (unsigned)_mm512_cmp_pd_mask(v, t, _CMP_EQ_OQ);
  L.dnext[i1 + 1] = _mm512_cvtsd_f64(t);
  L.dnext[i2 + 1] = _mm256_cvtsd_f64(_mm512_extractf64x4_pd(t, 1));
  L.J[i1] = (int32_t)(lo1 + (__builtin_ctz((eq & 0xfu) | 0x10u) & 3));
  L.J[i2] = (int32_t)(lo2 + (__builtin_ctz((eq >> 4) | 0x10u) & 3));
}
// Rows [r1, r2] (at most 8 NV) whose argmins all lie in columns [c0, c1]: the rows in the
// lanes of NV vectors, one step per column (its data broadcast), each lane keeping the first
// least value over its row's clamped range (strict <, columns ascending): the values and
// order of scan() over each row's range. About one evaluation per row and column of the
// shared range, with no per-row reduction or branch.
template <int NV>
inline __attribute__((always_inline)) void group(const DnC& L, int64_t r1, int64_t r2,
                                                 int64_t c0, int64_t c1) {
  __mmask8 rm[NV];
  __m512d a0[NV], a1[NV], a2[NV], best[NV];
  __m512i lo[NV], hi[NV], bj[NV];
  for (int h = 0; h < NV; ++h) {
    const int64_t f = r1 + 8 * h;  // first row of these lanes
    const int64_t nr = r2 - f + 1;
    rm[h] = (__mmask8)(nr >= 8 ? 0xffu : nr > 0 ? (1u << nr) - 1 : 0u);
    a0[h] = _mm512_maskz_loadu_pd(rm[h], L.s0 + f + 1);
    a1[h] = _mm512_maskz_loadu_pd(rm[h], L.s1 + f + 1);
    a2[h] = _mm512_maskz_loadu_pd(rm[h], L.s2 + f + 1);
    const __m512i rows =
        _mm512_add_epi64(_mm512_set1_epi64(f), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
    // each row's columns clamped as clamp() does: [min(max(c0, J_{m-1}(i)), hi), hi],
    // hi = min(c1, i)
    hi[h] = _mm512_min_epi64(_mm512_set1_epi64(c1), rows);
    lo[h] = _mm512_set1_epi64(c0);
    if (L.Jlow)
      lo[h] = _mm512_max_epi64(
          lo[h], _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(rm[h], L.Jlow + f)));
    lo[h] = _mm512_min_epi64(lo[h], hi[h]);
    best[h] = _mm512_set1_pd(kInf);
    bj[h] = lo[h];
  }
  for (int64_t c = c0; c <= c1; ++c) {
    const __m512i cv = _mm512_set1_epi64(c);
    const __m512d e0 = _mm512_set1_pd(L.s0[c]), e1 = _mm512_set1_pd(L.s1[c]),
                  e2 = _mm512_set1_pd(L.s2[c]), dc = _mm512_set1_pd(L.d[c]);
    for (int h = 0; h < NV; ++h) {
      const __m512d v = _mm512_add_pd(
          dc, seg_cost8(_mm512_sub_pd(a0[h], e0), _mm512_sub_pd(a1[h], e1),
                        _mm512_sub_pd(a2[h], e2)));
      const __mmask8 in = _mm512_cmp_epi64_mask(lo[h], cv, _MM_CMPINT_LE) &
                          _mm512_cmp_epi64_mask(hi[h], cv, _MM_CMPINT_NLT);
      const __mmask8 lt = _mm512_mask_cmp_pd_mask(in, v, best[h], _CMP_LT_OQ);
      best[h] = _mm512_mask_blend_pd(lt, best[h], v);
      bj[h] = _mm512_mask_blend_epi64(lt, bj[h], cv);
    }
  }
  for (int h = 0; h < NV; ++h) {
    _mm512_mask_storeu_pd(L.dnext + r1 + 8 * h + 1, rm[h], best[h]);
    _mm256_mask_storeu_epi32(L.J + r1 + 8 * h, rm[h], _mm512_cvtepi64_epi32(bj[h]));
  }
}
#include "kmeans/dp_layer.inc"
#undef PC_LAYER_TARGET
}  // namespace dp_avx512
#pragma GCC pop_options
#endif

using LayerFn = void (*)(const DnC&, int64_t, int64_t, int64_t, int64_t);
LayerFn layer_solver() {
#if defined(PC_X86_DISPATCH)
  static const LayerFn f = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
                                  ? &dp_avx512::solve
                                  : &dp_portable::solve;
  return f;
#else
  return &dp_portable::solve;
#endif
}

// Smallest row x in [lo, hi] with J[x] >= target (J non-decreasing there), or hi + 1.
int64_t first_at_least(const int32_t* J, int64_t lo, int64_t hi, int64_t target) {
  return std::lower_bound(J + lo, J + hi + 1, target,
                          [](int32_t j, int64_t t) { return (int64_t)j < t; }) - J;
}

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
               const int64_t* X = nullptr, LayerValues* out = nullptr, int* why = nullptr) {
  auto refuse = [why](int r) {
    if (why) *why = r;
    return false;
  };
  const double* s0 = w.s0.data();
  const double* s1 = w.s1.data();
  const double* s2 = w.s2.data();
  const LayerFn solve = layer_solver();
  w.d.resize(u + 1);
  w.D1.resize(u + 1);
  w.J.resize((size_t)k * u);
  double* d = w.d.data();
  double* dnext = w.D1.data();
#if !defined(POPCOMP_OPENMP)
  threads = 1;  // the row split below needs a team of threads
#endif
  const int T = threads > 1 && u - k > 16384 ? threads : 1;
  d[0] = kInf;
#if defined(POPCOMP_OPENMP)
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
#endif
  for (int64_t i = 0; i < u; ++i) d[i + 1] = seg_cost_dp(s0[i + 1], s1[i + 1], s2[i + 1]);
  const int64_t nb = u / kPB;
  w.blocks.resize(4 * (size_t)nb + (size_t)T * (nb + 1));
  double* bd = w.blocks.data();
  double* b0 = bd + nb;
  double* b1 = b0 + nb;
  double* b2 = b1 + nb;
  for (int64_t b = 0; b < nb; ++b) {
    b0[b] = s0[b * kPB + kPB - 1];
    b1[b] = s1[b * kPB + kPB - 1];
    b2[b] = s2[b * kPB + kPB - 1];
  }
  // The prefix sums are in coordinates centred on the median; their rounding bounds that of
  // any segment cost or DP value.
  const double margin = 1e-12 * (std::fabs(s2[u]) + std::fabs(s1[u]) + 1e-300);
  int64_t Lprev = 0;    // lowest solved row of the previous layer (the base layer: all rows)
  int64_t Hprev = u - 1;  // its highest solved row
  int64_t top = u - 1;  // highest row of the previous layer known exact
  double Ttop = kInf;   // D of that row less the margin (the base layer: no cap)
  for (int m = 1; m < k; ++m) {
    const int64_t rfull = u - 1 - (k - 1 - m);  // the layer's last row
    const int64_t rhi = X && m < k - 1 ? std::min(rfull, X[m]) : rfull;
    const int32_t* Jprev = m > 1 ? w.J.data() + (size_t)(m - 1) * u : nullptr;
    int64_t rlo = m, clo = m;
    if (G) {
      if (Lprev + 1 > m) {  // columns below Lprev + 1 were skipped
        clo = Lprev + 1;
        // (the previous layer's argmins are set up to row rhi; past its last solved row
        // Hprev they are only lower bounds)
        const int64_t xhi = std::min(rfull - 1, rhi);
        if (xhi < Lprev) return refuse(3);  // the upper demand below the lower one
        rlo = first_at_least(Jprev, Lprev, xhi, clo);
        if (rlo > xhi) return refuse(Hprev < xhi ? 3 : 1);
      }
      if (m < k - 1 && G[m] > rlo) rlo = G[m];
      if (rlo > rhi) return refuse(rhi < rfull || Hprev < rfull - 1 ? 3 : 1);
    }
    const int64_t cap = std::min(top + 1, rfull);  // columns j <= cap: D_{m-1}(j-1) exact
    const int64_t chi = std::min(rhi, cap);
    for (int64_t b = clo / kPB; b < nb && b * kPB <= chi; ++b) bd[b] = d[b * kPB];
    DnC L{s0, s1, s2, d, Jprev, dnext, w.J.data() + (size_t)m * u, nb > 0 ? bd : nullptr,
          b0, b1, b2, b2 + nb, margin};
    if (m == k - 1) {  // only the last row matters
      solve(L, u - 1, u - 1, clo, chi);
      if (u - 1 > cap && !(dnext[u] <= Ttop)) return refuse(2);
      if (out) {
        out->D[(size_t)m * u + u - 1] = dnext[u];
        out->top[m] = u - 1;
      }
      break;
    }
    int P = 8;  // parts of the rows (8 per thread, a power of two), taken as threads come free
    while (P < 8 * T) P *= 2;
    if (T > 1 && rhi - rlo + 1 >= 64 * (int64_t)P) {
      // split the rows at pivots solved first; the parts between them are independent
      std::vector<int64_t> piv(P + 1);
      piv[0] = rlo - 1;
      piv[P] = rhi + 1;
      for (int q = 1; q < P; ++q) piv[q] = rlo + (rhi - rlo + 1) * q / P;
#if defined(POPCOMP_OPENMP)
#pragma omp parallel num_threads(T)
#endif
      {
        DnC Lt = L;
        Lt.lb = L.lb + (size_t)thread_id() * (nb + 1);
        // pivots coarse to fine (P is a power of two): each one's columns lie between the
        // argmins of its solved neighbours at -h and +h
        for (int h = P / 2; h >= 1; h >>= 1) {
#if defined(POPCOMP_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
          for (int q = h; q < P; q += 2 * h) {
            const int64_t c0 = q - h == 0 ? clo : L.J[piv[q - h]];
            const int64_t c1 = q + h == P ? std::min(piv[q], chi) : L.J[piv[q + h]];
            solve(Lt, piv[q], piv[q], c0, c1);
          }
        }
#if defined(POPCOMP_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int q = 0; q < P; ++q) {
          const int64_t c0 = q == 0 ? clo : L.J[piv[q]];
          const int64_t c1 = q == P - 1 ? chi : L.J[piv[q + 1]];
          solve(Lt, piv[q] + 1, piv[q + 1] - 1, c0, c1);
        }
      }
    } else {
      solve(L, rlo, rhi, clo, chi);
    }
    // the rows known exact: all up to the cap, then while D_m stays at most Ttop
    int64_t x = rhi;
    if (rhi > cap) {
      int64_t i = std::max(rlo, cap + 1);
      while (i <= rhi && dnext[i + 1] <= Ttop) ++i;
      x = i - 1;
      if (x < rlo) return refuse(2);
    }
    // The next layer reads J_m as its Knuth lower bound at rows up to its own last row, past
    // those solved here: give them J_m(rhi), a lower bound of theirs, not what an earlier
    // problem left in the reused workspace.
    const int64_t rnext = X && m + 1 < k - 1 ? std::min(rfull + 1, X[m + 1]) : rfull + 1;
    for (int64_t i = rhi + 1; i <= rnext && i < u; ++i) L.J[i] = L.J[rhi];
    if (out) {
      for (int64_t i = rlo; i <= rhi; ++i) out->D[(size_t)m * u + i] = dnext[i + 1];
      out->top[m] = x;
    }
    Hprev = rhi;
    top = x;
    Ttop = dnext[x + 1] - margin;
    // D_m becomes d of the next layer, which reads it at rows [rlo, top] only
    std::swap(d, dnext);
    Lprev = rlo;
  }
  return true;
}

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
constexpr int64_t kGroup = 32;
constexpr int64_t kMarginRows = 3 * kGroup;  // margin: this many rows or 1/16 of the cluster
constexpr double kCapSlack = 4e-3;  // relative slack of the upper demands
constexpr double kCoarseSlack = 4;   // the coarse DP's own upper demands: this many times wider
void solve_layers(Work& w, int64_t u, int k, int threads, LayerValues* out = nullptr,
                  double slack = kCapSlack);
bool demand_hint(Work& w, int64_t u, int k, int threads, int64_t* G, int64_t* X,
                 double slack = kCapSlack) {
  const int64_t E = std::min<int64_t>(4 * (int64_t)k, u / 8);
  std::vector<int64_t> start;  // first value of each coarse element
  start.reserve(2 * E + u / kGroup + 2);
  for (int64_t f = 0; f < E; ++f) start.push_back(f);
  for (int64_t f = E; f < u - E; f += kGroup) start.push_back(f);
  for (int64_t f = u - E; f < u; ++f) start.push_back(f);
  const int64_t uc = (int64_t)start.size();
  start.push_back(u);
  if (uc < 8 * (int64_t)k || uc * 4 > u) return false;
  if (!w.coarse) w.coarse = std::make_unique<Work>();
  Work& c = *w.coarse;  // kept with w: fresh pages would cost more than the coarse DP
  c.s0.resize(uc + 1);
  c.s1.resize(uc + 1);
  c.s2.resize(uc + 1);
  for (int64_t t = 0; t <= uc; ++t) {  // prefix sums at the element edges: exact segment costs
    c.s0[t] = w.s0[start[t]];
    c.s1[t] = w.s1[start[t]];
    c.s2[t] = w.s2[start[t]];
  }
  c.Dl.resize((size_t)k * uc);
  c.top.assign(k, -1);
  const double* Dc = c.Dl.data();
  const int64_t* top = c.top.data();
  LayerValues vals{c.Dl.data(), c.top.data()};
  // in demand mode itself where it is large enough, with upper demands wide enough for the
  // rows X below is drawn from to be among those it knows exact
  solve_layers(c, uc, k, threads, &vals, kCoarseSlack * slack);
  std::vector<int64_t> chain(k);  // the coarse backtrack's row of each layer
  int64_t x = uc - 2;
  for (int m = k - 2; m >= 1; --m) {
    const int64_t rh = uc - 1 - (k - 1 - m);
    if (x > rh) x = rh;
    chain[m] = x;
    const int64_t jc = c.J[(size_t)m * uc + x];  // coarse start of the last cluster
    const int64_t len = start[x + 1] - start[jc];
    const int64_t g = start[jc] - 1 - std::max<int64_t>(kMarginRows, len / 16);
    G[m] = g > m ? g : m;
    x = jc - 1;
  }
  double tau = Dc[(size_t)(k - 1) * uc + uc - 1];  // >= D_{k-1}(u - 1)
  for (int m = k - 2; m >= 1; --m) {
    const int64_t rh = uc - 1 - (k - 1 - m);
    const int64_t rt = std::min(rh, top[m]);  // the coarse rows known exact end here
    const double* Dm = Dc + (size_t)m * uc;
    const double target = tau + slack * std::fabs(tau);
    // the first coarse row from the chain up whose D reaches the target (D non-decreasing)
    const int64_t r = chain[m] > rt ? rt + 1
                      : std::partition_point(Dm + chain[m], Dm + rt + 1,
                                             [&](double v) { return v < target; }) - Dm;
    if (r > rt) {  // not reached: the layer's every row; past the coarse top row (a
      X[m] = u;    // single value) D_m is bounded by nothing known here
      tau = rt == rh ? Dm[rh] : kInf;
    } else {
      X[m] = start[r + 1] - 1;
      tau = Dm[r];  // >= D_m(X[m])
    }
  }
  return true;
}

// The DP's layers into w.J: in demand mode where the problem is large enough, else (or when
// the hints were wrong) every row. out: see dp_layers; slack: that of the upper demands.
void solve_layers(Work& w, int64_t u, int k, int threads, LayerValues* out, double slack) {
  if (k >= 3 && u >= kDemandMin) {
    std::vector<int64_t> G(k, 0), X(k, 0);
    if (demand_hint(w, u, k, threads, G.data(), X.data(), slack)) {
      int why = 2;
      if (dp_layers(w, u, k, threads, G.data(), X.data(), out, &why)) return;
      const int first = why;
      // lower demands too high (tight, well separated clusters): the upper ones alone
      if (first != 2 && dp_layers(w, u, k, threads, nullptr, X.data(), out)) return;
      // upper demands too low: the lower ones alone (not when those were to blame)
      if (first != 1 && dp_layers(w, u, k, threads, G.data(), nullptr, out)) return;
    }
  }
  dp_layers(w, u, k, threads, nullptr, nullptr, out);
}

// Optimal boundaries B[0..k] of the u sorted values into k contiguous clusters (k < u).
void exact_partition(Work& w, int64_t u, int k, int threads, int64_t* B) {
  solve_layers(w, u, k, threads);
  B[k] = u;
  int64_t i = u - 1;
  for (int m = k - 1; m >= 1; --m) {
    const int64_t j = w.J[(size_t)m * u + i];
    B[m] = j;
    i = j - 1;
  }
  B[0] = 0;
}

// ---- one problem ---------------------------------------------------------------------------
// Branchless count of the sorted midpoints (padded with +inf to P - 1 entries, P a power of
// two) strictly below x: the nearest-center label, ties to the lower center.
inline int label_pow2(const double* mids, int P, double x) {
  int idx = 0;
  for (int step = P >> 1; step > 0; step >>= 1) idx += (mids[idx + step - 1] < x) ? step : 0;
  return idx;
}

template <DType DX>
struct Solver {
  using E = Elem<DX>;
  using Key = typename E::Key;

  const Params& p;
  Work& w;
  int threads;
  int status = kOk;

  template <DType DW>
  void check_weights(const void* wt, int64_t n) {
    if (!wt) return;
    bool nonfinite = false, negative = false;
    const int nt = threads;
    (void)nt;
#if defined(POPCOMP_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static) reduction(|| : nonfinite, negative) if (nt > 1 && n >= 65536)
#endif
    for (int64_t i = 0; i < n; ++i) {
      nonfinite = nonfinite || !Elem<DW>::finite(wt, i);
      negative = negative || Elem<DW>::negative(wt, i);
    }
    if (nonfinite) status = kNonFiniteW;
    else if (negative) status = kNegativeW;
  }

  // Sorted distinct values and summed weights -> w.v, w.W; for small problems w.idx keeps
  // the sort permutation and w.run the index of each sorted position's distinct value.
  // Returns u.
  template <DType DW>
  int64_t reduce_sorted(const void* x, const void* wt, int64_t n) {
    // Large problems carry the (<= 32-bit) weight itself through the sort instead of the
    // index: gathering weights through a random permutation costs more than the sort.
    const bool carry_w = wt && DW != DType::f64 && n > kScatterMax;
    if constexpr (sizeof(Key) == 4)
      return sort_reduce<DW>(w.k64, w.t64, x, wt, n, carry_w,
                             [](Key k, uint32_t pay) { return (uint64_t)k << 32 | pay; });
    else
      return sort_reduce<DW>(w.kp64, w.tkp64, x, wt, n, carry_w,
                             [](Key k, uint32_t pay) { return KeyPay64{k, pay}; });
  }

  template <DType DW, typename Item, typename Make>
  int64_t sort_reduce(std::vector<Item>& a, std::vector<Item>& tmp, const void* x,
                      const void* wt, int64_t n, bool carry_w, Make make) {
    a.resize(n);
    Item* ap = a.data();
    bool nonfinite = false;
    const int nt = threads;
    (void)nt;
#if defined(POPCOMP_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static) reduction(|| : nonfinite) if (nt > 1 && n >= 65536)
#endif
    for (int64_t i = 0; i < n; ++i) {
      nonfinite = nonfinite || !E::finite(x, i);
      ap[i] = make(E::key(x, i),
                   carry_w ? float_to_bits((float)Elem<DW>::get(wt, i)) : (uint32_t)i);
    }
    if (nonfinite) {
      status = kNonFiniteX;
      return 0;
    }
    check_weights<DW>(wt, n);
    if (status != kOk) return 0;
    radix_sort_items(a, tmp, n, E::key_bits, threads);

    // the runs of equal keys -> w.v, w.vo, w.W
    w.v.resize(n);
    w.vo.resize(n);
    w.W.resize(n);
    // the permutation and run index of each sorted position: only the labels of small
    // problems use them
    const bool runs = n <= kScatterMax;
    if (runs) {
      w.idx.resize(n);
      w.run.resize(n);
    }
    // Weights that did not travel with their keys (float64 weights of large problems),
    // gathered into sorted order first: a loop of independent loads, split across the
    // threads, instead of one load per step of the serial run loop below.
    const double* gwp = nullptr;
    if (wt && !carry_w && !runs) {
      w.gw.resize(n);
      double* g = w.gw.data();
#if defined(POPCOMP_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
#endif
      for (int64_t t = 0; t < n; ++t) g[t] = Elem<DW>::get(wt, sort_pay(ap[t]));
      gwp = g;
    }
    // local pointers: stores through w's vectors would otherwise reload their data pointers
    uint32_t* ip = runs ? w.idx.data() : nullptr;
    uint32_t* rp = runs ? w.run.data() : nullptr;
    double* vp = w.v.data();
    double* vop = w.vo.data();
    double* Wp = w.W.data();
    int64_t u = 0;
    for (int64_t t = 0; t < n;) {
      const Key kk = (Key)sort_key(ap[t]);
      double ws = 0.0;
      do {
        const uint32_t pay = sort_pay(ap[t]);
        ws += carry_w ? (double)bits_to_float(pay)
              : gwp   ? gwp[t]
              : wt    ? Elem<DW>::get(wt, pay)
                      : 1.0;
        if (runs) {
          ip[t] = pay;
          rp[t] = (uint32_t)u;
        }
        ++t;
      } while (t < n && (Key)sort_key(ap[t]) == kk);
      vp[u] = vop[u] = E::value(kk);
      Wp[u] = ws;
      ++u;
    }
    return u;
  }

  template <DType DW>
  int64_t reduce_hist(const void* x, const void* wt, int64_t n) {
    check_weights<DW>(wt, n);
    if (status != kOk) return 0;
    w.hcnt.assign(65536, 0);
    w.hw.assign(65536, 0.0);
    const uint16_t* xb = static_cast<const uint16_t*>(x);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t kk = half_key(xb[i] == 0x8000u ? (uint16_t)0 : xb[i]);
      ++w.hcnt[kk];
      w.hw[kk] += wt ? Elem<DW>::get(wt, i) : 1.0;
    }
    w.v.resize(65536);
    w.vo.resize(65536);
    w.W.resize(65536);
    int64_t u = 0;
    for (uint32_t kk = 0; kk < 65536; ++kk) {
      if (!w.hcnt[kk]) continue;
      const double val = E::value(kk);
      if (!std::isfinite(val)) {
        status = kNonFiniteX;
        return 0;
      }
      w.v[u] = w.vo[u] = val;
      w.W[u] = w.hw[kk];
      ++u;
    }
    return u;
  }

  template <DType DW>
  void solve(int64_t row, const Buffers& b) {
    const int64_t n = p.n;
    const int k = p.k;
    const size_t es = DX == DType::f64 ? 8 : (DX == DType::f32 ? 4 : 2);
    const size_t ws_ = DW == DType::f64 ? 8 : (DW == DType::f32 ? 4 : 2);
    const void* x = static_cast<const char*>(b.x) + (size_t)row * n * es;
    const void* wt = b.w ? static_cast<const char*>(b.w) + (size_t)row * n * ws_ : nullptr;
    const bool hist = (DX == DType::f16 || DX == DType::bf16) && n >= kHistMin;
    const int64_t u = hist ? reduce_hist<DW>(x, wt, n) : reduce_sorted<DW>(x, wt, n);
    if (status != kOk) return;

    const double shift = w.v[u / 2];
    w.s0.resize(u + 1);
    w.s1.resize(u + 1);
    w.s2.resize(u + 1);
    {
      double* vp = w.v.data();
      const double* Wp = w.W.data();
      double* p0 = w.s0.data();
      double* p1 = w.s1.data();
      double* p2 = w.s2.data();
      double a0 = 0.0, a1 = 0.0, a2 = 0.0;
      p0[0] = p1[0] = p2[0] = 0.0;
      for (int64_t t = 0; t < u; ++t) {
        const double vv = vp[t] - shift, ww = Wp[t];
        vp[t] = vv;
        p0[t + 1] = a0 = a0 + ww;
        p1[t + 1] = a1 = a1 + ww * vv;
        p2[t + 1] = a2 = a2 + ww * vv * vv;
      }
    }
    if (!(w.s0[u] > 0.0)) {
      status = kZeroW;
      return;
    }
    const Prefix P{w.v.data(), w.s0.data(), w.s1.data(), w.s2.data(), u};
    const Scratch sc = w.scratch(k);
    w.c.resize(k);
    double* c = w.c.data();
    int iters = 0;
    double obj = 0.0;
    const bool drhw = p.beta > 0.0;
    if (k >= u) {
      for (int j = 0; j < k; ++j) c[j] = w.v[j < u ? j : u - 1];
      if (drhw) iters = lloyd(P, k, c, p.beta, p.diameter, p.max_iter, p.tol, sc, &obj);
    } else if (p.method == Method::exact) {
      exact_partition(w, u, k, threads, sc.B);
      for (int j = 0; j < k; ++j) {
        const int64_t a = sc.B[j], e = sc.B[j + 1];
        const double H = P.s0[e] - P.s0[a];
        c[j] = H > 0.0 ? (P.s1[e] - P.s1[a]) / H : 0.5 * (P.v[a] + P.v[e - 1]);
      }
      if (drhw) iters = lloyd(P, k, c, p.beta, p.diameter, p.max_iter, p.tol, sc, &obj);
    } else {
      switch (p.init) {
        case Init::linear: init_linear(P, k, c); break;
        case Init::quantile: init_quantile(P, k, c); break;
        case Init::given:
          for (int j = 0; j < k; ++j) c[j] = b.init_centers[(size_t)row * k + j] - shift;
          break;
        default: {
          SplitMix64 rng(p.seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(row + 1)));
          init_kmeanspp(P, k, c, rng, sc);
        }
      }
      iters = lloyd(P, k, c, p.beta, p.diameter, p.max_iter, p.tol, sc, &obj);
    }
    sort_small(c, k);
    double* out_c = b.centers + (size_t)row * k;
    for (int j = 0; j < k; ++j) out_c[j] = c[j] + shift;
    const double pen = diameter_penalty(out_c[k - 1] - out_c[0], p.beta, p.diameter);
    int32_t* lab = b.labels + (size_t)row * n;

    // Label of every distinct value (nearest center in the original coordinates, ties to the
    // lower center) by one merge pass, and the cost from the aggregated weights.
    int Pw = 1;
    while (Pw < k) Pw <<= 1;
    w.mids.assign(Pw, kInf);
    for (int j = 0; j + 1 < k; ++j) w.mids[j] = 0.5 * (out_c[j] + out_c[j + 1]);
    w.ulab.resize(u);
    double cost = 0.0;
    {
      const double* vop = w.vo.data();
      const double* vp = w.v.data();
      const double* Wp = w.W.data();
      const double* mids = w.mids.data();
      int32_t* ul = w.ulab.data();
      int l = 0;
      for (int64_t t = 0; t < u; ++t) {
        const double xv = vop[t];
        while (l < k - 1 && mids[l] < xv) ++l;
        ul[t] = l;
        const double d = vp[t] - c[l];
        cost += Wp[t] * d * d;
      }
    }
    const int nt = threads;
    if (hist) {
      w.lut.assign(65536, 0);
      for (uint32_t kk = 0, t = 0; kk < 65536; ++kk)
        if (w.hcnt[kk]) w.lut[kk] = w.ulab[t++];
      const uint16_t* xb = static_cast<const uint16_t*>(x);
      const int32_t* lut = w.lut.data();
#if defined(POPCOMP_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
#endif
      for (int64_t i = 0; i < n; ++i) lab[i] = lut[half_key(xb[i] == 0x8000u ? (uint16_t)0 : xb[i])];
    } else if (n <= kScatterMax) {
      const uint32_t* idx = w.idx.data();
      const uint32_t* run = w.run.data();
      const int32_t* ul = w.ulab.data();
      for (int64_t t = 0; t < n; ++t) lab[idx[t]] = ul[run[t]];
    } else {
      const double* mids = w.mids.data();
#if defined(POPCOMP_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
#endif
      for (int64_t i = 0; i < n; ++i) lab[i] = label_pow2(mids, Pw, E::get(x, i));
    }
    (void)nt;
    b.cost[row] = cost + pen;
    b.n_iter[row] = iters;
  }
};

// Each thread keeps its workspace between calls: fresh pages are expensive (first-touch
// faults cost more than the sort itself at n = 1e6), so repeated calls reuse them. A thread
// keeps at most kKeepBytes; larger workspaces are released after the call.
constexpr size_t kKeepBytes = size_t(256) << 20;

Work& thread_work() {
  static thread_local Work w;
  return w;
}

void trim_work(Work& w) {
  if (w.bytes() > kKeepBytes) w = Work();
}

}  // namespace

Result run_cpu(const Params& p, const Buffers& b, int num_threads) {
  check_args(p, b, "kmeans1d_cpu");
  Result res;
  if (p.rows == 0 || p.n == 0) return res;  // nothing to solve
  if (p.n > (int64_t)0xffffffffll) throw std::invalid_argument("kmeans1d: n must be < 2^32");
  if (p.method == Method::exact && (double)p.k * (double)p.n > 4e9)
    throw std::invalid_argument("kmeans1d: exact needs k * n < 4e9 (the k x u argmin table)");
  const int T = std::max(1, num_threads);
  const bool outer = p.rows >= T && T > 1;
  const DType dw = b.w ? p.w_dtype : p.x_dtype;
  int64_t bad_row = p.rows;
  int bad_status = kOk;
  dispatch(p.x_dtype, [&](auto dx) {
    dispatch(dw, [&](auto dwt) {
      constexpr DType DX = decltype(dx)::value;
      constexpr DType DW = decltype(dwt)::value;
      if (outer) {
#if defined(POPCOMP_OPENMP)
#pragma omp parallel num_threads(T)
#endif
        {
          Work& w = thread_work();
          Solver<DX> s{p, w, 1};
#if defined(POPCOMP_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
          for (int64_t r = 0; r < p.rows; ++r) {
            s.status = kOk;
            s.template solve<DW>(r, b);
            if (s.status != kOk) {
#if defined(POPCOMP_OPENMP)
#pragma omp critical(popcomp_kmeans_status)
#endif
              if (r < bad_row) {
                bad_row = r;
                bad_status = s.status;
              }
            }
          }
          trim_work(w);
        }
      } else {
        Work& w = thread_work();
        Solver<DX> s{p, w, T};
        for (int64_t r = 0; r < p.rows && bad_status == kOk; ++r) {
          s.template solve<DW>(r, b);
          if (s.status != kOk) {
            bad_row = r;
            bad_status = s.status;
          }
        }
        trim_work(w);
      }
    });
  });
  if (bad_status != kOk) {
    res.status = bad_status;
    res.row = bad_row;
  }
  return res;
}

}  // namespace kmeans
}  // namespace popcomp
