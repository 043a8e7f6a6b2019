// ssl_lightning compiled ops: one TORCH_LIBRARY block holds every schema; backends register below.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace ssl_lightning {

// Which GEMM rows (filters) and columns (filter-shape fibers W[:,c,kh,kw], per conv group) of a
// lowered weight hold any nonzero. weight: N x Cg x KH x KW (or N x K for Linear), groups divides N.
// Returns rows: bool[N], cols: bool[groups, Cg*KH*KW]. One pass over the weight, parallel over banks.
std::tuple<at::Tensor, at::Tensor> lowered_nonzero_cpu(const at::Tensor& weight, int64_t groups) {
  TORCH_CHECK(weight.dim() >= 2, "lowered_nonzero: weight must have at least 2 dims (N x ...), got ",
              weight.dim(), " dims");
  TORCH_CHECK(groups >= 1, "lowered_nonzero: groups must be >= 1, got ", groups);
  const int64_t n = weight.size(0);
  TORCH_CHECK(n > 0 && weight.numel() > 0, "lowered_nonzero: weight must have at least one row and column, got shape ",
              weight.sizes());
  TORCH_CHECK(n % groups == 0, "lowered_nonzero: groups (", groups, ") must divide the number of rows (",
              n, ")");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble ||
                  weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16,
              "lowered_nonzero: weight must be a floating tensor, got ", weight.scalar_type());
  const at::Tensor w = weight.contiguous().view({groups, n / groups, -1});
  const int64_t rows_per = w.size(1), cols = w.size(2);
  at::Tensor row_out = at::empty({n}, weight.options().dtype(at::kBool));
  at::Tensor col_out = at::empty({groups, cols}, weight.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "lowered_nonzero", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    bool* rp = row_out.mutable_data_ptr<bool>();
    bool* cp = col_out.mutable_data_ptr<bool>();
    const scalar_t zero(0);
    // Pass 1, rows: scan each row until its first nonzero (dense rows cost almost nothing).
    at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = src + r * cols;
        int64_t c = 0;
        while (c < cols && row[c] == zero) ++c;
        rp[r] = c < cols;
      }
    });
    // Pass 2, columns: parallel over (bank, column chunk); all-zero rows are skipped. The inner loop is a
    // branch-free byte OR that the compiler vectorizes.
    constexpr int64_t kChunk = 256;
    const int64_t chunks = (cols + kChunk - 1) / kChunk;
    at::parallel_for(0, groups * chunks, 1, [&](int64_t t0, int64_t t1) {
      uint8_t acc[kChunk];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t g = t / chunks, c0 = (t % chunks) * kChunk, len = std::min(kChunk, cols - c0);
        std::fill(acc, acc + len, uint8_t(0));
        for (int64_t r = g * rows_per; r < (g + 1) * rows_per; ++r) {
          if (!rp[r]) continue;
          const scalar_t* row = src + r * cols + c0;
          for (int64_t c = 0; c < len; ++c) acc[c] |= static_cast<uint8_t>(row[c] != zero);
        }
        for (int64_t c = 0; c < len; ++c) cp[g * cols + c0 + c] = acc[c] != 0;
      }
    });
  });
  return {row_out, col_out};
}

}  // namespace ssl_lightning

TORCH_LIBRARY(ssl_lightning, m) {
  m.def("lowered_nonzero(Tensor weight, int groups) -> (Tensor rows, Tensor cols)");
  // Convolution with a compacted lowered weight: per conv group g, rows row_idx[row_ptr[g]:row_ptr[g+1]]
  // (output channels) and columns col_idx[col_ptr[g]:col_ptr[g+1]] (c*KH*KW + kh*KW + kw within the
  // group) are kept; weight packs each group's rows x cols block row-major, groups in order.
  m.def(
      "compact_conv2d(Tensor input, Tensor weight, Tensor row_idx, Tensor row_ptr, Tensor col_idx, "
      "Tensor col_ptr, Tensor? bias, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, int out_channels, bool compact_output) -> Tensor");
  // Its gradients for input and packed weight on the kept rows/columns only (col2im over kept columns).
  m.def(
      "compact_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor row_idx, Tensor row_ptr, "
      "Tensor col_idx, Tensor col_ptr, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, int out_channels, bool compact_output, bool[2] output_mask) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ssl_lightning, CPU, m) {
  m.impl("lowered_nonzero", &ssl_lightning::lowered_nonzero_cpu);
}

#ifdef SSL_LIGHTNING_PYTHON_MODULE
#include <Python.h>

#include <string>

namespace ssl_lightning {
std::string cpu_kernel(at::ScalarType dtype);  // compact_conv.cpp
}

// _C.cpu_kernel("float32" | "bfloat16" | "float16" | "float64") -> the CPU kernel compact_conv2d takes for
// that dtype in this process now: "avx512", "avx2", "onednn" or "blas" (see compact_conv.cpp).
static PyObject* cpu_kernel_py(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const std::string dtype(name);
  const at::ScalarType t = dtype == "float32"    ? at::kFloat
                           : dtype == "bfloat16" ? at::kBFloat16
                           : dtype == "float16"  ? at::kHalf
                           : dtype == "float64"  ? at::kDouble
                                                 : at::ScalarType::Undefined;
  if (t == at::ScalarType::Undefined) {
    PyErr_Format(PyExc_ValueError, "cpu_kernel: dtype must be float32, bfloat16, float16 or float64, got '%s'", name);
    return nullptr;
  }
  try {
    return PyUnicode_FromString(ssl_lightning::cpu_kernel(t).c_str());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
}

static PyMethodDef ssl_lightning_methods[] = {
    {"cpu_kernel", cpu_kernel_py, METH_O, "The CPU kernel compact_conv2d takes for a dtype name in this process."},
    {nullptr, nullptr, 0, nullptr}};

// `import ssl_lightning._C` loads this library, which registers the ops above with the dispatcher.
static struct PyModuleDef ssl_lightning_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, ssl_lightning_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ssl_lightning_module); }
#endif
