"""torch.library registration of the public ops, so they work under torch.compile and can be
called as ``torch.ops.pykernels.*`` from serving engines. The fake implementations give
output shapes and dtypes without running a kernel."""
from __future__ import annotations

from typing import Optional

import torch

from .attention import _check_nonempty, _run, _run_kv, merge_states
from .kv_cache import QuantizedKVCache


@torch.library.custom_op("pykernels::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor,
                        block_table: Optional[torch.Tensor], scale: float, method: str, num_splits: int,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, Hq, D] (q's dtype), lse [B, Hq] float32. num_splits 0 = heuristic."""
    from .attention import _validate

    q, k_cache, v_cache, seqlens, block_table, scale, lens_host = _validate(
        q, k_cache, v_cache, seqlens, block_table, scale, method, num_splits or None, None)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    _run(q, k_cache, v_cache, seqlens, block_table, scale, method, num_splits or None, backend, out, lse, lens_host)
    return out, lse


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, seqlens, block_table, scale, method, num_splits, backend):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(q.shape[:2], dtype=torch.float32, device=q.device))


@torch.library.custom_op("pykernels::decode_attention_kv", mutates_args=())
def decode_attention_kv_op(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor,
                           k_zero: Optional[torch.Tensor], v_codes: torch.Tensor, v_scale: torch.Tensor,
                           v_zero: Optional[torch.Tensor], fp_k: torch.Tensor, fp_v: torch.Tensor,
                           block_table: torch.Tensor, n_sink: torch.Tensor, n_quant: torch.Tensor,
                           n_res: torch.Tensor, bits: str, group_size: int, scale: float, method: str,
                           num_splits: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over the tensors of a pk.QuantizedKVCache (``cache.tensors()``);
    bits "8" / "4" / "2" / "fp8". out [B, Hq, D] (q's dtype), lse [B, Hq] float32."""
    cache = QuantizedKVCache.from_tensors(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fp_k, fp_v,
                                          block_table, n_sink, n_quant, n_res,
                                          bits="fp8" if bits == "fp8" else int(bits), group_size=group_size)
    _check_nonempty(cache)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    _run_kv(q, cache, scale, method, num_splits or None, backend, out, lse)
    return out, lse


@decode_attention_kv_op.register_fake
def _(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fp_k, fp_v, block_table, n_sink, n_quant, n_res,
      bits, group_size, scale, method, num_splits, backend):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(q.shape[:2], dtype=torch.float32, device=q.device))


@torch.library.custom_op("pykernels::merge_states", mutates_args=())
def merge_states_op(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
                    lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return merge_states(o_a, lse_a, o_b, lse_b)


@merge_states_op.register_fake
def _(o_a, lse_a, o_b, lse_b):
    return (torch.empty(o_a.shape, dtype=o_a.dtype, device=o_a.device),
            torch.empty(lse_a.shape, dtype=torch.float32, device=lse_a.device))


@torch.library.custom_op("pykernels::lut_gemv", mutates_args=())
def lut_gemv_op(x: torch.Tensor, planes: torch.Tensor, scales: Optional[torch.Tensor],
                zeros: Optional[torch.Tensor], codebook: Optional[torch.Tensor], perm: Optional[torch.Tensor],
                N: int, K: int, bits: int, group_size: int, scheme: str, mode: str,
                backend: str) -> torch.Tensor:
    """y [M, N] (x's dtype) = x [M, K] @ W^T for the LUTWeight made of these tensors."""
    from .lut import LUTWeight, _lut_gemv_2d, _validate_call

    qw = LUTWeight(planes, scales, zeros, codebook, shape=(N, K), bits=bits, group_size=group_size,
                   scheme=scheme, perm=perm)
    x = _validate_call(x, qw, None, mode, backend)
    if x.dim() != 2:
        raise ValueError(f"x: expected [M, K], got shape {tuple(x.shape)}")
    return _lut_gemv_2d(x, qw, backend, mode)


@lut_gemv_op.register_fake
def _(x, planes, scales, zeros, codebook, perm, N, K, bits, group_size, scheme, mode, backend):
    return x.new_empty((x.shape[0], N))
