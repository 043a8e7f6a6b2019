// ISA-independent half of the gathered-panel kernels (gather_gemm.cpp: AVX-512, gather_gemm_avx2.cpp: AVX2):
// how a panel of 32 consecutive output positions reads the input, the per-call tables (kept columns' input
// offsets and taps, per-group weight offsets, kept bias, removed filters to fill) and the task split.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "compact_conv_args.h"

// The panel kernels (AVX-512, AVX2) are built for x86-64 with GCC / Clang (per-function target attributes);
// elsewhere their entry points raise and compact_conv.cpp's lowered path runs.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SSL_LIGHTNING_X86_KERNEL 1
#include <immintrin.h>
#endif

namespace ssl_lightning::gather {

constexpr int kNR = 32;  // output positions per panel (two zmm, four ymm)
// Most kept columns per packed chunk: 640 x 32 floats = 80 KiB, in L2. The AVX-512 kernel streams B at 2 zmm
// loads per 24 FMAs, which L2 sustains: on Zen 4 a 12 x 32 tile ran at 105-112 GFLOP/s per core for k chunks
// of 264-532 against 96-98 for L1-sized chunks of 133-167 (fewer C reloads and calls), and the whole op at
// batch 16 ran 5-16 % faster on AlexNet conv1-5 with 640 than with 160.
constexpr int64_t kKC = 640;

// The 32 positions of one panel, as seen by the packing: per lane the input offset (ih * W + iw) of the
// tap origin; per tap t = kh_i * KW + kw_i the lanes whose tap is inside the image (zero padding elsewhere);
// and (stride-1 width only) the runs of lanes that are consecutive in memory, at most kMaxRuns per 16-lane
// half, with each tap's in-image lanes split by run, so packing a column is a fixed sequence of masked
// loads with no branch on the column's tap (with one per run, and the TLS lookup below, packing's share of
// the op's samples was 1.7x its share now; AlexNet conv4, perf record).
constexpr int kMaxRuns = 8;
struct Panel {
  alignas(64) int32_t idx[kNR];
  int runs[2] = {0, 0};
  int64_t run_off[2][kMaxRuns];  // input offset that lane 0 of the half would read
  std::vector<uint32_t> tap_lanes;  // [taps]
  std::vector<uint16_t> run_lanes;  // [taps][2][kMaxRuns]: tap_lanes of half h within run s
  std::vector<uint32_t> row_mask, col_mask;  // describe_panel's scratch: lanes in bounds per kernel row / column
};

// Fills pn for positions [p0, p0 + np) and reports whether every half fits in kMaxRuns runs.
bool describe_panel(const ConvGeometry& G, int64_t p0, int64_t np, Panel& pn);

// v resized to hold n floats from a 64-byte boundary, and that boundary: the B panel's 32-float rows and the
// C tile's rows then start on cache lines (glibc's 16-byte alignment split every zmm store and load in two).
float* aligned_floats(std::vector<float>& v, int64_t n);

// Scratch memory reused across calls (its contents are rebuilt by every call; nothing is cached): allocating
// the tables fresh took 1.6-2.2 us per call on AlexNet conv4 at 2 threads, ~1.5 % of the whole layer.
struct CallTables {  // the calling thread's per-call tables
  std::vector<int64_t> off, tap_off, w_off, fill, fill_ptr;
  std::vector<int32_t> taps;  // per kept column: its tap kh_i * KW + kw_i
  std::vector<float> bias_kept;  // bias of every kept filter, in row_idx order
  std::vector<float> a32;  // the compact weight widened to fp32 (16-bit storage only)
  std::vector<uint16_t> a16;  // bf16 dot path: the compact weight, each row padded to an even length
  std::vector<int64_t> w_off16;
  std::vector<char> kept;
  int64_t kmax = 0, rows_max = 0;  // most kept columns / kept filters of any group
};
// A worker's description of panel `index` in call `call` (next_call_id), and describe_panel's result.
struct DescribedPanel {
  Panel panel;
  bool runs = false;
  uint64_t call = 0;
  int64_t index = -1;
};
struct TaskScratch {  // one worker's B panel, panel descriptions and (16-bit storage) fp32 C tile
  std::vector<float> bpanel;
  std::vector<float> ctile;
  // Panel descriptions of the current call, described once per worker and reused for every image and group
  // (at batch 16, describing each task's panel afresh was 3 % of AlexNet conv4).
  std::vector<DescribedPanel> panels;
};
CallTables& call_tables();
TaskScratch& task_scratch();

// Fills tb's ISA-independent tables for one call: off / taps (per kept column), w_off (per group, into the
// compact weight, r x k row-major), kmax / rows_max, bias_kept (bias != nullptr), and with full-width output
// the removed filters of group g: fill[fill_ptr[g] .. fill_ptr[g + 1]). BiasT: float, c10::BFloat16, c10::Half.
template <typename BiasT>
void build_call_tables(CallTables& tb, const int64_t* row_idx, const int64_t* row_ptr, const int64_t* col_idx,
                       const int64_t* col_ptr, const BiasT* bias, const ConvGeometry& G, bool compact_output);

// Tasks are (share of the row blocks, image, group, panel), share outermost. Rows are split only when there
// are too few panels to keep every thread busy (each share packs its own copy of the panel).
struct TaskSplit {
  int64_t panels, base_tasks, rsplit;
};
TaskSplit split_tasks(const ConvGeometry& G, int64_t row_blocks_max);

// Task t of a split: image n, group g (r kept filters, k kept columns), its share [rb0, rb1) of the group's
// blocks of mr filters, and the panel's positions [p0, p0 + np) with their lane mask.
struct Task {
  int64_t share, n, g, r, k, rb0, rb1, p0, np;
  uint32_t lanes;
  const Panel* panel;  // the panel's description
  bool runs;  // describe_panel's result: every half fits in kMaxRuns runs
};
inline Task task_at(int64_t t, const TaskSplit& S, const ConvGeometry& G, const int64_t* row_ptr,
                    const int64_t* col_ptr, int64_t mr) {
  Task task{};
  // share outermost: consecutive tasks (one thread's range) cover the same rows of many panels, so the threads
  // split the filters evenly and each keeps reading the same rows of A
  task.share = t / S.base_tasks;
  const int64_t pb = t % S.panels;
  task.g = (t / S.panels) % G.groups;
  task.n = (t % S.base_tasks) / (S.panels * G.groups);
  task.r = row_ptr[task.g + 1] - row_ptr[task.g], task.k = col_ptr[task.g + 1] - col_ptr[task.g];
  const int64_t blocks = (task.r + mr - 1) / mr;
  task.rb0 = blocks * task.share / S.rsplit, task.rb1 = blocks * (task.share + 1) / S.rsplit;
  task.p0 = pb * kNR, task.np = std::min<int64_t>(kNR, G.ho * G.wo - task.p0);
  task.lanes = task.np == kNR ? 0xffffffffu : (1u << task.np) - 1u;
  return task;
}

// Most panel descriptions a worker keeps per call (beyond it, a panel is described for each of its tasks).
constexpr int64_t kPanelCache = 1024;
uint64_t next_call_id();

// body(task, scratch, bpanel) for every task of a call whose tables are tb, in one parallel region: task.panel
// is its panel's description, scratch the worker's C tile, bpanel its B panel (min(kmax, kKC) x kNR floats,
// cache-line aligned).
template <typename Body>
void for_each_task(const ConvGeometry& G, const CallTables& tb, const int64_t* row_ptr, const int64_t* col_ptr,
                   int64_t mr, const Body& body) {
  const TaskSplit split = split_tasks(G, (tb.rows_max + mr - 1) / mr);
  const uint64_t call = next_call_id();
  at::parallel_for(0, split.base_tasks * split.rsplit, 1, [&](int64_t t0, int64_t t1) {
    TaskScratch& ts = task_scratch();
    float* const bpanel = aligned_floats(ts.bpanel, std::max<int64_t>(1, std::min(tb.kmax, kKC)) * kNR);
    const int64_t slots = std::min(split.panels, kPanelCache);
    if (int64_t(ts.panels.size()) < slots) ts.panels.resize(slots);
    for (int64_t t = t0; t < t1; ++t) {
      Task task = task_at(t, split, G, row_ptr, col_ptr, mr);
      const int64_t pb = task.p0 / kNR;
      DescribedPanel& d = ts.panels[pb % slots];
      if (d.call != call || d.index != pb) {
        d.runs = describe_panel(G, task.p0, task.np, d.panel);
        d.call = call, d.index = pb;
      }
      task.panel = &d.panel, task.runs = d.runs;
      body(task, ts, bpanel);
    }
  });
}

// Full-width output: the removed filters of group g output their bias at every position of image n (out_n: the
// image's output), whole rows at a time (written 32 positions per task, these scattered stores were 6-8 % of
// AlexNet conv4 at batch 16).
template <typename T>
void fill_removed_rows(T* out_n, int64_t P, const CallTables& tb, int64_t g, const T* bias) {
  for (int64_t i = tb.fill_ptr[g]; i < tb.fill_ptr[g + 1]; ++i)
    std::fill_n(out_n + tb.fill[i] * P, P, bias != nullptr ? bias[tb.fill[i]] : T(0));
}

}  // namespace ssl_lightning::gather
