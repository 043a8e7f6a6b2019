// fp16 for the CUDA emulation: IEEE binary16 (the bits of at::Half), conversions round to nearest even.
#pragma once
#include "cuda_emulation.h"

struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
