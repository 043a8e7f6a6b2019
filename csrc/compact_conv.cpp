// CPU kernel of ssl_lightning::compact_conv2d: a convolution whose lowered weight keeps only some GEMM
// rows (filters) and some GEMM columns (filter-shape fibers (c, kh, kw)) per conv group.
//
// For each image and conv group g:  out[R_g, P] = W_g[R_g, K_g] @ L_g[K_g, P], where L_g holds only the
// kept columns of the im2col matrix. L_g is built tile by tile (a few output rows at a time, so the panel
// stays in L2) straight from the input, and each tile goes through one BLAS GEMM: no full im2col, no
// separate concatenation pass. The schema lives in ops.cpp (the single TORCH_LIBRARY block).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include "compact_conv_args.h"
#include "gather_gemm.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

// oneDNN's matmul, exported by libtorch_cpu (ATen/native/mkldnn/Matmul.h is not shipped in the wheel):
// result = beta * result + alpha * mat1 @ mat2. On this project's AMD AVX-512 machines it runs the lowered
// GEMMs 12-37 % faster than MKL sgemm (MKL takes its generic path on non-Intel CPUs).
namespace at::native {
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                             float alpha);
}  // namespace at::native

namespace ssl_lightning {
namespace {

// SSL_LIGHTNING_GEMM picks the kernel, read at every call (benchmarks and tests switch it):
//   unset / "auto": the gathered-panel AVX-512 kernel (gather_gemm.cpp) where the CPU has it, else the AVX2 one
//     (gather_gemm_avx2.cpp), else "onednn";
//   "gather": the AVX-512 kernel; "avx2": the AVX2 kernel (an error where the CPU or the call cannot run it);
//   "onednn": lowered tiles through oneDNN's matmul for large GEMMs, ATen BLAS for small ones;
//   "blas": lowered tiles through ATen's BLAS (MKL) only.
// float64 always takes the lowered-tile path with ATen's BLAS.
// SSL_LIGHTNING_MAX_ISA=avx2|none caps the ISA the op uses, as oneDNN's ONEDNN_MAX_CPU_ISA does: the op then
// behaves as on a CPU without AVX-512 (avx2) or without either kernel (none), so one machine can test and
// benchmark what other CPUs run.
std::string gemm_choice() {
  const char* env = std::getenv("SSL_LIGHTNING_GEMM");
  const std::string v = env == nullptr ? "auto" : std::string(env);
  TORCH_CHECK(v == "auto" || v == "gather" || v == "avx2" || v == "onednn" || v == "blas",
              "SSL_LIGHTNING_GEMM must be auto, gather, avx2, onednn or blas, got '", v, "'");
  return v;
}

enum class Isa { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

Isa isa_cap() {
  const char* env = std::getenv("SSL_LIGHTNING_MAX_ISA");
  const std::string v = env == nullptr ? "avx512" : std::string(env);
  TORCH_CHECK(v == "avx512" || v == "avx2" || v == "none",
              "SSL_LIGHTNING_MAX_ISA must be avx512, avx2 or none, got '", v, "'");
  return v == "avx512" ? Isa::kAvx512 : v == "avx2" ? Isa::kAvx2 : Isa::kNone;
}

// Why a gathered-panel kernel cannot run calls of dtype in this process ("" when it can; geometry aside).
std::string kernel_unavailable(Isa kernel, at::ScalarType dtype) {
  const bool avx512 = kernel == Isa::kAvx512;
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf)
    return std::string("it runs float32, bfloat16 and float16, got ") + c10::toString(dtype);
  if (isa_cap() < kernel)
    return std::string("SSL_LIGHTNING_MAX_ISA=") + std::getenv("SSL_LIGHTNING_MAX_ISA") + " hides " +
           (avx512 ? "AVX-512" : "AVX2");
  const std::string missing = avx512 ? gather_gemm_missing(dtype) : gather_gemm_avx2_missing();
  if (!missing.empty())
    return "this CPU lacks " + missing +
           (avx512 && dtype != at::kFloat ? std::string(" (for ") + c10::toString(dtype) + ")" : "");
  return "";
}

enum class Kernel { kAvx512, kAvx2, kLowered };

// The kernel a call of dtype takes under SSL_LIGHTNING_GEMM (choice), SSL_LIGHTNING_MAX_ISA and this CPU; G, when
// given, adds the panel kernels' geometry limit. A forced panel kernel that cannot run is an error saying why.
Kernel select_kernel(const std::string& choice, at::ScalarType dtype, const ConvGeometry* G) {
  if (choice == "onednn" || choice == "blas") return Kernel::kLowered;
  auto unavailable = [&](Isa isa) {
    std::string why = kernel_unavailable(isa, dtype);
    if (why.empty() && G != nullptr && !gather_gemm_fits(*G))
      why = "the input is too large for its 32-bit gather offsets";
    return why;
  };
  if (choice != "avx2") {
    const std::string why = unavailable(Isa::kAvx512);
    TORCH_CHECK(choice != "gather" || why.empty(),
                "SSL_LIGHTNING_GEMM=gather: the AVX-512 kernel cannot run this call (", c10::toString(dtype), "): ",
                why, ". Unset SSL_LIGHTNING_GEMM or set it to auto (the op then picks a kernel this CPU runs)");
    if (why.empty()) return Kernel::kAvx512;
  }
  const std::string why = unavailable(Isa::kAvx2);
  TORCH_CHECK(choice != "avx2" || why.empty(), "SSL_LIGHTNING_GEMM=avx2: the AVX2 kernel cannot run this call (",
              c10::toString(dtype), "): ", why, ". Unset SSL_LIGHTNING_GEMM or set it to auto (the op then picks a "
              "kernel this CPU runs)");
  return why.empty() ? Kernel::kAvx2 : Kernel::kLowered;
}

// oneDNN builds a matmul primitive per call (~35 us here), so it only pays off on larger GEMMs.
constexpr double kOneDnnMinFlops = 32e6;

// dst (contiguous) = (accumulate ? dst : 0) + w @ l; onednn: large fp32 GEMMs may go to oneDNN's matmul
void gemm_into(const at::Tensor& w, const at::Tensor& l, const at::Tensor& dst, bool accumulate, bool onednn) {
  const double flops = 2.0 * double(w.size(0)) * double(w.size(1)) * double(l.size(1));
  if (w.scalar_type() == at::kFloat && flops >= kOneDnnMinFlops && onednn) {
    at::native::mkldnn_matmul(w, l, dst, accumulate ? 1.0f : 0.0f, 1.0f);
  } else if (accumulate) {
    dst.addmm_(w, l);
  } else {
    at::Tensor out = dst;
    at::mm_out(out, w, l);
  }
}

constexpr int64_t kPanelBytes = 2048 * 1024;  // lowered panel per tile (BLAS repacks it in cache-sized blocks)


// Most kept columns of any conv group (sizes the lowered panel).
int64_t max_kept_columns(const int64_t* col_ptr, int64_t groups) {
  int64_t kmax = 0;
  for (int64_t g = 0; g < groups; ++g) kmax = std::max(kmax, col_ptr[g + 1] - col_ptr[g]);
  return kmax;
}

// Output rows per tile so that a kmax x (rows * wo) panel stays within kPanelBytes.
int64_t panel_tile_rows(int64_t kmax, const ConvGeometry& G, size_t elem_size) {
  return std::clamp<int64_t>(kPanelBytes / std::max<int64_t>(1, kmax * G.wo * int64_t(elem_size)), 1, G.ho);
}

// Lower the kept columns cols[0..k) of image `x` (C x H x W) for output rows [oh0, oh1) into
// dst (k x (oh1-oh0)*wo), one kept column per row of dst; out-of-bounds taps read zero padding.
template <typename scalar_t>
void lower_tile(const scalar_t* x, const int64_t* cols, int64_t k, int64_t group, int64_t oh0, int64_t oh1,
                const ConvGeometry& G, scalar_t* dst, bool parallel) {
  const int64_t pt = (oh1 - oh0) * G.wo;
  auto body = [&](int64_t k0, int64_t k1) {
    for (int64_t i = k0; i < k1; ++i) {
      const int64_t col = cols[i];
      const int64_t ci = col / (G.kh * G.kw), rem = col % (G.kh * G.kw);
      const int64_t ki = rem / G.kw, kj = rem % G.kw;
      const scalar_t* plane = x + (group * G.cg + ci) * G.h * G.w;
      scalar_t* row = dst + i * pt;
      const int64_t iw0 = kj * G.dw - G.pw;
      // ow range whose input column lies inside [0, w)
      int64_t lo = iw0 >= 0 ? 0 : (-iw0 + G.sw - 1) / G.sw;
      int64_t hi = iw0 >= G.w ? 0 : (G.w - 1 - iw0) / G.sw + 1;
      lo = std::min(lo, G.wo);
      hi = std::max(lo, std::min(hi, G.wo));
      // Rows of output positions whose input row is inside the image: [oh_lo, oh_hi).
      const int64_t ih0 = ki * G.dh - G.ph;  // input row of output row 0
      int64_t oh_lo = ih0 >= 0 ? 0 : (-ih0 + G.sh - 1) / G.sh;
      int64_t oh_hi = ih0 >= G.h ? 0 : (G.h - 1 - ih0) / G.sh + 1;
      oh_lo = std::clamp(oh_lo, oh0, oh1);
      oh_hi = std::clamp(oh_hi, oh_lo, oh1);
      const size_t edge_lo = lo * sizeof(scalar_t), edge_hi = (G.wo - hi) * sizeof(scalar_t);
      const size_t inner = (hi - lo) * sizeof(scalar_t);
      std::memset(row, 0, (oh_lo - oh0) * G.wo * sizeof(scalar_t));  // rows above the image
      row += (oh_lo - oh0) * G.wo;
      const scalar_t* src = plane + (oh_lo * G.sh + ih0) * G.w + iw0;
      if (G.sw == 1) {
        for (int64_t oh = oh_lo; oh < oh_hi; ++oh, row += G.wo, src += G.sh * G.w) {
          if (edge_lo) std::memset(row, 0, edge_lo);
          std::memcpy(row + lo, src + lo, inner);  // short rows: glibc uses overlapping vector moves
          if (edge_hi) std::memset(row + hi, 0, edge_hi);
        }
      } else {
        for (int64_t oh = oh_lo; oh < oh_hi; ++oh, row += G.wo, src += G.sh * G.w) {
          for (int64_t ow = 0; ow < lo; ++ow) row[ow] = scalar_t(0);
          for (int64_t ow = lo; ow < hi; ++ow) row[ow] = src[ow * G.sw];
          for (int64_t ow = hi; ow < G.wo; ++ow) row[ow] = scalar_t(0);
        }
      }
      std::memset(row, 0, (oh1 - oh_hi) * G.wo * sizeof(scalar_t));  // rows below the image
    }
  };
  if (parallel) {
    at::parallel_for(0, k, 16, body);
  } else {
    body(0, k);
  }
}


}  // namespace

std::string cpu_kernel(at::ScalarType dtype) {
  const std::string choice = gemm_choice();
  switch (select_kernel(choice, dtype, nullptr)) {
    case Kernel::kAvx512:
      return "avx512";
    case Kernel::kAvx2:
      return "avx2";
    default:
      return at::hasMKLDNN() && choice != "blas" ? "onednn" : "blas";  // as the lowered path below decides
  }
}

at::Tensor compact_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& row_idx_arg,
                              const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, int64_t out_channels, bool compact_output) {
  const IndexLists idx = host_index_lists(row_idx_arg, row_ptr, col_idx, col_ptr, input.device());
  const ConvGeometry G = check_compact_conv2d_args(input, weight, idx, bias, kernel_size, stride, padding, dilation,
                                                   groups, out_channels);
  const at::Tensor& row_idx = idx.row_idx;
  const int64_t* rp = idx.row_ptr.const_data_ptr<int64_t>();
  const int64_t* cpp = idx.col_ptr.const_data_ptr<int64_t>();
  const int64_t* ri = row_idx.const_data_ptr<int64_t>();
  const int64_t* ci = idx.col_idx.const_data_ptr<int64_t>();

  const at::Tensor x = input.contiguous();
  const int64_t P = G.ho * G.wo;
  const int64_t out_rows = compact_output ? row_idx.numel() : out_channels;
  at::Tensor out = at::empty({G.n, out_rows, G.ho, G.wo}, input.options());
  if (G.n == 0) return out;
  const std::string choice = gemm_choice();  // once per call, not per tile
  const Kernel kernel = select_kernel(choice, x.scalar_type(), &G);
  if (kernel == Kernel::kAvx512) {
    // writes every output row itself (removed filters' bias included), in one parallel region
    const at::Tensor wc = weight.contiguous();
    const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "compact_conv2d_gather", [&] {
      if constexpr (std::is_same_v<scalar_t, double>) {
        TORCH_INTERNAL_ASSERT(false, "the AVX-512 kernel does not run float64");
      } else {
        gather_gemm_conv2d<scalar_t>(x.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(), ri, rp, ci, cpp,
                                     bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr, G,
                                     out.mutable_data_ptr<scalar_t>(), out_rows, compact_output);
      }
    });
    return out;
  }
  if (kernel == Kernel::kAvx2) {
    // fp32 kernel; bf16 / fp16 are widened once (input, weight, bias) and the fp32 result rounded once per
    // value, as the AVX-512 kernel rounds its fp32 accumulators
    const bool wide = x.scalar_type() == at::kFloat;
    const at::Tensor x32 = wide ? x : x.to(at::kFloat);
    const at::Tensor w32 = weight.contiguous().to(at::kFloat);
    const at::Tensor b32 = bias.has_value() ? bias->contiguous().to(at::kFloat) : at::Tensor();
    at::Tensor out32 = wide ? out : at::empty(out.sizes(), out.options().dtype(at::kFloat));
    gather_gemm_conv2d_avx2(x32.const_data_ptr<float>(), w32.const_data_ptr<float>(), ri, rp, ci, cpp,
                            b32.defined() ? b32.const_data_ptr<float>() : nullptr, G, out32.mutable_data_ptr<float>(),
                            out_rows, compact_output);
    if (!wide) out.copy_(out32);
    return out;
  }
  if (!compact_output) {
    // Full width: removed filters still produce their bias (the layer is a drop-in), and so do kept filters
    // of a group whose columns were all removed. Every other row is written whole by the kernels below.
    std::vector<char> written(out_channels, 0);
    for (int64_t g = 0; g < groups; ++g)
      if (cpp[g + 1] > cpp[g])
        for (int64_t i = rp[g]; i < rp[g + 1]; ++i) written[ri[i]] = 1;
    std::vector<int64_t> fill;
    for (int64_t c = 0; c < out_channels; ++c)
      if (!written[c]) fill.push_back(c);
    const int64_t nfill = int64_t(fill.size()), plane = G.ho * G.wo;
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "compact_conv2d_fill", [&] {
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      const scalar_t* bv = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, G.n * nfill, 64, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t n = i / nfill, c = fill[i % nfill];
          std::fill_n(o + (n * out_channels + c) * plane, plane, bv != nullptr ? bv[c] : scalar_t(0));
        }
      });
    });
  }
  const bool onednn = at::hasMKLDNN() && choice != "blas";

  // per-group offsets into the packed weight
  std::vector<int64_t> woff(groups + 1, 0);
  for (int64_t g = 0; g < groups; ++g) woff[g + 1] = woff[g] + (rp[g + 1] - rp[g]) * (cpp[g + 1] - cpp[g]);
  const at::Tensor wc = weight.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "compact_conv2d", [&] {
    const int64_t kmax = max_kept_columns(cpp, groups);
    const int64_t tile_rows = panel_tile_rows(kmax, G, sizeof(scalar_t));
    // Work items are (image, conv group) pairs. With at least as many items as threads, each item runs on
    // one thread with a single-threaded GEMM; otherwise items run in turn with a parallel lowering and a
    // multi-threaded GEMM.
    const int64_t items = G.n * groups;
    const bool per_item_tasks = items >= at::get_num_threads() && at::get_num_threads() > 1;
    auto run_item = [&](int64_t item, bool inner_parallel, at::Tensor& panel) {
      const int64_t n = item / groups, g = item % groups;
      const int64_t r = rp[g + 1] - rp[g], k = cpp[g + 1] - cpp[g];
      if (r == 0) return;
      const scalar_t* xn = x.const_data_ptr<scalar_t>() + n * G.c * G.h * G.w;
      at::Tensor out2d = out[n].view({out_rows, P});
      at::Tensor bias_g;
      if (bias.has_value()) bias_g = bias->index_select(0, row_idx.narrow(0, rp[g], r)).view({r, 1});
      if (k == 0) {  // every column removed: the kept filters output their bias
        if (compact_output) {
          if (bias.has_value()) out2d.narrow(0, rp[g], r).copy_(bias_g.expand({r, P}));
          else out2d.narrow(0, rp[g], r).zero_();
        }
        return;
      }
      const at::Tensor wg = wc.narrow(0, woff[g], r * k).view({r, k});
      for (int64_t oh0 = 0; oh0 < G.ho; oh0 += tile_rows) {
        const int64_t oh1 = std::min(G.ho, oh0 + tile_rows), pt = (oh1 - oh0) * G.wo;
        lower_tile<scalar_t>(xn, ci + cpp[g], k, g, oh0, oh1, G, panel.mutable_data_ptr<scalar_t>(), inner_parallel);
        const at::Tensor lowered = panel.narrow(0, 0, k * pt).view({k, pt});
        at::Tensor dst = out2d.narrow(0, rp[g], r).narrow(1, oh0 * G.wo, pt);
        const bool direct = compact_output && dst.is_contiguous();  // one tile covering all positions
        at::Tensor block = direct ? dst : at::empty({r, pt}, x.options());
        if (bias.has_value()) block.copy_(bias_g.expand({r, pt}));
        gemm_into(wg, lowered, block, bias.has_value(), onednn);
        if (compact_output) {
          if (!direct) dst.copy_(block);
        } else {  // scatter the compact block's rows to their output channels
          const scalar_t* src = block.const_data_ptr<scalar_t>();
          scalar_t* base = out2d.mutable_data_ptr<scalar_t>() + oh0 * G.wo;
          for (int64_t i = 0; i < r; ++i) std::memcpy(base + ri[rp[g] + i] * P, src + i * pt, pt * sizeof(scalar_t));
        }
      }
    };
    const int64_t panel_elems = std::max<int64_t>(1, kmax * tile_rows * G.wo);
    if (per_item_tasks) {
      // ATen ops run on the pool's threads: give them the caller's thread-local state (below the autograd
      // dispatch keys, grad mode, inference mode), else an input that requires grad makes mm_out refuse
      // to run and bias gathers record autograd graphs.
      const at::ThreadLocalState caller_state;
      at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
        const at::ThreadLocalStateGuard state_guard(caller_state);
        at::Tensor panel = at::empty({panel_elems}, x.options());
        for (int64_t i = i0; i < i1; ++i) run_item(i, false, panel);
      });
    } else {
      at::Tensor panel = at::empty({panel_elems}, x.options());
      for (int64_t i = 0; i < items; ++i) run_item(i, true, panel);
    }
  });
  return out;
}


