// Host glue of the CUDA compact_conv2d and its backward, over a kernel launcher: compact_conv.cu launches on the
// current CUDA stream, the CPU emulation (tests/cuda_emulation) runs the same kernels thread by thread. The plan's
// tables and every tensor are on the launcher's device.
#pragma once

#include <ATen/ATen.h>

#include "../compact_conv_args.h"
#include "implicit_gemm.cuh"
#include "plan.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace ssl_lightning {
namespace cuda_impl {

using cuda_plan::GroupDesc;
using cuda_plan::Plan;
using implicit_gemm::Conv;

// Which forward kernel a call runs (SSL_LIGHTNING_CUDA_GEMM, see compact_conv.cu).
enum class Gemm { kAuto, kSimt, kLowered };

// panel[k, (n - n0) * P + p] = x[n, g*cg + c_k, oh*sh - ph + kh_k*dh, ow*sw - pw + kw_k*dw] (0 outside)
template <typename T>
__global__ void lower_kernel(const T* __restrict__ x, const int4* __restrict__ taps, int64_t k, int64_t group,
                             int64_t n0, int64_t nimg, Conv cv, T* __restrict__ panel) {
  const int64_t width = nimg * cv.P, total = k * width;
  const T zero = implicit_gemm::zero_of<T>();
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ki = idx / width, rest = idx % width;
    const auto pos = implicit_gemm::decode_position(x, n0 * cv.P + rest, group, cv);
    panel[idx] = implicit_gemm::gather(pos, taps[ki], cv, zero);
  }
}

inline int grid_stride_blocks(int64_t total, int threads) {
  return int(std::clamp<int64_t>((total + threads - 1) / threads, 1, 65535 * 8));
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mut_ptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}
inline const int4* taps_ptr(const Plan& plan) { return reinterpret_cast<const int4*>(plan.taps.const_data_ptr()); }

// The dtypes the kernels run.
inline void check_dtype(at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "compact_conv2d (CUDA): input dtype must be float32, float64, float16 or bfloat16, got ", t);
}

// Calls f(T{}) with T the kernels' element type of `dtype` (float, double, __half, __nv_bfloat16).
template <typename F>
void with_native_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: check_dtype(dtype);  // raises
  }
}

// The checks of both ops in their order, around the plan of the index lists: plan_of(G) gives it (the CUDA plan
// cache, which checks the index values on a miss only; a fresh build_plan in the CPU emulation).
template <typename PlanOf>
std::pair<ConvGeometry, std::shared_ptr<const Plan>> checked_plan(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, int64_t out_channels, PlanOf&& plan_of) {
  const ConvGeometry G =
      check_conv_geometry(input, weight, kernel_size, stride, padding, dilation, groups, out_channels);
  check_dtype(input.scalar_type());
  std::shared_ptr<const Plan> plan = plan_of(G);
  check_weight_and_bias(input, weight, plan->w_expected, bias, out_channels);
  return {G, std::move(plan)};
}

// Rows of the output: the kept filters with compact output, every filter otherwise.
inline int64_t out_rows_of(const Plan& plan, const ConvGeometry& G, bool compact_output) {
  return compact_output ? plan.rp.back() : G.out_channels;
}

// Lowers group g's kept columns of images [n0, n0 + nimg) into panel (k x nimg*P).
template <typename Launch>
void lower(const Launch& launch, const at::Tensor& x, const Plan& plan, int64_t g, int64_t n0, int64_t nimg,
           const Conv& cv, at::Tensor& panel) {
  const int64_t k = plan.cp[g + 1] - plan.cp[g];
  with_native_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch(lower_kernel<T>, dim3(grid_stride_blocks(k * nimg * cv.P, 256)), dim3(256), ptr<T>(x),
           taps_ptr(plan) + plan.cp[g], k, g, n0, nimg, cv, mut_ptr<T>(panel));
  });
}

// Images per chunk of the lowered paths: keeps a panel of `rows` x (images x P) under ~256 MiB.
inline int64_t images_per_chunk(int64_t rows, const ConvGeometry& G, int64_t element_size) {
  const int64_t per_image = std::max<int64_t>(1, rows * G.ho * G.wo * element_size);
  return std::clamp<int64_t>((int64_t(256) << 20) / per_image, 1, std::max<int64_t>(G.n, 1));
}

