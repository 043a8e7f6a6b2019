// Argument checks and geometry shared by the CPU and CUDA backends of ssl_lightning::compact_conv2d.
// Index tensors are read on the host (the CUDA backend passes host copies).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace ssl_lightning {

struct ConvGeometry {
  int64_t n, c, h, w, groups, cg, out_channels, og, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
};

inline void check_index_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong && t.device().is_cpu(), "compact_conv2d: ", name,
              " must be a 1-D int64 CPU tensor, got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

// Validates every argument (clear TORCH_CHECK messages) and returns the convolution geometry.
inline ConvGeometry check_compact_conv2d_args(const at::Tensor& input, const at::Tensor& weight,
                                              const at::Tensor& row_idx, const at::Tensor& row_ptr,
                                              const at::Tensor& col_idx, const at::Tensor& col_ptr,
                                              const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, int64_t groups, int64_t out_channels) {
  TORCH_CHECK(input.dim() == 4, "compact_conv2d: input must be N x C x H x W, got ", input.dim(), " dims");
  TORCH_CHECK(input.is_floating_point(), "compact_conv2d: input must be floating point, got ", input.scalar_type());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "compact_conv2d: weight dtype ", weight.scalar_type(),
              " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), "compact_conv2d: weight is on ", weight.device(), " but input on ",
              input.device());
  TORCH_CHECK(weight.dim() == 1, "compact_conv2d: weight must be the packed 1-D compact weight, got ", weight.dim(),
              " dims");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "compact_conv2d: kernel_size, stride, padding and dilation must have 2 values each");
  TORCH_CHECK(groups >= 1 && input.size(1) % groups == 0 && out_channels % groups == 0,
              "compact_conv2d: groups (", groups, ") must divide the input channels (", input.size(1),
              ") and out_channels (", out_channels, ")");
  check_index_tensor(row_idx, "row_idx");
  check_index_tensor(row_ptr, "row_ptr");
  check_index_tensor(col_idx, "col_idx");
  check_index_tensor(col_ptr, "col_ptr");
  TORCH_CHECK(row_ptr.numel() == groups + 1 && col_ptr.numel() == groups + 1,
              "compact_conv2d: row_ptr and col_ptr need groups + 1 = ", groups + 1, " entries, got ", row_ptr.numel(),
              " and ", col_ptr.numel());
  ConvGeometry G{};
  G.n = input.size(0), G.c = input.size(1), G.h = input.size(2), G.w = input.size(3);
  G.groups = groups, G.cg = G.c / groups, G.out_channels = out_channels, G.og = out_channels / groups;
  G.kh = kernel_size[0], G.kw = kernel_size[1], G.sh = stride[0], G.sw = stride[1];
  G.ph = padding[0], G.pw = padding[1], G.dh = dilation[0], G.dw = dilation[1];
  TORCH_CHECK(G.kh > 0 && G.kw > 0 && G.sh > 0 && G.sw > 0 && G.dh > 0 && G.dw > 0 && G.ph >= 0 && G.pw >= 0,
              "compact_conv2d: kernel_size, stride and dilation must be positive and padding non-negative");
  G.ho = (G.h + 2 * G.ph - G.dh * (G.kh - 1) - 1) / G.sh + 1;
  G.wo = (G.w + 2 * G.pw - G.dw * (G.kw - 1) - 1) / G.sw + 1;
  TORCH_CHECK(G.ho > 0 && G.wo > 0, "compact_conv2d: input ", input.sizes(), " is smaller than the dilated kernel");

  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  const int64_t* cp = col_ptr.const_data_ptr<int64_t>();
  const int64_t* ri = row_idx.const_data_ptr<int64_t>();
  const int64_t* ci = col_idx.const_data_ptr<int64_t>();
  const int64_t k_total = G.cg * G.kh * G.kw;
  int64_t w_expected = 0;
  TORCH_CHECK(rp[0] == 0 && cp[0] == 0, "compact_conv2d: row_ptr and col_ptr must start at 0");
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(rp[g + 1] >= rp[g] && cp[g + 1] >= cp[g], "compact_conv2d: row_ptr and col_ptr must be non-decreasing");
    w_expected += (rp[g + 1] - rp[g]) * (cp[g + 1] - cp[g]);
  }
  TORCH_CHECK(rp[groups] == row_idx.numel() && cp[groups] == col_idx.numel(),
              "compact_conv2d: row_ptr/col_ptr end (", rp[groups], ", ", cp[groups],
              ") must equal the number of kept rows/columns (", row_idx.numel(), ", ", col_idx.numel(), ")");
  TORCH_CHECK(weight.numel() == w_expected, "compact_conv2d: weight has ", weight.numel(),
              " elements but the index lists need sum_g rows_g * cols_g = ", w_expected);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t r = rp[g]; r < rp[g + 1]; ++r)
      TORCH_CHECK(ri[r] >= g * G.og && ri[r] < (g + 1) * G.og, "compact_conv2d: row index ", ri[r], " of group ", g,
                  " is outside its filters [", g * G.og, ", ", (g + 1) * G.og, ")");
    for (int64_t k = cp[g]; k < cp[g + 1]; ++k)
      TORCH_CHECK(ci[k] >= 0 && ci[k] < k_total, "compact_conv2d: column index ", ci[k],
                  " is outside C/groups*KH*KW = ", k_total);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == out_channels && bias->scalar_type() == input.scalar_type() &&
                    bias->device() == input.device(),
                "compact_conv2d: bias must be 1-D with out_channels = ", out_channels, " entries of dtype ",
                input.scalar_type(), " on the input's device");
  }
  return G;
}

}  // namespace ssl_lightning
