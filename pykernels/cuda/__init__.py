"""CUDA backend: ``pykernels._cuda`` (nvcc build) or the cupy JIT path over the same sources.

Importing this package never imports cupy or the extension and never touches a GPU; use
:func:`available` to learn whether the backend can run and why not.
"""
from .decode_attention import (available, compile_nvrtc, decode_attention, default_num_workers, kernel_config,
                               kernel_names, kernel_source)

__all__ = ["available", "compile_nvrtc", "decode_attention", "default_num_workers", "kernel_config",
           "kernel_names", "kernel_source"]
