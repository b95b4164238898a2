"""``roofline``: measure this machine, predict a model's decode/prefill time, write a report.

Examples
--------
    roofline probe --quick                        # peaks, memory bandwidth (cached)
    roofline probe --disk /tmp /data --json       # plus cold disk read/write, as JSON
    roofline probe --device cuda --no-cache       # GPU peaks, HBM and host links, re-measured
    roofline analyze --model config.json --batch 1 --context 50000 --device A100-80GB-SXM
    roofline analyze --model config.json --batch 8 --context 4096 --phase prefill --device this
    roofline report --out reports/mine                                  # this machine, quick probe
    roofline report --out r --results reports/host/report.json --model config.json --context 16384
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from .hardware import HARDWARE, MachineProfile
from .measure import probe
from .model import ModelAnalysis, analyze_model


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {v}")
    return v


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

    r = sub.add_parser("report", help="write index.html, report.md and report.json: the machine, "
                                      "measured rows on its roofline, advice, model predictions")
    r.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    r.add_argument("--results", nargs="+", action="extend", default=[], metavar="JSON",
                   help="measured rows: a bench report.json (python -m bench.report, "
                        "pykernels-bench --json) or a JSON list of rows")
    r.add_argument("--device", default="this",
                   help=f"'this' (quick probe, cached) or one of {', '.join(HARDWARE)}")
    r.add_argument("--model", metavar="CONFIG.json", help="HF config.json to predict and advise for")
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--context", type=int, default=16384)
    r.add_argument("--threads", type=_positive_int, default=None, help="CPU workers the advice plans for (a GPU --device plans for 2 CTAs per SM)")
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


def _load_results(ap, paths: list[str]):
    """Rows (or one bench report dict) from the --results files."""
    loaded = []
    for path in paths:
        if not os.path.isfile(path):
            ap.error(f"--results: {path!r} is not a file")
        try:
            with open(path, encoding="utf-8") as fh:
                loaded.append(json.load(fh))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            ap.error(f"--results: {path!r} is not valid JSON: {exc}")
        except OSError as exc:
            ap.error(f"--results: {exc}")
    if len(loaded) == 1 and isinstance(loaded[0], dict) and "suites" in loaded[0]:
        return loaded[0]
    rows = []
    for path, d in zip(paths, loaded):
        if isinstance(d, dict) and isinstance(d.get("rows"), list):
            rows += d["rows"]
        elif isinstance(d, list):
            rows += d
        else:
            ap.error(f"--results: {path!r} holds neither a list of rows nor a dict with 'rows'")
    if any(not isinstance(r, dict) for r in rows):
        ap.error("--results: every row must be a JSON object")
    return rows


def _read_model(ap, path: str) -> dict:
    """The HF config.json given as --model; a usage error (exit 2) if missing or not JSON."""
    if not os.path.isfile(path):
        ap.error(f"--model: {path!r} is not a file")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        ap.error(f"--model: {path!r} is not valid JSON: {exc}")
    except OSError as exc:
        ap.error(f"--model: {exc}")


def _report(ap, args) -> int:
    from .advise import advise_decode_attention, advise_kv_format, advise_lut
    from .hardware import decode_workers
    from .report import report

    results = _load_results(ap, args.results)
    cfg = _read_model(ap, args.model) if args.model else None
    try:
        machine = probe(quick=True) if args.device == "this" else args.device
        recs, analyses, notes = [], [], []
        if cfg is not None:
            name = os.path.basename(os.path.dirname(os.path.abspath(args.model))) or args.model
            for kv in (16, 4):  # analyze_model validates the config and names a missing key
                a = analyze_model(cfg, batch=args.batch, context=args.context, kv_bits=kv, machine=machine)
                analyses.append(dict(a.to_dict(), model=name))
            notes.append(f"Predicted for {args.model}: {analyses[0]['tokens_per_s']:.1f} tokens/s "
                         f"({analyses[0]['bound']}-bound) with a bf16 KV cache")
            hq = cfg["num_attention_heads"]
            hkv = cfg.get("num_key_value_heads") or hq
            d = cfg.get("head_dim") or cfg["hidden_size"] // hq
            dev, workers = decode_workers(machine, args.threads)  # GPU: CTAs, not this host's threads
            recs.append(advise_decode_attention([args.context] * args.batch, hq, hkv, d,
                                                num_workers=workers, machine=machine, device=dev))
            recs.append(advise_kv_format(args.context, hq, hkv, d, batch=args.batch,
                                         num_layers=cfg["num_hidden_layers"], machine=machine))
            recs.append(advise_lut(cfg["hidden_size"], cfg["intermediate_size"], M=args.batch, machine=machine))
        paths = report(results, machine, args.out, recommendations=recs, analyses=analyses, notes=notes)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        ap.error(f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc))
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


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
        for d in args.disk or []:  # checked before minutes of measuring: the disk probe writes a file there
            if not os.path.isdir(d):
                ap.error(f"--disk: {d!r} is not a directory")
            try:
                fd, scratch = tempfile.mkstemp(dir=d, prefix=".pk-probe-check-")
                os.close(fd)
                os.unlink(scratch)
            except OSError as exc:
                ap.error(f"--disk: cannot write a scratch file in {d!r} ({exc.strerror or exc})")
        try:
            m = probe(device=args.device, quick=args.quick, disk_dirs=args.disk,
                      threads=args.threads, refresh=args.no_cache)
        except (ValueError, TypeError, RuntimeError, OSError) as exc:
            ap.error(str(exc))
        if args.json:
            print(json.dumps(m.to_dict(), indent=1))
        else:
            _print_profile(m)
        return 0

    if args.command == "report":
        return _report(ap, args)

    cfg = _read_model(ap, args.model)
    kv_bits = args.kv_bits if args.kv_bits == "fp8" else int(args.kv_bits)
    try:
        machine = probe(quick=True) if args.device == "this" else args.device
        r = analyze_model(cfg, batch=args.batch, context=args.context, phase=args.phase,
                          w_bits=args.w_bits, kv_bits=kv_bits, machine=machine, tp=args.tp)
    except (ValueError, TypeError, OSError) as exc:
        ap.error(str(exc))
    if args.json:
        print(json.dumps(r.to_dict(), indent=1))
    else:
        _print_analysis(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
