"""Cross-check of the bandwidth probe against an independent numpy measurement (issue 5, item 4).

``roofline.probe_memory_bandwidth()`` measures DRAM bandwidth with torch ops on torch's thread
pool; every "% of measured bandwidth" in the benchmarks divides by its read figure. This module
measures the same quantities a second way, with numpy kernels on Python threads, so a probe that
is off (a kernel that is compute-bound, a cache-resident array, a thread count that differs
from the one intended) shows up as a disagreement between the two.

Method of the numpy measurement (``measure_numpy_bandwidth``):

- **Arrays** of ``max(8 * LLC, 512 MiB)`` each by default (capped at 1/16 of the machine's
  memory), so every pass streams from DRAM. ``np.ones`` / ``np.empty`` + ``fill`` touch every
  page before timing.
- **Threads**: ``concurrent.futures.ThreadPoolExecutor`` with as many workers as the probe uses;
  each worker handles one contiguous slice of the arrays. numpy releases the GIL inside
  reductions and ``copyto``, so the slices run in parallel.
- **read**: ``np.add.reduce`` over an ``int64`` slice (counted: the slice's bytes). An integer
  sum is used because numpy's float sum is a pairwise sum that is compute-bound on one core
  (on the 2-core EPYC VM this was written on, float32 ``sum`` streamed ~19 GB/s on one thread,
  the int64 sum ~30-34 GB/s, about as fast as any numpy reduction tried there: float32/int64
  ``maximum.reduce``, axis-0 reductions of a 2-D view); bytes, not dtype, matter for the
  bandwidth. The array is all ones, so the total must equal the element count.
- **copy**: ``np.copyto(dst_slice, src_slice)``, counted as 2 arrays (read + write), the STREAM
  convention the probe also uses; the write-allocate read of the destination is not counted.
- **read, one thread**: ``np.add.reduce`` over the whole array on the calling thread, for
  comparison with the probe's ``read_1thread_GB_s``.
- One untimed pass of each kernel first, then ``repeats`` timed passes; the median is reported.
  GB = 1e9 bytes.

``suite_probe_check`` takes a fresh probe inside the suite, interleaved with the numpy
measurement (rounds of probe then numpy, the order alternating between rounds), because a shared
VM's bandwidth drifts by tens of percent over minutes: a figure from earlier in the run would
compare two different machines.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from roofline.probe import CpuLoadMeter, _mem_total_bytes, _resolve_threads, llc_bytes, \
    probe_memory_bandwidth

from .attention import BenchContext, _join, _target, busy_note, format_targets, wait_for_quiet

__all__ = ["measure_numpy_bandwidth", "suite_probe_check", "format_rows", "SUITES", "main"]

_MiB = 1 << 20
_ELT = np.dtype(np.int64).itemsize
METHOD = ("numpy on Python threads (ThreadPoolExecutor, one contiguous slice each): read = "
          "np.add.reduce over int64, copy = np.copyto counted as 2 arrays; median of repeats "
          "after one untimed pass; GB = 1e9 bytes")
TOLERANCE_PCT = 15.0  # issue 5, benchmark item 4: probe within 15% of the numpy figure


def default_size_bytes(quick: bool = False) -> int:
    """Bytes of each numpy array: ``max(8 * LLC, 512 MiB)``, quick ``max(4 * LLC, 128 MiB)``.

    Capped at 1/16 of the machine's memory (both arrays, and the probe's three after them,
    stay far below it).

    Parameters
    ----------
    quick : bool
        The smaller size for a fast smoke run (still at least 4x the LLC).

    Returns
    -------
    int
        A multiple of 8 bytes.
    """
    llc = llc_bytes()
    size = max(4 * llc, 128 * _MiB) if quick else max(8 * llc, 512 * _MiB)
    mem = _mem_total_bytes()
    if mem:
        size = min(size, mem // 16)
    return size // _ELT * _ELT


def _slices(n: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices covering ``range(n)``, sizes differing by at most one."""
    return [slice(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def _median_seconds(fn, repeats: int) -> float:
    """Run ``fn`` once untimed, then ``repeats`` times; the median wall time in seconds."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def measure_numpy_bandwidth(size_bytes: int | None = None, threads: int | None = None,
                            repeats: int = 7) -> dict:
    """Read, copy and single-thread read bandwidth measured with numpy on Python threads.

    Parameters
    ----------
    size_bytes : int, optional
        Bytes of *each* of the two int64 arrays (rounded down to a multiple of 8). Default:
        ``default_size_bytes()``, i.e. ``max(8 * LLC, 512 MiB)``.
    threads : int, optional
        Worker threads for read and copy. Default: the probe's rule (``PYKERNELS_NUM_THREADS``
        if set, else ``torch.get_num_threads()``).
    repeats : int
        Timed passes per kernel after one untimed pass; the median is reported.

    Returns
    -------
    dict
        ``read_GB_s``, ``copy_GB_s`` (2 arrays counted), ``read_1thread_GB_s``, ``threads``,
        ``size_bytes`` (of each array), ``repeats``, ``other_cpu_load`` (share of the CPUs used by
        other processes meanwhile, None where unknown), ``warnings`` and ``method`` (one line).

    Raises
    ------
    ValueError
        If ``size_bytes`` < 8 (or <= 0), ``threads`` < 1 or ``repeats`` < 1; the message names
        the argument.
    """
    if size_bytes is None:
        size_bytes = default_size_bytes()
    if size_bytes < _ELT:
        raise ValueError(f"size_bytes: expected >= {_ELT}, got {size_bytes}")
    threads = _resolve_threads(threads)
    if threads < 1:
        raise ValueError(f"threads: expected >= 1, got {threads}")
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    n = int(size_bytes) // _ELT
    nbytes = n * _ELT
    warnings = []
    llc = llc_bytes()
    if nbytes < 4 * llc:
        warnings.append(f"arrays of {nbytes / _MiB:.1f} MiB are < 4x the {llc / _MiB:.0f} MiB LLC: "
                        "the figures include cache hits and overstate DRAM bandwidth")

    src = np.ones(n, dtype=np.int64)  # np.ones writes every page: first touch is out of the timing
    dst = np.empty_like(src)
    dst.fill(0)
    parts = _slices(n, threads)
    meter = CpuLoadMeter().start()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        def read():
            return sum(pool.map(lambda s: int(np.add.reduce(src[s])), parts))

        def copy():
            list(pool.map(lambda s: np.copyto(dst[s], src[s]), parts))

        read_s = _median_seconds(read, repeats)
        if read() != n:
            warnings.append("numpy read kernel returned a wrong sum")
        copy_s = _median_seconds(copy, repeats)
    read1_s = _median_seconds(lambda: np.add.reduce(src), repeats)
    other = meter.stop()
    if not np.array_equal(dst[:: max(1, n // 4096)], src[:: max(1, n // 4096)]):
        warnings.append("numpy copy kernel wrote wrong values")
    if other is not None and other > 0.10:
        warnings.append(f"other processes used {100 * other:.0f}% of the CPUs during the numpy "
                        "measurement: figures are lower than on a quiet machine")
    return {
        "read_GB_s": nbytes / read_s / 1e9,
        "copy_GB_s": 2 * nbytes / copy_s / 1e9,
        "read_1thread_GB_s": nbytes / read1_s / 1e9,
        "threads": threads,
        "size_bytes": nbytes,
        "repeats": repeats,
        "other_cpu_load": other,
        "warnings": warnings,
        "method": METHOD,
    }


_QUANTITIES = (  # (result key, row label, probe method, numpy method)
    ("read_GB_s", "read", "torch a.sum() float32, torch threads",
     "np.add.reduce int64, one slice per Python thread"),
    ("copy_GB_s", "copy (2 arrays)", "torch b.copy_(a) float32, torch threads",
     "np.copyto, one slice per Python thread"),
    ("read_1thread_GB_s", "read, 1 thread", "torch a.sum() float32, 1 torch thread",
     "np.add.reduce int64, calling thread"),
)


def suite_probe_check(ctx: BenchContext) -> dict:
    """Probe bandwidth vs the numpy measurement, taken back to back in rounds within this suite.

    Each round runs ``probe_memory_bandwidth`` and ``measure_numpy_bandwidth`` on the probe's
    thread count, the order alternating between rounds so a drift in the machine's bandwidth
    does not favour either side; each figure is the median over rounds. The rounds are many and
    short because a shared VM's bandwidth can jump between ~35 and ~65 GB/s within seconds: with
    few rounds the two medians can fall on different levels. Full: 12 rounds (~40 s), the probe
    at its default size and repeats, numpy at ``max(8 * LLC, 512 MiB)``; ``ctx.quick``: 5 rounds,
    both at ``max(4 * LLC, 128 MiB)``, 5 repeats. With ``ctx.wait_quiet_s`` each round first waits
    (up to that long) for other processes to go idle.

    Parameters
    ----------
    ctx : BenchContext
        Uses ``quick``, ``wait_quiet_s`` and ``log``; ``ctx.probe`` only for its thread count
        (default: the probe's own rule).

    Returns
    -------
    dict
        ``rows`` (read, copy, read 1 thread: ``label``, ``method``, ``probe_GB_s``,
        ``numpy_GB_s``, ``ratio`` = probe / numpy, the per-round figures and ratios, the median
        of the per-round ratios as a drift-robust cross-check, sizes),
        ``targets`` (read and copy: ``100 * |ratio - 1|`` <= 15) and ``notes``.
    """
    rounds = 5 if ctx.quick else 12
    np_size = default_size_bytes(quick=ctx.quick)
    probe_kw = dict(size_bytes=np_size, repeats=5) if ctx.quick else {}
    np_repeats = 5 if ctx.quick else 7
    threads = (ctx.probe or {}).get("threads") or _resolve_threads(None)
    probes, nps = [], []
    for i in range(rounds):
        if ctx.wait_quiet_s:
            wait_for_quiet(ctx.wait_quiet_s)
        order = ("probe", "numpy") if i % 2 == 0 else ("numpy", "probe")
        for which in order:
            if which == "probe":
                probes.append(probe_memory_bandwidth(threads=threads, **probe_kw))
            else:
                nps.append(measure_numpy_bandwidth(np_size, threads=threads, repeats=np_repeats))
        ctx.log(f"probe-check round {i + 1}/{rounds}: read probe {probes[-1]['read_GB_s']:.1f} vs "
                f"numpy {nps[-1]['read_GB_s']:.1f} GB/s, copy {probes[-1]['copy_GB_s']:.1f} vs "
                f"{nps[-1]['copy_GB_s']:.1f} GB/s")

    loads = [x["other_cpu_load"] for x in probes + nps if x["other_cpu_load"] is not None]
    rows = []
    for key, label, p_method, n_method in _QUANTITIES:
        p_rounds = [p[key] for p in probes]
        n_rounds = [m[key] for m in nps]
        p_med, n_med = float(np.median(p_rounds)), float(np.median(n_rounds))
        rows.append({
            "suite": "probe-1", "label": label, "method": f"probe: {p_method}; numpy: {n_method}",
            "probe_GB_s": p_med, "numpy_GB_s": n_med, "ratio": p_med / n_med,
            "probe_rounds_GB_s": p_rounds, "numpy_rounds_GB_s": n_rounds,
            "round_ratios": [p / m for p, m in zip(p_rounds, n_rounds)],
            "median_round_ratio": float(np.median([p / m for p, m in zip(p_rounds, n_rounds)])),
            "threads": 1 if key == "read_1thread_GB_s" else threads,
            "probe_size_bytes": probes[0]["size_bytes"], "numpy_size_bytes": nps[0]["size_bytes"],
            "other_cpu_load": max(loads, default=None),
        })
    ctx.log(format_rows(rows))

    # load warnings are summed up by busy_note (one line, the worst share) instead of one per call
    warnings = sorted({w for x in probes + nps for w in x["warnings"] if "other processes" not in w})
    caveats = _join(busy_note(rows), *warnings)
    targets = []
    for r in rows[:2]:
        dev = 100.0 * abs(r["ratio"] - 1.0)
        spread = ", ".join(f"{x:.3f}" for x in r["round_ratios"])
        targets.append(_target(
            f"probe {r['label']} bandwidth within {TOLERANCE_PCT:.0f}% of numpy", dev, "<=",
            TOLERANCE_PCT,
            "{value:.1f}%" + f" (probe {r['probe_GB_s']:.1f} GB/s vs numpy {r['numpy_GB_s']:.1f} GB/s)",
            note=_join(f"per-round probe/numpy ratios {spread} (median "
                       f"{r['median_round_ratio']:.3f})", caveats)))
    notes = [
        f"a fresh probe is taken inside this suite, {rounds} rounds interleaved with the numpy "
        "measurement (order alternating), not the run's probe from minutes earlier: the "
        "machine's bandwidth drifts between them",
        f"probe arrays {probes[0]['size_bytes'] / _MiB:.0f} MiB (float32), numpy arrays "
        f"{nps[0]['size_bytes'] / _MiB:.0f} MiB (int64), LLC {llc_bytes() / _MiB:.0f} MiB, "
        f"{threads} thread(s)",
        f"numpy method: {METHOD}",
        "read, 1 thread has no target: what one core pulls depends on the kernel's code (how "
        "many loads it keeps in flight), not only on the memory system; numpy's reductions top "
        "out below torch's float32 sum on one core, so the row is context for the probe's scaling",
    ]
    return {"rows": rows, "targets": targets, "notes": notes}


SUITES = [("probe-1", "Probe bandwidth vs an independent numpy measurement (same run)", suite_probe_check)]


def _fmt(x) -> str:
    return f"{'-':>10}" if x is None else f"{x:>10.3f}"


def format_rows(rows: list[dict]) -> str:
    """Plain-text table of ``suite_probe_check`` rows (also valid inside a markdown code block).

    Parameters
    ----------
    rows : list of dict
        Rows with ``label``, ``probe_GB_s``, ``numpy_GB_s``, ``ratio`` and, optionally,
        ``median_round_ratio`` and ``round_ratios``.

    Returns
    -------
    str
    """
    lines = [f"{'quantity':<16} {'probe GB/s':>10} {'numpy GB/s':>10} {'probe/numpy':>11} "
             f"{'deviation':>9} {'med. round':>10}  per-round ratios"]
    for r in rows:
        rr = " ".join(f"{x:.3f}" for x in r.get("round_ratios", []))
        lines.append(f"{r['label']:<16} {r['probe_GB_s']:>10.2f} {r['numpy_GB_s']:>10.2f} "
                     f"{r['ratio']:>11.3f} {100 * abs(r['ratio'] - 1):>8.1f}% "
                     f"{_fmt(r.get('median_round_ratio'))}  {rr}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m bench.probe_check [--quick] [--wait-quiet S]``: run the suite, print rows, targets and notes.

    Returns
    -------
    int
        0 when every target passes, 1 otherwise.
    """
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.probe_check", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller arrays, fewer rounds")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each round, wait up to this long for other processes to go idle")
    args = ap.parse_args(argv)
    res = suite_probe_check(BenchContext(bandwidth_GB_s=None, quick=args.quick,
                                         wait_quiet_s=args.wait_quiet))
    print(format_targets(res["targets"]))
    for n in res["notes"]:
        print(f"note: {n}")
    return 0 if all(t["passed"] for t in res["targets"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
