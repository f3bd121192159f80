// CPU backend of the palettized matmul and decode (see palettized.h).
//
// linear: x is converted to an fp32 buffer (8 rows per pass over the weight, zero padded to a
// multiple of 32 columns); OpenMP threads take contiguous tiles of output rows. A tile of R rows
// walks the rows' packed blocks once: each block of 32 indices is decoded in registers (loads,
// zero extension, shifts: palettized_kernels.inc), its weights looked up in a table held in
// registers (16 fp32 entries: one AVX-512 permute, or two AVX2 permutes and a blend; 32 entries:
// a two-table permute, or four and three blends; 64..256 entries: a gather from a padded array)
// and FMA'd into the accumulators of the x rows (1..8: batch 1 and the small-batch path share
// the kernel; each decoded block serves every x row of the pass). More than 8 rows of x take
// several passes: at 16 rows a tile's x no longer stays near the core (16 rows of 4096 fp32 are
// 256 KB streamed from L2 per output row), and two passes of 8 with two output rows per tile
// are about 1.7x faster than one pass of 16. Group sizes that are not a multiple of
// 32 look the block's weights up one by one (block_weights_general), then the same FMAs.
// From kOuterMinM rows of x, an AVX-512 CPU runs the large-batch kernel instead
// (palettized_outer.inc: decoded panels of 12 weight rows, register-blocked outer products).
// decode: the same decode and look-up, stored as fp32 / fp16 / bf16 rows.
// The instruction set is chosen at run time (AVX-512 F/BW/VL/DQ, AVX2 + FMA + F16C, portable),
// as the K-means kernels choose theirs.
#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define PC_PAL_X86 1
#endif

#include "common/parallel.h"
#include "palettized/palettized.h"
#include "palettized/palettized_math.h"

#define PC_AI inline __attribute__((always_inline))

