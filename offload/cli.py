"""``python -m offload`` (also ``pykernels-bench offload``): demo checkpoints, conversion, placement
plans, generation and the streaming benchmark from the shell.

Examples
--------
    python -m offload demo /data/tinyllama-demo --preset 1b
    python -m offload convert /data/tinyllama-demo /data/store-w4 --weight-bits 4
    python -m offload plan /data/tinyllama-demo --budget 512MiB --weight-bits 4
    python -m offload generate /data/tinyllama-demo --budget 512MiB --prompt-ids 1,2,3 --tokens 16
    python -m offload plan /data/long-demo --budget 1GiB --disk-budget 8GiB --max-context 65536 --kv-bits 4
    python -m offload bench            # issue 6's benchmark (1.1B preset, 512 MiB budget)
"""
from __future__ import annotations

import argparse
import json
import sys


def _bits(v):
    """--weight-bits: none | 1 | 2 | 3 | 4."""
    if v in (None, "none", "16"):
        return None
    if v not in ("1", "2", "3", "4"):
        raise argparse.ArgumentTypeError(f"expected none, 1, 2, 3 or 4, got {v!r}")
    return int(v)


def _kv(v):
    """--kv-bits: none | 8 | 4 | 2 | fp8."""
    if v in (None, "none", "16"):
        return None
    if v not in ("8", "4", "2", "fp8"):
        raise argparse.ArgumentTypeError(f"expected none, 8, 4, 2 or fp8, got {v!r}")
    return v if v == "fp8" else int(v)


