// See gather_panel.h.
#include "gather_panel.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <limits>

namespace ssl_lightning::gather {

bool describe_panel(const ConvGeometry& G, int64_t p0, int64_t np, Panel& pn) {
  pn.row_mask.assign(G.kh, 0u);
  pn.col_mask.assign(G.kw, 0u);
  pn.runs[0] = pn.runs[1] = 0;
  uint32_t run_mask[2][kMaxRuns];  // lanes of each run, within its half
  bool fits = G.sw == 1;
  int64_t oh = p0 / G.wo, ow = p0 % G.wo;  // position p0 + j, advanced lane by lane (no division per lane)
  for (int64_t j = 0; j < kNR; ++j) {
    if (j >= np) {
      pn.idx[j] = 0;
      continue;
    }
    const int64_t ih = oh * G.sh - G.ph, iw = ow * G.sw - G.pw;
    if (++ow == G.wo) ow = 0, ++oh;
    pn.idx[j] = int32_t(ih * G.w + iw);
    for (int64_t a = 0; a < G.kh; ++a)
      if (uint64_t(ih + a * G.dh) < uint64_t(G.h)) pn.row_mask[a] |= 1u << j;
    for (int64_t b = 0; b < G.kw; ++b)
      if (uint64_t(iw + b * G.dw) < uint64_t(G.w)) pn.col_mask[b] |= 1u << j;
    if (!fits) continue;
    const int h = int(j / 16), lane = int(j % 16);
    const bool continues = lane > 0 && pn.idx[j] == pn.idx[j - 1] + 1;
    if (!continues) {
      if (pn.runs[h] == kMaxRuns) {
        fits = false;
        continue;
      }
      run_mask[h][pn.runs[h]] = 0;
      pn.run_off[h][pn.runs[h]] = int64_t(pn.idx[j]) - lane;
      ++pn.runs[h];
    }
    run_mask[h][pn.runs[h] - 1] |= 1u << lane;
  }
  const int64_t taps = G.kh * G.kw;
  pn.tap_lanes.resize(taps);
  for (int64_t a = 0; a < G.kh; ++a)
    for (int64_t b = 0; b < G.kw; ++b) pn.tap_lanes[a * G.kw + b] = pn.row_mask[a] & pn.col_mask[b];
  if (fits) {
    pn.run_lanes.resize(taps * 2 * kMaxRuns);
    for (int64_t t = 0; t < taps; ++t)
      for (int h = 0; h < 2; ++h)
        for (int s = 0; s < pn.runs[h]; ++s)
          pn.run_lanes[(t * 2 + h) * kMaxRuns + s] = uint16_t((pn.tap_lanes[t] >> (16 * h)) & run_mask[h][s]);
  }
  return fits;
}

float* aligned_floats(std::vector<float>& v, int64_t n) {
  v.resize(n + 15);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}

CallTables& call_tables() {
  thread_local CallTables t;
  return t;
}

uint64_t next_call_id() {
  static std::atomic<uint64_t> calls{0};
  return ++calls;
}

TaskScratch& task_scratch() {
  thread_local TaskScratch t;
  return t;
}

template <typename BiasT>
void build_call_tables(CallTables& tb, const int64_t* row_idx, const int64_t* row_ptr, const int64_t* col_idx,
                       const int64_t* col_ptr, const BiasT* bias, const ConvGeometry& G, bool compact_output) {
  const int64_t HW = G.h * G.w, taps = G.kh * G.kw;
  // Per kept column: input offset of its tap origin and its tap (kh_i * KW + kw_i). The channel c = col / taps
  // by one multiply (Lemire, Kaser & Kurz 2019: exact for 32-bit col and taps > 1; the checked indices are
  // < Cg * KH * KW): a division per column took 3-4 us per call on AlexNet conv4's 528 columns, serial
  // before the parallel region (~4 % of the layer).
  const int64_t kcols = col_ptr[G.groups];
  tb.off.resize(kcols), tb.taps.resize(kcols), tb.tap_off.resize(taps);
  for (int64_t t = 0; t < taps; ++t) tb.tap_off[t] = (t / G.kw) * G.dh * G.w + (t % G.kw) * G.dw;
#if defined(__SIZEOF_INT128__)
  const bool fastdiv = taps > 1 && G.cg * taps <= std::numeric_limits<uint32_t>::max();
  const uint64_t magic = fastdiv ? ~uint64_t(0) / uint64_t(taps) + 1 : 0;
#endif
  for (int64_t g = 0; g < G.groups; ++g) {
    for (int64_t i = col_ptr[g], end = col_ptr[g + 1]; i < end; ++i) {
#if defined(__SIZEOF_INT128__)
      const int64_t c = fastdiv ? int64_t((unsigned __int128)magic * uint32_t(col_idx[i]) >> 64) : col_idx[i] / taps;
#else
      const int64_t c = col_idx[i] / taps;
#endif
      const int64_t t = col_idx[i] - c * taps;
      tb.taps[i] = int32_t(t);
      tb.off[i] = (g * G.cg + c) * HW + tb.tap_off[t];
    }
  }
  tb.w_off.assign(G.groups + 1, 0);
  tb.kmax = tb.rows_max = 0;
  for (int64_t g = 0; g < G.groups; ++g) {
    const int64_t r = row_ptr[g + 1] - row_ptr[g], k = col_ptr[g + 1] - col_ptr[g];
    tb.kmax = std::max(tb.kmax, k);
    tb.rows_max = std::max(tb.rows_max, r);
    tb.w_off[g + 1] = tb.w_off[g] + r * k;
  }
  tb.bias_kept.resize(bias != nullptr ? row_ptr[G.groups] : 0);
  for (int64_t i = 0; i < int64_t(tb.bias_kept.size()); ++i) tb.bias_kept[i] = float(bias[row_idx[i]]);
  // Full width: the removed filters of group g output their bias. Kept filters of a group whose columns were
  // all removed get it from the kernels' k == 0 pass.
  if (compact_output) {
    tb.fill.clear(), tb.fill_ptr.assign(G.groups + 1, 0);
  } else {
    removed_filters(row_idx, row_ptr, G, tb.kept, tb.fill, tb.fill_ptr);
  }
}

template void build_call_tables<float>(CallTables&, const int64_t*, const int64_t*, const int64_t*, const int64_t*,
                                       const float*, const ConvGeometry&, bool);
template void build_call_tables<c10::BFloat16>(CallTables&, const int64_t*, const int64_t*, const int64_t*,
                                               const int64_t*, const c10::BFloat16*, const ConvGeometry&, bool);
template void build_call_tables<c10::Half>(CallTables&, const int64_t*, const int64_t*, const int64_t*,
                                           const int64_t*, const c10::Half*, const ConvGeometry&, bool);

TaskSplit split_tasks(const ConvGeometry& G, int64_t row_blocks_max) {
  const int64_t panels = (G.ho * G.wo + kNR - 1) / kNR;
  const int64_t base_tasks = G.n * G.groups * panels;
  const int64_t want = 4 * int64_t(at::get_num_threads());
  const int64_t rsplit =
      std::clamp<int64_t>((want + base_tasks - 1) / base_tasks, 1, std::max<int64_t>(1, row_blocks_max));
  return {panels, base_tasks, rsplit};
}

}  // namespace ssl_lightning::gather
