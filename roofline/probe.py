"""Machine probe: STREAM-style memory bandwidth and basic machine facts.

Every benchmark in this project states its result as a fraction of the bandwidth measured here,
in the same run. Decode attention is a pure read stream (K and V are read once, almost nothing
is written), so the headline figure, ``bandwidth_GB_s``, is the *read* bandwidth.

Kernels (torch ops, so they run on torch's intra-op thread pool, ``torch.get_num_threads()``):

- read:  ``s = a.sum()``                # read N*4 bytes ; write 4 bytes
- triad: ``a = b + s * c`` (torch.add)  # read 2*N*4 bytes ; write N*4 bytes
- copy:  ``b.copy_(a)``                  # read N*4 bytes ; write N*4 bytes (2 arrays counted)

Bytes are counted explicitly: the triad is credited with 3 arrays (the STREAM convention); the
write-allocate read of ``a`` that a non-streaming store also causes is *not* counted, so
``triad_GB_s`` understates the bus traffic by up to 4/3 (``triad_wa_GB_s`` counts it).
GB are 1e9 bytes.

This module imports only the standard library, numpy and torch.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import time

import numpy as np
import torch

__all__ = ["probe_memory_bandwidth", "machine_info", "llc_bytes", "CpuLoadMeter", "proc_kib_field"]

_MiB = 1 << 20
_FALLBACK_LLC = 32 * _MiB  # used only when neither sysfs nor lscpu says


def _parse_size(text: str) -> int | None:
    """'32768K' / '32 MiB' / '1M' -> bytes."""
    m = re.match(r"\s*([\d.]+)\s*([KMG]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        return None
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def _caches_sysfs() -> list[dict]:
    base = "/sys/devices/system/cpu/cpu0/cache"
    out = []
    try:
        names = sorted(n for n in os.listdir(base) if n.startswith("index"))
    except OSError:
        return out
    for n in names:
        try:
            def rd(f):
                with open(os.path.join(base, n, f)) as fh:
                    return fh.read().strip()
            size = _parse_size(rd("size"))
            out.append({"level": int(rd("level")), "type": rd("type"), "bytes": size,
                        "shared_cpu_list": rd("shared_cpu_list")})
        except (OSError, ValueError):
            continue
    return out


def llc_bytes() -> int:
    """Size of the last-level cache in bytes (sysfs, then lscpu, then a 32 MiB guess)."""
    caches = [c for c in _caches_sysfs() if c["type"] in ("Unified", "Data") and c["bytes"]]
    if caches:
        top = max(c["level"] for c in caches)
        return max(c["bytes"] for c in caches if c["level"] == top)
    try:
        txt = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for key in ("L3 cache", "L2 cache"):
            m = re.search(rf"^{key}:\s*(.+)$", txt, re.MULTILINE)
            if m:
                size = _parse_size(m.group(1))  # "32 MiB (1 instance)"
                if size:
                    return size
    except (OSError, subprocess.SubprocessError):
        pass
    return _FALLBACK_LLC


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def proc_kib_field(path: str, field: str) -> int | None:
    """Bytes of a ``field:  N kB`` line of a /proc file (``/proc/meminfo``,
    ``/proc/self/smaps_rollup``), or None where the file or the field is missing."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _mem_total_bytes() -> int | None:
    return proc_kib_field("/proc/meminfo", "MemTotal")


def machine_info() -> dict:
    """CPU model, core counts, caches, memory, SIMD flags, torch build, hostname."""
    flags = _cpu_flags()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    return {
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "llc_bytes": llc_bytes(),
        "caches": _caches_sysfs(),
        "mem_total_bytes": _mem_total_bytes(),
        "simd": [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16",
                             "avx512_fp16", "amx_bf16") if f in flags],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": bool(torch.cuda.is_available()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


class CpuLoadMeter:
    """Fraction of the machine's CPU time used by *other* processes between start() and stop().

    Benchmarks on a small shared machine are distorted by anything else running (a compiler on
    the second core halves a 2-thread kernel); this makes that visible next to each figure.
    Linux only (/proc/stat); returns None elsewhere.
    """

    def _snap(self):
        try:
            with open("/proc/stat") as fh:
                vals = [int(x) for x in fh.readline().split()[1:]]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
            total = sum(vals[:8])  # guest time is already inside user/nice
            with open("/proc/self/stat") as fh:
                st = fh.read().rsplit(")", 1)[1].split()
            own = int(st[11]) + int(st[12])  # utime + stime, in jiffies
            return total, total - idle, own
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> "CpuLoadMeter":
        self._t0 = self._snap()
        return self

    def stop(self) -> float | None:
        t1 = self._snap()
        if self._t0 is None or t1 is None:
            return None
        d_total, d_busy, d_own = (b - a for a, b in zip(self._t0, t1))
        if d_total <= 0:
            return None
        return round(max(0.0, (d_busy - d_own) / d_total), 3)


