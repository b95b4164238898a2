"""Measured machine profile: ``roofline.probe(device=...)`` and ``probe_disk(path)``.

The roofs a run is placed against, measured on this machine rather than taken from a datasheet:

- compute: best-of-repeats square matmuls (``2 * n**3`` FLOP) per dtype, torch's own GEMMs;
- memory: STREAM-style read / copy / triad over arrays >= 4x the last-level cache
  (:func:`roofline.probe.probe_memory_bandwidth`: read, triad, and copy credited with 2 arrays);
- disk: cold sequential write (fsync included) and read of a fresh file, through O_DIRECT or,
  where the filesystem refuses it, buffered I/O with the pages dropped (``POSIX_FADV_DONTNEED``)
  before reading; never the page cache;
- CUDA: GPU matmul peaks, HBM read / copy / triad, and pinned / pageable host<->device copies.

Profiles are cached as JSON in ``$XDG_CACHE_HOME/pykernels/roofline/`` (default
``~/.cache/pykernels/roofline/``), one file per machine identity, device, quick flag, disk
directories and thread count. All bandwidths are bytes/s, all peaks FLOP/s (OP/s for int8).

Example
-------
>>> import roofline
>>> m = roofline.probe(quick=True)                # doctest: +SKIP
>>> m.peak("bf16") / 1e9, m.mem_bandwidth["read"] / 1e9   # doctest: +SKIP
(859.0, 21.3)
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import re
import tempfile
import time
import warnings

import torch

from .hardware import MachineProfile
from .probe import _caches_sysfs, _resolve_threads, llc_bytes, machine_info, probe_memory_bandwidth

__all__ = ["probe", "probe_disk", "gpu_identity", "cache_dir", "cached_profile"]

_MiB = 1 << 20
_CACHE_VERSION = 3  # 2: mem_bandwidth has read_1thread; 3: caches
_DEVICES = ("cpu", "cuda")


# ------------------------------------------------------------------------------------ disk
def _full_io(fn, fd, view) -> None:
    """Call ``fn(fd, view[done:])`` until the whole buffer moved (short reads/writes)."""
    done = 0
    while done < len(view):
        n = fn(fd, view[done:])
        if n <= 0:
            raise OSError(errno.EIO, f"short transfer: {done} of {len(view)} bytes")
        done += n


def _disk_pass(name: str, size: int, buf: mmap.mmap, direct: bool) -> tuple[float, float]:
    """Write ``size`` bytes to ``name`` then read them back cold -> (write_s, read_s)."""
    flag = os.O_DIRECT if direct else 0
    view = memoryview(buf)
    chunk = len(buf)
    fd = os.open(name, os.O_WRONLY | os.O_TRUNC | flag)
    try:
        t0 = time.perf_counter()
        for off in range(0, size, chunk):
            _full_io(os.write, fd, view[:min(chunk, size - off)])
        os.fsync(fd)
        write_s = time.perf_counter() - t0
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written pages leave the cache
    finally:
        os.close(fd)
    fd = os.open(name, os.O_RDONLY | flag)
    try:
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        for off in range(0, size, chunk):
            _full_io(lambda f, v: os.readv(f, [v]), fd, view[:min(chunk, size - off)])
        read_s = time.perf_counter() - t0
    finally:
        os.close(fd)
    return write_s, read_s


def probe_disk(path, size_bytes: int | None = None, quick: bool = False) -> dict:
    """Cold sequential write and read bandwidth of the filesystem holding ``path``.

    A fresh file (unique name, removed afterwards even on error) is written in 4 MiB chunks
    from a page-aligned ``mmap`` buffer of random bytes, ``fsync`` included in the write time,
    then read back. O_DIRECT is used where the filesystem accepts it; where it is refused
    (``EINVAL``, e.g. tmpfs) the file is written buffered and its pages are dropped with
    ``posix_fadvise(POSIX_FADV_DONTNEED)`` after ``fsync`` and before the read. (On tmpfs the
    file *is* memory, so that figure is memory speed.) Linux only.

    Parameters
    ----------
    path : str or os.PathLike
        An existing directory on the filesystem to measure.
    size_bytes : int, optional
        File size, rounded down to a multiple of 4 KiB. Default 256 MiB, 64 MiB if ``quick``.
    quick : bool
        Smaller default file.

    Returns
    -------
    dict
        ``{"read": bytes/s, "write": bytes/s, "method": "o_direct" | "fadvise",
        "size_bytes": int}``.

    Example
    -------
    >>> d = probe_disk("/tmp", size_bytes=8 << 20)
    >>> d["read"] > 0 and d["method"] in ("o_direct", "fadvise")
    True
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path: {path!r} does not exist or is not a directory")
    if size_bytes is None:
        size_bytes = (64 if quick else 256) * _MiB
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < 4096:
        raise ValueError(f"size_bytes: expected an int >= 4096, got {size_bytes!r}")
    if not hasattr(os, "posix_fadvise"):
        raise RuntimeError("probe_disk: needs os.posix_fadvise (Linux)")
    size = size_bytes - size_bytes % 4096
    buf = mmap.mmap(-1, min(4 * _MiB, size))  # anonymous mmap: page-aligned, as O_DIRECT needs
    buf[:] = os.urandom(len(buf))              # incompressible, in case the device compresses
    fd, name = tempfile.mkstemp(prefix=".roofline-disk-", suffix=".tmp", dir=path)
    os.close(fd)
    try:
        method = "o_direct" if hasattr(os, "O_DIRECT") else "fadvise"
        try:
            write_s, read_s = _disk_pass(name, size, buf, method == "o_direct")
        except OSError as exc:
            if exc.errno != errno.EINVAL or method != "o_direct":
                raise
            method = "fadvise"
            write_s, read_s = _disk_pass(name, size, buf, False)
    finally:
        buf.close()
        os.unlink(name)
    return {"read": size / read_s, "write": size / write_s, "method": method,
            "size_bytes": size}


