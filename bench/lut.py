"""LUT-GEMV benchmark suites (issue 3, "Benchmark").

How a figure is produced (the same for every method, baselines included):

- **Bytes** are counted, not inferred: the weight bytes a GEMV must read, ``LUTWeight.nbytes``
  (bit planes + fp16 scales + fp16 zeros) for pykernels, ``N * K * 2`` for torch bf16, plus
  ``x`` (read, ``M * K * elt``) and ``y`` (written, ``M * N * elt`` of the returned tensor).
  GB/s = bytes / median time (GB = 1e9 bytes); "% bw" divides by the read bandwidth from
  ``roofline.probe_memory_bandwidth()`` measured in the same run. "weight GB/s" counts the
  weight bytes only (the figure llama.cpp comparisons use). The dequantize-then-matmul
  baseline moves far more (it writes and re-reads a bf16 copy of W) but is credited only with
  the quantized bytes, so its GB/s is an *effective* rate.
- **Cold caches**, as in decoding, where layer l's weights were evicted by layers l+1..: every
  call reads a different weight set from a pool whose bytes total at least
  ``max(4 * LLC, 256 MiB)``; a set is reused only after the whole pool has been read. ``x`` is
  the same tensor every call (it was just produced by the previous layer, so it is hot).
- **Weights are random codes**, never quantized here (k-means / rounding of a 4096 x 14336
  matrix would dominate the run). Codes uniform in [0, 2**bits) have independent uniform bits,
  so their bit planes (``pykernels.lut_format.pack_codes``) are uniform random bytes: the pool
  draws the planes directly (rows past N zeroed as the format requires), with random fp16
  scales and integer zeros. Timing of a table-lookup kernel does not depend on the values.
- **Warm-up** calls first (thread pool start, first-touch), then ``repeats`` timed calls per
  method, **interleaved** round-robin across methods so background load hits all alike. Median
  and p10/p90 are reported. Slow baselines get fewer repeats (a time budget), never fewer than 3.
- **Lead-in**: in each round, a method faster than ``lead_in_s`` (50 ms) first makes one
  untimed call on another weight set, then the timed call. Without it, every timed call of a
  1 ms kernel would follow 5 ms of torch and start with its worker threads asleep (measured
  ~15% slower here), which is neither back-to-back layers nor what a GEMV benchmark quotes.
  The timed call still reads weights no call has touched since the whole pool went by.
- **Correctness** of every method is checked once per configuration against
  ``x.double() @ W[rows].double().T`` with W = ``LUTWeight.dequantize()`` (the library's own
  definition) or the bf16 weight, on all rows of small weights and on 4 row tiles of 32 spread
  from first to last on big ones, as the relative error ``max|y - ref| / max|ref|``.

Methods: ``lutB`` (``pk.lut_gemv(x, qw, backend=..., mode=...)`` on B-bit weights), ``dequantB``
(``dequant_matmul``: unpack the planes to a bf16 W [N, K] every call with vectorized torch ops,
then ``F.linear``: what a user without a LUT kernel does), ``torch_bf16``
(``F.linear(x_bf16, W_bf16)``, the unquantized layer). Threads:
``torch.get_num_threads()`` for torch, the same count for the pykernels pool.

llama.cpp figures (``LLAMACPP``) were measured outside the project on the issue author's
machine; they are quoted constants, never timed by this code. They are compared through
weight bytes per second: llama.cpp Q4_K moves ``N * K * 4.5 / 8`` bytes in 1.1 ms. Our
"ms-equivalent" is the time our kernel would need to read llama.cpp's bytes at our measured
weight rate, ``t * bytes_llamacpp / bytes_ours``, so "<= 1.1 ms-equivalent" is exactly
"weight GB/s >= llama.cpp Q4_K's".
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from roofline.probe import CpuLoadMeter

from .attention import (BenchContext, _fmt, _join, _target, busy_note, cold_target_bytes,
                        dtype_name, format_timed, parse_dtype, run_facts, timing_stats, wait_for_quiet)
from .roof import annotate

_MiB = 1 << 20

# Llama-3-8B linear layers (name, N = out_features, K = in_features); 32 decoder layers
LLAMA3_8B_LINEARS = (("q_proj", 4096, 4096), ("k_proj", 1024, 4096), ("v_proj", 1024, 4096),
                     ("o_proj", 4096, 4096), ("gate_proj", 14336, 4096), ("up_proj", 14336, 4096),
                     ("down_proj", 4096, 14336))
LLAMA3_8B_LAYERS = 32
DOWN_PROJ = (4096, 14336)  # the issue's headline shape (N, K)

# Quoted, not measured here: llama.cpp CPU GEMV on N=4096, K=14336, M=1, measured outside the
# project on the issue author's machine. bits_per_weight from the block formats: Q4_K 144 B per
# 256 weights, Q4_0 18 B per 32, TQ2_0 66 B per 256, F16 2 B per weight.
LLAMACPP = {"Q4_K": {"ms": 1.1, "bpw": 4.5}, "Q4_0": {"ms": 3.0, "bpw": 4.5},
            "TQ2_0": {"ms": 0.8, "bpw": 2.0625}, "F16": {"ms": 8.0, "bpw": 16.0}}
# the torch bf16 time the issue quotes for the same shape ("about 23 ms here")
TORCH_BF16_QUOTED_MS = 23.0

KINDS = ("lut", "dequant", "torch_bf16")


def llamacpp_bytes(fmt: str, N: int = DOWN_PROJ[0], K: int = DOWN_PROJ[1]) -> float:
    return N * K * LLAMACPP[fmt]["bpw"] / 8


def llamacpp_GB_s(fmt: str) -> float:
    """Weight bytes per second of a quoted llama.cpp figure on the 4096 x 14336 shape."""
    return llamacpp_bytes(fmt) / (LLAMACPP[fmt]["ms"] * 1e-3) / 1e9


# --------------------------------------------------------------------------------------------
# methods and configurations

@dataclass(frozen=True)
class LutMethod:
    """What is timed: ``kind`` in KINDS; the quantization fields matter for lut / dequant."""
    kind: str
    bits: int = 4
    group_size: int = 128
    scheme: str = "affine"
    mode: str = "int8"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if self.kind != "torch_bf16" and not 1 <= self.bits <= 8:
            raise ValueError(f"bits: expected 1..8, got {self.bits}")

    @property
    def quantized(self) -> bool:
        return self.kind != "torch_bf16"

    @property
    def name(self) -> str:
        if not self.quantized:
            return "torch_bf16"
        s = f"{self.kind}{self.bits}"
        if self.group_size != 128:
            s += "-pc" if self.group_size == -1 else f"-g{self.group_size}"
        if self.scheme != "affine":
            s += "-" + {"symmetric": "sym", "codebook": "cb"}.get(self.scheme, self.scheme)
        if self.kind == "lut" and self.mode != "int8":
            s += f"-{self.mode}"
        return s

    @property
    def quant(self) -> str | None:
        if not self.quantized:
            return None
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.bits}-bit {g} {self.scheme}"

    @property
    def weight_key(self) -> tuple:
        """Methods with equal keys share one weight pool (lut4 and dequant4 read the same sets)."""
        return ("bf16",) if not self.quantized else ("q", self.bits, self.group_size, self.scheme)


def lut(bits=4, group_size=128, scheme="affine", mode="int8") -> LutMethod:
    return LutMethod("lut", bits, group_size, scheme, mode)


def dequant(bits=4, group_size=128, scheme="affine") -> LutMethod:
    return LutMethod("dequant", bits, group_size, scheme)


TORCH_BF16 = LutMethod("torch_bf16")


def config_label(N: int, K: int, M: int, dtype: str, layer: str | None = None) -> str:
    return (f"{layer} " if layer else "") + f"N={N} K={K} M={M} {dtype}"


# --------------------------------------------------------------------------------------------
# random weight sets (cold caches)

def _lut_api():
    """(LUTWeight, lut_gemv) from pykernels.lut; ImportError says what is missing."""
    try:
        from pykernels.lut import LUTWeight, lut_gemv
    except ImportError as e:
        raise ImportError(f"pykernels.lut is not available ({e}); the LUT benchmark needs "
                          "pykernels.lut.LUTWeight and lut_gemv") from None
    return LUTWeight, lut_gemv


def wrap_lut_weight(planes, scales, zeros, codebook, N, K, bits, group_size, scheme):
    """A pykernels LUTWeight around already-packed tensors (no quantization)."""
    LUTWeight, _ = _lut_api()
    return LUTWeight(planes=planes, scales=scales, zeros=zeros, codebook=codebook, shape=(N, K),
                     bits=bits, group_size=group_size, scheme=scheme)


def lut_weight_maker(N: int, K: int, bits: int, group_size: int = 128, scheme: str = "affine",
                     seed: int = 0, device: str = "cpu"):
    """-> make(i): the i-th of a family of distinct random LUTWeights of shape [N, K].

    The planes are uniform random bytes, which is what ``pack_codes`` gives for codes uniform in
    [0, 2**bits) (their bits are independent and uniform); rows >= N (padding) get code 0.
    Set i is set 0's planes rotated by a distinct offset (a copy is faster than a new draw),
    with its own scales / zeros. Scales are ~0.04 / 2**bits (weights of magnitude ~0.01-0.02,
    like a trained layer); affine zeros are integer codes near the middle of the range.
    """
    from pykernels.lut_format import TILE_N, padded_shape

    if scheme not in ("affine", "symmetric", "codebook"):
        raise ValueError(f"scheme: expected 'affine', 'symmetric' or 'codebook', got {scheme!r}")
    N_pad, K_pad, gs = padded_shape(N, K, group_size)
    G = K_pad // gs
    top = 2 ** bits - 1
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (N_pad // TILE_N, K_pad // 8, bits, TILE_N), dtype=torch.uint8,
                         generator=g)
    codebook = None
    if scheme == "codebook":  # a sorted non-uniform per-tensor table (normal-like levels)
        lv = torch.linspace(-1, 1, top + 1, dtype=torch.float64)
        codebook = (lv * lv.abs().sqrt()).to(torch.float32).view(1, -1).to(device)

    def make(i: int):
        gi = torch.Generator().manual_seed(seed * 1000003 + i)
        flat = base.view(-1)
        planes = (flat.clone() if i == 0 else flat.roll(7919 * i + 13)).view_as(base)
        if N_pad > N:
            planes[-1, :, :, N % TILE_N:] = 0
        scales = ((torch.rand(N, G, generator=gi) + 0.5) * (0.04 / (top + 1))).to(torch.float16)
        zeros = None
        if scheme == "affine":
            zeros = (torch.randint(-1, 2, (N, G), generator=gi) + top // 2).clamp(0, top)
            zeros = zeros.to(torch.float16).to(device)
        return wrap_lut_weight(planes.to(device), scales.to(device), zeros, codebook,
                               N, K, bits, group_size, scheme)
    return make


def random_lut_weights(N: int, K: int, bits: int, group_size: int = 128, scheme: str = "affine",
                       n: int = 1, seed: int = 0, device: str = "cpu") -> list:
    """``n`` distinct random LUTWeights of shape [N, K] (see ``lut_weight_maker``)."""
    make = lut_weight_maker(N, K, bits, group_size, scheme, seed, device)
    return [make(i) for i in range(n)]


def random_bf16_weights(N: int, K: int, n: int = 1, seed: int = 0, device: str = "cpu") -> list:
    """``n`` distinct bf16 [N, K] weights (std 0.02); set i is set 0 rotated (fast copy)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(N * K, generator=g) * 0.02).to(torch.bfloat16)
    return [(base if i == 0 else base.roll(7919 * i + 13)).view(N, K).to(device) for i in range(n)]


