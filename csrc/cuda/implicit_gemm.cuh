// Implicit-GEMM kernels of ssl_lightning::compact_conv2d on CUDA: no lowered panel in global memory.
//
// Per conv group g (grid z) the product is Y_g[rows_g, N*P] = W_g[rows_g, cols_g] @ L_g[cols_g, N*P], where
// L_g[k, q] = x[n, g*cg + c_k, oh*sh + dy_k, ow*sw + dx_k] (0 outside the image) for output position
// q = n*P + oh*Wo + ow and kept column k with tap (c_k, dy_k, dx_k). A thread block computes a BM x BN tile of
// Y_g (grid y: kept rows, grid x: output positions) and loops over the kept columns BK at a time; every thread
// gathers its tile elements of L_g straight from the input into shared memory (each thread owns one output
// position, decoded once) while the previous tile is multiplied. The epilogue adds the bias and writes each
// kept row at its output channel (row_idx) or, with compact output, at its place in row_idx; the blocks of grid
// row 0 also write the removed filters' bias (or zeros) for their positions, so the output needs no fill pass.
//
// Two kernels: `simt` (CUDA cores, exact in the input dtype's accumulate type: fp32 for fp32/fp16/bf16, fp64
// for fp64) and `wmma` (tensor cores through nvcuda::wmma, sm_80+: fp16 and bf16 with fp32 accumulation, and
// fp32 as TF32 when torch allows TF32 for cuDNN convolutions).
//
// The kernels and their host glue (compact_conv_impl.cuh) also compile as plain C++ against the CPU emulation of
// tests/cuda_emulation (SSL_LIGHTNING_CUDA_EMULATION), which runs them thread by thread on small cases in CPU CI.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "plan.h"

namespace ssl_lightning {
namespace implicit_gemm {

// What the kernels read of the geometry.
struct Conv {
  int64_t C, H, W, cg, ho, wo, P, NP, sh, sw, out_rows;
  bool compact, has_bias;
};

inline Conv make_conv(const ConvGeometry& G, int64_t out_rows, bool compact, bool has_bias) {
  return Conv{G.c, G.h, G.w, G.cg, G.ho, G.wo, G.ho * G.wo, G.n * G.ho * G.wo, G.sh, G.sw, out_rows, compact,
              has_bias};
}

// fp16 / bf16 / fp32 / fp64 to and from the accumulate type (float, double for fp64; intrinsics: torch builds
// with the fp16 operators switched off).
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<T>(v);
  }
}

template <typename T>
__device__ __forceinline__ T zero_of() {
  return from_acc<T>(0.0f);
}

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// One thread's output position of the block's tile, decoded once for the whole K loop.
template <typename T>
struct Position {
  const T* img;  // x[n, g*cg, 0, 0]
  int64_t ih0, iw0;
  bool valid;
};

template <typename T>
__device__ __forceinline__ Position<T> decode_position(const T* x, int64_t q, int64_t g, const Conv& cv) {
  Position<T> pos{x, 0, 0, q < cv.NP};
  if (pos.valid) {
    const int64_t n = q / cv.P, p = q % cv.P;
    pos.img = x + (n * cv.C + g * cv.cg) * cv.H * cv.W;
    pos.ih0 = (p / cv.wo) * cv.sh;
    pos.iw0 = (p % cv.wo) * cv.sw;
  }
  return pos;
}

// L_g[k, q] for this thread's position and kept column tap (0 outside the image).
template <typename T>
__device__ __forceinline__ T gather(const Position<T>& pos, int4 tap, const Conv& cv, T zero) {
  const int64_t ih = pos.ih0 + tap.y, iw = pos.iw0 + tap.z;
  if (!pos.valid || ih < 0 || ih >= cv.H || iw < 0 || iw >= cv.W) return zero;
  return pos.img[(int64_t(tap.x) * cv.H + ih) * cv.W + iw];
}

// Output element of output row `orow` (a channel, or a place in row_idx with compact output) at position q.
__device__ __forceinline__ int64_t out_index(int64_t q, int64_t orow, const Conv& cv) {
  return ((q / cv.P) * cv.out_rows + orow) * cv.P + q % cv.P;
}

// Output element of kept row m (group-local) at position q.
__device__ __forceinline__ int64_t out_offset(const cuda_plan::GroupDesc& gd, const int64_t* rows, int64_t m,
                                              int64_t q, const Conv& cv) {
  return out_index(q, cv.compact ? gd.row0 + m : rows[gd.row0 + m], cv);
}

