"""Naive decode attention in plain torch.

Per sequence b: gather K, V rows [L_b, Hkv, D] (dense slice or through the block table),
repeat kv-heads for GQA, scores = q k^T * scale, softmax, o = p v. Moves 2 * L * Hkv * D
elements of KV plus the gathered copies, in ``compute_dtype``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def gather_kv(cache: torch.Tensor, b: int, L: int, block_table: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows [L, Hkv, D] of sequence b from a dense [B, Lmax, Hkv, D] or paged cache."""
    if block_table is None:
        return cache[b, :L]
    bs = cache.shape[1]
    nblk = (L + bs - 1) // bs
    ids = block_table[b, :nblk].long()
    return cache[ids].reshape(nblk * bs, *cache.shape[2:])[:L]


def decode_attention_reference(q, k_cache, v_cache, seqlens, block_table=None, scale=None,
                               return_lse=False, compute_dtype=torch.float32):
    """out [B, Hq, D] in q's dtype (and lse [B, Hq] float32, natural log, if return_lse)."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    lens = [int(x) for x in torch.as_tensor(seqlens).tolist()]
    out = torch.empty(B, Hq, D, dtype=compute_dtype, device=q.device)
    lse = torch.empty(B, Hq, dtype=compute_dtype, device=q.device)
    for b in range(B):
        k = gather_kv(k_cache, b, lens[b], block_table).to(compute_dtype)  # [L, Hkv, D]
        v = gather_kv(v_cache, b, lens[b], block_table).to(compute_dtype)
        qb = q[b].to(compute_dtype).view(Hkv, G, D)                         # heads of kv-head h are h*G..h*G+G-1
        s = torch.einsum("hgd,lhd->hgl", qb, k) * scale
        lse[b] = torch.logsumexp(s, dim=-1).reshape(Hq)
        out[b] = torch.einsum("hgl,lhd->hgd", torch.softmax(s, dim=-1), v).reshape(Hq, D)
    out = out.to(q.dtype)
    return (out, lse.float()) if return_lse else out


def merge_states_reference(o_a, lse_a, o_b, lse_b):
    """Attention over the union of two disjoint key sets, from their normalised partials."""
    lse = torch.logaddexp(lse_a.double(), lse_b.double())
    both_empty = torch.isneginf(lse)
    wa = torch.where(both_empty, 0.0, torch.exp(lse_a.double() - lse)).unsqueeze(-1)
    wb = torch.where(both_empty, 0.0, torch.exp(lse_b.double() - lse)).unsqueeze(-1)
    o = wa * o_a.double() + wb * o_b.double()
    return o.to(o_a.dtype), lse.float()
