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
// columns as a deterministic gather (one thread per input element). The host glue is compact_conv_impl.cuh.
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
#include "compact_conv_impl.cuh"
#include "index_plan.h"

#include <array>
#include <memory>
#include <cstdlib>
#include <string>
#include <tuple>
#include <utility>

namespace ssl_lightning {
namespace {

using cuda_impl::Gemm;

// Launches a kernel on the current stream of the current device.
struct CudaLaunch {
  cudaStream_t stream;
  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) const {
    kernel<<<grid, block, 0, stream>>>(std::forward<A>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

Gemm gemm_switch() {
  const char* env = std::getenv("SSL_LIGHTNING_CUDA_GEMM");
  const std::string v = env == nullptr ? "auto" : env;
  if (v.empty() || v == "auto") return Gemm::kAuto;
  if (v == "simt") return Gemm::kSimt;
  if (v == "lowered") return Gemm::kLowered;
  TORCH_CHECK(false, "SSL_LIGHTNING_CUDA_GEMM must be auto, simt or lowered, got '", v, "'");
}

// Whether `auto` may take the tensor-core kernel for this input: fp16 / bf16 on sm_80+, fp32 there when torch
// allows TF32 in cuDNN convolutions (the flag F.conv2d follows).
bool tensor_cores_for(const at::Tensor& x) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index()));
  if (major < 8 || x.scalar_type() == at::kDouble) return false;
  return x.scalar_type() != at::kFloat || at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
}

// The plan source of both ops: the process's plan cache (the index values are checked on a miss only). The
// lambda holds references to the index tensors: call it within the op.
auto cached_plan(const at::Tensor& row_idx, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                 const at::Tensor& col_ptr, const at::Device& device) {
  return [&row_idx, &row_ptr, &col_idx, &col_ptr, device](const ConvGeometry& G) {
    return cuda_plan::plan_cache().get(row_idx, row_ptr, col_idx, col_ptr, G, device);
  };
}

}  // namespace

at::Tensor compact_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& row_idx,
                               const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, int64_t out_channels, bool compact_output) {
  TORCH_CHECK(input.is_cuda(), "compact_conv2d: the CUDA backend needs a CUDA input, got ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const auto [G, plan] = cuda_impl::checked_plan(input, weight, bias, kernel_size, stride, padding, dilation, groups,
                                                 out_channels, cached_plan(row_idx, row_ptr, col_idx, col_ptr,
                                                                           input.device()));
  const at::Tensor x = input.contiguous();
  return cuda_impl::forward(CudaLaunch{c10::cuda::getCurrentCUDAStream()}, x, weight.contiguous(), *plan, bias, G,
                            compact_output, gemm_switch(), tensor_cores_for(x));
}

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
  const auto [G, plan] = cuda_impl::checked_plan(input, weight, std::nullopt, kernel_size, stride, padding, dilation,
                                                 groups, out_channels,
                                                 cached_plan(row_idx, row_ptr, col_idx, col_ptr, input.device()));
  check_grad_output(grad_output, input, G, cuda_impl::out_rows_of(*plan, G, compact_output));
  return cuda_impl::backward(CudaLaunch{c10::cuda::getCurrentCUDAStream()}, grad_output.contiguous(),
                             input.contiguous(), weight.contiguous(), *plan, G, compact_output, output_mask);
}

}  // namespace ssl_lightning

TORCH_LIBRARY_IMPL(ssl_lightning, CUDA, m) {
  m.impl("compact_conv2d", &ssl_lightning::compact_conv2d_cuda);
  m.impl("compact_conv2d_backward", &ssl_lightning::compact_conv2d_backward_cuda);
}
