"""Triton LUT-GEMV: ``out = x @ W^T`` for bit-plane weights (format: ``pykernels.lut_format``).

Program (p, s) owns rows [32 p, 32 p + 32) of W (a whole 32-byte plane run per byte column) and
all M <= 16 rows of x, so each weight byte is read once per call, over the K range s (one range
in the interpreter; on a GPU K is cut into ranges of >= 512 until there are ~4 programs per SM,
and the partial outputs are summed in a fixed order). For each scale group g in its range and
each BLOCK_K slice of it, the program loads the slice's plane bytes ``planes[t, kk, i, r]`` as a
[BLOCK_K / 8, 32] block per plane i, splits every byte into its 8 bits (bit j = code bit i of
activation 8 kk + j: low nibble j < 4, high nibble j >= 4) and rebuilds the integer codes
q [BLOCK_K, 32] = sum_i 2^i bit_i.

* affine / symmetric: ``acc = x_g @ q_g`` (``tl.dot``) and ``S_g = sum x_g``; then
  ``out += scale * (acc - zero * S_g)`` with zero = c0 = (2^bits - 1) / 2 for symmetric. This is
  the LUT identity of ``lut.h`` summed bit-serially in one dot: the 16-entry table
  T[idx] = sum_j +-x_j looked up by the bit pattern of plane i equals 2 sum_j bit_ij x_j - S, and
  sum_i 2^i sum_j bit_ij x_j = sum_j q_j x_j. A per-element table gather does not map onto
  Triton's block operations; the bits feed a dot instead (tensor cores on a GPU).
  ``lut_group_result`` is linear in the group's sums, so a K range may cut a group.
* codebook: ``w = codebook[c, q]`` is gathered per element (c = n per-channel, 0 per-tensor) and
  ``out += scale * (x_g @ w_g)`` (scale = 1 when ``scales`` is None).

Exactness (both modes): codes are small integers, exact in fp32, bf16 (<= 256) and fp16, and
every product is formed exactly and summed in fp32, so the result is the float64 reference up
to fp32 accumulation. ``mode="int8"`` (int8 tables) is a CPU SIMD optimisation for byte-shuffle
lookups; here it is served by the exact kernel. On a GPU: bf16/fp16 x meets the codes in a
tensor-core dot of x's dtype; fp32 x is split exactly into three bf16 pieces
(x = x1 + x2 + x3, 24 = 3 x 8 significand bits; |x| < 3.3e38, subnormals aside) for three
tensor-core dots instead of an fp32 FMA dot (which spills registers); codebook values are
arbitrary fp32, so that dot is fp32 (``input_precision="ieee"``, not tf32).

Interpreter note (triton 3.9, TRITON_INTERPRET=1): bf16 values are held as uint16 there, so
every dot runs on operands converted to fp32 first (exact), as in ``decode_attention``.
"""

from __future__ import annotations

from ._runtime import IMPORT_ERROR as _IMPORT_ERROR, INTERPRET as _INTERPRET, tl, triton  # noqa: F401
from ._runtime import available as _available, launch_on_device

MAX_M = 16     # rows of x per call (the Python side splits larger M)
MAX_BITS = 8
_SCHEME = {"affine": 0, "symmetric": 1, "codebook": 2}


def available() -> tuple[bool, str]:
    """(True, how) if these kernels can run here, else (False, reason). Never raises."""
    return _available("pykernels.triton.lut_gemv")


