"""LUT-GEMV: ``y = x @ W^T`` for low-bit weights stored as bit planes (T-MAC style).

Public entry points: ``LUTWeight`` (the packed weight, its importers and serialisation),
``quantize_weight`` (round-to-nearest with an MSE clipping search, or k-means codebooks),
``lut_gemv`` (the GEMV / small-batch GEMM) and ``LUTLinear`` (an ``nn.Linear`` replacement).
The storage format is defined in ``pykernels.lut_format``; this module validates at the
boundary and dispatches to the backends (``pykernels.backends``), whose entry points are

    pykernels._C.lut_gemv / pykernels.triton.lut_gemv.lut_gemv / pykernels.cuda.lut_gemv.lut_gemv
        (x, planes, scales, zeros, codebook, out, N, K_pad, bits, gs, mode)

with x [M <= 16, K_pad] already permuted and zero-padded, out [M, N] float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from ._checks import check_out
from .lut_format import K_SLICE, TILE_N, pack_codes, padded_shape, unpack_codes

SCHEMES = ("affine", "symmetric", "codebook")
MODES = ("int8", "exact")
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_M = 16             # rows of x per kernel call (tables built once per row, bits read once)
FORMAT_VERSION = 1     # state_dict layout version
_FP16_MAX = 65504.0
_FP16_TINY = 2.0 ** -24  # smallest positive float16 (subnormal): scales never round to 0


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to the float16 the format stores, kept in float32 (> 0 where t > 0)."""
    return t.to(torch.float16).to(torch.float32)


def _check_int(v, name, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int in [{lo}, {hi}], got {type(v).__name__} {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}], got {v}")


def _check_group_size(group_size):
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size: expected an int (-1 or a positive multiple of {K_SLICE}), "
                        f"got {type(group_size).__name__} {group_size!r}")


def _infer_scheme(scales, zeros, codebook) -> str:
    if codebook is not None:
        return "codebook"
    return "affine" if zeros is not None else "symmetric"


