"""``pykernels-bench``: microbenchmarks with every figure shown next to its roofline.

Examples
--------
    pykernels-bench probe
    pykernels-bench attention --heads-q 32 --heads-kv 8 --head-dim 128 --seqlens 16384
    pykernels-bench attention --seqlens 32768,1024,512 --heads-q 8 --heads-kv 1 --method lean,unsplit,split
    pykernels-bench attention --sweep            # the issue's suites 1-3
    pykernels-bench attention --sweep 2 --json out.json
    pykernels-bench lut                          # 4-bit g128 affine, N=4096 K=14336 M=1, vs torch bf16
    pykernels-bench lut --bits 1,2,3,4 --M 1,8 --method lut,torch_bf16,dequant
    pykernels-bench lut --sweep                  # the issue's LUT suites 1-4
    pykernels-bench lut --sweep 1,3 --quick --json lut.json
    pykernels-bench kv                           # int8/int4/int2/fp8 fused vs bf16 and HF, L=16384
    pykernels-bench kv --seqlens 32768 --formats int4,int2 --group-size 64 --sink 1
    pykernels-bench kv --accuracy                # synthetic outlier set: KIVI vs per-token RTN
    pykernels-bench kv --sweep                   # the issue's KV suites 1-3 (speed, memory, accuracy)
    pykernels-bench offload bench                # stream a 1.1B Llama under 512 MiB (= python -m offload)
    pykernels-bench offload generate CKPT --budget 512MiB --tokens 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def _set_threads(n: int | None):
    """Make torch and the pykernels pool use n threads (before pykernels starts its pool)."""
    if n is None:
        return
    import torch
    os.environ["PYKERNELS_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    try:
        from pykernels import _C
        _C.set_num_threads(n)
    except Exception:
        pass  # reported per row (isa/threads fields) by the bench itself


def _probe(args) -> dict:
    from roofline import probe_memory_bandwidth
    from .attention import wait_for_quiet
    wait_for_quiet(getattr(args, "wait_quiet", 0.0))
    size = int(args.probe_size_mib * (1 << 20)) if getattr(args, "probe_size_mib", None) else None
    return probe_memory_bandwidth(size_bytes=size)


def _print_probe(p: dict):
    m = p["machine"]
    print(f"machine: {m['cpu_model']}, {m['usable_cpus']} cpus, LLC {m['llc_bytes'] >> 20} MiB, "
          f"{(m['mem_total_bytes'] or 0) / 2**30:.1f} GiB RAM, simd {','.join(m['simd']) or '-'}")
    print(f"probe ({p['threads']} threads, {p['size_bytes'] >> 20} MiB per array): "
          f"read {p['read_GB_s']:.1f} GB/s (p10..p90 {p['read']['GB_s_p10']:.1f}..{p['read']['GB_s_p90']:.1f}), "
          f"triad {p['triad_GB_s']:.1f} GB/s (3 arrays; {p['triad_wa_GB_s']:.1f} counting write-allocate); "
          f"1 thread reads {p['read_1thread_GB_s']:.1f} GB/s")
    for w in p["warnings"]:
        print(f"  warning: {w}")



def _check_common(args) -> None:
    """Options every subcommand shares, checked before anything is measured (so a typo never
    costs a whole run): --threads, --repeats, --bandwidth, --json."""
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise SystemExit(f"--threads: expected >= 1, got {threads}")
    if getattr(args, "repeats", 1) < 1:
        raise SystemExit(f"--repeats: expected >= 1, got {args.repeats}")
    bw = getattr(args, "bandwidth", None)
    if bw is not None and not (math.isfinite(bw) and bw > 0):
        raise SystemExit(f"--bandwidth: expected GB/s > 0, got {bw}")
    path = getattr(args, "json", None)
    if path:
        ap = os.path.abspath(path)
        if os.path.isdir(ap):
            raise SystemExit(f"--json: {path!r} is a directory; give a file name")
        tmp = f"{ap}.tmp{os.getpid()}"
        try:  # what _write_json will do at the end: make the folder, write beside the file
            os.makedirs(os.path.dirname(ap), exist_ok=True)
            with open(tmp, "w"):
                pass
            os.unlink(tmp)
        except OSError as e:
            raise SystemExit(f"--json: cannot write {path!r}: {e.strerror or e}")


def _check_sweep(sweep: str, suites) -> set:
    """The --sweep selection: suite numbers or names; SystemExit listing the valid ones otherwise."""
    wanted = {x.strip() for x in sweep.split(",") if x.strip()}
    valid = {n for name, _, _ in suites for n in (name, name.split("-")[-1])}
    bad = sorted(wanted - valid)
    if bad or not wanted:
        raise SystemExit(f"--sweep: unknown {bad or [sweep]}; expected a comma list of "
                         f"{', '.join(name for name, _, _ in suites)} (or their numbers)")
    return wanted


def _positive(**vals) -> None:
    for flag, v in vals.items():
        if v is not None and v < 1:
            raise SystemExit(f"--{flag.replace('_', '-')}: expected >= 1, got {v}")


def _dtype(name: str) -> None:
    from .attention import parse_dtype
    try:
        parse_dtype(name)
    except ValueError as e:
        raise SystemExit(f"--{e}")


def _bandwidth(args):
    """-> (GB/s for '% bw', probe dict or None when --bandwidth was given)."""
    if args.bandwidth is not None:
        print(f"bandwidth given: {args.bandwidth:.1f} GB/s (probe skipped)")
        return args.bandwidth, None
    probe = _probe(args)
    _print_probe(probe)
    return probe["bandwidth_GB_s"], probe


def _machine(bw, probe, device: str, out: dict):
    """The run's roofline machine (``bench.roof``) or None, with one printed line saying which;
    recorded in ``out["roofline"]``. Never raises: without it rows just lack the roof columns."""
    from .roof import run_machine
    if device != "cpu":
        machine, note = None, f"no roofline columns: the machine model is the CPU's, not {device!r}'s"
    else:
        machine, note = run_machine(probe, bw)
    if machine is not None:
        pk = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in machine.peak_flops.items())
        print(f"roofline: peaks {pk} GFLOP/s (roofline.probe quick, cached); "
              f"memory roof {machine.mem_bandwidth['read'] / 1e9:.1f} GB/s (the '% bw' figure)")
    else:
        print(f"roofline: {note}")
    out["roofline"] = {"machine": machine and machine.to_dict(), "note": note}
    return machine

def cmd_probe(args) -> int:
    _check_common(args)
    if args.size_mib is not None and not (math.isfinite(args.size_mib) and args.size_mib > 0):
        raise SystemExit(f"--size-mib: expected > 0, got {args.size_mib}")
    _set_threads(args.threads)
    from roofline import probe_memory_bandwidth
    size = int(args.size_mib * (1 << 20)) if args.size_mib else None
    p = probe_memory_bandwidth(size_bytes=size, repeats=args.repeats)
    _print_probe(p)
    if args.json:
        _write_json(args.json, {"probe": p})
    return 0


def _write_json(path, obj):
    """Strict JSON (non-finite numbers as null), written to a temporary name and renamed: a
    crash never leaves a truncated file."""
    from roofline.report import _jsonable, _write

    ap = os.path.abspath(path)
    os.makedirs(os.path.dirname(ap), exist_ok=True)
    _write(ap, json.dumps(_jsonable(obj), indent=1, allow_nan=False))
    print(f"wrote {path}")


def _parse_seqlens(text: str, batch: int | None) -> list[int]:
    try:
        lens = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--seqlens: expected a comma-separated list of ints, got {text!r}")
    if not lens:
        raise SystemExit("--seqlens: expected at least one length")
    if any(n < 1 for n in lens):
        raise SystemExit(f"--seqlens: expected lengths >= 1, got {lens}")
    if batch is not None and batch < 1:
        raise SystemExit(f"--batch: expected >= 1, got {batch}")
    if batch is None:
        return lens
    if len(lens) == 1:
        return lens * batch
    if len(lens) != batch:
        raise SystemExit(f"--seqlens: expected 1 or --batch={batch} lengths, got {len(lens)}")
    return lens


def _run_suites(suites, ctx, wanted: set, out: dict) -> None:
    """Run the suites named in ``wanted`` ("2" or "attention-2"), printing their tables, targets
    and notes; rows and targets are appended to ``out``."""
    from .attention import format_targets

    for name, title, fn in suites:
        if name.split("-")[-1] not in wanted and name not in wanted:
            continue
        print(f"\n== {name}: {title}")
        res = fn(ctx)
        out["rows"] += res["rows"]
        out["targets"] += [dict(t, suite=name) for t in res["targets"]]
        if res["targets"]:
            print(format_targets(res["targets"]))
        for n in res.get("notes", []):
            print(f"note: {n}")


def cmd_attention(args) -> int:
    _check_common(args)
    from . import attention as A

    if args.sweep:
        _check_sweep(args.sweep, A.SUITES)
        if args.num_splits is not None:
            raise SystemExit("--num-splits: not used with --sweep (the suites set their own schedules)")
    else:
        _positive(heads_q=args.heads_q, heads_kv=args.heads_kv, head_dim=args.head_dim, num_splits=args.num_splits)
        if args.heads_q % args.heads_kv:
            raise SystemExit(f"--heads-q: {args.heads_q} is not a multiple of --heads-kv {args.heads_kv}")
        _dtype(args.dtype)
        _parse_seqlens(args.seqlens, args.batch)
    if args.device not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected cpu or cuda, got {args.device!r}")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    _set_threads(args.threads)

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in A.ALL_METHODS and not A.is_pk_method(m)]
    if bad:
        raise SystemExit(f"--method: unknown {bad}; expected a comma list of {', '.join(A.ALL_METHODS)} "
                         "or split<S> (num_splits=S)")
    bw, probe = _bandwidth(args)

    out = {"probe": probe, "rows": [], "targets": []}
    machine = _machine(bw, probe, args.device, out)
    if args.sweep:
        wanted = _check_sweep(args.sweep, A.SUITES)
        ctx = A.BenchContext(bandwidth_GB_s=bw, backend=args.backend, device=args.device,
                             repeats=args.repeats, quick=args.quick, wait_quiet_s=args.wait_quiet,
                             probe=probe, machine=machine)
        _run_suites(A.SUITES, ctx, wanted, out)
    else:
        lens = _parse_seqlens(args.seqlens, args.batch)
        cfg = A.AttnConfig(len(lens), args.heads_q, args.heads_kv, args.head_dim, lens, args.dtype)
        rows = A.bench_attention(cfg, methods, backend=args.backend, device=args.device,
                                 repeats=args.repeats, bandwidth_GB_s=bw, num_splits=args.num_splits,
                                 wait_quiet_s=args.wait_quiet, machine=machine)
        print(A.format_rows(rows))
        out["rows"] = rows
    if args.json:
        _write_json(args.json, out)
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--{what}: expected a comma-separated list of ints, got {text!r}")
    if not vals:
        raise SystemExit(f"--{what}: expected at least one value")
    return vals


def cmd_lut(args) -> int:
    _check_common(args)
    from . import lut as L

    _positive(N=args.N, K=args.K)
    _dtype(args.dtype)
    if args.sweep:
        _check_sweep(args.sweep, L.SUITES)
    _set_threads(args.threads)

    kinds = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in kinds if m not in L.KINDS]
    if bad:
        raise SystemExit(f"--method: unknown {bad}; expected a comma list of {', '.join(L.KINDS)}")
    bits, Ms = _int_list(args.bits, "bits"), _int_list(args.M, "M")
    if any(not 1 <= b <= 8 for b in bits):
        raise SystemExit(f"--bits: expected values in 1..8, got {bits}")
    if any(not 1 <= M for M in Ms):
        raise SystemExit(f"--M: expected values >= 1, got {Ms}")
    bw, probe = _bandwidth(args)

    out = {"probe": probe, "rows": [], "targets": []}
    machine = _machine(bw, probe, args.device, out)
    if args.sweep:
        wanted = _check_sweep(args.sweep, L.SUITES)
        ctx = L.LutContext(bandwidth_GB_s=bw, backend=args.backend, device=args.device,
                           repeats=args.repeats, quick=args.quick, wait_quiet_s=args.wait_quiet,
                           probe=probe, machine=machine, group_size=args.group_size, scheme=args.scheme,
                           mode=args.mode, dtype=args.dtype, time_budget_s=args.time_budget,
                           lead_in_s=args.lead_in)
        _run_suites(L.SUITES, ctx, wanted, out)
    else:
        methods = []
        for k in kinds:
            if k == "torch_bf16":
                methods.append(L.TORCH_BF16)
            elif k == "dequant":
                methods += [L.dequant(b, args.group_size, args.scheme) for b in bits]
            else:
                methods += [L.lut(b, args.group_size, args.scheme, args.mode) for b in bits]
        cases = [(m, M) for M in Ms for m in methods]
        rows = L.bench_lut(args.N, args.K, cases, dtype=args.dtype, backend=args.backend,
                           device=args.device, repeats=args.repeats, time_budget_s=args.time_budget,
                           bandwidth_GB_s=bw, wait_quiet_s=args.wait_quiet, check=not args.no_check,
                           lead_in_s=args.lead_in, machine=machine)
        print(L.format_rows(rows))
        out["rows"] = rows
    if args.json:
        _write_json(args.json, out)
    return 0


def cmd_kv(args) -> int:
    _check_common(args)
    from . import kvquant as KV

    _positive(batch=args.batch, acc_queries=args.acc_queries)
    if args.acc_len < 2:
        raise SystemExit(f"--acc-len: expected >= 2, got {args.acc_len}")
    if args.head_dim % 8:
        raise SystemExit(f"--head-dim: expected a multiple of 8, got {args.head_dim}")
    if args.sweep:
        _check_sweep(args.sweep, KV.SUITES)
        if args.batch != 1:
            raise SystemExit(f"--batch: the --sweep suites run the issue's B=1; got --batch {args.batch} "
                             f"(drop --sweep to time another batch)")
    _set_threads(args.threads)

    kinds = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in kinds if m not in KV.KINDS]
    if bad:
        raise SystemExit(f"--method: unknown {bad}; expected a comma list of {', '.join(KV.KINDS)}")
    try:
        formats = tuple(KV.parse_format(f) for f in args.formats.split(",") if f.strip())
    except ValueError as e:
        raise SystemExit(f"--formats: {e}")
    if not formats:
        raise SystemExit("--formats: expected at least one of int8, int4, int2, fp8")
    if args.group_size not in (32, 64, 128):
        raise SystemExit(f"--group-size: expected 32, 64 or 128, got {args.group_size}")
    if args.residual < args.group_size or args.residual % args.group_size:
        raise SystemExit(f"--residual: expected a positive multiple of --group-size={args.group_size}, "
                         f"got {args.residual}")
    if args.sink < 0:
        raise SystemExit(f"--sink: expected >= 0, got {args.sink}")
    lens = _int_list(args.seqlens, "seqlens")
    if any(L < 1 for L in lens):
        raise SystemExit(f"--seqlens: expected lengths >= 1, got {lens}")
    for flag, val in (("--heads-q", args.heads_q), ("--heads-kv", args.heads_kv), ("--head-dim", args.head_dim)):
        if val < 1:
            raise SystemExit(f"{flag}: expected >= 1, got {val}")
    if args.heads_q % args.heads_kv:
        raise SystemExit(f"--heads-q: {args.heads_q} is not a multiple of --heads-kv {args.heads_kv}")

    ctx_kw = dict(backend=args.backend, repeats=args.repeats, quick=args.quick, wait_quiet_s=args.wait_quiet,
                  group_size=args.group_size, residual=args.residual, sink=args.sink, method=args.kv_method,
                  formats=formats, lengths=tuple(lens), kinds=tuple(kinds), heads_q=args.heads_q,
                  heads_kv=args.heads_kv, head_dim=args.head_dim, time_budget_s=args.time_budget,
                  acc_len=args.acc_len, acc_queries=args.acc_queries)
    out = {"probe": None, "rows": [], "targets": []}
    if args.accuracy:  # no timing: no probe
        ctx = KV.KVContext(bandwidth_GB_s=None, **ctx_kw)
        _run_suites([s for s in KV.SUITES if s[0] == "kv-3"], ctx, {"3"}, out)
    else:
        bw, probe = _bandwidth(args)
        out["probe"] = probe
        machine = _machine(bw, probe, "cpu", out)
        if args.sweep:
            ctx = KV.KVContext(bandwidth_GB_s=bw, probe=probe, machine=machine, **ctx_kw)
            if not args.seqlens_given:
                ctx.lengths = (16384, 32768)
            _run_suites(KV.SUITES, ctx, _check_sweep(args.sweep, KV.SUITES), out)
        else:
            for L in lens:
                rows = KV.bench_kv(L, formats, batch=args.batch, heads_q=args.heads_q, heads_kv=args.heads_kv,
                                   head_dim=args.head_dim, group_size=args.group_size, residual=args.residual,
                                   sink=args.sink, kinds=kinds, method=args.kv_method, backend=args.backend,
                                   repeats=args.repeats, time_budget_s=args.time_budget, bandwidth_GB_s=bw,
                                   wait_quiet_s=args.wait_quiet, check=not args.no_check, machine=machine)
                print(KV.format_speed(rows))
                out["rows"] += rows
    if args.json:
        _write_json(args.json, out)
    return 0


class _Given(argparse.Action):
    """Store the value and remember that the option was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, self.dest + "_given", True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pykernels-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("probe", help="STREAM-style memory bandwidth of this machine")
    pp.add_argument("--size-mib", type=float, default=None, help="bytes per array (default max(8x LLC, 256 MiB))")
    pp.add_argument("--repeats", type=int, default=11)
    pp.add_argument("--threads", type=int, default=None)
    pp.add_argument("--json", default=None, help="also write the probe as JSON here")
    pp.set_defaults(func=cmd_probe)

    pa = sub.add_parser("attention", help="decode attention vs baselines, cold caches")
    pa.add_argument("--batch", type=int, default=None, help="default: number of --seqlens")
    pa.add_argument("--heads-q", type=int, default=32)
    pa.add_argument("--heads-kv", type=int, default=8)
    pa.add_argument("--head-dim", type=int, default=128)
    pa.add_argument("--seqlens", default="16384", help="comma list, one per sequence, or one for all")
    pa.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32 (q, cache and out)")
    pa.add_argument("--method", default="lean,split,unsplit,sdpa,reference",
                    help="comma list of lean, split, unsplit, auto, sdpa, sdpa_grouped, reference")
    pa.add_argument("--num-splits", type=int, default=None, help="for 'split' (default: heuristic)")
    pa.add_argument("--backend", default="cpu", help="pykernels backend: auto | cpu | triton | cuda | reference")
    pa.add_argument("--device", default="cpu")
    pa.add_argument("--repeats", type=int, default=15)
    pa.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    pa.add_argument("--bandwidth", type=float, default=None, help="GB/s for '%% bw' (skips the probe)")
    pa.add_argument("--probe-size-mib", type=float, default=None)
    pa.add_argument("--sweep", nargs="?", const="1,2,3", default=None,
                    help="run the issue's suites instead of one config (default all: 1,2,3)")
    pa.add_argument("--quick", action="store_true", help="smaller sweeps (with --sweep)")
    pa.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="per configuration, wait up to this long for other processes to go idle")
    pa.add_argument("--json", default=None, help="write rows (and probe) as JSON here")
    pa.set_defaults(func=cmd_attention)

    pl = sub.add_parser("lut", help="LUT-GEMV (low-bit weights) vs torch bf16, cold caches")
    pl.add_argument("-N", "--N", type=int, default=4096, help="output features (default 4096)")
    pl.add_argument("-K", "--K", type=int, default=14336, help="input features (default 14336)")
    pl.add_argument("-M", "--M", default="1", help="comma list of rows of x, e.g. 1,2,4,8,16")
    pl.add_argument("--bits", default="4", help="comma list of weight bits (1..8), e.g. 1,2,3,4")
    pl.add_argument("--group-size", type=int, default=128, help="scale group along K; -1 = per-channel")
    pl.add_argument("--scheme", default="affine", choices=("affine", "symmetric", "codebook"))
    pl.add_argument("--mode", default="int8", choices=("int8", "exact"), help="lut_gemv table mode")
    pl.add_argument("--dtype", default="bf16", help="activation dtype: bf16 | fp16 | fp32")
    pl.add_argument("--method", default="lut,torch_bf16",
                    help="comma list of lut, torch_bf16, dequant (dequantize-then-matmul)")
    pl.add_argument("--backend", default="cpu", help="pykernels backend: auto | cpu | triton | cuda | reference")
    pl.add_argument("--device", default="cpu")
    pl.add_argument("--repeats", type=int, default=15)
    pl.add_argument("--time-budget", type=float, default=2.0, metavar="SECONDS",
                    help="per method: slow methods get fewer repeats (never < 3)")
    pl.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    pl.add_argument("--bandwidth", type=float, default=None, help="GB/s for '%% bw' (skips the probe)")
    pl.add_argument("--probe-size-mib", type=float, default=None)
    pl.add_argument("--no-check", action="store_true", help="skip the one-off correctness check")
    pl.add_argument("--lead-in", type=float, default=0.05, metavar="SECONDS",
                    help="methods faster than this make one untimed call (on other weights) before "
                         "each timed one, so their threads are awake; 0 = off")
    pl.add_argument("--sweep", nargs="?", const="1,2,3,4", default=None,
                    help="run the issue's LUT suites (default all: 1,2,3,4); shapes, bits and M "
                         "are the issue's, --group-size/--scheme/--mode/--dtype/--backend apply")
    pl.add_argument("--quick", action="store_true", help="smaller sweeps (with --sweep)")
    pl.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="per configuration, wait up to this long for other processes to go idle")
    pl.add_argument("--json", default=None, help="write rows (and probe) as JSON here")
    pl.set_defaults(func=cmd_lut)

    pk_ = sub.add_parser("kv", help="quantized KV cache: fused decode attention vs bf16 and HF; accuracy")
    pk_.add_argument("--seqlens", default="16384", action=_Given,
                     help="comma list of cache lengths L, one configuration each (default 16384; "
                          "with --sweep default 16384,32768)")
    pk_.add_argument("--batch", type=int, default=1)
    pk_.add_argument("--heads-q", type=int, default=32)
    pk_.add_argument("--heads-kv", type=int, default=8)
    pk_.add_argument("--head-dim", type=int, default=128)
    pk_.add_argument("--formats", default="int8,int4,int2,fp8", help="comma list of int8, int4, int2, fp8")
    pk_.add_argument("--group-size", type=int, default=32, help="KIVI group size: 32, 64 or 128")
    pk_.add_argument("--residual", type=int, default=128, help="full-precision window (multiple of group size)")
    pk_.add_argument("--sink", type=int, default=0, help="first tokens kept in full precision")
    pk_.add_argument("--method", default="fused,bf16,hf,dequant_sdpa",
                     help="comma list of fused (pk kernel), bf16 (pk on a bf16 cache), hf (transformers "
                          "QuantizedCache), dequant_sdpa (dequantize then torch SDPA)")
    pk_.add_argument("--kv-method", default="auto", choices=("auto", "lean", "split"),
                     help="decode-attention schedule for the fused and bf16 kernels")
    pk_.add_argument("--backend", default="cpu", help="pykernels backend: auto | cpu | triton | cuda | reference")
    pk_.add_argument("--repeats", type=int, default=15)
    pk_.add_argument("--time-budget", type=float, default=3.0, metavar="SECONDS",
                     help="per method: slow baselines get fewer repeats (never < 3)")
    pk_.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    pk_.add_argument("--bandwidth", type=float, default=None, help="GB/s for '%% bw' (skips the probe)")
    pk_.add_argument("--probe-size-mib", type=float, default=None)
    pk_.add_argument("--no-check", action="store_true", help="skip the one-off correctness check")
    pk_.add_argument("--accuracy", action="store_true",
                     help="only the accuracy table on the synthetic outlier set (no timing, no probe)")
    pk_.add_argument("--acc-len", type=int, default=4096, help="tokens of the synthetic set (accuracy)")
    pk_.add_argument("--acc-queries", type=int, default=4, help="queries per head of the synthetic set")
    pk_.add_argument("--sweep", nargs="?", const="1,2,3", default=None,
                     help="run the issue's KV suites (default all: 1 speed, 2 memory, 3 accuracy)")
    pk_.add_argument("--quick", action="store_true", help="smaller sweeps (with --sweep)")
    pk_.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                     help="per configuration, wait up to this long for other processes to go idle")
    pk_.add_argument("--json", default=None, help="write rows (and probe) as JSON here")
    pk_.set_defaults(func=cmd_kv, seqlens_given=False)
    sub.add_parser("offload", help="tiered offload: demo, convert, plan, generate, bench (see python -m offload -h)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["offload"]:  # the offload package's own CLI (python -m offload)
        from offload.cli import main as offload_main
        return offload_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
