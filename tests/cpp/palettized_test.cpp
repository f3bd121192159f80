// CPU checks of the palettized matmul and decode kernels (csrc/palettized/palettized_cpu.cpp,
// included here so that each instruction-set path -- portable, AVX2, AVX-512 -- can be forced):
//   * a reference packer written from the layout-v2 spec (checked on literal examples) packs
//     random indices; linear and decode are compared with a naive double-precision loop over
//     the unpacked indices and the codebook values, for bits 1..8, k <= 2^bits, per tensor /
//     per channel / group sizes 32, 128, 7, 50, in_features 0, 1, 17, 31, 32, 33, 100, 4101,
//     M in {1, 2, 3, 8, 16, 17}, fp32/fp16 codebooks, fp32/fp16/bf16 x with padded row strides,
//     bias or not, 1 and 3 threads;
//   * every buffer ends at a PROT_NONE page (Linux): a read or write past x, the packed
//     indices, the codebook, the bias, y or the decode output faults;
//   * the padded columns of a block are masked: the codebook entry of the pad index is +inf
//     where the real indices never use it, and y must stay finite and right;
//   * decode by row_ids and by row_begin; bad arguments throw std::invalid_argument;
//   * float -> fp16 / bf16 rounding against independent oracles (binary search, double arithmetic);
//   * the CUDA kernel's index logic on the CPU (palettized_math.h): word_index (a block held as
//     32-bit words) equals the byte decoder, GroupCursor, the shared-memory slots of the staged
//     x (distinct, aligned, free of bank conflicts) and of the per-lane tables, and the work
//     split covering every (x row, output row, block) exactly once.
// Built by tests/test_palettized_kernels.py with the host compiler; exit 1 on failure.
#include "palettized/palettized_cpu.cpp"

#include <cmath>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <random>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

using namespace popcomp;
using namespace popcomp::palettized;

namespace {

int failures = 0;
int checks = 0;
#define CHECK(cond, ...)                                                             \
  do {                                                                               \
    ++checks;                                                                        \
    if (!(cond)) {                                                                   \
      if (++failures <= 25) {                                                        \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                  \
        std::printf(__VA_ARGS__);                                                    \
        std::printf("\n");                                                           \
      }                                                                              \
    }                                                                                \
  } while (0)

// ---- a buffer whose last byte is followed by an inaccessible page ---------------------------
struct Guarded {
  void* base = nullptr;
  size_t map_bytes = 0;
  uint8_t* data = nullptr;
  size_t bytes = 0;
  explicit Guarded(size_t n) : bytes(n) {
#if defined(__linux__)
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t body = (n + page - 1) / page * page;
    map_bytes = body + page;
    base = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) std::abort();
    mprotect(static_cast<uint8_t*>(base) + body, page, PROT_NONE);
    data = static_cast<uint8_t*>(base) + body - n;  // ends at the guard page
#else
    base = std::malloc(n + 64);
    data = static_cast<uint8_t*>(base);
#endif
  }
  ~Guarded() {
#if defined(__linux__)
    munmap(base, map_bytes);
#else
    std::free(base);
#endif
  }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  template <typename T>
  T* as() {
    return reinterpret_cast<T*>(data);
  }
};