# --------------------------------------------------------------------------------------------
# The packed weight
# --------------------------------------------------------------------------------------------
class LUTWeight:
    r"""A low-bit weight W [N, K] in the LUT-GEMV bit-plane format (``pykernels.lut_format``).

    .. math:: W[n, k] = s_{n,g} (q_{n,k} - z_{n,g}) \;|\; s_{n,g} (q_{n,k} - (2^b - 1)/2)
              \;|\; s_{n,g}\, C_{c,\,q_{n,k}}, \qquad g = \lfloor k / gs \rfloor

    for ``scheme`` "affine" | "symmetric" | "codebook" (c = 0 for a per-tensor codebook, n for
    per-channel codebooks; s = 1 when ``scales`` is None). With ``perm`` set (GPTQ act-order)
    the stored columns are ``W[:, perm]`` and kernels multiply ``x[..., perm]``.

    Attributes
    ----------
    shape : (N, K);  bits : 1..8;  group_size : as given (-1 = per-channel);  gs : effective
        group size (K_pad for per-channel);  scheme : "affine" | "symmetric" | "codebook";
    N_pad, K_pad : padded sizes (N to a multiple of 32, K to a multiple of 8 or of gs);
    planes : uint8 [N_pad/32, K_pad/8, bits, 32];  scales : float16 [N, K_pad/gs] or None;
    zeros : float16 [N, K_pad/gs] (affine) or None;  codebook : float32 [1 or N, 2**bits] or
    None;  perm : int64 [K] or None.

    Build one with ``quantize_weight``, ``LUTWeight.from_codes``, ``from_gptq``, ``from_awq`` or
    ``from_state_dict``; the constructor only checks that the tensors fit together.
    """

    def __init__(self, planes, scales, zeros, codebook, *, shape, bits, group_size, scheme=None,
                 perm=None):
        _check_int(bits, "bits", 1, 8)
        _check_group_size(group_size)
        if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
            raise TypeError(f"shape: expected (N, K) ints, got {shape!r}")
        N, K = int(shape[0]), int(shape[1])
        N_pad, K_pad, gs = padded_shape(N, K, group_size)
        G = K_pad // gs
        if scheme is None:
            scheme = _infer_scheme(scales, zeros, codebook)
        if scheme not in SCHEMES:
            raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
        if not isinstance(planes, torch.Tensor):
            raise TypeError(f"planes: expected a torch.Tensor, got {type(planes).__name__}")
        want = (N_pad // TILE_N, K_pad // K_SLICE, bits, TILE_N)
        if planes.dtype != torch.uint8:
            raise TypeError(f"planes: expected uint8, got {planes.dtype}")
        if tuple(planes.shape) != want:
            raise ValueError(f"planes: expected shape {want} for shape=({N}, {K}), bits={bits}, "
                             f"group_size={group_size}, got {tuple(planes.shape)}")
        dev = planes.device

        def check(t, name, dtype, shp):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise TypeError(f"{name}: expected {dtype}, got {t.dtype}")
            if tuple(t.shape) not in shp:
                raise ValueError(f"{name}: expected shape {' or '.join(map(str, shp))}, got {tuple(t.shape)}")
            if t.device != dev:
                raise ValueError(f"{name}: on {t.device}, but planes is on {dev}")

        if scales is None:
            if scheme != "codebook":
                raise ValueError(f"scales: required for scheme={scheme!r}")
        else:
            check(scales, "scales", torch.float16, [(N, G)])
        if scheme == "affine":
            if zeros is None:
                raise ValueError("zeros: required for scheme='affine'")
            check(zeros, "zeros", torch.float16, [(N, G)])
        elif zeros is not None:
            raise ValueError(f"zeros: must be None for scheme={scheme!r}")
        if scheme == "codebook":
            if codebook is None:
                raise ValueError("codebook: required for scheme='codebook'")
            check(codebook, "codebook", torch.float32, [(1, 1 << bits), (N, 1 << bits)])
        elif codebook is not None:
            raise ValueError(f"codebook: must be None for scheme={scheme!r}")
        if perm is not None:
            check(perm, "perm", torch.int64, [(K,)])
            if not torch.compiler.is_compiling() and not torch.equal(
                    torch.sort(perm).values, torch.arange(K, device=dev)):
                raise ValueError(f"perm: expected a permutation of 0..{K - 1}")

        self.shape = (N, K)
        self.bits, self.group_size, self.gs, self.scheme = bits, group_size, gs, scheme
        self.N_pad, self.K_pad = N_pad, K_pad
        self.planes = planes.contiguous()
        self.scales = scales.contiguous() if scales is not None else None
        self.zeros = zeros.contiguous() if zeros is not None else None
        self.codebook = codebook.contiguous() if codebook is not None else None
        self.perm = perm.contiguous() if perm is not None else None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes, scales=None, zeros=None, codebook=None, *, bits, group_size,
                   scheme=None, perm=None) -> "LUTWeight":
        """Pack integer codes q [N, K] (values in [0, 2**bits)) with their group parameters.

        ``scales``/``zeros`` [N, G] are rounded to float16, ``codebook`` [C or 1|N, 2**bits] to
        float32 (a 1-D codebook is a per-tensor table). For K_pad > K (per-channel with K not a
        multiple of 8) the padded columns get code 0; x is zero there.
        """
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"codes: expected a torch.Tensor, got {type(codes).__name__}")
        if codes.dim() != 2:
            raise ValueError(f"codes: expected [N, K], got shape {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
            raise TypeError(f"codes: expected an integer tensor, got {codes.dtype}")
        _check_int(bits, "bits", 1, 8)
        _check_group_size(group_size)
        N, K = codes.shape
        N_pad, K_pad, gs = padded_shape(N, K, group_size)
        padded = torch.zeros(N_pad, K_pad, dtype=torch.int32, device=codes.device)
        padded[:N, :K] = codes.to(torch.int32)
        planes = pack_codes(padded, bits)
        h = lambda t: None if t is None else torch.as_tensor(t, device=codes.device).to(torch.float16)
        cb = None
        if codebook is not None:
            cb = torch.as_tensor(codebook, device=codes.device).to(torch.float32)
            if cb.dim() == 1:
                cb = cb.unsqueeze(0)
        return cls(planes, h(scales), h(zeros), cb, shape=(N, K), bits=bits, group_size=group_size,
                   scheme=scheme, perm=perm)

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, bits=4, group_size=128, g_idx=None, *,
                  zero_offset=1) -> "LUTWeight":
        r"""Import a GPTQ (AutoGPTQ / GPTQModel) ``QuantLinear``.

        .. math:: W[n, k] = \mathrm{scales}[g, n]\,(q[k, n] - (z[g, n] + \mathrm{zero\_offset})),
                  \qquad g = \mathrm{g\_idx}[k]

        Parameters
        ----------
        qweight : int32 [K * bits / 32, N]. Along K the codes form one little-endian bit stream
            (code k in stream bits [k*bits, (k+1)*bits)); for bits 2/4/8 that is ``32/bits``
            codes per word, code j of a word in bits [j*bits, (j+1)*bits); for bits 3 it is 32
            codes in 3 words with codes 10 and 21 straddling word boundaries (AutoGPTQ's layout).
        qzeros : int32 [G, N * bits / 32], the same bit stream along N.
        scales : float16 [G, N] (bfloat16/float32 are rounded to float16, the format's type).
        bits : 2, 3, 4 or 8.   group_size : columns per group, -1 = one group per row.
        g_idx : int [K] or None: group of each input column. Act-order checkpoints have a
            non-monotone g_idx; the columns are then sorted by group (stable) into ``perm`` and
            ``lut_gemv`` gathers ``x[..., perm]``. Every group must hold group_size columns.
        zero_offset : 1 for the "v1" checkpoint format that AutoGPTQ writes and Hugging Face
            hosts (zero points stored minus one, ``checkpoint_format="gptq"``), 0 for GPTQModel's
            "gptq_v2" (stored as is).

        The result is ``scheme="affine"`` with zeros = stored + zero_offset (no wrap-around:
        a v1 stored 2**bits - 1 means zero 2**bits, as the GPTQ kernels compute it).
        """
        _check_int(bits, "bits", 1, 8)
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"bits: GPTQ checkpoints use 2, 3, 4 or 8 bits, got {bits}")
        _check_group_size(group_size)
        _check_int(zero_offset, "zero_offset", 0, 1)
        qweight = _int32_tensor(qweight, "qweight", 2)
        dev = qweight.device
        qzeros = _int32_tensor(qzeros, "qzeros", 2)
        scales = _float_tensor(scales, "scales", 2)
        rows, N = qweight.shape
        if (rows * 32) % bits:
            raise ValueError(f"qweight: {rows} rows of int32 do not hold a whole number of {bits}-bit "
                             "codes (expected K * bits / 32 rows)")
        K = rows * 32 // bits
        gsz, G = _checkpoint_groups(K, N, group_size, scales)
        zcols = -(-N * bits // 32)
        if tuple(qzeros.shape) != (G, zcols):
            raise ValueError(f"qzeros: expected [{G}, {zcols}] (groups, N * bits / 32), got {tuple(qzeros.shape)}")
        for name, t in (("qzeros", qzeros), ("scales", scales)):
            if t.device != dev:
                raise ValueError(f"{name}: on {t.device}, but qweight is on {dev}")
        codes = _unpack_stream(qweight.t(), bits, K)                # [N, K] (stream along K)
        zeros = _unpack_stream(qzeros, bits, N).to(torch.float32) + zero_offset  # [G, N]
        perm = None
        if g_idx is not None:
            g_idx = torch.as_tensor(g_idx, device=dev)
            if g_idx.dim() != 1 or g_idx.shape[0] != K:
                raise ValueError(f"g_idx: expected [{K}] (one group per input column), got {tuple(g_idx.shape)}")
            if g_idx.dtype.is_floating_point or g_idx.dtype == torch.bool:
                raise TypeError(f"g_idx: expected an integer tensor, got {g_idx.dtype}")
            g_idx = g_idx.to(torch.int64)
            if int(g_idx.min()) < 0 or int(g_idx.max()) >= G:
                raise ValueError(f"g_idx: values must lie in [0, {G}), got [{int(g_idx.min())}, {int(g_idx.max())}]")
            counts = torch.bincount(g_idx, minlength=G)
            if not bool((counts == gsz).all()):
                g = int(torch.nonzero(counts != gsz)[0, 0])
                raise ValueError(f"g_idx: group {g} has {int(counts[g])} columns, expected group_size={gsz} "
                                 "(groups of unequal size cannot be made contiguous)")
            if not torch.equal(g_idx, torch.arange(K, device=dev) // gsz):
                perm = torch.sort(g_idx, stable=True).indices
                codes = codes[:, perm]
        return cls.from_codes(codes, scales.t(), zeros.t(), bits=bits, group_size=group_size,
                              scheme="affine", perm=perm)

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, bits=4, group_size=128) -> "LUTWeight":
        r"""Import an AutoAWQ GEMM-format ``WQLinear``.

        .. math:: W[n, k] = \mathrm{scales}[g, n]\,(q[k, n] - z[g, n]), \qquad g = \lfloor k / gs \rfloor

        Parameters
        ----------
        qweight : int32 [K, N / 8], 8 codes per word packed along N in AWQ's interleaved order:
            nibble p (bits 4p..4p+3) of word c holds column 8 c + [0, 2, 4, 6, 1, 3, 5, 7][p].
        qzeros : int32 [G, N / 8], same order (zero points as is, no offset).
        scales : float16 [G, N].   bits : 4 (the only width AWQ's GEMM format defines).
        group_size : columns per group, -1 = one group per row.
        """
        _check_int(bits, "bits", 1, 8)
        if bits != 4:
            raise ValueError(f"bits: the AWQ GEMM format is 4-bit only, got {bits}")
        _check_group_size(group_size)
        qweight = _int32_tensor(qweight, "qweight", 2)
        qzeros = _int32_tensor(qzeros, "qzeros", 2)
        scales = _float_tensor(scales, "scales", 2)
        K, cols = qweight.shape
        N = cols * 8
        _, G = _checkpoint_groups(K, N, group_size, scales)
        if tuple(qzeros.shape) != (G, cols):
            raise ValueError(f"qzeros: expected [{G}, {cols}] (groups, N / 8), got {tuple(qzeros.shape)}")
        for name, t in (("qzeros", qzeros), ("scales", scales)):
            if t.device != qweight.device:
                raise ValueError(f"{name}: on {t.device}, but qweight is on {qweight.device}")
        codes = _unpack_awq(qweight)                                # [K, N]
        zeros = _unpack_awq(qzeros).to(torch.float32)               # [G, N]
        return cls.from_codes(codes.t(), scales.t(), zeros.t(), bits=4, group_size=group_size,
                              scheme="affine")

    # -- views ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.planes.device

    def tensors(self) -> dict:
        """The stored tensors by name (None entries omitted)."""
        d = {"planes": self.planes, "scales": self.scales, "zeros": self.zeros,
             "codebook": self.codebook, "perm": self.perm}
        return {k: v for k, v in d.items() if v is not None}

    @property
    def nbytes(self) -> int:
        """Exact bytes stored: planes (incl. N/K padding) + scales + zeros + codebook + perm."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        """nbytes * 8 / (N * K): e.g. 4-bit g128 affine with N % 32 == 0 -> 4 + 2*16/128 = 4.25."""
        return self.nbytes * 8 / (self.shape[0] * self.shape[1])

    def codes(self) -> torch.Tensor:
        """Integer codes uint8 [N, K_pad] in stored (permuted, if ``perm``) column order."""
        return unpack_codes(self.planes, self.bits)[: self.shape[0]]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] in the original column order (``x @ W.T`` is what ``lut_gemv`` computes).

        float32 is exact for affine/symmetric (fp16 scale times a <= 9-bit integer)."""
        N, K = self.shape
        G = self.K_pad // self.gs
        q = self.codes().to(dtype).view(N, G, self.gs)
        if self.scheme == "codebook":
            cb = self.codebook.to(dtype)
            idx = q.view(N, -1).long()
            if cb.shape[0] == 1:
                w = cb[0][idx]
            else:
                w = torch.gather(cb, 1, idx)
            w = w.view(N, G, self.gs)
        elif self.scheme == "affine":
            w = q - self.zeros.to(dtype).unsqueeze(-1)
        else:
            w = q - ((1 << self.bits) - 1) / 2
        if self.scales is not None:
            w = w * self.scales.to(dtype).unsqueeze(-1)
        w = w.reshape(N, self.K_pad)[:, :K]
        if self.perm is not None:
            out = torch.empty_like(w)
            out[:, self.perm] = w
            w = out
        return w.contiguous()

    def to(self, device) -> "LUTWeight":
        """A copy on ``device`` (the same object when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        mv = lambda t: None if t is None else t.to(device)
        return LUTWeight(mv(self.planes), mv(self.scales), mv(self.zeros), mv(self.codebook),
                         shape=self.shape, bits=self.bits, group_size=self.group_size,
                         scheme=self.scheme, perm=mv(self.perm))

    # -- serialisation -------------------------------------------------------------------------
    def state_dict(self, prefix: str = "") -> dict:
        """Plain tensors only (safetensors-compatible): the stored tensors plus ``meta``
        (int64 [version, N, K, bits, group_size]) and ``scheme`` (uint8 ASCII bytes)."""
        d = {prefix + k: v for k, v in self.tensors().items()}
        d[prefix + "meta"] = torch.tensor([FORMAT_VERSION, *self.shape, self.bits, self.group_size],
                                          dtype=torch.int64)
        d[prefix + "scheme"] = torch.tensor(list(self.scheme.encode("ascii")), dtype=torch.uint8)
        return d

    @classmethod
    def from_state_dict(cls, d: dict, prefix: str = "") -> "LUTWeight":
        """Inverse of ``state_dict`` (tensors may be on any one device)."""
        for key in ("planes", "meta", "scheme"):
            if prefix + key not in d:
                raise ValueError(f"d: missing key {prefix + key!r} (not a LUTWeight state_dict)")
        meta = [int(v) for v in d[prefix + "meta"].tolist()]
        if len(meta) != 5 or meta[0] != FORMAT_VERSION:
            raise ValueError(f"d: {prefix}meta {meta} is not a version-{FORMAT_VERSION} LUTWeight header")
        scheme = bytes(d[prefix + "scheme"].tolist()).decode("ascii")
        get = lambda k: d.get(prefix + k)
        return cls(get("planes"), get("scales"), get("zeros"), get("codebook"), shape=(meta[1], meta[2]),
                   bits=meta[3], group_size=meta[4], scheme=scheme, perm=get("perm"))

    def __repr__(self) -> str:
        N, K = self.shape
        g = "per-channel" if self.group_size == -1 else f"group_size={self.group_size}"
        extra = ""
        if self.codebook is not None:
            extra += f", codebook={'per-channel' if self.codebook.shape[0] > 1 or N == 1 else 'per-tensor'}"
            if self.scales is None:
                extra += " (no scales)"
        if self.perm is not None:
            extra += ", act-order perm"
        return (f"LUTWeight(shape=({N}, {K}), bits={self.bits}, scheme={self.scheme!r}, {g}{extra}, "
                f"{self.bits_per_weight:.3f} bits/weight, {self.nbytes} bytes, device={self.device})")


def _checkpoint_groups(K: int, N: int, group_size: int, scales: torch.Tensor) -> tuple[int, int]:
    """GPTQ/AWQ import: -> (group size, number of groups G) for K columns; scales must be [G, N]."""
    gsz = K if group_size == -1 else group_size
    if gsz < 1 or K % gsz:
        raise ValueError(f"group_size: K={K} (from qweight) is not a multiple of group_size={group_size}")
    G = K // gsz
    if tuple(scales.shape) != (G, N):
        raise ValueError(f"scales: expected [{G}, {N}] (groups, N), got {tuple(scales.shape)}")
    return gsz, G


def _int32_tensor(t, name, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.uint32, torch.int64):
        raise TypeError(f"{name}: expected int32 packed words, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def _float_tensor(t, name, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected float16 (or bfloat16/float32), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains non-finite values")
    return t


def _unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """words [R, W] 32-bit -> codes int64 [R, count]: code j = stream bits [j*bits, (j+1)*bits)
    of the little-endian concatenation of a row's words (GPTQ's layout for 2/3/4/8 bits)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    pos = torch.arange(count, device=w.device) * bits
    wi, off = pos // 32, pos % 32
    lo = w[:, wi] >> off
    nxt = torch.clamp(wi + 1, max=w.shape[1] - 1)
    hi = torch.where(off + bits > 32, w[:, nxt] << (32 - off), torch.zeros_like(lo))
    return (lo | hi) & ((1 << bits) - 1)


