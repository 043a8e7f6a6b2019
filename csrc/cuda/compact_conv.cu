// CUDA backend of ssl_lightning::compact_conv2d and compact_conv2d_backward.
//
// Forward: one launch of an implicit-GEMM kernel over (output positions, kept rows, conv groups) that gathers
// the kept columns from the input into shared memory (implicit_gemm.cuh): no lowered panel, no output fill or
// scatter pass. Kernel per call (SSL_LIGHTNING_CUDA_GEMM, read at every call):
//   auto    tensor cores (wmma) for fp16/bf16 on sm_80+, and for fp32 when torch allows TF32 in cuDNN
//           convolutions (torch.backends.cudnn.allow_tf32, the flag F.conv2d follows); else the CUDA-core kernel
//   simt    the CUDA-core kernel always (exact fp32)
//   lowered the first CUDA path, kept as a reference point: kept columns lowered into a global-memory panel,
//           then cuBLAS (at::mm) and a scatter to the output channels
// Backward (input and packed weight, kept rows/columns only): per group and chunk of images, the kept columns
// lowered into a panel, grad_W_g += dY_g @ L_g^T and grad_L_g = W_g^T @ dY_g on cuBLAS, and col2im over the kept
// columns as a deterministic gather (one thread per input element).
// The index lists are checked on the host once per index tensors (index_plan.h): no host round-trip or
// synchronisation per call, CUDA-graph capturable once the op has run outside the capture.
// Built only when torch has CUDA; the schemas live in ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../compact_conv_args.h"
#include "implicit_gemm.cuh"
#include "index_plan.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <string>
#include <tuple>

