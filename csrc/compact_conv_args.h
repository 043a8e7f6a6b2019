// Argument checks and geometry shared by the CPU and CUDA backends of ssl_lightning::compact_conv2d.
// Index tensors are read on the host (the CUDA backend passes host copies).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace ssl_lightning {

struct ConvGeometry {
  int64_t n, c, h, w, groups, cg, out_channels, og, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
};

// The four index lists of a call, as contiguous int64 host tensors (views, expanded or strided lists are
// copied; contiguous CPU lists are used as they are). Kernels read them through raw pointers only.
struct IndexLists {
  at::Tensor row_idx, row_ptr, col_idx, col_ptr;
};

// What can be checked of an index list without reading a value: 1-D int64, on the CPU or the input's device.
inline void check_index_tensor(const at::Tensor& t, const char* name, const at::Device& input_device) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong, "compact_conv2d: ", name,
              " must be a 1-D int64 tensor, got ", t.sizes(), " ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu() || t.device() == input_device, "compact_conv2d: ", name, " is on ", t.device(),
              "; index lists must be on the CPU or on the input's device (", input_device, ")");
}

inline at::Tensor host_index(const at::Tensor& t, const char* name, const at::Device& input_device) {
  check_index_tensor(t, name, input_device);
  return t.device().is_cpu() ? t.contiguous() : t.to(at::kCPU).contiguous();
}

inline IndexLists host_index_lists(const at::Tensor& row_idx, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                   const at::Tensor& col_ptr, const at::Device& input_device) {
  return {host_index(row_idx, "row_idx", input_device), host_index(row_ptr, "row_ptr", input_device),
          host_index(col_idx, "col_idx", input_device), host_index(col_ptr, "col_ptr", input_device)};
}

// Largest kernel size, stride, padding or dilation accepted: keeps every geometry product below 2^63.
constexpr int64_t kMaxConvParam = int64_t(1) << 31;

// The checks that read no index value (dtypes, devices, dims, geometry); returns the convolution geometry.
inline ConvGeometry check_conv_geometry(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef kernel_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups, int64_t out_channels) {
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
  ConvGeometry G{};
  G.n = input.size(0), G.c = input.size(1), G.h = input.size(2), G.w = input.size(3);
  G.groups = groups, G.cg = G.c / groups, G.out_channels = out_channels, G.og = out_channels / groups;
  G.kh = kernel_size[0], G.kw = kernel_size[1], G.sh = stride[0], G.sw = stride[1];
  G.ph = padding[0], G.pw = padding[1], G.dh = dilation[0], G.dw = dilation[1];
  TORCH_CHECK(G.kh > 0 && G.kw > 0 && G.sh > 0 && G.sw > 0 && G.dh > 0 && G.dw > 0 && G.ph >= 0 && G.pw >= 0,
              "compact_conv2d: kernel_size, stride and dilation must be positive and padding non-negative, got "
              "kernel_size=", kernel_size, ", stride=", stride, ", padding=", padding, ", dilation=", dilation);
  TORCH_CHECK(G.kh <= kMaxConvParam && G.kw <= kMaxConvParam && G.sh <= kMaxConvParam && G.sw <= kMaxConvParam &&
                  G.dh <= kMaxConvParam && G.dw <= kMaxConvParam && G.ph <= kMaxConvParam && G.pw <= kMaxConvParam,
              "compact_conv2d: kernel_size, stride, padding and dilation must be at most 2^31, got kernel_size=",
              kernel_size, ", stride=", stride, ", padding=", padding, ", dilation=", dilation);
  // Extent of the padded input past the first window; negative: the dilated kernel does not fit (checked
  // before dividing, since C++ division truncates toward zero and would give one output row).
  const int64_t span_h = G.h + 2 * G.ph - G.dh * (G.kh - 1) - 1, span_w = G.w + 2 * G.pw - G.dw * (G.kw - 1) - 1;
  TORCH_CHECK(span_h >= 0 && span_w >= 0, "compact_conv2d: input ", input.sizes(), " (padded by ", padding,
              ") is smaller than the dilated kernel ", kernel_size, " (dilation ", dilation, ")");
  G.ho = span_h / G.sh + 1;
  G.wo = span_w / G.sw + 1;
  return G;
}

