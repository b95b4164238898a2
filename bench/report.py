"""``python -m bench.report``: probe the machine, run every suite, write the report.

Writes ``reports/<hostname>/index.html`` (roofline charts of every row, efficiency bars, targets,
tables: ``roofline.report``), ``report.json`` (probe, machine, every row and its roofline point,
targets, what ran where) and ``report.md`` (the same tables, PASS/MISS per target with its figure).
Bounded to a few minutes on a 2-core machine. Suites are ``bench.probe_check.SUITES`` (the probe
against an independent numpy measurement), ``bench.attention.SUITES``, ``bench.lut.SUITES``,
``bench.kvquant.SUITES``, ``bench.advisor.SUITES`` (the roofline advisor's picks against
exhaustive sweeps), then ``bench.offload.SUITES`` (a ~1.1B Llama streamed from disk), the
KV-tier suite and ``bench.gpu.SUITES`` (CUDA and Triton kernels, on a machine with a GPU); each
entry is (name, title, fn(ctx) -> {"rows", "targets", "notes"}); later issues append their own
lists. ``--suites`` takes names (``lut-2``), numbers (``2``: that suite of every family) or
families (``probe``, ``attention``, ``lut``, ``kv``, ``advisor``, ``offload``, ``kvtier``, ``gpu``).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback

import torch


def _gpu_statement(gpu_suite_ran: bool = False, gpu_suite_error: str | None = None) -> dict:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if gpu_suite_ran:
            return {"cuda_available": True, "gpu": name,
                    "statement": (f"GPU: {name}. Suite gpu-1 timed the CUDA and Triton kernels on it against "
                                  "torch; every other suite times the CPU backend.")}
        why = (f"the GPU suite (gpu-1) failed ({gpu_suite_error})" if gpu_suite_error else
               "the GPU suite (gpu-1) was not selected")
        return {"cuda_available": True, "gpu": name,
                "statement": (f"A GPU ({name}) is present, but {why}: CUDA and Triton kernels were not "
                              "benchmarked in this report.")}
    return {"cuda_available": False, "gpu": None,
            "statement": ("No GPU on this machine (torch.cuda.is_available() is False): CUDA and Triton "
                          "kernels were NOT run on a GPU. Every figure here is the CPU backend or a CPU "
                          "torch baseline.")}


def _md_timed(rows: list[dict], mid=(), extra=(), err_key="max_abs_err", check_title="check") -> list[str]:
    """Markdown table of timed rows, shared by every suite family.

    Common columns: config, method, median, p10..p90, GB/s, % bw, roof ms and eff % (the roofline
    columns, "-" where the run had no roofline machine), speedups, check. ``mid`` columns go
    between GB/s and % bw, ``extra`` ones after eff %: each a ``(header, fn(row) -> str)``.
    ``err_key`` is the row's error figure shown beside its check.
    """
    heads = (["config", "method", "median ms", "p10..p90 ms", "GB/s"] + [h for h, _ in mid]
             + ["% bw", "roof ms", "eff %"] + [h for h, _ in extra] + ["speedups (t_baseline / t)", check_title])
    out = ["| " + " | ".join(heads) + " |",
           "|---|---|" + "---:|" * (6 + len(mid) + len(extra)) + "---|---|"]
    for r in rows:
        if "median_ms" not in r:
            out.append(f"| {r['label']} | {r['method']} | not run |" + " |" * (5 + len(mid) + len(extra))
                       + f" {r.get('error', '')} | |")
            continue
        roof = r.get("attainable_ms") is not None
        cells = ([r["label"], r["method"], f"{r['median_ms']:.3f}", f"{r['p10_ms']:.3f}..{r['p90_ms']:.3f}",
                  f"{r['GB_s']:.2f}"] + [fn(r) for _, fn in mid]
                 + ["-" if r.get("pct_bw") is None else f"{r['pct_bw']:.1f}",
                    f"{r['attainable_ms']:.3f}" if roof else "-", f"{100 * r['efficiency']:.1f}" if roof else "-"]
                 + [fn(r) for _, fn in extra]
                 + [", ".join(f"{k[3:]} {v:.2f}x" for k, v in r.get("speedup", {}).items()),
                    r.get("check", "-") + (f" ({r[err_key]:.2g})" if err_key in r else "")])
        out.append("| " + " | ".join(cells) + " |")
    return out


def _md_table(rows: list[dict]) -> list[str]:
    return _md_timed(rows)


def _md_table_gpu(rows: list[dict]) -> list[str]:
    """bench.gpu rows: kernel time (the roofline point), time per call, kernel GB/s and % HBM."""
    out = ["| config | case | kernel us | call us | kernel GB/s | % HBM | kernels (us per call) |",
           "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "kernel_us" not in r:
            out.append(f"| {r['label']} | {r['method']} | not run | | | | {r.get('error', '')} |")
            continue
        ks = ", ".join(f"{k['name'][:40]} {k['us']:.1f}" for k in r.get("kernels", [])[:3])
        gbs = f"{r['kernel_GB_s']:.0f}" if "kernel_GB_s" in r else "-"
        pct = f"{r['pct_hbm']:.1f}" if "pct_hbm" in r else "-"
        out.append(f"| {r['label']} | {r['method']} | {r['kernel_us']:.1f} | {r['call_us']:.1f} | {gbs} | {pct} | {ks} |")
    return out


def _md_table_lut(rows: list[dict]) -> list[str]:
    return _md_timed(rows, mid=[("weight GB/s", lambda r: f"{r['weight_GB_s']:.2f}")],
                     extra=[("bits/weight", lambda r: f"{r['bits_per_weight']:.3f}")],
                     err_key="rel_err", check_title="check (rel err)")


def _md_table_probe(rows: list[dict]) -> list[str]:
    """bench.probe_check rows: the probe's figure vs the independent numpy one."""
    out = ["| quantity | probe GB/s | numpy GB/s | probe / numpy | deviation |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['label']} | {r['probe_GB_s']:.2f} | {r['numpy_GB_s']:.2f} | {r['ratio']:.3f} | "
                   f"{100 * abs(r['ratio'] - 1):.1f}% |")
    return out