_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # nibble p holds column order[p] of its 8-column block


def _unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """words [R, C] int32 -> codes int64 [R, 8 C] in natural column order."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, device=w.device)
    nib = (w.unsqueeze(-1) >> shifts) & 0xF                       # [R, C, position p]
    inv = torch.tensor(_AWQ_ORDER, device=w.device).argsort()     # column j sits at position inv[j]
    return nib[..., inv].reshape(w.shape[0], -1)


# --------------------------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------------------------
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
"""QLoRA's NormalFloat-4 levels (quantiles of N(0, 1) scaled to [-1, 1]), for ``codebook=NF4``."""


def _validate_weight(w):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w: expected a torch.Tensor [N, K], got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D weight [N, K] (out_features, in_features), got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"w: expected a float tensor (float32/float16/bfloat16/float64), got {w.dtype}")
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        r, c = (int(v) for v in torch.nonzero(bad)[0])
        raise ValueError(f"w: non-finite value {float(w[r, c])} at (row {r}, col {c}); "
                         f"{int(bad.sum())} non-finite element(s) in total")


def _validate_importance(weights, N, K, device):
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights: expected a torch.Tensor [K] or [N, K], got {type(weights).__name__}")
    if tuple(weights.shape) not in ((K,), (N, K)):
        raise ValueError(f"weights: expected shape [{K}] (per input column, e.g. E[x^2]) or [{N}, {K}], "
                         f"got {tuple(weights.shape)}")
    if not weights.dtype.is_floating_point:
        raise TypeError(f"weights: expected a float tensor, got {weights.dtype}")
    if weights.device != device:
        raise ValueError(f"weights: on {weights.device}, but w is on {device}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights: expected finite, non-negative importances")
    return weights.to(torch.float32).expand(N, K)


