"""Loads the compiled ``ssl_lightning._C`` ops once; warns once and reports absence if it cannot.

The answers are cached in module globals (not ``functools.cache``) so that ``torch.compile`` reads them
as constants instead of warning about a cache wrapper on every compacted layer.
"""

from __future__ import annotations

import warnings

_loaded: bool | None = None
_cuda: bool | None = None


def has_compiled_ops() -> bool:
    """True when ``ssl_lightning._C`` loaded and registered its ops with the dispatcher."""
    global _loaded
    if _loaded is None:
        try:
            from ssl_lightning import _C  # type: ignore[attr-defined]  # noqa: F401
        except ImportError as err:  # build skipped or failed: pure-PyTorch twins take over
            warnings.warn(
                f"ssl_lightning._C could not be loaded ({err}); using the pure-PyTorch reference ops (same results, "
                "slower). To build them, reinstall from source against the torch you run, with a C++ compiler: "
                "`pip install --no-build-isolation --force-reinstall --no-deps ssl_lightning` (a checkout: "
                "`pip install --no-build-isolation -e .`).",
                RuntimeWarning,
                stacklevel=2,
            )
            _loaded = False
        else:
            _loaded = True
    return _loaded


def has_cuda_kernels() -> bool:
    """True when the loaded extension carries CUDA kernels."""
    global _cuda
    if _cuda is None:
        import torch

        _cuda = has_compiled_ops() and bool(
            torch._C._dispatch_has_kernel_for_dispatch_key("ssl_lightning::lowered_nonzero", "CUDA")
        )
    return _cuda
