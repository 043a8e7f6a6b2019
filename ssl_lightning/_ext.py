"""Loads the compiled ``ssl_lightning._C`` ops once; warns once and reports absence if it cannot."""

from __future__ import annotations

import functools
import warnings


@functools.cache
def has_compiled_ops() -> bool:
    """True when ``ssl_lightning._C`` loaded and registered its ops with the dispatcher."""
    try:
        from ssl_lightning import _C  # type: ignore[attr-defined]  # noqa: F401
    except ImportError as err:  # build skipped or failed: pure-PyTorch twins take over
        warnings.warn(
            f"ssl_lightning._C could not be loaded ({err}); using the pure-PyTorch reference ops. "
            "Reinstall with `pip install --no-build-isolation -e .` to build them.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


@functools.cache
def has_cuda_kernels() -> bool:
    """True when the loaded extension carries CUDA kernels."""
    import torch

    if not has_compiled_ops():
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key("ssl_lightning::lowered_nonzero", "CUDA"))
