// The index plan of ssl_lightning::compact_conv2d's CUDA kernels: the index lists checked once and turned into
// the tables the kernels read, and the cache that keeps a plan per index tensors (host code only; index_plan.h
// instantiates the cache for CUDA devices, see there for what "same tensors" means).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include "../compact_conv_args.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace ssl_lightning {
namespace cuda_plan {

// One per conv group, on the device. int64 so that the kernels index without overflow.
struct GroupDesc {
  int64_t row0;  // first kept row of the group in row_idx (and in a compact output)
  int64_t rows;  // kept rows
  int64_t col0;  // first kept column of the group in col_idx
  int64_t cols;  // kept columns
  int64_t woff;  // offset of the group's rows x cols block in the packed weight
  int64_t rem0;  // first removed filter of the group in Plan::removed
  int64_t rems;  // removed filters
  int64_t pad;
};
static_assert(sizeof(GroupDesc) == 8 * sizeof(int64_t), "GroupDesc is read as 8 int64 per group");

struct Plan {  // the tensors are on the host after build_plan, on the GPU in the cache
  std::vector<int64_t> rp, cp, woff;  // host: row/column pointers, weight offsets per group (groups + 1)
  int64_t rmax = 0, kmax = 0, w_expected = 0;
  at::Tensor groups;     // int64 [groups, 8]: GroupDesc per group
  at::Tensor rows;       // int64 [kept rows]: output channel of each kept row (row_idx)
  at::Tensor removed;    // int64 [removed filters]: output channels no kept row writes, group by group
  at::Tensor taps;       // int32 [kept columns, 4]: channel in group, kh*dh - ph, kw*dw - pw, 0 (an int4 each)
  at::Tensor chan_ptr;   // int64 [groups * cg + 1]: the kept columns of input channel (g, c) are
  at::Tensor chan_list;  //   chan_list[chan_ptr[g*cg + c] : chan_ptr[g*cg + c + 1]] (positions in col_idx)
};

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// Validates the host copies of the index lists against the geometry and builds the plan's tables on the host.
inline std::shared_ptr<Plan> build_plan(const IndexLists& h, const ConvGeometry& G) {
  auto plan = std::make_shared<Plan>();
  plan->w_expected = check_index_values(h, G);
  const int64_t groups = G.groups;
  const int64_t* rp = h.row_ptr.const_data_ptr<int64_t>();
  const int64_t* cp = h.col_ptr.const_data_ptr<int64_t>();
  const int64_t* ri = h.row_idx.const_data_ptr<int64_t>();
  const int64_t* ci = h.col_idx.const_data_ptr<int64_t>();
  // The taps are int32: the kernels' tap offsets and channel numbers must fit.
  TORCH_CHECK((G.kh - 1) * G.dh + G.ph <= kInt32Max && (G.kw - 1) * G.dw + G.pw <= kInt32Max && G.cg <= kInt32Max,
              "compact_conv2d (CUDA): kernel_size, dilation and padding give tap offsets beyond 2^31 (kernel_size ",
              G.kh, "x", G.kw, ", dilation ", G.dh, "x", G.dw, ", padding ", G.ph, "x", G.pw,
              "), or more than 2^31 input channels per group; the CUDA kernels index them in 32 bits");
  TORCH_CHECK(groups <= 65535, "compact_conv2d (CUDA): at most 65535 conv groups (one grid z-slice each), got ",
              groups);
  plan->rp.assign(rp, rp + groups + 1);
  plan->cp.assign(cp, cp + groups + 1);
  plan->woff.assign(groups + 1, 0);
  at::Tensor table = at::empty({groups, 8}, at::kLong);
  int64_t* tb = table.mutable_data_ptr<int64_t>();
  std::vector<char> kept;
  std::vector<int64_t> removed, rem_ptr;
  removed_filters(ri, rp, G, kept, removed, rem_ptr);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r = rp[g + 1] - rp[g], k = cp[g + 1] - cp[g];
    plan->woff[g + 1] = plan->woff[g] + r * k;
    plan->rmax = std::max(plan->rmax, r);
    plan->kmax = std::max(plan->kmax, k);
    const GroupDesc d{rp[g], r, cp[g], k, plan->woff[g], rem_ptr[g], rem_ptr[g + 1] - rem_ptr[g], 0};
    std::memcpy(tb + 8 * g, &d, sizeof(d));
  }
  const int64_t kc = h.col_idx.numel(), taps_per = G.kh * G.kw;
  at::Tensor taps = at::zeros({kc, 4}, at::kInt);
  int32_t* tp = taps.mutable_data_ptr<int32_t>();
  std::vector<int64_t> chan_count(groups * G.cg + 1, 0);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = cp[g]; i < cp[g + 1]; ++i) {
      const int64_t c = ci[i] / taps_per, rem = ci[i] % taps_per;
      tp[4 * i] = static_cast<int32_t>(c);
      tp[4 * i + 1] = static_cast<int32_t>((rem / G.kw) * G.dh - G.ph);
      tp[4 * i + 2] = static_cast<int32_t>((rem % G.kw) * G.dw - G.pw);
      ++chan_count[g * G.cg + c + 1];
    }
  }
  at::Tensor chan_ptr = at::empty({groups * G.cg + 1}, at::kLong);
  int64_t* chp = chan_ptr.mutable_data_ptr<int64_t>();
  chp[0] = 0;
  for (int64_t j = 1; j <= groups * G.cg; ++j) chp[j] = chp[j - 1] + chan_count[j];
  at::Tensor chan_list = at::empty({kc}, at::kLong);
  int64_t* chl = chan_list.mutable_data_ptr<int64_t>();
  std::vector<int64_t> fill(chp, chp + groups * G.cg);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = cp[g]; i < cp[g + 1]; ++i) chl[fill[g * G.cg + ci[i] / taps_per]++] = i;

  plan->groups = table;
  plan->rows = h.row_idx;
  plan->removed = at::tensor(removed, at::kLong);
  plan->taps = taps;
  plan->chan_ptr = chan_ptr;
  plan->chan_list = chan_list;
  return plan;
}