namespace popcomp {
namespace palettized {
namespace {

enum class Isa : int { portable = 0, avx2 = 1, avx512 = 2 };

// What the row kernels read about the weight.
struct Layout {
  const Params* p = nullptr;
  const uint8_t* packed = nullptr;
  const void* cb = nullptr;
  int64_t rb = 0;       // bytes per packed row
  int64_t bb = 0;       // bytes per block (4 * bits)
  int64_t nblocks = 0;  // blocks per row
  int tail = kBlock;    // columns of the last block that exist (1..32)
  int64_t groups = 1;   // codebook rows per weight row (per group), else 1
};

Layout make_layout(const Params& p, const uint8_t* packed, const void* cb) {
  Layout L;
  L.p = &p;
  L.packed = packed;
  L.cb = cb;
  L.rb = row_bytes(p.in, p.bits);
  L.bb = 4 * p.bits;
  L.nblocks = blocks_per_row(p.in);
  L.tail = last_block_columns(p.in);
  L.groups = groups_per_row(p.in, p.group_size);
  return L;
}

struct Ctx : Layout {
  const float* xb = nullptr;  // nm rows of x, fp32, xs columns each (zero padded)
  int64_t xs = 0;
  int nm = 0;
  int64_t m0 = 0;  // x row of xb's first row
  const void* bias = nullptr;
  DType bias_dtype = DType::f32;
  void* y = nullptr;  // (M, rows)
  DType y_dtype = DType::f32;
};

struct DCtx : Layout {
  const int64_t* row_ids = nullptr;
  int64_t row_begin = 0;
  void* out = nullptr;
};

// Bytes of an element of dtype t.
PC_AI int dtype_size(DType t) { return t == DType::f64 ? 8 : t == DType::f32 ? 4 : 2; }

// Codebook row of weight row r, group gi (gi counts groups of the row; 0 without groups).
PC_AI int64_t cb_row(const Layout& L, int64_t r, int64_t gi) {
  return codebook_row_of_group(r, gi, L.p->group_size, L.groups, L.p->cb_rows);
}

// y[m0 + m, r] = s[m] + bias[r] for the nm rows of this call, in y's dtype.
inline void store_outputs(const Ctx& c, int64_t r, const float* s) {
  const float b = c.bias ? load_as_float(c.bias, c.bias_dtype, r) : 0.f;
  for (int m = 0; m < c.nm; ++m) store_as(c.y, c.y_dtype, (c.m0 + m) * c.p->rows + r, s[m] + b);
}

// The 32 weights of block b of row r for any group_size (columns past in_features: 0).
inline void block_weights_general(const Layout& L, int64_t r, int64_t b, const uint8_t* blk,
                                  float* w) {
  const Params& p = *L.p;
  uint8_t idx[kBlock];
  decode_block(blk, p.bits, idx);
  const int64_t c0 = b * kBlock;
  const int n = (int)std::min<int64_t>(kBlock, p.in - c0);
  if (p.group_size > 0) {
    GroupCursor gc(c0, p.group_size);
    for (int i = 0; i < n; ++i)
      w[i] = codebook_value(L.cb, p.cb_dtype, r * L.groups + gc.at(c0 + i), p.k, idx[i]);
  } else {
    const int64_t row = cb_row(L, r, 0);
    for (int i = 0; i < n; ++i) w[i] = codebook_value(L.cb, p.cb_dtype, row, p.k, idx[i]);
  }
  for (int i = n; i < kBlock; ++i) w[i] = 0.f;
}

using LinearFn = void (*)(const Ctx&, int64_t r0, int nr);
struct LinearKernel {
  LinearFn fn;
  int rows;  // output rows per call
};
using DecodeFn = void (*)(const DCtx&, int64_t i0, int64_t i1);

// ============================================================================================
// portable: plain arrays (the compiler vectorizes what it can for the baseline ISA)
// ============================================================================================
namespace isa_portable {
struct V {
  float v[16];
};
struct VI {
  int32_t v[16];
};
constexpr int kRows(int mt) { return mt <= 2 ? 2 : 1; }
PC_AI V v_zero() {
  V r;
  for (int l = 0; l < 16; ++l) r.v[l] = 0.f;
  return r;
}
PC_AI V v_load(const float* p) {
  V r;
  std::memcpy(r.v, p, sizeof r.v);
  return r;
}
PC_AI V v_fma(const V& a, const V& b, V c) {
  for (int l = 0; l < 16; ++l) c.v[l] += a.v[l] * b.v[l];
  return c;
}
PC_AI float v_sum(const V& a) {
  float s[8];
  for (int l = 0; l < 8; ++l) s[l] = a.v[l] + a.v[l + 8];
  for (int l = 0; l < 4; ++l) s[l] += s[l + 4];
  return (s[0] + s[2]) + (s[1] + s[3]);
}
PC_AI V v_keep(V a, int n) {
  for (int l = 0; l < 16; ++l)
    if (l >= n) a.v[l] = 0.f;
  return a;
}
template <DType DT>
PC_AI void v_store(void* out, int64_t off, const V& a, int n) {
  const int e = n < 16 ? n : 16;
  for (int l = 0; l < e; ++l) store_as(out, DT, off + l, a.v[l]);
}
template <int BITS>
PC_AI void decode(const uint8_t* blk, VI& lo, VI& hi) {
  uint8_t idx[kBlock];
  decode_block(blk, BITS, idx);
  for (int l = 0; l < 16; ++l) {
    lo.v[l] = idx[l];
    hi.v[l] = idx[16 + l];
  }
}
template <int BITS>
struct Table {
  float t[1 << BITS];
  PC_AI void build(const void* cb, DType dt, int64_t row, int k) {
    for (int e = 0; e < (1 << BITS); ++e) t[e] = codebook_value(cb, dt, row, k, e);
  }
  PC_AI V lookup(const VI& i) const {
    V r;
    for (int l = 0; l < 16; ++l) r.v[l] = t[i.v[l] & ((1 << BITS) - 1)];
    return r;
  }
};
void pack_x_row(const void* x, DType dt, int64_t in, int64_t xs, float* dst) {
  if (dt == DType::f32) {
    std::memcpy(dst, x, (size_t)in * sizeof(float));
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(x);
    if (dt == DType::f16)
      for (int64_t c = 0; c < in; ++c) dst[c] = half_bits_to_float(h[c]);
    else
      for (int64_t c = 0; c < in; ++c) dst[c] = bf16_bits_to_float(h[c]);
  }
  for (int64_t c = in; c < xs; ++c) dst[c] = 0.f;
}
#include "palettized/palettized_kernels.inc"
}  // namespace isa_portable

#if defined(PC_PAL_X86)
// ============================================================================================
// AVX2 + FMA + F16C: 16 lanes = two ymm
// ============================================================================================
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
namespace isa_avx2 {
struct V {
  __m256 a, b;
};
struct VI {
  __m256i a, b;
};
constexpr int kRows(int mt) { return mt == 1 ? 4 : mt == 2 ? 2 : 1; }
PC_AI __m256i iota8() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
PC_AI __m256 keep8(__m256 v, int n) {
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), iota8());
  return _mm256_and_ps(v, _mm256_castsi256_ps(m));
}
PC_AI V v_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
PC_AI V v_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
PC_AI V v_fma(V a, V b, V c) { return {_mm256_fmadd_ps(a.a, b.a, c.a), _mm256_fmadd_ps(a.b, b.b, c.b)}; }
PC_AI float v_sum(V v) {
  const __m256 s = _mm256_add_ps(v.a, v.b);
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
PC_AI V v_keep(V v, int n) { return {keep8(v.a, n), keep8(v.b, n - 8)}; }
PC_AI __m256i bf16_round(__m256 v) {  // fp32 -> bf16 bits in the low half of each lane
  const __m256i u = _mm256_castps_si256(v);
  const __m256i one = _mm256_set1_epi32(1);
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                   _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
  r = _mm256_srli_epi32(r, 16);
  const __m256i abs = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f800000));
  const __m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(r, q, nan);
}
template <DType DT>
PC_AI void v_store(void* out, int64_t off, V v, int n) {
  if (n <= 0) return;
  if constexpr (DT == DType::f32) {
    float* o = static_cast<float*>(out) + off;
    if (n >= 16) {
      _mm256_storeu_ps(o, v.a);
      _mm256_storeu_ps(o + 8, v.b);
    } else {
      _mm256_maskstore_ps(o, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), iota8()), v.a);
      _mm256_maskstore_ps(o + 8, _mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8), iota8()), v.b);
    }
  } else {
    __m128i lo, hi;
    if constexpr (DT == DType::f16) {
      lo = _mm256_cvtps_ph(v.a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      hi = _mm256_cvtps_ph(v.b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      const __m256i a = bf16_round(v.a), b = bf16_round(v.b);
      lo = _mm_packus_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
      hi = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    }
    uint16_t* o = static_cast<uint16_t*>(out) + off;
    if (n >= 16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), lo);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 8), hi);
    } else {
      alignas(32) uint16_t t[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(t), lo);
      _mm_store_si128(reinterpret_cast<__m128i*>(t + 8), hi);
      std::memcpy(o, t, (size_t)n * 2);
    }
  }
}

