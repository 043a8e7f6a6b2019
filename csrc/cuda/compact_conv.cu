// CUDA backend of ssl_lightning::compact_conv2d (first correct step: gathered lowering + cuBLAS).
//
// Per conv group g and chunk of images: a gather kernel lowers only the kept columns into a panel
// L[K_g, n * P] (zero padding handled in the kernel, no full im2col), one cuBLAS GEMM (through at::mm)
// computes W_g[R_g, K_g] @ L, and the [R_g, n, P] result is written to its output channels with the bias.
// Built only when torch has CUDA; the schema lives in ops.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace ssl_lightning {
namespace {

struct Geo {
  int64_t c, h, w, cg, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
};

// panel[k, (n - n0) * P + p] = x[n, g*cg + c_k, oh*sh - ph + kh_k*dh, ow*sw - pw + kw_k*dw] (0 outside)
template <typename scalar_t>
__global__ void lower_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ cols, int64_t k,
                             int64_t group, int64_t n0, int64_t nimg, Geo G, scalar_t* __restrict__ panel) {
  const int64_t P = G.ho * G.wo;
  const int64_t width = nimg * P;
  const int64_t total = k * width;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ki = idx / width, rest = idx % width;
    const int64_t n = n0 + rest / P, p = rest % P;
    const int64_t oh = p / G.wo, ow = p % G.wo;
    const int64_t col = cols[ki];
    const int64_t ci = col / (G.kh * G.kw), r = col % (G.kh * G.kw);
    const int64_t ih = oh * G.sh - G.ph + (r / G.kw) * G.dh;
    const int64_t iw = ow * G.sw - G.pw + (r % G.kw) * G.dw;
    scalar_t v = scalar_t(0);
    if (ih >= 0 && ih < G.h && iw >= 0 && iw < G.w) v = x[((n * G.c) + group * G.cg + ci) * G.h * G.w + ih * G.w + iw];
    panel[idx] = v;
  }
}

}  // namespace

