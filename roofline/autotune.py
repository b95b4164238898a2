"""Measured autotune results, cached per machine and shape bucket outside the package.

The roofline model ranks configurations from bytes, FLOPs and balance; it cannot see effects
such as the cache-line interplay of two threads walking neighbouring heads. A benchmark that
times the alternatives on this machine records them here, and the advisor then prefers the
measured winner for every call whose shape falls in the same bucket.

- ``decode_bucket(...)``: the bucket of a decode-attention call: heads, head size, element
  bytes, workers and device exactly; batch and the longest sequence's tiles rounded up to a
  power of two; the imbalance (longest / mean length) to 1, 2, 4 or 8+.
- ``lut_bucket(...)``: the bucket of a LUT-GEMV call (N and K rounded up to a power of two).
- ``kv_bucket(...)``: the bucket of a KV-format comparison (heads, head size, group size,
  workers, device); its timings are seconds per token of context of one layer's attention.
- ``record(topic, bucket, timings)``: store ``{choice label: seconds}`` (merged into the file
  atomically: write to a temporary file, then rename).
- ``lookup(topic, bucket)``: ``{"best", "timings", "recorded"}`` or None.

The file is ``$XDG_CACHE_HOME/pykernels/roofline/autotune-<machine>-<device>.json`` (see
``roofline.measure.cache_dir``); ``PYKERNELS_AUTOTUNE=0`` turns lookups off.

Example
-------
>>> b = decode_bucket([32768, 1024, 512], 8, 1, 128, 2, 2, "cpu")
>>> b
'Hq8-Hkv1-D128-e2-W2-cpu-B4-T512-imb4'
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
import threading
import time

from .probe import env_switch

__all__ = ["decode_bucket", "lut_bucket", "kv_bucket", "imbalance_class", "record", "lookup", "has_topic", "enabled",
           "path", "generation"]

_MEMO: dict[str, tuple] = {}  # path -> (file version or None, contents)
_GENERATION = [0]  # bumped by record(): memoised choices made before it are stale


def generation() -> int:
    """A counter that changes whenever this process records results (memo keys include it)."""
    return _GENERATION[0]


def _file_version(p: str):
    """(mtime, inode, size) of the file, None when missing: records are written to a temporary
    file and renamed, so each write is a new inode even when two land in one clock tick (half of
    back-to-back rewrites shared an mtime_ns on this machine's ext4)."""
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino, st.st_size


def stamp(device: str) -> tuple:
    """What memoised advice for ``device`` depends on: this process's records (``generation``)
    and the cache file's version (another process's records)."""
    return _GENERATION[0], _file_version(path(device))


STAMP_INTERVAL_S = 1.0  # quick_stamp stats the file at most this often
_QUICK: dict = {}  # (device, XDG_CACHE_HOME, HOME) -> (monotonic time of the stat, file version)


def quick_stamp(device: str) -> tuple:
    """``stamp(device)`` for per-call memos (``method="auto"`` on every decode call): this
    process's records count at once, through ``generation``. The file is stat'ed at most once
    per ``STAMP_INTERVAL_S``, so another process's records are seen within that interval, at
    about 1 us per call instead of the stat and path building (about 7 us)."""
    key = (device, os.environ.get("XDG_CACHE_HOME"), os.environ.get("HOME"))
    now = time.monotonic()
    hit = _QUICK.get(key)
    if hit is None or now - hit[0] >= STAMP_INTERVAL_S:
        hit = (now, stamp(device)[1])
        _QUICK[key] = hit
    return _GENERATION[0], hit[1]


def enabled() -> bool:
    """False when ``PYKERNELS_AUTOTUNE=0`` (or off / false / no)."""
    return env_switch("PYKERNELS_AUTOTUNE")


_IDENT: dict[str, str] = {}


def path(device: str = "cpu") -> str:
    """The autotune file of this machine (for ``device``); the machine identity is read once
    per process, the folder (``XDG_CACHE_HOME``) on every call."""
    from .measure import _identity, cache_dir, file_stem

    if device not in _IDENT:
        _IDENT[device] = file_stem(_identity(device))
    return os.path.join(cache_dir(), f"autotune-{_IDENT[device]}-{device}.json")


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def imbalance_class(longest: int, count: int, total: int) -> int:
    """Longest / mean length rounded up to 1, 2, 4 or 8 (8 = 8 or more), 5% tolerance."""
    imb = longest * count / total
    return next(b for b in (1, 2, 4, 8) if imb <= b * 1.05 or b == 8)


def decode_bucket(seqlens, num_heads: int, num_kv_heads: int, head_dim: int, dtype_bytes: float,
                  num_workers: int, device: str, tile: int = 64) -> str:
    """Shape bucket of a decode-attention call (see the module notes)."""
    lens = [int(x) for x in seqlens]
    if not lens or min(lens) < 1:
        raise ValueError(f"seqlens: expected lengths >= 1, got {lens[:8]}")
    imb_b = imbalance_class(max(lens), len(lens), sum(lens))
    return (f"Hq{num_heads}-Hkv{num_kv_heads}-D{head_dim}-e{dtype_bytes:g}-W{num_workers}-{device}"
            f"-B{_pow2(len(lens))}-T{_pow2(-(-max(lens) // tile))}-imb{imb_b}")


def lut_bucket(N: int, K: int, M: int, bits: int, group_size: int, device: str) -> str:
    """Shape bucket of a LUT-GEMV call: bits, group size, M (rows of x, up to 16 per pass)
    exactly; N and K rounded up to a power of two."""
    return f"N{_pow2(N)}-K{_pow2(K)}-M{M}-b{bits}-g{group_size}-{device}"


def kv_bucket(num_heads: int, num_kv_heads: int, head_dim: int, group_size: int, num_workers: int,
              device: str) -> str:
    """Shape bucket of the KV-format comparison (``roofline.advise.advise_kv_format``): its
    timings are per token of context (decode attention scales linearly with it)."""
    return f"Hq{num_heads}-Hkv{num_kv_heads}-D{head_dim}-g{group_size}-W{num_workers}-{device}"


def _load(device: str) -> dict:
    """The file's contents, re-read when its version (mtime, inode, size) changes (another
    process may have recorded since)."""
    p = path(device)
    version = _file_version(p)
    memo = _MEMO.get(p)
    if memo is None or memo[0] != version:
        data = {}
        if version is not None:
            try:
                with open(p) as fh:
                    data = json.load(fh)
            except (OSError, ValueError):
                data = {}
        memo = _MEMO[p] = (version, data if isinstance(data, dict) else {})
    return memo[1]


def _valid(entry) -> bool:
    """An entry whose ``best`` is one of its timings and every timing a finite time > 0."""
    if not isinstance(entry, dict):
        return False
    t, best = entry.get("timings"), entry.get("best")
    return (isinstance(t, dict) and bool(t) and isinstance(best, str) and best in t
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                    for v in t.values()))