// ---- independent 16-bit float conversions ---------------------------------------------------
float half_to_float(uint16_t h) {  // exact, from the definition of binary16
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (e == 31) return m ? NAN : (float)(sign * INFINITY);
  if (e == 0) return (float)(sign * std::ldexp((double)m, -24));
  return (float)(sign * std::ldexp((double)(1024 + m), e - 25));
}
uint16_t float_to_half(float f) {  // the nearest binary16 (ties to even), by binary search
  if (std::isnan(f)) return 0x7e00;
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const double a = std::fabs((double)f);
  if (a >= 65520.0) return sign | 0x7c00;  // 65520 is halfway to 2^16: even rounds up, to inf
  uint16_t lo = 0, hi = 0x7bff;  // largest pattern whose value is <= a
  while (lo < hi) {
    const uint16_t mid = (uint16_t)((lo + hi + 1) / 2);
    if ((double)half_to_float(mid) <= a) lo = mid;
    else hi = (uint16_t)(mid - 1);
  }
  if ((double)half_to_float(lo) == a) return sign | lo;
  const double dlo = a - half_to_float(lo), dhi = (double)half_to_float((uint16_t)(lo + 1)) - a;
  const uint16_t r = dlo < dhi ? lo : dhi < dlo ? (uint16_t)(lo + 1) : ((lo & 1) ? (uint16_t)(lo + 1) : lo);
  return sign | r;
}
float bf16_to_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t float_to_bf16(float f) {  // the nearer of the two neighbours, ties to the even one
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return (uint16_t)((u >> 16) | 0x40);
  const uint16_t lo = (uint16_t)(u >> 16);
  if ((uint32_t)lo << 16 == u) return lo;
  const uint16_t hi = (uint16_t)(lo + 1);
  const double dlo = std::fabs((double)bf16_to_float(lo) - f);
  const double dhi = std::isinf(bf16_to_float(hi)) ? std::fabs(std::ldexp(1.0, 128) - std::fabs((double)f))
                                                    : std::fabs((double)bf16_to_float(hi) - f);
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return (lo & 1) ? hi : lo;
}

// ---- the reference packer: layout v2 written from the spec --------------------------------
// A row of `in` indices padded with 0 to a multiple of 32; each block of 32 indices: the pieces
// of `bits` (8 alone, else 4, 2, 1 in descending order) one after the other, the first holding
// the low bits; a piece of width w is 4w bytes, byte t holding indices t + j*4w in bits
// [j*w, (j+1)*w).
std::vector<int> pieces_of(int bits) {
  if (bits == 8) return {8};
  std::vector<int> v;
  for (int w : {4, 2, 1})
    if (bits & w) v.push_back(w);
  return v;
}
void pack_row(const int* idx, int64_t in, int bits, uint8_t* out) {
  const int64_t nb = (in + 31) / 32;
  for (int64_t b = 0; b < nb; ++b) {
    int ix[32];
    for (int i = 0; i < 32; ++i) ix[i] = b * 32 + i < in ? idx[b * 32 + i] : 0;
    int shift = 0;
    for (int w : pieces_of(bits)) {
      const int per = 4 * w;
      for (int t = 0; t < per; ++t) {
        int byte = 0;
        for (int j = 0; j < 8 / w; ++j) byte |= ((ix[t + j * per] >> shift) & ((1 << w) - 1)) << (j * w);
        *out++ = (uint8_t)byte;
      }
      shift += w;
    }
  }
}

