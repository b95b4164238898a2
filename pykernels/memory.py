"""Host memory placement for KV caches: transparent huge pages.

A decode-attention kernel walks a ``[L, Hkv, D]`` cache head by head, so at any moment it has
rows of some 60 distinct 4 KiB pages in flight (this block's K and V rows, and the next block's
being prefetched). That is about the size of a core's first-level TLB, and its misses cost the
CPU kernel about 7% of its cold-cache time on the 2-core Zen machine this package is measured on
(median of 6 paired runs, L=16k, bf16, 2 threads: 2.54 ms on 4 KiB pages, 2.37 ms on 2 MiB
pages; single runs vary by +-10%). Backing the cache with 2 MiB pages removes them.

On Linux with transparent huge pages in ``madvise`` mode (the common default), memory gets huge
pages only where the program asks with ``madvise(MADV_HUGEPAGE)`` before first touching it.
:func:`empty_hugepages` allocates a tensor that way; torch users can get the same for every large
CPU allocation by setting ``THP_MEM_ALLOC_ENABLE=1`` before starting Python.
``pk.QuantizedKVCache`` and the benchmarks' KV caches are allocated this way on the CPU;
``PYKERNELS_HUGEPAGES=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import sys

import torch

from roofline.probe import proc_kib_field

__all__ = ["empty_hugepages", "empty_cache_tensor", "hugepage_bytes", "hugepages_enabled", "thp_mode"]

_MADV_HUGEPAGE = 14  # linux/mman.h
_HUGE = 2 << 20
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str | None:
    """The kernel's THP setting ("always", "madvise", "never"), or None where unknown."""
    try:
        with open(_THP_ENABLED) as fh:
            text = fh.read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


_libc = None


def _madvise(addr: int, length: int) -> bool:
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), _MADV_HUGEPAGE) == 0


def empty_hugepages(shape, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory is asked to be backed by 2 MiB pages.

    The memory is an anonymous mapping rounded up to whole 2 MiB pages and aligned to one,
    advised ``MADV_HUGEPAGE`` before anything touches it; the tensor keeps the mapping alive.
    Where the OS cannot give huge pages (THP "never", not Linux) it is ordinary memory: the call
    never fails for that reason; :func:`hugepage_bytes` tells what was obtained.

    Parameters
    ----------
    shape : sequence of int
        Tensor shape (non-negative sizes).
    dtype : torch.dtype
        Element type.

    Example
    -------
    >>> k_cache = empty_hugepages((1, 16384, 8, 128), torch.bfloat16).zero_()
    """
    if isinstance(shape, int):
        shape = (shape,)
    try:
        if not all(isinstance(s, int) or (torch.is_tensor(s) and s.numel() == 1) for s in shape):
            raise TypeError
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape: expected a sequence of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"shape: sizes must be >= 0, got {shape}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {dtype!r}")
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    length = -(-nbytes // _HUGE) * _HUGE
    # one extra huge page so the start can be aligned to 2 MiB inside the mapping
    buf = mmap.mmap(-1, length + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    skip = (-base) % _HUGE
    _madvise(base + skip, length)
    flat = torch.frombuffer(memoryview(buf)[skip:skip + nbytes], dtype=torch.uint8)
    return flat.view(dtype).view(shape)


# Below this size a tensor is allocated normally: rounding it up to whole 2 MiB pages would waste
# more than it saves (a cache this small sits in the last-level cache anyway).
HUGEPAGE_MIN_BYTES = 4 << 20


def hugepages_enabled() -> bool:
    """False when ``PYKERNELS_HUGEPAGES=0`` (or off / false / no; the switch for A/B runs and for
    OS-level trouble)."""
    from roofline.probe import env_switch

    return env_switch("PYKERNELS_HUGEPAGES")


def empty_cache_tensor(shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """Uninitialised storage for a KV cache: :func:`empty_hugepages` for CPU tensors of at least
    ``HUGEPAGE_MIN_BYTES`` (unless ``PYKERNELS_HUGEPAGES=0``), ``torch.empty`` otherwise."""
    device = torch.empty(0, device=device).device  # normalises None / "cuda" / torch.device
    nbytes = math.prod(int(s) for s in shape) * torch.empty((), dtype=dtype).element_size()
    if device.type == "cpu" and nbytes >= HUGEPAGE_MIN_BYTES and hugepages_enabled():
        return empty_hugepages(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def hugepage_bytes() -> int | None:
    """Bytes of this process's anonymous memory now on transparent huge pages (Linux), else None."""
    return proc_kib_field("/proc/self/smaps_rollup", "AnonHugePages")