def _md_table_kv(rows: list[dict]) -> list[str]:
    """bench.kvquant rows: speed, memory or accuracy tables (by the rows' ``kv_table``)."""
    kind = rows[0]["kv_table"]
    if kind == "memory":
        out = ["| config | format | bytes/token/layer | store bytes/token | read bytes/token | bf16 / this |",
               "|---|---|---:|---:|---:|---:|"]
        for r in rows:
            out.append(f"| {r['label']} | {r['format']} | {r['bytes_per_token']:.1f} | "
                       f"{r['store_bytes_per_token']:.1f} | {r['read_bytes_per_token']:.1f} | {r['vs_bf16']:.2f}x |")
        return out
    if kind == "accuracy":
        out = ["| format | group size | variant | cos mean | cos min | rel L2 | KL mean | KL max |",
               "|---|---:|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            out.append(f"| {r['format']} | {r['group_size']} | {r['variant']} | {r['cos_mean']:.6f} | "
                       f"{r['cos_min']:.6f} | {r['rel_l2']:.3g} | {r['kl_mean']:.3g} | {r['kl_max']:.3g} |")
        return out
    return _md_timed(rows, extra=[
        ("bytes read", lambda r: f"{r['bytes'] / 2**20:.2f} MiB"),
        ("bytes/token/layer", lambda r: "-" if r.get("mem_bytes_per_token") is None
         else f"{r['mem_bytes_per_token']:.0f}")])


def _md_table_offload(rows: list[dict]) -> list[str]:
    """bench.offload rows: one configuration per row (its own subprocess)."""
    out = ["| config | engine | tok/s | median step ms | disk MiB/step | storage reads MiB/forward | "
           "peak RSS over base MiB | base MiB | stall % |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['label']} | {r['method']} | not run: {r['error']} | | | | | | |")
            continue
        dev = r.get("device_bytes_per_forward")
        out.append(f"| {r['label']} | {r['engine']} | {r['tokens_per_s']:.3f} | {1e3 * r['median_step_s']:.1f} | "
                   + ("-" if r.get("disk_bytes_per_step") is None else f"{r['disk_bytes_per_step'] / 2**20:.0f}")
                   + f" | {'-' if dev is None else f'{dev / 2**20:.0f}'} | {r['rss_over_base'] / 2**20:.0f} | "
                   f"{r['base_rss'] / 2**20:.0f} | "
                   + ("-" if r.get("stall_fraction") is None else f"{100 * r['stall_fraction']:.0f}") + " |")
    return out


def _md_table_kvtier(rows: list[dict]) -> list[str]:
    """bench.kvtier rows: the exact formats, then the approximate mode's fractions."""
    out = ["| config | median step ms | KV MiB from disk per step | read pass / step | cosine vs exact (min) |",
           "|---|---:|---:|---:|---:|"]
    for r in rows:
        cos = r.get("cosine_min")
        bound = r.get("bound_ratio")
        out.append(f"| {r['label']} | {1e3 * r['median_step_s']:.0f} | {r['kv_disk_bytes'] / 2**20:.0f} | "
                   f"{'-' if bound is None else f'{bound:.2f}'} | {'exact' if cos is None else f'{cos:.4f}'} |")
    return out