// ---- decode (palettized_decode.inc): a half block as 16 index bytes, widened to two ymm
template <int O>
PC_AI __m128i merge_bytes(__m128i idx, __m128i v) {  // bits below O of each byte from idx
  const __m128i m = _mm_set1_epi8((char)((1 << O) - 1));
  return _mm_or_si128(_mm_and_si128(idx, m), _mm_andnot_si128(m, v));
}
PC_AI VI widen(__m128i b) { return {_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))}; }
#include "palettized/palettized_decode.inc"

// ---- tables
PC_AI __m256 load8(const void* cb, DType dt, int64_t base, int n) {  // entries >= n read 0
  if (n >= 8) {
    if (dt == DType::f16)
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(cb) + base)));
    return _mm256_loadu_ps(static_cast<const float*>(cb) + base);
  }
  if (n <= 0) return _mm256_setzero_ps();
  if (dt == DType::f16) {
    alignas(16) uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(t, static_cast<const uint16_t*>(cb) + base, (size_t)n * 2);
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
  }
  alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(t, static_cast<const float*>(cb) + base, (size_t)n * 4);
  return _mm256_load_ps(t);
}
template <int BITS, int KIND = (BITS <= 5 ? 0 : 1)>
struct Table;
template <int BITS>
struct Table<BITS, 0> {  // up to 32 entries in 1, 2 or 4 ymm
  static constexpr int NT = BITS <= 3 ? 1 : BITS == 4 ? 2 : 4;
  __m256 t[NT];
  PC_AI void build(const void* cb, DType dt, int64_t row, int k) {
    for (int j = 0; j < NT; ++j) t[j] = load8(cb, dt, row * k + 8 * j, k - 8 * j);
    if constexpr (BITS < 3)
      t[0] = _mm256_permutevar8x32_ps(t[0], _mm256_and_si256(iota8(), _mm256_set1_epi32((1 << BITS) - 1)));
  }
  PC_AI __m256 look8(__m256i i) const {
    if constexpr (NT == 1) {
      return _mm256_permutevar8x32_ps(t[0], i);
    } else {
      const __m256 s3 = _mm256_castsi256_ps(_mm256_slli_epi32(i, 28));  // bit 3 -> sign
      const __m256 a = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t[0], i),
                                        _mm256_permutevar8x32_ps(t[1], i), s3);
      if constexpr (NT == 2) return a;
      const __m256 b = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t[2], i),
                                        _mm256_permutevar8x32_ps(t[3], i), s3);
      return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(i, 27)));
    }
  }
  PC_AI V lookup(VI i) const { return {look8(i.a), look8(i.b)}; }
};
template <int BITS>
struct Table<BITS, 1> {  // 64..256 entries: a zero-padded array and gathers
  alignas(32) float t[1 << BITS];
  PC_AI void build(const void* cb, DType dt, int64_t row, int k) {
    for (int e = 0; e < (1 << BITS); e += 8) _mm256_store_ps(t + e, load8(cb, dt, row * k + e, k - e));
  }
  PC_AI V lookup(VI i) const {
    const __m256i m = _mm256_set1_epi32((1 << BITS) - 1);
    return {_mm256_i32gather_ps(t, _mm256_and_si256(i.a, m), 4),
            _mm256_i32gather_ps(t, _mm256_and_si256(i.b, m), 4)};
  }
};

