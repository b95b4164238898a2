"""GPU suite: kernel time and per-call time of the CUDA and Triton backends against torch.

``python -m bench.gpu [--json PATH] [--only NAME,...] [--quick]`` on a machine with a CUDA GPU.

Why two times per case: on the one GPU this package has run on (an H100, see README), the host
work around each call (argument checks, device-to-host copies that wait for the GPU, launches)
took longer than the kernels themselves. The two times separate those costs:

- **kernel us**: the GPU time of the kernels one call launches (``torch.profiler``, summed over
  the call's kernels and copies, averaged over 10 calls). ``kernel GB/s`` and ``% HBM`` divide
  the bytes a call must read by it. ``% HBM`` uses the HBM read bandwidth that
  ``roofline.probe(device="cuda", quick=True)`` measures in the same run.
- **call us**: the wall-clock time per call over 50 back-to-back calls, then one synchronize.
  When the host work of a call is longer than its kernels, this is the host's time, and the GPU
  waits.

Decode attention runs with the lengths on the GPU and, as "host lens", on the CPU (the call
then never waits for the GPU). Cold data: each case cycles through enough copies of its data (KV cache, weights) that one
round is at least 3x the GPU's L2 (50 MiB on an H100), so a call never finds its inputs in L2
from the call before; the baselines cycle the same way. Cases: decode attention B=1, L=16k bf16;
LUT-GEMV N=4096, K=14336, M=1 at 4 and 2 bits; decode attention over a quantized KV cache B=4,
L=32k, split schedule. Baselines: ``torch.nn.functional.scaled_dot_product_attention`` (cuDNN /
flash on a GPU) and ``torch.nn.functional.linear`` (cuBLAS) on bf16 data of the same shape. The
README's ragged B=8 attention row came from ``pykernels-bench attention --device cuda``.

Nothing here has run yet. The ad-hoc scripts it was written from ran on an H100 on
2026-11-23; their figures are in the README.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch

MiB = 1 << 20


def _require_gpu():
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu: needs a CUDA GPU (torch.cuda.is_available() is False on this machine)")


def kernel_time_us(fn, calls: int = 10) -> tuple[float, list]:
    """(GPU microseconds per call, [(kernel name, us per call)] heaviest first) from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    per = sorted(((e.key, e.device_time_total / calls) for e in ev), key=lambda kv: -kv[1])
    return sum(t for _, t in per), per


