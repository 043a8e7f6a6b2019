// The fp32 x86-64 AVX-512 path of ssl_lightning::compact_conv2d: the kept columns of the im2col matrix are
// gathered from the input straight into the GEMM's packed B panels (32 output positions x k kept columns),
// and a 12 x 32 register-blocked micro-kernel multiplies them with the kept rows (read in place), writing each
// output row at its final channel (full-width or compact layout). No lowered matrix exists beyond one
// panel per thread, and no BLAS call is made.
#pragma once

#include <ATen/ATen.h>

#include "compact_conv_args.h"

namespace ssl_lightning {

// True when this build has the kernel (x86-64, GCC/Clang) and the CPU has AVX-512F.
bool gather_gemm_supported();

// True when the geometry fits the kernel's 32-bit gather offsets.
bool gather_gemm_fits(const ConvGeometry& G);

// out: N x out_rows x Ho x Wo (contiguous, float), written whole: with full-width output (out_rows ==
// out_channels) the rows of removed filters get their bias (or 0), filled inside the same tasks (one
// parallel region per call, each task filling its own panel). x contiguous.
// weight: the op's compact weight (contiguous float, per group kept rows x kept columns, read in place);
// bias: out_channels entries or nullptr.
void gather_gemm_conv2d_f32(const float* x, const float* weight, const int64_t* row_idx, const int64_t* row_ptr,
                            const int64_t* col_idx, const int64_t* col_ptr, const float* bias, const ConvGeometry& G,
                            float* out, int64_t out_rows, bool compact_output);

}  // namespace ssl_lightning