void pack_x_row(const void* x, DType dt, int64_t in, int64_t xs, float* dst) {
  int64_t c = 0;
  if (dt == DType::f32) {
    std::memcpy(dst, x, (size_t)in * sizeof(float));
    c = in;
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(x);
    for (; c + 8 <= in; c += 8) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + c));
      const __m256 f = dt == DType::f16
                           ? _mm256_cvtph_ps(v)
                           : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
      _mm256_storeu_ps(dst + c, f);
    }
    for (; c < in; ++c) dst[c] = dt == DType::f16 ? half_bits_to_float(h[c]) : bf16_bits_to_float(h[c]);
  }
  for (; c < xs; ++c) dst[c] = 0.f;
}
#include "palettized/palettized_kernels.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

// ============================================================================================
// AVX-512 (F, BW, VL, DQ): 16 lanes = one zmm
// ============================================================================================
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
namespace isa_avx512 {
using V = __m512;
using VI = __m512i;
constexpr int kRows(int mt) { return mt <= 2 ? 4 : 2; }
PC_AI __mmask16 first_n(int n) {
  return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}
PC_AI V v_zero() { return _mm512_setzero_ps(); }
PC_AI V v_load(const float* p) { return _mm512_loadu_ps(p); }
PC_AI V v_fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
PC_AI float v_sum(V a) { return _mm512_reduce_add_ps(a); }
PC_AI V v_keep(V a, int n) { return _mm512_maskz_mov_ps(first_n(n), a); }
template <DType DT>
PC_AI void v_store(void* out, int64_t off, V v, int n) {
  if (n <= 0) return;
  const __mmask16 m = first_n(n);
  if constexpr (DT == DType::f32) {
    _mm512_mask_storeu_ps(static_cast<float*>(out) + off, m, v);
  } else {
    __m256i h;
    if constexpr (DT == DType::f16) {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      const __m512i u = _mm512_castps_si512(v);
      __m512i r = _mm512_add_epi32(
          u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                              _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
      r = _mm512_srli_epi32(r, 16);
      const __mmask16 nan = _mm512_cmpgt_epu32_mask(
          _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
      r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
      h = _mm512_cvtepi32_epi16(r);
    }
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + off, m, h);
  }
}

// ---- decode (palettized_decode.inc): a half block as 16 index bytes, widened to one zmm
template <int O>
PC_AI __m128i merge_bytes(__m128i idx, __m128i v) {  // (m & idx) | (~m & v), m: bits below O
  return _mm_ternarylogic_epi32(_mm_set1_epi8((char)((1 << O) - 1)), idx, v, 0xCA);
}
PC_AI VI widen(__m128i b) { return _mm512_cvtepu8_epi32(b); }
#include "palettized/palettized_decode.inc"

// ---- the matmul's lane order for 1 and 2 bits (one piece of width W = BITS): the block's
// 4W bytes are W dwords of 32 / W fields; they are broadcast to every lane (a load, no shuffle)
// and lane l of half H shifts dword l % W right by W * f, f = 16H / W + l / W, so that its
// field sits at the bottom (bits above are garbage, as in decode<BITS>). The field holds
// column lane_column(W, H, l) (layout v2: byte b, bits W j hold column b + 4W j), and the
// packed x row is permuted to match (order_x_row). This saves the two byte-to-dword widenings
// of decode<BITS> per block, which share the shuffle port with the table look-ups: Linear(4096,
// 4096) 2 bits batch 1, 0.47-0.50 ms against 0.54-0.63 ms. At 4 bits (a 16-byte broadcast) the
// A/B was within noise, so 4 bits keeps decode<BITS>.
#define PC_PAL_LANE_ORDER
constexpr bool lane_ordered(int bits) { return bits == 1 || bits == 2; }
constexpr int lane_column(int w, int h, int l) {
  const int d = l % w, f = 16 * h / w + l / w, bit = 32 * d + w * f;
  return bit / 8 + 4 * w * ((bit % 8) / w);
}
template <int W, int H>
PC_AI VI lane_columns() {
  alignas(64) static constexpr int32_t c[16] = {
      lane_column(W, H, 0),  lane_column(W, H, 1),  lane_column(W, H, 2),  lane_column(W, H, 3),
      lane_column(W, H, 4),  lane_column(W, H, 5),  lane_column(W, H, 6),  lane_column(W, H, 7),
      lane_column(W, H, 8),  lane_column(W, H, 9),  lane_column(W, H, 10), lane_column(W, H, 11),
      lane_column(W, H, 12), lane_column(W, H, 13), lane_column(W, H, 14), lane_column(W, H, 15)};
  return _mm512_load_si512(c);
}
template <int W, int H>
PC_AI VI lane_shifts() {
  alignas(64) static constexpr int32_t s[16] = {
      W * (16 * H / W + 0 / W),  W * (16 * H / W + 1 / W),  W * (16 * H / W + 2 / W),
      W * (16 * H / W + 3 / W),  W * (16 * H / W + 4 / W),  W * (16 * H / W + 5 / W),
      W * (16 * H / W + 6 / W),  W * (16 * H / W + 7 / W),  W * (16 * H / W + 8 / W),
      W * (16 * H / W + 9 / W),  W * (16 * H / W + 10 / W), W * (16 * H / W + 11 / W),
      W * (16 * H / W + 12 / W), W * (16 * H / W + 13 / W), W * (16 * H / W + 14 / W),
      W * (16 * H / W + 15 / W)};
  return _mm512_load_si512(s);
}
template <int BITS>
PC_AI void decode_lanes(const uint8_t* blk, VI& lo, VI& hi) {
  if constexpr (lane_ordered(BITS)) {
    VI v;
    if constexpr (BITS == 1) {
      int32_t d;
      std::memcpy(&d, blk, 4);
      v = _mm512_set1_epi32(d);
    } else {
      long long q;
      std::memcpy(&q, blk, 8);
      v = _mm512_set1_epi64(q);
    }
    lo = _mm512_srlv_epi32(v, lane_shifts<BITS, 0>());
    hi = _mm512_srlv_epi32(v, lane_shifts<BITS, 1>());
  } else {
    decode<BITS>(blk, lo, hi);
  }
}
template <int BITS, int H>
PC_AI V keep_lanes(V v, int tail) {
  if constexpr (lane_ordered(BITS))
    return _mm512_maskz_mov_ps(_mm512_cmplt_epi32_mask(lane_columns<BITS, H>(), _mm512_set1_epi32(tail)), v);
  else
    return v_keep(v, tail - 16 * H);
}
// Each 32-column block of a packed x row (xs columns, the last 16 padding) in the lane order
// of decode_lanes<bits> (the fast path only; `general` kernels read x in natural order).
void order_x_row(int bits, bool general, int64_t xs, float* row) {
  if (general || !lane_ordered(bits)) return;
  int col[kBlock];
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 16; ++l) col[16 * h + l] = lane_column(bits, h, l);
  float t[kBlock];
  for (int64_t b = 0; b + kBlock <= xs - 16; b += kBlock) {
    for (int i = 0; i < kBlock; ++i) t[i] = row[b + col[i]];
    std::memcpy(row + b, t, sizeof t);
  }
}

// ---- tables
PC_AI V load16(const void* cb, DType dt, int64_t base, int n) {  // entries >= n read 0
  const __mmask16 m = first_n(n);
  if (dt == DType::f16)
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(cb) + base));
  return _mm512_maskz_loadu_ps(m, static_cast<const float*>(cb) + base);
}
template <int BITS, int KIND = (BITS <= 4 ? 0 : BITS == 5 ? 1 : 2)>
struct Table;
template <int BITS>
struct Table<BITS, 0> {  // up to 16 entries: one zmm, permute on the low 4 index bits
  V t;
  PC_AI void build(const void* cb, DType dt, int64_t row, int k) {
    t = load16(cb, dt, row * k, k);
    if constexpr (BITS < 4)  // replicated: bits 4 - BITS.. of the index are not masked
      t = _mm512_permutexvar_ps(
          _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                           _mm512_set1_epi32((1 << BITS) - 1)),
          t);
  }
  PC_AI V lookup(VI i) const { return _mm512_permutexvar_ps(i, t); }
};
template <int BITS>
struct Table<BITS, 1> {  // 32 entries: two zmm, permute on the low 5 index bits
  V t0, t1;
  PC_AI void build(const void* cb, DType dt, int64_t row, int k) {
    t0 = load16(cb, dt, row * k, k);
    t1 = load16(cb, dt, row * k + 16, k - 16);
  }
  PC_AI V lookup(VI i) const { return _mm512_permutex2var_ps(t0, i, t1); }
};
template <int BITS>
struct Table<BITS, 2> {  // 64..256 entries: a zero-padded array and gathers
  alignas(64) float t[1 << BITS];
  PC_AI void build(const void* cb, DType dt, int64_t row, int k) {
    for (int e = 0; e < (1 << BITS); e += 16) _mm512_store_ps(t + e, load16(cb, dt, row * k + e, k - e));
  }
  PC_AI V lookup(VI i) const {
    return _mm512_i32gather_ps(_mm512_and_si512(i, _mm512_set1_epi32((1 << BITS) - 1)), t, 4);
  }
};

