// AVX2 / FMA kernel of ssl_lightning::compact_conv2d (fp32; see gather_gemm.h), for x86-64 CPUs without
// AVX-512: the same gathered panels as the AVX-512 kernel (32 output positions x k kept columns, gathered from
// the input with zero padding by mask, no lowered matrix), multiplied by a 6 x 16 register-blocked
// micro-kernel (12 ymm accumulators, two B loads and six broadcasts per 12 FMAs: FMA-bound on two FMA ports).
// A panel is two 16-position halves; each half runs every row block while its k x 16 slice of B stays in L1/L2.
// bf16 / fp16 reach it through fp32 conversion in compact_conv.cpp.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "gather_gemm.h"
#include "gather_panel.h"

namespace ssl_lightning {

#ifdef SSL_LIGHTNING_X86_KERNEL

namespace {

using gather::kKC;
using gather::kMaxRuns;
using gather::kNR;
using gather::Panel;

constexpr int kMR = 6;  // kept filters per micro-tile
constexpr int kHalf = 16;  // output positions per micro-tile (two ymm)

// Lanes l < 8 of a ymm whose bit l is set in bits, as an all-ones / zero 32-bit mask (maskload / gather form).
__attribute__((target("avx2,fma"), always_inline)) inline __m256i lane_mask(uint32_t bits) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(bits & 0xffu)), sel), sel);
}

// C rows c[0..M) at 16 positions (lanes: the 16-bit set the tile may touch) = (accumulate ? C : bias (or 0)) +
// a (M x k, row stride lda: the compact weight in place) @ b (k x 16, row stride kNR: one half of the panel).
template <int M>
__attribute__((target("avx2,fma"))) void micro_kernel(const float* __restrict a, int64_t lda, const float* __restrict b,
                                                      int64_t k, float* const* c, const float* bias, bool accumulate,
                                                      uint32_t lanes) {
  const bool full = lanes == 0xffffu;
  const __m256i mk0 = lane_mask(lanes), mk1 = lane_mask(lanes >> 8);
  __m256 acc0[M], acc1[M];
#pragma GCC unroll 6
  for (int i = 0; i < M; ++i) {
    if (accumulate) {
      acc0[i] = full ? _mm256_loadu_ps(c[i]) : _mm256_maskload_ps(c[i], mk0);
      acc1[i] = full ? _mm256_loadu_ps(c[i] + 8) : _mm256_maskload_ps(c[i] + 8, mk1);
    } else {
      acc0[i] = acc1[i] = bias != nullptr ? _mm256_set1_ps(bias[i]) : _mm256_setzero_ps();
    }
  }
  for (int64_t kk = 0; kk < k; ++kk, ++a, b += kNR) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 6
    for (int i = 0; i < M; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * lda);
      acc0[i] = _mm256_fmadd_ps(av, b0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(av, b1, acc1[i]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < M; ++i) {
    if (full) {
      _mm256_storeu_ps(c[i], acc0[i]);
      _mm256_storeu_ps(c[i] + 8, acc1[i]);
    } else {
      _mm256_maskstore_ps(c[i], mk0, acc0[i]);
      _mm256_maskstore_ps(c[i] + 8, mk1, acc1[i]);
    }
  }
}

using MicroKernel = void (*)(const float*, int64_t, const float*, int64_t, float* const*, const float*, bool, uint32_t);
constexpr MicroKernel kKernels[kMR + 1] = {nullptr,         micro_kernel<1>, micro_kernel<2>, micro_kernel<3>,
                                           micro_kernel<4>, micro_kernel<5>, micro_kernel<6>};

// B panel (k x 32): dst[i][j] = x[col i at position p0 + j], zero outside the image or past the last position.
// With runs (stride-1 width), each run of a column is one masked load per 8 lanes, OR-ed (runs are disjoint;
// masked-off lanes are never read, so a run may start before or end past the tensor); otherwise a masked
// gather per 8 lanes. noipa: see the AVX-512 packing (a clone with the thread-local panel re-derived its TLS
// address per column).
__attribute__((target("avx2,fma"), noipa)) void pack_panel(const float* x, const int64_t* off, const int32_t* tap,
                                                           int64_t k, const Panel& pn, bool use_runs, float* dst) {
  if (use_runs) {
    const uint16_t* lanes = pn.run_lanes.data();
    for (int64_t i = 0; i < k; ++i, dst += kNR) {
      const uint16_t* m = lanes + tap[i] * (2 * kMaxRuns);
      const float* base = x + off[i];
      for (int h = 0; h < 2; ++h) {
        __m256i v0 = _mm256_setzero_si256(), v1 = _mm256_setzero_si256();
        for (int s = 0; s < pn.runs[h]; ++s) {
          const uint32_t bits = m[h * kMaxRuns + s];
          const float* src = base + pn.run_off[h][s];
          v0 = _mm256_or_si256(v0, _mm256_castps_si256(_mm256_maskload_ps(src, lane_mask(bits))));
          v1 = _mm256_or_si256(v1, _mm256_castps_si256(_mm256_maskload_ps(src + 8, lane_mask(bits >> 8))));
        }
        _mm256_store_ps(dst + kHalf * h, _mm256_castsi256_ps(v0));
        _mm256_store_ps(dst + kHalf * h + 8, _mm256_castsi256_ps(v1));
      }
    }
    return;
  }
  const __m256 zero = _mm256_setzero_ps();
  const uint32_t* tl = pn.tap_lanes.data();
  __m256i idx[4];
  for (int q = 0; q < 4; ++q) idx[q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(pn.idx + 8 * q));
  for (int64_t i = 0; i < k; ++i, dst += kNR) {
    const uint32_t m = tl[tap[i]];
    const float* base = x + off[i];
    for (int q = 0; q < 4; ++q)
      _mm256_store_ps(dst + 8 * q,
                      _mm256_mask_i32gather_ps(zero, base, idx[q], _mm256_castsi256_ps(lane_mask(m >> (8 * q))), 4));
  }
}

}  // namespace