if triton is not None:

    @triton.jit
    def _lut_gemv_kernel(x_ptr, planes_ptr, scales_ptr, zeros_ptr, cb_ptr, out_ptr,
                         M, N, N_pad, K_pad, G, gs, k_per_split,
                         BITS: tl.constexpr, SCHEME: tl.constexpr, HAS_SCALE: tl.constexpr,
                         CB_PER_ROW: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, DOT: tl.constexpr):
        # x: [M, K_pad]; planes: uint8 [N_pad/32, K_pad/8, BITS, 32]; scales, zeros: fp16 [N, G];
        # codebook: fp32 [N or 1, 2^BITS]; out: fp32 [splits, M, N] (partial sums of split s)
        BLOCK_KK: tl.constexpr = BLOCK_K // 8
        pid = tl.program_id(0)
        split = tl.program_id(1)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        p_ok = offs_n < N_pad  # padded rows exist in planes (code 0); rows past N_pad do not
        offs_m = tl.arange(0, M_PAD)
        m_ok = offs_m < M
        offs_k = tl.arange(0, BLOCK_K)
        offs_kk = tl.arange(0, BLOCK_KK)
        bit_j = tl.arange(0, 8)
        KK = K_pad // 8
        # byte (t, kk, i, r) of row n = 32 t + r sits at ((t * KK + kk) * BITS + i) * 32 + r
        row_off = (offs_n // 32).to(tl.int64) * KK * (BITS * 32) + offs_n % 32  # [BLOCK_N]
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K_pad                    # [M_PAD, 1]
        # this program's activations [kb, ke): multiples of 8, so byte columns are never cut
        kb = split * k_per_split
        ke = tl.minimum(kb + k_per_split, K_pad)

        y = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
        for g in range(kb // gs, (ke + gs - 1) // gs):
            # the part of scale group g in [kb, ke): the group formula is linear, so a group
            # split between programs adds up to the whole
            k_lo = tl.maximum(g * gs, kb)
            k_hi = tl.minimum(g * gs + gs, ke)
            acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
            s = tl.zeros([M_PAD], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                # activations [M_PAD, BLOCK_K]; k past the group reads 0 (and its bytes are masked)
                k = k0 + offs_k
                xv = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k < k_hi)[None, :], other=0.0)
                kk = k0 // 8 + offs_kk                                                # [BLOCK_KK]
                kk_ok = kk * 8 < k_hi
                q = tl.zeros([BLOCK_KK, 8, BLOCK_N], dtype=tl.int32)
                for i in tl.static_range(BITS):
                    ptrs = planes_ptr + row_off[None, :] + (kk.to(tl.int64) * BITS + i)[:, None] * 32
                    byte = tl.load(ptrs, mask=kk_ok[:, None] & p_ok[None, :], other=0).to(tl.int32)
                    q = q | (((byte[:, None, :] >> bit_j[None, :, None]) & 1) << i)
                q = tl.reshape(q, [BLOCK_K, BLOCK_N])  # row 8 kk + j = activation k0 + 8 kk + j
                if SCHEME == 2:
                    if CB_PER_ROW:
                        cb_off = offs_n[None, :] * (1 << BITS) + q
                    else:
                        cb_off = q
                    w = tl.load(cb_ptr + cb_off, mask=n_ok[None, :], other=0.0)
                    acc += tl.dot(xv.to(tl.float32), w, input_precision="ieee")
                else:
                    if DOT == 0:  # fp32 dot (interpreter)
                        acc += tl.dot(xv.to(tl.float32), q.to(tl.float32), input_precision="ieee")
                    elif DOT == 1:  # bf16 / fp16 x: codes are exact in x's dtype
                        acc += tl.dot(xv, q.to(xv.dtype))
                    else:  # fp32 x = x1 + x2 + x3 exactly in bf16 pieces; codes exact in bf16
                        qb = q.to(tl.bfloat16)
                        x1 = xv.to(tl.bfloat16)
                        r = xv - x1.to(tl.float32)
                        x2 = r.to(tl.bfloat16)
                        x3 = (r - x2.to(tl.float32)).to(tl.bfloat16)
                        acc += tl.dot(x1, qb)
                        acc += tl.dot(x2, qb)
                        acc += tl.dot(x3, qb)
                    s += tl.sum(xv.to(tl.float32), axis=1)
            if HAS_SCALE:
                sc = tl.load(scales_ptr + offs_n.to(tl.int64) * G + g, mask=n_ok, other=0.0).to(tl.float32)
            else:
                sc = tl.full([BLOCK_N], 1.0, tl.float32)
            if SCHEME == 0:
                z = tl.load(zeros_ptr + offs_n.to(tl.int64) * G + g, mask=n_ok, other=0.0).to(tl.float32)
                y += sc[None, :] * (acc - z[None, :] * s[:, None])
            elif SCHEME == 1:
                c0 = ((1 << BITS) - 1) * 0.5
                y += sc[None, :] * (acc - c0 * s[:, None])
            else:
                y += sc[None, :] * acc
        out_ptrs = out_ptr + (split * M + offs_m).to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(out_ptrs, y, mask=m_ok[:, None] & n_ok[None, :])


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch_config(N: int, K_pad: int, gs: int, num_sms: int | None) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, k_per_split, num_warps) for a call.

    BLOCK_K covers a 32/64 group in one slice (larger or odd groups take several, the last
    masked). Row blocks of 32: a GEMV with few rows (N = 4096 -> 128 blocks) cannot fill a GPU,
    so K is split into ``ceil(K_pad / k_per_split)`` ranges of >= 512 activations until there are
    about 4 programs per SM; the partial sums are added in a fixed order (deterministic).
    ``num_sms`` None (interpreter): no split."""
    block_n = 32
    block_k = min(64, max(16, _next_pow2(gs)))
    splits = 1
    if num_sms:
        splits = max(1, min(_cdiv(4 * num_sms, _cdiv(N, block_n)), K_pad // 512))
    unit = min(gs, block_k)  # split boundaries on group boundaries (small groups) or slice boundaries
    k_per_split = _cdiv(_cdiv(K_pad, splits), unit) * unit
    return block_n, block_k, k_per_split, (8 if block_k >= 64 else 4)


@launch_on_device
def lut_gemv(x, planes, scales, zeros, codebook, out, N, K_pad, bits, gs, mode="int8", *,
             split_k: int | None = None) -> None:
    """Launch the Triton LUT-GEMV kernel: ``out[m, n] = sum_k x[m, k] W[n, k]`` (written, fp32).

    Inputs were validated by ``pykernels.lut`` (the contract of the backend entry points);
    only internal invariants are checked. Scheme: ``codebook`` given -> codebook, else ``zeros``
    given -> affine, else symmetric. ``mode`` "int8" and "exact" both run exact (see the module
    docstring).

    Parameters
    ----------
    x : Tensor [M, K_pad] fp32 / bf16 / fp16, contiguous, 1 <= M <= 16 (zero past the real K)
    planes : Tensor uint8 [N_pad/32, K_pad/8, bits, 32]
    scales, zeros : Tensor fp16 [N, K_pad/gs] or None
    codebook : Tensor fp32 [1 or N, 2^bits] or None
    out : Tensor fp32 [M, N], contiguous
    N, K_pad, bits, gs : int
    split_k : int, optional
        Number of K ranges (default: chosen from the GPU's SM count; 1 in the interpreter).
    """
    if triton is None:
        raise RuntimeError(f"the triton backend needs triton, which cannot be imported: {_IMPORT_ERROR}")
    import torch

    if mode not in ("int8", "exact"):
        raise ValueError(f"mode: expected 'int8' or 'exact', got {mode!r}")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits: expected 1..{MAX_BITS}, got {bits}")
    if gs < 8 or gs % 8 or K_pad % gs:
        raise ValueError(f"gs: expected a multiple of 8 dividing K_pad={K_pad}, got {gs}")
    M = x.shape[0] if x.dim() == 2 else 0
    if x.shape[-1] != K_pad or not 1 <= M <= MAX_M:
        raise ValueError(f"x: expected [M, K_pad={K_pad}] with 1 <= M <= {MAX_M}, got {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x: expected float32, bfloat16 or float16, got {x.dtype}")
    N_pad = planes.shape[0] * 32
    assert x.is_contiguous() and planes.is_contiguous() and planes.dtype == torch.uint8
    assert tuple(planes.shape) == (N_pad // 32, K_pad // 8, bits, 32) and N <= N_pad
    assert out.dtype == torch.float32 and out.is_contiguous() and tuple(out.shape) == (M, N)
    scheme = "codebook" if codebook is not None else ("affine" if zeros is not None else "symmetric")
    if scheme != "codebook" and scales is None:
        raise ValueError("scales: required for the affine and symmetric schemes")
    cb_per_row = scheme == "codebook" and codebook.shape[0] == N and N > 1
    if scheme == "codebook":
        assert codebook.dtype == torch.float32 and codebook.is_contiguous()
        assert tuple(codebook.shape) in ((1, 1 << bits), (N, 1 << bits))

    if split_k is not None:  # explicit K ranges (tests exercise the split path in the interpreter)
        block_n, block_k, _, num_warps = launch_config(N, K_pad, gs, None)
        k_per_split = _cdiv(_cdiv(K_pad, int(split_k)), 8) * 8
    else:
        sms = None if _INTERPRET else torch.cuda.get_device_properties(x.device).multi_processor_count
        block_n, block_k, k_per_split, num_warps = launch_config(N, K_pad, gs, sms)
    splits = _cdiv(K_pad, k_per_split)
    if _INTERPRET:
        dot = 0
    else:  # bf16 / fp16 x: tensor cores in x's dtype; fp32 x: exact 3-piece bf16 split
        dot = 2 if x.dtype == torch.float32 else 1
    part = out if splits == 1 else torch.empty((splits, M, N), dtype=torch.float32, device=out.device)
    dummy = planes  # never dereferenced for an absent optional tensor (constexpr-guarded)
    grid = (triton.cdiv(N, block_n), splits)
    _lut_gemv_kernel[grid](
        x, planes, scales if scales is not None else dummy, zeros if zeros is not None else dummy,
        codebook if codebook is not None else dummy, part,
        M, N, N_pad, K_pad, K_pad // gs, gs, k_per_split,
        BITS=bits, SCHEME=_SCHEME[scheme], HAS_SCALE=scales is not None, CB_PER_ROW=cb_per_row,
        M_PAD=16, BLOCK_N=block_n, BLOCK_K=block_k, DOT=dot, num_warps=num_warps)
    if splits > 1:
        torch.sum(part, dim=0, out=out)