// The removed filters of the group at positions [q0, q0 + BN): their bias, or zero (full-width output only).
template <typename T>
__device__ __forceinline__ void fill_removed(const cuda_plan::GroupDesc& gd, const int64_t* removed, const T* bias,
                                             int64_t q0, int bn, const Conv& cv, T* out, T zero) {
  for (int64_t e = threadIdx.x; e < gd.rems * bn; e += blockDim.x) {
    const int64_t q = q0 + e % bn;
    if (q >= cv.NP) continue;
    const int64_t ch = removed[gd.rem0 + e / bn];
    out[out_index(q, ch, cv)] = cv.has_bias ? bias[ch] : zero;
  }
}

// One thread's part of a block's K loop, shared by both kernels: the block's group, first kept row m0 and first
// position q0; per K tile, A_PER weights (A: BM x BK, kk fastest, coalesced along the weight rows) and B_PER
// gathered inputs (B: BK x BN, one position per thread, decoded once) loaded into registers of type R.
template <typename T, typename R, int BM, int BN, int BK, int NT>
struct TileLoads {
  static constexpr int A_PER = BM * BK / NT, B_PER = BK * BN / NT;
  static_assert(A_PER * NT == BM * BK && B_PER * NT == BK * BN && NT % BN == 0, "tile and block sizes");
  cuda_plan::GroupDesc gd;
  int64_t m0, q0, k;
  int t, bn;
  Position<T> pos;
  const T* wg;
  const int4* taps;
  T zero;
  R ra[A_PER], rb[B_PER];

  // Where load i of this thread lands in the tile: A row / column, B row (B's column is bn).
  __device__ __forceinline__ int a_m(int i) const { return (t + NT * i) / BK; }
  __device__ __forceinline__ int a_kk(int i) const { return (t + NT * i) % BK; }
  __device__ __forceinline__ int b_kk(int i) const { return t / BN + (NT / BN) * i; }

  static __device__ __forceinline__ R reg(T v) {
    if constexpr (std::is_same_v<R, T>) {
      return v;
    } else {
      return R(to_acc(v));
    }
  }

  // Starts the block: the removed filters' rows of its positions (grid row 0, full-width output), then false
  // when it has no kept rows (uniform over the block).
  __device__ bool begin(const T* x, const T* w, const T* bias, const cuda_plan::GroupDesc* groups,
                        const int64_t* removed, const int4* taps_, const Conv& cv, T* out) {
    const int64_t g = blockIdx.z;
    gd = groups[g];
    m0 = int64_t(blockIdx.y) * BM, q0 = int64_t(blockIdx.x) * BN;
    t = threadIdx.x;
    zero = zero_of<T>();
    if (blockIdx.y == 0 && !cv.compact) fill_removed(gd, removed, bias, q0, BN, cv, out, zero);
    if (m0 >= gd.rows) return false;
    bn = t % BN;
    pos = decode_position(x, q0 + bn, g, cv);
    wg = w + gd.woff;
    k = gd.cols;
    taps = taps_ + gd.col0;
    return true;
  }