_KV_METHOD = ("Quantized KV (suites kv-*): KIVI cache (keys per channel in groups of gs tokens, values per "
              "token in groups of gs channels, fp16 scales and zeros; fp8 e4m3 with one fp32 scale per group "
              "of gs tokens and head) with a bf16 residual window; bytes read = codes + scales + zeros of the "
              "quantized tokens + the bf16 sink/residual rows, K and V, plus q and out. Caches cold, warm-up, "
              "interleaved repeats, median; slow baselines (transformers QuantizedCache, dequantize-then-SDPA) "
              "get fewer repeats and are credited with the same bytes (effective rate). Accuracy: synthetic "
              "Llama-like KV (outlier key channels, RoPE, attention sink, 1% value outliers; see "
              "bench/kvquant.py), float64 attention vs the bf16 cache.")

_LUT_METHOD = ("LUT-GEMV (suites lut-*): bytes = LUTWeight.nbytes (bit planes + fp16 scales + fp16 "
               "zeros) or N x K x 2 for torch bf16, plus x read and y written; \"weight GB/s\" counts "
               "the weights alone. Weight sets are random codes (never quantized in the benchmark), "
               "rotated through a pool >= 4x LLC so every call reads cold weights; x stays hot. "
               "Threads: torch.get_num_threads() for torch and pykernels alike. llama.cpp figures "
               "are quoted from the issue (measured outside the project), never measured here; "
               "\"ms-equivalent\" = our time x llama.cpp bytes / our weight bytes (equal weight GB/s).")


def _roofline_line(roof: dict) -> str:
    """The report's sentence on the roofline columns ("roof ms", "eff %")."""
    m = roof.get("machine")
    if not m:
        return f"- Roofline: {roof.get('note') or 'no machine model'}; \"roof ms\" and \"eff %\" are \"-\"."
    pk = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in m["peak_flops"].items())
    return (f"- Roofline: \"roof ms\" = max(FLOPs / peak, bytes / read bandwidth) for each row's counted "
            f"FLOPs and bytes; \"eff %\" = roof ms / median ms. Peaks {pk} GFLOP/s from "
            f"`roofline.probe(quick=True)` (torch matmuls, cached per machine); memory roof "
            f"{m['mem_bandwidth']['read'] / 1e9:.1f} GB/s, the read figure above, so a memory-bound "
            f"row's eff % equals its % bw. fp16 runs use the bf16 peak where no fp16 peak was measured.")