at::Tensor compact_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& row_idx,
                               const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, int64_t out_channels, bool compact_output) {
  TORCH_CHECK(input.is_cuda() && weight.device() == input.device(),
              "compact_conv2d: input and weight must be on the same CUDA device, got ", input.device(), " and ",
              weight.device());
  TORCH_CHECK(input.dim() == 4, "compact_conv2d: input must be N x C x H x W, got ", input.dim(), " dims");
  TORCH_CHECK(input.is_floating_point(), "compact_conv2d: input must be floating point, got ", input.scalar_type());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() && weight.dim() == 1,
              "compact_conv2d: weight must be the packed 1-D compact weight with the input's dtype");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "compact_conv2d: kernel_size, stride, padding and dilation must have 2 values each");
  TORCH_CHECK(groups >= 1 && input.size(1) % groups == 0 && out_channels % groups == 0,
              "compact_conv2d: groups (", groups, ") must divide the input channels (", input.size(1),
              ") and out_channels (", out_channels, ")");
  const c10::cuda::CUDAGuard guard(input.device());
  // The index lists are small: validate and read them on the host.
  const at::Tensor rp_h = row_ptr.to(at::kCPU, at::kLong).contiguous();
  const at::Tensor cp_h = col_ptr.to(at::kCPU, at::kLong).contiguous();
  const at::Tensor ri_h = row_idx.to(at::kCPU, at::kLong).contiguous();
  const at::Tensor ci_h = col_idx.to(at::kCPU, at::kLong).contiguous();
  TORCH_CHECK(rp_h.numel() == groups + 1 && cp_h.numel() == groups + 1,
              "compact_conv2d: row_ptr and col_ptr need groups + 1 = ", groups + 1, " entries, got ", rp_h.numel(),
              " and ", cp_h.numel());
  const int64_t* rp = rp_h.const_data_ptr<int64_t>();
  const int64_t* cp = cp_h.const_data_ptr<int64_t>();
  Geo G{};
  G.c = input.size(1), G.h = input.size(2), G.w = input.size(3), G.cg = G.c / groups;
  G.kh = kernel_size[0], G.kw = kernel_size[1], G.sh = stride[0], G.sw = stride[1];
  G.ph = padding[0], G.pw = padding[1], G.dh = dilation[0], G.dw = dilation[1];
  TORCH_CHECK(G.kh > 0 && G.kw > 0 && G.sh > 0 && G.sw > 0 && G.dh > 0 && G.dw > 0 && G.ph >= 0 && G.pw >= 0,
              "compact_conv2d: kernel_size, stride and dilation must be positive and padding non-negative");
  G.ho = (G.h + 2 * G.ph - G.dh * (G.kh - 1) - 1) / G.sh + 1;
  G.wo = (G.w + 2 * G.pw - G.dw * (G.kw - 1) - 1) / G.sw + 1;
  TORCH_CHECK(G.ho > 0 && G.wo > 0, "compact_conv2d: input ", input.sizes(), " is smaller than the dilated kernel");
  const int64_t og = out_channels / groups, k_total = G.cg * G.kh * G.kw;
  int64_t w_expected = 0;
  TORCH_CHECK(rp[0] == 0 && cp[0] == 0 && rp[groups] == ri_h.numel() && cp[groups] == ci_h.numel(),
              "compact_conv2d: row_ptr/col_ptr must start at 0 and end at the number of kept rows/columns");
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(rp[g + 1] >= rp[g] && cp[g + 1] >= cp[g], "compact_conv2d: row_ptr and col_ptr must be non-decreasing");
    w_expected += (rp[g + 1] - rp[g]) * (cp[g + 1] - cp[g]);
    for (int64_t r = rp[g]; r < rp[g + 1]; ++r) {
      const int64_t v = ri_h.const_data_ptr<int64_t>()[r];
      TORCH_CHECK(v >= g * og && v < (g + 1) * og, "compact_conv2d: row index ", v, " of group ", g,
                  " is outside its filters [", g * og, ", ", (g + 1) * og, ")");
    }
    for (int64_t k = cp[g]; k < cp[g + 1]; ++k) {
      const int64_t v = ci_h.const_data_ptr<int64_t>()[k];
      TORCH_CHECK(v >= 0 && v < k_total, "compact_conv2d: column index ", v, " is outside C/groups*KH*KW = ", k_total);
    }
  }
  TORCH_CHECK(weight.numel() == w_expected, "compact_conv2d: weight has ", weight.numel(),
              " elements but the index lists need sum_g rows_g * cols_g = ", w_expected);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == out_channels && bias->scalar_type() == input.scalar_type() &&
                    bias->device() == input.device(),
                "compact_conv2d: bias must be 1-D with out_channels = ", out_channels, " entries on the input's device");
  }

  const at::Tensor x = input.contiguous();
  const int64_t N = x.size(0), P = G.ho * G.wo;
  const at::Tensor row_idx_d = row_idx.to(x.device(), at::kLong);
  const at::Tensor col_idx_d = col_idx.to(x.device(), at::kLong);
  const int64_t out_rows = compact_output ? ri_h.numel() : out_channels;
  at::Tensor out;
  if (compact_output) {
    out = at::empty({N, out_rows, G.ho, G.wo}, x.options());
  } else if (bias.has_value()) {
    out = bias->view({1, out_channels, 1, 1}).expand({N, out_channels, G.ho, G.wo}).contiguous();
  } else {
    out = at::zeros({N, out_channels, G.ho, G.wo}, x.options());
  }
  if (N == 0) return out;
  at::Tensor out3 = out.view({N, out_rows, P});
  int64_t kmax = 0;
  for (int64_t g = 0; g < groups; ++g) kmax = std::max(kmax, cp[g + 1] - cp[g]);
  // images per chunk: keep the lowered panel under ~256 MiB
  const int64_t per_image = std::max<int64_t>(1, kmax * P * int64_t(x.element_size()));
  const int64_t chunk = std::clamp<int64_t>((int64_t(256) << 20) / per_image, 1, N);
  const at::Tensor wc = weight.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  int64_t woff = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r = rp[g + 1] - rp[g], k = cp[g + 1] - cp[g];
    if (r == 0) continue;
    const at::Tensor rows_g = row_idx_d.narrow(0, rp[g], r);
    at::Tensor bias_g;
    if (bias.has_value()) bias_g = bias->index_select(0, rows_g).view({1, r, 1});
    const int64_t dst_row0 = rp[g];
    if (k == 0) {
      if (compact_output) {
        at::Tensor dst = out3.narrow(1, dst_row0, r);
        if (bias.has_value()) dst.copy_(bias_g.expand({N, r, P}));
        else dst.zero_();
      }
      continue;
    }
    const at::Tensor wg = wc.narrow(0, woff, r * k).view({r, k});
    woff += r * k;
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      const int64_t nimg = std::min(chunk, N - n0);
      at::Tensor panel = at::empty({k, nimg * P}, x.options());
      const int64_t total = k * nimg * P;
      const int threads = 256;
      const int blocks = int(std::min<int64_t>((total + threads - 1) / threads, 65535 * 8));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "compact_conv2d_lower", [&] {
        lower_kernel<scalar_t><<<blocks, threads, 0, stream>>>(x.const_data_ptr<scalar_t>(),
                                                               col_idx_d.const_data_ptr<int64_t>() + cp[g], k, g, n0,
                                                               nimg, G, panel.mutable_data_ptr<scalar_t>());
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor res = at::mm(wg, panel).view({r, nimg, P}).permute({1, 0, 2});  // nimg x r x P
      if (bias.has_value()) res = res + bias_g;
      at::Tensor dst_imgs = out3.narrow(0, n0, nimg);
      if (compact_output) {
        dst_imgs.narrow(1, dst_row0, r).copy_(res);
      } else {
        dst_imgs.index_copy_(1, rows_g, res.contiguous());
      }
    }
  }
  return out;
}

}  // namespace ssl_lightning

TORCH_LIBRARY_IMPL(ssl_lightning, CUDA, m) {
  m.impl("compact_conv2d", &ssl_lightning::compact_conv2d_cuda);
}