class WeightPool:
    """``n`` distinct weight sets of one format, handed out round-robin."""

    def __init__(self, key: tuple, N: int, K: int, target_bytes: int, max_buffers: int,
                 seed: int = 0, device: str = "cpu"):
        self.key = key
        if key[0] == "bf16":
            self.each = N * K * 2
            n = self._count(target_bytes, max_buffers)
            self.bufs = random_bf16_weights(N, K, n, seed, device)
        else:
            _, bits, gs, scheme = key
            make = lut_weight_maker(N, K, bits, gs, scheme, seed, device)
            first = make(0)
            self.each = int(first.nbytes)
            n = self._count(target_bytes, max_buffers)
            self.bufs = [first] + [make(i) for i in range(1, n)]
        self.touched_bytes = len(self.bufs) * self.each
        self._next = 0

    def _count(self, target, max_buffers):
        return int(min(max(2, math.ceil(target / self.each)), max_buffers))

    def __len__(self):
        return len(self.bufs)

    def next(self):
        w = self.bufs[self._next % len(self.bufs)]
        self._next += 1
        return w


# --------------------------------------------------------------------------------------------
# the dequantize-then-matmul baseline

_PAIR_TABLE = None


def _pair_table() -> torch.Tensor:
    """uint8 [65536, 8]: entry lo + 256 * hi holds, for j = 0..7, bit_j(lo) | bit_j(hi) << 1."""
    global _PAIR_TABLE
    if _PAIR_TABLE is None:
        idx = torch.arange(1 << 16)
        sh = torch.arange(8)
        _PAIR_TABLE = ((((idx & 255).view(-1, 1) >> sh) & 1)
                       | ((((idx >> 8).view(-1, 1) >> sh) & 1) << 1)).to(torch.uint8)
    return _PAIR_TABLE


