"""``roofline``: measure this machine, or predict a model's decode/prefill time on a roofline.

Examples
--------
    roofline probe --quick                        # peaks, memory bandwidth (cached)
    roofline probe --disk /tmp /data --json       # plus cold disk read/write, as JSON
    roofline probe --device cuda --no-cache       # GPU peaks, HBM and host links, re-measured
    roofline analyze --model config.json --batch 1 --context 50000 --device A100-80GB-SXM
    roofline analyze --model config.json --batch 8 --context 4096 --phase prefill --device this
"""

from __future__ import annotations

import argparse
import json
import os

from .hardware import HARDWARE, MachineProfile
from .measure import probe
from .model import ModelAnalysis, analyze_model


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="roofline", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="measure peak FLOP/s, memory, disk and link bandwidth")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    p.add_argument("--disk", nargs="+", action="extend", default=[], metavar="DIR",
                   help="directories whose cold sequential read/write bandwidth to measure")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print MachineProfile.to_dict() as JSON")
    p.add_argument("--no-cache", action="store_true", help="measure again and update the cache")

    a = sub.add_parser("analyze", help="per-op roofline time of a decoder-only model")
    a.add_argument("--model", required=True, metavar="CONFIG.json", help="HF config.json")
    a.add_argument("--batch", type=int, required=True, help="sequences per step")
    a.add_argument("--context", type=int, required=True,
                   help="decode: KV tokens per sequence; prefill: prompt tokens")
    a.add_argument("--phase", choices=["decode", "prefill"], default="decode")
    a.add_argument("--w-bits", type=int, default=16, help="decoder weight bits: 16 or 1..8")
    a.add_argument("--kv-bits", choices=["16", "8", "4", "2", "fp8"], default="16")
    a.add_argument("--device", default="A100-80GB-SXM",
                   help=f"'this' (quick probe, cached) or one of {', '.join(HARDWARE)}")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    a.add_argument("--json", action="store_true", help="print ModelAnalysis.to_dict() as JSON")
    return ap


def _print_profile(m: MachineProfile) -> None:
    print(f"machine: {m.name}  (source: {m.source})")
    print("peak compute:")
    for k, v in m.peak_flops.items():
        print(f"  {k:<6} {v / 1e9:12.1f} G{'OP' if k == 'int8' else 'FLOP'}/s")
    print("memory bandwidth:")
    for k, v in m.mem_bandwidth.items():
        print(f"  {k:<6} {v / 1e9:12.1f} GB/s")
    if m.mem_capacity is not None:
        print(f"memory capacity: {m.mem_capacity / 2**30:.1f} GiB")
    if m.disk:
        print("disk (cold, sequential):")
        for path, d in m.disk.items():
            print(f"  {path}: read {d['read'] / 1e9:.2f} GB/s, write {d['write'] / 1e9:.2f} GB/s "
                  f"({d.get('method', '?')})")
    if m.links:
        print("links:")
        for k, v in m.links.items():
            print(f"  {k:<13} {v / 1e9:8.2f} GB/s")
    print(f"notes: {m.notes}")


def _print_analysis(r: ModelAnalysis) -> None:
    print(f"{r.phase} on {r.machine}: batch {r.batch}, context {r.context}, w_bits {r.w_bits}, "
          f"kv_bits {r.kv_bits}, tp {r.tp}")
    per_token = r.time_s / (r.batch if r.phase == "decode" else r.batch * r.context)
    print(f"time per step {r.time_s * 1e3:.3f} ms ({per_token * 1e3:.3f} ms per token), "
          f"{r.tokens_per_s:.1f} tokens/s, {r.bound}-bound")
    print(f"weights {r.weight_bytes / 1e9:.3f} GB, KV {r.kv_bytes_per_token:,.0f} bytes/token "
          f"({r.kv_bytes_per_sequence / 1e9:.3f} GB per sequence), max sequences "
          f"{'unknown' if r.max_sequences is None else r.max_sequences}")
    print(f"{'op':<11} {'count':>5} {'GFLOP':>10} {'MB':>10} {'time us':>10}  bound")
    for row in r.layers:
        print(f"{row['op']:<11} {row['count']:>5} {row['flops'] / 1e9:>10.3f} "
              f"{row['bytes'] / 1e6:>10.3f} {row['time_s'] * 1e6:>10.2f}  {row['bound']}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``roofline`` command; returns the exit status.

    Usage errors (bad arguments, a missing model file, an unknown device) exit with status 2
    and a one-line message.

    Example
    -------
    >>> main(["analyze", "--model", "config.json", "--batch", "1", "--context", "4096"])  # doctest: +SKIP
    """
    ap = _parser()
    args = ap.parse_args(argv)
    if args.command == "probe":
        try:
            m = probe(device=args.device, quick=args.quick, disk_dirs=args.disk,
                      threads=args.threads, refresh=args.no_cache)
        except (ValueError, TypeError, RuntimeError) as exc:
            ap.error(str(exc))
        if args.json:
            print(json.dumps(m.to_dict(), indent=1))
        else:
            _print_profile(m)
        return 0

    if not os.path.isfile(args.model):
        ap.error(f"--model: {args.model!r} is not a file")
    kv_bits = args.kv_bits if args.kv_bits == "fp8" else int(args.kv_bits)
    try:
        machine = probe(quick=True) if args.device == "this" else args.device
        r = analyze_model(args.model, batch=args.batch, context=args.context, phase=args.phase,
                          w_bits=args.w_bits, kv_bits=kv_bits, machine=machine, tp=args.tp)
    except json.JSONDecodeError as exc:
        ap.error(f"--model: {args.model!r} is not valid JSON: {exc}")
    except (ValueError, TypeError, OSError) as exc:
        ap.error(str(exc))
    if args.json:
        print(json.dumps(r.to_dict(), indent=1))
    else:
        _print_analysis(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