def markdown_body(rep: dict) -> str:
    """The benchmark's own Markdown (probe, method, every suite's tables and notes); appended by
    ``roofline.report`` to its ``report.md`` after the machine, targets and roofline tables."""
    p = rep["probe"]
    m = p["machine"]
    L = [f"# Benchmark details: {rep['hostname']}", "",
         f"Run {rep['timestamp']} in {rep['wall_s']:.0f} s by `python -m bench.report`.", "",
         "## Machine and roofline", "",
         f"- CPU: {m['cpu_model']}, {m['usable_cpus']} usable CPUs, LLC {m['llc_bytes'] >> 20} MiB, "
         f"{(m['mem_total_bytes'] or 0) / 2**30:.1f} GiB RAM, SIMD {', '.join(m['simd']) or '-'}",
         f"- torch {m['torch']}, pykernels {rep['facts'].get('pykernels')}, ISA {rep['facts'].get('isa')}, "
         f"threads {rep['facts'].get('threads')} (torch {rep['facts'].get('torch_threads')})",
         f"- GPU: {rep['gpu']['statement']}",
         f"- **Measured read bandwidth: {p['read_GB_s']:.1f} GB/s** (p10..p90 "
         f"{p['read']['GB_s_p10']:.1f}..{p['read']['GB_s_p90']:.1f}); triad {p['triad_GB_s']:.1f} GB/s "
         f"(3 arrays; {p['triad_wa_GB_s']:.1f} counting write-allocate); one thread reads {p['read_1thread_GB_s']:.1f} GB/s. "
         f"{p['size_bytes'] >> 20} MiB per array, {p['threads']} threads. \"% bw\" below is against the read figure.",
         f"- Probe again after the suites: read {rep['probe_after']['read_GB_s']:.1f} GB/s."
         if rep.get("probe_after") else "- (no second probe)",
         f"- Other processes' CPU share during the first probe: {p['other_cpu_load']}",
         _roofline_line(rep.get("roofline") or {})]
    for w in p["warnings"]:
        L.append(f"- probe warning: {w}")
    for w in (rep.get("probe_after") or {}).get("warnings", []):
        L.append(f"- second probe warning: {w}")
    L += ["", "Method, decode attention (suites attention-*): bytes counted explicitly (K+V = sum(seqlens) x Hkv x D x 2 x elt, plus q and out); "
          "KV caches cold (each call reads a different buffer from a pool >= 4x LLC); warm-up, then "
          "repeats interleaved across methods; median and p10..p90. GB = 1e9 bytes.", ""]
    if any("kind" in r and "kv_table" not in r for r in rep.get("rows", [])):
        L += [_LUT_METHOD, ""]
    if any("kv_table" in r for r in rep.get("rows", [])):
        L += [_KV_METHOD, ""]

    for s in rep["suites"]:
        L += [f"## {s['name']}: {s['title']}", ""]
        if s.get("error"):
            L += [f"Suite failed: `{s['error']}`", ""]
        if s.get("skipped"):
            L += [f"Not run: {s['skipped']}", ""]
        rows = s.get("rows", [])
        if rows:
            if any("kv_table" in r for r in rows):     # bench.kvquant rows, one table per kind
                for kind in ("speed", "memory", "accuracy"):
                    part = [r for r in rows if r.get("kv_table") == kind]
                    if part:
                        L += _md_table_kv(part) + [""]
            elif any("kv_tier" in r for r in rows):    # bench.kvtier rows
                L += _md_table_kvtier(rows) + [""]
            elif any("engine" in r for r in rows):     # bench.offload rows
                L += _md_table_offload(rows) + [""]
            elif any(r.get("device") == "cuda" and r.get("suite") == "gpu-1" for r in rows):  # bench.gpu rows
                L += _md_table_gpu(rows) + [""]
            elif any("probe_GB_s" in r for r in rows):  # bench.probe_check rows
                L += _md_table_probe(rows) + [""]
            elif any("kind" in r for r in rows):       # bench.lut rows
                L += _md_table_lut(rows) + [""]
            else:
                L += _md_table(rows) + [""]
        for n in s.get("notes", []):
            L.append(f"- {n}")
        if s.get("notes"):
            L.append("")
        L.append(f"_{s.get('wall_s', 0):.0f} s_")
        L.append("")
    return "\n".join(L)


def _all_suites() -> list:
    """(name, title, fn) of every suite, in report order (read at call time)."""
    from . import advisor as AD
    from . import attention as A
    from . import gpu as G
    from . import kvquant as KV
    from . import kvtier as KT
    from . import lut as LU
    from . import offload as OF
    from . import probe_check as PC

    return (list(PC.SUITES) + list(A.SUITES) + list(LU.SUITES) + list(KV.SUITES) + list(AD.SUITES)
            + list(OF.SUITES) + list(KT.SUITES) + list(G.SUITES))


def suite_names() -> list[str]:
    return [name for name, _, _ in _all_suites()]