def unpack_codes_fast(planes: torch.Tensor, bits: int) -> torch.Tensor:
    """Same result as ``pykernels.lut_format.unpack_codes`` (codes uint8 [N_pad, K_pad]), ~50x
    faster: two planes at a time index a 65536-entry table of 8 two-bit codes.

    The byte of plane i for row 32 t + r and column slice kk holds bit i of codes 8 kk + j at
    bit j (low nibble j < 4, high nibble 4 + (j - 4)), so bit j of the byte is code j's bit."""
    T, KK = planes.shape[0], planes.shape[1]
    p = planes.permute(0, 3, 1, 2)                        # [T, 32, KK, bits]
    table = _pair_table().to(planes.device)
    q = None
    for i in range(0, bits, 2):
        idx = p[..., i].long()
        if i + 1 < bits:
            idx = idx | (p[..., i + 1].long() << 8)
        e = F.embedding(idx, table)                       # [T, 32, KK, 8] two bits of each code
        if i:
            e = e << i
        q = e if q is None else q.bitwise_or_(e)
    return q.reshape(T * 32, KK * 8)


def dequantize_fast(qw, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W [N, K_pad] in stored column order (``x[..., perm]`` multiplies it when qw.perm is set),
    computed in float32 and rounded to ``dtype``; float32 equals ``qw.dequantize()`` exactly
    (without perm)."""
    N = qw.shape[0]
    G = qw.K_pad // qw.gs
    q = unpack_codes_fast(qw.planes, qw.bits)[:N].to(torch.float32)
    if qw.scheme == "codebook":
        cb = qw.codebook
        w = cb[0][q.long()] if cb.shape[0] == 1 else torch.gather(cb, 1, q.long())
        w = w.view(N, G, qw.gs)
    elif qw.scheme == "affine":
        w = q.view(N, G, qw.gs) - qw.zeros.float().unsqueeze(-1)
    else:
        w = q.view(N, G, qw.gs) - ((1 << qw.bits) - 1) / 2
    if qw.scales is not None:
        w = w * qw.scales.float().unsqueeze(-1)
    return w.reshape(N, qw.K_pad).to(dtype)


def dequant_matmul(x: torch.Tensor, qw) -> torch.Tensor:
    """The baseline: materialize W in x's dtype every call, then ``F.linear`` (y in x's dtype)."""
    K = qw.shape[1]
    if qw.perm is not None:
        x = x[..., qw.perm]
    if qw.K_pad != K:
        x = F.pad(x, (0, qw.K_pad - K))
    return F.linear(x, dequantize_fast(qw, x.dtype))


# --------------------------------------------------------------------------------------------
# the callables being timed

def _make_call(method: LutMethod, x: torch.Tensor, backend: str):
    """-> (fn(weight) -> y, backend label, note)."""
    if method.kind == "lut":
        _, lut_gemv = _lut_api()
        note = f"pk.lut_gemv(x, qw, backend={backend!r}, mode={method.mode!r})"
        return (lambda w: lut_gemv(x, w, backend=backend, mode=method.mode)), backend, note
    if method.kind == "dequant":
        note = (f"bench.lut.dequant_matmul: bit planes -> {dtype_name(x.dtype)} W [N, K] every call "
                "(table unpack, fp32 scale/zero math), then F.linear(x, W)")
        return (lambda w: dequant_matmul(x, w)), "torch", note
    xb = x.to(torch.bfloat16)
    note = "F.linear(x_bf16, W_bf16)"
    return (lambda w: F.linear(xb, w)), "torch", note


def check_rows(N: int, max_tiles: int = 4) -> tuple[list[int], torch.Tensor]:
    """Row tiles (of 32) checked against the reference: all when N <= 32 * max_tiles, else
    max_tiles spread evenly from the first to the last (the N split over threads covers them)."""
    T = -(-N // 32)
    if T <= max_tiles:
        tiles = list(range(T))
    else:
        tiles = sorted({round(i * (T - 1) / (max_tiles - 1)) for i in range(max_tiles)})
    rows = torch.cat([torch.arange(32 * t, min(32 * t + 32, N)) for t in tiles])
    return tiles, rows


def _reference_rows(w, key, tiles, rows) -> torch.Tensor:
    """float64 W[rows] from the library's own ``LUTWeight.dequantize`` on a row subset
    (dequantizing all of a 4096 x 14336 weight that way takes ~20 s here)."""
    if key[0] == "bf16":
        return w[rows].double()
    LUTWeight, _ = _lut_api()
    cb = w.codebook
    if cb is not None and cb.shape[0] > 1:
        cb = cb[rows]
    sub = LUTWeight(w.planes[torch.tensor(tiles)], None if w.scales is None else w.scales[rows],
                    None if w.zeros is None else w.zeros[rows], cb, shape=(len(rows), w.shape[1]),
                    bits=w.bits, group_size=w.group_size, scheme=w.scheme, perm=w.perm)
    return sub.dequantize().double()


# relative error max|y - ref| / max|ref| allowed by the one-off check. exact/fp32 paths differ
# from the float64 reference by summation order; bf16/fp16 outputs are rounded to 8/11 mantissa
# bits; int8 tables round each 4-activation partial sum to 1/254 of its block maximum.
def check_tolerance(method: LutMethod, out_dtype: torch.dtype) -> float:
    rounding = {torch.bfloat16: 8e-3, torch.float16: 1e-3}.get(out_dtype, 1e-5)
    if method.kind == "lut" and method.mode == "int8" and method.scheme != "codebook":
        return max(rounding, 3e-2)
    return max(rounding, 1e-4)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bench_lut(N: int, K: int, cases, *, dtype="bf16", backend: str = "cpu", device: str = "cpu",
              repeats: int = 15, warmup: int = 3, min_repeats: int = 3, time_budget_s: float = 2.0,
              target_bytes: int | None = None, max_buffers: int = 256,
              bandwidth_GB_s: float | None = None, check: bool = True,
              check_all_weights: int = 1 << 22, check_tiles: int = 4, suite: str = "adhoc",
              layer: str | None = None, seed: int = 0, extra: dict | None = None,
              wait_quiet_s: float = 0.0, lead_in_s: float = 0.05, machine=None) -> list[dict]:
    """Time ``cases`` = [(LutMethod, M), ...] on one weight shape [N, K]; one row per case.

    ``machine`` (``bench.roof.machine_for_run``): when given, timed rows also get
    ``attainable_ms``, ``efficiency`` and ``bound`` for ``flops`` (2*M*N*K) and ``bytes``.

    ``lead_in_s``: methods whose call takes at most this long make one untimed call right
    before each timed one (see the module notes); 0 disables it.

    Cases with the same weight format share one pool of weight sets (so lut4 at M=1..16 and
    dequant4 read the same sets). A case that cannot run (pykernels.lut missing, backend
    unavailable) gives a row with ``error`` set and no timings.
    """
    t_start = time.perf_counter()
    facts = run_facts()
    dt = parse_dtype(dtype)
    dname = dtype_name(dt)
    target = cold_target_bytes(device) if target_bytes is None else int(target_bytes)
    cases = [(m, int(M)) for m, M in cases]
    torch.manual_seed(seed)
    xs = {M: torch.randn(M, K).to(dt).to(device) for M in sorted({M for _, M in cases})}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    base = {"suite": suite, **facts, "device": device, "timestamp": stamp,
            "bandwidth_GB_s": bandwidth_GB_s, "dtype": dname}
    if extra:
        base.update(extra)

    rows, calls = [], {}
    for i, (m, M) in enumerate(cases):
        row = dict(base, config={"N": N, "K": K, "M": M, "dtype": dname, "layer": layer},
                   label=config_label(N, K, M, dname, layer), method=m.name, kind=m.kind,
                   bits=m.bits if m.quantized else 16, group_size=m.group_size if m.quantized else None,
                   scheme=m.scheme if m.quantized else None, mode=m.mode if m.kind == "lut" else None,
                   quant=m.quant, M=M, flops=2 * M * N * K,
                   backend=backend if m.kind == "lut" else "torch")
        rows.append(row)
        try:
            calls[i], row["backend"], row["impl"] = _make_call(m, xs[M], backend)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"

    pools, times, other_load, out_elt = {}, {}, None, {}
    try:
        for i in list(calls):
            key = cases[i][0].weight_key
            if key in pools:
                continue
            try:
                pools[key] = WeightPool(key, N, K, target, max_buffers, seed, device)
            except Exception as e:
                pools[key] = e
        for i in list(calls):
            p = pools[cases[i][0].weight_key]
            if isinstance(p, Exception):
                rows[i]["error"] = f"weights: {type(p).__name__}: {p}"
                del calls[i]
                continue
            rows[i]["pool"] = {"buffers": len(p), "touched_bytes": p.touched_bytes,
                               "target_bytes": target, "cold": p.touched_bytes >= target}
            rows[i]["weight_bytes"] = p.each  # LUTWeight.nbytes, or N * K * 2 for bf16
            rows[i]["bits_per_weight"] = 8.0 * p.each / (N * K)

        # one-off correctness check on weight set 0, on a spread of row tiles (all rows when
        # N * K <= check_all_weights), against float64 x @ W[rows].T
        if check:
            tiles, rws = check_rows(N, max_tiles=10 ** 9 if N * K <= check_all_weights else check_tiles)
            for key, p in pools.items():
                users = [i for i in calls if cases[i][0].weight_key == key]
                if not users:
                    continue
                w0 = p.bufs[0]
                W64 = _reference_rows(w0, key, tiles, rws)
                for i in users:
                    m, M = cases[i]
                    try:
                        ref = xs[M].double() @ W64.T
                        out = calls[i](w0)[:, rws]
                        err = float((out.double() - ref).abs().max())
                        rel = err / max(float(ref.abs().max()), 1e-30)
                        rows[i].update(max_abs_err=err, rel_err=rel, check_rows=len(rws),
                                       check="ok" if rel <= check_tolerance(m, out.dtype) else "FAIL")
                    except Exception as e:
                        rows[i]["error"] = f"{type(e).__name__}: {e}"
                        del calls[i]
                del W64

        # warm-up; its time also sets the repeat count of slow methods
        want, warm_t = {}, {}
        for i in list(calls):
            p = pools[cases[i][0].weight_key]
            try:
                t = float("inf")
                for _ in range(max(1, warmup)):
                    w = p.next()
                    _sync(device)
                    t0 = time.perf_counter()
                    y = calls[i](w)
                    _sync(device)
                    t = min(t, time.perf_counter() - t0)
                out_elt[i] = y.element_size()
                warm_t[i] = t
                want[i] = int(max(min_repeats, min(repeats, time_budget_s // max(t, 1e-9))))
            except Exception as e:
                rows[i]["error"] = f"{type(e).__name__}: {e}"
                del calls[i]

        times = {i: [] for i in calls}
        lead = {i: lead_in_s > 0 and warm_t[i] <= lead_in_s for i in calls}
        wait_for_quiet(wait_quiet_s)
        meter = CpuLoadMeter().start()
        for r in range(max(want.values(), default=0)):
            for i, fn in calls.items():
                if r >= want[i]:
                    continue
                pool = pools[cases[i][0].weight_key]
                if lead[i]:
                    fn(pool.next())  # untimed, on another set: wakes this method's threads
                w = pool.next()
                _sync(device)
                t0 = time.perf_counter()
                fn(w)
                _sync(device)
                times[i].append(time.perf_counter() - t0)
        other_load = meter.stop()
    finally:
        pools.clear()
        gc.collect()

    for i, ts in times.items():
        m, M = cases[i]
        row = rows[i]
        wb = row["weight_bytes"]
        xb, yb = M * K * xs[M].element_size(), M * N * out_elt[i]
        row.update(timing_stats(ts))
        med = row["median_ms"] / 1e3
        row.update({
            "x_bytes": xb, "y_bytes": yb, "bytes": wb + xb + yb,
            "GB_s": (wb + xb + yb) / med / 1e9, "weight_GB_s": wb / med / 1e9,
            "GFLOP_s": 2 * M * N * K / med / 1e9, "other_cpu_load": other_load,
            "lead_in": lead[i],
        })
        row["pct_bw"] = (100.0 * row["GB_s"] / bandwidth_GB_s) if bandwidth_GB_s else None
        # compute roof of the activation dtype, for LUT kernels too (their table lookups and
        # accumulation have no peak of their own in the probe)
        annotate(row, row["flops"], row["bytes"], dname, machine)
    # speedups: t(baseline) / t(method) for the baseline at the same M (> 1: method faster)
    for i, row in enumerate(rows):
        if "median_ms" not in row:
            continue
        m, M = cases[i]
        sp = {}
        for j, other in enumerate(rows):
            mj, Mj = cases[j]
            if j == i or Mj != M or "median_ms" not in other:
                continue
            if mj.kind == "torch_bf16":
                sp["vs_torch_bf16"] = other["median_ms"] / row["median_ms"]
            elif mj.kind == "dequant" and m.kind == "lut" and mj.weight_key == m.weight_key:
                sp["vs_dequant"] = other["median_ms"] / row["median_ms"]
        row["speedup"] = sp
    elapsed = time.perf_counter() - t_start
    for row in rows:
        row["config_wall_s"] = elapsed
    return rows


# --------------------------------------------------------------------------------------------
# suites

@dataclass
class LutContext(BenchContext):
    """BenchContext plus the LUT suites' quantization format (defaults: the issue's)."""
    group_size: int = 128
    scheme: str = "affine"
    mode: str = "int8"
    dtype: str = "bf16"             # activation dtype x
    time_budget_s: float = 2.0      # per method and configuration; slow baselines get fewer repeats
    lead_in_s: float = 0.05         # see bench_lut


def _lut(ctx, bits):
    return lut(bits, ctx.group_size, ctx.scheme, ctx.mode)


def _run(ctx: LutContext, suite, N, K, cases, **kw):
    rows = bench_lut(N, K, cases, dtype=ctx.dtype, backend=ctx.backend, device=ctx.device,
                     repeats=kw.pop("repeats", ctx.repeats), suite=suite,
                     time_budget_s=ctx.time_budget_s, bandwidth_GB_s=ctx.bandwidth_GB_s,
                     target_bytes=ctx.target_bytes, extra=ctx.extra, wait_quiet_s=ctx.wait_quiet_s,
                     lead_in_s=ctx.lead_in_s, machine=ctx.machine, **kw)
    ctx.log(format_rows(rows))
    return rows


def _find(rows, method, M=1):
    for r in rows:
        if r["method"] == method and r["M"] == M and "median_ms" in r:
            return r
    return None


def ms_equivalent(row, fmt) -> float | None:
    """Time to read llama.cpp ``fmt``'s bytes of this shape at this row's weight GB/s."""
    if not row:
        return None
    N, K = row["config"]["N"], row["config"]["K"]
    return row["median_ms"] * llamacpp_bytes(fmt, N, K) / row["weight_bytes"]


def _bf16_scaled_ms(row, bf16):
    """The issue's alternative: t * (23 ms quoted for torch bf16) / (torch bf16 measured now)."""
    if not row or not bf16:
        return None
    return row["median_ms"] * TORCH_BF16_QUOTED_MS / bf16["median_ms"]