namespace {

// Inverse of lower_tile: grad_x[c_k, ih, iw] += gl[k, p] for every kept column k and output position p of
// rows [oh0, oh1) whose tap lies inside the image (col2im restricted to the kept columns).
template <typename scalar_t>
void col2im_tile(const scalar_t* gl, const int64_t* cols, int64_t k, int64_t group, int64_t oh0, int64_t oh1,
                 const ConvGeometry& G, scalar_t* grad_x) {
  const int64_t pt = (oh1 - oh0) * G.wo;
  for (int64_t i = 0; i < k; ++i) {  // serial: different columns can hit the same input pixel
    const int64_t col = cols[i];
    const int64_t ci = col / (G.kh * G.kw), rem = col % (G.kh * G.kw);
    const int64_t ki = rem / G.kw, kj = rem % G.kw;
    scalar_t* plane = grad_x + (group * G.cg + ci) * G.h * G.w;
    const scalar_t* row = gl + i * pt;
    for (int64_t oh = oh0; oh < oh1; ++oh, row += G.wo) {
      const int64_t ih = oh * G.sh - G.ph + ki * G.dh;
      if (ih < 0 || ih >= G.h) continue;
      scalar_t* dst = plane + ih * G.w;
      for (int64_t ow = 0; ow < G.wo; ++ow) {
        const int64_t iw = ow * G.sw - G.pw + kj * G.dw;
        if (iw >= 0 && iw < G.w) dst[iw] += row[ow];
      }
    }
  }
}

}  // namespace

