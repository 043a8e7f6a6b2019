// CUDA backend of ssl_lightning::lowered_nonzero. Built only when torch has CUDA and a toolkit exists.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace ssl_lightning {
namespace {

// One block per GEMM row: rows[r] = any(w[r,:] != 0); cols[g, c] |= (w[r,c] != 0) via byte stores
// (every writer stores 1, so racing writes are benign).
template <typename scalar_t>
__global__ void lowered_nonzero_kernel(const scalar_t* __restrict__ w, int64_t rows_per, int64_t cols,
                                       bool* __restrict__ rows, bool* __restrict__ colflags) {
  const int64_t r = blockIdx.x;
  const int64_t g = r / rows_per;
  const scalar_t* row = w + r * cols;
  bool any = false;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    if (static_cast<float>(row[c]) != 0.0f) {
      any = true;
      colflags[g * cols + c] = true;
    }
  }
  any = __syncthreads_or(any);
  if (threadIdx.x == 0) rows[r] = any;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lowered_nonzero_cuda(const at::Tensor& weight, int64_t groups) {
  TORCH_CHECK(weight.dim() >= 2, "lowered_nonzero: weight must have at least 2 dims (N x ...), got ",
              weight.dim(), " dims");
  TORCH_CHECK(groups >= 1, "lowered_nonzero: groups must be >= 1, got ", groups);
  const int64_t n = weight.size(0);
  TORCH_CHECK(n > 0 && weight.numel() > 0, "lowered_nonzero: weight must have at least one row and column, got shape ",
              weight.sizes());
  TORCH_CHECK(n % groups == 0, "lowered_nonzero: groups (", groups, ") must divide the number of rows (",
              n, ")");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous().view({n, -1});
  const int64_t cols = w.size(1);
  at::Tensor rows = at::zeros({n}, weight.options().dtype(at::kBool));
  at::Tensor colflags = at::zeros({groups, cols}, weight.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "lowered_nonzero_cuda", [&] {
    lowered_nonzero_kernel<scalar_t><<<n, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        w.const_data_ptr<scalar_t>(), n / groups, cols, rows.mutable_data_ptr<bool>(),
        colflags.mutable_data_ptr<bool>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {rows, colflags};
}

}  // namespace ssl_lightning

TORCH_LIBRARY_IMPL(ssl_lightning, CUDA, m) {
  m.impl("lowered_nonzero", &ssl_lightning::lowered_nonzero_cuda);
}
