"""Decode attention: one query token per sequence against a long KV cache (dense or paged
tensors, or a ``pk.QuantizedKVCache``).

Public entry points: ``decode_attention``, ``merge_states``. Validation happens here, at the
boundary (the native launchers check again); the backend is chosen by ``backends.select``.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch

from roofline import autotune as _autotune
from roofline.hardware import DECODE_CTAS_PER_SM

from . import backends
from ._checks import check_out
from .kv_cache import QuantizedKVCache
from .plan import DEFAULT_TILE, advise_schedule, default_num_splits

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 512


def _as_tensor(x, name):
    if isinstance(x, torch.Tensor):
        # inference kernels, no autograd: a tensor that requires grad (an activation of a model
        # run without torch.no_grad()) is read as its detached view; DLPack refuses it otherwise
        return x.detach() if x.requires_grad else x
    if hasattr(x, "__dlpack__"):  # numpy / cupy / jax arrays: zero-copy view
        return torch.from_dlpack(x)
    raise TypeError(f"{name}: expected a torch.Tensor (or a DLPack-capable array), got {type(x).__name__}")


def _check_float(t, name):
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")


def _cpu_threads() -> int:
    return backends.cpu_module().get_num_threads()


def _num_workers(device: torch.device, backend: str) -> int:
    if backend == "cpu":
        return _cpu_threads()
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * DECODE_CTAS_PER_SM
    return 4  # Triton interpreter / reference: the schedule is exercised, not timed


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the device: from pageable memory the copy
    is staged before the call returns. Pinned memory would be read by the DMA later, after the
    caller may have changed it (the next step's lengths), so a pinned tensor goes through a
    pageable copy first."""
    if torch.compiler.is_compiling():  # is_pinned() does not trace; a compiled graph copies in order
        return t.to(device, non_blocking=True)
    return (t.clone() if t.is_pinned() else t).to(device, non_blocking=True)


