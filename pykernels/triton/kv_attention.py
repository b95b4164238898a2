"""Triton decode attention over the quantized KV cache (issue 4): the kernel reads the stored
bytes (int8 / int4 / int2 codes with fp16 scale/zero, or fp8 e4m3 codes with fp32 scales) and
dequantizes them in registers inside the attention loop; no dequantized copy of the cache and
no Python concatenation of the three token regions is ever made.

The storage format and the entry point's arguments are defined in ``pykernels/kv_format.py``.
Sequence b holds L = n_sink + n_quant + n_res tokens, ordered sink | quantized | residual. The
schedules are those of ``pykernels.triton.decode_attention`` (and ``lean_plan.h``), run over
the L tokens of every segment (b, kv-head h) in tiles of ``tile`` tokens:

- ``"split"``: grid (b, h, chunk); chunk c of S' = min(S, ceil(L / tile)) covers tiles
  [floor(n c / S'), floor(n (c+1) / S')); partial states are combined by the reused
  ``_split_merge_kernel``;
- ``"lean"``: W programs own equal ranges of the global tile list, crossing segment
  boundaries; partials go to slots 2w / 2w+1 and the reused ``_lean_merge_kernel`` combines them.

A program's token range [tok_lo, tok_hi) is cut at the region boundaries into at most three
loops that share one online-softmax state (m, l, acc):

- sink tokens [tok_lo, min(tok_hi, n_sink)) -> fp rows of the same index;
- quantized tokens -> store tokens u = t - n_sink, walked in blocks of BQ tokens aligned to BQ
  in u (BQ divides gs, which divides the page size S), so a block lies in one page and one key
  group: one block-table lookup and one key scale/zero row (int) or one key and one value
  scale (fp8) per block. Codes are loaded as bytes (byte d * bits // 8 of the row for channel d)
  and unpacked with a shift by (d * bits) % 8 and a mask; fp8 bytes are decoded by the bit rule
  of ``kv_format.fp8_e4m3_to_float`` (fp16 bits ((b & 0x80) << 8) | ((b & 0x7f) << 7), bitcast,
  times 256), no fp8 dtype is involved;
- residual tokens [max(tok_lo, n_sink + n_quant), tok_hi) -> fp rows t - n_quant.

Each program handles the G = Hq / Hkv query heads of its kv-head together ([G_PAD, D_PAD] q
block), so every code byte / scale / fp row is loaded once for all G heads. Dequantized values
and dots are fp32 ("ieee" dots, no tf32, no rounding of K/V or probabilities to 16 bits): the
result differs from attention over ``kv_format.dequantize_kv`` of the store only by fp32
summation order (and an FMA in the affine dequantization).
"""

from __future__ import annotations

import math
import operator

from ._runtime import IMPORT_ERROR as _IMPORT_ERROR, INTERPRET as _INTERPRET, tl, triton  # noqa: F401
from ._runtime import available as _available, launch_on_device
from .decode_attention import merge_block

_FMT_BITS = {"int8": 8, "int4": 4, "int2": 2, "fp8": 0}  # 0: fp8 (the KvFormat code of kv_quant.h)
MAX_HEAD_DIM = 256


def available() -> tuple[bool, str]:
    """(True, how) if these kernels can run here, else (False, reason). Never raises."""
    return _available("pykernels.triton.kv_attention")


