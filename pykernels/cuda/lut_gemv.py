"""CUDA backend for LUT-GEMV: ``out = x @ W^T`` for bit-plane weights (``pykernels.lut_format``).

The kernels live in ``csrc/cuda/lut_gemv.cuh`` (design notes at its top). As for decode
attention (:mod:`pykernels.cuda.decode_attention`), the same source runs two ways:

* ``pykernels._cuda.lut_gemv``: built by ``setup.py`` with nvcc (sm_80 / sm_90 SASS);
* the cupy JIT path: when the extension was not built (or predates the LUT kernels), the
  ``.cuh`` text is compiled at run time with NVRTC through ``cupy.RawModule``, one module per
  instantiation, cached on disk outside the package (``$CUPY_CACHE_DIR``).

:func:`compile_nvrtc` compiles every instantiation without a GPU (the CI check).

Both modes are exact here: the tables are fp32 in shared memory. ``mode="int8"`` (int8 tables)
is a CPU SIMD optimisation for byte-shuffle lookups; on a GPU a lookup is a shared-memory load
either way, so the int8 request is served by the exact kernel.

Nothing here touches cupy, the extension or the GPU at import time.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import backends
from .decode_attention import _cupy, _expand, _native, availability, nvrtc_entry_sizes

__all__ = ["available", "lut_gemv", "compile_nvrtc", "kernel_names", "kernel_config", "kernel_source"]

# ---- kernel catalogue (mirrors csrc/cuda/lut_gemv.cuh / .cu) ----------------------------------
_NS = "pykernels::cuda_kernels"
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # DType in common.h
KIND_LINEAR, KIND_CODEBOOK = 0, 1  # kLutLinear (affine / symmetric), kLutCodebook
MAX_BITS = 8
MAX_M = 16
_BITS = tuple(range(1, MAX_BITS + 1))
_MTS = (1, 2, 4, 8, 16)  # rows of x per pass
_MODES = ("int8", "exact")


def kernel_config(M: int) -> tuple[int, int]:
    """(MT, threads per CTA) for ``M`` rows of x: MT is the next power of two >= M.

    Same rule as ``LutShape`` in ``lut_gemv.cuh`` and ``pick_lut_rows`` in ``lut_gemv.cu``."""
    if not 1 <= M <= MAX_M:
        raise ValueError(f"x: expected 1 <= M <= {MAX_M} rows, got {M}")
    mt = next(t for t in _MTS if t >= M)
    warps = 16 if mt <= 2 else (8 if mt == 4 else 4)
    return mt, 32 * warps


def _kernel_name(bits: int, kind: int, mt: int) -> str:
    return f"{_NS}::lut_gemv_kernel<{bits}, {kind}, {mt}>"


def kernel_names() -> list[str]:
    """Name expressions of every kernel instantiation (bits x {linear, codebook} x MT)."""
    return [_kernel_name(b, k, t) for b in _BITS for k in (KIND_LINEAR, KIND_CODEBOOK) for t in _MTS]


# ---- sources --------------------------------------------------------------------------------
def _source_roots():
    """(include dir holding pykernels/*.h, dir holding lut_gemv.cuh): the installed copy
    (pykernels/_csrc) first, else the repository's csrc/."""
    pkg = Path(__file__).resolve().parent.parent
    for inc, cu in ((pkg / "_csrc" / "include", pkg / "_csrc" / "cuda"),
                    (pkg.parent / "csrc" / "include", pkg.parent / "csrc" / "cuda")):
        if (inc / "pykernels" / "lut.h").is_file() and (cu / "lut_gemv.cuh").is_file():
            return inc, cu
    raise FileNotFoundError(
        "pykernels LUT-GEMV CUDA sources not found: looked for pykernels/_csrc (installed package) "
        "and csrc/ next to the package (source checkout); reinstall pykernels")


@functools.lru_cache(maxsize=None)
def kernel_source() -> str:
    """The NVRTC-ready source: lut_gemv.cuh with the pykernels headers inlined (the cupy cache
    key then covers every compiled line)."""
    include_dir, cuda_dir = _source_roots()
    main = cuda_dir / "lut_gemv.cuh"
    return "".join(_expand(main, include_dir, {main.resolve()}))


# ---- what is available ----------------------------------------------------------------------
def _native_lut():
    """(pykernels._cuda or None, reason); None also when the build predates the LUT kernels."""
    native, reason = _native()
    if native is not None and not hasattr(native, "lut_gemv"):
        return None, reason + " but has no lut_gemv (stale build: rebuild pykernels)"
    return native, reason


def available() -> tuple[bool, str]:
    """Whether CUDA LUT-GEMV can run here, and why (never raises).

    The reason lists what was built (``pykernels._cuda``), what is present (a CUDA device seen
    by torch, cupy) and how to fix what is missing."""
    try:
        return availability(*_native_lut())
    except Exception as e:  # pragma: no cover - available() never raises
        return False, f"CUDA availability check failed: {type(e).__name__}: {e}"


def compile_nvrtc(arch: str = "sm_80", names: list[str] | None = None, *, optimize: bool = True) -> dict[str, int]:
    """Compile kernel instantiations (default: all of :func:`kernel_names`) to PTX with NVRTC in
    one program; no GPU needed.

    ``optimize=False`` compiles with ``-G`` (no device optimisation): the same front end and PTX
    generation, ~50x faster (all 80 instantiations take ~30 s optimised on one core).

    Returns
    -------
    dict
        name expression -> bytes of PTX of that kernel's ``.entry``.

    Raises
    ------
    RuntimeError
        With the NVRTC log when compilation fails or an instantiation is missing.
    ImportError
        When NVRTC (cupy_backends) is not importable.
    """
    names = kernel_names() if names is None else list(names)
    return nvrtc_entry_sizes(kernel_source(), "lut_gemv.cu", names, arch, optimize=optimize)


# ---- validation (JIT path; same rules, order and messages as the C++ launcher lut_gemv.cu) ----
def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _require(name, t, dtype, shape):
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected {_dt(dtype)}, got {_dt(t.dtype)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")


def _check_inputs(x, planes, scales, zeros, codebook, out, N, K_pad, bits, gs, mode):
    """-> kind (KIND_LINEAR / KIND_CODEBOOK). Raises ValueError / TypeError naming the argument.

    Devices are checked last, so every shape and dtype rule is testable without a GPU."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits: expected 1..{MAX_BITS}, got {bits}")
    if mode not in _MODES:
        raise ValueError(f"mode: expected 'int8' or 'exact', got {mode!r}")
    if N < 1:
        raise ValueError(f"N: expected >= 1, got {N}")
    if K_pad < 8 or K_pad % 8:
        raise ValueError(f"K_pad: expected a positive multiple of 8, got {K_pad}")
    if gs < 8 or gs % 8 or K_pad % gs:
        raise ValueError(f"gs: expected a multiple of 8 dividing K_pad={K_pad}, got {gs}")
    named = [("x", x), ("planes", planes), ("out", out), ("scales", scales), ("zeros", zeros), ("codebook", codebook)]
    for name, t in named:
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    kind = KIND_CODEBOOK if codebook is not None else KIND_LINEAR
    if kind == KIND_CODEBOOK and zeros is not None:
        raise ValueError("zeros: must be None for a codebook (the codebook holds the levels)")
    if x.dtype not in _DTYPE_CODE:
        raise TypeError(f"x: expected float32, float16 or bfloat16, got {_dt(x.dtype)}")
    if x.dim() != 2:
        raise ValueError(f"x: expected 2 dimensions, got shape {list(x.shape)}")
    M = x.shape[0]
    if x.shape[1] != K_pad or not 1 <= M <= MAX_M:
        raise ValueError(f"x: expected [M, K_pad={K_pad}] with 1 <= M <= {MAX_M}, got {list(x.shape)}")
    N_pad, G = -(-N // 32) * 32, K_pad // gs
    _require("planes", planes, torch.uint8, (N_pad // 32, K_pad // 8, bits, 32))
    _require("out", out, torch.float32, (M, N))
    if scales is not None:
        _require("scales", scales, torch.float16, (N, G))
    if zeros is not None:
        _require("zeros", zeros, torch.float16, (N, G))
    if codebook is not None:
        if codebook.dim() != 2 or codebook.shape[0] not in (1, N) or codebook.shape[1] != 1 << bits:
            raise ValueError(f"codebook: expected shape [1 or N={N}, {1 << bits}], got {list(codebook.shape)}")
        _require("codebook", codebook, torch.float32, tuple(codebook.shape))
    present = [(name, t) for name, t in named if t is not None and not (name == "zeros" and zeros is None)]
    for name, t in present:
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor")
    if kind == KIND_LINEAR and scales is None:
        raise ValueError("scales: required for the affine and symmetric schemes (only a codebook may omit them)")
    for name, t in present:
        if t.device.type != "cuda":
            raise ValueError(f"{name}: the CUDA backend needs CUDA tensors, got device {t.device}")
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device} but x is on {x.device}")
    return kind


# ---- cupy JIT path --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _jit_kernel(name: str):
    cupy, reason = _cupy()
    if cupy is None:
        raise RuntimeError(f"the cupy JIT path needs cupy: {reason}")
    mod = cupy.RawModule(code=kernel_source(), options=("-std=c++17",), name_expressions=(name,))
    return mod.get_function(name)


def _launch_jit(x, planes, scales, zeros, codebook, out, N, K_pad, bits, gs, mode):
    import numpy as np

    kind = _check_inputs(x, planes, scales, zeros, codebook, out, N, K_pad, bits, gs, mode)
    M = x.shape[0]
    mt, threads = kernel_config(M)
    kernel = _jit_kernel(_kernel_name(bits, kind, mt))
    cupy, _ = _cupy()
    i64 = np.int64

    def ptr(t):
        return np.uint64(0 if t is None else t.data_ptr())

    cb_per_row = codebook is not None and codebook.shape[0] == N and N > 1
    dev = x.device
    stream = torch.cuda.current_stream(dev)
    with cupy.cuda.Device(dev.index), cupy.cuda.ExternalStream(stream.cuda_stream, dev.index):
        kernel((-(-N // 32),), (threads,),
               (ptr(x), i64(_DTYPE_CODE[x.dtype]), i64(M), ptr(planes), ptr(scales),
                ptr(zeros if kind == KIND_LINEAR else None), ptr(codebook), i64(1 if cb_per_row else 0),
                ptr(out), i64(N), i64(K_pad), i64(gs)))


# ---- entry point ----------------------------------------------------------------------------
def lut_gemv(x, planes, scales, zeros, codebook, out, N, K_pad, bits, gs, mode="int8", *, impl="auto") -> None:
    r"""``out[m, n] = sum_k x[m, k] W[n, k]`` on CUDA tensors, written into ``out``.

    W is given by its bit planes and per-group parameters (``pykernels.lut_format``):
    affine ``W = scale (q - zero)``, symmetric ``W = scale (q - (2^bits - 1) / 2)``, codebook
    ``W = scale codebook[c, q]`` (``scale = 1`` when ``scales`` is None).

    Parameters
    ----------
    x : Tensor [M, K_pad]
        fp32 / fp16 / bf16, contiguous, ``1 <= M <= 16``, zero past the real K.
    planes : Tensor uint8 [N_pad/32, K_pad/8, bits, 32]
    scales : Tensor fp16 [N, K_pad/gs] or None (codebook only)
    zeros : Tensor fp16 [N, K_pad/gs] or None
        Affine zero points in code units; None means symmetric. Ignored for a codebook.
    codebook : Tensor fp32 [1 or N, 2^bits] or None
        Selects the codebook scheme (per-tensor or per-channel table).
    out : Tensor fp32 [M, N], contiguous
    N, K_pad, bits, gs : int
        Rows of W, padded K, bits per weight (1..8), group size (a multiple of 8 dividing K_pad).
    mode : {"int8", "exact"}
        Both run exact fp32 tables on the GPU (see the module docstring).
    impl : {"auto", "native", "jit"}
        ``pykernels._cuda`` when built (``"auto"``), or the cupy JIT path.

    Examples
    --------
    >>> out = torch.empty(x.shape[0], N, device="cuda")
    >>> lut_gemv(x, qw.planes, qw.scales, qw.zeros, None, out, N, qw.K_pad, 4, 128)  # doctest: +SKIP
    """
    if impl not in ("auto", "native", "jit"):
        raise ValueError(f"impl: expected 'auto', 'native' or 'jit', got {impl!r}")
    native, reason = _native_lut()
    if impl == "native" and native is None:
        raise RuntimeError(f"impl='native': {reason}")
    if native is not None and impl != "jit":
        stream = torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0
        dl = backends.dl  # DLPack capsules: cheaper per call than the extension calling __dlpack__
        native.lut_gemv(dl(x), dl(planes), dl(scales), dl(zeros), dl(codebook), dl(out), int(N), int(K_pad),
                        int(bits), int(gs), str(mode), stream)
        return
    _launch_jit(x, planes, scales, zeros, codebook, out, int(N), int(K_pad), int(bits), int(gs), mode)
