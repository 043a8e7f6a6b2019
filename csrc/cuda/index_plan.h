// Index metadata of ssl_lightning::compact_conv2d on a GPU, checked once and kept.
//
// The host needs each group's kept row and column counts to launch the kernels; the kernels need the kept
// rows, the decoded kept columns ("taps") and, for the backward, the kept columns of each input channel. When
// the index lists live on the GPU (CompactConv2d moves its buffers with the module), reading them on the host
// synchronises the device. So a Plan is built on the first call with given index tensors, validated there on
// the host, its device tables copied once, and reused by every later call with the same tensors: no host
// round-trip, no synchronisation and nothing that a CUDA graph capture cannot record.
//
// "Same tensors" means the same TensorImpl objects (held by weak references, so an address cannot be reused
// while its entry lives), the same version counters (any in-place write, load_state_dict included, bumps them)
// and data pointers, and the same geometry the lists were checked against. Inference tensors carry no version
// counter: their plans are built for the call and not kept. A write through `.data` bypasses the version
// counter and is not seen (CompactConv2d never does that).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include "plan.h"

#include <memory>

namespace ssl_lightning {
namespace cuda_plan {

// The CUDA side of the plan cache.
struct CudaPlanDevice {
  static bool capturing() {
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  }
  static void synchronize() { c10::cuda::device_synchronize(); }
  // The plan with its tables copied to `device`.
  static std::shared_ptr<const Plan> upload(const Plan& host, const at::Device& device) {
    auto plan = std::make_shared<Plan>(host);
    for (at::Tensor* t : {&plan->groups, &plan->rows, &plan->removed, &plan->taps, &plan->chan_ptr,
                          &plan->chan_list})
      *t = t->to(device);
    // The copies come from pageable host memory; finish them before another stream can read the tables.
    c10::cuda::device_synchronize();
    return plan;
  }
};

// The process's plan cache for CUDA devices (never destroyed: device memory outlives static destructors).
inline PlanCache<CudaPlanDevice>& plan_cache() {
  static auto* cache = new PlanCache<CudaPlanDevice>();
  return *cache;
}

}  // namespace cuda_plan
}  // namespace ssl_lightning
