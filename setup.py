"""Build of the ``ssl_lightning._C`` extension.

CPU sources always build. CUDA sources build when torch was built with CUDA and a toolkit is found
(``CUDA_HOME``); ``SSL_LIGHTNING_CUDA=0`` forces them off, ``=1`` makes a missing toolkit an error.
``SSL_LIGHTNING_NO_EXT=1`` skips the extension entirely (the package then runs its PyTorch fallbacks).
``SSL_LIGHTNING_SANITIZE=1`` builds the CPU sources with AddressSanitizer and UBSan (``.ci/sanitize``).
Build with ``pip install --no-build-isolation`` so the installed (CPU) torch is used, not a fresh one.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup


def _extensions() -> tuple[list, dict]:
    if os.environ.get("SSL_LIGHTNING_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    want = os.environ.get("SSL_LIGHTNING_CUDA", "auto").lower()
    if want not in ("auto", "0", "1"):
        raise ValueError(f"SSL_LIGHTNING_CUDA must be auto, 0 or 1, got {want!r}")
    cuda_found = torch.version.cuda is not None and CUDA_HOME is not None
    if want == "1" and not cuda_found:
        raise RuntimeError(
            "SSL_LIGHTNING_CUDA=1 but torch has no CUDA "
            f"(torch.version.cuda={torch.version.cuda}) or no toolkit (CUDA_HOME={CUDA_HOME})"
        )
    use_cuda = cuda_found and want != "0"
    sources = sorted(glob.glob("csrc/*.cpp"))
    # -fopenmp: ATen's at::parallel_for is an inline OpenMP region, so without it the kernels run on one
    # thread whatever torch.set_num_threads says. The library links as libgomp.so.1, which resolves to the
    # copy torch has already loaded (one OpenMP runtime per process).
    cxx = ["-O3", "-g0", "-std=c++17", "-fopenmp"]
    link = ["-fopenmp"]
    if os.environ.get("SSL_LIGHTNING_SANITIZE", "0") == "1":  # every read and write checked; slow
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        cxx = ["-O1", "-g", "-std=c++17", "-fopenmp", *san]
        link = ["-fopenmp", *san]
    macros = [("SSL_LIGHTNING_PYTHON_MODULE", None)]
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "ssl_lightning._C",
            sources,
            define_macros=[*macros, ("SSL_LIGHTNING_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "ssl_lightning._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