void pack_x_row(const void* x, DType dt, int64_t in, int64_t xs, float* dst) {
  for (int64_t c = 0; c < xs; c += 16) {
    const __mmask16 m = first_n((int)std::min<int64_t>(16, in - c));
    V f;
    if (dt == DType::f32) {
      f = _mm512_maskz_loadu_ps(m, static_cast<const float*>(x) + c);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + c);
      f = dt == DType::f16 ? _mm512_cvtph_ps(h)
                           : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    _mm512_storeu_ps(dst + c, f);
  }
}
#include "palettized/palettized_kernels.inc"
#undef PC_PAL_LANE_ORDER
#include "palettized/palettized_outer.inc"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif  // PC_PAL_X86

// ============================================================================================
// dispatch and drivers
// ============================================================================================
struct IsaOps {
  LinearKernel (*linear)(int bits, int nm, bool general);
  DecodeFn (*decode)(int bits, DType dt, bool general);
  void (*pack)(const void* x, DType dt, int64_t in, int64_t xs, float* dst);
  void (*order)(int bits, bool general, int64_t xs, float* row);
  // the large-batch kernel (palettized_outer.inc), where this ISA has one
  void (*outer)(const Layout& L, const LinearArgs& a, int nt);
};

Isa detect_isa() {
#if defined(PC_PAL_X86)
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2"))
      return Isa::avx2;
    return Isa::portable;
  }();
  return isa;
