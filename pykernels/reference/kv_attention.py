"""Naive decode attention over a ``pk.QuantizedKVCache``.

Dequantize every held token with the ``kv_format`` formulas in float32 (``cache.dequantize()``:
reads the codes, scales and zeros of L_quant tokens and the fp rows, writes 2 * B * Lmax * Hkv * D
float32), then the dense reference attention over those tensors. The kernels instead dequantize
inside the attention loop; their float32 scores differ from these only by rounding order.
"""
from __future__ import annotations

from .attention import decode_attention_reference


def decode_attention_kv_reference(q, cache, scale=None, return_lse=False):
    """out [B, Hq, D] in q's dtype (and lse [B, Hq] float32, natural log, if return_lse) of q
    [B, Hq, D] over every token the cache holds (sink, quantized and residual)."""
    k, v = cache.dequantize()  # float32 [B, Lmax, Hkv, D]
    return decode_attention_reference(q, k, v, cache.seqlens, None, scale, return_lse=return_lse)