def has_topic(topic: str, device: str = "cpu") -> bool:
    """Whether anything is recorded under ``topic`` (a cheap check before computing a bucket)."""
    return enabled() and bool(_load(device).get(topic))


def lookup(topic: str, bucket: str, device: str = "cpu") -> dict | None:
    """The measured entry of ``topic`` / ``bucket``, or None (also when disabled, or when the
    entry in the file is malformed)."""
    if not enabled():
        return None
    topic_entries = _load(device).get(topic)
    entry = topic_entries.get(bucket) if isinstance(topic_entries, dict) else None
    return entry if _valid(entry) else None


_LOCK = threading.Lock()


def record(topic: str, bucket: str, timings: dict, device: str = "cpu", note: str = "") -> dict:
    """Store measured ``timings`` ({choice label: seconds}) for ``topic`` / ``bucket``.

    Returns the stored entry ``{"best", "timings", "recorded", "note"}``. Entries of other
    buckets and topics in the file are kept (read, merge and write happen under a lock: a
    thread lock and ``flock`` on a lock file beside it, for other processes); the file is
    replaced by rename, so a crash never leaves it half-written.
    """
    clean = {}
    for k, v in timings.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            clean[str(k)] = float(v)
    if not clean:
        raise ValueError(f"timings: expected at least one finite time > 0, got {timings!r}")
    p = path(device)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    entry = {"best": min(clean, key=clean.get), "timings": clean,
             "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "note": str(note)}
    with _LOCK, open(p + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _MEMO.pop(p, None)
            data = json.loads(json.dumps(_load(device)))  # a private copy of the file as it is now
            if not isinstance(data.get(topic), dict):
                data[topic] = {}
            data[topic][bucket] = entry
            fd, tmp = tempfile.mkstemp(prefix=os.path.basename(p) + ".", suffix=".tmp",
                                       dir=os.path.dirname(p))
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(data, fh, indent=1)
                os.replace(tmp, p)
            except BaseException:
                os.unlink(tmp)
                raise
            _MEMO.pop(p, None)
            _GENERATION[0] += 1
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return entry
