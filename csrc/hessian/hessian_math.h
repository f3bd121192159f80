// Small helpers shared by the CPU loop and the CUDA kernel of the fused squared-gradient op.
#pragma once
#include <cstdint>

#include "common/hd.h"

namespace popcomp {
namespace hessian {

// Element i of a float32/float16/bfloat16 buffer, as float (no double round trip).
PC_HD float load_f(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::f16: return half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::bf16: return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return (float)static_cast<const double*>(p)[i];
  }
}

PC_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace hessian
}  // namespace popcomp