# ------------------------------------------------------------------------------------ timing
def _best_seconds(fn, repeats: int, cuda: bool) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up (CUDA events when ``cuda``)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def _matmul_flops(dtype: torch.dtype, n: int, repeats: int, device: str) -> float:
    """FLOP/s of an ``n x n @ n x n`` matmul (``torch._int_mm`` for int8): 2*n^3 / best time."""
    if dtype == torch.int8:
        a = torch.randint(-8, 8, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-8, 8, (n, n), dtype=torch.int8, device=device)
        return 2 * n ** 3 / _best_seconds(lambda: torch._int_mm(a, b), repeats, device == "cuda")
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n ** 3 / _best_seconds(lambda: torch.mm(a, b), repeats, device == "cuda")


def _int8_error(device: str) -> str | None:
    """None if ``torch._int_mm`` runs on ``device``, else why not."""
    try:
        a = torch.ones(32, 32, dtype=torch.int8, device=device)
        if int(torch._int_mm(a, a)[0, 0]) != 32:
            return "torch._int_mm gave a wrong result"
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        return f"torch._int_mm unavailable: {str(exc).splitlines()[0]}"
    return None


# ------------------------------------------------------------------------------------ devices
def _measure_cpu(quick: bool, threads: int) -> tuple[dict, dict, float, list[str]]:
    n, reps = (2048, 3) if quick else (4096, 5)
    notes = [f"{threads} threads", f"matmul n={n}, best of {reps}, 2n^3 FLOP"]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peaks = {"fp32": _matmul_flops(torch.float32, n, reps, "cpu"),
                 "bf16": _matmul_flops(torch.bfloat16, n, reps, "cpu")}
        err = _int8_error("cpu")
        if err is None:
            peaks["int8"] = _matmul_flops(torch.int8, n, reps, "cpu")
        else:
            notes.append(f"int8 not measured: {err}")
        # fp16: listed only where torch has a native CPU GEMM for it (often it is a slow
        # scalar loop, ~100x below bf16, which would be no roof at all)
        # (best of 5 each, and the fp32 reference never below a quarter of the n-size peak: one
        # slow fp32 sample on a busy machine once let a ~0.2 GFLOP/s fp16 loop through, timed at
        # n=2048 for minutes)
        fp16_small = _matmul_flops(torch.float16, 256, 5, "cpu")
        ref = max(_matmul_flops(torch.float32, 256, 5, "cpu"), 0.25 * peaks["fp32"])
        if fp16_small >= 0.5 * ref:
            peaks["fp16"] = _matmul_flops(torch.float16, n, reps, "cpu")
        else:
            notes.append(f"fp16 not listed: {fp16_small / 1e9:.1f} GFLOP/s at n=256, "
                         "below half the fp32 rate (no native fp16 GEMM)")
    finally:
        torch.set_num_threads(old)

    llc = llc_bytes()
    size, mreps = (max(4 * llc, 64 * _MiB), 5) if quick else (max(8 * llc, 256 * _MiB), 11)
    stream = probe_memory_bandwidth(size_bytes=size, repeats=mreps, threads=threads)
    bw = {"read": stream["read_GB_s"] * 1e9,
          "copy": stream["copy_GB_s"] * 1e9,
          "triad": stream["triad_GB_s"] * 1e9}
    if stream.get("read_1thread_GB_s"):  # one thread's read rate (a bare torch sum), for reports
        bw["read_1thread"] = stream["read_1thread_GB_s"] * 1e9
    notes.append(f"memory arrays {stream['size_bytes'] / _MiB:.0f} MiB each "
                 f"(LLC {llc / _MiB:.0f} MiB), median of {mreps}; read a.sum(), copy b.copy_(a) "
                 "(2 arrays), triad a=b+s*c (3 arrays)")
    notes += [f"memory warning: {w}" for w in stream["warnings"]]
    capacity = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return peaks, bw, capacity, notes


