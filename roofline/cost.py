"""FLOP and byte counts of the package's ops, per configuration.

Conventions: a multiply-add is 2 FLOPs; bytes are the *minimum* device-memory traffic (every input
read once, every output written once, on-chip reuse assumed perfect), so a kernel that re-reads a
tile shows up as an efficiency below 1, not as a different cost. ``link_bytes`` counts bytes that
cross a named link (``"h2d_pinned"``, ``"disk_read"``, ``"nvlink"``, ...) in addition.

Example
-------
>>> c = gemm_cost(1, 4096, 4096)                      # bf16 GEMV
>>> c.flops, c.bytes
(33554432, 33570816.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Cost", "kv_bytes_per_token", "kv_bytes_of_sequence", "decode_attention_cost", "decode_attention_kv_cost",
           "prefill_attention_cost", "lut_gemv_cost", "gemm_cost", "transfer_cost"]

_DTYPE_OF_BYTES = {1: "int8", 2: "bf16", 4: "fp32"}  # element size -> compute roof
_PARTIAL_BYTES_PER_ELEM = 4  # split/lean partial (m, l, acc) states are fp32


@dataclass
class Cost:
    """Work of one op: FLOPs on the ``dtype`` roof, device-memory bytes, bytes per link.

    Example
    -------
    >>> (Cost(10, 4, name="a") + Cost(6, 4, name="b")).flops
    16
    """

    flops: float
    bytes: float
    dtype: str = "bf16"
    name: str = ""
    link_bytes: dict[str, float] = field(default_factory=dict)

    def __add__(self, other: "Cost") -> "Cost":
        if not isinstance(other, Cost):
            return NotImplemented
        if self.dtype != other.dtype and self.flops and other.flops:
            raise ValueError(f"other: cannot add FLOPs on the {other.dtype!r} roof to FLOPs on "
                             f"the {self.dtype!r} roof")
        links = dict(self.link_bytes)
        for k, v in other.link_bytes.items():
            links[k] = links.get(k, 0) + v
        return Cost(self.flops + other.flops, self.bytes + other.bytes,
                    self.dtype if self.flops else other.dtype,
                    " + ".join(n for n in (self.name, other.name) if n), links)

    def to_dict(self) -> dict:
        return {"name": self.name, "flops": self.flops, "bytes": self.bytes, "dtype": self.dtype,
                "link_bytes": dict(self.link_bytes)}


def _pos_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _choice(name: str, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")
    return value


def _seqlens(batch: int, seqlens_or_context) -> list[int]:
    _pos_int("batch", batch)
    if hasattr(seqlens_or_context, "tolist"):  # numpy / torch: arrays and scalars as Python ints
        seqlens_or_context = seqlens_or_context.tolist()
    if isinstance(seqlens_or_context, Sequence):
        lens = list(seqlens_or_context)
        if len(lens) != batch:
            raise ValueError(f"seqlens_or_context: expected {batch} lengths (batch), "
                             f"got {len(lens)}")
    else:
        lens = [seqlens_or_context] * batch
    for n in lens:
        _pos_int("seqlens_or_context", n)
    return lens


def kv_bytes_per_token(num_kv_heads: int, head_dim: int, kv_bits=16, group_size: int = 32) -> float:
    """KV-cache bytes one token takes in one layer (K and V, all kv heads), scales included.

    Formulas (``H = num_kv_heads``, ``D = head_dim``, ``g = group_size``):

    - ``kv_bits=16`` (bf16/fp16): ``2 * H * D * 2``.
    - ``kv_bits`` in 8/4/2 (KIVI layout): codes ``2 * H * D * bits / 8``, plus an fp16 scale and
      zero (4 bytes) per group: keys are grouped per channel over ``g`` tokens
      (``4 * D / g`` bytes per token and head), values per token over ``ceil(D / g)`` channel
      groups (``4 * ceil(D / g)``, as ``pykernels.kv_format`` stores them), so
      ``+ H * 4 * (D / g + ceil(D / g))``.
    - ``kv_bits="fp8"`` (e4m3): ``2 * H * D`` plus one fp32 scale per ``g`` tokens, per head, for
      K and V: ``+ 2 * H * 4 / g``.

    For H=8, D=128, g=32: 4096 (16-bit), 2304 (int8), 1280 (int4), 768 (int2), 2050 (fp8).

    Example
    -------
    >>> kv_bytes_per_token(8, 128, kv_bits=4)
    1280.0
    """
    h, d = _pos_int("num_kv_heads", num_kv_heads), _pos_int("head_dim", head_dim)
    g = _pos_int("group_size", group_size)
    _choice("kv_bits", kv_bits, (16, 8, 4, 2, "fp8"))
    if kv_bits == 16:
        return float(2 * h * d * 2)
    if kv_bits == "fp8":
        return 2 * h * d + 2 * h * 4 / g
    return 2 * h * d * kv_bits / 8 + h * 4 * (d / g + math.ceil(d / g))


def kv_bytes_of_sequence(L: int, num_kv_heads: int, head_dim: int, kv_bits=16, group_size: int = 32,
                         residual: int = 0) -> float:
    """KV-cache bytes of one layer holding ``L`` tokens: quantized tokens at
    :func:`kv_bytes_per_token` and the full-precision window of recent ones at 16 bits, the
    window as ``pk.QuantizedKVCache`` keeps it (``L`` while ``L <= residual``; else whole groups
    of ``group_size`` are quantized once it would exceed ``residual``, so it holds
    ``L - g * ceil((L - residual) / g)`` tokens, in ``(residual - g, residual]``; never a partial
    group: with ``residual < g`` the last ``L mod g`` tokens stay full precision).

    >>> kv_bytes_of_sequence(1000, 8, 128, kv_bits=4, residual=128)   # 896 int4 + 104 bf16 tokens
    1572864.0
    """
    _pos_int("residual", residual, 0)
    g = _pos_int("group_size", group_size)
    q_tok = kv_bytes_per_token(num_kv_heads, head_dim, kv_bits, group_size)
    if kv_bits == 16:
        return L * q_tok
    n_quant = 0 if L <= residual else min(g * math.ceil((L - residual) / g), L // g * g)  # whole groups only
    return n_quant * q_tok + (L - n_quant) * kv_bytes_per_token(num_kv_heads, head_dim, 16)


def _decode(batch, seqlens_or_context, num_q_heads, num_kv_heads, head_dim, q_dtype_bytes,
            method, num_splits, kv_bytes_of_len, extra_bytes, name) -> Cost:
    lens = _seqlens(batch, seqlens_or_context)
    hq, hkv = _pos_int("num_q_heads", num_q_heads), _pos_int("num_kv_heads", num_kv_heads)
    d = _pos_int("head_dim", head_dim)
    if hq % hkv:
        raise ValueError(f"num_q_heads: expected a multiple of num_kv_heads={hkv}, got {hq}")
    _choice("q_dtype_bytes", q_dtype_bytes, (2, 4))
    _choice("method", method, ("lean", "split"))
    if num_splits is not None:
        _pos_int("num_splits", num_splits)
    flops = sum(4 * hq * d * n for n in lens)           # QK^T and PV, 2 FLOPs per multiply-add
    nbytes = sum(kv_bytes_of_len(n) for n in lens)      # each KV byte read once (GQA grouped)
    nbytes += 2 * batch * hq * d * q_dtype_bytes        # q read, out written
    # Partial (m, l, acc) states written by the workers and read back by the merge:
    # split: every (sequence, q-head) has num_splits partials; lean with W=num_splits workers:
    # each of the W-1 cuts splits at most one (sequence, kv-head) unit into two partials.
    if num_splits and num_splits > 1:
        partials = (batch * hq * num_splits if method == "split"
                    else 2 * (num_splits - 1) * (hq // hkv))
        nbytes += 2 * partials * (d + 2) * _PARTIAL_BYTES_PER_ELEM
    return Cost(flops, nbytes + extra_bytes(lens), _DTYPE_OF_BYTES[q_dtype_bytes], name)


def decode_attention_cost(batch: int, seqlens_or_context, num_q_heads: int, num_kv_heads: int,
                          head_dim: int, kv_dtype_bytes: int = 2, q_dtype_bytes: int = 2,
                          paged: bool = False, block_table_bytes: int = 4, method: str = "lean",
                          num_splits: int | None = None, block_size: int = 16) -> Cost:
    """Decode attention (one query token per sequence) over an unquantized KV cache.

    FLOPs: ``4 * Hq * D * L`` per sequence. Bytes: ``2 * Hkv * D * L * kv_dtype_bytes`` (K and V
    read once per kv head: they scale with kv heads, not query heads) + q read + out write
    (``Hq * D * q_dtype_bytes`` each) + for ``paged``, the used block-table entries
    (``ceil(L / block_size) * block_table_bytes``) + partial states of the split/lean merge when
    ``num_splits`` (splits per unit for ``"split"``, worker count for ``"lean"``) is given.

    Parameters
    ----------
    seqlens_or_context : int or sequence of int
        One KV length for all sequences, or one per sequence (tokens).

    Example
    -------
    >>> decode_attention_cost(1, 1000, 32, 8, 128).bytes    # 2*8*128*1000*2 + 2*32*128*2
    4112384
    """
    _choice("kv_dtype_bytes", kv_dtype_bytes, (1, 2, 4))
    _pos_int("block_table_bytes", block_table_bytes)
    _pos_int("block_size", block_size)
    hkv, d = num_kv_heads, head_dim

    def table(lens):
        return sum(math.ceil(n / block_size) for n in lens) * block_table_bytes if paged else 0

    return _decode(batch, seqlens_or_context, num_q_heads, num_kv_heads, head_dim, q_dtype_bytes,
                   method, num_splits, lambda n: 2 * hkv * d * n * kv_dtype_bytes, table,
                   f"decode_attention[{method}{', paged' if paged else ''}]")


def decode_attention_kv_cost(batch: int, seqlens_or_context, num_q_heads: int, num_kv_heads: int,
                             head_dim: int, kv_bits=16, group_size: int = 32, residual: int = 0,
                             q_dtype_bytes: int = 2, method: str = "lean",
                             num_splits: int | None = None) -> Cost:
    """Decode attention over a quantized KV cache (dequantized inside the kernel).

    KV bytes per sequence: ``(L - r) * kv_bytes_per_token(kv_bits) + r * kv_bytes_per_token(16)``
    with ``r`` the full-precision window of recent tokens as ``pk.QuantizedKVCache`` holds it:
    ``L`` while ``L <= residual``, else whole groups are quantized once the window would exceed
    ``residual``, so ``r = L - g * ceil((L - residual) / g)``, in ``(residual - g, residual]``
    (fp8 keeps the same window). FLOPs and the q/out bytes are those of
    :func:`decode_attention_cost`; dequantization runs on the same roof.

    Example
    -------
    >>> decode_attention_kv_cost(1, 32, 8, 8, 128, kv_bits=4).bytes   # 32*1280 + 2*8*128*2
    45056.0
    """
    _pos_int("residual", residual, 0)

    def kv(n):
        return kv_bytes_of_sequence(n, num_kv_heads, head_dim, kv_bits, group_size, residual)

    return _decode(batch, seqlens_or_context, num_q_heads, num_kv_heads, head_dim, q_dtype_bytes,
                   method, num_splits, kv, lambda lens: 0, f"decode_attention[kv{kv_bits}]")


def prefill_attention_cost(batch: int, seqlen: int, num_q_heads: int, num_kv_heads: int,
                           head_dim: int, kv_bits=16, group_size: int = 32,
                           causal: bool = True) -> Cost:
    """Prefill (flash) attention of ``seqlen`` new tokens per sequence, plus writing the cache.

    FLOPs per sequence: ``4 * Hq * D * P`` with ``P`` the attended (query, key) pairs:
    ``L * (L + 1) / 2`` when ``causal`` (about ``2 * Hq * D * L**2``), ``L**2`` otherwise.
    Bytes per sequence: q read and out written (``2 * L * Hq * D * 2``), K and V read once in
    bf16 (``L * 4 * Hkv * D``), the cache written (``L * kv_bytes_per_token(kv_bits)``).

    Example
    -------
    >>> round(prefill_attention_cost(1, 4096, 56, 8, 128).flops / 1e12, 4)   # TFLOPs
    0.2406
    """
    _pos_int("batch", batch)
    n = _pos_int("seqlen", seqlen)
    hq, hkv, d = (_pos_int(k, v) for k, v in (("num_q_heads", num_q_heads),
                                              ("num_kv_heads", num_kv_heads),
                                              ("head_dim", head_dim)))
    pairs = n * (n + 1) // 2 if causal else n * n
    flops = batch * 4 * hq * d * pairs
    nbytes = batch * n * (2 * hq * d * 2 + kv_bytes_per_token(hkv, d, 16)
                          + kv_bytes_per_token(hkv, d, kv_bits, group_size))
    return Cost(flops, nbytes, "bf16", "prefill_attention" + ("[causal]" if causal else ""))


def _weight_bytes(n: int, k: int, w_bits: int, group_size: int) -> float:
    """Packed weights plus, for integer bits < 16, an fp16 scale and zero per group of K."""
    packed = n * k * w_bits / 8
    if w_bits >= 16:
        return packed
    return packed + n * math.ceil(k / group_size) * 2 * 2


def gemm_cost(M: int, N: int, K: int, dtype_bytes: int = 2, w_bits: int = 16,
              group_size: int = 128) -> Cost:
    """``y[M, N] = x[M, K] @ W[N, K]^T`` (GEMV when ``M == 1``), dense or weight-quantized.

    FLOPs ``2 * M * N * K`` on the roof of the activation dtype (``dtype_bytes`` 2 -> bf16,
    4 -> fp32, 1 -> int8). Bytes: weights ``N * K * w_bits / 8`` (+ fp16 scale and zero per
    ``group_size`` weights when ``w_bits < 16``), activations ``M * K`` and output ``M * N``
    elements of ``dtype_bytes``. Quantized weights are dequantized in registers, so they shrink
    the bytes, not the compute roof.

    Example
    -------
    >>> gemm_cost(1, 4096, 4096, w_bits=4).bytes    # 8 MiB codes + 0.5 MiB scales/zeros + x, y
    8929280.0
    """
    m, n, k = _pos_int("M", M), _pos_int("N", N), _pos_int("K", K)
    _choice("dtype_bytes", dtype_bytes, (1, 2, 4))
    _choice("w_bits", w_bits, (1, 2, 3, 4, 5, 6, 7, 8, 16, 32))
    _pos_int("group_size", group_size)
    nbytes = _weight_bytes(n, k, w_bits, group_size) + (m * k + m * n) * dtype_bytes
    return Cost(2 * m * n * k, nbytes, _DTYPE_OF_BYTES[dtype_bytes], f"gemm[w{w_bits}]")


#: rows of x one LUT-GEMV pass takes (``pykernels.lut.MAX_M``): weights are read once per pass
LUT_MAX_M = 16


def lut_gemv_cost(N: int, K: int, M: int = 1, bits: int = 4, group_size: int = 128,
                  act_bytes: int = 2, scheme: str = "affine") -> Cost:
    """LUT-GEMV ``y[M, N] = x[M, K] @ W^T`` with ``bits``-bit weights (tables stay on chip).

    FLOPs ``2 * M * N * K``; bytes: packed weights ``N * K * bits / 8`` read once for all M rows,
    activations and output, and per group of ``group_size`` weights an fp16 scale and zero
    (``scheme="affine"``), a scale only (``"symmetric"``), or a scale plus a per-channel fp32
    codebook of ``2**bits`` levels per row (``"codebook"``), as ``pk.LUTWeight.nbytes`` counts.
    ``M > 16``: the kernel takes 16 rows per pass, so the weights are read ``ceil(M / 16)`` times.

    Example
    -------
    >>> lut_gemv_cost(4096, 4096, bits=2).bytes
    4734976.0
    """
    _choice("bits", bits, (1, 2, 3, 4, 5, 6, 7, 8))
    _choice("act_bytes", act_bytes, (2, 4))
    _choice("scheme", scheme, ("affine", "symmetric", "codebook"))
    c = gemm_cost(M, N, K, act_bytes, bits, group_size)
    w = _weight_bytes(N, K, bits, group_size)  # affine: packed bits + fp16 scale and zero per group
    if scheme != "affine":  # no zero points; a codebook adds its levels
        w += -N * math.ceil(K / group_size) * 2 + (N * (1 << bits) * 4 if scheme == "codebook" else 0)
    passes = -(-M // LUT_MAX_M)  # pk.lut_gemv takes x LUT_MAX_M rows at a time: each pass reads W again
    c.bytes += passes * w - _weight_bytes(N, K, bits, group_size)
    c.name = f"lut_gemv[w{bits}]" + ("" if scheme == "affine" else f"[{scheme}]")
    return c


def transfer_cost(nbytes: float, link: str) -> Cost:
    """``nbytes`` moved over ``link`` (e.g. ``"h2d_pinned"``): no FLOPs, no device-memory bytes.

    Example
    -------
    >>> transfer_cost(1e9, "h2d_pinned").link_bytes
    {'h2d_pinned': 1000000000.0}
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, float)) or not nbytes >= 0:
        raise ValueError(f"nbytes: expected a number >= 0, got {nbytes!r}")
    if not isinstance(link, str) or not link:
        raise ValueError(f"link: expected a link name, got {link!r}")
    return Cost(0, 0, "bf16", f"transfer[{link}]", {link: float(nbytes)})
