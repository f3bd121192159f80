// Typed element access of host buffers: values, input checks and sort keys per dtype.
// Elem<D>: an element's value, finiteness and sign (16-bit types checked by their bits) and its
// order-preserving sort key (-0 folded into +0) and back; dispatch_dtype: from a dtype code to
// a compile-time one.
#pragma once
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/hd.h"

namespace popcomp {

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
  static double value(Key k) { return key_to_double(k); }
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


// f(std::integral_constant<DType, t>{}) for a dtype code t; an unknown code throws
// std::invalid_argument naming fn.
template <typename F>
void dispatch_dtype(DType t, const char* fn, F&& f) {
  switch (t) {
    case DType::f64: f(std::integral_constant<DType, DType::f64>{}); break;
    case DType::f32: f(std::integral_constant<DType, DType::f32>{}); break;
    case DType::f16: f(std::integral_constant<DType, DType::f16>{}); break;
    case DType::bf16: f(std::integral_constant<DType, DType::bf16>{}); break;
    default: throw std::invalid_argument(std::string(fn) + ": unsupported dtype code");
  }
}

}  // namespace popcomp