def _hbm_bandwidth(nbytes: int, repeats: int) -> dict:
    """GPU read (``a.sum()``), copy (2 arrays) and triad (3 arrays) in bytes/s, best of repeats."""
    a = torch.ones(nbytes // 4, device="cuda")
    b, c = torch.zeros_like(a), torch.full_like(a, 0.5)
    return {"read": nbytes / _best_seconds(lambda: a.sum(), repeats, True),
            "copy": 2 * nbytes / _best_seconds(lambda: b.copy_(a), repeats, True),
            "triad": 3 * nbytes / _best_seconds(lambda: torch.add(b, c, alpha=3.0, out=a),
                                                repeats, True)}


def _measure_cuda(quick: bool) -> tuple[dict, dict, dict, float, list[str]]:
    # Not yet run on a GPU (written and reviewed on CPU-only machines).
    dev = "cuda"
    n, reps = (4096, 5) if quick else (8192, 10)
    notes = [f"GPU {torch.cuda.get_device_name(0)}, NVML {json.dumps(gpu_identity())}",
             f"matmul n={n}, best of {reps}, CUDA events"]
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # "fp32" is the non-tensor rate
    try:
        peaks = {"fp32": _matmul_flops(torch.float32, n, reps, dev)}
        torch.backends.cuda.matmul.allow_tf32 = True
        peaks["tf32"] = _matmul_flops(torch.float32, n, reps, dev)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        peaks[name] = _matmul_flops(dtype, n, reps, dev)
    err = _int8_error(dev)
    if err is None:
        peaks["int8"] = _matmul_flops(torch.int8, n, reps, dev)
    else:
        notes.append(f"int8 not measured: {err}")

    nbytes = (512 if quick else 2048) * _MiB
    bw = _hbm_bandwidth(nbytes, reps)
    hbytes = (256 if quick else 1024) * _MiB
    d = torch.empty(hbytes, dtype=torch.uint8, device=dev)
    links = {}
    for kind, host in (("pinned", torch.empty(hbytes, dtype=torch.uint8, pin_memory=True)),
                       ("pageable", torch.empty(hbytes, dtype=torch.uint8))):
        links[f"h2d_{kind}"] = hbytes / _best_seconds(lambda: d.copy_(host), reps, True)
        links[f"d2h_{kind}"] = hbytes / _best_seconds(lambda: host.copy_(d), reps, True)
    notes.append(f"HBM arrays {nbytes / _MiB:.0f} MiB, host copies {hbytes / _MiB:.0f} MiB, "
                 "best of repeats")
    capacity = float(torch.cuda.get_device_properties(0).total_memory)
    return peaks, bw, links, capacity, notes


def gpu_identity(index: int = 0) -> dict:
    """Identity of GPU ``index`` via NVML (``nvidia-ml-py``); never raises.

    Returns
    -------
    dict
        ``{"gpu": name, "memory_bytes", "pcie_gen", "pcie_gen_max", "pcie_width",
        "pcie_width_max", "sm_clock_max_mhz", "mem_clock_max_mhz", "driver"}``, or
        ``{"gpu": None, "reason": str}`` when NVML or a GPU is missing.

    Example
    -------
    >>> gpu_identity()["gpu"] is None or isinstance(gpu_identity()["gpu"], str)
    True
    """
    try:
        import pynvml
    except ImportError:
        return {"gpu": None, "reason": "nvidia-ml-py (pynvml) is not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"gpu": None, "reason": f"NVML unavailable (no NVIDIA driver or GPU): {exc}"}
    try:
        if pynvml.nvmlDeviceGetCount() <= index:
            return {"gpu": None, "reason": f"no NVIDIA GPU with index {index}"}
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(h)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {
            "gpu": name.decode() if isinstance(name, bytes) else name,
            "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
            "pcie_gen": pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h),
            "pcie_gen_max": pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h),
            "pcie_width": pynvml.nvmlDeviceGetCurrPcieLinkWidth(h),
            "pcie_width_max": pynvml.nvmlDeviceGetMaxPcieLinkWidth(h),
            "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
        }
    except pynvml.NVMLError as exc:
        return {"gpu": None, "reason": f"NVML query failed: {exc}"}
    finally:
        pynvml.nvmlShutdown()