  // The loads of the K tile starting at column k0 (zeros past the kept rows, columns and positions).
  __device__ __forceinline__ void load(int64_t k0, const Conv& cv) {
#pragma unroll
    for (int i = 0; i < A_PER; ++i) {
      const int m = a_m(i), kk = a_kk(i);
      ra[i] = reg((m0 + m < gd.rows && k0 + kk < k) ? wg[(m0 + m) * k + k0 + kk] : zero);
    }
#pragma unroll
    for (int i = 0; i < B_PER; ++i) {
      const int kk = b_kk(i);
      rb[i] = reg(k0 + kk < k ? gather(pos, taps[k0 + kk], cv, zero) : zero);
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// CUDA-core kernel: 64 x 64 tile, 256 threads, 4 x 4 outputs per thread (rows ty + 16 i, positions tx + 16 j so
// that a warp reads shared memory without bank conflicts and writes 16 consecutive positions per row).
// ---------------------------------------------------------------------------------------------------------
constexpr int kSimtBM = 64, kSimtBN = 64, kSimtBK = 16, kSimtThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    simt_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                const cuda_plan::GroupDesc* __restrict__ groups, const int64_t* __restrict__ rows,
                const int64_t* __restrict__ removed, const int4* __restrict__ taps, Conv cv, T* __restrict__ out) {
  using Acc = typename AccOf<T>::type;
  constexpr int BM = kSimtBM, BN = kSimtBN, BK = kSimtBK, NT = kSimtThreads;
  __shared__ Acc As[BK][BM + 4];  // A transposed: As[kk][m]
  __shared__ Acc Bs[BK][BN + 4];
  TileLoads<T, Acc, BM, BN, BK, NT> tl;
  if (!tl.begin(x, w, bias, groups, removed, taps, cv, out)) return;
  const int64_t m0 = tl.m0, q0 = tl.q0, k = tl.k;
  const cuda_plan::GroupDesc& gd = tl.gd;
  const int t = tl.t;
  Acc acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);
  const int tx = t % 16, ty = t / 16;
  if (k > 0) tl.load(0, cv);
  for (int64_t k0 = 0; k0 < k; k0 += BK) {
    __syncthreads();  // the previous tile's products are done
#pragma unroll
    for (int i = 0; i < tl.A_PER; ++i) As[tl.a_kk(i)][tl.a_m(i)] = tl.ra[i];
#pragma unroll
    for (int i = 0; i < tl.B_PER; ++i) Bs[tl.b_kk(i)][tl.bn] = tl.rb[i];
    __syncthreads();
    if (k0 + BK < k) tl.load(k0 + BK, cv);  // the next tile's loads are in flight during the products
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      Acc a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= gd.rows) continue;
    const Acc b = cv.has_bias ? to_acc(bias[rows[gd.row0 + m]]) : Acc(0);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t q = q0 + tx + 16 * j;
      if (q < cv.NP) out[out_offset(gd, rows, m, q, cv)] = from_acc<T>(acc[i][j] + b);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tensor-core kernel (nvcuda::wmma, sm_80+): 128 x 128 tile, 8 warps as 2 (rows) x 4 (positions), each warp
// 64 x 32 = 4 x 2 fragments of 16 x 16 with fp32 accumulators. fp16/bf16: 16x16x16 fragments, BK = 32;
// fp32: TF32 16x16x8 fragments, BK = 16 (the operands are rounded to TF32 in the fragments). Shared-memory rows
// are padded by 16 bytes (fewer bank conflicts; every fragment pointer stays 32-byte aligned).
// ---------------------------------------------------------------------------------------------------------
// Fragments of Op operands (16 x 16 x FK) with fp32 accumulators; K tiles of BK, shared rows padded by PAD elements.
template <typename Op, int FK_, int BK_, int PAD_>
struct MmaShape {
  static constexpr int FK = FK_, BK = BK_, PAD = PAD_;
  using AFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, FK, Op, nvcuda::wmma::row_major>;
  using BFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, FK, Op, nvcuda::wmma::row_major>;
  using CFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, FK, float>;
};
template <typename T>
struct Mma;
template <>
struct Mma<__half> : MmaShape<__half, 16, 32, 8> {};
template <>
struct Mma<__nv_bfloat16> : MmaShape<__nv_bfloat16, 16, 32, 8> {};
template <>
struct Mma<float> : MmaShape<nvcuda::wmma::precision::tf32, 8, 16, 4> {};

constexpr int kMmaBM = 128, kMmaBN = 128, kMmaThreads = 256;

// A wmma operand fragment from shared memory (row-major, leading dimension ld); fp32 operands rounded to TF32.
template <typename T, typename Frag>
__device__ __forceinline__ void load_operand(Frag& f, const T* p, int ld) {
  nvcuda::wmma::load_matrix_sync(f, p, ld);
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int e = 0; e < f.num_elements; ++e) f.x[e] = nvcuda::wmma::__float_to_tf32(f.x[e]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kMmaThreads)
    wmma_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                const cuda_plan::GroupDesc* __restrict__ groups, const int64_t* __restrict__ rows,
                const int64_t* __restrict__ removed, const int4* __restrict__ taps, Conv cv, T* __restrict__ out) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(SSL_LIGHTNING_CUDA_EMULATION)
  namespace wmma = nvcuda::wmma;
  using M = Mma<T>;
  constexpr int BM = kMmaBM, BN = kMmaBN, BK = M::BK, NT = kMmaThreads;
  constexpr int LDA = BK + M::PAD, LDB = BN + M::PAD, LDS = 16 + 4;
  __shared__ __align__(128) T As[BM * LDA];         // A row-major: As[m * LDA + kk]
  __shared__ __align__(128) T Bs[BK * LDB];         // B row-major: Bs[kk * LDB + n]
  __shared__ __align__(128) float Cs[8][16 * LDS];  // one 16 x 16 accumulator per warp for the epilogue
  TileLoads<T, T, BM, BN, BK, NT> tl;
  if (!tl.begin(x, w, bias, groups, removed, taps, cv, out)) return;
  const int64_t m0 = tl.m0, q0 = tl.q0, k = tl.k;
  const cuda_plan::GroupDesc& gd = tl.gd;
  const int warp = tl.t / 32, lane = tl.t % 32;
  const int wm = warp / 4, wn = warp % 4;  // warp tile: rows wm*64 .. +64, positions wn*32 .. +32
  typename M::CFrag acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  if (k > 0) tl.load(0, cv);
  for (int64_t k0 = 0; k0 < k; k0 += BK) {
    __syncthreads();
#pragma unroll
    for (int i = 0; i < tl.A_PER; ++i) As[tl.a_m(i) * LDA + tl.a_kk(i)] = tl.ra[i];
#pragma unroll
    for (int i = 0; i < tl.B_PER; ++i) Bs[tl.b_kk(i) * LDB + tl.bn] = tl.rb[i];
    __syncthreads();
    if (k0 + BK < k) tl.load(k0 + BK, cv);
#pragma unroll
    for (int kk = 0; kk < BK; kk += M::FK) {
      typename M::AFrag a[4];
      typename M::BFrag b[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) load_operand<T>(a[i], As + (wm * 64 + i * 16) * LDA + kk, LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) load_operand<T>(b[j], Bs + kk * LDB + wn * 32 + j * 16, LDB);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  // Epilogue: each warp stages one 16 x 16 accumulator at a time and writes it with its 32 lanes (two rows of
  // 16 consecutive positions per step).
  float* stage = Cs[warp];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(stage, acc[i][j], LDS, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        const int e = lane + 32 * s, r = e / 16, c = e % 16;
        const int64_t m = m0 + wm * 64 + i * 16 + r, q = q0 + wn * 32 + j * 16 + c;
        if (m < gd.rows && q < cv.NP) {
          const float b = cv.has_bias ? to_acc(bias[rows[gd.row0 + m]]) : 0.0f;
          out[out_offset(gd, rows, m, q, cv)] = from_acc<T>(stage[r * LDS + c] + b);
        }
      }
      __syncwarp();
    }
  }
#else
  __trap();  // the host launches this kernel only on sm_80+
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Backward: col2im over the kept columns as a gather (deterministic, no atomics). One thread per input element
// (image n0 + ni, channel g*cg + c, ih, iw) sums gl[k, ni*P + oh*Wo + ow] over the kept columns k of channel c
// whose tap reaches (ih, iw) from an output position (oh, ow).
// ---------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void col2im_gather_kernel(const T* __restrict__ gl, const int4* __restrict__ taps,
                                     const int64_t* __restrict__ chan_ptr, const int64_t* __restrict__ chan_list,
                                     int64_t g, int64_t col0, int64_t n0, int64_t nimg, Conv cv,
                                     T* __restrict__ grad_x) {
  using Acc = typename AccOf<T>::type;
  const int64_t hw = cv.H * cv.W, total = nimg * cv.cg * hw, width = nimg * cv.P;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t iw = idx % cv.W, ih = (idx / cv.W) % cv.H, c = (idx / hw) % cv.cg, ni = idx / (cv.cg * hw);
    Acc s = Acc(0);
    for (int64_t e = chan_ptr[g * cv.cg + c]; e < chan_ptr[g * cv.cg + c + 1]; ++e) {
      const int64_t i = chan_list[e];
      const int4 tap = taps[i];
      const int64_t oh_s = ih - tap.y, ow_s = iw - tap.z;  // oh * sh, ow * sw
      if (oh_s < 0 || ow_s < 0 || oh_s % cv.sh || ow_s % cv.sw) continue;
      const int64_t oh = oh_s / cv.sh, ow = ow_s / cv.sw;
      if (oh >= cv.ho || ow >= cv.wo) continue;
      s += to_acc(gl[(i - col0) * width + ni * cv.P + oh * cv.wo + ow]);
    }
    grad_x[((n0 + ni) * cv.C + g * cv.cg + c) * hw + ih * cv.W + iw] = from_acc<T>(s);
  }
}

}  // namespace implicit_gemm
}  // namespace ssl_lightning
