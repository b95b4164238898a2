"""Measured autotune results, cached per machine and shape bucket outside the package.

The roofline model ranks configurations from bytes, FLOPs and balance; it cannot see effects
such as the cache-line interplay of two threads walking neighbouring heads. A benchmark that
times the alternatives on this machine records them here, and the advisor then prefers the
measured winner for every call whose shape falls in the same bucket.

- ``decode_bucket(...)``: the bucket of a decode-attention call: heads, head size, element
  bytes, workers and device exactly; batch and the longest sequence's tiles rounded up to a
  power of two; the imbalance (longest / mean length) to 1, 2, 4 or 8+.
- ``lut_bucket(...)``: the bucket of a LUT-GEMV call (N and K rounded up to a power of two).
- ``record(topic, bucket, timings)``: store ``{choice label: seconds}`` (merged into the file
  atomically: write to a temporary file, then rename).
- ``lookup(topic, bucket)``: ``{"best", "timings", "recorded"}`` or None.

The file is ``$XDG_CACHE_HOME/pykernels/roofline/autotune-<machine>.json`` (see
``roofline.measure.cache_dir``); ``PYKERNELS_AUTOTUNE=0`` turns lookups off.

Example
-------
>>> b = decode_bucket([32768, 1024, 512], 8, 1, 128, 2, 2, "cpu")
>>> b
'Hq8-Hkv1-D128-e2-W2-cpu-B4-T512-imb4'
"""

from __future__ import annotations

import json
import math
import os
import re
import time

__all__ = ["decode_bucket", "lut_bucket", "record", "lookup", "enabled", "path", "generation"]

_MEMO: dict[str, dict] = {}
_GENERATION = [0]  # bumped by record(): memoised choices made before it are stale


def generation() -> int:
    """A counter that changes whenever this process records results (memo keys include it)."""
    return _GENERATION[0]


def enabled() -> bool:
    """False when ``PYKERNELS_AUTOTUNE=0``."""
    return os.environ.get("PYKERNELS_AUTOTUNE", "1") != "0"


def path(device: str = "cpu") -> str:
    """The autotune file of this machine (for ``device``)."""
    from .measure import _identity, cache_dir

    stem = re.sub(r"[^A-Za-z0-9.-]+", "_", _identity(device)).strip("_")[:100]
    return os.path.join(cache_dir(), f"autotune-{stem}-{device}.json")


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def decode_bucket(seqlens, num_heads: int, num_kv_heads: int, head_dim: int, dtype_bytes: float,
                  num_workers: int, device: str, tile: int = 64) -> str:
    """Shape bucket of a decode-attention call (see the module notes)."""
    lens = [int(x) for x in seqlens]
    if not lens or min(lens) < 1:
        raise ValueError(f"seqlens: expected lengths >= 1, got {lens[:8]}")
    imb = max(lens) * len(lens) / sum(lens)
    imb_b = next(b for b in (1, 2, 4, 8) if imb <= b * 1.05 or b == 8)
    return (f"Hq{num_heads}-Hkv{num_kv_heads}-D{head_dim}-e{dtype_bytes:g}-W{num_workers}-{device}"
            f"-B{_pow2(len(lens))}-T{_pow2(-(-max(lens) // tile))}-imb{imb_b}")


def lut_bucket(N: int, K: int, M: int, bits: int, group_size: int, device: str) -> str:
    """Shape bucket of a LUT-GEMV call: bits, group size, M (rows of x, up to 16 per pass)
    exactly; N and K rounded up to a power of two."""
    return f"N{_pow2(N)}-K{_pow2(K)}-M{M}-b{bits}-g{group_size}-{device}"


def _load(device: str) -> dict:
    p = path(device)
    if p not in _MEMO:
        try:
            with open(p) as fh:
                data = json.load(fh)
            _MEMO[p] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _MEMO[p] = {}
    return _MEMO[p]


def lookup(topic: str, bucket: str, device: str = "cpu") -> dict | None:
    """The measured entry of ``topic`` / ``bucket``, or None (also when disabled)."""
    if not enabled():
        return None
    entry = _load(device).get(topic, {}).get(bucket)
    if not isinstance(entry, dict) or not isinstance(entry.get("timings"), dict) or not entry["timings"]:
        return None
    return entry


def record(topic: str, bucket: str, timings: dict, device: str = "cpu", note: str = "") -> dict:
    """Store measured ``timings`` ({choice label: seconds}) for ``topic`` / ``bucket``.

    Returns the stored entry ``{"best", "timings", "recorded", "note"}``. Entries of other
    buckets and topics in the file are kept; a crash never leaves a half-written file.
    """
    clean = {str(k): float(v) for k, v in timings.items() if v is not None and math.isfinite(float(v)) and v > 0}
    if not clean:
        raise ValueError(f"timings: expected at least one finite time > 0, got {timings!r}")
    p = path(device)
    _MEMO.pop(p, None)
    data = _load(device)           # the file as it is now (another process may have added)
    entry = {"best": min(clean, key=clean.get), "timings": clean,
             "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "note": note}
    data.setdefault(topic, {})[bucket] = entry
    os.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = f"{p}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, p)
    _GENERATION[0] += 1
    return entry
