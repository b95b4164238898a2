"""Decode-attention benchmark suites (issue 2, "Benchmark").

How a figure is produced (the same for every method, baselines included):

- **Bytes** are counted, not inferred: the KV bytes a decode step must read,
  ``sum(seqlens) * Hkv * D * 2 (K and V) * elt_size``, plus ``q`` (read) and ``out`` (written),
  ``B * Hq * D * elt_size`` each. GB/s = bytes / median time (GB = 1e9 bytes); "% bw" divides by
  the read bandwidth from ``roofline.probe_memory_bandwidth()`` measured in the same run. A
  baseline that moves more than this minimum (SDPA, the reference) is still credited only with
  the minimum, so its GB/s is an *effective* rate.
- **Cold caches**, as in multi-layer decoding where layer l's KV was evicted by layers l+1..:
  every call reads a different KV buffer from a pool whose touched bytes total at least
  ``max(4 * LLC, 256 MiB)``; a buffer is reused only after the whole pool has been read.
- **Warm-up** calls first (thread pool start, first-touch, plan caches), then ``repeats`` timed
  calls per method, **interleaved** round-robin across methods so background load on a shared
  machine hits all of them alike. Median and p10/p90 are reported. Slow baselines get fewer
  repeats (a time budget), never fewer than 3.
- **Correctness** of every method is checked once per configuration against the pure-torch
  reference (when the configuration is small enough) so a fast wrong kernel cannot pass.

Methods: ``lean``, ``split`` (auto splits), ``unsplit`` (``method="split", num_splits=1``: one
work unit per (sequence, kv-head)), ``split<S>`` (``num_splits=S``), ``auto`` (pykernels); ``sdpa`` (torch SDPA as a user calls
it: cache in SDPA's own ``[B, Hkv, L, D]`` layout, ``q`` as ``[B, Hq, 1, D]``,
``enable_gqa=True``: what Hugging Face transformers does on torch >= 2.5 without a mask);
``sdpa_grouped`` (SDPA with the G query heads of a kv-head folded into G query rows, a manual
trick that avoids GQA broadcasting; informative only); ``reference`` (the naive pure-torch
``pykernels.reference.decode_attention_reference``).
"""

from __future__ import annotations

import gc
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pykernels.memory import empty_cache_tensor, hugepages_enabled, thp_mode

from roofline.advise import parse_schedule_label
from roofline.probe import CpuLoadMeter, llc_bytes

from .roof import annotate

_MiB = 1 << 20
_GiB = 1 << 30

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
          "float32": torch.float32, "float": torch.float32}
PK_METHODS = ("lean", "split", "unsplit", "auto")
TORCH_METHODS = ("sdpa", "sdpa_grouped", "reference")
ALL_METHODS = PK_METHODS + TORCH_METHODS


def fixed_splits(method: str) -> int | None:
    """S of a ``"split<S>"`` method name (``method="split", num_splits=S``; the advisor's and
    autotune's schedule labels), else None."""
    choice = parse_schedule_label(method)
    return choice["num_splits"] if choice and choice["method"] == "split" else None


def is_pk_method(method: str) -> bool:
    """A pykernels method: one of PK_METHODS or ``split<S>``."""
    return method in PK_METHODS or fixed_splits(method) is not None
# speedup columns: time(baseline) / time(method), > 1 means the method is faster
BASELINES = ("sdpa", "sdpa_grouped", "reference", "unsplit", "split")


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {name!r}") from None


def dtype_name(dt: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dt]