// Gradients of compact_conv2d with respect to the input and the packed weight, computed on the kept
// rows and columns only: grad_W_g = dY_g @ L_g^T, grad_L_g = W_g^T @ dY_g scattered back by col2im.
std::tuple<at::Tensor, at::Tensor> compact_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& row_idx_arg,
    const at::Tensor& row_ptr_arg, const at::Tensor& col_idx_arg, const at::Tensor& col_ptr_arg,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, int64_t out_channels, bool compact_output, std::array<bool, 2> output_mask) {
  const IndexLists idx = host_index_lists(row_idx_arg, row_ptr_arg, col_idx_arg, col_ptr_arg, input.device());
  const ConvGeometry G = check_compact_conv2d_args(input, weight, idx, std::nullopt, kernel_size, stride, padding,
                                                   dilation, groups, out_channels);
  const at::Tensor &row_idx = idx.row_idx, &row_ptr = idx.row_ptr, &col_idx = idx.col_idx, &col_ptr = idx.col_ptr;
  const int64_t out_rows = compact_output ? row_idx.numel() : out_channels;
  check_grad_output(grad_output, input, G, out_rows);
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  const int64_t* cpp = col_ptr.const_data_ptr<int64_t>();
  const int64_t* ci = col_idx.const_data_ptr<int64_t>();
  const at::Tensor x = input.contiguous();
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor wc = weight.contiguous();
  // outputs that were not asked for come back empty (0 elements)
  at::Tensor grad_x = output_mask[0] ? at::zeros_like(x) : at::empty({0}, x.options());
  at::Tensor grad_w = output_mask[1] ? at::zeros_like(wc) : at::empty({0}, x.options());
  const int64_t P = G.ho * G.wo;
  const int64_t kmax = max_kept_columns(cpp, groups);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "compact_conv2d_backward", [&] {
    const int64_t tile_rows = panel_tile_rows(kmax, G, sizeof(scalar_t));
    at::Tensor panel = at::empty({std::max<int64_t>(1, kmax * tile_rows * G.wo)}, x.options());
    int64_t woff = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t r = rp[g + 1] - rp[g], k = cpp[g + 1] - cpp[g];
      if (r == 0 || k == 0) {
        woff += r * k;
        continue;
      }
      const at::Tensor wg = wc.narrow(0, woff, r * k).view({r, k});
      at::Tensor gwg = output_mask[1] ? grad_w.narrow(0, woff, r * k).view({r, k}) : at::Tensor();
      woff += r * k;
      const at::Tensor rows_g = row_idx.narrow(0, rp[g], r);
      for (int64_t n = 0; n < G.n; ++n) {
        const at::Tensor go_n = go[n].view({out_rows, P});
        const at::Tensor dy = compact_output ? go_n.narrow(0, rp[g], r) : go_n.index_select(0, rows_g);  // r x P
        for (int64_t oh0 = 0; oh0 < G.ho; oh0 += tile_rows) {
          const int64_t oh1 = std::min(G.ho, oh0 + tile_rows), pt = (oh1 - oh0) * G.wo;
          const at::Tensor dy_t = dy.narrow(1, oh0 * G.wo, pt);
          if (output_mask[1]) {
            lower_tile<scalar_t>(x.const_data_ptr<scalar_t>() + n * G.c * G.h * G.w, ci + cpp[g], k, g, oh0, oh1, G,
                                 panel.mutable_data_ptr<scalar_t>(), true);
            gwg.addmm_(dy_t, panel.narrow(0, 0, k * pt).view({k, pt}).t());
          }
          if (output_mask[0]) {
            const at::Tensor gl = at::mm(wg.t(), dy_t).contiguous();  // k x pt
            col2im_tile<scalar_t>(gl.const_data_ptr<scalar_t>(), ci + cpp[g], k, g, oh0, oh1, G,
                                  grad_x.mutable_data_ptr<scalar_t>() + n * G.c * G.h * G.w);
          }
        }
      }
    }
  });
  return {grad_x, grad_w};
}

}  // namespace ssl_lightning

TORCH_LIBRARY_IMPL(ssl_lightning, CPU, m) {
  m.impl("compact_conv2d", &ssl_lightning::compact_conv2d_cpu);
  m.impl("compact_conv2d_backward", &ssl_lightning::compact_conv2d_backward_cpu);
}
