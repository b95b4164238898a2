"""Triton decode attention: one query token per sequence against a dense or paged KV cache.

Two schedules, both mirroring ``csrc/include/pykernels/lean_plan.h`` and ``softmax.h``:

- ``"split"`` (flash-decoding): grid (b, kv-head h, split c). Segment s = b*Hkv + h has
  n = ceil(seqlen[b] / tile) KV tiles, cut into S' = min(S, n) chunks; chunk c covers tiles
  [floor(n*c/S'), floor(n*(c+1)/S')). A one-chunk segment is written directly; otherwise each
  chunk writes a normalised partial (o, lse) and ``_split_merge_kernel`` combines them (one
  program per query head, ``merge_block`` slots per step).
- ``"lean"`` (LeanAttention, stream-K): the KV tiles of all segments form one list of ``total``
  tiles; program w of W owns [floor(total*w/W), floor(total*(w+1)/W)), crossing segment
  boundaries. Wholly covered segments are written directly; a partly covered one goes to slot
  2*w (piece starting at the worker's first tile) or 2*w + 1 (piece starting at a segment start
  inside the range), and ``_lean_merge_kernel`` combines the slots of workers
  lean_owner(cum[s]) .. lean_owner(cum[s+1] - 1).

Every program handles the G = Hq / Hkv query heads of its kv-head together ([G_PAD, D_PAD]
q block, ``tl.dot``), so each K/V element is loaded once for all G heads. Accumulation is fp32;
softmax runs in the log2 domain (exp2) and the stored lse is natural-log.

Interpreter note (triton 3.9, TRITON_INTERPRET=1): bf16 values are held as uint16 there, so
``tl.dot`` on bf16 operands multiplies the raw bit patterns (garbage) and fp32 -> bf16 casts
truncate instead of rounding to nearest. The launcher therefore (interpreter only) converts
bf16 operands to fp32 before every dot (exact) and writes a bf16 ``out`` through an fp32
buffer that torch rounds correctly. On a GPU neither workaround is used.
"""

from __future__ import annotations

from ._runtime import IMPORT_ERROR as _IMPORT_ERROR, INTERPRET as _INTERPRET, tl, triton  # noqa: F401
from ._runtime import available as _available, launch_on_device


def available() -> tuple[bool, str]:
    """(True, how) if these kernels can run here, else (False, reason). Never raises."""
    return _available("pykernels.triton.decode_attention")