#else
  return Isa::portable;
#endif
}

// The kernels of `isa`, or of the best one this CPU has below it.
IsaOps ops_for(Isa isa) {
  const Isa have = detect_isa();
  if ((int)isa > (int)have) isa = have;
#if defined(PC_PAL_X86)
  if (isa == Isa::avx512)
    return {&isa_avx512::pick_linear, &isa_avx512::pick_decode, &isa_avx512::pack_x_row,
            &isa_avx512::order_x_row, &isa_avx512::linear_outer};
  if (isa == Isa::avx2)
    return {&isa_avx2::pick_linear, &isa_avx2::pick_decode, &isa_avx2::pack_x_row,
            &isa_avx2::order_x_row, nullptr};
#endif
  return {&isa_portable::pick_linear, &isa_portable::pick_decode, &isa_portable::pack_x_row,
          &isa_portable::order_x_row, nullptr};
}

int threads_for(int num_threads, int64_t work) {
  int nt = num_threads > 0 ? num_threads : max_threads();
  if ((int64_t)nt > work) nt = (int)std::max<int64_t>(1, work);
  return nt;
}

constexpr int64_t kMaxBatch = 8;  // x rows per pass over the weight
// From this many rows of x, the large-batch kernel where the ISA has one (palettized_outer.inc;
// its tiles are 32 rows, so its time is flat below 32). Measured, 2 threads, 4 bits: the row
// kernels lead up to 20 rows (Linear(4096, 4096) batch 20: 5.5 ms against 6.0), the two tie at
// 24 on Linear(384, 1536), and from 24 the large-batch kernel leads (4096 x 4096 batch 24:
// 6.0 ms against 6.8; batch 31: 6.0 against 8.7).
constexpr int64_t kOuterMinM = 24;