@dataclass
class AttnConfig:
    """One decode step: q [B, Hq, D], dense cache [B, max(seqlens), Hkv, D]."""
    batch: int
    heads_q: int
    heads_kv: int
    head_dim: int
    seqlens: list
    dtype: str = "bf16"  # cache dtype; q and out use the same dtype

    def __post_init__(self):
        self.seqlens = [int(x) for x in self.seqlens]
        if len(self.seqlens) != self.batch:
            raise ValueError(f"seqlens: expected {self.batch} lengths (batch), got {len(self.seqlens)}")
        if min(self.seqlens) < 1:
            raise ValueError(f"seqlens: every length must be >= 1, got {min(self.seqlens)}")
        if self.heads_q % self.heads_kv:
            raise ValueError(f"heads_q: {self.heads_q} is not a multiple of heads_kv {self.heads_kv}")
        self.dtype = dtype_name(parse_dtype(self.dtype))

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def elt_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def uniform(self) -> bool:
        return len(set(self.seqlens)) == 1

    def label(self) -> str:
        if self.uniform:
            lens = f"L={self.seqlens[0]}"
        elif self.batch <= 4:
            lens = "L=[" + ",".join(str(x) for x in self.seqlens) + "]"
        else:
            lens = f"L=mixed(sum={sum(self.seqlens)},max={max(self.seqlens)})"
        return (f"B={self.batch} Hq={self.heads_q} Hkv={self.heads_kv} D={self.head_dim} "
                f"{lens} {self.dtype}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["label"] = self.label()
        if self.batch > 8:  # keep rows readable; the full list is still reproducible from the seed
            d["seqlens_summary"] = {"sum": sum(self.seqlens), "min": min(self.seqlens),
                                    "max": max(self.seqlens)}
        return d


def byte_counts(cfg: AttnConfig) -> dict:
    """Bytes one decode step must move: K+V read once, q read, out written."""
    kv = sum(cfg.seqlens) * cfg.heads_kv * cfg.head_dim * 2 * cfg.elt_size  # K and V
    q = cfg.batch * cfg.heads_q * cfg.head_dim * cfg.elt_size
    out = cfg.batch * cfg.heads_q * cfg.head_dim * cfg.elt_size
    return {"kv_bytes": kv, "q_bytes": q, "out_bytes": out, "bytes": kv + q + out}


def flop_count(cfg: AttnConfig) -> int:
    """q.k and p.v: 2 * 2 * Hq * D flops per cached token (softmax ignored)."""
    return 4 * sum(cfg.seqlens) * cfg.heads_q * cfg.head_dim


# --------------------------------------------------------------------------------------------
# environment facts recorded in every row

def _pk_info() -> dict:
    info = {"pykernels": None, "isa": None, "pk_threads": None, "pk_error": None}
    try:
        import pykernels
        info["pykernels"] = getattr(pykernels, "__version__", "?")
    except Exception as e:  # report, never crash the bench over an import problem
        info["pk_error"] = f"{type(e).__name__}: {e}"
        return info
    try:
        from pykernels import _C
        info["isa"] = _C.active_isa() if hasattr(_C, "active_isa") else None
        if hasattr(pykernels, "backends") and hasattr(pykernels.backends, "cpu_module"):
            info["pk_threads"] = pykernels.backends.cpu_module().get_num_threads()
        elif hasattr(_C, "get_num_threads"):
            info["pk_threads"] = _C.get_num_threads()
    except Exception as e:
        info["pk_error"] = f"pykernels._C: {type(e).__name__}: {e}"
    return info


def run_facts() -> dict:
    pk = _pk_info()
    env_threads = os.environ.get("PYKERNELS_NUM_THREADS")
    return {
        "threads": pk["pk_threads"] or (int(env_threads) if env_threads and env_threads.isdigit()
                                        else torch.get_num_threads()),
        "torch_threads": torch.get_num_threads(),
        "isa": pk["isa"],
        "pykernels": pk["pykernels"],
        "pk_error": pk["pk_error"],
        "torch": torch.__version__,
        "hostname": socket.gethostname(),
    }


# --------------------------------------------------------------------------------------------
# KV buffer pools (cold caches)

def cold_target_bytes(device: str = "cpu") -> int:
    """Bytes a pool must touch so a buffer is evicted before its reuse: >= 4x LLC, >= 256 MiB."""
    if device.startswith("cuda") and torch.cuda.is_available():
        l2 = getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 0) or 64 * _MiB
        return max(4 * l2, 256 * _MiB)
    return max(4 * llc_bytes(), 256 * _MiB)


def _fill(view_lhd: torch.Tensor, base: torch.Tensor, offset: int):
    """view_lhd[t] = base[(t + offset) % R] for a [L, Hkv, D] view; base is [R, Hkv, D]."""
    L, R = view_lhd.shape[0], base.shape[0]
    pos = 0
    while pos < L:
        s = (pos + offset) % R
        n = min(L - pos, R - s)
        view_lhd[pos:pos + n].copy_(base[s:s + n])
        pos += n


