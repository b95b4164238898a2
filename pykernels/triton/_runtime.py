"""Shared Triton plumbing of the kernel modules: a guarded import and the availability check.

Importing never fails: a missing or broken triton is a recorded reason that ``available()``
reports.
"""
from __future__ import annotations

import functools
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


_LOOP_CHECK: list = []  # [reason or None] once the interpreter self-check has run


def interpreter_problem() -> str | None:
    """None if the Triton interpreter runs a loop whose bound is a loaded value (every kernel
    here has one), else why not. Checked once per process by running such a loop.

    Triton 3.6's interpreter converts the bound with ``int()`` on a 1-element array, which
    NumPy 2.5 rejects (seen on a GPU host with Triton 3.6.0 and NumPy 2.5.2); Triton 3.9
    squeezes the array first."""
    if not _LOOP_CHECK:
        try:
            import torch

            x = torch.zeros(4, dtype=torch.int32)
            _loop_probe[(1,)](x, torch.tensor([3], dtype=torch.int32))
            ok = x.tolist() == [0, 1, 2, 0]
            _LOOP_CHECK.append(None if ok else f"the interpreter ran a test loop wrongly (got {x.tolist()})")
        except Exception as exc:
            import numpy as np

            _LOOP_CHECK.append(f"triton {triton.__version__}'s interpreter cannot run a loop with a loaded "
                               f"bound under NumPy {np.__version__} ({type(exc).__name__}: {exc}); "
                               "use a newer triton (3.9 works) or NumPy < 2.5 for TRITON_INTERPRET=1")
    return _LOOP_CHECK[0]


if triton is not None and INTERPRET:
    @triton.jit
    def _loop_probe(x_ptr, n_ptr):
        n = tl.load(n_ptr + tl.program_id(0))
        for i in range(0, n, 1):
            tl.store(x_ptr + i, i)


def available(module: str) -> tuple[bool, str]:
    """(True, how) if the Triton kernels of ``module`` can run here, else (False, reason).
    Never raises."""
    try:
        if triton is None:
            return False, f"triton cannot be imported ({type(IMPORT_ERROR).__name__}: {IMPORT_ERROR})"
        if INTERPRET:
            problem = interpreter_problem()
            if problem is not None:
                return False, problem
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


def launch_on_device(fn):
    """Run a kernel launcher with its first argument's CUDA device current. Triton launches on the
    current device (and that device's current stream), so for a tensor on another GPU the kernel
    would run on the wrong device. No-op on the CPU and when the device is already current."""
    import inspect

    first = next(iter(inspect.signature(fn).parameters))

    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        dev = getattr(args[0] if args else kwargs.get(first), "device", None)
        if dev is not None and dev.type == "cuda" and dev.index is not None:
            import torch

            if dev.index != torch.cuda.current_device():
                with torch.cuda.device(dev):
                    return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return launcher
