// AVX-512 kernel of ssl_lightning::compact_conv2d (see gather_gemm.h): fp32, and bf16 / fp16 storage with
// fp32 accumulation (rounded once on the output store). fp16, and bf16 without AVX512_BF16, are widened to
// fp32 while packing; bf16 with AVX512_BF16 stays bf16 and multiplies k pairs with vdpbf16ps (two
// multiply-adds per lane per instruction), measured 1.03-1.8x faster than oneDNN's bf16 GEMM on lowered
// tiles on AlexNet conv2-5 (Zen 4, 2 threads, batch 1 and 16).
//
// Per image n, conv group g and panel of NR = 32 consecutive output positions p0..p0+31:
//   1. pack B (k x 32): row i is kept column i = (c, kh, kw) read at the 32 positions, one masked
//      unaligned load per run of positions that are consecutive in memory (stride-1 width) or one masked
//      gather per 16 lanes; the mask is the tap's in-bounds set (zero padding) = row mask & column mask;
//   2. for every block of MR = 12 kept filters: C[12 x 32] = bias + A[12 x k] @ B[k x 32] in 24 zmm
//      accumulators, stored (masked at the last panel) to each filter's own output row.
// fp32 at stride 1 merges the two: the first row block's micro-kernel reads B from the input and stores it.
// k runs in chunks of at most 640 (the B chunk stays in L2); A is read in place from the compact weight.
#include "gather_gemm.h"
#include "gather_panel.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string_view>
#include <type_traits>
#include <vector>