void linear_with(Isa isa, const Params& p, const LinearArgs& a, int num_threads) {
  check_linear(p, a, "palettized_linear_cpu");
  if (a.M == 0 || p.rows == 0) return;
  const IsaOps ops = ops_for(isa);
  if (ops.outer && a.M >= kOuterMinM) {
    const Layout L = make_layout(p, a.packed, a.codebook);
    ops.outer(L, a, threads_for(num_threads, p.rows));
    return;
  }
  Ctx c;
  static_cast<Layout&>(c) = make_layout(p, a.packed, a.codebook);
  // rows of the x buffer one cache line longer than the padded row: at a power-of-two stride
  // the x rows of one block would all map to one L1 set
  c.xs = c.nblocks * kBlock + 16;
  c.bias = a.bias;
  c.bias_dtype = a.bias_dtype;
  c.y = a.y;
  c.y_dtype = a.x_dtype;
  const bool general = general_groups(p.group_size);
  const int64_t mc = std::min<int64_t>(a.M, kMaxBatch);
  std::unique_ptr<float[]> xbuf(new float[(size_t)std::max<int64_t>(1, mc * c.xs)]);
  c.xb = xbuf.get();
  const int64_t xrow_bytes = a.x_row_stride * dtype_size(a.x_dtype);
  const int nt = threads_for(num_threads, p.rows);
  (void)nt;
#if defined(POPCOMP_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
  {
    for (int64_t m0 = 0; m0 < a.M; m0 += kMaxBatch) {
      const int nm = (int)std::min<int64_t>(kMaxBatch, a.M - m0);
#if defined(POPCOMP_OPENMP)
#pragma omp for schedule(static)
#endif
      for (int m = 0; m < nm; ++m)
      {
        ops.pack(static_cast<const char*>(a.x) + (m0 + m) * xrow_bytes, a.x_dtype, p.in, c.xs,
                 xbuf.get() + m * c.xs);
        ops.order(p.bits, general, c.xs, xbuf.get() + m * c.xs);
      }
      Ctx cc = c;
      cc.m0 = m0;
      cc.nm = nm;
      const LinearKernel kern = ops.linear(p.bits, nm, general);
      const int64_t tiles = (p.rows + kern.rows - 1) / kern.rows;
      // tiles handed out 16 at a time as threads come free: a thread descheduled by another
      // job holds up the call by one chunk, not by its whole static share (4096 x 4096 batch 1
      // beside a busy process, 90th percentile of 200 calls: 0.42 ms against 4.4 ms; alone
      // within noise)
#if defined(POPCOMP_OPENMP)
#pragma omp for schedule(dynamic, 16)
#endif
      for (int64_t t = 0; t < tiles; ++t)
        kern.fn(cc, t * kern.rows, (int)std::min<int64_t>(kern.rows, p.rows - t * kern.rows));
    }
  }
}