void check_packer_examples() {
  // 4 bits: byte t = index t (low nibble) | index t + 16 (high nibble)
  int idx[32];
  for (int i = 0; i < 32; ++i) idx[i] = (i * 7 + 3) % 16;
  uint8_t out[16];
  pack_row(idx, 32, 4, out);
  for (int t = 0; t < 16; ++t) CHECK(out[t] == (idx[t] | idx[t + 16] << 4), "4-bit byte %d", t);
  // 2 bits: byte t holds t, t+8, t+16, t+24
  for (int i = 0; i < 32; ++i) idx[i] = (i * 5 + 1) % 4;
  uint8_t o2[8];
  pack_row(idx, 32, 2, o2);
  for (int t = 0; t < 8; ++t)
    CHECK(o2[t] == (idx[t] | idx[t + 8] << 2 | idx[t + 16] << 4 | idx[t + 24] << 6), "2-bit byte %d", t);
  // 3 bits: 12 bytes, the 2-bit piece of the low bits, then the 1-bit piece of bit 2
  for (int i = 0; i < 32; ++i) idx[i] = (i * 3 + 2) % 8;
  uint8_t o3[12];
  pack_row(idx, 32, 3, o3);
  for (int t = 0; t < 8; ++t) {
    int byte = 0;
    for (int j = 0; j < 4; ++j) byte |= (idx[t + 8 * j] & 3) << (2 * j);
    CHECK(o3[t] == byte, "3-bit low piece byte %d", t);
  }
  for (int t = 0; t < 4; ++t) {
    int byte = 0;
    for (int j = 0; j < 8; ++j) byte |= ((idx[t + 4 * j] >> 2) & 1) << j;
    CHECK(o3[8 + t] == byte, "3-bit high piece byte %d", t);
  }
  CHECK(row_bytes(33, 3) == 24 && row_bytes(32, 3) == 12 && row_bytes(1, 8) == 32, "row_bytes");
  // the scalar decoder of palettized_math.h inverts the packer for every width
  std::mt19937_64 g(7);
  for (int bits = 1; bits <= 8; ++bits) {
    for (int i = 0; i < 32; ++i) idx[i] = (int)(g() % (1u << bits));
    uint8_t buf[32];
    pack_row(idx, 32, bits, buf);
    uint8_t dec[32];
    decode_block(buf, bits, dec);
    for (int i = 0; i < 32; ++i) {
      CHECK(dec[i] == idx[i], "decode_block bits %d index %d", bits, i);
      CHECK(block_index(buf, bits, i) == idx[i], "block_index bits %d index %d", bits, i);
    }
  }
}

void check_conversions() {
  std::mt19937_64 g(11);
  std::vector<float> vals = {0.f, -0.f, 1.f, -1.f, 65504.f, 65519.f, 65520.f, 65536.f, 1e-8f,
                             5.96e-8f, 2.98e-8f, 2.99e-8f, 6.1e-5f, 6.103515625e-05f, 3.4e38f,
                             INFINITY, -INFINITY, 1.00048828125f, 1.00146484375f};
  for (int i = 0; i < 100000; ++i) {
    uint32_t u = (uint32_t)g();
    float f;
    std::memcpy(&f, &u, 4);
    if (!std::isnan(f)) vals.push_back(f);
  }
  for (float f : vals) {
    CHECK(float_to_half_bits(f) == float_to_half(f), "fp16 of %.9g: %04x vs %04x", f,
          float_to_half_bits(f), float_to_half(f));
    CHECK(float_to_bf16_bits(f) == float_to_bf16(f), "bf16 of %.9g: %04x vs %04x", f,
          float_to_bf16_bits(f), float_to_bf16(f));
  }
  CHECK(std::isnan(half_to_float(float_to_half_bits(NAN))), "fp16 nan");
  CHECK(std::isnan(bf16_to_float(float_to_bf16_bits(NAN))), "bf16 nan");
}

// ---- the CUDA kernel's index logic (palettized_cuda.cu), emulated ------------------------------
template <int BITS>
void check_word_index_bits(std::mt19937_64& g) {
  for (int trial = 0; trial < 50; ++trial) {
    uint8_t blk[32];
    for (int t = 0; t < 4 * BITS; ++t) blk[t] = (uint8_t)g();
    uint32_t w[BITS];
    for (int j = 0; j < BITS; ++j)  // little-endian words, as the GPU loads them
      w[j] = blk[4 * j] | (uint32_t)blk[4 * j + 1] << 8 | (uint32_t)blk[4 * j + 2] << 16 | (uint32_t)blk[4 * j + 3] << 24;
    for (int i = 0; i < 32; ++i)
      CHECK(word_index<BITS>(w, i) == block_index(blk, BITS, i), "word_index<%d>(%d)", BITS, i);
  }
}