def speedup_ceiling(row, bf16, bandwidth_GB_s) -> float | None:
    """Most a kernel reading ``row``'s bytes could gain over the measured torch bf16 time: it
    cannot be faster than bytes / measured read bandwidth."""
    if not row or not bf16 or not bandwidth_GB_s:
        return None
    return bf16["median_ms"] / (row["bytes"] / (bandwidth_GB_s * 1e9) * 1e3)


def llamacpp_note() -> str:
    parts = [f"{f} {v['ms']} ms = {llamacpp_GB_s(f):.1f} GB/s of weights ({v['bpw']} bits/weight)"
             for f, v in LLAMACPP.items()]
    return ("llama.cpp CPU GEMV on N=4096 K=14336 M=1, QUOTED from the issue (measured outside the "
            "project, not by this run): " + "; ".join(parts) + ".")


def suite_headline(ctx: LutContext) -> dict:
    """Suite 1: N=4096, K=14336 (Llama-3-8B down_proj), M=1: lut4 and lut2 vs torch bf16 and
    dequantize-then-matmul, with the issue's targets."""
    N, K = DOWN_PROJ
    l4, l2 = _lut(ctx, 4), _lut(ctx, 2)
    cases = [(l4, 1), (l2, 1), (TORCH_BF16, 1), (dequant(4, ctx.group_size, ctx.scheme), 1)]
    rows = _run(ctx, "1", N, K, cases)
    r4, r2, bf = _find(rows, l4.name), _find(rows, l2.name), _find(rows, "torch_bf16")
    busy = busy_note(rows)
    bw = ctx.bandwidth_GB_s
    targets = [_target(f"{l4.name}: % of measured read bandwidth", r4 and r4["pct_bw"], ">=", 85.0,
                       "{value:.1f}%" + (f" ({r4['GB_s']:.1f} GB/s of {bw:.1f})" if r4 and bw else ""),
                       busy, rows=[r4])]
    for r, fmt, limit in ((r4, "Q4_K", 1.1), (r2, "TQ2_0", 0.8)):
        name = l4.name if r is r4 else l2.name
        text = "{value:.3f} ms-equivalent"
        if r:
            text += (f" (measured {r['median_ms']:.3f} ms; {r['weight_GB_s']:.1f} GB/s of weights vs "
                     f"llama.cpp {fmt} {llamacpp_GB_s(fmt):.1f} GB/s, quoted)")
        targets.append(_target(f"{name}: ms-equivalent of llama.cpp {fmt} (quoted {limit} ms)",
                               ms_equivalent(r, fmt), "<=", limit, text, busy, rows=[r]))
    for r, thr in ((r4, 10.0), (r2, 16.0)):
        name = l4.name if r is r4 else l2.name
        sp = r and r["speedup"].get("vs_torch_bf16")
        ceil = speedup_ceiling(r, bf, bw)
        cnote = (f"ceiling at the measured bandwidth: {ceil:.1f}x (torch bf16 runs "
                 f"{bf['median_ms']:.2f} ms here, the issue assumed ~{TORCH_BF16_QUOTED_MS:.0f} ms)"
                 if ceil else None)
        targets.append(_target(f"{name}: speedup vs torch bf16 F.linear (same run)", sp, ">=", thr,
                               "{value:.2f}x" + (f" ({r['median_ms']:.3f} ms vs {bf['median_ms']:.2f} ms)" if sp else ""),
                               _join(cnote, busy), rows=[r, bf]))
    notes = [llamacpp_note(),
             "ms-equivalent = measured time x (llama.cpp format bytes / our weight bytes): the time "
             "our kernel would take to read llama.cpp's bytes at our measured weight rate, so "
             "'<= 1.1 ms-equivalent' is exactly 'weight GB/s >= llama.cpp Q4_K's'. It compares "
             "bytes per second, the machine-independent part of the quoted figures."]
    if bf:
        s4, s2 = _bf16_scaled_ms(r4, bf), _bf16_scaled_ms(r2, bf)
        notes.append(f"Not used for PASS/MISS: the issue's alternative scaling t x {TORCH_BF16_QUOTED_MS:.0f} ms / "
                     f"(torch bf16 measured now, {bf['median_ms']:.2f} ms) gives "
                     f"{_fmt(s4, '.2f')} ms ({l4.name}) and {_fmt(s2, '.2f')} ms ({l2.name}); it assumes "
                     f"torch bf16 runs at the issue's ~5 GB/s, but it runs {bf['weight_GB_s']:.1f} GB/s "
                     "of weights in this run, so the scaling would charge our kernel for torch's speed.")
    d = _find(rows, dequant(4, ctx.group_size, ctx.scheme).name)
    if d and r4:
        notes.append(f"Dequantize-then-matmul ({d['median_ms']:.1f} ms) is credited with the quantized "
                     f"bytes only; {l4.name} is {r4['speedup'].get('vs_dequant', float('nan')):.1f}x faster.")
    return {"rows": rows, "targets": targets, "notes": notes}