if triton is not None:
    # shared with the bf16 decode attention: q load, final / partial stores, the lean
    # partition, and both merge kernels (they only need L per sequence and the tile cum sums)
    from .decode_attention import (_LOG2E, _lean_begin, _lean_merge_kernel, _lean_segment, _load_q,  # noqa: F401
                                   _split_merge_kernel, _store_final, _store_partial)

    @triton.jit
    def _online_update(m, l, acc, s, v, valid):
        """Fold one block into the state: s [G_PAD, N] scores (log2 units, already scaled),
        v [N, D_PAD] fp32 values, valid [N] token mask (each block has >= 1 valid token)."""
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)  # m = -inf before the first block -> 0
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        return m_new, l, acc

    @triton.jit
    def _fp_rows(q, m, l, acc, fpk_ptr, fpv_ptr, b, h, r_lo, r_hi, qk_scale,
                 s_fkb, s_fkt, s_fkh, s_fvb, s_fvt, s_fvh,
                 BF: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
        """Full-precision rows [r_lo, r_hi) of fp_k / fp_v [B, F, Hkv, D] (sink or residual)."""
        offs_n = tl.arange(0, BF)
        offs_d = tl.arange(0, D_PAD)
        dmask = offs_d < D
        kbase = fpk_ptr + b * s_fkb + h * s_fkh
        vbase = fpv_ptr + b * s_fvb + h * s_fvh
        for start in range(r_lo, r_hi, BF):
            r = start + offs_n
            rmask = r < r_hi  # never touch a row past the region (tests fill them with NaN)
            msk = rmask[:, None] & dmask[None, :]
            k = tl.load(kbase + r[:, None] * s_fkt + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            v = tl.load(vbase + r[:, None] * s_fvt + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
            m, l, acc = _online_update(m, l, acc, s, v, rmask)
        return m, l, acc

    @triton.jit
    def _unpack(codes, offs_d, BITS: tl.constexpr):
        """Bytes loaded at byte d * BITS // 8 for channel d -> integer codes as fp32."""
        if BITS == 8:
            return codes.to(tl.float32)
        else:
            shift = ((offs_d * BITS) % 8)[None, :]
            return ((codes.to(tl.int32) >> shift) & ((1 << BITS) - 1)).to(tl.float32)

    @triton.jit
    def _fp8_decode(codes):
        """uint8 e4m3fn bits -> fp32, by the kv_quant.h bit rule (via binary16 bits, * 256)."""
        c = codes.to(tl.int32)
        hb = ((c & 0x80) << 8) | ((c & 0x7F) << 7)
        return hb.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0

    @triton.jit
    def _quant_rows(q, m, l, acc, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, bt_ptr,
                    b, h, u_lo, u_hi, qk_scale, page_tokens,
                    s_kcp, s_kch, s_kcs, s_vcp, s_vch, s_vcs,
                    s_ksp, s_ksh, s_ksj, s_kzp, s_kzh, s_kzj,
                    s_vsp, s_vsh, s_vss, s_vzp, s_vzh, s_vzs,
                    s_btb, s_btj,
                    BITS: tl.constexpr, GS: tl.constexpr, BQ: tl.constexpr,
                    D: tl.constexpr, D_PAD: tl.constexpr):
        """Quantized store tokens [u_lo, u_hi) of sequence b, kv-head h (u: index in the store).

        Blocks are aligned to BQ in u (BQ | GS | page_tokens): block [ub, ub + BQ) is in page
        block_table[b, ub // S] at slots ub % S .., in key group (ub % S) // GS."""
        offs_n = tl.arange(0, BQ)
        offs_d = tl.arange(0, D_PAD)
        dmask = offs_d < D
        if BITS == 0:
            byte_d = offs_d
        else:
            byte_d = (offs_d * BITS) // 8  # byte of channel d inside a packed row
        for ub in range(u_lo - u_lo % BQ, u_hi, BQ):
            u = ub + offs_n
            umask = (u >= u_lo) & (u < u_hi)
            page = tl.load(bt_ptr + b * s_btb + (ub // page_tokens) * s_btj).to(tl.int64)
            slot0 = ub % page_tokens
            slot = slot0 + offs_n
            j = slot0 // GS  # key group (and fp8 value group) of the whole block
            msk = umask[:, None] & dmask[None, :]
            kc = tl.load(kc_ptr + page * s_kcp + h * s_kch + slot[:, None] * s_kcs + byte_d[None, :],
                         mask=msk, other=0)
            vc = tl.load(vc_ptr + page * s_vcp + h * s_vch + slot[:, None] * s_vcs + byte_d[None, :],
                         mask=msk, other=0)
            if BITS == 0:
                # fp8: one fp32 scale per (page, kv-head, group of GS tokens), for K and for V
                ks = tl.load(ks_ptr + page * s_ksp + h * s_ksh + j * s_ksj)
                vs = tl.load(vs_ptr + page * s_vsp + h * s_vsh + j * s_vss)
                k = _fp8_decode(kc) * ks
                v = _fp8_decode(vc) * vs
            else:
                # keys: per-channel scale / zero of the block's group of GS tokens
                ks = tl.load(ks_ptr + page * s_ksp + h * s_ksh + j * s_ksj + offs_d, mask=dmask, other=0.0)
                kz = tl.load(kz_ptr + page * s_kzp + h * s_kzh + j * s_kzj + offs_d, mask=dmask, other=0.0)
                k = _unpack(kc, offs_d, BITS) * ks.to(tl.float32)[None, :] + kz.to(tl.float32)[None, :]
                # values: per-token scale / zero of channel group d // GS
                grp = (offs_d // GS)[None, :]
                vs = tl.load(vs_ptr + page * s_vsp + h * s_vsh + slot[:, None] * s_vss + grp, mask=msk, other=0.0)
                vz = tl.load(vz_ptr + page * s_vzp + h * s_vzh + slot[:, None] * s_vzs + grp, mask=msk, other=0.0)
                v = _unpack(vc, offs_d, BITS) * vs.to(tl.float32) + vz.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            m, l, acc = _online_update(m, l, acc, s, v, umask)
        return m, l, acc

    @triton.jit
    def _attend_kv(q, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, fpk_ptr, fpv_ptr, bt_ptr,
                   b, h, tok_lo, tok_hi, ns, nq, qk_scale, page_tokens,
                   s_kcp, s_kch, s_kcs, s_vcp, s_vch, s_vcs,
                   s_ksp, s_ksh, s_ksj, s_kzp, s_kzh, s_kzj,
                   s_vsp, s_vsh, s_vss, s_vzp, s_vzh, s_vzs,
                   s_fkb, s_fkt, s_fkh, s_fvb, s_fvt, s_fvh, s_btb, s_btj,
                   BITS: tl.constexpr, GS: tl.constexpr, BQ: tl.constexpr, BF: tl.constexpr,
                   D: tl.constexpr, D_PAD: tl.constexpr, G_PAD: tl.constexpr):
        """Unnormalised online-softmax state (m in log2 units, l, acc) of the G heads over
        tokens [tok_lo, tok_hi) of sequence b (tok_hi <= L), through the three regions."""
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        q_end = ns + nq
        # sink: fp rows t
        m, l, acc = _fp_rows(q, m, l, acc, fpk_ptr, fpv_ptr, b, h, tok_lo, tl.minimum(tok_hi, ns),
                             qk_scale, s_fkb, s_fkt, s_fkh, s_fvb, s_fvt, s_fvh, BF, D, D_PAD)
        # quantized store: u = t - ns
        m, l, acc = _quant_rows(q, m, l, acc, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, bt_ptr,
                                b, h, tl.maximum(tok_lo, ns) - ns, tl.minimum(tok_hi, q_end) - ns,
                                qk_scale, page_tokens,
                                s_kcp, s_kch, s_kcs, s_vcp, s_vch, s_vcs,
                                s_ksp, s_ksh, s_ksj, s_kzp, s_kzh, s_kzj,
                                s_vsp, s_vsh, s_vss, s_vzp, s_vzh, s_vzs,
                                s_btb, s_btj, BITS, GS, BQ, D, D_PAD)
        # residual: fp rows t - nq
        m, l, acc = _fp_rows(q, m, l, acc, fpk_ptr, fpv_ptr, b, h, tl.maximum(tok_lo, q_end) - nq,
                             tok_hi - nq, qk_scale, s_fkb, s_fkt, s_fkh, s_fvb, s_fvt, s_fvh, BF, D, D_PAD)
        return m, l, acc

    @triton.jit
    def _kv_split_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, fpk_ptr, fpv_ptr, bt_ptr,
                         ns_ptr, nq_ptr, len_ptr, out_ptr, lse_ptr, po_ptr, plse_ptr,
                         qk_scale, num_splits, page_tokens,
                         stride_qb, stride_qh, stride_qd,
                         s_kcp, s_kch, s_kcs, s_vcp, s_vch, s_vcs,
                         s_ksp, s_ksh, s_ksj, s_kzp, s_kzh, s_kzj,
                         s_vsp, s_vsh, s_vss, s_vzp, s_vzh, s_vzs,
                         s_fkb, s_fkt, s_fkh, s_fvb, s_fvt, s_fvh, s_btb, s_btj,
                         stride_ob, stride_oh, stride_lb,
                         HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                         G_PAD: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr,
                         BITS: tl.constexpr, GS: tl.constexpr, BQ: tl.constexpr, BF: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        c = tl.program_id(2).to(tl.int64)
        L = tl.load(len_ptr + b).to(tl.int64)
        n = (L + TILE - 1) // TILE
        sp = tl.minimum(n, num_splits)  # S' = min(S, n)
        if c < sp:
            tok_lo = (n * c // sp) * TILE
            tok_hi = tl.minimum((n * (c + 1) // sp) * TILE, L)
            ns = tl.load(ns_ptr + b).to(tl.int64)
            nq = tl.load(nq_ptr + b).to(tl.int64)
            q = _load_q(q_ptr, b, h, stride_qb, stride_qh, stride_qd, G, D, G_PAD, D_PAD, True)
            m, l, acc = _attend_kv(q, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, fpk_ptr, fpv_ptr, bt_ptr,
                                   b, h, tok_lo, tok_hi, ns, nq, qk_scale, page_tokens,
                                   s_kcp, s_kch, s_kcs, s_vcp, s_vch, s_vcs,
                                   s_ksp, s_ksh, s_ksj, s_kzp, s_kzh, s_kzj,
                                   s_vsp, s_vsh, s_vss, s_vzp, s_vzh, s_vzs,
                                   s_fkb, s_fkt, s_fkh, s_fvb, s_fvt, s_fvh, s_btb, s_btj,
                                   BITS, GS, BQ, BF, D, D_PAD, G_PAD)
            if sp == 1:
                _store_final(out_ptr, lse_ptr, b, h, m, l, acc, stride_ob, stride_oh, stride_lb,
                             G, D, G_PAD, D_PAD)
            else:
                _store_partial(po_ptr, plse_ptr, (b * HKV + h) * num_splits + c, m, l, acc,
                               G, D, G_PAD, D_PAD)

    @triton.jit
    def _kv_lean_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, fpk_ptr, fpv_ptr, bt_ptr,
                        ns_ptr, nq_ptr, len_ptr, cum_ptr, out_ptr, lse_ptr, po_ptr, plse_ptr,
                        qk_scale, nseg, num_workers, page_tokens,
                        stride_qb, stride_qh, stride_qd,
                        s_kcp, s_kch, s_kcs, s_vcp, s_vch, s_vcs,
                        s_ksp, s_ksh, s_ksj, s_kzp, s_kzh, s_kzj,
                        s_vsp, s_vsh, s_vss, s_vzp, s_vzh, s_vzs,
                        s_fkb, s_fkt, s_fkh, s_fvb, s_fvt, s_fvh, s_btb, s_btj,
                        stride_ob, stride_oh, stride_lb,
                        HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                        G_PAD: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr,
                        BITS: tl.constexpr, GS: tl.constexpr, BQ: tl.constexpr, BF: tl.constexpr):
        # the walk of decode_attention._lean_kernel; cum: [nseg + 1] int64 exclusive prefix sum
        # of ceil(L / TILE) tiles per segment s = b * HKV + h
        w = tl.program_id(0).to(tl.int64)
        total = tl.load(cum_ptr + nseg)
        gb = _lean_begin(total, w, num_workers)
        ge = _lean_begin(total, w + 1, num_workers)
        g = gb
        s = _lean_segment(cum_ptr, nseg, gb)
        while g < ge:
            seg_b = tl.load(cum_ptr + s)
            seg_e = tl.load(cum_ptr + s + 1)
            end = tl.minimum(seg_e, ge)
            b = s // HKV
            h = s % HKV
            L = tl.load(len_ptr + b).to(tl.int64)
            ns = tl.load(ns_ptr + b).to(tl.int64)
            nq = tl.load(nq_ptr + b).to(tl.int64)
            tok_lo = (g - seg_b) * TILE
            tok_hi = tl.minimum((end - seg_b) * TILE, L)
            q = _load_q(q_ptr, b, h, stride_qb, stride_qh, stride_qd, G, D, G_PAD, D_PAD, True)
            m, l, acc = _attend_kv(q, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, fpk_ptr, fpv_ptr, bt_ptr,
                                   b, h, tok_lo, tok_hi, ns, nq, qk_scale, page_tokens,
                                   s_kcp, s_kch, s_kcs, s_vcp, s_vch, s_vcs,
                                   s_ksp, s_ksh, s_ksj, s_kzp, s_kzh, s_kzj,
                                   s_vsp, s_vsh, s_vss, s_vzp, s_vzh, s_vzs,
                                   s_fkb, s_fkt, s_fkh, s_fvb, s_fvt, s_fvh, s_btb, s_btj,
                                   BITS, GS, BQ, BF, D, D_PAD, G_PAD)
            if (g == seg_b) & (end == seg_e):
                _store_final(out_ptr, lse_ptr, b, h, m, l, acc, stride_ob, stride_oh, stride_lb,
                             G, D, G_PAD, D_PAD)
            else:
                # lean_partial_slot: 2w at the worker's first tile, 2w+1 for a piece starting at
                # a segment start inside the range
                slot = 2 * w + (gb < seg_b).to(tl.int64)
                _store_partial(po_ptr, plse_ptr, slot, m, l, acc, G, D, G_PAD, D_PAD)
            g = end
            s = s + 1


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _as_int(x, name, lo=None):
    try:
        if isinstance(x, bool):
            raise TypeError
        v = operator.index(x)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}") from None
    if lo is not None and v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v}")
    return v


def _validate(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fp_k, fp_v, block_table,
              n_sink, n_quant, n_res, out, lse, scale, fmt, group_size, method, num_splits,
              num_workers, tile):
    """Check every argument (shapes, dtypes, devices, counts); errors name the argument.
    Returns (bits, gs, scale, num_splits, num_workers, tile). Reads the counts on the host."""
    import torch

    from .. import kv_format

    named = dict(q=q, k_codes=k_codes, k_scale=k_scale, v_codes=v_codes, v_scale=v_scale, fp_k=fp_k,
                 fp_v=fp_v, block_table=block_table, n_sink=n_sink, n_quant=n_quant, n_res=n_res,
                 out=out, lse=lse)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not isinstance(fmt, str) or fmt not in _FMT_BITS:
        raise ValueError(f"fmt: expected one of 'int8', 'int4', 'int2', 'fp8', got {fmt!r}")
    bits = _FMT_BITS[fmt]
    gs = _as_int(group_size, "group_size")
    if gs not in kv_format.GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {kv_format.GROUP_SIZES}, got {gs}")
    if bits == 0:
        for name, t in (("k_zero", k_zero), ("v_zero", v_zero)):
            if t is not None:
                raise ValueError(f"{name}: must be None for fmt 'fp8' (fp8 has no zero points)")
    else:
        for name, t in (("k_zero", k_zero), ("v_zero", v_zero)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor for fmt {fmt!r}, got {type(t).__name__}")
        named.update(k_zero=k_zero, v_zero=v_zero)
    dev = q.device
    if dev.type != "cuda" and not _INTERPRET:
        raise ValueError(f"q: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), q is on {dev}")
    for name, t in named.items():
        if t.device != dev:
            raise ValueError(f"{name}: on {t.device}, but q is on {dev}")

    floats = (torch.float32, torch.float16, torch.bfloat16)
    if q.dim() != 3:
        raise ValueError(f"q: expected [batch, num_heads, head_dim], got shape {tuple(q.shape)}")
    if q.dtype not in floats:
        raise TypeError(f"q: expected float32, float16 or bfloat16, got {q.dtype}")
    B, Hq, D = q.shape
    if B < 1 or Hq < 1:
        raise ValueError(f"q: batch and num_heads must be >= 1, got shape {tuple(q.shape)}")
    if D < 8 or D % 8 or D > MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {D}")

    for name, t in (("k_codes", k_codes), ("v_codes", v_codes)):
        if t.dtype != torch.uint8:
            raise TypeError(f"{name}: expected uint8 codes, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected [pages, num_kv_heads, page_tokens, row_bytes], got shape "
                             f"{tuple(t.shape)}")
    P, Hkv, S, RB = k_codes.shape
    want_rb = kv_format.row_bytes(8 if bits == 0 else bits, D)
    if RB != want_rb:
        raise ValueError(f"k_codes: row_bytes {RB} does not match fmt {fmt!r} and head_dim {D} "
                         f"(expected {want_rb})")
    if Hkv < 1 or S < 1:
        raise ValueError(f"k_codes: num_kv_heads and page_tokens must be >= 1, got shape "
                         f"{tuple(k_codes.shape)}")
    if S % gs:
        raise ValueError(f"k_codes: page_tokens {S} is not a multiple of group_size {gs}")
    if tuple(v_codes.shape) != tuple(k_codes.shape):
        raise ValueError(f"v_codes: shape {tuple(v_codes.shape)} differs from k_codes shape {tuple(k_codes.shape)}")
    if Hq % Hkv:
        raise ValueError(f"q: num_heads {Hq} is not a multiple of k_codes num_kv_heads {Hkv}")
    if bits == 0:
        shapes = dict(k_scale=((P, Hkv, S // gs), torch.float32), v_scale=((P, Hkv, S // gs), torch.float32))
    else:
        NG = kv_format.num_value_groups(D, gs)
        shapes = dict(k_scale=((P, Hkv, S // gs, D), torch.float16), k_zero=((P, Hkv, S // gs, D), torch.float16),
                      v_scale=((P, Hkv, S, NG), torch.float16), v_zero=((P, Hkv, S, NG), torch.float16))
    for name, (shape, dtype) in shapes.items():
        t = named[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} for fmt {fmt!r}, got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{name}: expected {dtype} for fmt {fmt!r}, got {t.dtype}")
    for name in ("k_codes", "v_codes", *shapes):
        t = named[name]
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got stride {t.stride(-1)}")

    for name, t in (("fp_k", fp_k), ("fp_v", fp_v)):
        if t.dim() != 4 or t.shape[0] != B or t.shape[2] != Hkv or t.shape[3] != D:
            raise ValueError(f"{name}: expected [{B}, fp_rows, {Hkv}, {D}] (batch, sink + residual rows, "
                             f"num_kv_heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in floats:
            raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}")
        if t.stride(3) != 1 and D > 1:
            raise ValueError(f"{name}: the head_dim (last) dimension must be contiguous (stride 1), "
                             f"got stride {t.stride(3)}")
    if fp_v.shape[1] != fp_k.shape[1]:
        raise ValueError(f"fp_v: shape {tuple(fp_v.shape)} differs from fp_k shape {tuple(fp_k.shape)}")
    F = fp_k.shape[1]

    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table: expected int32, got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table: expected [{B}, max_pages], got shape {tuple(block_table.shape)}")
    for name, t in (("n_sink", n_sink), ("n_quant", n_quant), ("n_res", n_res)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name}: expected int32, got {t.dtype}")
        if tuple(t.shape) != (B,):
            raise ValueError(f"{name}: expected shape [{B}] (one count per sequence), got {tuple(t.shape)}")

    if tuple(out.shape) != tuple(q.shape) or out.dtype not in floats:
        raise ValueError(f"out: expected {tuple(q.shape)} float32 / float16 / bfloat16 (normally q's dtype), "
                         f"got {tuple(out.shape)} {out.dtype}")
    if not out.is_contiguous():
        raise ValueError("out: must be contiguous")
    if tuple(lse.shape) != (B, Hq) or lse.dtype != torch.float32:
        raise ValueError(f"lse: expected ({B}, {Hq}) float32, got {tuple(lse.shape)} {lse.dtype}")
    if not lse.is_contiguous():
        raise ValueError("lse: must be contiguous")

    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}") from None
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale!r}")
    if method not in ("split", "lean"):
        raise ValueError(f"method: expected 'split' or 'lean' for the triton backend, got {method!r}")
    num_splits = _as_int(num_splits, "num_splits", 1)
    num_workers = _as_int(num_workers, "num_workers", 1)
    tile = _as_int(tile, "tile", 1)

    # counts (one host read of the three count vectors and the used block-table entries)
    cnt = torch.stack([n_sink, n_quant, n_res]).to("cpu", torch.int64)
    ns, nq, nr = cnt[0], cnt[1], cnt[2]
    for name, c in (("n_sink", ns), ("n_quant", nq), ("n_res", nr)):
        if (c < 0).any():
            b = int(torch.nonzero(c < 0)[0, 0])
            raise ValueError(f"{name}: {name}[{b}] = {int(c[b])} is negative")
    if (nq % gs != 0).any():
        b = int(torch.nonzero(nq % gs)[0, 0])
        raise ValueError(f"n_quant: n_quant[{b}] = {int(nq[b])} is not a multiple of group_size {gs}")
    MP = block_table.shape[1]
    if (nq > MP * S).any():
        b = int(torch.nonzero(nq > MP * S)[0, 0])
        raise ValueError(f"n_quant: n_quant[{b}] = {int(nq[b])} exceeds the block_table capacity "
                         f"{MP} pages x {S} page_tokens")
    if (ns + nr > F).any():
        b = int(torch.nonzero(ns + nr > F)[0, 0])
        raise ValueError(f"n_res: n_sink[{b}] + n_res[{b}] = {int(ns[b] + nr[b])} exceeds the {F} fp rows "
                         f"of fp_k / fp_v")
    if (ns + nq + nr < 1).any():
        b = int(torch.nonzero(ns + nq + nr < 1)[0, 0])
        raise ValueError(f"n_res: sequence {b} has no tokens (n_sink + n_quant + n_res must be >= 1)")
    if MP > 0:
        used = torch.arange(MP)[None, :] < ((nq + S - 1) // S)[:, None]
        ids = block_table.to("cpu", torch.int64)
        bad = used & ((ids < 0) | (ids >= P))
        if bad.any():
            b, j = (int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(f"block_table: block_table[{b}, {j}] = {int(ids[b, j])} is outside [0, {P}) "
                             f"(the pages of k_codes)")
    return bits, gs, scale, num_splits, num_workers, tile


def default_tile(group_size: int) -> int:
    """Tokens per schedule tile: a multiple of the group size, at least 64 (as the CUDA backend)."""
    return group_size * max(1, 64 // group_size)


def default_num_workers(device) -> int:
    """Lean programs: 4 per SM on a GPU; 4 in the interpreter (the schedule is exercised, not timed)."""
    import torch

    if getattr(device, "type", None) == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@launch_on_device
def decode_attention_kv(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fp_k, fp_v, block_table,
                        n_sink, n_quant, n_res, out, lse, scale=None, fmt="int4", group_size=32, method="lean",
                        num_splits=8, num_workers=None, tile=None) -> None:
    """Decode attention over the quantized KV cache; writes ``out`` [B, Hq, D] and ``lse`` [B, Hq]
    (natural log, float32) in place. Arguments as in ``pykernels.kv_format`` ("Kernel entry
    point"); ``method`` "split" (``num_splits`` chunks per segment) or "lean" (``num_workers``
    programs, default ``default_num_workers``); ``tile`` (any int >= 1, default
    ``default_tile(group_size)``) is the schedule's unit in tokens. As in the CUDA backend:
    ``block_table`` None means sequence b uses page b (dense store), fp8 codes may be given as
    torch.float8_e4m3fn, ``scale`` None is D ** -0.5, and ``out`` may be any of the three float
    dtypes. Every argument is validated (errors name it); the counts and the used block-table
    entries are read on the host for that (one device sync).

    Example (interpreter or GPU; dense store = one page per sequence)::

        f = kv_format.quantize_kv(k, v, 4, 32)   # k, v [B, Hkv, T, D], T a multiple of 32
        decode_attention_kv(q, f["k_codes"], f["k_scale"], f["k_zero"], f["v_codes"], f["v_scale"],
                            f["v_zero"], fp_k, fp_v, torch.arange(B, dtype=torch.int32)[:, None],
                            n_sink, n_quant, n_res, out, lse, D ** -0.5, "int4", 32, "lean", 1, 8, 64)
    """
    if triton is None:
        raise RuntimeError(f"the triton backend needs triton, which cannot be imported: {_IMPORT_ERROR}")
    import torch

    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 3:
        scale = q.shape[-1] ** -0.5
    if tile is None:
        tile = default_tile(group_size) if group_size in (32, 64, 128) else 64
    if num_workers is None and isinstance(q, torch.Tensor):
        num_workers = default_num_workers(q.device)
    fp8_dtype = getattr(torch, "float8_e4m3fn", None)
    if fp8_dtype is not None:  # e4m3fn bytes are read as uint8 (decoded by the bit rule)
        if isinstance(k_codes, torch.Tensor) and k_codes.dtype == fp8_dtype:
            k_codes = k_codes.view(torch.uint8)
        if isinstance(v_codes, torch.Tensor) and v_codes.dtype == fp8_dtype:
            v_codes = v_codes.view(torch.uint8)
    if block_table is None and isinstance(q, torch.Tensor) and q.dim() == 3:  # dense: sequence b -> page b
        block_table = torch.arange(q.shape[0], dtype=torch.int32, device=q.device)[:, None]
    bits, gs, scale, num_splits, num_workers, tile = _validate(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fp_k, fp_v, block_table,
        n_sink, n_quant, n_res, out, lse, scale, fmt, group_size, method, num_splits, num_workers, tile)

    B, Hq, D = q.shape
    P, Hkv, S, _ = k_codes.shape
    G = Hq // Hkv
    device = q.device
    G_PAD = max(16, _next_pow2(G))  # tl.dot needs every dimension >= 16
    D_PAD = max(16, _next_pow2(D))
    cap = 64 if D_PAD <= 128 else 32  # register budget of the [block, D_PAD] fp32 K / V tiles
    BQ = min(gs, cap)   # quantized block: divides gs (both powers of two), so one group per block
    BF = max(16, min(cap, 1 << (tile.bit_length() - 1)))  # fp-row block: a power of two, <= tile if >= 16
    num_warps = 8 if D_PAD >= 256 else 4
    # the interpreter truncates fp32 -> bf16; let torch round instead (as decode_attention does)
    out_k = torch.empty(out.shape, dtype=torch.float32, device=device) if (
        _INTERPRET and out.dtype == torch.bfloat16) else out

    if bits == 0:  # no zeros: pass the scales as (unused) placeholders
        k_zero_t, v_zero_t = k_scale, v_scale
        ksj, kzs = (k_scale.stride(0), k_scale.stride(1), k_scale.stride(2)), (0, 0, 0)
        vss, vzs = (v_scale.stride(0), v_scale.stride(1), v_scale.stride(2)), (0, 0, 0)
    else:
        k_zero_t, v_zero_t = k_zero, v_zero
        ksj = (k_scale.stride(0), k_scale.stride(1), k_scale.stride(2))
        kzs = (k_zero.stride(0), k_zero.stride(1), k_zero.stride(2))
        vss = (v_scale.stride(0), v_scale.stride(1), v_scale.stride(2))
        vzs = (v_zero.stride(0), v_zero.stride(1), v_zero.stride(2))
    bt = block_table
    if bt.numel() == 0:  # n_quant == 0 everywhere: the table is never read
        bt = torch.zeros((B, 1), dtype=torch.int32, device=device)
    lengths = (n_sink.to(torch.int64) + n_quant.to(torch.int64) + n_res.to(torch.int64))
    len32 = lengths.to(torch.int32)

    qk_scale = scale * _LOG2E
    strides = (q.stride(0), q.stride(1), q.stride(2),
               k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
               v_codes.stride(0), v_codes.stride(1), v_codes.stride(2),
               *ksj, *kzs, *vss, *vzs,
               fp_k.stride(0), fp_k.stride(1), fp_k.stride(2),
               fp_v.stride(0), fp_v.stride(1), fp_v.stride(2),
               bt.stride(0), bt.stride(1),
               out_k.stride(0), out_k.stride(1), lse.stride(0))
    tensors = (q, k_codes, k_scale, k_zero_t, v_codes, v_scale, v_zero_t, fp_k, fp_v, bt, n_sink, n_quant, len32)
    meta = dict(HKV=Hkv, G=G, D=D, G_PAD=G_PAD, D_PAD=D_PAD)
    kmeta = dict(TILE=tile, BITS=bits, GS=gs, BQ=BQ, BF=BF, num_warps=num_warps)

    # No segment has more than max_tiles tiles: more splits or workers than that only cost
    # launch size and partial-state memory.
    max_tiles = max(1, -(-int(lengths.max()) // tile))
    if method == "split":
        Sp = min(num_splits, max_tiles)
        po = torch.empty((B * Hkv * Sp, G, D), dtype=torch.float32, device=device)
        plse = torch.empty((B * Hkv * Sp, G), dtype=torch.float32, device=device)
        _kv_split_kernel[(B, Hkv, Sp)](*tensors, out_k, lse, po, plse, qk_scale, Sp, S, *strides,
                                       **meta, **kmeta)
        if Sp > 1:
            _split_merge_kernel[(B, Hkv, G)](len32, out_k, lse, po, plse, Sp,
                                             out_k.stride(0), out_k.stride(1), lse.stride(0), **meta, TILE=tile,
                                             SB=merge_block(Sp))
    else:
        nseg = B * Hkv
        W = min(num_workers, nseg * max_tiles)
        ntiles = torch.repeat_interleave((lengths + tile - 1) // tile, Hkv)
        cum = torch.zeros(nseg + 1, dtype=torch.int64, device=device)
        torch.cumsum(ntiles, 0, out=cum[1:])
        po = torch.empty((2 * W, G, D), dtype=torch.float32, device=device)
        plse = torch.empty((2 * W, G), dtype=torch.float32, device=device)
        _kv_lean_kernel[(W,)](*tensors, cum, out_k, lse, po, plse, qk_scale, nseg, W, S, *strides,
                              **meta, **kmeta)
        if W > 1:
            _lean_merge_kernel[(nseg, G)](cum, out_k, lse, po, plse, nseg, W,
                                          out_k.stride(0), out_k.stride(1), lse.stride(0), **meta,
                                          SB=merge_block(W))
    if out_k is not out:
        out.copy_(out_k)
