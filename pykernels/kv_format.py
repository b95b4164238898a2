"""The quantized KV-cache format (KIVI-style int8/int4/int2, and fp8 e4m3).

This module is the single definition of the storage format. The cache class
(``pykernels.kv_cache.QuantizedKVCache``), the CPU, Triton and CUDA kernels and the references
all follow it; ``csrc/include/pykernels/kv_quant.h`` is its C++ twin.

Token regions
-------------
Sequence b holds ``L = n_sink[b] + n_quant[b] + n_res[b]`` tokens, in this order:

* tokens ``[0, n_sink)``: attention-sink tokens kept in full precision (fp rows ``0 .. n_sink-1``);
* tokens ``[n_sink, n_sink + n_quant)``: the quantized store; ``n_quant`` is a multiple of the
  group size ``gs``;
* the rest: the full-precision residual window of the most recent tokens (fp rows
  ``n_sink .. n_sink + n_res - 1``).

The full-precision rows live in ``fp_k``, ``fp_v`` [B, F, Hkv, D] (the cache dtype), with
``F = sink + residual``. Quantized token u (0-based within the store) of sequence b lives in page
``block_table[b, u // S]`` at slot ``u % S``, where S (``page_tokens``) is a multiple of gs. A
dense cache is the special case ``block_table[b] = [b]``, one page of the whole capacity per
sequence.

Quantized store (per page p, kv-head h)
---------------------------------------
Integer formats (``bits`` 8, 4, 2), asymmetric round-to-nearest, x ~= scale * c + zero with
c in [0, 2**bits), scale and zero float16, computed in float32 as:

* keys, per channel, groups of gs tokens (KIVI): for the group of slots [j gs, (j+1) gs) and
  channel d, ``k_scale[p, h, j, d]``, ``k_zero[p, h, j, d]``  -> [P, Hkv, S // gs, D];
* values, per token, groups of gs channels: for slot s and channel group c (channels
  [c gs, min((c+1) gs, D))), ``v_scale[p, h, s, c]``, ``v_zero[p, h, s, c]`` -> [P, Hkv, S, NG],
  NG = ceil(D / gs).

Codes: ``k_codes``, ``v_codes`` uint8 [P, Hkv, S, D * bits // 8] (D is a multiple of 8). Code of
channel d of a row sits at byte ``d * bits // 8``, bit offset ``(d * bits) % 8`` (little-endian
within the byte: 4-bit: even d in the low nibble; 2-bit: d % 4 == 0 in bits 0-1).

Quantizer (both kinds of group): mn, mx = min, max of the group; ``zero = fp16(mn)`` rounded
toward -inf, ``scale = fp16((mx - zero) / (2**bits - 1))`` rounded toward +inf (so no code is
clamped: |error| <= scale / 2); ``c = clamp(round((x - zero) / scale), 0, 2**bits-1)`` using those
float16 values (c = 0 where scale == 0), so dequantization reproduces what the quantizer saw.

fp8: codes are float8 e4m3fn bytes [P, Hkv, S, D]; x ~= scale * e4m3(c) with one float32 scale
per (page, kv-head, group of gs tokens) for keys and for values (``k_scale``, ``v_scale``
[P, Hkv, S // gs]), ``scale = amax / 448`` (1 when amax == 0); no zeros.

Kernel entry point (CPU ``_C``, CUDA ``_cuda`` / ``pykernels.cuda.kv_attention``, Triton
``pykernels.triton.kv_attention``; all take the same arguments)
---------------------------------------------------------------
``decode_attention_kv(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fp_k, fp_v,
block_table, n_sink, n_quant, n_res, out, lse, scale, fmt, group_size, method, num_splits,
num_workers, tile)``

* q [B, Hq, D] float32/float16/bfloat16; out [B, Hq, D] contiguous (q's dtype); lse [B, Hq] float32.
* the six store tensors as above (k_zero, v_zero None for fp8); fp_k, fp_v [B, F, Hkv, D]
  (float32/float16/bfloat16, head_dim contiguous); block_table int32 [B, max_pages];
  n_sink, n_quant, n_res int32 [B]; fmt one of "int8", "int4", "int2", "fp8".
* One call attends every sequence over all three regions (sink, quantized, residual) with the
  lean / split schedule over L = n_sink + n_quant + n_res tokens (``tile`` tokens per unit;
  the Python layer passes a multiple of group_size), merging states inside the call.
"""
from __future__ import annotations