# ------------------------------------------------------------------------------------ cache
def pykernels_cache(*parts: str) -> str:
    """``$XDG_CACHE_HOME/pykernels/<parts>`` (default ``~/.cache``): where every part of the
    package keeps what it measures or converts (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pykernels", *parts)


def cache_dir() -> str:
    """Directory of cached profiles: ``$XDG_CACHE_HOME/pykernels/roofline`` (default ``~/.cache``).

    Example
    -------
    >>> cache_dir().endswith(os.path.join("pykernels", "roofline"))
    True
    """
    return pykernels_cache("roofline")


def _identity(device: str) -> str:
    """CPU model, usable CPUs and a hostname hash (plus the GPU name for cuda)."""
    info = machine_info()
    host = hashlib.sha256(info["hostname"].encode()).hexdigest()[:8]
    ident = f"{info['cpu_model']} x{info['usable_cpus']} host-{host}"
    return f"{torch.cuda.get_device_name(0)} on {ident}" if device == "cuda" else ident


def file_stem(identity: str, limit: int = 100) -> str:
    """``identity`` as a file-name stem of at most ``limit`` characters. A longer one keeps its
    start and ends with a hash of the whole identity: cutting it off would drop the host hash at
    its end, and two hosts whose GPU / CPU names share the first ``limit`` characters would then
    share one cache file."""
    stem = re.sub(r"[^A-Za-z0-9.-]+", "_", identity).strip("_")
    if len(stem) <= limit:
        return stem
    return stem[:limit - 17] + "-" + hashlib.sha256(identity.encode()).hexdigest()[:16]


def _cache_path(identity: str, device: str, quick: bool, disk_dirs: tuple, threads: int) -> str:
    key = hashlib.sha256(json.dumps([disk_dirs, threads]).encode()).hexdigest()[:8]
    stem = file_stem(identity)
    return os.path.join(cache_dir(),
                        f"{stem}-{device}-{'quick' if quick else 'full'}-{key}.json")


def _read_cache(path: str) -> MachineProfile | None:
    """The cached profile, or None if the file is missing, unreadable or not a profile."""
    try:
        with open(path) as fh:
            data = json.load(fh)
        if data.get("version") != _CACHE_VERSION:
            return None
        return MachineProfile.from_dict(data["profile"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _write_cache(path: str, profile: MachineProfile) -> None:
    """Atomic write: a temp file in the same directory, fsync, then ``os.replace``."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    except OSError as exc:
        warnings.warn(f"roofline.probe: cannot write the cache {path!r}: {exc}", stacklevel=3)
        return
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": _CACHE_VERSION, "profile": profile.to_dict()}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"roofline.probe: cannot write the cache {path!r}: {exc}", stacklevel=3)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------ probe
def _measure(device: str, quick: bool, disk_dirs: tuple, threads: int) -> MachineProfile:
    t0 = time.perf_counter()
    notes = [f"measured by roofline.probe(device={device!r}, quick={quick}) at "
             f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}"]
    links = {}
    if device == "cpu":
        peaks, bw, capacity, more = _measure_cpu(quick, threads)
    else:
        peaks, bw, links, capacity, more = _measure_cuda(quick)
    notes += more
    disk = {}
    for d in disk_dirs:
        res = probe_disk(d, quick=quick)
        disk[d] = res
        notes.append(f"disk {d}: {res['size_bytes'] / _MiB:.0f} MiB, {res['method']}")
    if disk_dirs:
        links["disk_read"] = disk[disk_dirs[0]]["read"]
        links["disk_write"] = disk[disk_dirs[0]]["write"]
    notes.append(f"probe took {time.perf_counter() - t0:.1f} s")
    return MachineProfile(name=_identity(device), peak_flops=peaks, mem_bandwidth=bw,
                          mem_capacity=capacity, disk=disk, links=links, source="measured",
                          notes="; ".join(notes), caches=_cache_sizes(device))