// The first CUDA path: lowered panel in global memory, GEMM (at::mm), scatter. `out` is freshly allocated.
template <typename Launch>
void forward_lowered(const Launch& launch, const at::Tensor& x, const at::Tensor& wc, const Plan& plan,
                     const std::optional<at::Tensor>& bias, const ConvGeometry& G, bool compact_output,
                     at::Tensor& out) {
  const int64_t N = G.n, P = G.ho * G.wo, out_rows = out.size(1);
  if (!compact_output) {
    if (bias.has_value()) out.copy_(bias->view({1, G.out_channels, 1, 1}));
    else out.zero_();
  }
  const Conv cv = implicit_gemm::make_conv(G, out_rows, compact_output, bias.has_value());
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
      lower(launch, x, plan, g, n0, nimg, cv, panel);
      at::Tensor res = at::mm(wg, panel).view({r, nimg, P}).permute({1, 0, 2});  // nimg x r x P
      if (bias.has_value()) res = res + bias_g;
      at::Tensor dst_imgs = out3.narrow(0, n0, nimg);
      if (compact_output) dst_imgs.narrow(1, plan.rp[g], r).copy_(res);
      else dst_imgs.index_copy_(1, rows_g, res.contiguous());
    }
  }
}

// The implicit-GEMM grid: position tiles x filter tiles x groups.
inline dim3 implicit_grid(int64_t positions, int64_t rmax, int64_t groups, bool tensor_cores) {
  const int bm = tensor_cores ? implicit_gemm::kMmaBM : implicit_gemm::kSimtBM;
  const int bn = tensor_cores ? implicit_gemm::kMmaBN : implicit_gemm::kSimtBN;
  const int64_t gx = (positions + bn - 1) / bn, gy = std::max<int64_t>(1, (rmax + bm - 1) / bm);
  TORCH_CHECK(gx <= std::numeric_limits<int32_t>::max() && gy <= 65535,
              "compact_conv2d (CUDA): ", positions, " output positions and ", rmax,
              " kept filters per group exceed the kernel's grid (2^31 - 1 position tiles, 65535 filter tiles)");
  return dim3(unsigned(gx), unsigned(gy), unsigned(groups));
}

// One launch of the implicit-GEMM kernel (CUDA cores, or tensor cores for fp32 (TF32) / fp16 / bf16) over every
// group; writes every element of `out` (kept rows, and the removed filters' bias with full-width output).
template <typename Launch>
void forward_implicit(const Launch& launch, const at::Tensor& x, const at::Tensor& wc, const Plan& plan,
                      const at::Tensor& bias, const ConvGeometry& G, bool compact_output, bool tensor_cores,
                      at::Tensor& out) {
  const Conv cv = implicit_gemm::make_conv(G, out.size(1), compact_output, bias.defined());
  const dim3 grid = implicit_grid(cv.NP, plan.rmax, G.groups, tensor_cores);
  const auto* groups = reinterpret_cast<const GroupDesc*>(plan.groups.const_data_ptr());
  const int64_t* rows = plan.rows.const_data_ptr<int64_t>();
  const int64_t* removed = plan.removed.const_data_ptr<int64_t>();
  with_native_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto kernel = implicit_gemm::simt_kernel<T>;
    int threads = implicit_gemm::kSimtThreads;
    if constexpr (std::is_same_v<T, double>) {
      TORCH_CHECK(!tensor_cores, "compact_conv2d (CUDA): no tensor-core kernel for float64");
    } else if (tensor_cores) {
      kernel = implicit_gemm::wmma_kernel<T>, threads = implicit_gemm::kMmaThreads;
    }
    launch(kernel, grid, dim3(threads), ptr<T>(x), ptr<T>(wc), bias.defined() ? ptr<T>(bias) : nullptr, groups,
           rows, removed, taps_ptr(plan), cv, mut_ptr<T>(out));
  });
}