namespace ssl_lightning {

#ifdef SSL_LIGHTNING_X86_KERNEL

namespace {

constexpr int kMR = 12;  // kept filters per micro-tile
using gather::kKC;
using gather::kMaxRuns;
using gather::kNR;
using gather::Panel;

// The C tile's accumulators: loaded from C (accumulate) or set to the bias (or 0); stored back masked.
template <int M, int NV>
__attribute__((target("avx512f"), always_inline)) inline void load_tile(__m512 (&acc)[NV][M], float* const* c,
                                                                         const float* bias, bool accumulate,
                                                                         __mmask16 m0, __mmask16 m1) {
#pragma GCC unroll 12
  for (int i = 0; i < M; ++i) {
    if (accumulate) {
      acc[0][i] = _mm512_maskz_loadu_ps(m0, c[i]);
      if constexpr (NV == 2) acc[NV - 1][i] = _mm512_maskz_loadu_ps(m1, c[i] + 16);
      continue;
    }
    const __m512 init = bias != nullptr ? _mm512_set1_ps(bias[i]) : _mm512_setzero_ps();
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[v][i] = init;
  }
}
template <int M, int NV>
__attribute__((target("avx512f"), always_inline)) inline void store_tile(const __m512 (&acc)[NV][M], float* const* c,
                                                                          __mmask16 m0, __mmask16 m1) {
#pragma GCC unroll 12
  for (int i = 0; i < M; ++i) {
    _mm512_mask_storeu_ps(c[i], m0, acc[0][i]);
    if constexpr (NV == 2) _mm512_mask_storeu_ps(c[i] + 16, m1, acc[NV - 1][i]);
  }
}

// One k step of the C tile: acc[v][i] += a[i * lda] * bv[v].
template <int M, int NV>
__attribute__((target("avx512f"), always_inline)) inline void fma_step(__m512 (&acc)[NV][M], const float* a,
                                                                        int64_t lda, const __m512 (&bv)[NV]) {
#pragma GCC unroll 12
  for (int i = 0; i < M; ++i) {
    const __m512 av = _mm512_set1_ps(a[i * lda]);
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[v][i] = _mm512_fmadd_ps(av, bv[v], acc[v][i]);
  }
}

// C rows c[0..M) at positions [0, 16 * NV) (masked by m0 | m1 << 16) = (accumulate ? C : bias) +
// a (M x k, row stride lda: the weight as the op receives it, no repacking) @ b (k x kNR panel; NV = 1 uses
// only its first 16 lanes, for a last panel of <= 16 positions). Each k step broadcasts one weight per row
// (12 streams that stay in L1 across a chunk) into 2 x M FMAs.
template <int M, int NV>
__attribute__((target("avx512f"))) void micro_kernel(const float* __restrict a, int64_t lda, const float* __restrict b,
                                                     int64_t k, float* const* c, const float* bias, bool accumulate,
                                                     __mmask16 m0, __mmask16 m1) {
  __m512 acc[NV][M];
  load_tile<M, NV>(acc, c, bias, accumulate, m0, m1);
  for (int64_t kk = 0; kk < k; ++kk, ++a, b += kNR) {
    __m512 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
    fma_step<M, NV>(acc, a, lda, bv);
  }
  store_tile<M, NV>(acc, c, m0, m1);
}

using MicroKernel = void (*)(const float*, int64_t, const float*, int64_t, float* const*, const float*, bool,
                             __mmask16, __mmask16);
template <int NV>
constexpr MicroKernel kKernels[kMR + 1] = {
    nullptr,                micro_kernel<1, NV>, micro_kernel<2, NV>,  micro_kernel<3, NV>,  micro_kernel<4, NV>,
    micro_kernel<5, NV>,    micro_kernel<6, NV>, micro_kernel<7, NV>,  micro_kernel<8, NV>,  micro_kernel<9, NV>,
    micro_kernel<10, NV>,   micro_kernel<11, NV>, micro_kernel<12, NV>};

// bf16 with AVX512_BF16: the same tile over k pairs. b holds per pair q, at each of 32 lanes, the 32-bit pair
// (B[2q][j] low, B[2q+1][j] high); a (M x 2 * kp bf16, row stride lda2 pairs) is broadcast a pair at a time,
// and one vdpbf16ps does both multiply-adds of a lane into its fp32 accumulator.
template <int M, int NV>
__attribute__((target("avx512f,avx512bf16"))) void micro_kernel_bf16(const uint32_t* __restrict a, int64_t lda2,
                                                                     const uint32_t* __restrict b, int64_t kp,
                                                                     float* const* c, const float* bias,
                                                                     bool accumulate, __mmask16 m0, __mmask16 m1) {
  __m512 acc[NV][M];
  load_tile<M, NV>(acc, c, bias, accumulate, m0, m1);
  for (int64_t q = 0; q < kp; ++q, ++a, b += kNR) {
    __m512bh bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + 16 * v);
#pragma GCC unroll 12
    for (int i = 0; i < M; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(a[i * lda2]));
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[v][i] = _mm512_dpbf16_ps(acc[v][i], av, bv[v]);
    }
  }
  store_tile<M, NV>(acc, c, m0, m1);
}

using MicroKernelBf16 = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, float* const*, const float*,
                                 bool, __mmask16, __mmask16);
template <int NV>
constexpr MicroKernelBf16 kKernelsBf16[kMR + 1] = {
    nullptr,
    micro_kernel_bf16<1, NV>,
    micro_kernel_bf16<2, NV>,
    micro_kernel_bf16<3, NV>,
    micro_kernel_bf16<4, NV>,
    micro_kernel_bf16<5, NV>,
    micro_kernel_bf16<6, NV>,
    micro_kernel_bf16<7, NV>,
    micro_kernel_bf16<8, NV>,
    micro_kernel_bf16<9, NV>,
    micro_kernel_bf16<10, NV>,
    micro_kernel_bf16<11, NV>,
    micro_kernel_bf16<12, NV>};

bool cpu_has_bf16_dot() {
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
}

