// Argument checks of the raw (pointer + size + code) entry points, host only: each throws
// std::invalid_argument (a ValueError in Python) naming the function and the argument.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace popcomp {
namespace args {

inline void require(bool ok, const char* fn, const std::string& msg) {
  if (!ok) throw std::invalid_argument(std::string(fn) + ": " + msg);
}

// DType codes lo..hi of csrc/common/hd.h (0 float64, 1 float32, 2 float16, 3 bfloat16)
inline void check_dtype(const char* fn, const char* name, int code, int lo = 0, int hi = 3) {
  static const char* names[] = {"float64", "float32", "float16", "bfloat16"};
  if (code >= lo && code <= hi) return;
  std::string allowed;
  for (int c = lo; c <= hi; ++c)
    allowed += (c > lo ? ", " : "") + std::to_string(c) + " " + names[c];
  require(false, fn, std::string(name) + " must be a dtype code in {" + allowed + "}, got " +
                         std::to_string(code));
}

inline void check_code(const char* fn, const char* name, int code, int hi) {
  require(code >= 0 && code <= hi, fn,
          std::string(name) + " must be a code in 0.." + std::to_string(hi) + ", got " +
              std::to_string(code));
}

inline void check_size(const char* fn, const char* name, int64_t v) {
  require(v >= 0, fn, std::string(name) + " must be >= 0, got " + std::to_string(v));
}

inline void check_ptr(const char* fn, const char* name, const void* a) {
  require(a != nullptr, fn, std::string(name) + " is a null address");
}

inline void check_real(const char* fn, const char* name, double v) {
  require(std::isfinite(v) && v >= 0.0, fn,
          std::string(name) + " must be finite and >= 0, got " + std::to_string(v));
}

}  // namespace args
}  // namespace popcomp