def _validate(q, k_cache, v_cache, seqlens, block_table, scale, method, num_splits, out):
    """Shape/dtype/device/value checks shared by every backend. Returns normalised inputs."""
    q = _as_tensor(q, "q")
    k_cache = _as_tensor(k_cache, "k_cache")
    v_cache = _as_tensor(v_cache, "v_cache")
    if q.dim() != 3:
        raise ValueError(f"q: expected [batch, num_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError("k_cache: expected [batch, max_len, num_kv_heads, head_dim] (dense) or "
                         f"[num_blocks, block_size, num_kv_heads, head_dim] (paged), got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} differs from k_cache shape {tuple(k_cache.shape)}")
    _check_float(q, "q")
    _check_float(k_cache, "k_cache")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache: dtype {v_cache.dtype} differs from k_cache dtype {k_cache.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, but q is on {q.device}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}: the head_dim (last) dimension must be contiguous (stride 1), got stride {t.stride(-1)}")
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache: head_dim {k_cache.shape[3]} differs from q head_dim {D}")
    if D < 1 or D > MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim must be in [1, {MAX_HEAD_DIM}], got {D}")
    if B < 1 or Hq < 1 or Hkv < 1:
        raise ValueError(f"q/k_cache: batch, num_heads and num_kv_heads must be >= 1, got {B}, {Hq}, {Hkv}")
    if Hq % Hkv != 0:
        raise ValueError(f"q: num_heads {Hq} is not a multiple of k_cache num_kv_heads {Hkv}")

    if seqlens is None:
        raise ValueError("seqlens: required for a tensor cache ([batch] int lengths)")
    if not isinstance(seqlens, torch.Tensor):
        try:
            seqlens = torch.as_tensor(seqlens)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"seqlens: expected [{B}] integer lengths, got {seqlens!r:.80}") from e
    if seqlens.dim() != 1 or seqlens.shape[0] != B:
        raise ValueError(f"seqlens: expected shape [{B}] (one length per sequence), got {tuple(seqlens.shape)}")
    if seqlens.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
        raise TypeError(f"seqlens: expected int32, int64, int16 or uint8 lengths, got {seqlens.dtype}")
    lens_host = None
    if seqlens.device != q.device:
        if seqlens.device.type != "cpu":
            raise ValueError(f"seqlens: on {seqlens.device}, but q is on {q.device}")
        # host lengths for a GPU q (a scheduler keeps them): checked and planned on the host and
        # copied to the device without waiting for it, so the call has no device-to-host sync
        lens_host = seqlens
        seqlens = _upload(seqlens, q.device)

    if block_table is not None:
        block_table = _as_tensor(block_table, "block_table")
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table: expected [{B}, max_blocks], got shape {tuple(block_table.shape)}")
        if block_table.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"block_table: expected int32 (or int64), got {block_table.dtype}")
        bt_host = None
        if block_table.device != q.device:
            if block_table.device.type != "cpu":
                raise ValueError(f"block_table: on {block_table.device}, but q is on {q.device}")
            # as seqlens: a host table for a GPU q is checked on the host, copied without a wait
            bt_host = block_table
            block_table = _upload(block_table, q.device)
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache: batch {k_cache.shape[0]} differs from q batch {B} "
                             "(pass block_table for a paged cache)")
        capacity = k_cache.shape[1]

    if not torch.compiler.is_compiling():
        # one device-to-host copy (a sync on a GPU) serves every check and the schedule (_run)
        if lens_host is None:
            lens_host = seqlens.cpu()
        lo, hi = int(lens_host.min()), int(lens_host.max())
        if lo < 1 or hi > capacity:
            bad = int(torch.nonzero((lens_host < 1) | (lens_host > capacity))[0, 0])
            raise ValueError(f"seqlens: seqlens[{bad}] = {int(lens_host[bad])} is outside [1, {capacity}] (cache capacity)")
        if block_table is not None and block_table.shape[1] > 0:
            bs = k_cache.shape[1]
            host = bt_host is not None  # a host table: checked against the host lengths, no sync
            tab, lens = (bt_host, lens_host) if host else (block_table, seqlens)
            used = torch.arange(tab.shape[1], device=tab.device)[None, :] < ((lens.long() + bs - 1) // bs)[:, None]
            ids = tab.long()
            bad = used & ((ids < 0) | (ids >= k_cache.shape[0]))
            if bool(bad.any()):
                b, j = (int(x) for x in torch.nonzero(bad)[0])
                raise ValueError(f"block_table: block_table[{b}, {j}] = {int(tab[b, j])} is outside "
                                 f"[0, {k_cache.shape[0]}) (num_blocks)")

    return (q, k_cache, v_cache, seqlens, block_table, _check_options(q, scale, method, num_splits, out),
            lens_host)


def _check_options(q, scale, method, num_splits, out) -> float:
    """Checks of the keyword arguments shared by tensor and quantized caches; returns the scale."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale!r}")
    if method not in ("auto", "lean", "split"):
        raise ValueError(f"method: expected 'auto', 'lean' or 'split', got {method!r}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= 1 << 30):
        raise ValueError(f"num_splits: expected None or an int in [1, 2**30], got {num_splits!r}")
    if out is not None:
        check_out(out, q.shape, q)
        if not out.is_contiguous():
            raise ValueError("out: must be contiguous")
    return float(scale)


def _check_nonempty(cache):
    for b, L in enumerate(cache.lengths()):
        if L < 1:
            raise ValueError(f"k_cache: sequence {b} holds no tokens (append before attending)")


def _validate_kv(q, cache, v_cache, seqlens, block_table, scale, method, num_splits, out):
    """Checks of a call on a QuantizedKVCache. Returns (q, scale)."""
    for name, val in (("v_cache", v_cache), ("seqlens", seqlens), ("block_table", block_table)):
        if val is not None:
            raise ValueError(f"{name}: must be None when k_cache is a pk.QuantizedKVCache (the cache holds "
                             f"K, V, lengths and pages), got {type(val).__name__}")
    q = _as_tensor(q, "q")
    if q.dim() != 3:
        raise ValueError(f"q: expected [batch, num_heads, head_dim], got shape {tuple(q.shape)}")
    _check_float(q, "q")
    B, Hq, D = q.shape
    if q.device != cache.device:
        raise ValueError(f"q: on {q.device}, but the cache is on {cache.device}")
    if B != cache.batch:
        raise ValueError(f"q: batch {B} differs from the cache batch {cache.batch}")
    if D != cache.head_dim:
        raise ValueError(f"q: head_dim {D} differs from the cache head_dim {cache.head_dim}")
    if Hq < 1 or Hq % cache.num_kv_heads:
        raise ValueError(f"q: num_heads {Hq} is not a multiple of the cache num_kv_heads {cache.num_kv_heads}")
    if not torch.compiler.is_compiling():  # (the torch.library op checks when compiled)
        _check_nonempty(cache)
    return q, _check_options(q, scale, method, num_splits, out)


def _accepts(q, k_cache):
    D = q.shape[-1]

    def accepts(name):
        if name == "cpu" and D % 8 != 0:
            return f"head_dim must be a multiple of 8 for the CPU kernel, got {D}"
        if name == "triton" and D > 256:
            return f"head_dim must be <= 256 for the Triton kernel, got {D}"
        if name == "cuda" and D > 256:
            return f"head_dim must be <= 256 for the CUDA kernel, got {D}"
        return None

    return accepts


def _measured_backend(topic, lens_host, q, num_kv_heads, dtype_bytes):
    """For ``backends.select``: the autotune entry (``"backend:" + topic``, timings keyed by
    backend) of this call's shape bucket, looked up only when several backends could serve it
    (on a GPU). ``lens_host()`` gives the sequence lengths on the host."""
    def lookup():
        dev = "cuda" if q.device.type == "cuda" else "cpu"
        if not _autotune.has_topic("backend:" + topic, dev):  # no lengths (no device sync) needed
            return None
        W = _num_workers(q.device, "cuda" if dev == "cuda" else "cpu")
        lens = lens_host()
        b = _autotune.decode_bucket(lens.tolist() if isinstance(lens, torch.Tensor) else list(lens),
                                    q.shape[1], int(num_kv_heads), q.shape[2], float(dtype_bytes), W, dev)
        return _autotune.lookup("backend:" + topic, b, dev)
    return lookup


_AUTO_CACHE: "OrderedDict[tuple, dict]" = OrderedDict()


def _auto_choice(lens, num_kv_heads, W, tile, q, dtype_bytes) -> dict:
    """The advisor's {"method", "num_splits"}, memoised on what it depends on: the lengths in
    tiles and their imbalance class (a decode loop asks again every step; the lookup costs a
    few us, the advisor ~20 us)."""
    if len(lens) <= 64:  # small batches: plain ints are cheaper than numpy calls
        lst = lens.tolist() if isinstance(lens, torch.Tensor) else [int(x) for x in lens]
        tiles, longest, total = tuple((x + tile - 1) // tile for x in lst), max(lst), sum(lst)
    else:
        a = lens.numpy() if isinstance(lens, torch.Tensor) else np.asarray(lens, dtype=np.int64)
        tiles, longest, total = ((a + (tile - 1)) // tile).tobytes(), int(a.max()), int(a.sum())
    use = _autotune.enabled()
    key = (tiles, _autotune.imbalance_class(longest, len(lens), total), int(num_kv_heads), W, tile,
           q.shape[1], q.shape[2], float(dtype_bytes), q.device.type, use,
           # records of this process at once, another process's within a second
           _autotune.quick_stamp("cuda" if q.device.type == "cuda" else "cpu") if use else None)
    hit = _AUTO_CACHE.get(key)
    if hit is None:
        hit = advise_schedule(lens, num_kv_heads, W, tile, num_heads=q.shape[1], head_dim=q.shape[2],
                              dtype_bytes=dtype_bytes,
                              device="cuda" if q.device.type == "cuda" else "cpu").choice
        _AUTO_CACHE[key] = hit
        if len(_AUTO_CACHE) > 4096:
            _AUTO_CACHE.popitem(last=False)
    return hit


def _resolve_method(method, num_splits, lens_host, num_kv_heads, W, tile, q, dtype_bytes):
    """("lean" | "split", num_splits) for the kernels; ``lens_host()`` gives the lengths on the
    host and is called only when the choice depends on them. "auto" asks the roofline advisor
    (``pykernels.plan.advise_schedule``) with q's heads and device and the cache's bytes per
    element."""
    if method == "auto" or (method == "split" and num_splits is None):
        lens = lens_host()
        if method == "auto":
            choice = _auto_choice(lens, num_kv_heads, W, tile, q, dtype_bytes)
            method = choice["method"]
            if method == "split" and num_splits is None:
                num_splits = choice["num_splits"]
        if method == "split" and num_splits is None:
            num_splits = default_num_splits(lens, num_kv_heads, W)
    return method, 1 if num_splits is None else num_splits


# backend="auto" for a tensor cache on a GPU: Triton before CUDA. On an H100 (README, "Measured
# on a GPU") the Triton kernels read a 64 MiB bf16 cache in 27-29 us of GPU time, where the CUDA
# kernels took 133-138 us (plus 36-44 us to merge). A quantized cache keeps CUDA first: there the
# CUDA kernel took 0.75 ms and the Triton one 7.5 ms.
_GPU_ORDER = ("triton", "cuda", "cpu", "reference")


def _auto_order(device: torch.device):
    return _GPU_ORDER if device.type == "cuda" else None


def _run(q, k_cache, v_cache, seqlens, block_table, scale, method, num_splits, backend, out, lse,
         lens_host=None):
    """Dispatch validated inputs; writes out [B, Hq, D] and lse [B, Hq] float32. ``lens_host``:
    seqlens on the host when the caller has them (no second device-to-host copy)."""
    def host_lens():
        nonlocal lens_host
        if lens_host is None:
            lens_host = seqlens.cpu()
        return lens_host

    name = backends.select(backend, q.device, _accepts(q, k_cache),
                           _measured_backend("decode_attention", host_lens, q, k_cache.shape[2],
                                             k_cache.element_size()), order=_auto_order(q.device))
    if name == "reference":
        from .reference import decode_attention_reference

        o, l = decode_attention_reference(q, k_cache, v_cache, seqlens, block_table, scale, return_lse=True)
        out.copy_(o)
        lse.copy_(l)
        return
    W = _num_workers(q.device, name)
    seqlens_i32 = seqlens.to(torch.int32).contiguous()
    method, num_splits = _resolve_method(method, num_splits, lambda: host_lens().to(torch.int32), k_cache.shape[2],
                                         W, DEFAULT_TILE, q, k_cache.element_size())
    bt = block_table.to(torch.int32).contiguous() if block_table is not None else None
    if name == "cpu":
        dl = backends.dl
        backends.cpu_module().decode_attention(dl(q), dl(k_cache), dl(v_cache), dl(seqlens_i32), dl(bt), dl(out),
                                               dl(lse), scale, method, num_splits, W, DEFAULT_TILE)
    elif name == "triton":
        from .triton.decode_attention import decode_attention as fn

        fn(q, k_cache, v_cache, seqlens_i32, bt, out, lse, scale, method, num_splits, W, DEFAULT_TILE)
    else:
        from .cuda.decode_attention import decode_attention as fn

        fn(q, k_cache, v_cache, seqlens_i32, bt, out, lse, scale, method, num_splits, W, DEFAULT_TILE)


def _accepts_kv(q):
    D = q.shape[-1]

    def accepts(name):
        if name == "cpu" and not hasattr(backends.cpu_module(), "decode_attention_kv"):
            return "pykernels._C has no decode_attention_kv (built before the quantized KV cache); rebuild it"
        if name in ("triton", "cuda"):
            if D > 256:
                return f"head_dim must be <= 256 for the {name} kernel, got {D}"
            mod, why = backends.module_status(f"pykernels.{name}.kv_attention")  # once per process
            return None if mod is not None else why
        return None

    return accepts


def _kv_tile(group_size: int) -> int:
    """Tokens per KV tile for a quantized cache: DEFAULT_TILE rounded up to a multiple of
    group_size, so no tile cuts a quantization group."""
    return -(-max(DEFAULT_TILE, group_size) // group_size) * group_size


def _kv_bytes_per_element(cache) -> float:
    """Average bytes per K/V element of a quantized cache (codes, scales and zeros)."""
    return cache.bytes_per_token() / (2 * cache.num_kv_heads * cache.head_dim)


def _run_kv(q, cache, scale, method, num_splits, backend, out, lse):
    """Dispatch a validated call on a QuantizedKVCache; writes out [B, Hq, D] and lse [B, Hq]."""
    name = backends.select(backend, q.device, _accepts_kv(q),
                           _measured_backend("decode_attention_kv", cache.lengths, q, cache.num_kv_heads,
                                             _kv_bytes_per_element(cache)))
    if name == "reference":
        from .reference import decode_attention_kv_reference

        o, l = decode_attention_kv_reference(q, cache, scale, return_lse=True)
        out.copy_(o)
        lse.copy_(l)
        return
    W = _num_workers(q.device, name)
    tile = _kv_tile(cache.group_size)
    method, num_splits = _resolve_method(method, num_splits, cache.lengths, cache.num_kv_heads, W, tile, q,
                                         _kv_bytes_per_element(cache))
    # kv_format's kernel contract fixes no q strides: hand over a contiguous q (a no-op for decode)
    args = (q.contiguous(), cache.k_codes, cache.k_scale, cache.k_zero, cache.v_codes, cache.v_scale, cache.v_zero,
            cache.fp_k, cache.fp_v, cache.block_table, cache.n_sink, cache.n_quant, cache.n_res, out, lse,
            scale, cache.fmt, cache.group_size, method, num_splits, W, tile)
    if name == "cpu":
        backends.cpu_module().decode_attention_kv(*map(backends.dl, args))
    elif name == "triton":
        from .triton.kv_attention import decode_attention_kv

        decode_attention_kv(*args)
    else:
        from .cuda.kv_attention import decode_attention_kv

        decode_attention_kv(*args)


def _call(q, out, op, run):
    """(out, lse) of a validated call: under torch.compile through the torch.library op
    ``op()`` (copied into ``out`` when given), else ``run(o, lse)`` writing into fresh (or the
    caller's) buffers directly."""
    if torch.compiler.is_compiling():
        o, lse = op()
        if out is not None:
            out.copy_(o)
            o = out
        return o, lse
    o = out if out is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    run(o, lse)
    return o, lse


def decode_attention(q, k_cache, v_cache=None, seqlens=None, *, block_table=None, scale=None,
                     method="auto", num_splits=None, return_lse=False, backend="auto", out=None):
    r"""Attention of one query token per sequence over its KV cache.

    .. math:: o_{b,i} = \sum_{t < L_b} \mathrm{softmax}_t(\mathrm{scale}\; q_{b,i} \cdot k_{b,t,h(i)})\, v_{b,t,h(i)},
              \qquad h(i) = \lfloor i / (H_q / H_{kv}) \rfloor

    Parameters
    ----------
    q : Tensor [B, Hq, D], float32 / float16 / bfloat16 (any strides)
    k_cache, v_cache : Tensor, same shape and dtype (float32 / float16 / bfloat16), head_dim contiguous.
        Dense ``[B, Lmax, Hkv, D]``, or paged ``[num_blocks, block_size, Hkv, D]`` with ``block_table``.
        Hq must be a multiple of Hkv (GQA / MQA / MHA); the G = Hq/Hkv query heads of a kv-head
        share every KV read.
        Or ``k_cache`` is a ``pk.QuantizedKVCache`` (then ``v_cache``, ``seqlens`` and
        ``block_table`` must be None): one kernel call attends over its sink, quantized and
        residual tokens, dequantizing inside the kernel (KV tiles of a multiple of group_size
        tokens, at least 64).
    seqlens : int Tensor [B] (or list), 1 <= seqlens[b] <= capacity. Only these tokens are read.
        On q's device, or on the CPU (a list too) when q is on a GPU: then the checks and the
        schedule use the host values and the Triton path never waits for the GPU (with lengths
        on the GPU, reading them back is one device-to-host sync per call). Still syncing: a
        paged ``block_table`` on the GPU (its used ids are checked there; pass it on the host
        too), the CUDA backend's launcher (it reads the lengths back itself), and calls under
        ``torch.compile`` (the op checks its device inputs).
    block_table : int32 Tensor [B, max_blocks], block ids of each sequence (paged cache). On q's
        device, or on the CPU when q is on a GPU (checked on the host, as ``seqlens``).
    scale : softmax scale, default 1/sqrt(D).
    method : "split" (flash-decoding: num_splits chunks per (sequence, kv-head), then merge),
        "lean" (stream-K: all KV tiles cut into equal contiguous ranges per worker), or "auto"
        (the roofline advisor, ``pykernels.plan.advise_schedule``: the schedule with the least
        predicted time on this machine's measured roofs, lean on a near tie).
    num_splits : chunks per (sequence, kv-head) for "split" (and for "auto" when it picks
        split); None picks the advisor's count under "auto", ``pykernels.plan.default_num_splits``
        under "split".
    return_lse : also return lse [B, Hq] float32, natural-log sum of exp(scores).
    backend : "auto", "cpu", "cuda", "triton" or "reference" (see ``pykernels.backends``).
    out : optional contiguous output tensor [B, Hq, D] of q's dtype.

    Returns
    -------
    out [B, Hq, D] in q's dtype, or (out, lse).

    Example
    -------
    >>> q = torch.randn(2, 32, 128, dtype=torch.bfloat16)
    >>> k = torch.randn(2, 4096, 8, 128, dtype=torch.bfloat16); v = torch.randn_like(k)
    >>> o = pk.decode_attention(q, k, v, torch.tensor([4096, 100]))
    >>> cache = pk.QuantizedKVCache(2, 4096, 8, 128, bits=4); cache.append(k, v)
    >>> o = pk.decode_attention(q, cache)
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected bool, got {type(return_lse).__name__}")
    if isinstance(k_cache, QuantizedKVCache):
        q, scale = _validate_kv(q, k_cache, v_cache, seqlens, block_table, scale, method, num_splits, out)
        c = k_cache
        o, lse = _call(q, out, lambda: torch.ops.pykernels.decode_attention_kv(
            q, c.k_codes, c.k_scale, c.k_zero, c.v_codes, c.v_scale, c.v_zero, c.fp_k, c.fp_v, c.block_table,
            c.n_sink, c.n_quant, c.n_res, str(c.bits), c.group_size, scale, method, num_splits or 0, backend),
            lambda o, lse: _run_kv(q, c, scale, method, num_splits, backend, o, lse))
        return (o, lse) if return_lse else o
    if not isinstance(k_cache, torch.Tensor) and not hasattr(k_cache, "__dlpack__"):
        raise TypeError(f"k_cache: expected a tensor or a pk.QuantizedKVCache, got {type(k_cache).__name__}")
    if v_cache is None:
        raise ValueError("v_cache: required for a tensor k_cache")
    q, k_cache, v_cache, seqlens, block_table, scale, lens_host = _validate(
        q, k_cache, v_cache, seqlens, block_table, scale, method, num_splits, out)
    o, lse = _call(q, out, lambda: torch.ops.pykernels.decode_attention(
        q, k_cache, v_cache, seqlens, block_table, scale, method, num_splits or 0, backend),
        lambda o, lse: _run(q, k_cache, v_cache, seqlens, block_table, scale, method, num_splits, backend, o, lse,
                            lens_host))
    return (o, lse) if return_lse else o


def merge_states(o_a, lse_a, o_b, lse_b):
    r"""Combine attention results over two disjoint key sets into the result over their union.

    .. math:: \mathrm{lse} = \log(e^{\mathrm{lse}_a} + e^{\mathrm{lse}_b}),\quad
              o = e^{\mathrm{lse}_a - \mathrm{lse}}\, o_a + e^{\mathrm{lse}_b - \mathrm{lse}}\, o_b

    Exact (up to rounding), associative and commutative; an empty side (lse = -inf) has weight 0.

    Parameters
    ----------
    o_a, o_b : Tensor [..., D] (normalised outputs, same shape and dtype)
    lse_a, lse_b : Tensor [...] float32, natural log (as returned with ``return_lse=True``)

    Returns
    -------
    (o [..., D] in o_a's dtype, lse [...] float32)
    """
    for name, t in (("o_a", o_a), ("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if o_b.shape != o_a.shape:
        raise ValueError(f"o_b: shape {tuple(o_b.shape)} differs from o_a shape {tuple(o_a.shape)}")
    if o_a.dim() < 1:
        raise ValueError("o_a: expected at least 1 dimension [..., head_dim]")
    if o_b.dtype != o_a.dtype:
        raise TypeError(f"o_b: dtype {o_b.dtype} differs from o_a dtype {o_a.dtype}")
    if not o_a.dtype.is_floating_point:
        raise TypeError(f"o_a: expected a float tensor, got {o_a.dtype}")
    for name, l in (("lse_a", lse_a), ("lse_b", lse_b)):
        if l.shape != o_a.shape[:-1]:
            raise ValueError(f"{name}: expected shape {tuple(o_a.shape[:-1])} (o without its last dim), got {tuple(l.shape)}")
        if not l.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a float tensor, got {l.dtype}")
    for name, t in (("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b)):
        if t.device != o_a.device:
            raise ValueError(f"{name}: on {t.device}, but o_a is on {o_a.device}")
    ct = torch.promote_types(o_a.dtype, torch.float32)  # fp32 math (fp64 for fp64 inputs)
    la, lb = lse_a.to(ct), lse_b.to(ct)
    lse = torch.logaddexp(la, lb)
    empty = torch.isneginf(lse)
    safe = torch.where(empty, torch.zeros_like(lse), lse)
    wa = torch.where(empty, torch.zeros_like(la), torch.exp(la - safe)).unsqueeze(-1)
    wb = torch.where(empty, torch.zeros_like(lb), torch.exp(lb - safe)).unsqueeze(-1)
    o = (wa * o_a.to(ct) + wb * o_b.to(ct)).to(o_a.dtype)
    return o.contiguous(), lse.float().contiguous()  # the layout the registered op's fake declares