// 16 lanes of 16-bit storage (bf16 or fp16) to fp32.
__attribute__((target("avx512f"))) inline __m512 widen(__m256i v, c10::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
__attribute__((target("avx512f"))) inline __m512 widen(__m256i v, c10::Half*) { return _mm512_cvtph_ps(v); }

// 16 fp32 lanes to 16-bit storage, rounded to nearest even as c10's conversions do (bf16 NaN -> 0x7fc0).
__attribute__((target("avx512f"))) inline __m256i narrow(__m512 v, c10::BFloat16*) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}
__attribute__((target("avx512f"))) inline __m256i narrow(__m512 v, c10::Half*) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// 16 lanes of one kept column at stride 1: a zero-masked load per run (lanes[s]: the column's in-image lanes
// of run s), OR-ed (runs are disjoint).
__attribute__((target("avx512f"), always_inline)) inline __m512 run_column_half(const float* base,
                                                                                 const uint16_t* lanes, int runs,
                                                                                 const int64_t* run_off) {
  if (runs == 0) return _mm512_setzero_ps();
  __m512 col = _mm512_maskz_loadu_ps(__mmask16(lanes[0]), base + run_off[0]);
  for (int s = 1; s < runs; ++s) col = _mm512_mask_loadu_ps(col, __mmask16(lanes[s]), base + run_off[s]);
  return col;
}

// The kept columns' taps index Panel::tap_lanes / run_lanes. The packing routines are noipa: cloned with the
// thread-local scratch panel propagated into them, GCC re-derived its TLS address inside the column loop.

// B panel (k x 32): dst[i][j] = x[col i at position p0 + j], zero outside the image or past the last position.
// With runs, each run of a column is one zero-masked unaligned load, OR-ed (runs are disjoint); otherwise one
// masked gather per half.
__attribute__((target("avx512f"), noipa)) void pack_panel(const float* x, const int64_t* off, const int32_t* tap,
                                                          int64_t k, const Panel& pn, bool use_runs, float* dst) {
  if (use_runs) {
    const int r0 = pn.runs[0], r1 = pn.runs[1];
    const int64_t *o0 = pn.run_off[0], *o1 = pn.run_off[1];
    const uint16_t* lanes = pn.run_lanes.data();
    for (int64_t i = 0; i < k; ++i, dst += kNR) {
      const uint16_t* m = lanes + tap[i] * (2 * kMaxRuns);
      const float* base = x + off[i];
      _mm512_store_ps(dst, run_column_half(base, m, r0, o0));
      _mm512_store_ps(dst + 16, run_column_half(base, m + kMaxRuns, r1, o1));
    }
    return;
  }
  const __m512 zero = _mm512_setzero_ps();
  const uint32_t* tl = pn.tap_lanes.data();
  const __m512i v0 = _mm512_loadu_si512(pn.idx), v1 = _mm512_loadu_si512(pn.idx + 16);
  for (int64_t i = 0; i < k; ++i, dst += kNR) {
    const uint32_t m = tl[tap[i]];
    const float* base = x + off[i];
    _mm512_storeu_ps(dst, _mm512_mask_i32gather_ps(zero, __mmask16(m), v0, base, 4));
    _mm512_storeu_ps(dst + 16, _mm512_mask_i32gather_ps(zero, __mmask16(m >> 16), v1, base, 4));
  }
}

// micro_kernel for the first row block of an fp32 stride-1 panel (runs): B's columns come straight from the
// input, read as pack_panel's runs path reads them, feed the FMAs from registers and are stored into the
// panel b for the other row blocks. Packing then uses the load / store slots the FMA-bound loop leaves idle;
// measured 1-3 % faster than a separate packing pass on AlexNet conv2-5 at batch 1 (1 and 2 threads).
template <int M, int NV>
__attribute__((target("avx512f"))) void micro_kernel_pack(const float* __restrict a, int64_t lda, const float* x,
                                                          const int64_t* off, const int32_t* tap, const Panel& pn,
                                                          float* __restrict b, int64_t k, float* const* c,
                                                          const float* bias, bool accumulate, __mmask16 m0,
                                                          __mmask16 m1) {
  __m512 acc[NV][M];
  load_tile<M, NV>(acc, c, bias, accumulate, m0, m1);
  const int runs[2] = {pn.runs[0], NV == 2 ? pn.runs[1] : 0};  // a <= 16-lane panel computes half 0 only
  const int64_t* run_off[2] = {pn.run_off[0], pn.run_off[1]};
  const uint16_t* lanes = pn.run_lanes.data();
  for (int64_t kk = 0; kk < k; ++kk, ++a, b += kNR) {
    const uint16_t* m = lanes + tap[kk] * (2 * kMaxRuns);
    const float* base = x + off[kk];
    __m512 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      bv[v] = run_column_half(base, m + v * kMaxRuns, runs[v], run_off[v]);
      _mm512_store_ps(b + 16 * v, bv[v]);
    }
    fma_step<M, NV>(acc, a, lda, bv);
  }
  store_tile<M, NV>(acc, c, m0, m1);
}