def env_threads() -> int | None:
    """``PYKERNELS_NUM_THREADS`` as an int >= 1, None when unset or empty; ValueError naming the
    variable for anything else (the kernels' pool and the probes read it the same way)."""
    env = os.environ.get("PYKERNELS_NUM_THREADS", "").strip()
    if not env:
        return None
    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"PYKERNELS_NUM_THREADS: expected an int >= 1, got {env!r}")
    return int(env)


_SWITCHES: dict = {}


def env_switch(name: str, default: bool = True) -> bool:
    """An on/off environment switch: 1/on/true/yes or 0/off/false/no (any case); unset or empty
    -> ``default``; ValueError naming the variable for anything else (a typo is never ignored).
    Parsed once per distinct value (``PYKERNELS_AUTOTUNE`` is read on every decode call)."""
    raw = os.environ.get(name)
    key = (name, raw, default)
    hit = _SWITCHES.get(key)
    if hit is not None:
        return hit
    v = (raw or "").strip().lower()
    if not v:
        out = default
    elif v in ("1", "on", "true", "yes"):
        out = True
    elif v in ("0", "off", "false", "no"):
        out = False
    else:
        raise ValueError(f"{name}: expected 0/1 (off/on, false/true, no/yes), got {raw!r}")
    _SWITCHES[key] = out
    return out


def _resolve_threads(threads: int | None) -> int:
    if threads is not None:
        return int(threads)
    env = env_threads()
    return env if env is not None else torch.get_num_threads()


def _stats(seconds: list[float], nbytes: int) -> dict:
    t = np.asarray(seconds)
    return {
        "GB_s": nbytes / float(np.median(t)) / 1e9,
        "GB_s_best": nbytes / float(t.min()) / 1e9,
        "GB_s_p10": nbytes / float(np.percentile(t, 90)) / 1e9,  # slow tail -> low bandwidth
        "GB_s_p90": nbytes / float(np.percentile(t, 10)) / 1e9,
        "median_ms": float(np.median(t)) * 1e3,
        "bytes": int(nbytes),
        "repeats": len(seconds),
    }


