// Shared definitions for the torch-free compiled core: host/device qualifiers, dtype codes,
// 16-bit float conversions and order-preserving integer keys for floats.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PC_HD __host__ __device__ __forceinline__
#else
#define PC_HD inline
#endif

namespace popcomp {

// Element type codes shared with python/popcomp/_backend.py (DTYPE_CODES).
enum class DType : int { f64 = 0, f32 = 1, f16 = 2, bf16 = 3 };

PC_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, 4);
  return f;
#endif
}

PC_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
#endif
}

// IEEE binary16 -> float (exact, handles subnormals, inf and nan).
PC_HD float half_bits_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: value = man * 2^-24
      float f = (float)man * 5.9604644775390625e-08f;
      return sign ? -f : f;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  return bits_to_float(bits);
}

// bfloat16 -> float (exact: bf16 is the upper half of a float).
PC_HD float bf16_bits_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

// Load element i of a buffer of the given dtype as double.
PC_HD double load_as_double(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::f64: return static_cast<const double*>(p)[i];
    case DType::f32: return (double)static_cast<const float*>(p)[i];
    case DType::f16: return (double)half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return (double)bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}

// An fp64 / fp32 / fp16 / bf16 element as float.
PC_HD float load_as_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::f16: return half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::bf16: return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return (float)static_cast<const double*>(p)[i];
  }
}

// ---- float -> 16-bit floats (round to nearest even; inf and nan kept, nan made quiet) -------
PC_HD uint16_t float_to_half_bits(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= 0x47800000u) {  // >= 65536 (rounds to inf), inf or nan
    o = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < 0x38800000u) {  // below 2^-14: fp16 subnormal or zero
    // adding 0.5 aligns the 10 fraction bits at the bottom of the float; the float addition
    // rounds to nearest even
    const float g = bits_to_float(u) + 0.5f;
    o = float_to_bits(g) - 0x3f000000u;
  } else {
    const uint32_t odd = (u >> 13) & 1u;
    u += 0xc8000fffu + odd;  // exponent rebias (-112 << 23) and the rounding bias
    o = u >> 13;
  }
  return (uint16_t)(o | (sign >> 16));
}

PC_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Store v as element i of an fp32 / fp16 / bf16 buffer.
PC_HD void store_as(void* p, DType t, int64_t i, float v) {
  if (t == DType::f32) static_cast<float*>(p)[i] = v;
  else if (t == DType::f16) static_cast<uint16_t*>(p)[i] = float_to_half_bits(v);
  else static_cast<uint16_t*>(p)[i] = float_to_bf16_bits(v);
}

// Order-preserving maps float -> unsigned key (for radix sorting; -0.0 sorts before +0.0).
PC_HD uint32_t float_key(float f) {
  uint32_t b = float_to_bits(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
PC_HD float key_to_float(uint32_t k) {
  return bits_to_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
PC_HD uint64_t double_key(double d) {
  uint64_t b;
#if defined(__CUDA_ARCH__)
  b = (uint64_t)__double_as_longlong(d);
#else
  std::memcpy(&b, &d, 8);
#endif
  return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}
PC_HD double key_to_double(uint64_t k) {
  const uint64_t b = (k & 0x8000000000000000ull) ? (k & 0x7fffffffffffffffull) : ~k;
#if defined(__CUDA_ARCH__)
  return __longlong_as_double((long long)b);
#else
  double d;
  std::memcpy(&d, &b, 8);
  return d;
#endif
}
// 16-bit patterns (fp16 / bf16) -> order-preserving 16-bit key.
PC_HD uint32_t half_key(uint16_t h) {
  return (h & 0x8000u) ? (uint32_t)(~h & 0xffffu) : (uint32_t)(h | 0x8000u);
}
PC_HD uint16_t half_key_to_bits(uint32_t k) {
  return (k & 0x8000u) ? (uint16_t)(k & 0x7fffu) : (uint16_t)(~k & 0xffffu);
}

// splitmix64: small, seedable, identical on host and device.
struct SplitMix64 {
  uint64_t s;
  PC_HD explicit SplitMix64(uint64_t seed) : s(seed) {}
  PC_HD uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // uniform in [0, 1)
  PC_HD double uniform() { return (double)(next() >> 11) * (1.0 / 9007199254740992.0); }
};

}  // namespace popcomp
