"""CUDA backend for decode attention over a quantized KV cache (``pykernels.kv_format``).

The kernel (``csrc/cuda/kv_attention.cuh``, design notes at its top) reads the stored bytes
(int8 / int4 / int2 codes with fp16 scale / zero, or fp8 e4m3 codes with fp32 scales) and
dequantizes them in registers inside the attention loop, with the unpack / dequant rules of
``csrc/include/pykernels/kv_quant.h`` (shared with the CPU kernels). One call attends every
sequence over its three regions (sink fp rows | quantized store | residual fp rows) with the
lean or split schedule of plain decode attention (the same kernel body, plan and reduction:
``csrc/cuda/decode_attention.cuh``).

As for the other CUDA kernels, the same source runs two ways:

* ``pykernels._cuda.decode_attention_kv``: built by ``setup.py`` with nvcc (sm_80 / sm_90);
* the cupy JIT path: the ``.cuh`` text compiled at run time with NVRTC through
  ``cupy.RawModule`` (one module per instantiation), cached outside the package.

Both validate every argument with the same rules, order and messages (ValueError / TypeError
naming the argument): scalar options, then shapes / dtypes / layouts, then the values of
``n_sink`` / ``n_quant`` / ``n_res`` and the page ids, then devices, so all rules but the last
can be checked on CPU tensors. :func:`compile_nvrtc` compiles every instantiation without a GPU.

Nothing here touches cupy, the extension or the GPU at import time.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from .. import backends
from .decode_attention import (PLAN_KERNEL, REDUCE_KERNEL, _cupy, _expand, _native, availability,
                               default_num_workers, grid_plan, kernel_config, nvrtc_entry_sizes)

__all__ = ["available", "decode_attention_kv", "compile_nvrtc", "kernel_names", "kernel_config", "kernel_source",
           "FORMATS", "MAX_HEAD_DIM"]

# ---- kernel catalogue (mirrors csrc/cuda/kv_attention.cuh / .cu) -------------------------------
_NS = "pykernels::cuda_kernels"
FORMATS = {"int8": 8, "int4": 4, "int2": 2, "fp8": 0}  # KvFormat codes of kv_quant.h
_GROUP_SIZES = (32, 64, 128)
_EPLS = (2, 4, 8)
_GBS = (1, 2, 4, 8)
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # DType in common.h
_MODE = {"split": 0, "lean": 1}
_THREADS = 128
_PLAN_THREADS = 256
MAX_HEAD_DIM = 256
_VEC_FP, _VEC_CODES, _VEC_KPARAM = 1, 2, 4  # kKvVec* in kv_attention.cuh


def _kernel_name(fmt_code: int, epl: int, gb: int) -> str:
    return f"{_NS}::decode_attention_kv_kernel<{fmt_code}, {epl}, {gb}>"


def kernel_names() -> list[str]:
    """Name expressions of every instantiation (format x elements per lane x heads per pass),
    plus the plan and reduce kernels it shares with plain decode attention."""
    names = [_kernel_name(f, e, g) for f in FORMATS.values() for e in _EPLS for g in _GBS]
    return names + [PLAN_KERNEL, REDUCE_KERNEL]


def default_tile(group_size: int) -> int:
    """Tokens per schedule tile: a multiple of the group size, at least 64."""
    return group_size * max(1, 64 // group_size)


# ---- sources --------------------------------------------------------------------------------
def _source_roots():
    """(include dir holding pykernels/*.h, dir holding kv_attention.cuh): the installed copy
    (pykernels/_csrc) first, else the repository's csrc/."""
    pkg = Path(__file__).resolve().parent.parent
    for inc, cu in ((pkg / "_csrc" / "include", pkg / "_csrc" / "cuda"),
                    (pkg.parent / "csrc" / "include", pkg.parent / "csrc" / "cuda")):
        if (inc / "pykernels" / "kv_quant.h").is_file() and (cu / "kv_attention.cuh").is_file():
            return inc, cu
    raise FileNotFoundError(
        "pykernels quantized-KV CUDA sources not found: looked for pykernels/_csrc (installed package) "
        "and csrc/ next to the package (source checkout); reinstall pykernels")


@functools.lru_cache(maxsize=None)
def kernel_source() -> str:
    """The NVRTC-ready source: kv_attention.cuh with decode_attention.cuh and the pykernels
    headers inlined (the cupy cache key then covers every compiled line)."""
    include_dir, cuda_dir = _source_roots()
    main = cuda_dir / "kv_attention.cuh"
    return "".join(_expand(main, include_dir, {main.resolve()}))


def compile_nvrtc(arch: str = "sm_80", names: list[str] | None = None, *, optimize: bool = True) -> dict[str, int]:
    """Compile kernel instantiations (default: all of :func:`kernel_names`) to PTX with NVRTC in
    one program; no GPU needed. ``optimize=False`` adds ``-G`` (same front end and PTX
    generation, much faster). -> name -> bytes of PTX of its ``.entry``; RuntimeError with the
    NVRTC log on failure."""
    names = kernel_names() if names is None else list(names)
    return nvrtc_entry_sizes(kernel_source(), "kv_attention.cu", names, arch, optimize=optimize)


# ---- what is available ----------------------------------------------------------------------
def _native_kv():
    """(pykernels._cuda or None, reason); None also when the build predates this kernel."""
    native, reason = _native()
    if native is not None and not hasattr(native, "decode_attention_kv"):
        return None, reason + " but has no decode_attention_kv (stale build: rebuild pykernels)"
    return native, reason


def available() -> tuple[bool, str]:
    """Whether the quantized-KV CUDA kernel can run here, and why (never raises)."""
    try:
        return availability(*_native_kv())
    except Exception as e:  # pragma: no cover - available() never raises
        return False, f"CUDA availability check failed: {type(e).__name__}: {e}"


# ---- validation (JIT path; same rules, order and messages as csrc/cuda/kv_attention.cu) -------
_DL_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64",
             torch.uint8: "uint8", torch.int8: "int8", torch.int16: "int16", torch.int32: "int32",
             torch.int64: "int64"}


def _dt(t) -> str:
    return _DL_NAMES.get(t.dtype, str(t.dtype).replace("torch.", ""))


def _shape(t) -> str:
    return "[" + ", ".join(str(int(s)) for s in t.shape) + "]"


def _require_ndim(name, t, n):
    if t.dim() != n:
        raise ValueError(f"{name}: expected {n} dimensions, got shape {_shape(t)}")


def _float_dtype(name, t):
    if t.dtype not in _DTYPE_CODE:
        raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {_dt(t)}")
    return t.dtype


def _is_contiguous(t) -> bool:  # TensorArg::require_contiguous: size-1 dims may have any stride
    s = 1
    for i in range(t.dim() - 1, -1, -1):
        if t.shape[i] > 1 and t.stride(i) != s:
            return False
        s *= t.shape[i]
    return True


def _require_contiguous(name, t):
    if not _is_contiguous(t):
        raise ValueError(f"{name}: expected a contiguous tensor")


def _require_last_contiguous(name, t):
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: last dimension must have stride 1, got stride {t.stride(-1)}")


def _require(name, t, dtype, dtype_name, shape):
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected {dtype_name}, got {_dt(t)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape [{', '.join(str(int(s)) for s in shape)}], got {_shape(t)}")
    _require_contiguous(name, t)


def _check_inputs(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fp_k, fp_v, block_table,
                  n_sink, n_quant, n_res, out, lse, scale, fmt, group_size, method, num_splits, num_workers, tile,
                  *, check_devices=True):
    """-> dict of derived sizes and the host-checked lengths. Raises ValueError / TypeError
    naming the argument (devices last; ``check_devices=False`` skips that rule, for the CPU
    emulation of the kernels in the tests only)."""
    if method not in _MODE:
        raise ValueError(f"method: expected 'lean' or 'split', got '{method}'")
    for name, val in (("tile", tile), ("num_workers", num_workers), ("num_splits", num_splits)):
        if val < 1:
            raise ValueError(f"{name}: expected >= 1, got {val}")
    if not math.isfinite(scale):
        raise ValueError("scale: must be finite")
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected 'int8', 'int4', 'int2' or 'fp8', got '{fmt}'")
    gs = group_size
    if gs not in _GROUP_SIZES:
        raise ValueError(f"group_size: expected one of (32, 64, 128), got {gs}")
    fp8 = fmt == "fp8"
    bits = 8 if fp8 else FORMATS[fmt]
    named = [("q", q), ("k_codes", k_codes), ("k_scale", k_scale), ("v_codes", v_codes), ("v_scale", v_scale),
             ("k_zero", k_zero), ("v_zero", v_zero), ("fp_k", fp_k), ("fp_v", fp_v), ("block_table", block_table),
             ("n_sink", n_sink), ("n_quant", n_quant), ("n_res", n_res), ("out", out), ("lse", lse)]
    for name, t in named:
        if t is None and name in ("k_zero", "v_zero", "block_table"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")

    _require_ndim("q", q, 3)
    _float_dtype("q", q)
    B, Hq, D = (int(s) for s in q.shape)
    if D < 8 or D % 8 or D > MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim {D} is not supported by the CUDA backend (a multiple of 8 in [8, {MAX_HEAD_DIM}])")
    _require_ndim("k_codes", k_codes, 4)
    if k_codes.dtype != torch.uint8:
        raise TypeError(f"k_codes: expected uint8, got {_dt(k_codes)}")
    P, Hkv, S, rb = (int(s) for s in k_codes.shape)
    RB = D if fp8 else D * bits // 8
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q: num_heads {Hq} is not a multiple of k_codes num_kv_heads {Hkv}")
    if S < 1 or S % gs:
        raise ValueError(f"k_codes: page_tokens {S} is not a positive multiple of group_size {gs}")
    if rb != RB:
        raise ValueError(f"k_codes: expected {RB} bytes per row ({fmt}, head_dim {D}), got shape {_shape(k_codes)}")
    _require_contiguous("k_codes", k_codes)
    _require("v_codes", v_codes, torch.uint8, "uint8", (P, Hkv, S, RB))
    NG = -(-D // gs)
    if fp8:
        _require("k_scale", k_scale, torch.float32, "float32", (P, Hkv, S // gs))
        _require("v_scale", v_scale, torch.float32, "float32", (P, Hkv, S // gs))
        if k_zero is not None:
            raise ValueError("k_zero: must be None for fp8 (no zero points)")
        if v_zero is not None:
            raise ValueError("v_zero: must be None for fp8 (no zero points)")
    else:
        if k_zero is None:
            raise ValueError("k_zero: required for the integer formats")
        if v_zero is None:
            raise ValueError("v_zero: required for the integer formats")
        _require("k_scale", k_scale, torch.float16, "float16", (P, Hkv, S // gs, D))
        _require("k_zero", k_zero, torch.float16, "float16", (P, Hkv, S // gs, D))
        _require("v_scale", v_scale, torch.float16, "float16", (P, Hkv, S, NG))
        _require("v_zero", v_zero, torch.float16, "float16", (P, Hkv, S, NG))
    _require_ndim("fp_k", fp_k, 4)
    fdt = _float_dtype("fp_k", fp_k)
    if fp_k.shape[0] != B or fp_k.shape[2] != Hkv or fp_k.shape[3] != D:
        raise ValueError(f"fp_k: expected shape [B={B}, F, Hkv={Hkv}, D={D}], got {_shape(fp_k)}")
    _require_last_contiguous("fp_k", fp_k)
    _require_ndim("fp_v", fp_v, 4)
    if _float_dtype("fp_v", fp_v) != fdt:
        raise TypeError(f"fp_v: dtype {_dt(fp_v)} differs from fp_k dtype {_dt(fp_k)}")
    if fp_v.shape != fp_k.shape:
        raise ValueError(f"fp_v: shape {_shape(fp_v)} differs from fp_k shape {_shape(fp_k)}")
    _require_last_contiguous("fp_v", fp_v)
    F = int(fp_k.shape[1])
    if block_table is not None:
        _require_ndim("block_table", block_table, 2)
        if block_table.dtype != torch.int32 or block_table.shape[0] != B:
            raise ValueError(f"block_table: expected int32 [{B}, max_pages], got {_dt(block_table)} "
                             f"{_shape(block_table)}")
        if block_table.shape[1] > 1 and block_table.stride(1) != 1:
            raise ValueError("block_table: last dimension must have stride 1")
        max_pages = int(block_table.shape[1])
    else:
        if P < B:
            raise ValueError(f"k_codes: without a block_table sequence b uses page b, so P >= B={B} pages are "
                             f"needed, got shape {_shape(k_codes)}")
        max_pages = 1
    store_capacity = max_pages * S
    for name, t in (("n_sink", n_sink), ("n_quant", n_quant), ("n_res", n_res)):
        _require_ndim(name, t, 1)
        if t.dtype != torch.int32 or t.shape[0] != B:
            raise ValueError(f"{name}: expected int32 [{B}], got {_dt(t)} {_shape(t)}")
    _require_ndim("out", out, 3)
    _float_dtype("out", out)
    if tuple(out.shape) != (B, Hq, D):
        raise ValueError(f"out: expected shape [B, Hq, D], got {_shape(out)}")
    _require_contiguous("out", out)
    _require_ndim("lse", lse, 2)
    if lse.dtype != torch.float32 or tuple(lse.shape) != (B, Hq):
        raise ValueError(f"lse: expected float32 [B, Hq], got {_dt(lse)} {_shape(lse)}")
    _require_contiguous("lse", lse)

    # values: host copies (the kernels read only the uploaded, checked copies)
    hs, hq, hr = (t.cpu().tolist() for t in (n_sink, n_quant, n_res))
    hb = block_table.cpu() if block_table is not None else None
    lens = []
    for b in range(B):
        s, u, r = hs[b], hq[b], hr[b]
        if s < 0:
            raise ValueError(f"n_sink: n_sink[{b}] = {s} is negative")
        if u < 0:
            raise ValueError(f"n_quant: n_quant[{b}] = {u} is negative")
        if r < 0:
            raise ValueError(f"n_res: n_res[{b}] = {r} is negative")
        if u % gs:
            raise ValueError(f"n_quant: n_quant[{b}] = {u} is not a multiple of group_size {gs}")
        if u > store_capacity:
            raise ValueError(f"n_quant: n_quant[{b}] = {u} exceeds the store capacity {max_pages} pages x {S} "
                             f"page_tokens")
        if s + r > F:
            raise ValueError(f"n_res: n_sink[{b}] + n_res[{b}] = {s + r} exceeds the {F} fp rows of fp_k / fp_v")
        L = s + u + r
        if L < 1:
            raise ValueError(f"n_res: sequence {b} has no tokens (n_sink + n_quant + n_res must be >= 1)")
        if L > 0x7FFFFFFF:
            raise ValueError(f"n_quant: sequence {b} has {L} tokens (at most 2^31 - 1)")
        if hb is not None:
            npg = -(-u // S)
            ids = hb[b, :npg]
            bad = ((ids < 0) | (ids >= P)).nonzero()
            if len(bad):
                j = int(bad[0, 0])
                raise ValueError(f"block_table: block_table[{b}, {j}] = {int(ids[j])} is outside [0, {P})")
        lens.append(L)

    # devices
    order = [("q", q), ("k_codes", k_codes), ("k_scale", k_scale), ("v_codes", v_codes), ("v_scale", v_scale),
             ("fp_k", fp_k), ("fp_v", fp_v), ("n_sink", n_sink), ("n_quant", n_quant), ("n_res", n_res),
             ("out", out), ("lse", lse), ("k_zero", k_zero), ("v_zero", v_zero), ("block_table", block_table)]
    for name, t in order if check_devices else ():
        if t is None:
            continue
        if t.device.type != "cuda":
            raise ValueError(f"{name}: the CUDA backend needs CUDA tensors, got device {t.device}")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device} but q is on {q.device}")
    return dict(B=B, Hq=Hq, D=D, P=P, Hkv=Hkv, S=S, F=F, max_pages=max_pages, lens=lens, ns=hs, nq=hq, fp8=fp8,
                gs_shift={32: 5, 64: 6, 128: 7}[gs])


# ---- cupy JIT path --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _jit_module(attention_name: str):
    cupy, reason = _cupy()
    if cupy is None:
        raise RuntimeError(f"the cupy JIT path needs cupy: {reason}")
    return cupy.RawModule(code=kernel_source(), options=("-std=c++17",),
                          name_expressions=(attention_name, PLAN_KERNEL, REDUCE_KERNEL))


def _prepare(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fp_k, fp_v, block_table, n_sink, n_quant,
             n_res, out, lse, scale, fmt, group_size, method, num_splits, num_workers, tile, *, check_devices=True):
    """Validate and build the three launches: -> None (nothing to do) or a dict with the kernel
    name, grid sizes, the argument tuples (numpy scalars; pointers as uint64) of the plan,
    attention and reduce kernels, and the workspace tensors they point into (keep them alive
    until the launches are enqueued)."""
    import numpy as np

    c = _check_inputs(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fp_k, fp_v, block_table, n_sink,
                      n_quant, n_res, out, lse, scale, fmt, group_size, method, num_splits, num_workers, tile,
                      check_devices=check_devices)
    B, Hq, D, Hkv = c["B"], c["Hq"], c["D"], c["Hkv"]
    if B == 0 or Hq == 0:
        return None
    lens = c["lens"]
    G = Hq // Hkv
    nseg, W, num_slots, grid = grid_plan(lens, Hkv, tile, method, num_splits, num_workers)

    epl, gb = kernel_config(D, G)
    falign = min(16, epl * fp_k.element_size())
    vec_fp = (D % epl == 0 and fp_k.data_ptr() % falign == 0 and fp_v.data_ptr() % falign == 0
              and all(fp_k.stride(i) % epl == 0 and fp_v.stride(i) % epl == 0 for i in range(3)))
    vec_codes = k_codes.data_ptr() % 8 == 0 and v_codes.data_ptr() % 8 == 0
    palign = min(16, 2 * epl)
    vec_kparam = (not c["fp8"]) and k_scale.data_ptr() % palign == 0 and k_zero.data_ptr() % palign == 0
    vec = (_VEC_FP if vec_fp else 0) | (_VEC_CODES if vec_codes else 0) | (_VEC_KPARAM if vec_kparam else 0)

    dev = q.device
    meta = torch.tensor(lens + c["ns"] + c["nq"], dtype=torch.int32).to(dev)
    cum = torch.empty(nseg + 1, dtype=torch.int64, device=dev)
    split_base = torch.empty(nseg, dtype=torch.int64, device=dev)
    part_o = torch.empty(max(num_slots, 1) * G * D, dtype=torch.float32, device=dev)
    part_lse = torch.empty(max(num_slots, 1) * G, dtype=torch.float32, device=dev)
    capacity = max(lens)
    i64, f32 = np.int64, np.float32

    def ptr(t):
        return np.uint64(0 if t is None else t.data_ptr())

    mode = i64(_MODE[method])
    plan_args = (ptr(meta), i64(1), i64(B), i64(Hkv), i64(tile), i64(capacity), i64(num_splits), ptr(cum),
                 ptr(split_base))
    kv_args = (ptr(q), i64(q.stride(0)), i64(q.stride(1)), i64(q.stride(2)), i64(_DTYPE_CODE[q.dtype]),
               ptr(k_codes), ptr(k_scale), ptr(k_zero), ptr(v_codes), ptr(v_scale), ptr(v_zero),
               ptr(fp_k), ptr(fp_v), i64(fp_k.stride(0)), i64(fp_k.stride(1)), i64(fp_k.stride(2)),
               i64(fp_v.stride(0)), i64(fp_v.stride(1)), i64(fp_v.stride(2)), i64(_DTYPE_CODE[fp_k.dtype]),
               i64(c["F"]), ptr(block_table), i64(block_table.stride(0) if block_table is not None else 0),
               i64(c["max_pages"]), i64(c["P"]), i64(c["S"]), i64(c["gs_shift"]), ptr(meta), i64(capacity),
               ptr(cum), ptr(split_base), ptr(out), i64(_DTYPE_CODE[out.dtype]), ptr(lse),
               ptr(part_o), ptr(part_lse), i64(num_slots),
               i64(B), i64(Hq), i64(Hkv), i64(D), i64(tile), mode, i64(num_splits), f32(scale), i64(vec))
    reduce_args = (ptr(cum), ptr(split_base), ptr(part_o), ptr(part_lse), i64(num_slots),
                   ptr(out), i64(_DTYPE_CODE[out.dtype]), ptr(lse),
                   i64(B), i64(Hq), i64(Hkv), i64(D), mode, i64(num_splits), i64(W))
    return dict(name=_kernel_name(FORMATS[fmt], epl, gb), fmt_code=FORMATS[fmt], epl=epl, gb=gb, grid=grid,
                nseg=nseg, num_slots=num_slots, plan_args=plan_args, kv_args=kv_args, reduce_args=reduce_args,
                keep=(meta, cum, split_base, part_o, part_lse))


def _launch_jit(*args):
    p = _prepare(*args)
    if p is None:
        return
    cupy, _ = _cupy()
    mod = _jit_module(p["name"])
    dev = args[0].device
    stream = torch.cuda.current_stream(dev)
    with cupy.cuda.Device(dev.index), cupy.cuda.ExternalStream(stream.cuda_stream, dev.index):
        mod.get_function(PLAN_KERNEL)((1,), (_PLAN_THREADS,), p["plan_args"])
        mod.get_function(p["name"])((p["grid"],), (_THREADS,), p["kv_args"])
        if p["num_slots"] > 0:
            mod.get_function(REDUCE_KERNEL)((p["nseg"],), (_THREADS,), p["reduce_args"])
    # The workspace tensors (p["keep"]) are freed here; the caching allocator keeps them
    # reserved for the work already enqueued on this stream.


# ---- entry point ----------------------------------------------------------------------------
def _as_codes(t):
    """fp8 codes may be given as float8_e4m3fn tensors: the kernel reads their bytes."""
    fp8_dtype = getattr(torch, "float8_e4m3fn", None)
    if isinstance(t, torch.Tensor) and fp8_dtype is not None and t.dtype == fp8_dtype:
        return t.view(torch.uint8)
    return t


def decode_attention_kv(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fp_k, fp_v, block_table,
                        n_sink, n_quant, n_res, out, lse, scale=None, fmt="int4", group_size=32, method="lean",
                        num_splits=8, num_workers=None, tile=None, *, impl="auto") -> None:
    r"""Decode attention over a quantized KV cache on CUDA tensors, written into ``out`` / ``lse``.

    Sequence ``b`` attends its ``L = n_sink[b] + n_quant[b] + n_res[b]`` tokens, ordered
    sink (fp rows ``0 .. n_sink-1``) | quantized store (``n_quant`` tokens through
    ``block_table``) | residual (fp rows ``n_sink ..``): for query head ``h`` (kv-head
    ``h // (Hq // Hkv)``) ``out[b, h] = softmax(scale * K_b q[b, h]) V_b`` and
    ``lse[b, h] = log(sum_t exp(scale * <q[b, h], k_t>))``, K and V dequantized in registers.

    Parameters
    ----------
    q : Tensor [B, Hq, D]
        fp32 / fp16 / bf16, any strides; D a multiple of 8, at most 256.
    k_codes, v_codes : Tensor uint8 [P, Hkv, S, D * bits / 8] (fp8: [P, Hkv, S, D], uint8 or
        float8_e4m3fn), contiguous; S (page_tokens) a multiple of group_size.
    k_scale, k_zero : Tensor
        int: float16 [P, Hkv, S / gs, D] (per channel, groups of gs tokens); fp8: k_scale float32
        [P, Hkv, S / gs], k_zero None.
    v_scale, v_zero : Tensor
        int: float16 [P, Hkv, S, ceil(D / gs)] (per token, groups of gs channels); fp8: v_scale
        float32 [P, Hkv, S / gs], v_zero None.
    fp_k, fp_v : Tensor [B, F, Hkv, D]
        Sink + residual rows (fp32 / fp16 / bf16, head_dim contiguous).
    block_table : Tensor int32 [B, max_pages] or None
        Pages of the quantized store (None: sequence b uses page b).
    n_sink, n_quant, n_res : Tensor int32 [B]
        ``n_quant`` a multiple of group_size; ``n_sink + n_res <= F``; ``L >= 1``.
    out : Tensor [B, Hq, D] contiguous (any float dtype); lse : Tensor float32 [B, Hq] contiguous.
    scale : float, optional
        Default ``D ** -0.5``.
    fmt : {"int8", "int4", "int2", "fp8"}; group_size : {32, 64, 128}
    method : {"lean", "split"}; num_splits : int; num_workers : int, optional
        As :func:`pykernels.cuda.decode_attention` (lean default: 4 CTAs per SM).
    tile : int, optional
        Tokens per schedule tile, default :func:`default_tile` (a multiple of group_size).
    impl : {"auto", "native", "jit"}
        ``pykernels._cuda`` when built (``"auto"``), or the cupy JIT path.

    Examples
    --------
    >>> f = kv_format.quantize_kv(k, v, 4, 32)  # k, v [B, Hkv, T, D]: one page per sequence
    >>> decode_attention_kv(q, f["k_codes"], f["k_scale"], f["k_zero"], f["v_codes"], f["v_scale"],
    ...                     f["v_zero"], fp_k, fp_v, None, n_sink, n_quant, n_res, out, lse,
    ...                     fmt="int4", group_size=32)  # doctest: +SKIP
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5 if isinstance(q, torch.Tensor) and q.dim() >= 1 else 1.0
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError("scale: must be finite")
    if tile is None:
        tile = default_tile(group_size) if group_size in _GROUP_SIZES else 64
    if num_workers is None:
        num_workers = default_num_workers(q.device) if isinstance(q, torch.Tensor) and q.is_cuda else 1
    if impl not in ("auto", "native", "jit"):
        raise ValueError(f"impl: expected 'auto', 'native' or 'jit', got {impl!r}")
    k_codes, v_codes = _as_codes(k_codes), _as_codes(v_codes)
    args = (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fp_k, fp_v, block_table, n_sink, n_quant, n_res,
            out, lse, scale, str(fmt), int(group_size), str(method), int(num_splits), int(num_workers), int(tile))
    native, reason = _native_kv()
    if impl == "native" and native is None:
        raise RuntimeError(f"impl='native': {reason}")
    if native is not None and impl != "jit":
        stream = torch.cuda.current_stream(q.device).cuda_stream if isinstance(q, torch.Tensor) and q.is_cuda else 0
        native.decode_attention_kv(*map(backends.dl, args), stream)
        return
    _launch_jit(*args)