def run_report(out_dir: str | None = None, suites: list[str] | None = None, quick: bool = False,
               repeats: int = 25, log=print, probe_size_bytes: int | None = None,
               wait_quiet_s: float = 0.0) -> dict:
    from roofline import probe_memory_bandwidth
    from . import attention as A
    from . import kvquant as KV
    from . import lut as LU
    from .roof import run_machine

    t0 = time.perf_counter()
    host = socket.gethostname()
    out_dir = out_dir or os.path.join("reports", host)
    os.makedirs(out_dir, exist_ok=True)

    A.wait_for_quiet(wait_quiet_s)
    probe = probe_memory_bandwidth(size_bytes=probe_size_bytes)
    log(f"probe: read {probe['read_GB_s']:.1f} GB/s, triad {probe['triad_GB_s']:.1f} GB/s "
        f"({probe['threads']} threads); warnings: {probe['warnings'] or 'none'}")
    # compute peaks for the roofline columns; the memory roof is the probe above
    machine, roof_note = run_machine(probe)
    if roof_note:
        log(f"roofline: {roof_note}")
    # LutContext is a BenchContext plus the LUT format fields, so it serves every family
    ctx = LU.LutContext(bandwidth_GB_s=probe["bandwidth_GB_s"], backend="cpu", device="cpu",
                        repeats=repeats, quick=quick, log=log, wait_quiet_s=wait_quiet_s, probe=probe,
                        machine=machine)
    # the KV suites take their own context (group size 32, residual 128: the cache)
    kv_ctx = KV.KVContext(bandwidth_GB_s=probe["bandwidth_GB_s"], backend="cpu", device="cpu",
                          repeats=repeats, quick=quick, log=log, wait_quiet_s=wait_quiet_s, probe=probe,
                          machine=machine)
    results = []
    for name, title, fn in _all_suites():
        entry = {"name": name, "title": title}
        if suites and not {name, name.split("-")[-1], name.split("-")[0]} & set(suites):
            entry["skipped"] = "not selected"
            results.append(entry)
            continue
        log(f"\n== {name}: {title}")
        ts = time.perf_counter()
        try:
            entry.update(fn(kv_ctx if name.startswith("kv-") else ctx))
            if entry.get("targets"):
                log(A.format_targets(entry["targets"]))
        except Exception as e:  # one broken suite must not lose the others' figures
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc()
            log(entry["traceback"])
        entry["wall_s"] = time.perf_counter() - ts
        results.append(entry)
    A.wait_for_quiet(wait_quiet_s)
    probe_after = probe_memory_bandwidth(size_bytes=probe_size_bytes)
    gpu_machine = next((s.pop("gpu_machine") for s in results if s.get("gpu_machine")), None)

    rep = {
        "hostname": host, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench.report"] + sys.argv[1:]),
        "quick": quick, "probe": probe, "probe_after": probe_after, "machine": probe["machine"],
        "facts": A.run_facts(),
        "gpu": _gpu_statement(gpu_machine is not None,
                              next((s["error"] for s in results if s["name"].startswith("gpu-") and s.get("error")),
                                   None)),
        "suites": results,
        "gpu_machine": gpu_machine,
        "roofline": {"machine": machine and machine.to_dict(), "note": roof_note},
        "rows": [r for s in results for r in s.get("rows", [])],
        "targets": [dict(t, suite=s["name"]) for s in results for t in s.get("targets", [])],
    }
    rep["wall_s"] = time.perf_counter() - t0
    paths = write_report(rep, machine, out_dir)
    log(f"\nwrote {paths['html']}, {paths['markdown']} and {paths['json']} ({rep['wall_s']:.0f} s)")
    return rep


def write_report(rep: dict, machine, out_dir: str) -> dict:
    """``index.html``, ``report.md`` and ``report.json`` of a run through ``roofline.report``:
    the roofline charts, targets and machine from it, this module's tables after them. Without a
    roofline machine (the compute probe failed) the rows are placed on a memory-only machine
    built from the run's read bandwidth, so the report is still written."""
    from roofline import MachineProfile, report

    if machine is None:
        bw = rep["probe"]["bandwidth_GB_s"] * 1e9
        machine = MachineProfile("this machine (memory roof only)", {}, {"read": bw, "copy": bw, "triad": bw},
                                 source="measured", notes=(rep.get("roofline") or {}).get("note") or "")
    recs, preds, notes = [], [], []
    if machine.peak_flops:
        from .advisor import report_advice
        try:
            recs, preds, notes = report_advice(machine, rep["facts"].get("threads") or 1)
        except Exception as e:  # advice is an extra: never lose the measured report over it
            notes = [f"advisor failed: {type(e).__name__}: {e}"]
    if rep.get("gpu_machine"):  # the GPU suite's rows (device "cuda") go on the GPU's own roofline
        machine = {"cpu": machine, "cuda": MachineProfile.from_dict(rep["gpu_machine"])}
    return report(rep, machine, out_dir, title=f"pykernels benchmark report: {rep['hostname']}",
                  statement=rep["gpu"]["statement"], recommendations=recs, analyses=preds, notes=notes,
                  extra_markdown=markdown_body(rep))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default reports/<hostname>)")
    ap.add_argument("--suites", default=None, help="comma list of suite names or numbers (default all)")
    ap.add_argument("--quick", action="store_true", help="smaller sweeps")
    ap.add_argument("--repeats", type=int, default=25, help="timed calls per method (slow baselines fewer)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before the probe and each configuration, wait up to this long for other "
                         "processes to leave the CPUs idle (shared machines); 0 = do not wait")
    args = ap.parse_args(argv)
    suites = None
    if args.suites is not None:  # a typo must not overwrite the last report with an empty one
        suites = [s.strip() for s in args.suites.split(",") if s.strip()]
        known = suite_names()
        valid = {n for name in known for n in (name, name.split("-")[-1], name.split("-")[0])}
        bad = [s for s in suites if s not in valid]
        if bad or not suites:
            ap.error(f"--suites: unknown {bad or [args.suites]}; expected a comma list of {', '.join(known)} "
                     f"(or their families, e.g. attention, kv, or numbers)")
    rep = run_report(args.out, suites, args.quick, args.repeats, wait_quiet_s=args.wait_quiet)
    return 0 if all(not s.get("error") for s in rep["suites"]) else 1


if __name__ == "__main__":
    sys.exit(main())
