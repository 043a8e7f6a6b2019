// The index plan of ssl_lightning::compact_conv2d's CUDA kernels: the index lists checked once and turned into
// the tables the kernels read (host code only; index_plan.h keeps device copies per index tensors).
#pragma once

#include <ATen/ATen.h>

#include "../compact_conv_args.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
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
  std::vector<int64_t> removed;
  std::vector<char> kept(G.og);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r = rp[g + 1] - rp[g], k = cp[g + 1] - cp[g];
    plan->woff[g + 1] = plan->woff[g] + r * k;
    plan->rmax = std::max(plan->rmax, r);
    plan->kmax = std::max(plan->kmax, k);
    std::fill(kept.begin(), kept.end(), 0);
    for (int64_t i = rp[g]; i < rp[g + 1]; ++i) kept[ri[i] - g * G.og] = 1;
    const int64_t rem0 = static_cast<int64_t>(removed.size());
    for (int64_t o = 0; o < G.og; ++o)
      if (!kept[o]) removed.push_back(g * G.og + o);
    const GroupDesc d{rp[g], r, cp[g], k, plan->woff[g], rem0, static_cast<int64_t>(removed.size()) - rem0, 0};
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

}  // namespace cuda_plan
}  // namespace ssl_lightning