namespace ssl_lightning {
namespace {

using cuda_plan::GroupDesc;
using cuda_plan::Plan;
using implicit_gemm::Conv;

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

template <typename scalar_t>
void launch_lower(const at::Tensor& x, const Plan& plan, int64_t g, int64_t n0, int64_t nimg, const ConvGeometry& G,
                  at::Tensor& panel) {
  const int64_t k = plan.cp[g + 1] - plan.cp[g];
  const int64_t total = k * nimg * G.ho * G.wo;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((total + threads - 1) / threads, 65535 * 8));
  lower_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), plan.cols.const_data_ptr<int64_t>() + plan.cp[g], k, g, n0, nimg, G,
      panel.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Images per chunk of the lowered paths: keeps a panel of `rows` x (images x P) under ~256 MiB.
int64_t images_per_chunk(int64_t rows, const ConvGeometry& G, int64_t element_size) {
  const int64_t per_image = std::max<int64_t>(1, rows * G.ho * G.wo * element_size);
  return std::clamp<int64_t>((int64_t(256) << 20) / per_image, 1, std::max<int64_t>(G.n, 1));
}

enum class Gemm { kAuto, kSimt, kLowered };

Gemm gemm_switch() {
  const char* env = std::getenv("SSL_LIGHTNING_CUDA_GEMM");
  const std::string v = env == nullptr ? "auto" : env;
  if (v.empty() || v == "auto") return Gemm::kAuto;
  if (v == "simt") return Gemm::kSimt;
  if (v == "lowered") return Gemm::kLowered;
  TORCH_CHECK(false, "SSL_LIGHTNING_CUDA_GEMM must be auto, simt or lowered, got '", v, "'");
}

// The first CUDA path: lowered panel in global memory, cuBLAS, scatter. `out` is freshly allocated.
void forward_lowered(const at::Tensor& x, const at::Tensor& wc, const Plan& plan,
                     const std::optional<at::Tensor>& bias, const ConvGeometry& G, bool compact_output,
                     at::Tensor& out) {
  const int64_t N = G.n, P = G.ho * G.wo, out_rows = out.size(1);
  if (!compact_output) {
    if (bias.has_value()) out.copy_(bias->view({1, G.out_channels, 1, 1}));
    else out.zero_();
  }
  at::Tensor out3 = out.view({N, out_rows, P});
  const int64_t chunk = images_per_chunk(plan.kmax, G, x.element_size());
  for (int64_t g = 0; g < G.groups; ++g) {
    const int64_t r = plan.rp[g + 1] - plan.rp[g], k = plan.cp[g + 1] - plan.cp[g];
    if (r == 0) continue;
    const at::Tensor rows_g = plan.rows.narrow(0, plan.rp[g], r);
    at::Tensor bias_g;
    if (bias.has_value()) bias_g = bias->index_select(0, rows_g).view({1, r, 1});
    if (k == 0) {
      if (compact_output) {
        at::Tensor dst = out3.narrow(1, plan.rp[g], r);
        if (bias.has_value()) dst.copy_(bias_g.expand({N, r, P}));
        else dst.zero_();
      }
      continue;
    }
    const at::Tensor wg = wc.narrow(0, plan.woff[g], r * k).view({r, k});
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      const int64_t nimg = std::min(chunk, N - n0);
      at::Tensor panel = at::empty({k, nimg * P}, x.options());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "compact_conv2d_lower",
                                      [&] { launch_lower<scalar_t>(x, plan, g, n0, nimg, G, panel); });
      at::Tensor res = at::mm(wg, panel).view({r, nimg, P}).permute({1, 0, 2});  // nimg x r x P
      if (bias.has_value()) res = res + bias_g;
      at::Tensor dst_imgs = out3.narrow(0, n0, nimg);
      if (compact_output) dst_imgs.narrow(1, plan.rp[g], r).copy_(res);
      else dst_imgs.index_copy_(1, rows_g, res.contiguous());
    }
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

// One launch of the implicit-GEMM kernel (simt or wmma) over every group. T: the CUDA native element type.
template <typename T>
void forward_implicit(const at::Tensor& x, const at::Tensor& wc, const Plan& plan, const at::Tensor& bias,
                      const ConvGeometry& G, bool compact_output, bool tensor_cores, at::Tensor& out) {
  const Conv cv = implicit_gemm::make_conv(G, out.size(1), compact_output, bias.defined());
  const int bm = tensor_cores ? implicit_gemm::kMmaBM : implicit_gemm::kSimtBM;
  const int bn = tensor_cores ? implicit_gemm::kMmaBN : implicit_gemm::kSimtBN;
  const int64_t gx = (cv.NP + bn - 1) / bn, gy = std::max<int64_t>(1, (plan.rmax + bm - 1) / bm);
  TORCH_CHECK(gx <= std::numeric_limits<int32_t>::max() && gy <= 65535,
              "compact_conv2d (CUDA): ", cv.NP, " output positions and ", plan.rmax,
              " kept filters per group exceed the kernel's grid (2^31 - 1 position tiles, 65535 filter tiles)");
  const dim3 grid(unsigned(gx), unsigned(gy), unsigned(G.groups));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const T* b = bias.defined() ? ptr<T>(bias) : nullptr;
  const auto* groups = reinterpret_cast<const GroupDesc*>(plan.groups.const_data_ptr<int64_t>());
  const auto* taps = reinterpret_cast<const int4*>(plan.taps.const_data_ptr<int32_t>());
  T* o = reinterpret_cast<T*>(out.mutable_data_ptr());
  if (tensor_cores) {
    if constexpr (std::is_same_v<T, double>) {
      TORCH_CHECK(false, "compact_conv2d (CUDA): no tensor-core kernel for float64");
    } else {
      implicit_gemm::wmma_kernel<T><<<grid, implicit_gemm::kMmaThreads, 0, stream>>>(
          ptr<T>(x), ptr<T>(wc), b, groups, plan.rows.const_data_ptr<int64_t>(),
          plan.removed.const_data_ptr<int64_t>(), taps, cv, o);
    }
  } else {
    implicit_gemm::simt_kernel<T><<<grid, implicit_gemm::kSimtThreads, 0, stream>>>(
        ptr<T>(x), ptr<T>(wc), b, groups, plan.rows.const_data_ptr<int64_t>(), plan.removed.const_data_ptr<int64_t>(),
        taps, cv, o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_dtype(const at::Tensor& input) {
  const auto t = input.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "compact_conv2d (CUDA): input dtype must be float32, float64, float16 or bfloat16, got ", t);
}

}  // namespace

at::Tensor compact_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& row_idx,
                               const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, int64_t out_channels, bool compact_output) {
  TORCH_CHECK(input.is_cuda(), "compact_conv2d: the CUDA backend needs a CUDA input, got ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const ConvGeometry G =
      check_conv_geometry(input, weight, kernel_size, stride, padding, dilation, groups, out_channels);
  check_dtype(input);
  const auto plan = cuda_plan::PlanCache::instance().get(row_idx, row_ptr, col_idx, col_ptr, G, input.device());
  check_weight_and_bias(input, weight, plan->w_expected, bias, out_channels);
  const Gemm gemm = gemm_switch();

  const at::Tensor x = input.contiguous();
  const at::Tensor wc = weight.contiguous();
  const int64_t out_rows = compact_output ? static_cast<int64_t>(plan->rp.back()) : out_channels;
  at::Tensor out = at::empty({G.n, out_rows, G.ho, G.wo}, x.options());
  if (G.n == 0 || out_rows == 0) return out;
  if (gemm == Gemm::kLowered) {
    forward_lowered(x, wc, *plan, bias, G, compact_output, out);
    return out;
  }
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, input.device().index()));
  const bool sm80 = major >= 8;  // wmma bf16 and tf32 fragments
  switch (x.scalar_type()) {
    case at::kFloat: {
      const bool tf32 = gemm == Gemm::kAuto && sm80 && at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
      forward_implicit<float>(x, wc, *plan, b, G, compact_output, tf32, out);
      break;
    }
    case at::kDouble:
      forward_implicit<double>(x, wc, *plan, b, G, compact_output, false, out);
      break;
    case at::kHalf:
      forward_implicit<__half>(x, wc, *plan, b, G, compact_output, gemm == Gemm::kAuto && sm80, out);
      break;
    default:  // bf16 (check_dtype)
      forward_implicit<__nv_bfloat16>(x, wc, *plan, b, G, compact_output, gemm == Gemm::kAuto && sm80, out);
      break;
  }
  return out;
}