def probe_memory_bandwidth(size_bytes: int | None = None, repeats: int = 11,
                           threads: int | None = None, warmup: int = 2) -> dict:
    """Measure sustained DRAM read and triad bandwidth (STREAM-style) with torch ops.

    Parameters
    ----------
    size_bytes : int, optional
        Bytes of *each* float32 array. Default: ``max(8 * LLC, 256 MiB)``, so the read kernel
        streams >= 8x the last-level cache and the three triad arrays total >= 768 MiB.
    repeats : int
        Timed repetitions per kernel; the median is reported (spread as p10/p90).
    threads : int, optional
        Threads for the run (torch intra-op threads). Default: ``PYKERNELS_NUM_THREADS`` if
        set, else ``torch.get_num_threads()``, i.e. what the pykernels CPU kernels use.
    warmup : int
        Untimed repetitions first (page faults, frequency ramp).

    Returns
    -------
    dict with ``bandwidth_GB_s`` (= read median, the figure for "% of measured bandwidth"),
    ``read_GB_s``, ``triad_GB_s`` (3-array convention), ``triad_wa_GB_s`` (4 arrays),
    ``copy_GB_s`` (2 arrays),
    ``read_1thread_GB_s`` (the read kernel on one thread), ``read`` / ``triad`` / ``copy`` sub-dicts with
    spread, ``threads``, ``size_bytes``, ``llc_bytes``,
    ``other_cpu_load`` (share of the machine used by other processes meanwhile),
    ``warnings`` and ``machine``.

    Example
    -------
    >>> from roofline import probe_memory_bandwidth
    >>> bw = probe_memory_bandwidth()["bandwidth_GB_s"]
    """
    llc = llc_bytes()
    if size_bytes is None:
        size_bytes = max(8 * llc, 256 * _MiB)
    if size_bytes < 4096:
        raise ValueError(f"size_bytes: expected >= 4096, got {size_bytes}")
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    threads = _resolve_threads(threads)
    if threads < 1:
        raise ValueError(f"threads: expected >= 1, got {threads}")
    n = int(size_bytes) // 4
    nbytes = n * 4
    warnings = []
    if nbytes < 4 * llc:
        warnings.append(f"arrays of {nbytes / _MiB:.1f} MiB are < 4x the {llc / _MiB:.0f} MiB LLC: "
                        "the figures include cache hits and overstate DRAM bandwidth")

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    meter = CpuLoadMeter().start()
    try:
        # fill_ touches every page now (first-touch faults out of the timed loop)
        a = torch.empty(n, dtype=torch.float32).fill_(1.0)
        b = torch.empty(n, dtype=torch.float32).fill_(2.0)
        c = torch.empty(n, dtype=torch.float32).fill_(0.5)
        scalar = 3.0

        def timed(fn, count):
            ts = []
            for _ in range(count):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return ts

        # read: a.sum()  # read N*4 bytes
        timed(lambda: a.sum(), warmup)
        read_t = timed(lambda: a.sum(), repeats)
        total = float(a.sum())
        if abs(total - n) > 1e-3 * n:  # a is all ones; a wrong sum means a broken kernel
            warnings.append(f"read kernel sum {total} != {n}")

        # triad: a = b + s*c  # read 2*N*4, write N*4 bytes (+ N*4 write-allocate, not counted)
        def triad():
            torch.add(b, c, alpha=scalar, out=a)
        timed(triad, warmup)
        triad_t = timed(triad, repeats)
        if float(a[n // 2]) != 2.0 + scalar * 0.5:
            warnings.append("triad kernel wrote a wrong value")

        # copy: b = a  # read N*4, write N*4 bytes (2 arrays, the STREAM convention)
        timed(lambda: b.copy_(a), warmup)
        copy_t = timed(lambda: b.copy_(a), repeats)
        if float(b[n // 2]) != float(a[n // 2]):
            warnings.append("copy kernel wrote a wrong value")
        del b, c

        # one thread alone: how much of the bus a single core can pull (context for scaling)
        torch.set_num_threads(1)
        a.fill_(1.0)
        timed(lambda: a.sum(), 1)
        read1_t = timed(lambda: a.sum(), max(3, repeats // 2))
        del a
    finally:
        other = meter.stop()
        torch.set_num_threads(old_threads)

    read = _stats(read_t, nbytes)
    triad_s = _stats(triad_t, 3 * nbytes)
    copy_s = _stats(copy_t, 2 * nbytes)
    read1 = _stats(read1_t, nbytes)
    triad_wa = 4 * nbytes / float(np.median(triad_t)) / 1e9
    for name, val in (("read", read["GB_s"]), ("triad", triad_s["GB_s"]), ("copy", copy_s["GB_s"])):
        if not np.isfinite(val) or val <= 0:
            warnings.append(f"{name} bandwidth {val} is not a positive finite number")
        elif val > 2000:  # more than any DRAM system a CPU has today: the data sat in a cache
            warnings.append(f"{name} bandwidth {val:.0f} GB/s is implausible for DRAM")
    if other is not None and other > 0.10:
        warnings.append(f"other processes used {100 * other:.0f}% of the CPUs during the probe: "
                        "figures are lower than on a quiet machine")
    spread = read["GB_s_p90"] / max(read["GB_s_p10"], 1e-12)
    if spread > 1.3:
        warnings.append(f"read bandwidth varied {spread:.2f}x between p10 and p90 repeats (noisy machine)")

    return {
        "bandwidth_GB_s": read["GB_s"],
        "read_GB_s": read["GB_s"],
        "triad_GB_s": triad_s["GB_s"],
        "triad_wa_GB_s": triad_wa,
        "copy_GB_s": copy_s["GB_s"],
        "read_1thread_GB_s": read1["GB_s"],
        "read": read,
        "triad": triad_s,
        "copy": copy_s,
        "convention": ("GB = 1e9 bytes; read = a.sum() over one float32 array; triad a = b + s*c "
                       "counted as 3 arrays (STREAM), triad_wa_GB_s counts 4 (write-allocate); copy b = a "
                       "counted as 2; "
                       "median of repeats after warm-up"),
        "threads": threads,
        "size_bytes": nbytes,
        "llc_bytes": llc,
        "other_cpu_load": other,
        "warnings": warnings,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
    }