def suite_bits(ctx: LutContext) -> dict:
    """Suite 2: bits 1..4 on N=4096, K=14336, M=1; time must fall with bits."""
    N, K = DOWN_PROJ
    ms = [_lut(ctx, b) for b in (1, 2, 3, 4)]
    rows = _run(ctx, "2", N, K, [(m, 1) for m in ms] + [(TORCH_BF16, 1)])
    rs = [_find(rows, m.name) for m in ms]
    ratios = [b["median_ms"] / a["median_ms"] for a, b in zip(rs, rs[1:]) if a and b]
    worst = min(ratios) if len(ratios) == 3 else None
    times = " / ".join(_fmt(r and r["median_ms"], ".3f") for r in rs)
    targets = [_target("time falls with bits: min over b of t(b+1) / t(b)", worst, ">=", 1.0,
                       "{value:.3f}" + f" (t(1..4 bits) = {times} ms)", busy_note(rows), rows=rs,
                       noise=0.03)]
    notes = ["Each bit adds one plane of N x K / 8 bytes; scales and zeros (fp16, "
             f"group {ctx.group_size}) are the same for every bit width.",
             "A 'MISS (within noise)' is a miss by less than 3%."]
    for m, r in zip(ms, rs):
        if r:
            fmt = "Q4_K" if m.bits >= 3 else "TQ2_0"
            notes.append(f"{m.name}: {r['median_ms']:.3f} ms, {r['weight_GB_s']:.1f} GB/s of weights "
                         f"({r['bits_per_weight']:.3f} bits/weight), {_fmt(r['pct_bw'], '.1f')}% bw, "
                         f"{_fmt(r['speedup'].get('vs_torch_bf16'), '.2f')}x vs torch bf16, "
                         f"{ms_equivalent(r, fmt):.3f} ms-equivalent of llama.cpp {fmt}")
    return {"rows": rows, "targets": targets, "notes": notes}


