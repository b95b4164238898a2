"""CUDA backend for decode attention.

Two ways to run the same kernels (``csrc/cuda/decode_attention.cuh``):

* ``pykernels._cuda``: built by ``setup.py`` with nvcc (sm_80 / sm_90 SASS);
* the cupy JIT path: when the extension was not built, the ``.cuh`` text (shipped in the package
  as ``pykernels/_csrc``, or read from the repository's ``csrc``) is compiled at run time with
  NVRTC through ``cupy.RawModule`` and cached on disk outside the package
  (``$CUPY_CACHE_DIR``, default ``~/.cache/pykernels/cupy``).

NVRTC needs no GPU, so :func:`compile_nvrtc` compiles every kernel instantiation on a CPU-only
machine (the CI check that keeps the CUDA sources from rotting).

Nothing here touches cupy, the extension or the GPU at import time.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import re
import sys
from pathlib import Path

import torch

from .. import backends

__all__ = ["available", "decode_attention", "compile_nvrtc", "kernel_names", "kernel_config",
           "kernel_source", "default_num_workers"]

# ---- kernel catalogue (mirrors csrc/cuda/decode_attention.cuh / .cu) --------------------------
_NS = "pykernels::cuda_kernels"
_CACHE_TYPES = {torch.float32: "float", torch.float16: "pykernels::fp16_t", torch.bfloat16: "pykernels::bf16_t"}
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # DType in common.h
_EPLS = (2, 4, 8)     # elements of D per lane: D <= 64, <= 128, <= 256
_GBS = (1, 2, 4, 8)   # query heads per pass
MAX_HEAD_DIM = 256
_THREADS = 128        # kThreads
_PLAN_THREADS = 256   # kPlanThreads
_MODE = {"split": 0, "lean": 1}
PLAN_KERNEL = f"{_NS}::decode_attention_plan_kernel"
REDUCE_KERNEL = f"{_NS}::decode_attention_reduce_kernel"


def kernel_config(head_dim: int, group_size: int) -> tuple[int, int]:
    """(elements of D per lane, query heads per pass): the instantiation a call uses.

    Same rule as ``pick_config`` in ``csrc/cuda/decode_attention.cu``.
    """
    epl = 2 if head_dim <= 64 else (4 if head_dim <= 128 else 8)
    g = min(group_size, 8)
    gb = 1 if g <= 1 else (2 if g <= 2 else (4 if g <= 4 else 8))
    return epl, gb


def _attention_kernel(ctype: str, epl: int, gb: int) -> str:
    return f"{_NS}::decode_attention_kernel<{ctype}, {epl}, {gb}>"


def kernel_names() -> list[str]:
    """Name expressions of every kernel instantiation (for NVRTC / ``cupy.RawModule``)."""
    names = [_attention_kernel(t, e, g) for t in _CACHE_TYPES.values() for e in _EPLS for g in _GBS]
    return names + [PLAN_KERNEL, REDUCE_KERNEL]


# ---- sources --------------------------------------------------------------------------------
def _source_roots() -> tuple[Path, Path]:
    """(include dir holding pykernels/*.h, dir holding decode_attention.cuh): the copy installed
    with the package first, else the repository's csrc/."""
    pkg = Path(__file__).resolve().parent.parent  # .../pykernels
    candidates = [(pkg / "_csrc" / "include", pkg / "_csrc" / "cuda"),
                  (pkg.parent / "csrc" / "include", pkg.parent / "csrc" / "cuda")]
    for inc, cu in candidates:
        if (inc / "pykernels" / "common.h").is_file() and (cu / "decode_attention.cuh").is_file():
            return inc, cu
    raise FileNotFoundError(
        "pykernels CUDA sources not found: looked for pykernels/_csrc (installed package) and "
        "csrc/ next to the package (source checkout); reinstall pykernels")


_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def _expand(path: Path, include_dir: Path, seen: set) -> list[str]:
    """Text of `path` with its quoted includes inlined (each file once, like #pragma once), with
    #line markers so NVRTC errors point at the real file and line."""
    lines = [f'#line 1 "{path.name}"\n']
    for n, line in enumerate(path.read_text().splitlines(keepends=True), start=1):
        m = _INCLUDE_RE.match(line)
        if m:
            for base in (path.parent, include_dir):
                target = (base / m.group(1)).resolve()
                if target.is_file():
                    break
            else:
                raise FileNotFoundError(f"{path}:{n}: include {m.group(1)!r} not found")
            if target not in seen:
                seen.add(target)
                lines += _expand(target, include_dir, seen)
                lines.append(f'#line {n + 1} "{path.name}"\n')
            continue
        lines.append(line)
    return lines


@functools.lru_cache(maxsize=None)
def kernel_source() -> str:
    """The NVRTC-ready source: decode_attention.cuh with the pykernels headers inlined (so the
    cupy cache key covers every line that is compiled)."""
    include_dir, cuda_dir = _source_roots()
    main = cuda_dir / "decode_attention.cuh"
    return "".join(_expand(main, include_dir, {main.resolve()}))


def _cuda_include_dirs() -> list[str]:
    """CUDA's own headers, when present: the nvidia-cuda-runtime wheel, $CUDA_HOME, /usr/local/cuda.
    The kernels include none of them (NVRTC provides the built-ins); passed for completeness."""
    dirs = []
    try:
        import nvidia  # namespace package of the NVIDIA wheels

        for root in getattr(nvidia, "__path__", []):
            for sub in ("cu13/include", "cu12/include", "cuda_runtime/include"):
                p = Path(root) / sub
                if (p / "cuda_runtime.h").is_file():
                    dirs.append(str(p))
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            dirs.append(str(Path(home) / "include"))
    return list(dict.fromkeys(dirs))


# ---- what is available ----------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _native():
    """(module or None, reason)."""
    try:
        mod = importlib.import_module("pykernels._cuda")
    except Exception as e:  # ImportError, or a broken build: a reason, never an import failure
        return None, f"pykernels._cuda not built ({type(e).__name__}: {e})"
    return mod, "pykernels._cuda built"


def _cupy_cache_dir() -> str:
    """CUPY_CACHE_DIR if set, else ``$XDG_CACHE_HOME/pykernels/cupy`` (``~/.cache`` without it),
    beside the package's other caches."""
    from roofline.measure import pykernels_cache

    return os.environ.get("CUPY_CACHE_DIR") or pykernels_cache("cupy")


@functools.lru_cache(maxsize=None)
def _cupy():
    """(cupy module or None, reason). Sets CUPY_CACHE_DIR first (cupy reads it when imported)
    unless the user set it, so compiled kernels land outside the package directory."""
    set_here = "cupy" not in sys.modules and "CUPY_CACHE_DIR" not in os.environ
    if set_here:
        os.environ["CUPY_CACHE_DIR"] = _cupy_cache_dir()
    try:
        import cupy
    except Exception as e:
        if set_here:  # no cupy: leave the environment as it was
            os.environ.pop("CUPY_CACHE_DIR", None)
        return None, f"cupy not importable ({type(e).__name__}: {e})"
    return cupy, f"cupy {cupy.__version__} importable"


def availability(native, native_reason: str) -> tuple[bool, str]:
    """(usable, reason) of a CUDA kernel family given its native module (or None) and why: a
    CUDA device must be visible to torch, and the kernels must come from ``pykernels._cuda`` or
    from the cupy/NVRTC JIT path. The reason says what is present and how to fix what is not.
    Shared by every ``available()`` of this package."""
    try:
        has_gpu = bool(torch.cuda.is_available())
    except Exception:
        has_gpu = False
    cuda_build = getattr(torch.version, "cuda", None)
    torch_reason = (f"torch.cuda.is_available()={has_gpu} (torch {torch.__version__}, "
                    f"{'CUDA ' + cuda_build if cuda_build else 'CPU-only build'})")
    if native is None and has_gpu:
        cupy, cupy_reason = _cupy()
        has_cupy = cupy is not None
    else:  # not needed now: report whether it is installed without importing it
        has_cupy = False
        found = importlib.util.find_spec("cupy") is not None
        cupy_reason = f"cupy {'installed' if found else 'not installed'}"
    reason = f"{native_reason}; {torch_reason}; {cupy_reason}"
    if not has_gpu:
        return False, reason + ("; fix: run on a machine with an NVIDIA GPU and a CUDA build of torch "
                                "(pip install torch from the CUDA index)")
    if native is None and not has_cupy:
        return False, reason + ("; fix: reinstall pykernels with the CUDA toolkit present (nvcc on PATH "
                                "or CUDA_HOME set; PYKERNELS_CUDA=1 makes a missing nvcc an error), or "
                                "pip install 'pykernels[jit]' (cupy + NVRTC) to compile at run time")
    return True, reason + ("; using pykernels._cuda" if native is not None else "; using the cupy JIT path")


def available() -> tuple[bool, str]:
    """Whether CUDA decode attention can run here, and why (never raises).

    The reason lists what was built (``pykernels._cuda``), what is present (a CUDA device seen
    by torch, cupy) and how to fix what is missing.
    """
    try:
        native, native_reason = _native()
        if native is not None:
            try:
                native_reason += f", sees {native.device_count()} device(s)"
            except Exception as e:  # pragma: no cover - device_count() itself never raises
                native_reason += f", device_count() failed: {e}"
        return availability(native, native_reason)
    except Exception as e:  # pragma: no cover - belt and braces: available() never raises
        return False, f"CUDA availability check failed: {type(e).__name__}: {e}"


def default_num_workers(device) -> int:
    """Lean workers for a device: 4 CTAs per SM (2-4 are resident at once, so at most a couple
    of balanced waves)."""
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


# ---- NVRTC without a GPU --------------------------------------------------------------------
def compile_nvrtc(arch: str = "sm_80") -> dict[str, int]:
    """Compile every kernel instantiation to PTX with NVRTC; no GPU needed.

    Parameters
    ----------
    arch : str
        Virtual architecture, ``"sm_80"`` / ``"compute_80"`` style.

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
    return nvrtc_entry_sizes(kernel_source(), "decode_attention.cu", kernel_names(), arch)


def nvrtc_entry_sizes(src: str, filename: str, names: list[str], arch: str, *,
                      optimize: bool = True) -> dict[str, int]:
    """Compile ``src`` with NVRTC for ``arch`` (no GPU needed), instantiating the kernels named
    by the C++ name expressions ``names``; -> name -> bytes of PTX of its ``.entry``.
    ``optimize=False`` adds ``-G``."""
    from cupy_backends.cuda.libs import nvrtc

    num = re.sub(r"\D", "", arch)
    if not num:
        raise ValueError(f"arch: expected like 'sm_80', got {arch!r}")
    opts = [f"-arch=compute_{num}", "-std=c++17"] + [f"-I{d}" for d in _cuda_include_dirs()]
    if not optimize:
        opts.append("-G")
    prog = nvrtc.createProgram(src, filename, [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC failed to compile {filename} for {arch} ({e}):\n"
                               f"{nvrtc.getProgramLog(prog)}") from None
        ptx = nvrtc.getPTX(prog)
        if isinstance(ptx, bytes):
            ptx = ptx.decode()
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
    finally:
        nvrtc.destroyProgram(prog)
    starts = {m.group(1): m.start() for m in re.finditer(r"\.entry\s+([A-Za-z0-9_$]+)\s*\(", ptx)}
    bounds = sorted(starts.values()) + [len(ptx)]
    sizes = {}
    for n, low in lowered.items():
        if low not in starts:
            raise RuntimeError(f"NVRTC output has no .entry for {n} ({low})")
        st = starts[low]
        sizes[n] = next(b for b in bounds if b > st) - st
    return sizes


# ---- cupy JIT path --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _jit_module(attention_name: str):
    cupy, reason = _cupy()
    if cupy is None:
        raise RuntimeError(f"the cupy JIT path needs cupy: {reason}")
    names = (attention_name, PLAN_KERNEL, REDUCE_KERNEL)
    return cupy.RawModule(code=kernel_source(), options=("-std=c++17",), name_expressions=names)


def _check_devices(named, q):
    for name, t in named:
        if t.device.type != "cuda":
            raise ValueError(f"{name}: the CUDA backend needs CUDA tensors, got device {t.device}")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device} but q is on {q.device}")


def _check_inputs(q, k_cache, v_cache, seqlens, block_table, out, lse, method, num_splits, num_workers, tile):
    """Validation of the JIT path; same rules and messages as the C++ launchers."""
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("seqlens", seqlens), ("out", out), ("lse", lse)]
    if block_table is not None:
        named.append(("block_table", block_table))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    _check_devices(named, q)
    if method not in _MODE:
        raise ValueError(f"method: expected 'lean' or 'split', got {method!r}")
    for name, val in (("tile", tile), ("num_workers", num_workers), ("num_splits", num_splits)):
        if val < 1:
            raise ValueError(f"{name}: expected >= 1, got {val}")
    for name, t, nd in (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4), ("seqlens", seqlens, 1),
                        ("out", out, 3), ("lse", lse, 2)):
        if t.dim() != nd:
            raise ValueError(f"{name}: expected {nd} dimensions, got shape {list(t.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.dtype not in _DTYPE_CODE:
            raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}")
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache: dtype {v_cache.dtype} differs from k_cache dtype {k_cache.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: shape {list(v_cache.shape)} differs from k_cache shape {list(k_cache.shape)}")
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache: head_dim {k_cache.shape[3]} differs from q head_dim {D}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q: num_heads {Hq} is not a multiple of k_cache num_kv_heads {Hkv}")
    if D < 1:
        raise ValueError("q: head_dim must be >= 1")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim {D} is not supported by the CUDA backend (at most {MAX_HEAD_DIM})")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.shape[3] > 1 and t.stride(3) != 1:
            raise ValueError(f"{name}: last dimension must have stride 1, got stride {t.stride(3)}")
    if seqlens.dtype != torch.int32 or seqlens.shape[0] != B:
        raise ValueError(f"seqlens: expected int32 [{B}], got {seqlens.dtype} {list(seqlens.shape)}")
    if tuple(out.shape) != (B, Hq, D):
        raise ValueError(f"out: expected shape [B, Hq, D], got {list(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("out: expected a contiguous tensor")
    if lse.dtype != torch.float32 or tuple(lse.shape) != (B, Hq):
        raise ValueError(f"lse: expected float32 [B, Hq], got {lse.dtype} {list(lse.shape)}")
    if not lse.is_contiguous():
        raise ValueError("lse: expected a contiguous tensor")
    if block_table is not None:
        if block_table.dim() != 2:
            raise ValueError(f"block_table: expected 2 dimensions, got shape {list(block_table.shape)}")
        if block_table.dtype != torch.int32 or block_table.shape[0] != B:
            raise ValueError(f"block_table: expected int32 [{B}, max_blocks], got {block_table.dtype} "
                             f"{list(block_table.shape)}")
        if block_table.shape[1] > 1 and block_table.stride(1) != 1:
            raise ValueError("block_table: last dimension must have stride 1")
        block_size = k_cache.shape[1]
        if block_size < 1:
            raise ValueError("k_cache: block_size must be >= 1")
        capacity = block_table.shape[1] * block_size
    else:
        block_size = 0
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache: batch {k_cache.shape[0]} differs from q batch {B}")
        capacity = k_cache.shape[1]
    # Range checks on host copies: no bad length or block id may reach the kernel.
    lens = seqlens.cpu().tolist()
    for b, L in enumerate(lens):
        if L < 1 or L > capacity:
            raise ValueError(f"seqlens: seqlens[{b}] = {L} is outside [1, {capacity}] (cache capacity)")
    if block_table is not None and B > 0:
        bt = block_table.cpu()
        nblocks = k_cache.shape[0]
        for b, L in enumerate(lens):
            ids = bt[b, : -(-L // block_size)]
            bad = ((ids < 0) | (ids >= nblocks)).nonzero()
            if len(bad):
                j = int(bad[0, 0])
                raise ValueError(f"block_table: block_table[{b}, {j}] = {int(ids[j])} is outside [0, {nblocks})")
    return lens, capacity, block_size


def grid_plan(lens, Hkv: int, tile: int, method: str, num_splits: int, num_workers: int):
    """-> (segments B*Hkv, lean workers W, partial-state slots, CTAs) of a lean or split launch
    over host lengths ``lens`` [B]; ValueError past the CUDA grid limit."""
    nseg = len(lens) * Hkv
    if nseg > 0x7FFFFFFF:
        raise ValueError(f"q: batch x num_kv_heads = {nseg} exceeds the CUDA grid limit")
    ntiles = [-(-lens[s // Hkv] // tile) for s in range(nseg)]
    W = max(1, min(num_workers, sum(ntiles)))
    if method == "lean":
        return nseg, W, 2 * W, W
    grid = nseg * num_splits
    if grid > 0x7FFFFFFF:
        raise ValueError(f"num_splits: {num_splits} splits x {nseg} (sequence, kv-head) pairs exceeds the CUDA grid limit")
    return nseg, W, sum(min(num_splits, n) for n in ntiles if min(num_splits, n) > 1), grid


def _launch_jit(q, k_cache, v_cache, seqlens, block_table, out, lse, scale, method, num_splits, num_workers, tile):
    import numpy as np

    lens, capacity, block_size = _check_inputs(q, k_cache, v_cache, seqlens, block_table, out, lse, method,
                                               num_splits, num_workers, tile)
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if B == 0 or Hq == 0:
        return
    G = Hq // Hkv
    nseg, W, num_slots, grid = grid_plan(lens, Hkv, tile, method, num_splits, num_workers)

    epl, gb = kernel_config(D, G)
    esize = k_cache.element_size()
    align = min(16, epl * esize)
    vec = (D % epl == 0 and k_cache.data_ptr() % align == 0 and v_cache.data_ptr() % align == 0
           and all(k_cache.stride(i) % epl == 0 and v_cache.stride(i) % epl == 0 for i in range(3)))

    dev = q.device
    cum = torch.empty(nseg + 1, dtype=torch.int64, device=dev)
    split_base = torch.empty(nseg, dtype=torch.int64, device=dev)
    part_o = torch.empty(max(num_slots, 1) * G * D, dtype=torch.float32, device=dev)
    part_lse = torch.empty(max(num_slots, 1) * G, dtype=torch.float32, device=dev)

    cupy, _ = _cupy()
    mod = _jit_module(_attention_kernel(_CACHE_TYPES[k_cache.dtype], epl, gb))
    i64, f32 = np.int64, np.float32

    def ptr(t):
        return np.uint64(0 if t is None else t.data_ptr())

    mode = i64(_MODE[method])
    stream = torch.cuda.current_stream(dev)
    with cupy.cuda.Device(dev.index), cupy.cuda.ExternalStream(stream.cuda_stream, dev.index):
        mod.get_function(PLAN_KERNEL)(
            (1,), (_PLAN_THREADS,),
            (ptr(seqlens), i64(seqlens.stride(0)), i64(B), i64(Hkv), i64(tile), i64(capacity), i64(num_splits),
             ptr(cum), ptr(split_base)))
        mod.get_function(_attention_kernel(_CACHE_TYPES[k_cache.dtype], epl, gb))(
            (grid,), (_THREADS,),
            (ptr(q), i64(q.stride(0)), i64(q.stride(1)), i64(q.stride(2)), i64(_DTYPE_CODE[q.dtype]),
             ptr(k_cache), ptr(v_cache),
             i64(k_cache.stride(0)), i64(k_cache.stride(1)), i64(k_cache.stride(2)),
             i64(v_cache.stride(0)), i64(v_cache.stride(1)), i64(v_cache.stride(2)),
             ptr(seqlens), i64(seqlens.stride(0)),
             ptr(block_table), i64(block_table.stride(0) if block_table is not None else 0), i64(block_size),
             i64(k_cache.shape[0]), i64(capacity),
             ptr(cum), ptr(split_base),
             ptr(out), i64(_DTYPE_CODE[out.dtype]), ptr(lse),
             ptr(part_o), ptr(part_lse), i64(num_slots),
             i64(B), i64(Hq), i64(Hkv), i64(D), i64(tile),
             mode, i64(num_splits), f32(scale), i64(1 if vec else 0)))
        if num_slots > 0:
            mod.get_function(REDUCE_KERNEL)(
                (nseg,), (_THREADS,),
                (ptr(cum), ptr(split_base), ptr(part_o), ptr(part_lse), i64(num_slots),
                 ptr(out), i64(_DTYPE_CODE[out.dtype]), ptr(lse),
                 i64(B), i64(Hq), i64(Hkv), i64(D), mode, i64(num_splits), i64(W)))
    # The workspace tensors are freed here; the caching allocator keeps them reserved for work
    # already enqueued on this stream, so the kernels above still see valid memory.


# ---- entry point ----------------------------------------------------------------------------
def decode_attention(q, k_cache, v_cache, seqlens, block_table, out, lse, scale=None, method="lean",
                     num_splits=8, num_workers=None, tile=64, *, impl="auto") -> None:
    r"""Decode attention on CUDA tensors, written into ``out`` and ``lse``.

    For each sequence ``b`` and query head ``h`` (kv-head ``h // (Hq // Hkv)``):
    ``out[b, h] = softmax(scale * K_b q[b, h]) V_b`` and
    ``lse[b, h] = log(sum_t exp(scale * <q[b, h], k_t>))`` over the first ``seqlens[b]`` tokens.

    Parameters
    ----------
    q : Tensor [B, Hq, D]
        fp32 / fp16 / bf16 (any strides).
    k_cache, v_cache : Tensor
        Dense ``[B, Lmax, Hkv, D]`` or paged ``[num_blocks, block_size, Hkv, D]``; last dim contiguous.
    seqlens : Tensor [B] int32
        ``1 <= seqlens[b] <= capacity``.
    block_table : Tensor [B, max_blocks] int32 or None
        Block ids of a paged cache; None for a dense cache.
    out : Tensor [B, Hq, D] contiguous
        Output, any float dtype.
    lse : Tensor [B, Hq] float32 contiguous
        Natural-log sum of exp of the scaled scores.
    scale : float, optional
        Softmax scale, default ``D ** -0.5``.
    method : {"lean", "split"}
        Stream-K over all KV tiles, or ``num_splits`` chunks per (sequence, kv-head).
    num_splits : int
        Chunks per (sequence, kv-head) for ``"split"``.
    num_workers : int, optional
        Lean CTAs, default :func:`default_num_workers`.
    tile : int
        Tokens per KV tile (the unit of the partition).
    impl : {"auto", "native", "jit"}
        ``pykernels._cuda`` when built (``"auto"``), or the cupy JIT path.

    Examples
    --------
    >>> out = torch.empty_like(q); lse = q.new_empty(q.shape[:2], dtype=torch.float32)
    >>> decode_attention(q, k, v, seqlens, None, out, lse, method="lean")  # doctest: +SKIP
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError("scale: must be finite")
    if num_workers is None:
        num_workers = default_num_workers(q.device) if q.is_cuda else 1
    if impl not in ("auto", "native", "jit"):
        raise ValueError(f"impl: expected 'auto', 'native' or 'jit', got {impl!r}")
    native, reason = _native()
    if impl == "native" and native is None:
        raise RuntimeError(f"impl='native': {reason}")
    if native is not None and impl != "jit":
        stream = torch.cuda.current_stream(q.device).cuda_stream if q.is_cuda else 0
        dl = backends.dl  # DLPack capsules: cheaper per call than the extension calling __dlpack__
        native.decode_attention(dl(q), dl(k_cache), dl(v_cache), dl(seqlens), dl(block_table), dl(out), dl(lse),
                                scale, method, int(num_splits), int(num_workers), int(tile), stream)
        return
    _launch_jit(q, k_cache, v_cache, seqlens, block_table, out, lse, scale, method,
                int(num_splits), int(num_workers), int(tile))
