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
#include <c10/util/intrusive_ptr.h>

#include "plan.h"

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace ssl_lightning {
namespace cuda_plan {

// The plan with its tables copied to `device`.
inline std::shared_ptr<const Plan> to_device(const Plan& host, const at::Device& device) {
  auto plan = std::make_shared<Plan>(host);
  for (at::Tensor* t : {&plan->groups, &plan->rows, &plan->removed, &plan->taps, &plan->chan_ptr,
                        &plan->chan_list})
    *t = t->to(device);
  // The copies come from pageable host memory; finish them before another stream can read the tables.
  c10::cuda::device_synchronize();
  return plan;
}

// A cache of plans keyed by the index tensors' identity, versions and the geometry they were checked against.
class PlanCache {
 public:
  static PlanCache& instance() {
    static PlanCache* cache = new PlanCache();  // never destroyed: device memory outlives static destructors
    return *cache;
  }

  std::shared_ptr<const Plan> get(const at::Tensor& row_idx, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                  const at::Tensor& col_ptr, const ConvGeometry& G, const at::Device& device) {
    const std::array<const at::Tensor*, 4> lists{&row_idx, &row_ptr, &col_idx, &col_ptr};
    static const char* names[4] = {"row_idx", "row_ptr", "col_idx", "col_ptr"};
    for (int i = 0; i < 4; ++i) {  // what can be checked without reading a value
      const at::Tensor& t = *lists[i];
      TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong, "compact_conv2d: ", names[i],
                  " must be a 1-D int64 tensor, got ", t.sizes(), " ", t.scalar_type());
      TORCH_CHECK(t.device().is_cpu() || t.device() == device, "compact_conv2d: ", names[i], " is on ", t.device(),
                  "; index lists must be on the CPU or on the input's device (", device, ")");
    }
    bool cacheable = true;
    for (const at::Tensor* t : lists) cacheable = cacheable && !t->is_inference();
    Key key;
    if (cacheable) {
      for (int i = 0; i < 4; ++i) {
        key.impls[i] = lists[i]->unsafeGetTensorImpl();
        key.versions[i] = lists[i]->_version();
        key.data[i] = lists[i]->const_data_ptr();
      }
      key.geometry = {device.index(), G.groups, G.cg, G.og, G.kh, G.kw, G.dh, G.dw, G.ph, G.pw};
      const std::lock_guard<std::mutex> lock(mu_);
      for (const Entry& e : entries_)
        if (e.key.same(key) && !e.refs[0].expired()) return e.plan;
    }
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                "compact_conv2d: these index lists were not seen before a CUDA graph capture began; run the op "
                "(or the model) once outside the capture so that they are checked and copied to the GPU (a "
                "capture cannot read them on the host)");
    auto plan = to_device(*build_plan(host_index_lists(row_idx, row_ptr, col_idx, col_ptr, device), G), device);
    if (cacheable) {
      Entry e{key,
              {WeakRef(row_idx.getIntrusivePtr()), WeakRef(row_ptr.getIntrusivePtr()),
               WeakRef(col_idx.getIntrusivePtr()), WeakRef(col_ptr.getIntrusivePtr())},
              plan};
      const std::lock_guard<std::mutex> lock(mu_);
      evict_locked();
      entries_.push_back(std::move(e));
    }
    return plan;
  }

 private:
  using WeakRef = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Key {
    std::array<const c10::TensorImpl*, 4> impls{};
    std::array<int64_t, 4> versions{};
    std::array<const void*, 4> data{};
    std::array<int64_t, 10> geometry{};
    bool same(const Key& o) const {
      return impls == o.impls && versions == o.versions && data == o.data && geometry == o.geometry;
    }
  };
  struct Entry {
    Key key;
    std::array<WeakRef, 4> refs;  // keep the TensorImpl addresses from being reused while the entry lives
    std::shared_ptr<const Plan> plan;
  };
  static constexpr size_t kCapacity = 512;

  // Drops the entries whose tensors are gone or were written since (a newer version exists), and beyond the
  // capacity the oldest. A kernel of the current call may still read a dropped plan's tables on another
  // stream: the device is synchronised first (evictions happen only on a miss, never inside a capture).
  void evict_locked() {
    bool any = false;
    for (const Entry& e : entries_) any = any || e.refs[0].expired() || e.refs[1].expired() ||
                                          e.refs[2].expired() || e.refs[3].expired();
    if (!any && entries_.size() < kCapacity) return;
    c10::cuda::device_synchronize();
    std::vector<Entry> keep;
    for (Entry& e : entries_)
      if (!(e.refs[0].expired() || e.refs[1].expired() || e.refs[2].expired() || e.refs[3].expired()))
        keep.push_back(std::move(e));
    if (keep.size() >= kCapacity) keep.erase(keep.begin(), keep.begin() + (keep.size() - kCapacity / 2));
    entries_ = std::move(keep);
  }

  std::mutex mu_;
  std::vector<Entry> entries_;
};

}  // namespace cuda_plan
}  // namespace ssl_lightning