// Gradients for the input and the packed weight on the kept rows and columns (see the file comment).
std::tuple<at::Tensor, at::Tensor> compact_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& row_idx,
    const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t out_channels,
    bool compact_output, std::array<bool, 2> output_mask) {
  TORCH_CHECK(input.is_cuda() && grad_output.is_cuda(),
              "compact_conv2d_backward: the CUDA backend needs CUDA tensors, got input on ", input.device(),
              " and grad_output on ", grad_output.device());
  TORCH_CHECK(grad_output.device() == input.device(), "compact_conv2d_backward: grad_output is on ",
              grad_output.device(), " but input on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const ConvGeometry G =
      check_conv_geometry(input, weight, kernel_size, stride, padding, dilation, groups, out_channels);
  check_dtype(input);
  const auto plan = cuda_plan::PlanCache::instance().get(row_idx, row_ptr, col_idx, col_ptr, G, input.device());
  check_weight_and_bias(input, weight, plan->w_expected, std::nullopt, out_channels);
  const int64_t out_rows = compact_output ? static_cast<int64_t>(plan->rp.back()) : out_channels;
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == G.n && grad_output.size(1) == out_rows &&
                  grad_output.size(2) == G.ho && grad_output.size(3) == G.wo,
              "compact_conv2d_backward: grad_output must be ", G.n, " x ", out_rows, " x ", G.ho, " x ", G.wo,
              ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "compact_conv2d_backward: grad_output dtype ",
              grad_output.scalar_type(), " differs from input dtype ", input.scalar_type());
  const at::Tensor x = input.contiguous();
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor wc = weight.contiguous();
  at::Tensor grad_x = output_mask[0] ? at::zeros_like(x) : at::empty({0}, x.options());
  at::Tensor grad_w = output_mask[1] ? at::zeros_like(wc) : at::empty({0}, x.options());
  if (G.n == 0 || !(output_mask[0] || output_mask[1])) return {grad_x, grad_w};
  const int64_t P = G.ho * G.wo;
  const Conv cv = implicit_gemm::make_conv(G, out_rows, compact_output, false);
  const at::Tensor go3 = go.view({G.n, out_rows, P});
  const int64_t chunk = images_per_chunk(std::max(plan->kmax, plan->rmax), G, x.element_size());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r = plan->rp[g + 1] - plan->rp[g], k = plan->cp[g + 1] - plan->cp[g];
    if (r == 0 || k == 0) continue;
    const at::Tensor wg = wc.narrow(0, plan->woff[g], r * k).view({r, k});
    at::Tensor gwg = output_mask[1] ? grad_w.narrow(0, plan->woff[g], r * k).view({r, k}) : at::Tensor();
    const at::Tensor rows_g = plan->rows.narrow(0, plan->rp[g], r);
    for (int64_t n0 = 0; n0 < G.n; n0 += chunk) {
      const int64_t nimg = std::min(chunk, G.n - n0);
      const at::Tensor go_c = go3.narrow(0, n0, nimg);  // nimg x out_rows x P
      const at::Tensor dy_c = compact_output ? go_c.narrow(1, plan->rp[g], r) : go_c.index_select(1, rows_g);
      const at::Tensor dy = dy_c.permute({1, 0, 2}).reshape({r, nimg * P});
      if (output_mask[1]) {
        at::Tensor panel = at::empty({k, nimg * P}, x.options());
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "compact_conv2d_backward_lower",
                                        [&] { launch_lower<scalar_t>(x, *plan, g, n0, nimg, G, panel); });
        gwg.addmm_(dy, panel.t());
      }
      if (output_mask[0]) {
        const at::Tensor gl = at::mm(wg.t(), dy).contiguous();  // k x (nimg * P)
        const int64_t total = nimg * G.cg * G.h * G.w;
        const int threads = 256;
        const int blocks = int(std::min<int64_t>((total + threads - 1) / threads, 65535 * 8));
        const auto* taps = reinterpret_cast<const int4*>(plan->taps.const_data_ptr<int32_t>());
        const auto launch = [&](auto tag) {
          using T = decltype(tag);
          implicit_gemm::col2im_gather_kernel<T><<<blocks, threads, 0, stream>>>(
              ptr<T>(gl), taps, plan->chan_ptr.const_data_ptr<int64_t>(), plan->chan_list.const_data_ptr<int64_t>(),
              g, plan->cp[g], n0, nimg, cv, reinterpret_cast<T*>(grad_x.mutable_data_ptr()));
        };
        switch (x.scalar_type()) {
          case at::kFloat: launch(float{}); break;
          case at::kDouble: launch(double{}); break;
          case at::kHalf: launch(__half{}); break;
          default: launch(__nv_bfloat16{}); break;
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  }
  return {grad_x, grad_w};
}

}  // namespace ssl_lightning

TORCH_LIBRARY_IMPL(ssl_lightning, CUDA, m) {
  m.impl("compact_conv2d", &ssl_lightning::compact_conv2d_cuda);
  m.impl("compact_conv2d_backward", &ssl_lightning::compact_conv2d_backward_cuda);
}