using MicroKernelPack = void (*)(const float*, int64_t, const float*, const int64_t*, const int32_t*, const Panel&,
                                 float*, int64_t, float* const*, const float*, bool, __mmask16, __mmask16);
template <int NV>
constexpr MicroKernelPack kKernelsPack[kMR + 1] = {
    nullptr,
    micro_kernel_pack<1, NV>,
    micro_kernel_pack<2, NV>,
    micro_kernel_pack<3, NV>,
    micro_kernel_pack<4, NV>,
    micro_kernel_pack<5, NV>,
    micro_kernel_pack<6, NV>,
    micro_kernel_pack<7, NV>,
    micro_kernel_pack<8, NV>,
    micro_kernel_pack<9, NV>,
    micro_kernel_pack<10, NV>,
    micro_kernel_pack<11, NV>,
    micro_kernel_pack<12, NV>};

// 16 lanes (half h of the panel) of one kept column (tap t) of 16-bit storage, as raw bits. Runs are
// zero-masked 16-bit loads, OR-ed; without runs (strided width) lanes are read one by one (AVX-512 has no
// 16-bit gather, and a 32-bit one could read past the tensor).
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m256i column_half(const T* base, int32_t t, int h,
                                                                                 const Panel& pn, bool use_runs) {
  if (!use_runs) {
    const uint32_t mh = (pn.tap_lanes[t] >> (16 * h)) & 0xffffu;
    alignas(32) uint16_t lanes[16];
    for (int l = 0; l < 16; ++l) lanes[l] = (mh >> l) & 1u ? base[pn.idx[16 * h + l]].x : uint16_t(0);
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
  }
  const uint16_t* m = pn.run_lanes.data() + (t * 2 + h) * kMaxRuns;
  __m256i v = _mm256_setzero_si256();
  for (int s = 0; s < pn.runs[h]; ++s)
    v = _mm256_or_si256(v, _mm256_maskz_loadu_epi16(__mmask16(m[s]), base + pn.run_off[h][s]));
  return v;
}

// The fp32 B panel of pack_panel from 16-bit storage, widened.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"), noipa)) void pack_panel(const T* x, const int64_t* off,
                                                                             const int32_t* tap, int64_t k,
                                                                             const Panel& pn, bool use_runs,
                                                                             float* dst) {
  for (int64_t i = 0; i < k; ++i, dst += kNR)
    for (int h = 0; h < 2; ++h)
      _mm512_storeu_ps(dst + 16 * h,
                       widen(column_half(x + off[i], tap[i], h, pn, use_runs), static_cast<T*>(nullptr)));
}

// bf16 B panel of k-pairs (see micro_kernel_bf16): per pair, per lane (column 2q | column 2q + 1 << 16),
// the second column zero past k. Columns are read as in pack_panel.
__attribute__((target("avx512f,avx512bw,avx512vl"), noipa)) void pack_pairs(const c10::BFloat16* x,
                                                                            const int64_t* off, const int32_t* tap,
                                                                            int64_t k, const Panel& pn,
                                                                            bool use_runs, uint32_t* dst) {
  for (int64_t i = 0; i < k; i += 2, dst += kNR) {
    for (int h = 0; h < 2; ++h) {
      const __m512i lo = _mm512_cvtepu16_epi32(column_half(x + off[i], tap[i], h, pn, use_runs));
      __m512i hi = _mm512_setzero_si512();
      if (i + 1 < k)
        hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(column_half(x + off[i + 1], tap[i + 1], h, pn, use_runs)), 16);
      _mm512_storeu_si512(dst + 16 * h, _mm512_or_si512(lo, hi));
    }
  }
}