def _ids(v):
    """--prompt-ids: comma-separated token ids."""
    try:
        ids = [int(t) for t in v.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer token ids, got {v!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected token ids >= 0, got {v!r}")
    return ids


def cmd_demo(a) -> int:
    import torch

    from .checkpoint import demo_checkpoint
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    print(demo_checkpoint(a.path, preset=a.preset, dtype=dt, seed=a.seed, progress=True))
    return 0


def cmd_convert(a) -> int:
    from .store import convert
    with convert(a.checkpoint, a.store_dir, weight_bits=a.weight_bits, group_size=a.group_size,
                 quantize_head=a.quantize_head, progress=True) as st:
        print(f"{a.store_dir}: {len(st.unit_names())} units, "
              f"{sum(st.unit_nbytes(u) for u in st.unit_names()) / 2**20:.0f} MiB")
    return 0


def _budgets(a):
    b = {"cpu": a.budget} if a.budget else {}
    if a.disk_budget:
        b["disk"] = a.disk_budget
    if getattr(a, "gpu_budget", None):
        b["gpu"] = a.gpu_budget
    return b or None


def _load(a, **kw):
    from .model import load_model
    return load_model(a.path, budgets=_budgets(a), weight_bits=a.weight_bits, kv_bits=a.kv_bits,
                      store_dir=a.store_dir, placement=a.placement, max_context=a.max_context,
                      group_size=a.group_size, progress=True, kv_page_tokens=a.kv_page_tokens,
                      kv_dir=a.kv_dir, kv_approx=a.kv_approx, kv_approx_audit=a.kv_approx_audit,
                      prefill_chunk=a.prefill_chunk, **kw)


def cmd_plan(a) -> int:
    """Plan without converting: exact unit sizes from a store, estimates from a checkpoint."""
    from .checkpoint import Checkpoint
    from .model import _is_store
    from .placement import plan_placement
    from .store import Store

    if _is_store(a.path):
        with Store(a.path) as st:
            cfg, ub, bits = st.config, {u: st.unit_nbytes(u) for u in st.unit_names()}, st.weight_bits
        how = "unit sizes from the store"
    else:
        cfg, bits = Checkpoint(a.path).config, a.weight_bits
        ub = None
        how = "unit sizes estimated from config.json (convert for exact ones)"
    db = 4 if (cfg.get("torch_dtype") or cfg.get("dtype")) == "float32" else 2
    ctx = a.max_context or min(cfg.get("max_position_embeddings") or 4096, 4096)
    p = plan_placement(cfg, a.machine, _budgets(a), context=ctx, weight_bits=bits,
                       kv_bits=a.kv_bits, group_size=a.group_size, unit_bytes=ub, dtype_bytes=db,
                       mode=a.placement, kv_page_tokens=a.kv_page_tokens, prefill_chunk=a.prefill_chunk,
                       device=a.device)
    if a.json:  # stdout is the JSON alone (parseable); the explanation goes to stderr
        print(p.explain(), file=sys.stderr)
        print(f"({how})", file=sys.stderr)
        print(json.dumps(p.to_dict(), indent=1, default=str))
    else:
        print(p.explain())
        print(f"({how})")
    return 0


def cmd_generate(a) -> int:
    import torch

    ids = torch.tensor([a.prompt_ids])
    with _load(a) as m:
        print(m.placement.explain(), file=sys.stderr)
        out = m.generate(ids, a.tokens, do_sample=a.sample, temperature=a.temperature, top_k=a.top_k,
                         top_p=a.top_p, seed=a.seed, streamer=lambda t: print(int(t[0]), end=" ", flush=True))
        print()
        print(json.dumps(m.stats.summary(), default=str), file=sys.stderr)
        del out
    return 0


def cmd_bench(a) -> int:
    from bench.offload import main as bench_main
    return bench_main((["--quick"] if a.quick else []) + (["--json", a.json] if a.json else []))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m offload", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="write a deterministic random-init Llama checkpoint (HF format)")
    d.add_argument("path")
    d.add_argument("--preset", default="1b", help="tiny | small | 1b | long")
    d.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    c = sub.add_parser("convert", help="convert an HF checkpoint into a checksummed store (resumable)")
    c.add_argument("checkpoint")
    c.add_argument("store_dir")
    c.add_argument("--weight-bits", type=_bits, default=None, help="none | 1 | 2 | 3 | 4")
    c.add_argument("--group-size", type=int, default=128)
    c.add_argument("--quantize-head", action="store_true")
    c.set_defaults(func=cmd_convert)
    for name, fn, hlp in (("plan", cmd_plan, "show where each unit would live and the predicted step"),
                          ("generate", cmd_generate, "generate tokens, streaming weights under the budget")):
        g = sub.add_parser(name, help=hlp)
        g.add_argument("path", help="HF checkpoint directory or store directory")
        g.add_argument("--budget", default=None, help="CPU budget, e.g. 512MiB (default: no limit)")
        g.add_argument("--weight-bits", type=_bits, default=None, help="none | 1 | 2 | 3 | 4")
        g.add_argument("--kv-bits", type=_kv, default=None, help="none | 8 | 4 | 2 | fp8")
        g.add_argument("--group-size", type=int, default=128)
        g.add_argument("--store-dir", default=None)
        g.add_argument("--placement", default="auto", choices=["auto", "disk", "memory"])
        g.add_argument("--max-context", type=int, default=None)
        g.add_argument("--disk-budget", default=None,
                       help="most bytes of KV page files when the KV spills to disk, e.g. 8GiB")
        g.add_argument("--kv-page-tokens", type=int, default=1024, help="tokens per KV page (tiered KV)")
        g.add_argument("--prefill-chunk", type=int, default=None,
                       help="prompt tokens per pass over the layers (default: chosen from the budget)")
        g.add_argument("--kv-dir", default=None, help="directory for KV page files (default: ~/.cache/pykernels/kv-pages)")
        g.add_argument("--kv-approx", type=float, default=None,
                       help="approximate attention over the disk pages: the fraction of them read per step")
        g.add_argument("--kv-approx-audit", type=int, default=0,
                       help="with --kv-approx: every N layer-steps also compute the exact output, report the cosine")
        g.set_defaults(func=fn)
        if name == "plan":
            g.add_argument("--json", action="store_true",
                           help="print the Placement as JSON on stdout (the explanation on stderr)")
            g.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                           help="where the layers compute (cuda: planning only, three tiers)")
            g.add_argument("--gpu-budget", default=None, help="with --device cuda: GPU memory budget, e.g. 20GiB")
            g.add_argument("--machine", default=None,
                           help="machine profile for the prediction, e.g. A100-80GB-SXM (default: this "
                                "machine's cached `roofline probe` for the device)")
        else:
            g.add_argument("--prompt-ids", type=_ids, default=[1], help="comma-separated token ids")
            g.add_argument("--tokens", type=int, default=16)
            g.add_argument("--sample", action="store_true")
            g.add_argument("--temperature", type=float, default=1.0)
            g.add_argument("--top-k", type=int, default=None)
            g.add_argument("--top-p", type=float, default=None)
            g.add_argument("--seed", type=int, default=None)
    b = sub.add_parser("bench", help="issue 6's benchmark: bf16 / 4-bit streaming, accelerate, in-memory")
    b.add_argument("--quick", action="store_true", help="the small preset under 12 MiB (smoke run)")
    b.add_argument("--json", default=None)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except (ValueError, TypeError, OSError, NotImplementedError) as e:  # bad input: one clear line
        print(f"python -m offload {a.command}: error: {e}", file=sys.stderr)
        return 2