// The checks of the index lists' values (host copies) against the geometry; returns sum_g rows_g * cols_g, the
// packed weight's length.
inline int64_t check_index_values(const IndexLists& idx, const ConvGeometry& G) {
  const at::Tensor &row_idx = idx.row_idx, &row_ptr = idx.row_ptr, &col_idx = idx.col_idx, &col_ptr = idx.col_ptr;
  const int64_t groups = G.groups;
  TORCH_CHECK(row_ptr.numel() == groups + 1 && col_ptr.numel() == groups + 1,
              "compact_conv2d: row_ptr and col_ptr need groups + 1 = ", groups + 1, " entries, got ", row_ptr.numel(),
              " and ", col_ptr.numel());
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  const int64_t* cp = col_ptr.const_data_ptr<int64_t>();
  const int64_t* ri = row_idx.const_data_ptr<int64_t>();
  const int64_t* ci = col_idx.const_data_ptr<int64_t>();
  const int64_t k_total = G.cg * G.kh * G.kw;
  int64_t w_expected = 0;
  TORCH_CHECK(rp[0] == 0 && cp[0] == 0, "compact_conv2d: row_ptr and col_ptr must start at 0");
  for (int64_t g = 0; g < groups; ++g)
    TORCH_CHECK(rp[g + 1] >= rp[g] && cp[g + 1] >= cp[g], "compact_conv2d: row_ptr and col_ptr must be non-decreasing");
  TORCH_CHECK(rp[groups] == row_idx.numel() && cp[groups] == col_idx.numel(),
              "compact_conv2d: row_ptr/col_ptr end (", rp[groups], ", ", cp[groups],
              ") must equal the number of kept rows/columns (", row_idx.numel(), ", ", col_idx.numel(), ")");
  for (int64_t g = 0; g < groups; ++g) w_expected += (rp[g + 1] - rp[g]) * (cp[g + 1] - cp[g]);  // bounded now
  // A row (output channel) may be kept once; a column once per group: a repeat would write one output
  // channel twice or add one input tap twice. Sorted lists (what CompactConv2d builds) are checked by one
  // comparison per entry on the hot path; only unsorted ones need the seen-flags.
  bool sorted = true;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t r = rp[g]; r < rp[g + 1]; ++r) {
      TORCH_CHECK(ri[r] >= g * G.og && ri[r] < (g + 1) * G.og, "compact_conv2d: row index ", ri[r], " of group ", g,
                  " is outside its filters [", g * G.og, ", ", (g + 1) * G.og, ")");
      sorted = sorted && (r == rp[g] || ri[r] > ri[r - 1]);
    }
    for (int64_t k = cp[g]; k < cp[g + 1]; ++k) {
      TORCH_CHECK(ci[k] >= 0 && ci[k] < k_total, "compact_conv2d: column index ", ci[k],
                  " is outside C/groups*KH*KW = ", k_total);
      sorted = sorted && (k == cp[g] || ci[k] > ci[k - 1]);
    }
  }
  if (!sorted) {
    std::vector<char> row_seen(G.og, 0), col_seen(k_total, 0);
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t r = rp[g]; r < rp[g + 1]; ++r) {
        TORCH_CHECK(!row_seen[ri[r] - g * G.og], "compact_conv2d: row index ", ri[r], " appears twice in row_idx");
        row_seen[ri[r] - g * G.og] = 1;
      }
      for (int64_t k = cp[g]; k < cp[g + 1]; ++k) {
        TORCH_CHECK(!col_seen[ci[k]], "compact_conv2d: column index ", ci[k], " appears twice in group ", g,
                    " of col_idx");
        col_seen[ci[k]] = 1;
      }
      for (int64_t r = rp[g]; r < rp[g + 1]; ++r) row_seen[ri[r] - g * G.og] = 0;
      for (int64_t k = cp[g]; k < cp[g + 1]; ++k) col_seen[ci[k]] = 0;
    }
  }
  return w_expected;
}

// The checks of the packed weight's length and the bias (read no index value).
inline void check_weight_and_bias(const at::Tensor& input, const at::Tensor& weight, int64_t w_expected,
                                  const std::optional<at::Tensor>& bias, int64_t out_channels) {
  TORCH_CHECK(weight.numel() == w_expected, "compact_conv2d: weight has ", weight.numel(),
              " elements but the index lists need sum_g rows_g * cols_g = ", w_expected);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == out_channels && bias->scalar_type() == input.scalar_type() &&
                    bias->device() == input.device(),
                "compact_conv2d: bias must be 1-D with out_channels = ", out_channels, " entries of dtype ",
                input.scalar_type(), " on the input's device");
  }
}

// The filters no kept row writes (with full-width output they output their bias), group by group:
// removed[ptr[g] .. ptr[g + 1]) for group g. row_idx / row_ptr: checked host lists; kept is scratch.
inline void removed_filters(const int64_t* row_idx, const int64_t* row_ptr, const ConvGeometry& G,
                            std::vector<char>& kept, std::vector<int64_t>& removed, std::vector<int64_t>& ptr) {
  kept.assign(G.out_channels, 0);
  for (int64_t i = 0; i < row_ptr[G.groups]; ++i) kept[row_idx[i]] = 1;
  removed.clear(), ptr.assign(G.groups + 1, 0);
  for (int64_t g = 0; g < G.groups; ++g) {
    for (int64_t c = g * G.og; c < (g + 1) * G.og; ++c)
      if (!kept[c]) removed.push_back(c);
    ptr[g + 1] = int64_t(removed.size());
  }
}

// The backward's grad_output: N x out_rows x Ho x Wo in the input's dtype.
inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const ConvGeometry& G,
                              int64_t out_rows) {
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == G.n && grad_output.size(1) == out_rows &&
                  grad_output.size(2) == G.ho && grad_output.size(3) == G.wo,
              "compact_conv2d_backward: grad_output must be ", G.n, " x ", out_rows, " x ", G.ho, " x ", G.wo,
              ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "compact_conv2d_backward: grad_output dtype ",
              grad_output.scalar_type(), " differs from input dtype ", input.scalar_type());
}

// Validates every argument (clear TORCH_CHECK messages) and returns the convolution geometry.
inline ConvGeometry check_compact_conv2d_args(const at::Tensor& input, const at::Tensor& weight,
                                              const IndexLists& idx, const std::optional<at::Tensor>& bias,
                                              at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                              int64_t out_channels) {
  const ConvGeometry G =
      check_conv_geometry(input, weight, kernel_size, stride, padding, dilation, groups, out_channels);
  check_weight_and_bias(input, weight, check_index_values(idx, G), bias, out_channels);
  return G;
}

}  // namespace ssl_lightning
