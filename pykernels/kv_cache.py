"""Quantized KV cache: KIVI-style int8 / int4 / int2 or fp8 e4m3 storage of past keys and values,
with attention-sink tokens and a full-precision window of recent tokens.

The storage format (tensor shapes, quantizer, packing) is defined in ``pykernels.kv_format``;
this module owns the bookkeeping: which token lives where, when tokens are quantized, which
pages a sequence holds. ``pk.decode_attention(q, cache)`` attends over all of it in one kernel
call (dequantizing inside the kernel).
"""
from __future__ import annotations

import math

import torch

from . import kv_format
from .kv_format import FP16_MAX, check_format, format_name, num_value_groups, quantize_kv, row_bytes
from .memory import empty_cache_tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("dense", "paged")
DEFAULT_PAGE_SIZE = 256


def _check_int(v, name, lo, hi=None):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__} {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected an int {rng}, got {v}")


class QuantizedKVCache:
    r"""A batch of per-layer KV caches stored in a quantized format.

    Sequence b holds ``seqlens[b] = n_sink[b] + n_quant[b] + n_res[b]`` tokens, in order:

    * the first ``sink`` tokens ever appended (attention sinks), kept in full precision;
    * the quantized store: whole groups of ``group_size`` tokens, oldest first;
    * the residual window: the most recent tokens in full precision, at most ``residual``.

    Appending tokens fills the sink rows first, then the residual window. When the window would
    hold more than ``residual`` tokens, its oldest whole groups are quantized (``kv_format.
    quantize_kv``) and moved into the quantized store: the fewest groups that bring it back to
    ``residual`` tokens or fewer. So after ``sink + residual + 1`` tokens, ``n_quant == group_size``
    and ``n_res == residual - group_size + 1``; the state depends only on the tokens, not on how
    they were split into ``append`` calls.

    Keys are quantized per channel over groups of ``group_size`` tokens, values per token over
    groups of ``group_size`` channels (KIVI), asymmetric with float16 scale and zero; ``bits="fp8"``
    stores e4m3 codes with one float32 scale per group of tokens (keys and values separately).

    Parameters
    ----------
    batch : number of sequences B.
    capacity : most tokens one sequence may hold (sink + quantized + residual).
    num_kv_heads, head_dim : Hkv, D (D a multiple of 8, at most 512).
    bits : 8, 4, 2 or "fp8".
    group_size : 32, 64 or 128.
    residual : full-precision window R, a positive multiple of ``group_size``.
    sink : number of first tokens of each sequence kept in full precision (default 0).
    layout : "dense" (one page of the whole quantized capacity per sequence, page b for
        sequence b) or "paged" (pages of ``page_size`` tokens taken from a shared pool of
        ``num_pages`` as sequences grow).
    page_size : tokens per page (paged only), a multiple of ``group_size``; default 256.
    num_pages : pool size (paged only); default enough for every sequence at ``capacity``.
    dtype : full-precision dtype of the sink and residual rows (float32 / float16 / bfloat16).
    device : where every tensor lives.

    Attributes (the tensors the kernels read; shapes per ``pykernels.kv_format``)
    -------------------------------------------------------------------------------
    k_codes, v_codes : uint8 [P, Hkv, S, D * bits // 8] (fp8: [P, Hkv, S, D]).
    k_scale, k_zero : float16 [P, Hkv, S // gs, D] (fp8: k_scale float32 [P, Hkv, S // gs], no zero).
    v_scale, v_zero : float16 [P, Hkv, S, ceil(D / gs)] (fp8: v_scale float32 [P, Hkv, S // gs]).
    fp_k, fp_v : dtype [B, sink + residual, Hkv, D]: sink rows, then the residual window.
    block_table : int32 [B, max_pages]: page ids of each sequence's quantized tokens; -1 where
        no page is held yet (paged). Dense: ``[[0], [1], ...]``.
    n_sink, n_quant, n_res : int32 [B] on ``device``.
    page_size (S), num_pages (P), max_quant (quantized tokens one sequence can reach).

    Unused rows and slots are zero; a rejected ``append`` leaves every tensor unchanged.

    Example
    -------
    >>> cache = pk.QuantizedKVCache(2, 4096, 8, 128, bits=4, group_size=32, residual=128)
    >>> cache.append(k_prompt, v_prompt)          # [2, T, 8, 128]
    >>> out = pk.decode_attention(q, cache)       # q [2, 32, 128]
    """

    def __init__(self, batch, capacity, num_kv_heads, head_dim, *, bits=4, group_size=32, residual=128,
                 sink=0, layout="dense", page_size=None, num_pages=None, dtype=torch.bfloat16, device="cpu"):
        _check_int(batch, "batch", 1)
        _check_int(capacity, "capacity", 1)
        _check_int(num_kv_heads, "num_kv_heads", 1)
        _check_int(head_dim, "head_dim", 1)
        if not isinstance(bits, str) and (isinstance(bits, bool) or not isinstance(bits, int)):
            raise TypeError(f"bits: expected one of 8, 4, 2 or 'fp8', got {type(bits).__name__} {bits!r}")
        _check_int(group_size, "group_size", 1)
        check_format(bits, group_size, head_dim)
        _check_int(residual, "residual", group_size)
        if residual % group_size:
            raise ValueError(f"residual: expected a positive multiple of group_size={group_size}, got {residual}")
        _check_int(sink, "sink", 0, capacity)
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected 'dense' or 'paged', got {layout!r}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
        device = torch.device(device)

        self.batch, self.capacity, self.num_kv_heads, self.head_dim = batch, capacity, num_kv_heads, head_dim
        self.bits, self.group_size, self.residual, self.sink = bits, group_size, residual, sink
        self.layout, self.dtype = layout, dtype
        gs = group_size
        # Tokens past the sink rows that end up quantized: the fewest whole groups that leave at
        # most `residual` in the window, at full capacity.
        self.max_quant = gs * math.ceil(max(0, capacity - sink - residual) / gs)

        if layout == "dense":
            for name, val in (("page_size", page_size), ("num_pages", num_pages)):
                if val is not None:
                    raise ValueError(f"{name}: only for layout='paged', got {val!r} with layout='dense'")
            S, P, max_pages = max(self.max_quant, gs), batch, 1
        else:
            S = DEFAULT_PAGE_SIZE if page_size is None else page_size
            _check_int(S, "page_size", gs)
            if S % gs:
                raise ValueError(f"page_size: expected a multiple of group_size={gs}, got {S}")
            max_pages = max(1, -(-self.max_quant // S))
            P = max(1, batch * -(-self.max_quant // S)) if num_pages is None else num_pages
            _check_int(P, "num_pages", 1)
        self.page_size, self.num_pages = S, P

        Hkv, D = num_kv_heads, head_dim
        z = dict(device=device)
        # Ordinary tensors even when built under torch.inference_mode(): appends may then run
        # inside or outside inference mode alike.
        # The page pools are read by every decode step: on the CPU, large ones are backed by
        # 2 MiB pages (pykernels.memory; PYKERNELS_HUGEPAGES=0 turns it off).
        def pool(*shape, dtype):
            return empty_cache_tensor(shape, dtype, device).zero_()

        with torch.inference_mode(False):
            self.k_codes = pool(P, Hkv, S, row_bytes(bits, D), dtype=torch.uint8)
            self.device = self.k_codes.device  # normalised: "cuda" -> cuda:0, so device checks compare equal
            self.v_codes = pool(P, Hkv, S, row_bytes(bits, D), dtype=torch.uint8)
            if bits == "fp8":
                self.k_scale = pool(P, Hkv, S // gs, dtype=torch.float32)
                self.v_scale = pool(P, Hkv, S // gs, dtype=torch.float32)
                self.k_zero = self.v_zero = None
            else:
                self.k_scale = pool(P, Hkv, S // gs, D, dtype=torch.float16)
                self.k_zero = pool(P, Hkv, S // gs, D, dtype=torch.float16)
                self.v_scale = pool(P, Hkv, S, num_value_groups(D, gs), dtype=torch.float16)
                self.v_zero = pool(P, Hkv, S, num_value_groups(D, gs), dtype=torch.float16)
            self.fp_k = torch.zeros(batch, sink + residual, Hkv, D, dtype=dtype, **z)
            self.fp_v = torch.zeros_like(self.fp_k)
            if layout == "dense":
                self._table = [[b] for b in range(batch)]
            else:
                self._table = [[-1] * max_pages for _ in range(batch)]
            self.block_table = torch.tensor(self._table, dtype=torch.int32, device=device)
            self.n_sink = torch.zeros(batch, dtype=torch.int32, **z)
            self.n_quant = torch.zeros_like(self.n_sink)
            self.n_res = torch.zeros_like(self.n_sink)
        # Host copies: validation and scheduling never wait on the device.
        self._n_sink, self._n_quant, self._n_res = [0] * batch, [0] * batch, [0] * batch
        self._free = list(range(P)) if layout == "paged" else []

    @classmethod
    def from_tensors(cls, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fp_k, fp_v, block_table,
                     n_sink, n_quant, n_res, *, bits, group_size):
        """A cache over existing tensors (the fields of ``tensors()``), for reading: decode
        attention and ``dequantize()``; what it cannot know (capacity, residual and sink sizes,
        free pages) is left unset, so do not ``append`` to it. Used by the ``torch.library`` op,
        which receives the tensors rather than the object."""
        c = cls.__new__(cls)
        c.bits, c.group_size = bits, group_size
        c.k_codes, c.k_scale, c.k_zero, c.v_codes, c.v_scale, c.v_zero = k_codes, k_scale, k_zero, v_codes, v_scale, v_zero
        c.fp_k, c.fp_v, c.block_table, c.n_sink, c.n_quant, c.n_res = fp_k, fp_v, block_table, n_sink, n_quant, n_res
        c.batch, _, c.num_kv_heads, c.head_dim = fp_k.shape
        c.num_pages, c.page_size = k_codes.shape[0], k_codes.shape[2]
        c.device, c.dtype = k_codes.device, fp_k.dtype
        c._n_sink, c._n_quant, c._n_res = n_sink.tolist(), n_quant.tolist(), n_res.tolist()
        return c

    # ------------------------------------------------------------------ introspection

    @property
    def _per_group(self) -> set:
        """Store fields whose token axis (dim 2) counts groups of gs tokens rather than tokens."""
        return {"k_scale", "k_zero"} | ({"v_scale"} if self.bits == "fp8" else set())

    @property
    def fmt(self) -> str:
        """Format name the kernels take: "int8", "int4", "int2" or "fp8"."""
        return format_name(self.bits)

    @property
    def seqlens(self) -> torch.Tensor:
        """int32 [B] on ``device``: tokens held per sequence (n_sink + n_quant + n_res)."""
        return self.n_sink + self.n_quant + self.n_res

    def lengths(self) -> list:
        """Tokens held per sequence, as Python ints (host copy; no device sync)."""
        return [a + b + c for a, b, c in zip(self._n_sink, self._n_quant, self._n_res)]

    @property
    def num_free_pages(self) -> int:
        """Pages of the pool not held by any sequence (0 for a dense cache)."""
        return len(self._free)

    def tensors(self) -> dict:
        """Every allocated tensor by name (zeros omitted for fp8)."""
        d = {"k_codes": self.k_codes, "k_scale": self.k_scale, "k_zero": self.k_zero,
             "v_codes": self.v_codes, "v_scale": self.v_scale, "v_zero": self.v_zero,
             "fp_k": self.fp_k, "fp_v": self.fp_v, "block_table": self.block_table,
             "n_sink": self.n_sink, "n_quant": self.n_quant, "n_res": self.n_res}
        return {k: v for k, v in d.items() if v is not None}

    @property
    def nbytes(self) -> int:
        """Exact bytes allocated: the sum over ``tensors()`` (codes, scales, zeros of every page,
        used or not; the sink + residual fp rows; block table; the three int32 [B] counters)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @staticmethod
    def allocation_bytes(batch: int, capacity: int, num_kv_heads: int, head_dim: int, *, bits=4,
                         group_size: int = 32, residual: int = 128, sink: int = 0,
                         dtype: torch.dtype = torch.bfloat16, resident: bool = False) -> int:
        """Bytes a dense-layout cache built with these arguments allocates (its ``nbytes``),
        computed without allocating: for memory budgets. ``resident=True`` counts memory as the
        process holds it: the page pools of >= ``pykernels.memory.HUGEPAGE_MIN_BYTES`` are whole
        2 MiB huge pages (when ``PYKERNELS_HUGEPAGES`` is on)."""
        from .memory import HUGEPAGE_MIN_BYTES, hugepages_enabled

        gs, Hkv, D = group_size, num_kv_heads, head_dim
        S = max(gs * math.ceil(max(0, capacity - sink - residual) / gs), gs)
        pools = [batch * Hkv * S * row_bytes(bits, D)] * 2  # k_codes, v_codes (uint8)
        if bits == "fp8":
            pools += [batch * Hkv * (S // gs) * 4] * 2
        else:
            pools += [batch * Hkv * (S // gs) * D * 2] * 2 + [batch * Hkv * S * num_value_groups(D, gs) * 2] * 2
        if resident and hugepages_enabled():
            huge = 2 << 20
            pools = [-(-n // huge) * huge if n >= HUGEPAGE_MIN_BYTES else n for n in pools]
        fp = 2 * batch * (sink + residual) * Hkv * D * torch.empty((), dtype=dtype).element_size()
        return sum(pools) + fp + batch * 4 + 3 * batch * 4  # + block_table and the three counters

    def bytes_per_token(self) -> float:
        """Bytes per stored token of the quantized store (codes + scales + zeros, K and V, all kv
        heads); ``kv_format.bytes_per_token``. Compare with ``2 * Hkv * D * 2`` for float16."""
        return kv_format.bytes_per_token(self.bits, self.group_size, self.num_kv_heads, self.head_dim)

    def __repr__(self):
        return (f"QuantizedKVCache(batch={self.batch}, capacity={self.capacity}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, bits={self.bits!r}, group_size={self.group_size}, "
                f"residual={self.residual}, sink={self.sink}, layout={self.layout!r}, page_size={self.page_size}, "
                f"num_pages={self.num_pages}, dtype={self.dtype}, device={self.device}, "
                f"seqlens={self.lengths()}, nbytes={self.nbytes})")

    # ------------------------------------------------------------------ append

    @torch.no_grad()
    def append(self, k, v, lengths=None):
        """Append ``lengths[b]`` new tokens to each sequence b.

        Parameters
        ----------
        k, v : Tensor [B, T, Hkv, D], float32 / float16 / bfloat16 (converted to ``dtype``), on
            ``device``, T >= 1: a prefill chunk or one decode step.
        lengths : optional int [B] (list or tensor), each in [0, T]: sequence b takes rows
            ``k[b, :lengths[b]]`` (the rest is padding and is not read). Default: all T rows.

        Raises ValueError / TypeError naming the argument for a bad shape, dtype or device,
        non-finite values, values beyond the float16 range of the scales and zeros (integer
        formats; sink tokens are exempt), appending past ``capacity``, or running out of pages.
        Everything is checked before anything is written: a rejected call changes nothing.
        """
        k, v, counts = self._check_append(k, v, lengths)
        gs, R = self.group_size, self.residual
        steps = []  # per sequence: (tokens to sink rows, to the window, groups to quantize)
        for b, t in enumerate(counts):
            s = min(t, self.sink - self._n_sink[b])
            window = self._n_res[b] + t - s
            steps.append((s, t - s, max(0, -(-(window - R) // gs))))
        new_pages = [self._pages_held(self._n_quant[b] + g * gs) - self._pages_held(self._n_quant[b])
                     for b, (_, _, g) in enumerate(steps)]
        if sum(new_pages) > len(self._free):
            raise ValueError(f"num_pages: out of pages: this append needs {sum(new_pages)} new pages of "
                             f"{self.page_size} tokens, {len(self._free)} of {self.num_pages} are free")

        # Compute every write first (quantization, window shifts): a failure here (e.g. out of
        # memory) leaves the cache untouched.
        touched = [b for b, (s, r, _) in enumerate(steps) if s + r]
        plans = {b: self._plan_one(b, k[b, :s + r], v[b, :s + r], s, r, g)
                 for b, (s, r, g) in enumerate(steps) if b in touched}
        # Then commit. Should a copy still fail, the host bookkeeping and the fp rows (the only
        # valid data that is overwritten) are restored; store slots past n_quant stay invisible.
        saved = ([row[:] for row in self._table], self._free[:], self._n_sink[:], self._n_quant[:], self._n_res[:])
        fp_saved = {b: (self.fp_k[b].clone(), self.fp_v[b].clone()) for b in touched}
        try:
            for b in touched:
                held = self._pages_held(self._n_quant[b])
                for j in range(held, held + new_pages[b]):
                    self._table[b][j] = self._free.pop(0)
                self._write_one(b, plans[b])
            self._sync()
        except BaseException:
            self._table, self._free, self._n_sink, self._n_quant, self._n_res = saved
            for b, (fk, fv) in fp_saved.items():
                self.fp_k[b].copy_(fk)
                self.fp_v[b].copy_(fv)
            self._sync()
            raise

    def _pages_held(self, n_quant: int) -> int:
        """Pages a sequence holds with n_quant quantized tokens (0 for dense: never allocated)."""
        return 0 if self.layout == "dense" else -(-n_quant // self.page_size)

    def _plan_one(self, b, k, v, s, r, g):
        """What appending the validated tokens k, v [s + r, Hkv, D] to sequence b writes: s sink
        rows, then r into the window, whose g oldest groups are quantized. Computes, writes
        nothing: -> dict(sink=(k, v), tail=(k, v) rows appended to the window when g == 0,
        window=(k, v) the new window from its start and quant=the quantized fields when g > 0)."""
        if not g:
            return {"sink": (k[:s], v[:s]), "tail": (k[s:], v[s:]), "window": None, "quant": None}
        sink, nr, nq = self.sink, self._n_res[b], g * self.group_size
        wk = torch.cat([self.fp_k[b, sink:sink + nr], k[s:]])  # the window [nr + r, Hkv, D]
        wv = torch.cat([self.fp_v[b, sink:sink + nr], v[s:]])
        quant = quantize_kv(wk[:nq].transpose(0, 1), wv[:nq].transpose(0, 1), self.bits,
                            self.group_size)  # [Hkv, nq, ...]
        return {"sink": (k[:s], v[:s]), "tail": None, "window": (wk[nq:], wv[nq:]), "quant": quant}

    def _write_one(self, b, plan):
        """Commit a ``_plan_one`` result for sequence b (its pages already assigned)."""
        sink, ns, nr = self.sink, self._n_sink[b], self._n_res[b]
        sk, sv = plan["sink"]
        if sk.shape[0]:
            self.fp_k[b, ns:ns + sk.shape[0]] = sk
            self.fp_v[b, ns:ns + sk.shape[0]] = sv
            self._n_sink[b] = ns + sk.shape[0]
        if plan["quant"] is None:
            tk, tv = plan["tail"]
            self.fp_k[b, sink + nr:sink + nr + tk.shape[0]] = tk
            self.fp_v[b, sink + nr:sink + nr + tk.shape[0]] = tv
            self._n_res[b] = nr + tk.shape[0]
            return
        self._write_store(b, self._n_quant[b], plan["quant"])
        wk, wv = plan["window"]
        keep = wk.shape[0]
        self.fp_k[b, sink:sink + keep] = wk
        self.fp_v[b, sink:sink + keep] = wv
        self.fp_k[b, sink + keep:] = 0
        self.fp_v[b, sink + keep:] = 0
        self._n_quant[b] += plan["quant"]["k_codes"].shape[1]
        self._n_res[b] = keep

    def _write_store(self, b, u0, f):
        """Copy quantized fields f (token axis dim 1, starting at store token u0 of sequence b,
        a multiple of gs) into the pages of b, cutting at page boundaries."""
        S, gs = self.page_size, self.group_size
        n = f["k_codes"].shape[1]
        off = 0
        while off < n:
            u = u0 + off
            page, slot = self._table[b][u // S], u % S
            m = min(S - slot, n - off)
            for name, src in f.items():
                if src is None:
                    continue
                d = gs if name in self._per_group else 1
                getattr(self, name)[page, :, slot // d:(slot + m) // d] = src[:, off // d:(off + m) // d]
            off += m

    def _sync(self):
        """Copy the host bookkeeping to the device tensors the kernels read."""
        counts = torch.tensor([self._n_sink, self._n_quant, self._n_res], dtype=torch.int32)
        for dst, src in zip((self.n_sink, self.n_quant, self.n_res), counts):
            dst.copy_(src)
        if self.layout == "paged":
            self.block_table.copy_(torch.tensor(self._table, dtype=torch.int32))

    def _check_append(self, k, v, lengths):
        """Validate an append; returns (k, v) in the cache dtype and the per-sequence counts."""
        B, Hkv, D = self.batch, self.num_kv_heads, self.head_dim
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[0] != B or t.shape[2] != Hkv or t.shape[3] != D:
                raise ValueError(f"{name}: expected shape [{B}, T, {Hkv}, {D}] (batch, tokens, num_kv_heads, "
                                 f"head_dim), got {tuple(t.shape)}")
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name}: on {t.device}, but the cache is on {self.device}")
        if v.shape != k.shape:
            raise ValueError(f"v: shape {tuple(v.shape)} differs from k shape {tuple(k.shape)}")
        T = k.shape[1]
        if T < 1:
            raise ValueError("k: expected at least one token (T >= 1), got T = 0")

        if lengths is None:
            counts = [T] * B
        else:
            lt = lengths if isinstance(lengths, torch.Tensor) else torch.as_tensor(lengths)
            if lt.dim() != 1 or lt.shape[0] != B:
                raise ValueError(f"lengths: expected shape [{B}] (one count per sequence), got {tuple(lt.shape)}")
            if lt.dtype == torch.bool or lt.dtype.is_floating_point or lt.dtype.is_complex:
                raise TypeError(f"lengths: expected an integer tensor or list, got {lt.dtype}")
            counts = [int(x) for x in lt.tolist()]
            for b, c in enumerate(counts):
                if not 0 <= c <= T:
                    raise ValueError(f"lengths: lengths[{b}] = {c} is outside [0, {T}] (T, the rows of k)")
        for b, (L, c) in enumerate(zip(self.lengths(), counts)):
            if L + c > self.capacity:
                raise ValueError(f"k: appending {c} tokens to sequence {b} (holding {L}) exceeds capacity "
                                 f"{self.capacity}")

        t = torch.arange(T, device=self.device)[None, :]
        used = t < torch.tensor(counts, device=self.device)[:, None]                        # [B, T]
        sink_rows = torch.tensor([min(c, self.sink - n) for c, n in zip(counts, self._n_sink)], device=self.device)
        quantized = used & (t >= sink_rows[:, None])       # rows that will (eventually) be quantized
        out = []
        for name, x in (("k", k), ("v", v)):
            xc = x.detach().to(self.dtype)
            for src, why in ((x, "is not finite"),
                             (xc, f"overflows the cache dtype {self.dtype} (|value| too large)")):
                bad = used & ~torch.isfinite(src).all(dim=3).all(dim=2)
                if bool(bad.any()):
                    b, i = (int(j) for j in torch.nonzero(bad)[0])
                    raise ValueError(f"{name}: {name}[{b}, {i}] {why}")
            if self.bits != "fp8":
                amax = xc.abs().amax(dim=(2, 3)).float()
                bad = quantized & (amax > FP16_MAX)
                if bool(bad.any()):
                    b, i = (int(j) for j in torch.nonzero(bad)[0])
                    raise ValueError(f"{name}: {name}[{b}, {i}] has |value| {float(amax[b, i]):.6g} > {FP16_MAX:g}, "
                                     f"beyond the float16 scales and zeros of bits={self.bits} (keep such tokens "
                                     "as sink tokens, or use bits='fp8')")
            out.append(xc)
        return out[0], out[1], counts

    # ------------------------------------------------------------------ dequantize

    def dequantize(self):
        """Every held token in float32: (k, v) dense [B, max(seqlens), Hkv, D] on ``device``,
        rows past ``seqlens[b]`` zero.

        Read from the tensors the kernels read (device counters and block table), with the
        ``kv_format`` dequantization (the same float32 values a kernel computes), so this is the
        oracle for them. Sink and residual rows are exact (their dtype converted to float32).
        """
        ns, nq, nr = (t.tolist() for t in (self.n_sink, self.n_quant, self.n_res))
        table = self.block_table.tolist()
        S, gs, D = self.page_size, self.group_size, self.head_dim
        L = max(a + b + c for a, b, c in zip(ns, nq, nr))
        shape = (self.batch, L, self.num_kv_heads, D)
        k = torch.zeros(shape, dtype=torch.float32, device=self.device)
        v = torch.zeros(shape, dtype=torch.float32, device=self.device)
        for b in range(self.batch):
            k[b, :ns[b]] = self.fp_k[b, :ns[b]]
            v[b, :ns[b]] = self.fp_v[b, :ns[b]]
            for j in range(-(-nq[b] // S)):
                m = min(S, nq[b] - j * S)
                f = {name: getattr(self, name)[table[b][j], :, :m // gs if name in self._per_group else m]
                     for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
                     if getattr(self, name) is not None}
                pk_, pv_ = kv_format.dequantize_kv(f, self.bits, gs, D)          # [Hkv, m, D]
                t0 = ns[b] + j * S
                k[b, t0:t0 + m] = pk_.transpose(0, 1)
                v[b, t0:t0 + m] = pv_.transpose(0, 1)
            t0 = ns[b] + nq[b]
            k[b, t0:t0 + nr[b]] = self.fp_k[b, ns[b]:ns[b] + nr[b]]
            v[b, t0:t0 + nr[b]] = self.fp_v[b, ns[b]:ns[b] + nr[b]]
        return k, v