class KVPool:
    """``n`` distinct (k, v) caches of one layout, handed out round-robin.

    layout "blhd": [B, Lmax, Hkv, D] (pykernels, vLLM/FlashAttention order);
    layout "bhld": [B, Hkv, Lmax, D] (SDPA / Hugging Face order; needs uniform lengths).
    Only the first seqlens[b] positions of sequence b are written; the rest is never touched,
    so the OS never backs it with memory. Buffer i holds the same values in both layouts.
    """

    def __init__(self, cfg: AttnConfig, layout: str, n: int, device: str = "cpu", seed: int = 0):
        if layout not in ("blhd", "bhld"):
            raise ValueError(f"layout: expected 'blhd' or 'bhld', got {layout!r}")
        B, Hkv, D, Lmax = cfg.batch, cfg.heads_kv, cfg.head_dim, max(cfg.seqlens)
        g = torch.Generator().manual_seed(seed)
        R = min(Lmax, 4096)
        # distinct random rows; a buffer is a rotated tiling of them (values do not affect timing)
        base_k = torch.randn(R, Hkv, D, generator=g).to(cfg.torch_dtype).to(device)
        base_v = torch.randn(R, Hkv, D, generator=g).to(cfg.torch_dtype).to(device)
        shape = (B, Lmax, Hkv, D) if layout == "blhd" else (B, Hkv, Lmax, D)
        self.layout, self.bufs, self._next = layout, [], 0
        for i in range(n):
            # on 2 MiB pages on the CPU, as pk.QuantizedKVCache allocates (PYKERNELS_HUGEPAGES=0: off)
            k = empty_cache_tensor(shape, cfg.torch_dtype, device)
            v = empty_cache_tensor(shape, cfg.torch_dtype, device)
            for b, L in enumerate(cfg.seqlens):
                for cache, base, off in ((k, base_k, 37 * i + b), (v, base_v, 53 * i + b)):
                    dst = cache[b, :L] if layout == "blhd" else cache[b, :, :L].transpose(0, 1)
                    _fill(dst, base, off)
            self.bufs.append((k, v))
        self.touched_bytes = n * byte_counts(cfg)["kv_bytes"]

    def __len__(self):
        return len(self.bufs)

    def next(self):
        kv = self.bufs[self._next % len(self.bufs)]
        self._next += 1
        return kv


def pool_size(cfg: AttnConfig, target_bytes: int, max_buffers: int = 256) -> int:
    per = byte_counts(cfg)["kv_bytes"]
    return int(min(max(2, math.ceil(target_bytes / per)), max_buffers))


# --------------------------------------------------------------------------------------------
# the callables being timed

def _make_call(method: str, cfg: AttnConfig, q, seqlens, backend: str, num_splits=None):
    """-> (layout, fn(k, v) -> out [B, Hq, D], backend label, note)."""
    B, Hq, Hkv, D = cfg.batch, cfg.heads_q, cfg.heads_kv, cfg.head_dim
    G = Hq // Hkv
    if is_pk_method(method):
        import pykernels as pk
        S = fixed_splits(method)
        kw = {"method": "split" if method == "unsplit" or S else method, "backend": backend}
        if method == "unsplit":
            kw["num_splits"] = 1
        elif S:
            kw["num_splits"] = S
        elif method == "split" and num_splits is not None:
            kw["num_splits"] = int(num_splits)
        note = f"pk.decode_attention({', '.join(f'{k}={v!r}' for k, v in kw.items())})"
        return "blhd", (lambda k, v: pk.decode_attention(q, k, v, seqlens, **kw)), backend, note
    if method == "reference":
        from pykernels.reference import decode_attention_reference
        note = "pykernels.reference.decode_attention_reference (naive pure torch, fp32 compute)"
        return "blhd", (lambda k, v: decode_attention_reference(q, k, v, seqlens)), "torch", note
    if not cfg.uniform:
        raise NotImplementedError("SDPA baselines need equal lengths (a padded mask would read "
                                  "and be credited with padding)")
    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]
    if method == "sdpa":
        note = "F.scaled_dot_product_attention(q[B,Hq,1,D], k[B,Hkv,L,D], v, enable_gqa=True)"
        return "bhld", (lambda k, v: F.scaled_dot_product_attention(
            q4, k, v, enable_gqa=(G > 1)).view(B, Hq, D)), "torch", note
    if method == "sdpa_grouped":
        qg = q.view(B, Hkv, G, D)  # the G query heads of a kv-head become G query rows
        note = "F.scaled_dot_product_attention(q.view(B,Hkv,G,D), k[B,Hkv,L,D], v) (manual GQA folding)"
        return "bhld", (lambda k, v: F.scaled_dot_product_attention(qg, k, v).reshape(B, Hq, D)), "torch", note
    raise ValueError(f"method: expected one of {ALL_METHODS}, got {method!r}")