def suite_batch(ctx: LutContext) -> dict:
    """Suite 3: M = 1, 2, 4, 8, 16 rows of x on N=4096, K=14336; M=8 must cost <= 2.5x M=1."""
    N, K = DOWN_PROJ
    Ms = (1, 4, 8) if ctx.quick else (1, 2, 4, 8, 16)
    l4 = _lut(ctx, 4)
    rows = _run(ctx, "3", N, K, [(l4, M) for M in Ms] + [(TORCH_BF16, M) for M in Ms])
    r1, r8 = _find(rows, l4.name, 1), _find(rows, l4.name, 8)
    ratio = r8["median_ms"] / r1["median_ms"] if r1 and r8 else None
    targets = [_target(f"{l4.name}: time(M=8) / time(M=1)", ratio, "<=", 2.5,
                       "{value:.2f}x" + (f" ({r8['median_ms']:.3f} ms vs {r1['median_ms']:.3f} ms)" if ratio else ""),
                       busy_note(rows), rows=[r1, r8], noise=0.03)]
    notes = ["The weights are read once per call for all M rows (tables are built per row), so "
             "the cost of M rows should grow far slower than M; torch bf16 at each M for reference."]
    return {"rows": rows, "targets": targets, "notes": notes}


def suite_layers(ctx: LutContext) -> dict:
    """Suite 4: every linear shape of a Llama-3-8B decoder layer, M=1, lut4 vs torch bf16."""
    l4 = _lut(ctx, 4)
    shapes = {}
    for name, N, K in LLAMA3_8B_LINEARS:
        shapes.setdefault((N, K), []).append(name)
    rows, per = [], {}
    for (N, K), names in shapes.items():
        rs = _run(ctx, "4", N, K, [(l4, 1), (TORCH_BF16, 1)], layer="/".join(names),
                  check=not ctx.quick)
        rows += rs
        per[(N, K)] = (_find(rs, l4.name), _find(rs, "torch_bf16"))
    notes = []
    if all(a and b for a, b in per.values()):
        t_l = sum(per[(N, K)][0]["median_ms"] for _, N, K in LLAMA3_8B_LINEARS)
        t_b = sum(per[(N, K)][1]["median_ms"] for _, N, K in LLAMA3_8B_LINEARS)
        by = sum(per[(N, K)][0]["bytes"] for _, N, K in LLAMA3_8B_LINEARS)
        notes.append(f"One decoder layer's 7 projections (each measured shape counted per layer that "
                     f"has it): {l4.name} {t_l:.2f} ms ({by / t_l / 1e6:.1f} GB/s) vs torch bf16 "
                     f"{t_b:.2f} ms, {t_b / t_l:.2f}x; x {LLAMA3_8B_LAYERS} layers: {l4.name} "
                     f"{LLAMA3_8B_LAYERS * t_l:.1f} ms vs {LLAMA3_8B_LAYERS * t_b:.1f} ms per token for "
                     f"the linear layers alone (lm_head and attention not included).")
    notes.append("Shapes shared by several layers (q/o, k/v, gate/up) are measured once.")
    return {"rows": rows, "targets": [], "notes": notes}


# The report runs these after the attention suites
SUITES = [
    ("lut-1", "LUT-GEMV 4-bit and 2-bit g128 affine, N=4096 K=14336 M=1 (Llama-3-8B down_proj) vs torch bf16",
     suite_headline),
    ("lut-2", "LUT-GEMV bits 1..4, N=4096 K=14336 M=1", suite_bits),
    ("lut-3", "LUT-GEMV 4-bit, M = 1..16 rows of x, N=4096 K=14336", suite_batch),
    ("lut-4", "LUT-GEMV 4-bit per-layer sweep over the Llama-3-8B linear shapes, M=1", suite_layers),
]


# --------------------------------------------------------------------------------------------
# text output

def format_rows(rows: list[dict]) -> str:
    """Plain-text table of LUT result rows (also valid inside a markdown code block)."""
    return format_timed(rows, 42, 16, extra=[(f"{'b/w':>6}", lambda r: f"{r['bits_per_weight']:>6.2f}")],
                        err=("rel_err", "rel"))