void check_cuda_index_logic() {
  std::mt19937_64 g(5);
  check_word_index_bits<1>(g);
  check_word_index_bits<2>(g);
  check_word_index_bits<3>(g);
  check_word_index_bits<4>(g);
  check_word_index_bits<5>(g);
  check_word_index_bits<6>(g);
  check_word_index_bits<7>(g);
  check_word_index_bits<8>(g);
  // GroupCursor: the group of consecutive columns from any start, for any group size
  for (int64_t gs : {1, 2, 7, 32, 50, 128, 1000})
    for (int64_t c0 : {0, 1, 31, 32, 49, 50, 127, 4096}) {
      GroupCursor cur(c0, gs);
      for (int64_t c = c0; c < c0 + 300; ++c) CHECK(cur.at(c) == c / gs, "GroupCursor g %lld col %lld", (long long)gs, (long long)c);
    }
  // staged x: lane l reads its block's column i at l * kCudaXStride + i == x_slot(32 l + i); all
  // slots distinct and inside the array; a lane's float4 reads are 16-byte aligned and the 8
  // lanes of a quarter warp hit 8 distinct groups of 4 banks
  std::vector<int> seen(32 * kCudaXStride, 0);
  for (int col = 0; col < kCudaChunk; ++col) {
    const int sl = x_slot(col);
    CHECK(sl >= 0 && sl < 32 * kCudaXStride && ++seen[sl] == 1, "x_slot(%d) = %d", col, sl);
    CHECK(sl == (col / 32) * kCudaXStride + col % 32, "lane read slot of column %d", col);
  }
  for (int q = 0; q < 8; ++q)
    for (int quarter = 0; quarter < 4; ++quarter) {
      std::vector<int> banks;
      for (int l = 8 * quarter; l < 8 * quarter + 8; ++l) {
        const int sl = x_slot(32 * l + 4 * q);
        CHECK(sl % 4 == 0, "float4 slot %d unaligned", sl);
        banks.push_back((sl % 32) / 4);
      }
      std::sort(banks.begin(), banks.end());
      CHECK(std::unique(banks.begin(), banks.end()) == banks.end(), "bank conflict q %d quarter %d", q, quarter);
    }
  // the work split: grid (ceil(rows / (4 RW)), min(ceil(M / MT), gy)), the batch looped over
  // gridDim.y, the columns in chunks of one block per lane: every (x row, output row, block)
  // exactly once, and the table slots of a thread block distinct with lane l in bank l
  for (int mt : {1, 2, 4, 8}) {
    const int rw = rows_per_warp(mt);
    for (int64_t rows : {1, 3, 16, 17, 100})
      for (int64_t M : {1, 2, 7, 8, 9, 33})
        for (int64_t in : {1, 32, 1000, 1024, 1025, 3000})
          for (int64_t gy_cap : {65535, 2}) {
            const int64_t nb = (in + 31) / 32;
            const int64_t gx = (rows + 4 * rw - 1) / (4 * rw);
            const int64_t gy = std::min<int64_t>((M + mt - 1) / mt, gy_cap);
            std::vector<int> cover((size_t)(M * rows * nb), 0);
            for (int64_t bx = 0; bx < gx; ++bx)
              for (int64_t by = 0; by < gy; ++by)
                for (int w = 0; w < kCudaWarps; ++w)
                  for (int64_t m0 = by * mt; m0 < M; m0 += gy * mt)
                    for (int64_t c0 = 0; c0 < in; c0 += kCudaChunk)
                      for (int lane = 0; lane < 32; ++lane) {
                        const int64_t b = c0 / 32 + lane;
                        if (b >= nb) continue;
                        for (int rr = 0; rr < rw; ++rr) {
                          const int64_t r = warp_row0(bx, w, rw) + rr;
                          if (r >= rows) continue;  // computed on a repeated row, never stored
                          for (int m = 0; m < mt && m0 + m < M; ++m) ++cover[(size_t)(((m0 + m) * rows + r) * nb + b)];
                        }
                      }
            bool once = true;
            for (int v : cover) once = once && v == 1;
            CHECK(once, "work split MT %d rows %lld M %lld in %lld gy %lld", mt, (long long)rows,
                  (long long)M, (long long)in, (long long)gy);
          }
    for (int nt : {2, 4, 8, 16}) {  // tab[((warp * RW + rr) * NT + e) * 32 + lane]
      std::vector<int> used((size_t)(kCudaWarps * rw * nt * 32), 0);
      bool ok = true;
      for (int w = 0; w < kCudaWarps; ++w)
        for (int rr = 0; rr < rw; ++rr)
          for (int e = 0; e < nt; ++e)
            for (int lane = 0; lane < 32; ++lane) {
              const int sl = ((w * rw + rr) * nt + e) * 32 + lane;
              ok = ok && sl % 32 == lane && ++used[(size_t)sl] == 1;
            }
      CHECK(ok, "table slots MT %d NT %d", mt, nt);
    }
  }
}