// n 16-bit values to fp32 (the compact weight, once per call).
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void widen_all(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)),
                                    static_cast<T*>(nullptr)));
  for (; i < n; ++i) dst[i] = float(src[i]);
}

// rows [0, m) of an fp32 tile (row stride kNR) rounded into out rows dst[i] at 32 positions (masked).
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void store_rows(const float* tile, int m, T* const* dst,
                                                                      __mmask16 m0, __mmask16 m1) {
  for (int i = 0; i < m; ++i, tile += kNR) {
    _mm256_mask_storeu_epi16(dst[i], m0, narrow(_mm512_loadu_ps(tile), static_cast<T*>(nullptr)));
    if (m1 != 0)
      _mm256_mask_storeu_epi16(dst[i] + 16, m1, narrow(_mm512_loadu_ps(tile + 16), static_cast<T*>(nullptr)));
  }
}

}  // namespace

std::string gather_gemm_missing(at::ScalarType dtype) {
  static const bool f = __builtin_cpu_supports("avx512f"), bw = __builtin_cpu_supports("avx512bw"),
                    vl = __builtin_cpu_supports("avx512vl");
  std::string missing;
  auto need = [&](bool has, const char* name) {
    if (!has) missing += (missing.empty() ? "" : ", ") + std::string(name);
  };
  need(f, "AVX-512F");
  if (dtype != at::kFloat) need(bw, "AVX-512BW"), need(vl, "AVX-512VL");
  return missing;
}

std::string gather_gemm_avx2_missing() {
  static const bool avx2 = __builtin_cpu_supports("avx2"), fma = __builtin_cpu_supports("fma");
  return !avx2 && !fma ? "AVX2, FMA" : !avx2 ? "AVX2" : !fma ? "FMA" : "";
}

bool gather_gemm_fits(const ConvGeometry& G) {
  // gather offsets are (ih * W + iw) relative to a tap's origin, in int32
  const int64_t span = (G.ho * G.sh + G.ph + G.kh * G.dh) * G.w + G.wo * G.sw + G.pw + G.kw * G.dw;
  return span < std::numeric_limits<int32_t>::max() / 2;
}