void decode_with(Isa isa, const Params& p, const DecodeArgs& a, int num_threads) {
  const char* fn = "palettized_decode_cpu";
  check_decode(p, a, fn);
  if (a.n == 0 || p.in == 0) return;
  if (a.row_ids)
    for (int64_t i = 0; i < a.n; ++i)
      args::require(a.row_ids[i] >= 0 && a.row_ids[i] < p.rows, fn,
                    "row_ids[" + std::to_string(i) + "] = " + std::to_string(a.row_ids[i]) +
                        " is outside 0.." + std::to_string(p.rows - 1));
  const IsaOps ops = ops_for(isa);
  DCtx c;
  static_cast<Layout&>(c) = make_layout(p, a.packed, a.codebook);
  c.row_ids = a.row_ids;
  c.row_begin = a.row_begin;
  c.out = a.out;
  const DecodeFn f = ops.decode(p.bits, a.out_dtype, general_groups(p.group_size));
  const int nt = threads_for(num_threads, a.n);
  (void)nt;
#if defined(POPCOMP_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(dynamic, 16)
#endif
  for (int64_t i = 0; i < a.n; ++i) f(c, i, i + 1);
}

const char* isa_name(Isa isa) {
  return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "portable";
}

}  // namespace

void linear_cpu(const Params& p, const LinearArgs& a, int num_threads) {
  linear_with(detect_isa(), p, a, num_threads);
}

void decode_cpu(const Params& p, const DecodeArgs& a, int num_threads) {
  decode_with(detect_isa(), p, a, num_threads);
}

const char* cpu_isa() { return isa_name(detect_isa()); }

}  // namespace palettized
}  // namespace popcomp
