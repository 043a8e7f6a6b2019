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

#include "../compact_conv_args.h"

#include <algorithm>
#include <vector>

namespace ssl_lightning {
namespace {


// panel[k, (n - n0) * P + p] = x[n, g*cg + c_k, oh*sh - ph + kh_k*dh, ow*sw - pw + kw_k*dw] (0 outside)
template <typename scalar_t>
__global__ void lower_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ cols, int64_t k,
                             int64_t group, int64_t n0, int64_t nimg, ConvGeometry G, scalar_t* __restrict__ panel) {
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
  TORCH_CHECK(input.is_cuda(), "compact_conv2d: the CUDA backend needs a CUDA input, got ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  // The index lists are small: validate and read them on the host.
  const IndexLists idx = host_index_lists(row_idx, row_ptr, col_idx, col_ptr, input.device());
  const ConvGeometry G = check_compact_conv2d_args(input, weight, idx, bias, kernel_size, stride, padding, dilation,
                                                   groups, out_channels);
  const at::Tensor &ri_h = idx.row_idx, &ci_h = idx.col_idx;
  const int64_t* rp = idx.row_ptr.const_data_ptr<int64_t>();
  const int64_t* cp = idx.col_ptr.const_data_ptr<int64_t>();

  const at::Tensor x = input.contiguous();
  const int64_t N = x.size(0), P = G.ho * G.wo;
  const at::Tensor row_idx_d = ri_h.to(x.device());
  const at::Tensor col_idx_d = ci_h.to(x.device());
  const int64_t out_rows = compact_output ? ri_h.numel() : out_channels;
  at::Tensor out;
  if (compact_output) {
    out = at::empty({N, out_rows, G.ho, G.wo}, x.options());
  } else if (bias.has_value()) {  // a fresh tensor: expand().contiguous() is the bias itself when N*Ho*Wo == 1
    out = at::empty({N, out_channels, G.ho, G.wo}, x.options());
    out.copy_(bias->view({1, out_channels, 1, 1}));
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