template <typename T>
void gather_gemm_conv2d(const T* x, const T* weight, const int64_t* row_idx, const int64_t* row_ptr,
                        const int64_t* col_idx, const int64_t* col_ptr, const T* bias, const ConvGeometry& G, T* out,
                        int64_t out_rows, bool compact_output) {
  constexpr bool kWide = std::is_same_v<T, float>;  // fp32 storage: C rows are the output rows themselves
  const int64_t P = G.ho * G.wo, HW = G.h * G.w;
  gather::CallTables& tb = gather::call_tables();
  gather::build_call_tables(tb, row_idx, row_ptr, col_idx, col_ptr, bias, G, compact_output);
  const float* a_all = nullptr;  // the compact weight as fp32
  // bf16 on a CPU with AVX512_BF16: multiply bf16 pairs directly (A rows padded to even k, B packed in pairs)
  // (SSL_LIGHTNING_BF16_DOT=0 widens bf16 to fp32 instead, as on CPUs without it: for tests and comparisons)
  bool dot = false;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // the environment is read for bf16 calls only
    const char* dot_env = std::getenv("SSL_LIGHTNING_BF16_DOT");
    dot = cpu_has_bf16_dot() && !(dot_env != nullptr && std::string_view(dot_env) == "0");
  }
  if constexpr (kWide) {
    a_all = weight;
  } else if (dot) {
    tb.w_off16.assign(G.groups + 1, 0);
    for (int64_t g = 0; g < G.groups; ++g) {
      const int64_t r = row_ptr[g + 1] - row_ptr[g], k = col_ptr[g + 1] - col_ptr[g];
      tb.w_off16[g + 1] = tb.w_off16[g] + r * (k + (k & 1));
    }
    tb.a16.assign(tb.w_off16[G.groups], 0);
    for (int64_t g = 0; g < G.groups; ++g) {
      const int64_t r = row_ptr[g + 1] - row_ptr[g], k = col_ptr[g + 1] - col_ptr[g], kpad = k + (k & 1);
      const uint16_t* src = reinterpret_cast<const uint16_t*>(weight) + tb.w_off[g];
      for (int64_t i = 0; i < r; ++i) std::copy_n(src + i * k, k, tb.a16.data() + tb.w_off16[g] + i * kpad);
    }
  } else {
    tb.a32.resize(tb.w_off[G.groups]);
    widen_all(weight, tb.a32.data(), tb.w_off[G.groups]);
    a_all = tb.a32.data();
  }
  gather::for_each_task(G, tb, row_ptr, col_ptr, kMR, [&](const gather::Task& task, gather::TaskScratch& ts,
                                                          float* bpanel) {
    const int64_t n = task.n, g = task.g, r = task.r, k = task.k, rb0 = task.rb0, rb1 = task.rb1, np = task.np;
    const __mmask16 m0 = __mmask16(task.lanes), m1 = __mmask16(task.lanes >> 16);
    T* out_n = out + n * out_rows * P + task.p0;
    if (task.share == 0 && task.p0 == 0) gather::fill_removed_rows(out_n, P, tb, g, bias);
    if (rb0 == rb1) return;
    const Panel& pn = *task.panel;
    float* crow[kMR];
    T* orow[kMR];
    const bool runs = task.runs;
    const MicroKernel* kernels = np > 16 ? kKernels<2> : kKernels<1>;  // a short last panel computes 16 lanes
    const int64_t* off = tb.off.data() + col_ptr[g];
    const int32_t* tap = tb.taps.data() + col_ptr[g];
    const float* a_g = a_all != nullptr ? a_all + tb.w_off[g] : nullptr;
    float* const ctile = kWide ? nullptr : gather::aligned_floats(ts.ctile, (rb1 - rb0) * kMR * kNR);
    // 16-bit storage: row i of row block r0 in this task's fp32 tile, rounded into the output at the end
    auto tile_row = [&](int64_t r0, int i) { return ctile + (r0 - rb0 * kMR + i) * kNR; };
    // the output row of kept filter r0 + i of group g (its own channel, or its place in the kept list)
    auto out_row = [&](int64_t r0, int i) {
      return out_n + (compact_output ? row_ptr[g] + r0 + i : row_idx[row_ptr[g] + r0 + i]) * P;
    };
    // k in equal chunks of at most kKC kept columns, so the panel chunk (<= kKC x 32 floats) stays in L2
    // for every row block (equal: no short last chunk that pays a full C load / store for a few columns).
    // The bf16 dot path multiplies column pairs: its chunks are even (kKC / 2 pairs of 32 lanes, the same
    // bytes as an fp32 chunk) over the weight rows padded to kpad columns.
    const int64_t kpad = dot ? k + (k & 1) : k;
    const int64_t chunks = std::max<int64_t>(1, (kpad + kKC - 1) / kKC);
    int64_t chunk = std::max<int64_t>(dot ? 2 : 1, (kpad + chunks - 1) / chunks);  // k == 0: one bias pass
    if (dot) chunk += chunk & 1;
    // fp32 storage at stride 1: the first row block packs the panel as it multiplies (micro_kernel_pack)
    const bool pack_in_kernel = kWide && runs;
    const T* x_n = x + n * G.c * HW;
    for (int64_t kc0 = 0; kc0 < std::max<int64_t>(k, 1); kc0 += chunk) {
      const int64_t kc = std::min(chunk, k - kc0);
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (dot) pack_pairs(x_n, off + kc0, tap + kc0, kc, pn, runs, reinterpret_cast<uint32_t*>(bpanel));
      }
      if (!dot && !pack_in_kernel) pack_panel(x_n, off + kc0, tap + kc0, kc, pn, runs, bpanel);
      for (int64_t r0 = rb0 * kMR; r0 < std::min(r, rb1 * kMR); r0 += kMR) {
        const int m = int(std::min<int64_t>(kMR, r - r0));
        for (int i = 0; i < m; ++i) {
          if constexpr (kWide) {
            crow[i] = out_row(r0, i);
          } else {
            crow[i] = tile_row(r0, i);
          }
        }
        const float* bias_r = bias != nullptr ? tb.bias_kept.data() + row_ptr[g] + r0 : nullptr;
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          if (dot) {
            const uint32_t* a2 = reinterpret_cast<const uint32_t*>(tb.a16.data() + tb.w_off16[g]);
            (np > 16 ? kKernelsBf16<2> : kKernelsBf16<1>)[m](a2 + r0 * (kpad / 2) + kc0 / 2, kpad / 2,
                                                              reinterpret_cast<const uint32_t*>(bpanel),
                                                              (kc + 1) / 2, crow, bias_r, kc0 > 0, m0, m1);
            continue;
          }
        }
        if constexpr (kWide) {
          if (pack_in_kernel && r0 == rb0 * kMR) {
            (np > 16 ? kKernelsPack<2> : kKernelsPack<1>)[m](a_g + r0 * k + kc0, k, x_n, off + kc0,
                                                              tap + kc0, pn, bpanel, kc, crow, bias_r,
                                                              kc0 > 0, m0, m1);
            continue;
          }
        }
        kernels[m](a_g + r0 * k + kc0, k, bpanel, kc, crow, bias_r, kc0 > 0, m0, m1);
      }
    }
    if constexpr (!kWide) {
      for (int64_t r0 = rb0 * kMR; r0 < std::min(r, rb1 * kMR); r0 += kMR) {
        const int m = int(std::min<int64_t>(kMR, r - r0));
        for (int i = 0; i < m; ++i) orow[i] = out_row(r0, i);
        store_rows(tile_row(r0, 0), m, orow, m0, m1);
      }
    }
  });
}

