"""Shared Triton plumbing of the kernel modules: a guarded import and the availability check.

Importing never fails: a missing or broken triton is a recorded reason that ``available()``
reports.
"""
from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR: Exception | None = None
except Exception as exc:  # ImportError, or a broken install raising something else
    triton = None
    tl = None
    IMPORT_ERROR = exc


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# triton decides interpreter vs compiler when a kernel is decorated, i.e. when the kernel
# modules are imported (right after this one); remember which one we got.
INTERPRET = False
if triton is not None:
    try:
        INTERPRET = bool(triton.knobs.runtime.interpret)
    except Exception:
        INTERPRET = interpret_requested()


def available(module: str) -> tuple[bool, str]:
    """(True, how) if the Triton kernels of ``module`` can run here, else (False, reason).
    Never raises."""
    try:
        if triton is None:
            return False, f"triton cannot be imported ({type(IMPORT_ERROR).__name__}: {IMPORT_ERROR})"
        if INTERPRET:
            return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1)"
        if interpret_requested():
            return False, (f"TRITON_INTERPRET=1 was set after {module} was imported; set it "
                           "before the first import of triton/pykernels")
        import torch

        if torch.cuda.is_available():
            return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
        return False, "no CUDA device and TRITON_INTERPRET is not set to 1"
    except Exception as exc:  # defensive: available() must never raise
        return False, f"triton availability check failed: {type(exc).__name__}: {exc}"