import numbers

import torch

FORMATS = (8, 4, 2, "fp8")
GROUP_SIZES = (32, 64, 128)
FP8_MAX = 448.0
FP16_MAX = 65504.0


def format_name(bits) -> str:
    """'int8' / 'int4' / 'int2' / 'fp8' (the name the native launchers take)."""
    return "fp8" if bits == "fp8" else f"int{bits}"


def row_bytes(bits, D: int) -> int:
    """Bytes of one quantized token row (one kv-head)."""
    return D if bits == "fp8" else D * bits // 8


def num_value_groups(D: int, gs: int) -> int:
    return -(-D // gs)


# ---------------------------------------------------------------- bit packing

def pack_codes(c: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] (values < 2**bits) -> packed uint8 [..., D * bits // 8]."""
    if bits == 8:
        return c.to(torch.uint8)
    per = 8 // bits
    c = c.to(torch.uint8).reshape(*c.shape[:-1], c.shape[-1] // per, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=c.device)
    for j in range(per):
        out |= c[..., j] << (j * bits)
    return out


def unpack_codes(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed uint8 [..., nbytes] -> codes uint8 [..., nbytes * 8 // bits]."""
    if bits == 8:
        return p
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(p >> (j * bits)) & mask for j in range(per)]
    return torch.stack(parts, dim=-1).reshape(*p.shape[:-1], p.shape[-1] * per)


# ---------------------------------------------------------------- integer formats

def _fp16_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """float32 -> float16 rounded toward -inf (direction < 0) or +inf (direction > 0)."""
    h = x.to(torch.float16)
    off = (h.float() > x) if direction < 0 else (h.float() < x)
    return torch.where(off, torch.nextafter(h, torch.full_like(h, direction * float("inf"))), h)


def _affine_params(mn: torch.Tensor, mx: torch.Tensor, bits: int):
    # zero rounded down and scale rounded up (in float16) so [mn, mx] stays inside
    # [zero, zero + (2**bits - 1) * scale]: no code is clamped and every error is <= scale / 2.
    zero = _fp16_toward(mn, -1)
    scale = _fp16_toward((mx - zero.float()) / (2 ** bits - 1), +1)
    return scale, zero


def _affine_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    c = torch.round((x - zero.float()) / safe).clamp_(0, 2 ** bits - 1)
    return torch.where(s > 0, c, torch.zeros_like(c)).to(torch.uint8)


def quantize_keys(k: torch.Tensor, bits: int, gs: int):
    """Keys [..., T, D] (T a multiple of gs) -> (codes [..., T, D*bits/8] uint8,
    scale, zero float16 [..., T // gs, D]): per channel, groups of gs tokens."""
    *lead, T, D = k.shape
    x = k.float().reshape(*lead, T // gs, gs, D)
    scale, zero = _affine_params(x.amin(dim=-2), x.amax(dim=-2), bits)
    c = _affine_codes(x, scale.unsqueeze(-2), zero.unsqueeze(-2), bits).reshape(*lead, T, D)
    return pack_codes(c, bits), scale, zero


def dequantize_keys(codes, scale, zero, bits: int, gs: int, D: int) -> torch.Tensor:
    """Inverse of ``quantize_keys`` -> float32 [..., T, D]."""
    c = unpack_codes(codes, bits)[..., :D].float()
    *lead, T, _ = c.shape
    c = c.reshape(*lead, T // gs, gs, D)
    return (scale.float().unsqueeze(-2) * c + zero.float().unsqueeze(-2)).reshape(*lead, T, D)


def quantize_values(v: torch.Tensor, bits: int, gs: int):
    """Values [..., T, D] -> (codes [..., T, D*bits/8] uint8, scale, zero float16 [..., T, NG]):
    per token, groups of gs channels (the last group may be shorter)."""
    *lead, T, D = v.shape
    NG = num_value_groups(D, gs)
    x = v.float()
    mn = torch.stack([x[..., g * gs:(g + 1) * gs].amin(dim=-1) for g in range(NG)], dim=-1)
    mx = torch.stack([x[..., g * gs:(g + 1) * gs].amax(dim=-1) for g in range(NG)], dim=-1)
    scale, zero = _affine_params(mn, mx, bits)
    idx = torch.arange(D, device=v.device) // gs
    c = _affine_codes(x, scale[..., idx], zero[..., idx], bits)
    return pack_codes(c, bits), scale, zero


def dequantize_values(codes, scale, zero, bits: int, gs: int, D: int) -> torch.Tensor:
    """Inverse of ``quantize_values`` -> float32 [..., T, D]."""
    c = unpack_codes(codes, bits)[..., :D].float()
    idx = torch.arange(D, device=codes.device) // gs
    return scale.float()[..., idx] * c + zero.float()[..., idx]


# ---------------------------------------------------------------- fp8 e4m3

def quantize_fp8(x: torch.Tensor, gs: int):
    """[..., T, D] (T a multiple of gs) -> (codes uint8 [..., T, D] (e4m3fn bits),
    scale float32 [..., T // gs]): one scale per group of gs tokens (all D channels)."""
    *lead, T, D = x.shape
    xf = x.float().reshape(*lead, T // gs, gs, D)
    amax = xf.abs().amax(dim=(-1, -2))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    y = (xf / scale[..., None, None]).clamp_(-FP8_MAX, FP8_MAX)
    codes = y.to(torch.float8_e4m3fn).view(torch.uint8).reshape(*lead, T, D)
    return codes, scale


def fp8_e4m3_to_float(codes: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3fn bits -> float32 (the same bit rule as kv_quant.h: via float16 bits)."""
    c = codes.to(torch.int32)
    h = ((c & 0x80) << 8) | ((c & 0x7F) << 7)
    return h.to(torch.int16).view(torch.float16).float() * 256.0


def dequantize_fp8(codes, scale, gs: int) -> torch.Tensor:
    *lead, T, D = codes.shape
    x = fp8_e4m3_to_float(codes).reshape(*lead, T // gs, gs, D)
    return (x * scale.float()[..., None, None]).reshape(*lead, T, D)


# ---------------------------------------------------------------- one entry point

def quantize_kv(k: torch.Tensor, v: torch.Tensor, bits, gs: int):
    """Quantize whole groups: k, v [..., T, D] -> dict of the per-field tensors
    (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero; zeros None for fp8)."""
    if bits == "fp8":
        kc, ks = quantize_fp8(k, gs)
        vc, vs = quantize_fp8(v, gs)
        return dict(k_codes=kc, k_scale=ks, k_zero=None, v_codes=vc, v_scale=vs, v_zero=None)
    kc, ks, kz = quantize_keys(k, bits, gs)
    vc, vs, vz = quantize_values(v, bits, gs)
    return dict(k_codes=kc, k_scale=ks, k_zero=kz, v_codes=vc, v_scale=vs, v_zero=vz)


def dequantize_kv(f: dict, bits, gs: int, D: int):
    """Inverse of ``quantize_kv`` -> (k, v) float32 [..., T, D]."""
    if bits == "fp8":
        return dequantize_fp8(f["k_codes"], f["k_scale"], gs), dequantize_fp8(f["v_codes"], f["v_scale"], gs)
    return (dequantize_keys(f["k_codes"], f["k_scale"], f["k_zero"], bits, gs, D),
            dequantize_values(f["v_codes"], f["v_scale"], f["v_zero"], bits, gs, D))


def bytes_per_token(bits, gs: int, Hkv: int, D: int) -> float:
    """Bytes per token per layer of the quantized store (codes + scales + zeros, K and V)."""
    if bits == "fp8":
        return 2 * Hkv * (D + 4.0 / gs)
    k = D * bits / 8 + 2 * 2 * D / gs                  # codes + fp16 scale, zero per channel / gs tokens
    v = D * bits / 8 + 2 * 2 * num_value_groups(D, gs)  # codes + fp16 scale, zero per channel group
    return Hkv * (k + v)


def check_format(bits, group_size: int, head_dim: int) -> None:
    """ValueError naming the argument for an unsupported combination."""
    if bits not in FORMATS:
        raise ValueError(f"bits: expected one of 8, 4, 2 or 'fp8', got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {GROUP_SIZES}, got {group_size!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or head_dim < 8 or head_dim % 8 or head_dim > 512:
        raise ValueError(f"head_dim: expected a multiple of 8 in [8, 512], got {head_dim!r}")
