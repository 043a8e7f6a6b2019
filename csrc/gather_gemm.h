// The x86-64 AVX-512 and AVX2 paths of ssl_lightning::compact_conv2d (fp32; bf16 / fp16 storage): the kept columns of the im2col matrix are
// gathered from the input straight into the GEMM's packed B panels (32 output positions x k kept columns),
// and a 12 x 32 register-blocked micro-kernel multiplies them with the kept rows (read in place), writing each
// output row at its final channel (full-width or compact layout). No lowered matrix exists beyond one
// panel per thread, and no BLAS call is made.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "compact_conv_args.h"

namespace ssl_lightning {

// The CPU features the AVX-512 kernel needs for dtype and this CPU lacks ("" when it runs here): fp32 needs
// AVX-512F; bf16 / fp16 storage (fp32 arithmetic) also AVX-512BW/VL. Builds for other architectures name that.
// dtype must be float32, bfloat16 or float16.
std::string gather_gemm_missing(at::ScalarType dtype);

// The same for the AVX2 kernel (fp32 only: AVX2 and FMA).
std::string gather_gemm_avx2_missing();

// True when the geometry fits the kernel's 32-bit gather offsets.
bool gather_gemm_fits(const ConvGeometry& G);

// T: float, c10::BFloat16 or c10::Half (fp32 accumulation, one rounding per output value; bf16 products by
// vdpbf16ps where the CPU has AVX512_BF16).
// out: N x out_rows x Ho x Wo (contiguous), written whole: with full-width output (out_rows ==
// out_channels) the rows of removed filters get their bias (or 0), filled inside the same tasks (one
// parallel region per call, each task filling its own panel). x contiguous.
// weight: the op's compact weight (contiguous, per group kept rows x kept columns; read in place for fp32,
// widened to fp32 once per call otherwise); bias: out_channels entries or nullptr.
template <typename T>
void gather_gemm_conv2d(const T* x, const T* weight, const int64_t* row_idx, const int64_t* row_ptr,
                        const int64_t* col_idx, const int64_t* col_ptr, const T* bias, const ConvGeometry& G, T* out,
                        int64_t out_rows, bool compact_output);

// The AVX2 / FMA kernel (gather_gemm_avx2.cpp): the same panels and output contract, fp32 only.
void gather_gemm_conv2d_avx2(const float* x, const float* weight, const int64_t* row_idx, const int64_t* row_ptr,
                             const int64_t* col_idx, const int64_t* col_ptr, const float* bias, const ConvGeometry& G,
                             float* out, int64_t out_rows, bool compact_output);

}  // namespace ssl_lightning