if triton is not None:
    _LOG2E = 1.4426950408889634  # softmax runs in exp2; the launcher folds log2(e) into the scale

    @triton.jit
    def _load_q(q_ptr, b, h, stride_qb, stride_qh, stride_qd,
                G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
                DOT_F32: tl.constexpr):
        # q: [B, Hq, D]; rows g >= G are zero padding (their results are never stored)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        mask = (offs_g[:, None] < G) & (offs_d[None, :] < D)
        ptrs = (q_ptr + b * stride_qb + (h * G + offs_g[:, None]).to(tl.int64) * stride_qh
                + offs_d[None, :].to(tl.int64) * stride_qd)
        q = tl.load(ptrs, mask=mask, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        return q

    @triton.jit
    def _attend_range(q, k_ptr, v_ptr, bt_ptr, b, h, tok_lo, tok_hi, qk_scale,
                      stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                      stride_btb, block_size,
                      PAGED: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                      D_PAD: tl.constexpr, G_PAD: tl.constexpr, DOT_F32: tl.constexpr):
        """Unnormalised online-softmax state (m in log2 units, l, acc) of the G heads over
        tokens [tok_lo, tok_hi) of sequence b, kv-head h. tok_lo is a multiple of BLOCK_N."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        dmask = offs_d < D
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        for start in range(tok_lo, tok_hi, BLOCK_N):
            t = (start + offs_n).to(tl.int64)
            tmask = t < tok_hi  # never touch a slot at or past seqlen (tests fill them with NaN)
            if PAGED:
                # cache: [num_blocks, block_size, Hkv, D]; token t -> block_table[b, t // bs], row t % bs
                blk = tl.load(bt_ptr + b * stride_btb + t // block_size, mask=tmask, other=0).to(tl.int64)
                row = t % block_size
                k_off = blk * stride_kb + row * stride_kt
                v_off = blk * stride_vb + row * stride_vt
            else:
                # cache: [B, Lmax, Hkv, D]
                k_off = b * stride_kb + t * stride_kt
                v_off = b * stride_vb + t * stride_vt
            kvmask = tmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + h * stride_kh + k_off[:, None] + offs_d[None, :], mask=kvmask, other=0.0)
            if DOT_F32:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            # [G_PAD, BLOCK_N]; masked keys get -inf so exp2 gives exactly 0
            s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile has >= 1 valid key
            alpha = tl.exp2(m - m_new)  # m = -inf on the first tile -> 0
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + h * stride_vh + v_off[:, None] + offs_d[None, :], mask=kvmask, other=0.0)
            if DOT_F32:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        return m, l, acc

    @triton.jit
    def _store_out(out_ptr, lse_ptr, b, h, o, lse, stride_ob, stride_oh, stride_lb,
                   G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr):
        # out: [B, Hq, D] rows h*G .. h*G+G-1 of sequence b; lse: [B, Hq] natural log
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        gmask = offs_g < G
        hq = (h * G + offs_g).to(tl.int64)
        ptrs = out_ptr + b * stride_ob + hq[:, None] * stride_oh + offs_d[None, :]
        tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & (offs_d[None, :] < D))
        tl.store(lse_ptr + b * stride_lb + hq, lse, mask=gmask)

    @triton.jit
    def _store_final(out_ptr, lse_ptr, b, h, m, l, acc, stride_ob, stride_oh, stride_lb,
                     G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr):
        # (m, l) of the attention loop are in log2 units
        _store_out(out_ptr, lse_ptr, b, h, acc / l[:, None], (m + tl.log2(l)) * 0.6931471805599453,
                   stride_ob, stride_oh, stride_lb, G, D, G_PAD, D_PAD)

    @triton.jit
    def _store_partial(po_ptr, plse_ptr, slot, m, l, acc,
                       G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr):
        # partial o: [slots, G, D] fp32 (normalised), partial lse: [slots, G] natural log
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        gmask = offs_g < G
        o = acc / l[:, None]
        base = slot * G + offs_g
        tl.store(po_ptr + base[:, None] * D + offs_d[None, :], o, mask=gmask[:, None] & (offs_d[None, :] < D))
        tl.store(plse_ptr + base, (m + tl.log2(l)) * 0.6931471805599453, mask=gmask)  # log2 -> ln

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, seqlens_ptr, out_ptr, lse_ptr, po_ptr, plse_ptr,
                      qk_scale, num_splits,
                      stride_qb, stride_qh, stride_qd,
                      stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                      stride_btb, block_size, stride_ob, stride_oh, stride_lb,
                      HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                      G_PAD: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr,
                      PAGED: tl.constexpr, DOT_F32: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        c = tl.program_id(2).to(tl.int64)
        L = tl.load(seqlens_ptr + b).to(tl.int64)
        n = (L + TILE - 1) // TILE
        sp = tl.minimum(n, num_splits)  # S' = min(S, n)
        if c < sp:
            tok_lo = (n * c // sp) * TILE
            tok_hi = tl.minimum((n * (c + 1) // sp) * TILE, L)
            q = _load_q(q_ptr, b, h, stride_qb, stride_qh, stride_qd, G, D, G_PAD, D_PAD, DOT_F32)
            m, l, acc = _attend_range(q, k_ptr, v_ptr, bt_ptr, b, h, tok_lo, tok_hi, qk_scale,
                                      stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                      stride_btb, block_size, PAGED, TILE, D, D_PAD, G_PAD, DOT_F32)
            if sp == 1:
                _store_final(out_ptr, lse_ptr, b, h, m, l, acc, stride_ob, stride_oh, stride_lb,
                             G, D, G_PAD, D_PAD)
            else:
                _store_partial(po_ptr, plse_ptr, (b * HKV + h) * num_splits + c, m, l, acc,
                               G, D, G_PAD, D_PAD)

    @triton.jit
    def _merge_rows(m, l, acc, po_ptr, plse_ptr, rows, valid, D: tl.constexpr, D_PAD: tl.constexpr):
        """Fold partial rows ``rows`` [SB] (row = slot * G + g of one query head; lanes with
        ``valid`` False are skipped) into the head's running (m, l, acc) (natural-log units; m
        and l scalars, acc [D_PAD]): lse = logsumexp(lse_i), o = sum exp(lse_i - lse) o_i. A
        block of slots is merged at once, so a head's merge takes ceil(slots / SB) steps."""
        offs_d = tl.arange(0, D_PAD)
        lse_i = tl.load(plse_ptr + rows, mask=valid, other=float("-inf"))
        o_i = tl.load(po_ptr + rows[:, None] * D + offs_d[None, :],
                      mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
        m_new = tl.maximum(m, tl.max(lse_i, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid row yet: stay NaN-free
        alpha = tl.exp(m - m_safe)
        beta = tl.exp(lse_i - m_safe)  # skipped lanes: exp(-inf) = 0
        l = l * alpha + tl.sum(beta, 0)
        acc = acc * alpha + tl.sum(beta[:, None] * o_i, 0)
        return m_new, l, acc

    @triton.jit
    def _store_head(out_ptr, lse_ptr, b, hq, m, l, acc, stride_ob, stride_oh, stride_lb,
                    D: tl.constexpr, D_PAD: tl.constexpr):
        """Row hq of sequence b from a merged (m, l, acc) of _merge_rows."""
        offs_d = tl.arange(0, D_PAD)
        tl.store(out_ptr + b * stride_ob + hq * stride_oh + offs_d, (acc / l).to(out_ptr.dtype.element_ty),
                 mask=offs_d < D)
        tl.store(lse_ptr + b * stride_lb + hq, m + tl.log(l))

    @triton.jit
    def _split_merge_kernel(seqlens_ptr, out_ptr, lse_ptr, po_ptr, plse_ptr, num_splits,
                            stride_ob, stride_oh, stride_lb,
                            HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                            G_PAD: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr,
                            SB: tl.constexpr):
        # one program per query head (b, h, g): its sp partial slots, SB at a time
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        g = tl.program_id(2).to(tl.int64)
        L = tl.load(seqlens_ptr + b).to(tl.int64)
        sp = tl.minimum((L + TILE - 1) // TILE, num_splits)
        if sp > 1:
            offs = tl.arange(0, SB)
            m = tl.max(tl.full([SB], float("-inf"), tl.float32), 0)
            l = tl.sum(tl.zeros([SB], tl.float32), 0)
            acc = tl.zeros([D_PAD], tl.float32)
            base = (b * HKV + h) * num_splits
            for c0 in range(0, sp, SB):
                c = c0 + offs
                m, l, acc = _merge_rows(m, l, acc, po_ptr, plse_ptr, (base + c) * G + g, c < sp, D, D_PAD)
            _store_head(out_ptr, lse_ptr, b, h * G + g, m, l, acc, stride_ob, stride_oh, stride_lb, D, D_PAD)

    @triton.jit
    def _lean_begin(total, w, num_workers):
        return total * w // num_workers  # lean_begin in lean_plan.h

    @triton.jit
    def _lean_owner(total, g, num_workers):
        # lean_owner in lean_plan.h: the largest w with begin(w) <= g
        lo = g * 0
        hi = g * 0 + (num_workers - 1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            ok = _lean_begin(total, mid, num_workers) <= g
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        return lo

    @triton.jit
    def _lean_segment(cum_ptr, nseg, g):
        """lean_segment: the largest s with cum[s] <= g (binary search over the tile prefix sums)."""
        lo = g * 0
        hi = g * 0 + (nseg - 1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            ok = tl.load(cum_ptr + mid) <= g
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        return lo

    @triton.jit
    def _lean_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, seqlens_ptr, cum_ptr, out_ptr, lse_ptr, po_ptr, plse_ptr,
                     qk_scale, nseg, num_workers,
                     stride_qb, stride_qh, stride_qd,
                     stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                     stride_btb, block_size, stride_ob, stride_oh, stride_lb,
                     HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                     G_PAD: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr,
                     PAGED: tl.constexpr, DOT_F32: tl.constexpr):
        # cum: [nseg + 1] int64 exclusive prefix sum of tiles per segment s = b * HKV + h
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
            L = tl.load(seqlens_ptr + b).to(tl.int64)
            tok_lo = (g - seg_b) * TILE
            tok_hi = tl.minimum((end - seg_b) * TILE, L)
            q = _load_q(q_ptr, b, h, stride_qb, stride_qh, stride_qd, G, D, G_PAD, D_PAD, DOT_F32)
            m, l, acc = _attend_range(q, k_ptr, v_ptr, bt_ptr, b, h, tok_lo, tok_hi, qk_scale,
                                      stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                      stride_btb, block_size, PAGED, TILE, D, D_PAD, G_PAD, DOT_F32)
            if (g == seg_b) & (end == seg_e):
                _store_final(out_ptr, lse_ptr, b, h, m, l, acc, stride_ob, stride_oh, stride_lb,
                             G, D, G_PAD, D_PAD)
            else:
                # lean_partial_slot: 2w for the piece at the worker's first tile, 2w+1 for a
                # piece that starts at a segment start inside the range (then runs past ge)
                slot = 2 * w + (gb < seg_b).to(tl.int64)
                _store_partial(po_ptr, plse_ptr, slot, m, l, acc, G, D, G_PAD, D_PAD)
            g = end
            s = s + 1

    @triton.jit
    def _lean_merge_kernel(cum_ptr, out_ptr, lse_ptr, po_ptr, plse_ptr, nseg, num_workers,
                           stride_ob, stride_oh, stride_lb,
                           HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                           G_PAD: tl.constexpr, D_PAD: tl.constexpr, SB: tl.constexpr):
        # one program per query head g of segment s: the slots of workers first..last, SB at a time
        s = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1).to(tl.int64)
        total = tl.load(cum_ptr + nseg)
        seg_b = tl.load(cum_ptr + s)
        seg_e = tl.load(cum_ptr + s + 1)
        first = _lean_owner(total, seg_b, num_workers)
        last = _lean_owner(total, seg_e - 1, num_workers)
        if first < last:  # first == last: one worker covered the whole segment and wrote it
            offs = tl.arange(0, SB)
            m = tl.max(tl.full([SB], float("-inf"), tl.float32), 0)
            l = tl.sum(tl.zeros([SB], tl.float32), 0)
            acc = tl.zeros([D_PAD], tl.float32)
            for w0 in range(first, last + 1, SB):
                w = w0 + offs
                wb = _lean_begin(total, w, num_workers)
                # total < W leaves workers with empty ranges between first and last: skip them
                valid = (w <= last) & (wb < _lean_begin(total, w + 1, num_workers))
                # lean_partial_slot: 2w for a piece at the worker's first tile, else 2w + 1
                slot = 2 * w + (wb < seg_b).to(tl.int64)
                m, l, acc = _merge_rows(m, l, acc, po_ptr, plse_ptr, slot * G + g, valid, D, D_PAD)
            _store_head(out_ptr, lse_ptr, s // HKV, (s % HKV) * G + g, m, l, acc,
                        stride_ob, stride_oh, stride_lb, D, D_PAD)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def merge_block(slots: int) -> int:
    """Partial slots a merge program folds per step (a power of two, 16 or 32): the merge
    kernels run one program per query head and take ceil(slots / SB) dependent steps, where the
    first version took one step per slot (18-20 us for 64 splits on an H100)."""
    return 16 if slots <= 16 else 32


@launch_on_device
def decode_attention(q, k_cache, v_cache, seqlens, block_table, out, lse, scale, method,
                     num_splits, num_workers, tile) -> None:
    """Launch the Triton decode-attention kernels; writes ``out`` [B, Hq, D] and ``lse`` [B, Hq].

    Shapes and values were validated by the public layer; only internal invariants are checked.
    ``tile`` is both the schedule's tile (tokens) and the kernels' BLOCK_N.
    """
    if triton is None:
        raise RuntimeError(f"the triton backend needs triton, which cannot be imported: {_IMPORT_ERROR}")
    import torch

    if not isinstance(tile, int) or tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two >= 16 for the triton backend (it is the "
                         f"kernel's BLOCK_N), got {tile!r}")
    if method not in ("split", "lean"):
        raise ValueError(f"method must be 'split' or 'lean' for the triton backend, got {method!r}")

    B, Hq, D = q.shape
    paged = block_table is not None
    Hkv = k_cache.shape[2]
    assert Hq % Hkv == 0 and k_cache.shape[3] == D and v_cache.shape == k_cache.shape
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    assert lse.shape == (B, Hq) and lse.is_contiguous() and lse.dtype == torch.float32
    assert seqlens.dtype == torch.int32 and seqlens.shape == (B,)
    G = Hq // Hkv
    device = q.device
    G_PAD = max(16, _next_pow2(G))  # tl.dot needs every dimension >= 16
    D_PAD = max(16, _next_pow2(D))
    bf16 = torch.bfloat16
    interp_bf16 = _INTERPRET and bf16 in (q.dtype, k_cache.dtype, v_cache.dtype)
    # Tensor-core dots in the cache dtype when q/k/v agree on a 16-bit dtype (p is rounded to
    # that dtype as in flash-attention); otherwise exact fp32 dots ("ieee", not tf32).
    dot_f32 = (interp_bf16 or q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype
               or k_cache.dtype == torch.float32)
    # interpreter truncates fp32 -> bf16; let torch round instead
    out_k = torch.empty(out.shape, dtype=torch.float32, device=device) if (_INTERPRET and out.dtype == bf16) else out

    if paged:
        assert block_table.dtype == torch.int32 and block_table.stride(1) == 1
        bt, stride_btb, block_size = block_table, block_table.stride(0), k_cache.shape[1]
    else:
        bt, stride_btb, block_size = seqlens, 0, 1  # bt unused when not PAGED
    qk_scale = float(scale) * _LOG2E
    common = (q.stride(0), q.stride(1), q.stride(2),
              k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
              v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
              stride_btb, block_size, out_k.stride(0), out_k.stride(1), lse.stride(0))
    meta = dict(HKV=Hkv, G=G, D=D, G_PAD=G_PAD, D_PAD=D_PAD)

    # No segment has more than max_tiles tiles: more splits or workers than that only cost
    # launch size and partial-state memory (bounded by the shapes, no device sync).
    capacity = block_table.shape[1] * block_size if paged else k_cache.shape[1]
    max_tiles = max(1, -(-capacity // tile))
    if method == "split":
        S = min(int(num_splits), max_tiles)
        assert S >= 1
        # one slot per (b, h, chunk); chunks of short segments (S' < S) leave slots unused
        po = torch.empty((B * Hkv * S, G, D), dtype=torch.float32, device=device)
        plse = torch.empty((B * Hkv * S, G), dtype=torch.float32, device=device)
        _split_kernel[(B, Hkv, S)](q, k_cache, v_cache, bt, seqlens, out_k, lse, po, plse,
                                   qk_scale, S, *common, **meta, TILE=tile, PAGED=paged, DOT_F32=dot_f32)
        if S > 1:
            _split_merge_kernel[(B, Hkv, G)](seqlens, out_k, lse, po, plse, S,
                                             out_k.stride(0), out_k.stride(1), lse.stride(0), **meta, TILE=tile,
                                             SB=merge_block(S))
    else:
        nseg = B * Hkv
        W = min(int(num_workers), nseg * max_tiles)
        assert W >= 1
        # segment s = b * Hkv + h has ceil(seqlen[b] / tile) tiles; cum is their exclusive prefix sum
        ntiles = torch.repeat_interleave((seqlens.to(torch.int64) + tile - 1) // tile, Hkv)
        cum = torch.zeros(nseg + 1, dtype=torch.int64, device=device)
        torch.cumsum(ntiles, 0, out=cum[1:])
        po = torch.empty((2 * W, G, D), dtype=torch.float32, device=device)
        plse = torch.empty((2 * W, G), dtype=torch.float32, device=device)
        _lean_kernel[(W,)](q, k_cache, v_cache, bt, seqlens, cum, out_k, lse, po, plse,
                           qk_scale, nseg, W, *common, **meta, TILE=tile, PAGED=paged, DOT_F32=dot_f32)
        if W > 1:
            _lean_merge_kernel[(nseg, G)](cum, out_k, lse, po, plse, nseg, W,
                                          out_k.stride(0), out_k.stride(1), lse.stride(0), **meta,
                                          SB=merge_block(W))
    if out_k is not out:
        out.copy_(out_k)
