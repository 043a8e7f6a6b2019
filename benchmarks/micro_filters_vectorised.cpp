// Design probe for issue #17 (batch-16 AlexNet conv4 at >= 85 % of FLOP-ideal): how fast can a filters-vectorised
// direct kernel run the compacted conv4 shape, compared with the packed-B panel kernel of csrc/gather_gemm.cpp?
// Not part of the product; one thread, one image and conv group per call, input already zero-padded.
//
//   g++ -O3 -mavx512f -mfma -std=c++17 benchmarks/micro_filters_vectorised.cpp -o /tmp/fv_probe && /tmp/fv_probe
//
// Shape: AlexNet Table 4 row 2 conv4 per group: 192 input channels, 13 x 13 output, 3 x 3 kernel, 264 kept
// columns, 96 kept filters (the 102 rounded down to whole 32-filter panels). Tile: 32 filters (2 zmm of the
// weight, packed once as [panel][k][32]) x 13 positions (one output row): per kept column 2 weight loads, 13
// broadcasts straight from the input (no B packing, no masks: the input is padded) and 26 FMAs. Epilogues:
// "transposed" writes each filter's 13 outputs to its NCHW row (scalar transpose through a stack tile);
// "tile only" stores the accumulators as [position][filter] (an upper bound: the NCHW transpose left to do).
// Each runs on one image and group whose input stays in cache across repetitions ("hot"), and over 32
// distinct inputs and outputs, as batch 16 x 2 groups meets them (5.5 MiB of padded input, more than L2:
// "batch"), beside a register-only FMA loop (the core's peak in the same process).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {
constexpr int C = 192, H = 15, W = 15, HO = 13, WO = 13, K = 264, R = 96;

template <bool kTranspose>
__attribute__((noinline)) void run(const float* xin, const int* off, const float* ap, float* out) {
  alignas(64) float tile[WO][32];
  for (int p = 0; p < R / 32; ++p) {
    const float* a = ap + p * K * 32;
    for (int oh = 0; oh < HO; ++oh) {
      __m512 acc[WO][2];
      for (int j = 0; j < WO; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
      const float* xrow = xin + oh * W;
      for (int kk = 0; kk < K; ++kk) {
        const __m512 a0 = _mm512_load_ps(a + kk * 32), a1 = _mm512_load_ps(a + kk * 32 + 16);
        const float* x = xrow + off[kk];
#pragma GCC unroll 13
        for (int j = 0; j < WO; ++j) {
          const __m512 b = _mm512_set1_ps(x[j]);
          acc[j][0] = _mm512_fmadd_ps(a0, b, acc[j][0]);
          acc[j][1] = _mm512_fmadd_ps(a1, b, acc[j][1]);
        }
      }
      for (int j = 0; j < WO; ++j) {
        _mm512_store_ps(tile[j], acc[j][0]);
        _mm512_store_ps(tile[j] + 16, acc[j][1]);
      }
      if constexpr (kTranspose) {
        for (int f = 0; f < 32; ++f)
          for (int j = 0; j < WO; ++j) out[(p * 32 + f) * HO * WO + oh * WO + j] = tile[j][f];
      } else {
        std::copy(&tile[0][0], &tile[0][0] + WO * 32, out + (p * HO + oh) * WO * 32);
      }
    }
  }
}

constexpr int kImages = 32;  // batch 16 x 2 groups

// Seconds per image and group, best of 20 blocks; `images` distinct inputs / outputs visited in turn.
template <bool kTranspose>
double seconds(const float* xin, const int* off, const float* ap, float* out, int images) {
  double best = 1e9;
  const int iters = 192 / images * images;
  for (int rep = 0; rep < 20; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < iters; ++it) {
      const int i = it % images;
      run<kTranspose>(xin + i * C * H * W, off, ap, out + i * R * HO * WO);
    }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters);
  }
  return best;
}

// GFLOP/s of 24 independent FMA chains in registers: the core's peak, measured beside the kernels.
__attribute__((noinline)) double fma_peak() {
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    __m512 acc[24];
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(float(i));
    const __m512 m = _mm512_set1_ps(1.0001f), a = _mm512_set1_ps(0.9999f);
    const long n = 1000000;
    const auto t0 = std::chrono::steady_clock::now();
    for (long j = 0; j < n; ++j) {
#pragma GCC unroll 24
      for (int i = 0; i < 24; ++i) acc[i] = _mm512_fmadd_ps(acc[i], m, a);
    }
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    __m512 s = acc[0];
    for (int i = 1; i < 24; ++i) s = _mm512_add_ps(s, acc[i]);
    alignas(64) float lanes[16];  // kept live so the loop is not removed
    _mm512_store_ps(lanes, s);
    volatile float sink = lanes[0];
    (void)sink;
    best = std::max(best, 2.0 * 16 * 24 * n / t / 1e9);
  }
  return best;
}
}  // namespace

int main() {
  std::mt19937 gen(0);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<float> xin(kImages * C * H * W, 0.0f);  // zero-padded images: the border stays 0
  for (int i = 0; i < kImages; ++i)
    for (int c = 0; c < C; ++c)
      for (int h = 1; h <= HO; ++h)
        for (int w = 1; w <= WO; ++w) xin[((i * C + c) * H + h) * W + w] = u(gen);
  std::vector<int> cols(C * 9);
  for (int i = 0; i < C * 9; ++i) cols[i] = i;
  std::shuffle(cols.begin(), cols.end(), gen);
  cols.resize(K);
  std::sort(cols.begin(), cols.end());
  std::vector<int> off(K);  // the kept column's tap origin in the padded input
  for (int i = 0; i < K; ++i) off[i] = (cols[i] / 9) * H * W + (cols[i] % 9 / 3) * W + cols[i] % 3;
  auto* ap = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * R * K));
  for (int i = 0; i < R * K; ++i) ap[i] = u(gen);
  std::vector<float> out(kImages * R * HO * WO);
  run<true>(xin.data(), off.data(), ap, out.data());
  double worst = 0;  // against a scalar reference
  for (int f = 0; f < R; ++f)
    for (int q = 0; q < HO * WO; ++q) {
      double ref = 0;
      for (int kk = 0; kk < K; ++kk) ref += ap[(f / 32) * K * 32 + kk * 32 + f % 32] * xin[off[kk] + q / WO * W + q % WO];
      worst = std::max(worst, std::abs(ref - out[f * HO * WO + q]));
    }
  const double flop = 2.0 * R * K * HO * WO;
  std::printf("max |error| %.2e\nFMA peak: %.1f GFLOP/s\n", worst, fma_peak());
  for (const int images : {1, kImages}) {
    const double t1 = seconds<true>(xin.data(), off.data(), ap, out.data(), images);
    const double t2 = seconds<false>(xin.data(), off.data(), ap, out.data(), images);
    std::printf("%s: transposed %.1f us, %.1f GFLOP/s; tile only %.1f us, %.1f GFLOP/s\n",
                images == 1 ? "hot  " : "batch", t1 * 1e6, flop / t1 / 1e9, t2 * 1e6, flop / t2 / 1e9);
  }
  std::free(ap);
}