def timing_stats(ts) -> dict:
    """Median, p10, p90, min and max (ms) and the repeat count of a list of seconds."""
    t = np.asarray(ts)
    return {"median_ms": float(np.median(t)) * 1e3, "p10_ms": float(np.percentile(t, 10)) * 1e3,
            "p90_ms": float(np.percentile(t, 90)) * 1e3, "min_ms": float(t.min()) * 1e3,
            "max_ms": float(t.max()) * 1e3, "repeats": len(ts)}


def wait_for_quiet(max_wait_s: float, threshold: float = 0.10, sample_s: float = 0.5) -> float | None:
    """Wait (up to max_wait_s) until other processes use < threshold of the CPUs; returns the
    last sampled share. For shared development machines; 0 disables it."""
    last = None
    deadline = time.monotonic() + max_wait_s
    while max_wait_s > 0:
        meter = CpuLoadMeter().start()
        time.sleep(sample_s)
        last = meter.stop()
        if last is None or last < threshold or time.monotonic() >= deadline:
            break
    return last


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# tolerances of the one-off correctness check: bf16/fp16 outputs are rounded to 8/11 mantissa
# bits, and the methods accumulate in different orders; fp32 only differs by summation order
_CHECK_TOL = {"bf16": 3e-2, "fp16": 4e-3, "fp32": 1e-4}


