"""Dense GEMV for bf16 weights: ``y = x @ W^T (+ bias)`` with few rows of x (LLM decode).

Memory bound: W (2 N K bytes) is read once per call for all rows of x; the CPU kernel
(``pykernels._C.gemv``, csrc/cpu/gemv_kernel.h) streams it with several k-steps in flight and
software prefetch, split over the thread pool by rows of W. Its entry point is

    pykernels._C.gemv(x, w, bias, out)

with x [M <= 8, K] float32/bfloat16 contiguous, w bfloat16 [N, K] (unit stride in K, any row
stride >= K), bias [N] float32/bfloat16 contiguous or None, out [M, N] contiguous in x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends
from ._checks import check_out

MAX_M = 8            # rows of x per kernel call (W is read once per call; larger M is split)
X_DTYPES = (torch.float32, torch.bfloat16)
_BACKENDS = ("auto", "cpu", "reference")


def gemv_reference(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """The oracle: float64 accumulation, result in x's dtype. x [M, K], w [N, K] -> [M, N]."""
    # read N K + M K values, write M N
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the storage byte ranges the two tensors can touch intersect."""
    def span(t):
        lo = t.data_ptr()
        n = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0) if t.numel() else 0
        return lo, lo + n * t.element_size()
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _validate(x, w, bias, out, backend):
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if w.dtype != torch.bfloat16:
        raise TypeError(f"w: expected dtype torch.bfloat16, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"w: expected 2 dimensions [N, K], got shape {tuple(w.shape)}")
    N, K = w.shape
    if N < 1 or K < 1:
        raise ValueError(f"w: expected N >= 1 and K >= 1, got shape {tuple(w.shape)}")
    if K > 1 and w.stride(1) != 1:
        raise ValueError(f"w: expected unit stride along K (w.stride(1) == 1), got strides {w.stride()}; "
                         "pass w.contiguous() (a row-strided view [N, K] of a larger buffer is fine)")
    if N > 1 and w.stride(0) < K:
        raise ValueError(f"w: expected a row stride >= K={K}, got strides {w.stride()}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x: expected dtype float32 or bfloat16, got {x.dtype}")
    if x.dim() not in (1, 2) or x.shape[-1] != K:
        raise ValueError(f"x: expected [K] or [M, K] with K={K} (w.shape = {tuple(w.shape)}), "
                         f"got shape {tuple(x.shape)}")
    if x.dim() == 2 and x.shape[0] < 1:
        raise ValueError(f"x: expected M >= 1 rows, got shape {tuple(x.shape)}")
    if x.device != w.device:
        raise ValueError(f"x: on {x.device}, but w is on {w.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias: expected a floating dtype, got {bias.dtype}")
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias: expected shape ({N},), got {tuple(bias.shape)}")
        if bias.device != w.device:
            raise ValueError(f"bias: on {bias.device}, but w is on {w.device}")
    if out is not None:
        check_out(out, tuple(x.shape[:-1]) + (N,), x)
        for name, t in (("x", x), ("w", w)):
            if _overlaps(out, t):
                raise ValueError(f"out: overlaps {name} in memory; pass a separate output tensor")


def gemv(x, w, bias=None, *, out=None, backend="auto"):
    r"""``y = x @ w^T (+ bias)`` for a bfloat16 weight, fp32 accumulation.

    .. math:: y_{m,n} = \sum_k x_{m,k}\, w_{n,k} \;(+\, b_n)

    Parameters
    ----------
    x : Tensor [K] or [M, K], float32 or bfloat16 (any strides). Rows are processed 8 at a time
        (W is read once per group of 8 rows; M > 8 is split into chunks of 8 in Python).
    w : Tensor [N, K], bfloat16, ``w.stride(1) == 1``; any row stride >= K (a zero-copy view into
        a larger buffer works).
    bias : Tensor [N] or None (float32 / bfloat16 kept, other float dtypes cast to float32).
    out : optional Tensor [N] or [M, N] of x's dtype, written and returned.
    backend : "auto", "cpu" or "reference". On CPU tensors "auto" and "cpu" run
        ``pykernels._C.gemv`` (avx512_bf16: vdpbf16ps for bf16 x and fp32 FMA for fp32 x, which is
        never rounded to bf16; avx512 / avx2 / scalar otherwise). "reference" is a pure-torch
        float64-accumulated oracle (slow). There is no GPU kernel: on CUDA tensors "cpu" raises
        NotImplementedError and "auto" calls ``torch.nn.functional.linear``, which is the fast
        path there (cuBLAS), not a fallback to something slow.

    Returns
    -------
    y : [N] or [M, N] in x's dtype (``out`` when given).

    Example
    -------
    >>> w = torch.randn(5632, 2048).bfloat16()
    >>> y = gemv(torch.randn(2048).bfloat16(), w)           # [5632] bfloat16  (from pykernels.gemv import gemv)
    """
    _validate(x, w, bias, out, backend)
    x2 = x.reshape(1, -1) if x.dim() == 1 else x
    if backend == "reference":
        y = gemv_reference(x2, w, bias)
    elif x.device.type != "cpu":
        if backend == "cpu":
            raise NotImplementedError("gemv: CPU only; use torch.nn.functional.linear on GPUs")
        y = F.linear(x2, w.to(x2.dtype), None if bias is None else bias.to(x2.dtype))
    else:
        ok, why = backends.REGISTRY["cpu"].status()
        if not ok:
            raise NotImplementedError(f"gemv: backend={backend!r} needs the CPU extension: {why}")
        y = _gemv_cpu(x2, w, bias, out if out is not None and out.is_contiguous() else None)
    y = y.reshape(w.shape[0]) if x.dim() == 1 else y
    if out is not None:
        if out.data_ptr() != y.data_ptr():
            out.copy_(y)
        return out
    return y


def _gemv_cpu(x, w, bias, out):
    """x [M, K] validated, CPU -> y [M, N] in x's dtype (written into ``out`` when given)."""
    C = backends.cpu_module()
    # __dlpack__ refuses tensors that require grad (an nn.Parameter): this op has no autograd
    x, w = x.detach(), w.detach()
    bias = None if bias is None else bias.detach()
    M, N = x.shape[0], w.shape[0]
    x = x.contiguous()
    if bias is not None:
        bias = (bias if bias.dtype in X_DTYPES else bias.float()).contiguous()
    y = torch.empty(M, N, dtype=x.dtype) if out is None else out.view(M, N)
    dl = backends.dl  # DLPack capsules: cheaper per call than Tensor.__dlpack__
    for i in range(0, M, MAX_M):  # every chunk re-reads W: M > 8 costs ceil(M / 8) passes
        C.gemv(dl(x[i:i + MAX_M]), dl(w), dl(bias), dl(y[i:i + MAX_M]))
    return y