// ---- one problem ---------------------------------------------------------------------------
struct Case {
  int bits = 4, k = 16;
  int gran = 0;         // 0 per tensor, 1 per channel, 2 per group
  int64_t group = 0;
  int64_t rows = 5, in = 32, M = 1;
  DType cbt = DType::f32, xt = DType::f32, bt = DType::f32;
  bool bias = false;
  bool inf_pad = false;  // codebook entry 0 is +inf and no real index is 0
  int64_t x_pad = 0;     // extra elements between x rows
  int threads = 1;
};

std::string describe(const Case& c, Isa isa) {
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "isa %s bits %d k %d gran %d g %lld rows %lld in %lld M %lld cb %d x %d bias %d "
                "inf_pad %d threads %d",
                isa_name(isa), c.bits, c.k, c.gran, (long long)c.group, (long long)c.rows,
                (long long)c.in, (long long)c.M, (int)c.cbt, (int)c.xt, c.bias ? (int)c.bt : -1,
                (int)c.inf_pad, c.threads);
  return buf;
}

float from_bits(const void* p, DType t, int64_t i) {
  if (t == DType::f32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return t == DType::f16 ? half_to_float(h) : bf16_to_float(h);
}
void to_bits(void* p, DType t, int64_t i, float v) {
  if (t == DType::f32) static_cast<float*>(p)[i] = v;
  else if (t == DType::f16) static_cast<uint16_t*>(p)[i] = float_to_half(v);
  else static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
}
int esize(DType t) { return t == DType::f32 ? 4 : 2; }

void run_case(const Case& c, Isa isa, std::mt19937_64& g) {
  const std::string what = describe(c, isa);
  Params p;
  p.rows = c.rows;
  p.in = c.in;
  p.bits = c.bits;
  p.k = c.k;
  p.group_size = c.gran == 2 ? c.group : 0;
  const int64_t G = groups_per_row(c.in, p.group_size);
  p.cb_rows = c.gran == 0 ? 1 : c.gran == 1 ? c.rows : c.rows * G;
  p.cb_dtype = c.cbt;

  std::uniform_real_distribution<float> U(-1.f, 1.f);
  // indices (never 0 with inf_pad), codebook
  const int lo_idx = c.inf_pad ? 1 : 0;
  std::vector<int> idx((size_t)(c.rows * c.in));
  for (int& v : idx) v = lo_idx + (int)(g() % (uint64_t)(c.k - lo_idx));
  const int64_t rb = row_bytes(c.in, c.bits);
  Guarded packed((size_t)std::max<int64_t>(1, c.rows * rb));
  for (int64_t r = 0; r < c.rows; ++r) pack_row(idx.data() + r * c.in, c.in, c.bits, packed.data + r * rb);
  Guarded cb((size_t)(p.cb_rows * c.k * esize(c.cbt)));
  std::vector<double> cbv((size_t)(p.cb_rows * c.k));
  for (int64_t i = 0; i < p.cb_rows * c.k; ++i) {
    const float v = (c.inf_pad && i % c.k == 0) ? INFINITY : 2.f * U(g);
    to_bits(cb.data, c.cbt, i, v);
    cbv[i] = from_bits(cb.data, c.cbt, i);
  }
  auto weight = [&](int64_t r, int64_t col) {
    const int64_t row = c.gran == 0 ? 0 : c.gran == 1 ? r : r * G + col / c.group;
    return cbv[(size_t)(row * c.k + idx[(size_t)(r * c.in + col)])];
  };

  // ---- linear
  const int64_t xs = c.in + c.x_pad;
  const int64_t xn = c.M > 0 ? (c.M - 1) * xs + c.in : 0;
  Guarded x((size_t)std::max<int64_t>(1, xn * esize(c.xt)));
  std::vector<double> xv((size_t)std::max<int64_t>(1, xn));
  for (int64_t i = 0; i < xn; ++i) {
    to_bits(x.data, c.xt, i, U(g));
    xv[i] = from_bits(x.data, c.xt, i);
  }
  Guarded bias((size_t)(c.rows * esize(c.bt)));
  for (int64_t r = 0; r < c.rows; ++r) to_bits(bias.data, c.bt, r, U(g));
  Guarded y((size_t)std::max<int64_t>(1, c.M * c.rows * esize(c.xt)));
  LinearArgs a;
  a.x = x.data;
  a.x_row_stride = xs;
  a.x_dtype = c.xt;
  a.M = c.M;
  a.packed = packed.data;
  a.codebook = cb.data;
  a.bias = c.bias ? bias.data : nullptr;
  a.bias_dtype = c.bt;
  a.y = y.data;
  linear_with(isa, p, a, c.threads);
  const double eps_out = c.xt == DType::f32 ? 0.0 : c.xt == DType::f16 ? 1.0 / 2048 : 1.0 / 256;
  int bad = 0;
  for (int64_t m = 0; m < c.M && bad < 3; ++m)
    for (int64_t r = 0; r < c.rows && bad < 3; ++r) {
      double s = 0, sa = 0;
      for (int64_t col = 0; col < c.in; ++col) {
        const double t = weight(r, col) * xv[(size_t)(m * xs + col)];
        s += t;
        sa += std::fabs(t);
      }
      if (c.bias) {
        const double b = from_bits(bias.data, c.bt, r);
        s += b;
        sa += std::fabs(b);
      }
      const double got = from_bits(y.data, c.xt, m * c.rows + r);
      // fp32 sums of at most in / 16 + 32 terms per lane (the row kernels), or of 256 terms
      // and then in / 256 partial sums (the AVX-512 large-batch kernel, palettized_outer.inc),
      // then the output rounding
      const int64_t terms = std::max<int64_t>(c.in / 16 + 40, std::min<int64_t>(c.in, 256) + c.in / 256 + 8);
      // (+ half the spacing of fp16's subnormals, 2^-25: an fp16 output below 6.1e-5 rounds
      // to a multiple of 2^-24)
      const double tol = (double)terms * 1.2e-7 * sa + eps_out * std::fabs(s) +
                         (c.xt == DType::f16 ? 0x1p-25 : 0.0) + 1e-30;
      const bool ok = std::isfinite(got) && std::fabs(got - s) <= tol;
      if (!ok) ++bad;
      CHECK(ok, "linear %s: y[%lld, %lld] = %.9g, want %.9g (tol %.3g)", what.c_str(),
            (long long)m, (long long)r, got, s, tol);
    }

  // ---- decode: all rows by row_begin, and a shuffled subset (with repeats) by row_ids
  for (int mode = 0; mode < 2; ++mode) {
    const DType ot = mode == 0 ? c.xt : (c.xt == DType::f32 ? DType::bf16 : DType::f32);
    std::vector<int64_t> ids;
    int64_t begin = 0, n = c.rows;
    if (mode == 1) {
      n = 1 + (int64_t)(g() % (uint64_t)(2 * c.rows));
      for (int64_t i = 0; i < n; ++i) ids.push_back((int64_t)(g() % (uint64_t)c.rows));
    } else if (c.rows > 2) {
      begin = 1;
      n = c.rows - 2;
    }
    Guarded idsb((size_t)std::max<int64_t>(1, n * 8));
    if (mode == 1) std::memcpy(idsb.data, ids.data(), (size_t)n * 8);
    Guarded out((size_t)std::max<int64_t>(1, n * c.in * esize(ot)));
    DecodeArgs d;
    d.packed = packed.data;
    d.codebook = cb.data;
    d.row_ids = mode == 1 ? idsb.as<int64_t>() : nullptr;
    d.row_begin = begin;
    d.n = n;
    d.out = out.data;
    d.out_dtype = ot;
    decode_with(isa, p, d, c.threads);
    int dbad = 0;
    for (int64_t i = 0; i < n && dbad < 3; ++i) {
      const int64_t r = mode == 1 ? ids[(size_t)i] : begin + i;
      for (int64_t col = 0; col < c.in && dbad < 3; ++col) {
        const float w = (float)weight(r, col);
        const int64_t o = i * c.in + col;
        bool ok;
        if (ot == DType::f32) ok = out.as<float>()[o] == w;
        else if (ot == DType::f16) ok = out.as<uint16_t>()[o] == float_to_half(w);
        else ok = out.as<uint16_t>()[o] == float_to_bf16(w);
        if (!ok) ++dbad;
        CHECK(ok, "decode %s out %d: [%lld, %lld] = %.9g, want %.9g", what.c_str(), (int)ot,
              (long long)i, (long long)col, from_bits(out.data, ot, o), w);
      }
    }
  }
}

void check_bad_arguments() {
  Params p;
  p.rows = 4;
  p.in = 64;
  p.bits = 4;
  p.k = 16;
  p.cb_rows = 4;
  uint8_t packed[4 * 32] = {};
  float cb[64] = {}, x[64] = {}, y[4] = {};
  LinearArgs a;
  a.x = x;
  a.x_row_stride = 64;
  a.M = 1;
  a.packed = packed;
  a.codebook = cb;
  a.y = y;
  auto throws = [&](const Params& q, const LinearArgs& b, const char* name) {
    try {
      linear_cpu(q, b, 1);
    } catch (const std::invalid_argument& e) {
      CHECK(std::string(e.what()).find(name) != std::string::npos, "message '%s' names %s", e.what(), name);
      return;
    }
    CHECK(false, "no std::invalid_argument for %s", name);
  };
  Params q = p;
  q.bits = 9;
  throws(q, a, "bits");
  q = p;
  q.k = 17;
  throws(q, a, "k must");
  q = p;
  q.cb_rows = 3;
  throws(q, a, "cb_rows");
  q = p;
  q.group_size = 32;  // needs 4 * 2 codebook rows
  throws(q, a, "cb_rows");
  q = p;
  q.cb_dtype = DType::bf16;
  throws(q, a, "cb_dtype");
  LinearArgs b = a;
  b.x_dtype = DType::f64;
  throws(p, b, "x_dtype");
  b = a;
  b.x = nullptr;
  throws(p, b, "x");
  b = a;
  b.y = nullptr;
  throws(p, b, "y");
  DecodeArgs d;
  d.packed = packed;
  d.codebook = cb;
  float out[2 * 64];
  d.out = out;
  d.n = 2;
  int64_t ids[2] = {1, 4};
  d.row_ids = ids;
  try {
    decode_cpu(p, d, 1);
    CHECK(false, "row id 4 of 4 rows accepted");
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()).find("row_ids[1]") != std::string::npos, "message '%s'", e.what());
  }
  d.row_ids = nullptr;
  d.row_begin = 3;
  try {
    decode_cpu(p, d, 1);
    CHECK(false, "rows 3..4 of 4 accepted");
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()).find("row_begin") != std::string::npos, "message '%s'", e.what());
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  check_packer_examples();
  check_conversions();
  check_bad_arguments();
  check_cuda_index_logic();

  std::vector<Isa> isas = {Isa::portable};
  if ((int)detect_isa() >= (int)Isa::avx2) isas.push_back(Isa::avx2);
  if ((int)detect_isa() >= (int)Isa::avx512) isas.push_back(Isa::avx512);
  std::printf("instruction sets: this CPU %s; testing", isa_name(detect_isa()));
  for (Isa i : isas) std::printf(" %s", isa_name(i));
  std::printf("\n");

  const int64_t ins[] = {0, 1, 17, 31, 32, 33, 100, 4101};
  // (from 24 rows on, the AVX-512 path runs the large-batch kernel)
  const int64_t Ms[] = {1, 2, 3, 8, 16, 17, 32, 45};
  const DType xts[] = {DType::f32, DType::f16, DType::bf16};
  const int64_t groups[] = {32, 128, 7, 50};
  std::mt19937_64 g(2024);
  int ncase = 0;
  for (Isa isa : isas) {
    for (int bits = 1; bits <= 8; ++bits) {
      for (int gran = 0; gran < 6; ++gran) {  // 0 tensor, 1 channel, 2..5 the group sizes
        for (int64_t in : ins) {
          if (quick && in == 4101 && bits % 2) continue;
          Case c;
          c.bits = bits;
          // k: all of 2^bits, or fewer entries (the top indices never used) every third case
          c.k = (ncase % 3 == 2 && bits > 1) ? (1 << bits) - 1 - (int)(g() % (uint64_t)((1 << (bits - 1)))) : 1 << bits;
          c.gran = gran < 2 ? gran : 2;
          c.group = gran < 2 ? 0 : groups[gran - 2];
          c.in = in;
          c.M = Ms[ncase % 8];
          c.rows = in > 1000 ? 3 + ncase % 4 : 1 + ncase % 11;
          c.xt = xts[(ncase / 6) % 3];
          c.cbt = (ncase / 2) % 2 ? DType::f16 : DType::f32;
          c.bias = ncase % 5 != 0;
          c.bt = xts[(ncase / 5) % 3];
          c.x_pad = ncase % 4 == 1 ? 3 : 0;
          c.inf_pad = in % 32 != 0 && c.k > 1 && ncase % 2 == 0;
          c.threads = ncase % 3 == 1 ? 3 : 1;
          run_case(c, isa, g);
          ++ncase;
        }
      }
    }
    // every batch size with every activation dtype on one shape per granularity
    for (int64_t M : {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 23, 24, 31, 32, 33, 64, 97})
      for (DType xt : xts)
        for (int gran = 0; gran < 3; ++gran) {
          Case c;
          c.bits = 1 + (int)(M % 8);
          c.k = 1 << c.bits;
          c.gran = gran;
          c.group = 64;
          c.in = 96 + 7;
          c.rows = M % 2 ? 13 : 37;  // (panels of 12 rows in the large-batch kernel)
          c.M = M;
          c.xt = xt;
          c.cbt = M % 2 ? DType::f16 : DType::f32;
          c.bias = true;
          c.bt = xt;
          c.x_pad = 5;
          c.inf_pad = true;
          c.threads = 2;
          run_case(c, isa, g);
          ++ncase;
        }
  }
  // the large-batch kernel's chunks of x rows (about 1 MiB of X^T: 32 rows at 4101 inputs)
  // and its blocks of 256 inputs, over several panels and threads; in_features 0 (the bias)
  for (Isa isa : isas)
    for (int bits : {2, 3, 4, 8})
      for (int gran = 0; gran < 3; ++gran)
        for (int64_t in : {(int64_t)4101, (int64_t)0}) {
        Case c;
        c.bits = bits;
        c.k = 1 << bits;
        c.gran = gran;
        c.group = 128;
        c.in = in;
        c.rows = 25;
        c.M = 70;
        c.xt = xts[bits % 3];
        c.cbt = gran == 1 ? DType::f16 : DType::f32;
        c.bias = gran != 0 || in == 0;
        c.bt = DType::f32;
        c.x_pad = 1;
        c.threads = 2;
        run_case(c, isa, g);
        ++ncase;
      }
  std::printf("cases %d, checks %d, failures %d\n", ncase, checks, failures);
  return failures == 0 ? 0 : 1;
}