#else  // not x86-64 GCC/Clang: the BLAS path of compact_conv.cpp runs instead

std::string gather_gemm_missing(at::ScalarType) { return "an x86-64 CPU (this build is for another architecture)"; }
std::string gather_gemm_avx2_missing() { return "an x86-64 CPU (this build is for another architecture)"; }
bool gather_gemm_fits(const ConvGeometry&) { return false; }
template <typename T>
void gather_gemm_conv2d(const T*, const T*, const int64_t*, const int64_t*, const int64_t*, const int64_t*, const T*,
                        const ConvGeometry&, T*, int64_t, bool) {
  TORCH_CHECK(false, "compact_conv2d: the AVX-512 kernel is not part of this build");
}

#endif

template void gather_gemm_conv2d<float>(const float*, const float*, const int64_t*, const int64_t*, const int64_t*,
                                        const int64_t*, const float*, const ConvGeometry&, float*, int64_t, bool);
template void gather_gemm_conv2d<c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*, const int64_t*,
                                                const int64_t*, const int64_t*, const int64_t*, const c10::BFloat16*,
                                                const ConvGeometry&, c10::BFloat16*, int64_t, bool);
template void gather_gemm_conv2d<c10::Half>(const c10::Half*, const c10::Half*, const int64_t*, const int64_t*,
                                            const int64_t*, const int64_t*, const c10::Half*, const ConvGeometry&,
                                            c10::Half*, int64_t, bool);

}  // namespace ssl_lightning