void gather_gemm_conv2d_avx2(const float* x, const float* weight, const int64_t* row_idx, const int64_t* row_ptr,
                             const int64_t* col_idx, const int64_t* col_ptr, const float* bias, const ConvGeometry& G,
                             float* out, int64_t out_rows, bool compact_output) {
  const int64_t P = G.ho * G.wo, HW = G.h * G.w;
  gather::CallTables& tb = gather::call_tables();
  gather::build_call_tables(tb, row_idx, row_ptr, col_idx, col_ptr, bias, G, compact_output);
  gather::for_each_task(G, tb, row_ptr, col_ptr, kMR, [&](const gather::Task& task, gather::TaskScratch&,
                                                          float* bpanel) {
    const int64_t g = task.g, r = task.r, k = task.k, rb0 = task.rb0, rb1 = task.rb1, np = task.np;
    float* out_n = out + task.n * out_rows * P + task.p0;
    if (task.share == 0 && task.p0 == 0) gather::fill_removed_rows(out_n, P, tb, g, bias);
    if (rb0 == rb1) return;
    const Panel& pn = *task.panel;
    const bool runs = task.runs;
    const int64_t* off = tb.off.data() + col_ptr[g];
    const int32_t* tap = tb.taps.data() + col_ptr[g];
    const float* a_g = weight + tb.w_off[g];
    const float* x_n = x + task.n * G.c * HW;
    float* crow[kMR];
    // k in equal chunks of at most kKC columns (as in the AVX-512 kernel); k == 0: one bias pass
    const int64_t chunks = std::max<int64_t>(1, (k + kKC - 1) / kKC);
    const int64_t chunk = std::max<int64_t>(1, (k + chunks - 1) / chunks);
    for (int64_t kc0 = 0; kc0 < std::max<int64_t>(k, 1); kc0 += chunk) {
      const int64_t kc = std::min(chunk, k - kc0);
      pack_panel(x_n, off + kc0, tap + kc0, kc, pn, runs, bpanel);
      for (int h = 0; h < (np > kHalf ? 2 : 1); ++h) {
        const uint32_t lanes = (task.lanes >> (kHalf * h)) & 0xffffu;
        for (int64_t r0 = rb0 * kMR; r0 < std::min(r, rb1 * kMR); r0 += kMR) {
          const int m = int(std::min<int64_t>(kMR, r - r0));
          for (int i = 0; i < m; ++i) {
            const int64_t row = compact_output ? row_ptr[g] + r0 + i : row_idx[row_ptr[g] + r0 + i];
            crow[i] = out_n + row * P + kHalf * h;
          }
          const float* bias_r = bias != nullptr ? tb.bias_kept.data() + row_ptr[g] + r0 : nullptr;
          kKernels[m](a_g + r0 * k + kc0, k, bpanel + kHalf * h, kc, crow, bias_r, kc0 > 0, lanes);
        }
      }
    }
  });
}

#else  // not x86-64 GCC/Clang: the BLAS path of compact_conv.cpp runs instead

void gather_gemm_conv2d_avx2(const float*, const float*, const int64_t*, const int64_t*, const int64_t*,
                             const int64_t*, const float*, const ConvGeometry&, float*, int64_t, bool) {
  TORCH_CHECK(false, "compact_conv2d: the AVX2 kernel is not part of this build");
}

#endif

}  // namespace ssl_lightning
