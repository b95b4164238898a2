"""Test helpers for decode attention: a float64 oracle and cache builders with NaN-poisoned
unused slots (any read past seqlens makes the output NaN and the test fail)."""
import math

import torch

from pykernels.reference import decode_attention_reference

# Tolerances vs the float64 oracle, per dtype: |out - ref| <= ATOL + RTOL * |ref|. The oracle
# reads the same rounded inputs, so the error is fp32 accumulation over up to ~4k tokens
# (~1e-6 of |v|, hence ATOL) plus rounding the output to the dtype: half an ulp, i.e. a relative
# 2^-24 (fp32), 2^-11 (fp16), 2^-8 (bf16) — RTOL is that bound.
ATOL = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
RTOL = {torch.float32: 1e-6, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
LSE_ATOL = 1e-4  # lse is fp32 in every dtype


def make_dense(B, Lmax, Hkv, D, dtype, seqlens, nan_fill=True):
    k = torch.randn(B, Lmax, Hkv, D).to(dtype)
    v = torch.randn(B, Lmax, Hkv, D).to(dtype)
    if nan_fill:
        for b, L in enumerate(seqlens):
            k[b, L:] = float("nan")
            v[b, L:] = float("nan")
    return k, v


def make_paged(B, Hkv, D, dtype, seqlens, block_size, extra_blocks=3, nan_fill=True):
    """Paged cache with shuffled (non-contiguous) block ids; unused rows and blocks are NaN."""
    nblk = [math.ceil(L / block_size) for L in seqlens]
    max_blocks = max(nblk) + 1
    num_blocks = sum(nblk) + extra_blocks
    perm = torch.randperm(num_blocks)
    k = torch.full((num_blocks, block_size, Hkv, D), float("nan")).to(dtype)
    v = torch.full((num_blocks, block_size, Hkv, D), float("nan")).to(dtype)
    bt = torch.full((B, max_blocks), -1, dtype=torch.int32)  # unused entries are invalid ids
    i = 0
    for b, L in enumerate(seqlens):
        for j in range(nblk[b]):
            blk = int(perm[i]); i += 1
            bt[b, j] = blk
            n = min(block_size, L - j * block_size)
            k[blk, :n] = torch.randn(n, Hkv, D).to(dtype)
            v[blk, :n] = torch.randn(n, Hkv, D).to(dtype)
    if not nan_fill:
        k = torch.nan_to_num(k)
        v = torch.nan_to_num(v)
    return k, v, bt


def oracle(q, k, v, seqlens, block_table=None, scale=None):
    """(out, lse) in float64, not rounded to q's dtype: a kernel's rounded output is then within
    half an ulp (+ accumulation error) of it, whereas two roundings could differ by a whole ulp."""
    return decode_attention_reference(q.double(), k, v, seqlens, block_table, scale, return_lse=True,
                                      compute_dtype=torch.float64)


def assert_close(out, ref, atol, rtol=0.0, what="out"):
    """Fails with the index and values of the worst mismatch."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o, r = out.double(), ref.double()
    bad = ~torch.isfinite(o)
    assert not bad.any(), f"{what}: non-finite values at {torch.nonzero(bad)[:5].tolist()}"
    excess = (o - r).abs() - (atol + rtol * r.abs())
    worst = int(excess.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), excess.shape))
    assert excess.max() <= 0, (f"{what}: |diff| {float((o - r).abs()[idx]):.3g} exceeds {atol} + {rtol:.3g}*|ref| "
                               f"at {idx}: got {float(o[idx])}, want {float(r[idx])}")


def check_attention(out, lse, q, k, v, seqlens, block_table=None, scale=None):
    ref, ref_lse = oracle(q, k, v, seqlens, block_table, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close(out, ref, ATOL[q.dtype], RTOL[q.dtype])
    assert_close(lse, ref_lse, LSE_ATOL, 1e-6, what="lse")
