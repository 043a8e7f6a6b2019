// The CUDA compact_conv2d kernels and host glue (csrc/cuda/compact_conv_impl.cuh), compiled as C++ against the
// CPU emulation in stub/ and registered as ssl_lightning_emulated::{compact_conv2d, compact_conv2d_backward} on
// CPU tensors; tests/test_cuda_emulation.py builds this file and compares it with the reference twins.
#include "cuda_emulation.h"  // before the kernels: defines the CUDA keywords and built-ins

#include <torch/library.h>

#include "../../csrc/compact_conv_args.h"
#include "../../csrc/cuda/compact_conv_impl.cuh"
#include "../../csrc/cuda/plan.h"

#include <atomic>
#include <string>
#include <vector>

namespace {

using namespace ssl_lightning;

// "auto": the tensor-core (wmma) kernel where the dtype has one (TF32 for fp32), as on an sm_80+ GPU with TF32
// allowed; "simt": the CUDA-core kernel; "lowered": panel + GEMM.
cuda_impl::Gemm parse(const std::string& gemm) {
  if (gemm == "auto") return cuda_impl::Gemm::kAuto;
  if (gemm == "simt") return cuda_impl::Gemm::kSimt;
  TORCH_CHECK(gemm == "lowered", "gemm must be auto, simt or lowered, got '", gemm, "'");
  return cuda_impl::Gemm::kLowered;
}

// The emulated ops' plan source: built afresh (the cache is tested on its own below). The lambda holds
// references to the index tensors: call it within the op.
auto fresh_plan(const at::Tensor& row_idx, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                const at::Tensor& col_ptr, const at::Device& device) {
  return [&row_idx, &row_ptr, &col_idx, &col_ptr, device](const ConvGeometry& G) {
    return std::shared_ptr<const cuda_plan::Plan>(
        cuda_plan::build_plan(host_index_lists(row_idx, row_ptr, col_idx, col_ptr, device), G));
  };
}

at::Tensor emulated_conv(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& row_idx,
                         const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                         const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t out_channels,
                         bool compact_output, const std::string& gemm) {
  const auto [G, plan] = cuda_impl::checked_plan(input, weight, bias, kernel_size, stride, padding, dilation, groups,
                                                 out_channels, fresh_plan(row_idx, row_ptr, col_idx, col_ptr,
                                                                          input.device()));
  const bool tensor_cores = input.scalar_type() != at::kDouble;
  return cuda_impl::forward(emu::Launch{}, input.contiguous(), weight.contiguous(), *plan, bias, G, compact_output,
                            parse(gemm), tensor_cores);
}

std::tuple<at::Tensor, at::Tensor> emulated_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& row_idx,
    const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t out_channels,
    bool compact_output, std::array<bool, 2> output_mask) {
  const auto [G, plan] = cuda_impl::checked_plan(input, weight, std::nullopt, kernel_size, stride, padding, dilation,
                                                 groups, out_channels,
                                                 fresh_plan(row_idx, row_ptr, col_idx, col_ptr, input.device()));
  return cuda_impl::backward(emu::Launch{}, grad_output.contiguous(), input.contiguous(), weight.contiguous(), *plan,
                             G, compact_output, output_mask);
}

// The plan cache's device side on the host: counts uploads and synchronisations, captures on demand.
struct HostPlanDevice {
  static inline std::atomic<int64_t> uploads{0}, syncs{0};
  static inline std::atomic<bool> capture{false};
  static bool capturing() { return capture.load(); }
  static void synchronize() { ++syncs; }
  static std::shared_ptr<const cuda_plan::Plan> upload(const cuda_plan::Plan& host, const at::Device&) {
    ++uploads;
    return std::make_shared<cuda_plan::Plan>(host);
  }
};

cuda_plan::PlanCache<HostPlanDevice>& host_cache() {
  static auto* cache = new cuda_plan::PlanCache<HostPlanDevice>();
  return *cache;
}

// Looks the index lists up in the host cache as a conv of `groups` groups, cg input channels and og filters per
// group, kh x kw kernel would; returns [plans uploaded so far, entries, device synchronisations so far].
std::vector<int64_t> plan_cache_get(const at::Tensor& row_idx, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                    const at::Tensor& col_ptr, int64_t groups, int64_t cg, int64_t og, int64_t kh,
                                    int64_t kw) {
  ConvGeometry G{};
  G.n = 1, G.c = groups * cg, G.h = kh, G.w = kw, G.groups = groups, G.cg = cg, G.out_channels = groups * og;
  G.og = og, G.kh = kh, G.kw = kw, G.sh = G.sw = G.dh = G.dw = 1, G.ho = G.wo = 1;
  host_cache().get(row_idx, row_ptr, col_idx, col_ptr, G, at::Device(at::kCPU));
  return {HostPlanDevice::uploads.load(), int64_t(host_cache().size()), HostPlanDevice::syncs.load()};
}

void set_capturing(bool on) { HostPlanDevice::capture = on; }

}  // namespace

TORCH_LIBRARY(ssl_lightning_emulated, m) {
  m.def(
      "plan_cache_get(Tensor row_idx, Tensor row_ptr, Tensor col_idx, Tensor col_ptr, int groups, int cg, int og, "
      "int kh, int kw) -> int[]");
  m.def("set_capturing(bool on) -> ()");
  m.def(
      "compact_conv2d(Tensor input, Tensor weight, Tensor row_idx, Tensor row_ptr, Tensor col_idx, "
      "Tensor col_ptr, Tensor? bias, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, int out_channels, bool compact_output, str gemm) -> Tensor");
  m.def(
      "compact_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor row_idx, Tensor row_ptr, "
      "Tensor col_idx, Tensor col_ptr, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, int out_channels, bool compact_output, bool[2] output_mask) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ssl_lightning_emulated, CompositeExplicitAutograd, m) {
  m.impl("plan_cache_get", &plan_cache_get);
  m.impl("set_capturing", &set_capturing);
}

TORCH_LIBRARY_IMPL(ssl_lightning_emulated, CPU, m) {
  m.impl("compact_conv2d", &emulated_conv);
  m.impl("compact_conv2d_backward", &emulated_backward);
}