def call_time_us(fn, calls: int = 50) -> float:
    """Wall-clock microseconds per call over ``calls`` back-to-back calls and one synchronize."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def _copies(nbytes: int) -> int:
    """Copies of a case's data so that one round through them is >= 3x the L2 cache."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 64 * MiB
    return max(1, -(-3 * l2 // max(1, nbytes)))


def _cycle(calls):
    """One function that makes the calls in turn (each on its own copy of the data)."""
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


def _cases(quick: bool):
    """[(name, group, bytes read per call, FLOPs per call, fn)] for every case; a case whose setup
    fails becomes (name, group, None, None, the error text)."""
    import pykernels as pk

    from .attention import AttnConfig, byte_counts, flop_count

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    out = []

    def add(name, group, nbytes, flops, make):
        try:
            out.append((name, group, nbytes, flops, make()))
        except Exception as e:  # a backend that cannot run here is a row with its reason
            out.append((name, group, None, None, f"{type(e).__name__}: {e}"[:300]))

    # decode attention: B=1, Hq=32, Hkv=8, D=128, L=16k bf16 (64 MiB of K and V)
    B, L, Hq, Hkv, D = 1, 4096 if quick else 16384, 32, 8, 128

    def kv_cost(B, L):  # (K+V bytes, FLOPs) of a bf16 decode step, as the attention suites count them
        cfg = AttnConfig(B, Hq, Hkv, D, [L] * B, "bf16")
        return byte_counts(cfg)["kv_bytes"], flop_count(cfg)

    kv_bytes, att_flops = kv_cost(B, L)
    kvs = [(torch.randn(B, L, Hkv, D, device=dev, dtype=torch.bfloat16, generator=g),
            torch.randn(B, L, Hkv, D, device=dev, dtype=torch.bfloat16, generator=g))
           for _ in range(_copies(kv_bytes))]
    q = torch.randn(B, Hq, D, device=dev, dtype=torch.bfloat16, generator=g)
    sl = torch.full((B,), L, dtype=torch.int32, device=dev)
    grp = f"attention B={B} Hq={Hq} Hkv={Hkv} D={D} L={L} bf16, {len(kvs)} caches in turn"
    sl_host = sl.cpu()  # lengths a scheduler keeps on the host: no device-to-host sync per call
    for be in ("cuda", "triton"):
        for m in ("lean", "split"):
            for lens, tag in ((sl, ""), (sl_host, ", host lens")):
                add(f"pk {be} {m}{tag}", grp, kv_bytes, att_flops, lambda be=be, m=m, lens=lens: _cycle(
                    [lambda k=k, v=v: pk.decode_attention(q, k, v, lens, method=m, backend=be) for k, v in kvs]))
    add("torch sdpa", grp, kv_bytes, att_flops, lambda: _cycle(
        [lambda k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True) for k, v in kvs]))

    # LUT-GEMV: N=4096, K=14336, M=1 (an 8B model's down projection), bf16 activations
    N, K = (1024, 4096) if quick else (4096, 14336)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g)
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16, generator=g)
    grp = f"lut_gemv N={N} K={K} M=1 bf16, weights in turn"
    for bits in (4, 2):
        qw = pk.quantize_weight(w, bits=bits, group_size=128)
        qws = [qw] + [pk.quantize_weight(w.roll(i, 0), bits=bits, group_size=128)
                      for i in range(1, _copies(qw.nbytes))]
        for be in ("cuda", "triton"):
            add(f"pk {be} {bits}-bit", grp, qw.nbytes, 2 * N * K, lambda be=be, qws=qws: _cycle(
                [lambda qw=qw: pk.lut_gemv(x, qw, backend=be) for qw in qws]))
    ws = [w] + [w.roll(i, 0) for i in range(1, _copies(w.numel() * 2))]
    add("torch linear bf16", grp, w.numel() * 2, 2 * N * K, lambda: _cycle(
        [lambda w=w: torch.nn.functional.linear(x, w) for w in ws]))

    # quantized KV cache: B=4, L=32k, group 32, residual 128, split schedule
    B, L = (1, 4096) if quick else (4, 32768)
    kk = torch.randn(B, L, Hkv, D, device=dev, dtype=torch.bfloat16, generator=g)
    vv = torch.randn(B, L, Hkv, D, device=dev, dtype=torch.bfloat16, generator=g)
    q4 = torch.randn(B, Hq, D, device=dev, dtype=torch.bfloat16, generator=g)
    sl4 = torch.full((B,), L, dtype=torch.int32, device=dev)
    grp = f"quantized KV B={B} Hq={Hq} Hkv={Hkv} D={D} L={L}, group 32, split"
    bf16_bytes, kv_flops = kv_cost(B, L)
    for be in ("cuda", "triton"):  # 537 MiB: > 3x L2 without copies
        add(f"pk {be} bf16 cache", grp, bf16_bytes, kv_flops,
            lambda be=be: (lambda: pk.decode_attention(q4, kk, vv, sl4, method="split", backend=be)))
    for bits in (8, 4, 2, "fp8"):
        try:
            caches = []
            while not caches or len(caches) < _copies(caches[0].nbytes):
                c = pk.QuantizedKVCache(B, L, Hkv, D, bits=bits, group_size=32, residual=128,
                                        dtype=torch.bfloat16, device=dev)
                c.append(kk, vv)
                caches.append(c)
        except Exception as e:
            out.append((f"pk {bits} cache", grp, None, None, f"{type(e).__name__}: {e}"[:300]))
            continue
        for be in ("cuda", "triton"):
            add(f"pk {be} {bits} cache", grp, caches[0].nbytes, kv_flops, lambda be=be, cs=caches: _cycle(
                [lambda c=c: pk.decode_attention(q4, c, method="split", backend=be) for c in cs]))
    return out