def _cache_sizes(device: str) -> dict[str, float]:
    """CPU: data and unified caches from sysfs ("L1d", "L2", "L3": bytes per instance);
    CUDA: the GPU's L2 (torch's device properties)."""
    if device == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
        return {"L2": float(l2)} if l2 else {}
    out = {}
    for c in _caches_sysfs():
        if c["type"] in ("Data", "Unified") and c["bytes"]:
            out[f"L{c['level']}{'d' if c['type'] == 'Data' else ''}"] = float(c["bytes"])
    return out


def probe(device: str = "cpu", quick: bool = False, disk_dirs=(), cache: bool = True,
          threads: int | None = None, refresh: bool = False) -> MachineProfile:
    """Measure this machine's roofs (cached per machine identity).

    Parameters
    ----------
    device : {"cpu", "cuda"}
        ``"cpu"``: torch matmul peaks (fp32, bf16, int8 via ``torch._int_mm`` and fp16 where
        they run natively), read/copy/triad DRAM bandwidth, RAM size. ``"cuda"``: GPU matmul
        peaks (fp32, tf32, fp16, bf16, int8), HBM read/copy/triad, ``h2d_pinned``,
        ``d2h_pinned``, ``h2d_pageable``, ``d2h_pageable`` links, GPU memory size; RuntimeError
        without a GPU. The CUDA path has not been run on a GPU yet.
    quick : bool
        Smaller matmuls and arrays (still >= 4x the LLC), fewer repeats: a few seconds on a
        small CPU; the full probe takes a minute or two.
    disk_dirs : sequence of paths
        Directories whose filesystem is measured with :func:`probe_disk`; the first one also
        gives ``links["disk_read"]`` / ``links["disk_write"]``.
    cache : bool
        Return the cached profile when there is one, and store a new one.
    threads : int, optional
        CPU threads (default ``PYKERNELS_NUM_THREADS``, else ``torch.get_num_threads()``).
    refresh : bool
        Measure again even if a cached profile exists (and update the cache).

    Returns
    -------
    MachineProfile
        ``source="measured"``; ``peak_flops`` FLOP/s, ``mem_bandwidth`` / ``disk`` / ``links``
        bytes/s, ``mem_capacity`` bytes, ``notes`` saying what was measured and how.

    Example
    -------
    >>> import roofline
    >>> m = roofline.probe(quick=True, disk_dirs=["/tmp"])    # doctest: +SKIP
    >>> sorted(m.mem_bandwidth), m.disk["/tmp"]["method"]      # doctest: +SKIP
    (['copy', 'read', 'triad'], 'o_direct')
    """
    if not isinstance(device, str):
        raise TypeError(f"device: expected a str, got {type(device).__name__}")
    if device not in _DEVICES:
        raise ValueError(f"device: expected one of {list(_DEVICES)}, got {device!r}")
    if isinstance(disk_dirs, (str, os.PathLike)):
        disk_dirs = (disk_dirs,)
    dirs = []
    for d in disk_dirs:
        if not isinstance(d, (str, os.PathLike)):
            raise TypeError(f"disk_dirs: expected paths, got {type(d).__name__}")
        if not os.path.exists(d):
            raise ValueError(f"disk_dirs: {os.fspath(d)!r} does not exist")
        if not os.path.isdir(d):
            raise ValueError(f"disk_dirs: {os.fspath(d)!r} is not a directory")
        dirs.append(os.path.abspath(d))
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
        raise TypeError(f"threads: expected an int or None, got {type(threads).__name__}")
    threads = _resolve_threads(threads)
    if threads < 1:
        raise ValueError(f"threads: expected >= 1, got {threads}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' requested but no CUDA GPU is available")

    dirs = tuple(dict.fromkeys(dirs))
    path = _cache_path(_identity(device), device, bool(quick), dirs, threads)
    if cache and not refresh:
        cached = _read_cache(path)
        if cached is not None:
            return cached
    profile = _measure(device, bool(quick), dirs, threads)
    if cache:
        _write_cache(path, profile)
    return profile


def cached_profile(device: str = "cpu", quick: bool | None = None,
                   threads: int | None = None) -> MachineProfile | None:
    """The profile :func:`probe` cached for this machine, or None; never measures.

    ``quick=None`` takes the full probe's profile when there is one, else the quick one. Only
    profiles without disk directories are looked up. This is what ``method="auto"`` consults
    (a decode call must not start a probe).
    """
    if device not in _DEVICES:
        raise ValueError(f"device: expected one of {list(_DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        return None
    threads = _resolve_threads(threads)
    ident = _identity(device)
    for q in ((False, True) if quick is None else (bool(quick),)):
        prof = _read_cache(_cache_path(ident, device, q, (), threads))
        if prof is not None:
            return prof
    return None