// A cache of plans keyed by the index tensors' identity, versions and the geometry they were checked against.
// Device: the device side, as static functions: `capturing()` (a CUDA graph capture is under way on the current
// stream), `synchronize()` (the device, before tables in use may be freed) and `upload(plan, device)` (the plan
// with its tables on the device). index_plan.h instantiates it for CUDA; the CPU emulation tests it on the host.
template <typename Device>
class PlanCache {
 public:
  std::shared_ptr<const Plan> get(const at::Tensor& row_idx, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                  const at::Tensor& col_ptr, const ConvGeometry& G, const at::Device& device) {
    const std::array<const at::Tensor*, 4> lists{&row_idx, &row_ptr, &col_idx, &col_ptr};
    static const char* names[4] = {"row_idx", "row_ptr", "col_idx", "col_ptr"};
    for (int i = 0; i < 4; ++i) check_index_tensor(*lists[i], names[i], device);
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
      for (const Entry& e : entries_)  // an entry's weak references keep its TensorImpl addresses unused
        if (e.key.same(key)) return e.plan;
    }
    TORCH_CHECK(!Device::capturing(),
                "compact_conv2d: these index lists were not seen before a CUDA graph capture began; run the op "
                "(or the model) once outside the capture so that they are checked and copied to the GPU (a "
                "capture cannot read them on the host)");
    auto plan = Device::upload(*build_plan(host_index_lists(row_idx, row_ptr, col_idx, col_ptr, device), G), device);
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

  size_t size() {
    const std::lock_guard<std::mutex> lock(mu_);
    return entries_.size();
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

  // An entry no call can hit again: one of its tensors is gone, or was written since (versions only grow).
  static bool dead(const Entry& e) {
    for (int i = 0; i < 4; ++i) {
      const c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> t = e.refs[i].lock();
      if (!t || t->version_counter().current_version() != e.key.versions[i]) return true;
    }
    return false;
  }

  // Drops the dead entries and, beyond the capacity, the oldest. A kernel of an earlier call may still read a
  // dropped plan's tables on another stream: the device is synchronised first (evictions happen only on a
  // miss, never inside a capture).
  void evict_locked() {
    std::vector<Entry> keep;
    for (Entry& e : entries_)
      if (!dead(e)) keep.push_back(std::move(e));
    if (keep.size() >= kCapacity) keep.erase(keep.begin(), keep.begin() + (keep.size() - kCapacity / 2));
    if (keep.size() == entries_.size()) return;
    Device::synchronize();
    entries_ = std::move(keep);
  }

  std::mutex mu_;
  std::vector<Entry> entries_;
};

}  // namespace cuda_plan
}  // namespace ssl_lightning