// The forward: checks done, plan built; x and wc contiguous. tensor_cores: whether `auto` may take the
// tensor-core kernel for x (its device and dtype, torch's TF32 flag for fp32).
template <typename Launch>
at::Tensor forward(const Launch& launch, const at::Tensor& x, const at::Tensor& wc, const Plan& plan,
                   const std::optional<at::Tensor>& bias, const ConvGeometry& G, bool compact_output, Gemm gemm,
                   bool tensor_cores) {
  const int64_t out_rows = out_rows_of(plan, G, compact_output);
  at::Tensor out = at::empty({G.n, out_rows, G.ho, G.wo}, x.options());
  if (G.n == 0 || out_rows == 0) return out;
  if (gemm == Gemm::kLowered) {
    forward_lowered(launch, x, wc, plan, bias, G, compact_output, out);
  } else {
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    forward_implicit(launch, x, wc, plan, b, G, compact_output, gemm == Gemm::kAuto && tensor_cores, out);
  }
  return out;
}

// Gradients for the input and the packed weight on the kept rows and columns: per group and chunk of images,
// grad_W_g += dY_g @ L_g^T (L_g lowered), grad_L_g = W_g^T @ dY_g, then col2im over the kept columns as a
// deterministic gather. x, go and wc contiguous; go checked against the geometry.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> backward(const Launch& launch, const at::Tensor& go, const at::Tensor& x,
                                            const at::Tensor& wc, const Plan& plan, const ConvGeometry& G,
                                            bool compact_output, std::array<bool, 2> output_mask) {
  at::Tensor grad_x = output_mask[0] ? at::zeros_like(x) : at::empty({0}, x.options());
  at::Tensor grad_w = output_mask[1] ? at::zeros_like(wc) : at::empty({0}, x.options());
  if (G.n == 0 || !(output_mask[0] || output_mask[1])) return {grad_x, grad_w};
  const int64_t P = G.ho * G.wo, out_rows = go.size(1);
  const Conv cv = implicit_gemm::make_conv(G, out_rows, compact_output, false);
  const at::Tensor go3 = go.view({G.n, out_rows, P});
  const int64_t chunk = images_per_chunk(std::max(plan.kmax, plan.rmax), G, x.element_size());
  for (int64_t g = 0; g < G.groups; ++g) {
    const int64_t r = plan.rp[g + 1] - plan.rp[g], k = plan.cp[g + 1] - plan.cp[g];
    if (r == 0 || k == 0) continue;
    const at::Tensor wg = wc.narrow(0, plan.woff[g], r * k).view({r, k});
    at::Tensor gwg = output_mask[1] ? grad_w.narrow(0, plan.woff[g], r * k).view({r, k}) : at::Tensor();
    const at::Tensor rows_g = plan.rows.narrow(0, plan.rp[g], r);
    for (int64_t n0 = 0; n0 < G.n; n0 += chunk) {
      const int64_t nimg = std::min(chunk, G.n - n0);
      const at::Tensor go_c = go3.narrow(0, n0, nimg);  // nimg x out_rows x P
      const at::Tensor dy_c = compact_output ? go_c.narrow(1, plan.rp[g], r) : go_c.index_select(1, rows_g);
      const at::Tensor dy = dy_c.permute({1, 0, 2}).reshape({r, nimg * P});
      if (output_mask[1]) {
        at::Tensor panel = at::empty({k, nimg * P}, x.options());
        lower(launch, x, plan, g, n0, nimg, cv, panel);
        gwg.addmm_(dy, panel.t());
      }
      if (output_mask[0]) {
        const at::Tensor gl = at::mm(wg.t(), dy).contiguous();  // k x (nimg * P)
        with_native_type(x.scalar_type(), [&](auto tag) {
          using T = decltype(tag);
          launch(implicit_gemm::col2im_gather_kernel<T>, dim3(grid_stride_blocks(nimg * G.cg * G.h * G.w, 256)),
                 dim3(256), ptr<T>(gl), taps_ptr(plan), plan.chan_ptr.const_data_ptr<int64_t>(),
                 plan.chan_list.const_data_ptr<int64_t>(), g, plan.cp[g], n0, nimg, cv, mut_ptr<T>(grad_x));
        });
      }
    }
  }
  return {grad_x, grad_w};
}

}  // namespace cuda_impl
}  // namespace ssl_lightning