def bench_attention(cfg: AttnConfig, methods=("lean", "split", "sdpa", "reference"), *,
                    backend: str = "cpu", device: str = "cpu", repeats: int = 15, warmup: int = 3,
                    min_repeats: int = 3, time_budget_s: float = 3.0, target_bytes: int | None = None,
                    max_buffers: int = 256, bandwidth_GB_s: float | None = None, num_splits=None,
                    check: bool = True, check_max_kv_bytes: int = 128 * _MiB, suite: str = "adhoc",
                    seed: int = 0, extra: dict | None = None, wait_quiet_s: float = 0.0,
                    machine=None) -> list[dict]:
    """Time ``methods`` on one configuration; one row (dict) per method.

    A method that cannot run (backend missing, SDPA on unequal lengths) gives a row with
    ``error`` set and no timings, so a report says what was not measured and why.
    ``machine`` (a ``roofline.MachineProfile``, see ``bench.roof.machine_for_run``): when given,
    timed rows also get ``attainable_ms``, ``efficiency`` and ``bound`` for ``flops`` / ``bytes``.
    """
    t_start = time.perf_counter()
    facts = run_facts()
    counts = byte_counts(cfg)
    target = cold_target_bytes(device) if target_bytes is None else int(target_bytes)
    n_bufs = pool_size(cfg, target, max_buffers)
    torch.manual_seed(seed)
    q = torch.randn(cfg.batch, cfg.heads_q, cfg.head_dim).to(cfg.torch_dtype).to(device)
    seqlens = torch.tensor(cfg.seqlens, dtype=torch.int32, device=device)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    base_row = {"suite": suite, "config": cfg.as_dict(), "label": cfg.label(), **counts,
                "flops": flop_count(cfg), **facts, "device": device, "timestamp": stamp,
                "bandwidth_GB_s": bandwidth_GB_s}
    if extra:
        base_row.update(extra)

    calls, rows = {}, {}
    for m in methods:
        row = dict(base_row, method=m, backend=backend if is_pk_method(m) else "torch")
        if m == "split" and num_splits is not None:
            row["num_splits"] = int(num_splits)  # shown as "split S=<n>"; still the 'split' baseline
        rows[m] = row
        try:
            layout, fn, row["backend"], row["impl"] = _make_call(m, cfg, q, seqlens, backend, num_splits)
            calls[m] = (layout, fn)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"

    pools, times, other_load = {}, {}, None
    try:
        for layout in sorted({lay for lay, _ in calls.values()}):
            pools[layout] = KVPool(cfg, layout, n_bufs, device=device, seed=seed)
        pool_info = {"buffers": n_bufs, "touched_bytes": n_bufs * counts["kv_bytes"],
                     "target_bytes": target, "cold": n_bufs * counts["kv_bytes"] >= target,
                     "hugepages": device == "cpu" and hugepages_enabled() and thp_mode() in ("always", "madvise")}

        # one-off correctness check on buffer 0 (same values in both layouts)
        ref = None
        if check and counts["kv_bytes"] <= check_max_kv_bytes and "blhd" in pools:
            from pykernels.reference import decode_attention_reference
            k0, v0 = pools["blhd"].bufs[0]
            ref = decode_attention_reference(q, k0, v0, seqlens).float()
        for m, (layout, fn) in list(calls.items()):
            rows[m]["pool"] = pool_info
            try:
                if ref is not None:
                    out = fn(*pools[layout].bufs[0]).float()
                    err = float((out - ref).abs().max())
                    rows[m]["max_abs_err"] = err
                    rows[m]["check"] = "ok" if err <= _CHECK_TOL[cfg.dtype] else "FAIL"
            except Exception as e:
                rows[m]["error"] = f"{type(e).__name__}: {e}"
                del calls[m]

        # warm-up; its time also sets the repeat count of slow methods
        want = {}
        for m, (layout, fn) in list(calls.items()):
            try:
                t = float("inf")
                for _ in range(max(1, warmup)):
                    k, v = pools[layout].next()
                    _sync(device)
                    t0 = time.perf_counter()
                    fn(k, v)
                    _sync(device)
                    t = min(t, time.perf_counter() - t0)
                want[m] = int(max(min_repeats, min(repeats, time_budget_s // max(t, 1e-9))))
            except Exception as e:
                rows[m]["error"] = f"{type(e).__name__}: {e}"
                del calls[m]

        times = {m: [] for m in calls}
        wait_for_quiet(wait_quiet_s)
        meter = CpuLoadMeter().start()
        for r in range(max(want.values(), default=0)):
            for m, (layout, fn) in calls.items():
                if r >= want[m]:
                    continue
                k, v = pools[layout].next()
                _sync(device)
                t0 = time.perf_counter()
                fn(k, v)
                _sync(device)
                times[m].append(time.perf_counter() - t0)
        other_load = meter.stop()
    finally:
        pools.clear()
        gc.collect()

    for m, ts in times.items():
        row = rows[m]
        row.update(timing_stats(ts))
        med = row["median_ms"] / 1e3
        row.update({
            "GB_s": counts["bytes"] / med / 1e9, "GFLOP_s": flop_count(cfg) / med / 1e9,
            "other_cpu_load": other_load,
        })
        row["pct_bw"] = (100.0 * row["GB_s"] / bandwidth_GB_s) if bandwidth_GB_s else None
        annotate(row, row["flops"], counts["bytes"], cfg.dtype, machine)
    for m, row in rows.items():
        if "median_ms" not in row:
            continue
        row["speedup"] = {f"vs_{b}": rows[b]["median_ms"] / row["median_ms"]
                          for b in BASELINES if b != m and b in rows and "median_ms" in rows[b]}
    elapsed = time.perf_counter() - t_start
    for row in rows.values():
        row["config_wall_s"] = elapsed
    return [rows[m] for m in methods]


# --------------------------------------------------------------------------------------------
# suites

@dataclass
class BenchContext:
    bandwidth_GB_s: float | None
    backend: str = "cpu"
    device: str = "cpu"
    repeats: int = 15
    quick: bool = False          # smaller sweeps for a fast smoke run
    target_bytes: int | None = None
    wait_quiet_s: float = 0.0    # per configuration, wait for other processes to go idle
    probe: dict | None = None    # the probe_memory_bandwidth() result, for roofline notes
    machine: object = None       # roofline.MachineProfile of the run (bench.roof): roofline columns
    record_autotune: bool = True  # bench.advisor: store the sweeps' timings (roofline.autotune)
    log: object = print
    extra: dict = field(default_factory=dict)


def _target(name, value, op, threshold, text, note=None, rows=(), noise=0.0):
    """A target line; a figure from a row whose correctness check failed never passes.

    ``noise``: relative run-to-run noise; a MISS by less than that is labelled as such (it is
    still a MISS)."""
    if value is None:
        passed, shown = None, "not measured"
    else:
        passed = value >= threshold if op == ">=" else value <= threshold
        shown = text.format(value=value)
    failed = [r["method"] for r in rows if r and r.get("check") == "FAIL"]
    if failed and value is not None:
        passed = False
        note = _join(f"wrong output from {', '.join(failed)} (correctness check failed)", note)
    status = "PASS" if passed else ("MISS" if passed is False else "N/A")
    if passed is False and not failed and noise > 0 and abs(value - threshold) <= noise * abs(threshold):
        status = "MISS (within noise)"
    return {"name": name, "value": value, "op": op, "threshold": threshold, "passed": passed,
            "status": status, "text": shown, "note": note}


def busy_note(rows) -> str | None:
    """A warning when other processes took a noticeable share of the CPUs during timing."""
    loads = [r.get("other_cpu_load") for r in rows if r.get("other_cpu_load") is not None]
    if loads and max(loads) > 0.10:
        return (f"machine busy: other processes used up to {100 * max(loads):.0f}% of the CPUs "
                "while this was timed")
    return None


def _join(*notes):
    return "; ".join(n for n in notes if n) or None


def _row(rows, method, label=None):
    for r in rows:
        if r["method"] == method and (label is None or r["label"] == label) and "median_ms" in r:
            return r
    return None


def _run_config(ctx: BenchContext, suite, cfg, methods, **kw):
    rows = bench_attention(cfg, methods, backend=ctx.backend, device=ctx.device,
                           repeats=kw.pop("repeats", ctx.repeats), suite=suite,
                           bandwidth_GB_s=ctx.bandwidth_GB_s, target_bytes=ctx.target_bytes,
                           extra=ctx.extra, wait_quiet_s=ctx.wait_quiet_s, machine=ctx.machine, **kw)
    ctx.log(format_rows(rows))
    return rows


def suite_single_gqa(ctx: BenchContext) -> dict:
    """Suite 1: B=1, Hq=32, Hkv=8, D=128, L=16384, bf16 cache (64 MiB of KV)."""
    cfg = AttnConfig(1, 32, 8, 128, [16384], "bf16")
    rows = _run_config(ctx, "1", cfg, ("lean", "split", "sdpa", "sdpa_grouped", "reference"))
    targets = []
    for m in ("lean", "split"):
        r = _row(rows, m)
        targets.append(_target(f"{m}: % of measured read bandwidth", r and r["pct_bw"], ">=", 85.0,
                               "{value:.1f}% (" + (f"{r['GB_s']:.1f} GB/s of {ctx.bandwidth_GB_s:.1f}" if r else "") + ")",
                               busy_note(rows), rows=[r]))
        sp = r and r["speedup"].get("vs_sdpa")
        targets.append(_target(f"{m}: speedup vs torch SDPA (enable_gqa)", sp, ">=", 3.5,
                               "{value:.2f}x" + (f" ({r['median_ms']:.2f} ms vs {_row(rows, 'sdpa')['median_ms']:.2f} ms)" if sp else ""),
                               busy_note(rows), rows=[r]))
    g = _row(rows, "lean")
    notes = ["SDPA baseline: cache in SDPA's own [B, Hkv, L, D] layout, q [B, Hq, 1, D], "
             "enable_gqa=True (what Hugging Face transformers does on torch >= 2.5 without a mask). "
             "Passing a transposed view of a [B, L, Hkv, D] cache instead is several times slower."]
    if g and "vs_sdpa_grouped" in g["speedup"]:
        notes.append(f"For information: SDPA with the G query heads folded into rows (sdpa_grouped) "
                     f"runs {_row(rows, 'sdpa_grouped')['median_ms']:.2f} ms; lean is "
                     f"{g['speedup']['vs_sdpa_grouped']:.2f}x that.")
    return {"rows": rows, "targets": targets, "notes": notes}


def _random_batches(quick: bool):
    rng = np.random.default_rng(1234)
    sizes = (1, 2, 5, 16, 64) if quick else (1, 2, 3, 5, 8, 16, 33, 64)
    return [(n, rng.integers(1, 32768 + 1, size=n).tolist()) for n in sizes]


def suite_imbalanced(ctx: BenchContext) -> dict:
    """Suite 2: imbalanced MQA batch; lean vs unsplit vs split, then a seeded length sweep."""
    cfg = AttnConfig(3, 8, 1, 128, [32768, 1024, 512], "bf16")
    rows = _run_config(ctx, "2", cfg, ("lean", "unsplit", "split"))
    lean = _row(rows, "lean")
    threads = rows[0]["threads"]
    tnote = None if threads == 2 else f"measured on {threads} threads, the target is for 2"
    targets = [_target("lean vs unsplit (one unit per (sequence, kv-head))",
                       lean and lean["speedup"].get("vs_unsplit"), ">=", 1.6,
                       "{value:.2f}x" + (f" ({lean['median_ms']:.2f} ms vs {_row(rows, 'unsplit')['median_ms']:.2f} ms)" if lean else ""),
                       _join(tnote, busy_note(rows)), rows=rows)]
    sweep_rows, worst, n_slower, n_sweep = [], None, 0, 0
    for n, lens in _random_batches(ctx.quick):
        c = AttnConfig(n, 8, 1, 128, lens, "bf16")
        rs = _run_config(ctx, "2-sweep", c, ("lean", "split"), repeats=max(7, ctx.repeats // 2))
        sweep_rows += rs
        lr = _row(rs, "lean")
        if lr and "vs_split" in lr["speedup"]:
            ratio = lr["speedup"]["vs_split"]
            n_sweep += 1
            n_slower += ratio < 1.0
            if worst is None or ratio < worst[0]:
                worst = (ratio, c.label())
    targets.append(_target("lean no slower than split over the 1..64-sequence sweep (worst split/lean time)",
                           worst and worst[0], ">=", 1.0,
                           "{value:.3f}" + (f" at {worst[1]}" if worst else ""),
                           _join(f"{n_slower} of {n_sweep} configurations below 1.0", busy_note(sweep_rows)),
                           rows=sweep_rows, noise=0.03))
    notes = ["Sweep: MQA Hq=8 Hkv=1 D=128 bf16; lengths uniform in [1, 32768], numpy seed 1234.",
             "A 'MISS (within noise)' is a miss by less than 3%, the run-to-run spread of medians here."]
    bound = unsplit_speedup_bound(cfg, ctx.probe, threads)
    if bound:
        notes.append(bound["text"])
    return {"rows": rows + sweep_rows, "targets": targets, "notes": notes}


def unsplit_speedup_bound(cfg: AttnConfig, probe: dict | None, threads: int) -> dict | None:
    """Most that any balanced schedule can gain over 'unsplit' once both are memory-bound.

    Unsplit gives the longest (sequence, kv-head) to one thread, which can at best stream at the
    one-thread read bandwidth; a balanced schedule at best streams everything at the all-thread
    bandwidth. If one core alone nearly saturates DRAM, no schedule can be much faster than
    unsplit on a bandwidth-bound kernel: the lean-vs-unsplit gain shows only while per-thread
    compute, not DRAM, is the limit.
    """
    if not probe or not probe.get("read_1thread_GB_s") or threads < 2:
        return None
    bw_all, bw_1 = probe["read_GB_s"], probe["read_1thread_GB_s"]
    per_tok = cfg.heads_kv * cfg.head_dim * 2 * cfg.elt_size
    total = sum(cfg.seqlens) * per_tok
    biggest = max(cfg.seqlens) * cfg.head_dim * 2 * cfg.elt_size  # one (sequence, kv-head) unit
    t_unsplit = max(biggest / bw_1, total / bw_all)
    t_best = total / bw_all
    ratio = t_unsplit / t_best
    # if per-thread compute were the limit: unsplit max(biggest, total/W), balanced total/W
    compute_ratio = max(1.0, threads * biggest / total)
    return {"bound": ratio, "compute_bound_ratio": compute_ratio,
            "text": (f"Ceiling for lean/unsplit when both run at the memory roofline: {ratio:.2f}x "
                     f"(largest unit {biggest / _MiB:.1f} of {total / _MiB:.1f} MiB on one thread at the "
                     f"one-thread read bandwidth {bw_1:.1f} GB/s, vs everything at {bw_all:.1f} GB/s). "
                     f"The 1.6x target is reachable only while one thread cannot stream near "
                     f"DRAM speed (a compute-limited kernel: ceiling {compute_ratio:.2f}x).")}


def suite_grid(ctx: BenchContext) -> dict:
    """Suite 3: L x B grid (GQA 32/8, D=128, bf16); configurations over 1 GiB of KV skipped."""
    Ls = (1024, 16384) if ctx.quick else (1024, 4096, 16384, 65536)
    Bs = (1, 16) if ctx.quick else (1, 4, 16, 32)
    max_kv, max_sdpa_kv = (256 * _MiB, 64 * _MiB) if ctx.quick else (_GiB, 256 * _MiB)
    rows, skipped = [], []
    for L in Ls:
        for B in Bs:
            cfg = AttnConfig(B, 32, 8, 128, [L] * B, "bf16")
            kv = byte_counts(cfg)["kv_bytes"]
            if kv > max_kv:
                skipped.append(f"{cfg.label()} ({kv / _MiB:.0f} MiB of KV > {max_kv / _MiB:.0f} MiB cap)")
                continue
            methods = ("lean", "split") + (("sdpa",) if kv <= max_sdpa_kv else ())
            rows += _run_config(ctx, "3", cfg, methods, repeats=max(7, ctx.repeats // 2), check=False)
    notes = [f"SDPA only where KV <= {max_sdpa_kv / _MiB:.0f} MiB (it is slow; its figures scale linearly).",
             "Correctness is checked in suites 1 and 2, not repeated here."]
    if skipped:
        notes.append("Skipped: " + "; ".join(skipped))
    return {"rows": rows, "targets": [], "notes": notes}


# The report runs these in order; later issues append suites (LUT-GEMV, quantized KV, offload).
SUITES = [
    ("attention-1", "Decode attention, one long GQA sequence (B=1, Hq=32, Hkv=8, D=128, L=16k, bf16)", suite_single_gqa),
    ("attention-2", "Decode attention, imbalanced MQA batch: lean vs unsplit vs split", suite_imbalanced),
    ("attention-3", "Decode attention, L x B sweep (Hq=32, Hkv=8, D=128, bf16)", suite_grid),
]


# --------------------------------------------------------------------------------------------
# text output

def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def roof_pct(r: dict) -> str:
    """Efficiency in % of the roofline-attainable time, 6 wide ("-" without a machine)."""
    e = r.get("efficiency")
    return f"{'-':>6}" if e is None else f"{100 * e:6.1f}"


def format_timed(rows: list[dict], label_w: int, method_w: int, p_w: int = 8, extra=(),
                 err=("max_abs_err", "err")) -> str:
    """Plain-text table of timed rows, shared by the suite families (also valid inside a markdown
    code block): config, method, median, p10..p90 (``p_w`` wide each), GB/s, % bw, roof%, then
    the ``extra`` columns, each a ``(header cell, fn(row) -> cell)``, then speedups. A failed
    check shows ``err = (row key, name)``."""
    hdr = (f"{'config':<{label_w}} {'method':<{method_w}} {'median ms':>10} {'p10..p90 ms':>{2 * p_w + 1}} "
           f"{'GB/s':>7} {'% bw':>6} {'roof%':>6}" + "".join(" " + h for h, _ in extra) + "  speedups")
    lines = [hdr]
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"{r['label']:<{label_w}} {r['method']:<{method_w}} not run: {r.get('error', '?')}")
            continue
        sp = " ".join(f"{k[3:]}={v:.2f}x" for k, v in r.get("speedup", {}).items())
        chk = "" if r.get("check", "ok") == "ok" else f"  CHECK {r['check']} {err[1]}={r[err[0]]:.3g}"
        meth = f"{r['method']} S={r['num_splits']}" if "num_splits" in r else r["method"]
        lines.append(f"{r['label']:<{label_w}} {meth:<{method_w}} {r['median_ms']:>10.3f} "
                     f"{r['p10_ms']:>{p_w}.3f}..{r['p90_ms']:<{p_w}.3f} {r['GB_s']:>7.2f} {_fmt(r['pct_bw'], '6.1f')} "
                     f"{roof_pct(r)}" + "".join(" " + fn(r) for _, fn in extra) + f"  {sp}{chk}")
    return "\n".join(lines)


def format_rows(rows: list[dict]) -> str:
    """Plain-text table of result rows (also valid inside a markdown code block)."""
    return format_timed(rows, 48, 13)


def format_targets(targets: list[dict]) -> str:
    out = []
    for t in targets:
        line = f"[{t['status']}] {t['name']}: {t['text']} (target {t['op']} {t['threshold']})"
        if t.get("note"):
            line += f"  -- {t['note']}"
        out.append(line)
    return "\n".join(out)