def _clip_factors(clip_grid: int, bits: int) -> list:
    """Range shrink factors tried by the MSE search; 1.0 (plain RTN) first."""
    if clip_grid <= 0:
        return [1.0]
    lo = 0.2 if bits <= 2 else (0.35 if bits <= 4 else 0.6)
    return [1.0 - (1.0 - lo) * i / clip_grid for i in range(clip_grid + 1)]


def _wsum(t, imp):
    return (t if imp is None else t * imp).sum(-1)


def _search_affine(wg, imp, bits, factors):
    """wg [R, G, gs] float32 -> (q, scale, zero) minimising sum imp * (w - s (q - z))^2 per
    group over range shrinks; the candidate f = 1.0 is plain RTN, so the result is never worse."""
    maxq = (1 << bits) - 1
    lo = wg.amin(-1).clamp(max=0)       # the range always holds 0, so the zero is in [0, maxq]
    hi = wg.amax(-1).clamp(min=0)
    best = None
    for f in factors:
        s = _fp16((hi - lo) * f / maxq)
        s = torch.where(s > 0, s, torch.full_like(s, _FP16_TINY))
        z = torch.clamp(torch.round(-lo * f / s), 0, maxq)
        q = torch.clamp(torch.round(wg / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, maxq)
        err = _wsum((s.unsqueeze(-1) * (q - z.unsqueeze(-1)) - wg) ** 2, imp)
        best = _keep_better(best, err, q, s, z)
    # least-squares scale for the chosen codes (zero kept), then re-round with it
    err, q, s, z = best
    for _ in range(2 if len(factors) > 1 else 0):
        d = q - z.unsqueeze(-1)
        den = _wsum(d * d, imp)
        s2 = _fp16(torch.where(den > 0, _wsum(wg * d, imp) / den.clamp(min=1e-30), s)).clamp(min=_FP16_TINY)
        e2 = _wsum((s2.unsqueeze(-1) * d - wg) ** 2, imp)
        best = _keep_better(best, e2, q, s2, z)
        err, q, s, z = best
        q2 = torch.clamp(torch.round(wg / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, maxq)
        e3 = _wsum((s.unsqueeze(-1) * (q2 - z.unsqueeze(-1)) - wg) ** 2, imp)
        best = _keep_better(best, e3, q2, s, z)
        err, q, s, z = best
    return q, s, z


def _search_symmetric(wg, imp, bits, factors):
    """Levels s * (q - c0), c0 = (2**bits - 1)/2; RTN scale = absmax / c0, then range shrinks
    and a least-squares refit (never worse than RTN)."""
    maxq = (1 << bits) - 1
    c0 = maxq / 2
    amax = wg.abs().amax(-1)
    best = None
    for f in factors:
        s = _fp16(amax * f / c0)
        s = torch.where(s > 0, s, torch.full_like(s, _FP16_TINY))
        q = torch.clamp(torch.round(wg / s.unsqueeze(-1) + c0), 0, maxq)
        err = _wsum((s.unsqueeze(-1) * (q - c0) - wg) ** 2, imp)
        best = _keep_better(best, err, q, s, None)
    err, q, s, _ = best
    for _ in range(2 if len(factors) > 1 else 0):
        d = q - c0
        den = _wsum(d * d, imp)
        s2 = _fp16(torch.where(den > 0, _wsum(wg * d, imp) / den.clamp(min=1e-30), s)).clamp(min=_FP16_TINY)
        best = _keep_better(best, _wsum((s2.unsqueeze(-1) * d - wg) ** 2, imp), q, s2, None)
        err, q, s, _ = best
        q2 = torch.clamp(torch.round(wg / s.unsqueeze(-1) + c0), 0, maxq)
        best = _keep_better(best, _wsum((s.unsqueeze(-1) * (q2 - c0) - wg) ** 2, imp), q2, s, None)
        err, q, s, _ = best
    return q, s


def _keep_better(best, err, q, s, z):
    if best is None:
        return err, q, s, z
    e0, q0, s0, z0 = best
    m = err < e0
    q = torch.where(m.unsqueeze(-1), q, q0)
    s = torch.where(m, s, s0)
    z = None if z is None else torch.where(m, z, z0)
    return torch.where(m, err, e0), q, s, z


def _nearest(u, cb):
    """u [R, L], cb [1 or R, C] -> index int64 [R, L] of the nearest codebook entry."""
    srt, order = torch.sort(cb, dim=-1)
    mids = (srt[:, 1:] + srt[:, :-1]) / 2
    if mids.shape[0] != u.shape[0]:
        mids = mids.expand(u.shape[0], -1)
        order = order.expand(u.shape[0], -1)
    pos = torch.searchsorted(mids.contiguous(), u.contiguous())
    return torch.gather(order, 1, pos)


def _kmeans_1d(v, imp, C, iters):
    """Weighted 1-D k-means (Lloyd) of every row of v [R, L] at once -> centroids [R, C] sorted.

    Rows are sorted once; with prefix sums of imp, imp*v and imp*v^2 a Lloyd step only searches
    the C - 1 midpoints (O(R C log L)) and the objective of a solution costs the same, so the
    sort dominates. Lloyd stops in local minima, so three starts (weighted quantiles, plain
    quantiles, uniform over the range) run side by side and each row keeps its best."""
    R, L = v.shape
    dev = v.device
    vs, idx = torch.sort(v.to(torch.float64), dim=-1)
    ws = torch.ones_like(vs) if imp is None else torch.gather(imp.to(torch.float64), 1, idx)
    tot = ws.sum(-1, keepdim=True)
    ws = torch.where(tot > 0, ws, torch.ones_like(ws))          # all-zero importance: unweighted
    zero = torch.zeros(R, 1, dtype=torch.float64, device=dev)
    cw = torch.cat([zero, ws.cumsum(-1)], -1)                   # [R, L + 1]
    cwv = torch.cat([zero, (ws * vs).cumsum(-1)], -1)
    cwvv = torch.cat([zero, (ws * vs * vs).cumsum(-1)], -1)
    frac = (torch.arange(C, device=dev, dtype=torch.float64) + 0.5) / C

    def quantile_init(c):
        pos = torch.searchsorted(c[:, 1:].contiguous(), (c[:, -1:] * frac).contiguous()).clamp(max=L - 1)
        return torch.gather(vs, 1, pos)

    ones = torch.arange(L + 1, dtype=torch.float64, device=dev).expand(R, L + 1)
    ends = torch.full((R, 1), L, dtype=torch.int64, device=dev)
    starts = torch.zeros(R, 1, dtype=torch.int64, device=dev)

    def clusters(c):
        b = torch.searchsorted(vs, ((c[:, 1:] + c[:, :-1]) / 2).contiguous())  # first element of each
        bounds = torch.cat([starts, b, ends], -1)
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        return [torch.gather(t, 1, hi) - torch.gather(t, 1, lo) for t in (cw, cwv, cwvv)]

    best_c = best_sse = None
    for init in (lambda: quantile_init(cw), lambda: quantile_init(ones),
                 lambda: vs[:, :1] + (vs[:, -1:] - vs[:, :1]) * frac):
        c = init()
        for _ in range(iters):
            W, S, _ = clusters(c)
            new = torch.sort(torch.where(W > 0, S / W.clamp(min=1e-300), c), dim=-1).values  # empty keeps
            if torch.equal(new, c):
                break
            c = new
        W, S, Q = clusters(c)
        sse = (Q - 2 * c * S + c * c * W).sum(-1)               # sum_w (v - c)^2 per row
        if best_c is None:
            best_c, best_sse = c, sse
        else:
            m = sse < best_sse
            best_c = torch.where(m.unsqueeze(-1), c, best_c)
            best_sse = torch.where(m, sse, best_sse)
    c = best_c
    return c.to(torch.float32)


def quantize_weight(w, bits=4, group_size=128, scheme="affine", *, codebook=None,
                    codebook_per_channel=True, weights=None, iters=50, clip_grid=20) -> LUTWeight:
    r"""Quantize a weight W [N, K] (``nn.Linear.weight``) to the LUT-GEMV format.

    Schemes (groups of ``group_size`` columns along K; -1 = one group per row):

    * ``"affine"``: w = s (q - z), z an integer in [0, 2**bits). Round-to-nearest from the
      group's range [min(w, 0), max(w, 0)], then a search over ``clip_grid`` shrunken ranges and
      a least-squares scale refit, keeping per group whatever minimises the (``weights``-
      weighted) squared error. The first candidate is plain RTN, so the error is never above it.
    * ``"symmetric"``: w = s (q - (2**bits - 1)/2), RTN scale absmax / ((2**bits - 1)/2), same
      search.
    * ``"codebook"``: w = s c[q]. With ``codebook=None``, 2**bits centroids fitted by weighted
      1-D k-means (SqueezeLLM-style with ``weights`` = activation second moments or Fisher
      information), per output channel (``codebook_per_channel``) or one for the tensor. For
      group_size=-1 there are no scales (the codebook carries the magnitude); otherwise each
      group is first normalised by its absmax scale. A given ``codebook`` ([2**bits], e.g.
      ``pk.lut.NF4``, or [1 or N, 2**bits]) is used with per-group absmax scales refined by
      the same MSE search.

    Scales and zeros are stored as float16 (all errors are computed with the rounded values).

    Parameters
    ----------
    w : float Tensor [N, K] (float32/float16/bfloat16/float64, finite). Quantized in float32.
    bits : 1..8.   group_size : -1 or a multiple of 8 dividing K (32, 64, 128, ...).
    weights : optional non-negative importance [K] or [N, K] for the error being minimised.
    iters : k-means iterations (stops early at convergence).   clip_grid : MSE search points
        (0 = plain round-to-nearest).

    Returns
    -------
    LUTWeight

    Example
    -------
    >>> qw = pk.quantize_weight(torch.randn(4096, 4096), bits=4, group_size=128)
    >>> qw.bits_per_weight
    4.25
    """
    _validate_weight(w)
    _check_int(bits, "bits", 1, 8)
    _check_group_size(group_size)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    _check_int(iters, "iters", 0, 10 ** 6)
    _check_int(clip_grid, "clip_grid", 0, 10 ** 4)
    if not isinstance(codebook_per_channel, bool):
        raise TypeError(f"codebook_per_channel: expected bool, got {type(codebook_per_channel).__name__}")
    N, K = w.shape
    N_pad, K_pad, gs = padded_shape(N, K, group_size)
    G = K_pad // gs
    gsz = K if group_size == -1 else gs           # real columns per group
    C = 1 << bits
    if codebook is not None:
        if scheme != "codebook":
            raise ValueError(f"codebook: only used with scheme='codebook', got scheme={scheme!r}")
        codebook = torch.as_tensor(codebook, dtype=torch.float32, device=w.device)
        if codebook.dim() == 1:
            codebook = codebook.unsqueeze(0)
        if codebook.dim() != 2 or codebook.shape[1] != C or codebook.shape[0] not in (1, N):
            raise ValueError(f"codebook: expected [{C}] or [1 or {N}, {C}] entries for bits={bits}, "
                             f"got shape {tuple(codebook.shape)}")
        if not bool(torch.isfinite(codebook).all()) or not bool((codebook.abs().amax(-1) > 0).all()):
            raise ValueError("codebook: entries must be finite and not all zero")
    imp = _validate_importance(weights, N, K, w.device)
    wf = w.detach().to(torch.float32)
    _check_scale_range(wf, bits, scheme, codebook, group_size)
    factors = _clip_factors(clip_grid, bits)

    codes = torch.empty(N, K, dtype=torch.int32, device=w.device)
    scales = zeros = None
    if scheme in ("affine", "symmetric") or codebook is not None or group_size != -1:
        scales = torch.empty(N, G, dtype=torch.float32, device=w.device)
    if scheme == "affine":
        zeros = torch.empty(N, G, dtype=torch.float32, device=w.device)
    cb_out = None
    if scheme == "codebook" and codebook is None and not codebook_per_channel:
        cb_out = _fit_tensor_codebook(wf, imp, bits, G, gsz, group_size, iters)

    rows = max(1, (1 << 18) // max(K, 1))         # ~1 MB of float32 per temporary (stays in cache)
    cbs = []
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        wg = wf[r0:r1].view(r1 - r0, G, gsz)
        ig = None if imp is None else imp[r0:r1].reshape(r1 - r0, G, gsz)
        if scheme == "affine":
            q, s, z = _search_affine(wg, ig, bits, factors)
            zeros[r0:r1] = z
        elif scheme == "symmetric":
            q, s = _search_symmetric(wg, ig, bits, factors)
        else:
            cb_rows = codebook if codebook is not None else cb_out
            if cb_rows is not None and cb_rows.shape[0] > 1:
                cb_rows = cb_rows[r0:r1]
            q, s, cb_fit = _codebook_rows(wg, ig, bits, cb_rows, codebook is not None, group_size,
                                          factors, iters)
            if cb_fit is not None:
                cbs.append(cb_fit)
        codes[r0:r1] = q.reshape(r1 - r0, K).to(torch.int32)
        if s is not None:
            scales[r0:r1] = s
    if scheme == "codebook":
        cb_out = codebook if codebook is not None else (cb_out if cb_out is not None else torch.cat(cbs))
    return LUTWeight.from_codes(codes, scales, zeros, cb_out, bits=bits, group_size=group_size,
                                scheme=scheme)


def _check_scale_range(wf, bits, scheme, codebook, group_size):
    """The round-to-nearest scale must fit float16 (the stored type)."""
    amax = float(wf.abs().max())
    maxq = (1 << bits) - 1
    if scheme == "affine":
        need = float((wf.amax(-1).clamp(min=0) - wf.amin(-1).clamp(max=0)).max()) / maxq
    elif scheme == "symmetric":
        need = amax / (maxq / 2)
    elif codebook is not None:
        need = amax / float(codebook.abs().amax(-1).min())
    else:
        need = amax if group_size != -1 else 0.0
    if need > _FP16_MAX:
        raise ValueError(f"w: |w| up to {amax:.4g} needs a scale of {need:.4g}, beyond float16 "
                         f"(max {_FP16_MAX}); rescale the weight")


def _absmax_scale(wg, cbmax):
    s = _fp16(wg.abs().amax(-1) / cbmax)
    return torch.where(s > 0, s, torch.full_like(s, _FP16_TINY))


def _codebook_rows(wg, ig, bits, cb, given, group_size, factors, iters):
    """Codes (and scales, and fitted per-channel centroids) for rows wg [R, G, gs].

    Returns (q [R, G, gs], s [R, G] or None, fitted codebook [R, C] or None)."""
    R, G, g = wg.shape
    if given:
        # per-group scale s: levels s * cb; RTN s = absmax / max|cb|, then the MSE search
        cbmax = cb.abs().amax(-1)                                 # [1 or R]
        amax = wg.abs().amax(-1)
        best = None
        for f in factors:
            s = _fp16(amax * f / cbmax.unsqueeze(-1))
            s = torch.where(s > 0, s, torch.full_like(s, _FP16_TINY))
            q = _nearest((wg / s.unsqueeze(-1)).view(R, -1), cb).view(R, G, g)
            lv = _levels(cb, q)
            best = _keep_better(best, _wsum((s.unsqueeze(-1) * lv - wg) ** 2, ig), q, s, None)
        err, q, s, _ = best
        if len(factors) == 1:
            return q, s, None
        lv = _levels(cb, q)
        den = _wsum(lv * lv, ig)
        s2 = _fp16(torch.where(den > 0, _wsum(wg * lv, ig) / den.clamp(min=1e-30), s)).clamp(min=_FP16_TINY)
        best = _keep_better(best, _wsum((s2.unsqueeze(-1) * lv - wg) ** 2, ig), q, s2, None)
        return best[1], best[2], None
    if group_size == -1:                    # the codebook carries the magnitude: no scales
        if cb is None:
            cb = _kmeans_1d(wg.view(R, -1), None if ig is None else ig.reshape(R, -1), 1 << bits, iters)
            fitted = cb
        else:
            fitted = None
        return _nearest(wg.view(R, -1), cb).view(R, G, g), None, fitted
    # per-group absmax normalisation, then centroids of the normalised values weighted by s^2
    # (so the k-means objective is the error in w units)
    s = _absmax_scale(wg, 1.0)
    u = wg / s.unsqueeze(-1)
    fitted = None
    if cb is None:
        wimp = (s * s).unsqueeze(-1).expand(R, G, g)
        if ig is not None:
            wimp = wimp * ig
        cb = _kmeans_1d(u.reshape(R, -1), wimp.reshape(R, -1), 1 << bits, iters)
        fitted = cb
    return _nearest(u.reshape(R, -1), cb).view(R, G, g), s, fitted


def _levels(cb, q):
    """cb [1 or R, C], q [R, G, g] -> cb values [R, G, g]."""
    R = q.shape[0]
    idx = q.reshape(R, -1).long()
    v = cb[0][idx] if cb.shape[0] == 1 else torch.gather(cb, 1, idx)
    return v.view(q.shape)


def _fit_tensor_codebook(wf, imp, bits, G, gsz, group_size, iters):
    """One codebook [1, 2**bits] for the whole tensor: k-means of w itself (group_size=-1, no
    scales) or of w / absmax(group) weighted by absmax^2 (grouped)."""
    N = wf.shape[0]
    if group_size == -1:
        v, wt = wf.reshape(1, -1), (None if imp is None else imp.reshape(1, -1))
    else:
        wg = wf.view(N, G, gsz)
        s = _absmax_scale(wg, 1.0)
        v = (wg / s.unsqueeze(-1)).reshape(1, -1)
        wt = (s * s).unsqueeze(-1).expand(N, G, gsz)
        if imp is not None:
            wt = wt * imp.reshape(N, G, gsz)
        wt = wt.reshape(1, -1)
    return _kmeans_1d(v, wt, 1 << bits, iters)


# --------------------------------------------------------------------------------------------
# GEMV dispatch
# --------------------------------------------------------------------------------------------
def _entry(name):
    """The backend's lut_gemv entry point -> (fn, None) or (None, why it is missing)."""
    if name == "cpu":
        fn = getattr(backends.cpu_module(), "lut_gemv", None)
        if fn is None:
            return None, ("pykernels._C was built without lut_gemv (an older build); rebuild with "
                          "`pip install .` or `make test`")
        return (lambda *a: fn(*map(backends.dl, a))), None  # tensors as DLPack capsules (cheaper per call)
    modname = f"pykernels.{name}.lut_gemv"
    mod, why = backends.module_status(modname)  # imported and available, once per process
    if mod is None:
        return None, why
    fn = getattr(mod, "lut_gemv", None)
    if fn is None:
        return None, f"{modname} has no lut_gemv function"
    return fn, None


def _accepts(qw):
    def accepts(name):
        if name == "reference":
            return None
        return _entry(name)[1]

    return accepts


def _measured_backend(x, qw):
    """For ``backends.select``: the autotune entry ("backend:lut_gemv", timings keyed by backend)
    of this call's shape bucket, looked up only when several backends could serve it."""
    def lookup():
        from roofline import autotune

        dev = "cuda" if x.device.type == "cuda" else "cpu"
        if not autotune.has_topic("backend:lut_gemv", dev):
            return None
        b = autotune.lut_bucket(qw.shape[0], qw.shape[1], min(x.shape[0], MAX_M), qw.bits, qw.gs, dev)
        return autotune.lookup("backend:lut_gemv", b, dev)
    return lookup


def _lut_gemv_2d(x, qw, backend, mode):
    """x [M, K] validated -> y [M, N] in x's dtype."""
    name = backends.select(backend, x.device, _accepts(qw), _measured_backend(x, qw))
    if name == "reference":
        from .reference import lut_gemv_reference

        return lut_gemv_reference(x, qw)
    fn = _entry(name)[0]
    M, K = x.shape
    N = qw.shape[0]
    # x is read once per call; the kernel reads the planes (N_pad K_pad bits / 8 bytes) once
    # per chunk of MAX_M rows
    xp = x if qw.perm is None else x.index_select(1, qw.perm)
    if qw.K_pad > K:
        xp = F.pad(xp, (0, qw.K_pad - K))
    xp = xp.contiguous()
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)
    for i in range(0, M, MAX_M):
        fn(xp[i:i + MAX_M], qw.planes, qw.scales, qw.zeros, qw.codebook, y[i:i + MAX_M],
           N, qw.K_pad, qw.bits, qw.gs, mode)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _validate_call(x, qw, out, mode, backend):
    if not isinstance(qw, LUTWeight):
        raise TypeError(f"qw: expected a pykernels.LUTWeight (from pk.quantize_weight or "
                        f"LUTWeight.from_gptq/from_awq), got {type(qw).__name__}")
    from .attention import _as_tensor

    x = _as_tensor(x, "x")
    N, K = qw.shape
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x: expected dtype float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() not in (1, 2):
        raise ValueError(f"x: expected [K] or [M, K] with K={K}, got shape {tuple(x.shape)}")
    if x.shape[-1] != K:
        raise ValueError(f"x: last dimension {x.shape[-1]} differs from the weight's in_features K={K} "
                         f"(qw.shape = {qw.shape})")
    if x.device != qw.device:
        raise ValueError(f"x: on {x.device}, but qw is on {qw.device} (use qw.to(device))")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    if out is not None:
        check_out(out, tuple(x.shape[:-1]) + (N,), x)
    return x


def lut_gemv(x, qw, *, backend="auto", out=None, mode="int8"):
    r"""``y = x @ W^T`` with W a low-bit ``LUTWeight``, by table lookup (T-MAC).

    .. math:: y_{m,n} = \sum_k x_{m,k} W_{n,k}, \qquad
              \sum_{k \in g} q_k x_k = \tfrac{2^b - 1}{2} S_g + \tfrac12 \sum_i 2^i \sum_{a \in g} T_a[\mathrm{idx}_{i,a}]

    For every group a of 4 activations a 16-entry table T_a[idx] = sum_j (+-1) x_j is built once
    per row of x and indexed by the 4-bit patterns of each weight bit plane (see
    ``pykernels.lut_format``); rows of x share every weight byte read (M <= 16 per pass; larger
    M is split).

    Parameters
    ----------
    x : Tensor [K] or [M, K], float32 / bfloat16 / float16, on qw's device (any strides).
    qw : LUTWeight [N, K].
    backend : "auto", "cpu", "cuda", "triton" or "reference" (see ``pykernels.backends``;
        "auto" never picks the slow reference).
    out : optional Tensor [N] or [M, N] of x's dtype, written.
    mode : "int8" (tables quantized to int8 with one scale per row of x and block of <= 128 k,
        the fast T-MAC path; error per table lookup <= half that scale) or "exact" (fp32
        tables: the float64 result up to fp32 rounding). Codebook weights are computed exactly
        in either mode where the backend documents so.

    Returns
    -------
    y : [N] or [M, N] in x's dtype (``out`` when given).

    Example
    -------
    >>> qw = pk.quantize_weight(torch.randn(4096, 4096), bits=4, group_size=128)
    >>> y = pk.lut_gemv(torch.randn(4, 4096), qw)           # [4, 4096]
    """
    x = _validate_call(x, qw, out, mode, backend)
    x2 = x.reshape(1, -1) if x.dim() == 1 else x
    if torch.compiler.is_compiling():
        y = torch.ops.pykernels.lut_gemv(x2, qw.planes, qw.scales, qw.zeros, qw.codebook, qw.perm,
                                         qw.shape[0], qw.shape[1], qw.bits, qw.group_size, qw.scheme,
                                         mode, backend)
    else:
        y = _lut_gemv_2d(x2, qw, backend, mode)
    y = y.reshape(qw.shape[0]) if x.dim() == 1 else y
    if out is not None:
        out.copy_(y)
        return out
    return y


# --------------------------------------------------------------------------------------------
# nn.Module
# --------------------------------------------------------------------------------------------
_QW_BUFFERS = ("planes", "scales", "zeros", "codebook", "perm")
#: every key LUTWeight.state_dict writes (the stored tensors, then its header fields)
STATE_KEYS = frozenset(_QW_BUFFERS + ("meta", "scheme"))


class LUTLinear(nn.Module):
    """``nn.Linear`` with a low-bit LUT-GEMV weight: y = x @ W^T + b for x [..., in_features].

    The packed tensors are buffers (they follow ``.to(device)`` and ``state_dict``); ``weight``
    returns the dequantized float32 matrix. Inference only (no gradients).

    Example
    -------
    >>> layer = pk.LUTLinear.from_linear(nn.Linear(4096, 11008), bits=4, group_size=128)
    >>> y = layer(torch.randn(2, 7, 4096))                  # [2, 7, 11008]
    """

    def __init__(self, qw: LUTWeight, bias: Optional[torch.Tensor] = None, *, mode="int8", backend="auto"):
        super().__init__()
        if not isinstance(qw, LUTWeight):
            raise TypeError(f"qw: expected a LUTWeight, got {type(qw).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"backend: expected one of {('auto',) + backends.BACKENDS}, got {backend!r}")
        self.out_features, self.in_features = qw.shape
        self.bits, self.group_size, self.scheme = qw.bits, qw.group_size, qw.scheme
        self.mode, self.backend = mode, backend
        for k in _QW_BUFFERS:
            self.register_buffer(k, getattr(qw, k))
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias: expected a tensor [{self.out_features}], got "
                                 f"{getattr(bias, 'shape', type(bias).__name__)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._qw = qw

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits=4, group_size=128, scheme="affine", mode="int8",
                    backend="auto", **kw) -> "LUTLinear":
        """Quantize ``linear.weight`` with ``quantize_weight(w, bits, group_size, scheme, **kw)``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        qw = quantize_weight(linear.weight.detach(), bits=bits, group_size=group_size, scheme=scheme, **kw)
        return cls(qw, linear.bias, mode=mode, backend=backend)

    def _apply(self, fn, recurse=True):
        """``.to()`` / ``.half()`` / ``.cuda()``: the packed buffers follow device moves but keep
        their dtypes (fp16 scales and zeros, fp32 codebook are part of the format; a cast would
        round them), so a whole-model ``model.to(torch.bfloat16)`` leaves the weight exact. The
        bias follows the cast (it is applied in the activations' dtype anyway)."""
        before = {k: getattr(self, k) for k in _QW_BUFFERS}
        super()._apply(fn, recurse)
        for k, old in before.items():
            new = getattr(self, k)
            if new is not None and old is not None and new.dtype != old.dtype:
                self._buffers[k] = old.to(device=new.device)  # the original values, moved only
        return self

    @property
    def qweight(self) -> LUTWeight:
        """The LUTWeight over the current buffers (rebuilt after ``.to()`` moved them)."""
        qw = self._qw
        if not all(getattr(qw, k) is getattr(self, k) for k in _QW_BUFFERS):
            qw = LUTWeight(*(getattr(self, k) for k in _QW_BUFFERS[:4]), shape=(self.out_features, self.in_features),
                           bits=self.bits, group_size=self.group_size, scheme=self.scheme, perm=self.perm)
            self._qw = qw
        return qw

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight [out_features, in_features] float32."""
        return self.qweight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected [..., {self.in_features}], got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = lut_gemv(x.reshape(-1, self.in_features), self.qweight, backend=self.backend, mode=self.mode)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size == -1 else self.group_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"scheme={self.scheme!r}, group_size={g}, mode={self.mode!r}, bias={self.bias is not None}, "
                f"bits_per_weight={self.qweight.bits_per_weight:.3f}")