def run(only=None, quick: bool = False) -> dict:
    """Measure every case (or those whose name contains one of ``only``); returns the JSON document."""
    _require_gpu()
    import roofline

    prof = roofline.probe(device="cuda", quick=True, cache=False)
    hbm = prof.mem_bandwidth.get("read")
    rows = []
    for name, group, nbytes, flops, fn in _cases(quick):
        if only and not any(o in name for o in only):
            continue
        row = dict(group=group, name=name, bytes=nbytes, flops=flops)
        if isinstance(fn, str):
            row["error"] = fn
        else:
            try:
                kus, kernels = kernel_time_us(fn)
                if not kus > 0:
                    raise RuntimeError("the profiler recorded no GPU kernel for this call")
                row.update(kernel_us=kus, call_us=call_time_us(fn),
                           kernels=[dict(name=n[:80], us=t) for n, t in kernels[:6]])
                if nbytes:
                    row["kernel_GB_s"] = nbytes / kus / 1e3
                    if hbm:
                        row["pct_hbm"] = 100.0 * nbytes / (kus * 1e-6) / hbm
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    return dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                probe=prof.to_dict(), rows=rows,
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def rows_for_report(doc: dict) -> list[dict]:
    """``run()``'s rows as ``bench.report`` rows on device "cuda": the roofline point of each is
    its kernel time (``seconds``), with the per-call time beside it; torch rows are baselines."""
    out = []
    for r in doc["rows"]:
        row = {"suite": "gpu-1", "label": r["group"], "method": r["name"], "device": "cuda",
               "baseline": r["name"].startswith("torch"), "bytes": r.get("bytes"), "flops": r.get("flops")}
        if "error" in r:
            row["error"] = r["error"]
        else:
            row.update(seconds=r["kernel_us"] * 1e-6, kernel_us=r["kernel_us"], call_us=r["call_us"],
                       kernels=r.get("kernels", []))
            for k in ("kernel_GB_s", "pct_hbm"):
                if k in r:
                    row[k] = r[k]
        out.append(row)
    return out


def suite_gpu(ctx) -> dict:
    """bench.report's GPU suite: every case of ``run()`` (kernel and per-call time, against torch).
    Without a CUDA GPU it returns a note and no rows. ``gpu_machine``: the measured GPU profile
    (``roofline.probe(device="cuda")``) the rows are placed against."""
    if not torch.cuda.is_available():
        return {"rows": [], "targets": [], "notes": ["No CUDA GPU on this machine: the GPU suite did not run."]}
    doc = run(quick=getattr(ctx, "quick", False))
    hbm = doc["probe"]["mem_bandwidth"].get("read", 0) / 1e12
    notes = [f"{doc['device']}, torch {doc['torch']}: HBM read {hbm:.2f} TB/s measured by "
             "roofline.probe(device='cuda', quick=True) in this run.",
             "kernel us: the GPU time of a call's kernels (torch.profiler, mean of 10 calls), the roofline "
             "point; call us: wall-clock time per call over 50 back-to-back calls, host work included. "
             "Each case cycles through copies of its data (>= 3x L2 per round), so inputs are read from "
             "HBM, not L2."]
    return {"rows": rows_for_report(doc), "targets": [], "notes": notes, "gpu_machine": doc["probe"]}


SUITES = [("gpu-1", "GPU kernels (CUDA and Triton) against torch: kernel time and time per call", suite_gpu)]


def format_rows(doc: dict) -> str:
    lines = [f"{doc['device']} (torch {doc['torch']}); HBM read "
             f"{doc['probe']['mem_bandwidth'].get('read', 0) / 1e12:.2f} TB/s (probe)"]
    group = None
    for r in doc["rows"]:
        if r["group"] != group:
            group = r["group"]
            lines.append(f"\n{group}\n{'case':<28} {'kernel us':>10} {'call us':>9} {'GB/s':>8} {'% HBM':>6}")
        if "error" in r:
            lines.append(f"{r['name']:<28} not run: {r['error']}")
            continue
        gbs = f"{r['kernel_GB_s']:8.0f}" if "kernel_GB_s" in r else f"{'-':>8}"
        pct = f"{r['pct_hbm']:6.1f}" if "pct_hbm" in r else f"{'-':>6}"
        lines.append(f"{r['name']:<28} {r['kernel_us']:10.1f} {r['call_us']:9.1f} {gbs} {pct}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--only", default=None, help="comma list: cases whose name contains one of these")
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run, not figures)")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s] if args.only else None
    doc = run(only, args.quick)
    print(format_rows(doc))
    if args.json:
        from roofline.report import _write

        _write(args.json, json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
