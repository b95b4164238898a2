"""Advisor vs exhaustive sweep (issue 5, benchmark item 2).

For the decode-attention and LUT-GEMV benchmark shapes, every configuration the advisor weighs
is measured in one interleaved run (cold caches, median of repeats: ``bench.attention`` and
``bench.lut`` as usual), and the advisor's pick is compared with the fastest one:
``ratio = t(best) / t(pick)``, 1.0 when the advisor picked the fastest. Target: the worst ratio
over the shapes >= 0.95 ("within 5% of the best configuration found by exhaustive sweep").

- Decode attention: ``method="lean"`` and ``method="split", num_splits=S`` for S in 1..32; the
  pick is ``pykernels.plan.advise_schedule`` on the run's machine (its read bandwidth from this
  run's probe), the model alone (``autotune=False``). The ``auto`` row itself (what
  ``pk.decode_attention(method="auto")`` does: the model on the profile ``roofline probe`` cached,
  or a measured result recorded earlier for the shape bucket) is timed too, for information.
  The sweep's timings are then recorded as autotune results (``roofline.autotune``) unless the
  context's ``record_autotune`` is False.
- LUT-GEMV: 4-bit g128 weights, ``lut4`` (``pk.lut_gemv``) vs ``dequant4`` (unpack to bf16 then
  ``F.linear``) at M = 1, 16 and 64 rows; the pick is ``roofline.advise.advise_lut``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from pykernels.attention import _num_workers
from pykernels.plan import DEFAULT_TILE, advise_schedule
from roofline import autotune
from roofline.advise import advise_kv_format, advise_lut, advise_placement, schedule_label
from roofline.autotune import decode_bucket

from .attention import AttnConfig, _run_config, _target, busy_note
from .lut import DOWN_PROJ, _run, dequant, lut

__all__ = ["SUITES", "attention_cases", "suite_advisor_attention", "suite_advisor_lut", "report_advice"]

SPLITS = (1, 2, 4, 8, 16, 32)


def attention_cases(quick: bool) -> list[AttnConfig]:
    """The decode-attention benchmark shapes: suite 1, suite 2, three of suite 2's seeded
    mixed batches and two of suite 3's grid points."""
    rng = np.random.default_rng(1234)
    mixed = [rng.integers(1, 32768 + 1, size=n).tolist() for n in (2, 5, 16)]
    cases = [AttnConfig(1, 32, 8, 128, [16384], "bf16"),
             AttnConfig(3, 8, 1, 128, [32768, 1024, 512], "bf16")]
    cases += [AttnConfig(len(m), 8, 1, 128, m, "bf16") for m in (mixed[:1] if quick else mixed)]
    if not quick:
        cases += [AttnConfig(4, 32, 8, 128, [4096] * 4, "bf16"),
                  AttnConfig(1, 32, 8, 128, [1024], "bf16")]
    return cases


def _compare(rows, pick_name, label):
    timed = [r for r in rows if "median_ms" in r and r["method"] != "auto"]
    pick = next((r for r in timed if r["method"] == pick_name), None)
    if not timed or pick is None:
        return None
    best = min(timed, key=lambda r: r["median_ms"])
    return {"label": label, "pick": pick_name, "pick_ms": pick["median_ms"], "best": best["method"],
            "best_ms": best["median_ms"], "ratio": best["median_ms"] / pick["median_ms"]}


def _summary(cmp: list[dict], what: str, rows) -> tuple[list, list[str]]:
    done = [c for c in cmp if c]
    worst = min(done, key=lambda c: c["ratio"]) if done else None
    text = "{value:.3f}" + (f" (worst: {worst['label']}: picked {worst['pick']} {worst['pick_ms']:.3f} ms, "
                            f"best {worst['best']} {worst['best_ms']:.3f} ms)" if worst else "")
    targets = [_target(f"{what}: advisor pick within 5% of the sweep best (worst t_best / t_pick)",
                       worst and worst["ratio"], ">=", 0.95, text, busy_note(rows), rows=rows)]
    notes = [f"{c['label']}: advisor {c['pick']} {c['pick_ms']:.3f} ms, sweep best {c['best']} "
             f"{c['best_ms']:.3f} ms, ratio {c['ratio']:.3f}" for c in done]
    return targets, notes


def suite_advisor_attention(ctx) -> dict:
    """Decode attention: advisor's (method, num_splits) vs every schedule, measured together."""
    rows, cmp, reasons, recorded, busy = [], [], [], [], []
    # the kernel's worker count, what method="auto" plans for (CPU threads; 2 CTAs per SM)
    dev = "cpu" if ctx.device == "cpu" else "cuda"
    threads = _num_workers(torch.device(ctx.device), ctx.backend if dev == "cuda" else "cpu")
    for cfg in attention_cases(ctx.quick):
        tiles = -(-max(cfg.seqlens) // DEFAULT_TILE)
        splits = [S for S in SPLITS if S == 1 or S <= tiles]
        # the model's pick (not an earlier run's measurement: that would compare the sweep
        # with itself)
        adv = advise_schedule(cfg.seqlens, cfg.heads_kv, threads, num_heads=cfg.heads_q,
                              head_dim=cfg.head_dim, dtype_bytes=cfg.elt_size, machine=ctx.machine,
                              device=dev, autotune=False)
        pick = schedule_label(adv.choice)
        methods = ["lean"] + [f"split{S}" for S in splits] + ["auto"]
        rs = _run_config(ctx, "advisor-1", cfg, tuple(methods), check=False,
                         repeats=max(7, ctx.repeats // 2))
        for r in rs:
            r["advisor_pick"] = r["method"] == pick
        rows += rs
        cmp.append(_compare(rs, pick, cfg.label()))
        reasons.append(f"{cfg.label()}: {adv.reason}")
        if ctx.record_autotune and busy_note(rs) is not None:
            busy.append(cfg.label())  # timings taken under load would outlive this run: not kept
        elif ctx.record_autotune:
            timed = {r["method"]: r["median_ms"] / 1e3 for r in rs if "median_ms" in r and r["method"] != "auto"}
            if timed:
                bucket = decode_bucket(cfg.seqlens, cfg.heads_q, cfg.heads_kv, cfg.head_dim, cfg.elt_size,
                                       threads, dev)
                autotune.record("decode_attention", bucket, timed, device=dev,
                                note=f"bench advisor-1, {cfg.label()}")
                recorded.append(bucket)
    targets, notes = _summary(cmp, "decode attention", rows)
    notes.append(f"Schedules: lean and split with S in {', '.join(map(str, SPLITS))} chunks per "
                 f"(sequence, kv-head) (S up to the tiles of the longest sequence), {threads} threads, "
                 "all timed in one interleaved run per shape; the advisor's pick is the row with "
                 "advisor_pick = true.")
    notes += [f"Advisor: {r}" for r in reasons]
    if recorded:
        notes.append(f"Recorded as measured autotune results ({autotune.path()}), which method='auto' "
                     f"prefers from now on for these {len(recorded)} shape buckets; the 'auto' rows above "
                     "ran with what was recorded before this run.")
    if busy:
        notes.append(f"Not recorded as autotune results, the machine being busy while they were timed: "
                     f"{'; '.join(busy)}.")
    return {"rows": rows, "targets": targets, "notes": notes}


def suite_advisor_lut(ctx) -> dict:
    """LUT-GEMV: advisor's kernel (table lookup vs dequantize + GEMM) vs both, measured."""
    N, K = DOWN_PROJ
    Ms = (1, 16) if ctx.quick else (1, 16, 64)
    l4, d4 = lut(4, ctx.group_size, ctx.scheme, ctx.mode), dequant(4, ctx.group_size, ctx.scheme)
    rows, cmp, reasons = [], [], []
    for M in Ms:
        adv = advise_lut(N, K, M=M, bits=(4,), group_size=ctx.group_size, machine=ctx.machine)
        pick = l4.name if adv.choice["kernel"] == "lut_gemv" else d4.name
        rs = _run(ctx, "advisor-2", N, K, [(l4, M), (d4, M)], check=False)
        for r in rs:
            r["advisor_pick"] = r["method"] == pick
        rows += rs
        cmp.append(_compare(rs, pick, f"N={N} K={K} M={M}"))
        reasons.append(f"M={M}: {adv.reason}")
    targets, notes = _summary(cmp, "LUT-GEMV", rows)
    notes += [f"Advisor: {r}" for r in reasons]
    return {"rows": rows, "targets": targets, "notes": notes}


# Llama-3-8B (its config.json's fields that roofline.analyze_model reads)
LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, head_dim=128, model_type="llama")


def report_advice(machine, threads: int) -> tuple[list, list, list[str]]:
    """(recommendations, model predictions, notes) for the report: the advisor on the benchmark
    shapes and on Llama-3-8B decoding at 16k tokens on this machine (measured roofs), and
    ``analyze_model`` for the same model on this machine and two datasheet GPUs."""
    from roofline import analyze_model

    recs, preds, notes = [], [], []
    # dataclasses.replace: the advisor memoises its Advice objects, so they are not edited
    for cfg in attention_cases(quick=True)[:2]:
        a = advise_schedule(cfg.seqlens, cfg.heads_kv, threads, num_heads=cfg.heads_q,
                            head_dim=cfg.head_dim, dtype_bytes=cfg.elt_size, machine=machine)
        recs.append(replace(a, topic=f"decode attention {cfg.label()}"))
    recs.append(replace(advise_kv_format(16384, 32, 8, 128, num_layers=32, machine=machine),
                        topic="KV format, Llama-3-8B at 16k tokens (32 layers)"))
    recs.append(replace(advise_lut(*DOWN_PROJ, M=1, machine=machine),
                        topic="LUT-GEMV, Llama-3-8B down_proj (N=4096, K=14336), M=1"))
    try:
        a = advise_placement(LLAMA3_8B, batch=1, context=131072, machine="L4", device_budget=22 * 2**30)
        recs.append(replace(a, topic="placement, Llama-3-8B bf16 at 128k tokens on an L4 (table figures), "
                                     "22 GiB budget"))
    except ValueError as e:
        notes.append(f"placement advice not given: {e}")
    for name in (machine, "A100-80GB-SXM", "H100-SXM"):
        for kv in (16, 4):
            r = analyze_model(LLAMA3_8B, batch=1, context=16384, kv_bits=kv, machine=name)
            d = r.to_dict()
            d["model"] = "Llama-3-8B"
            preds.append(d)
    notes.append("Model predictions are the roofline model's (analyze_model), not measurements: "
                 f"this machine's roofs are measured ({machine.name}); A100 and H100 figures are "
                 "datasheet values from roofline.hardware.")
    return recs, preds, notes


SUITES = [
    ("advisor-1", "Advisor vs exhaustive sweep: decode-attention schedule (lean / split S) on the "
                  "attention benchmark shapes", suite_advisor_attention),
    ("advisor-2", "Advisor vs exhaustive sweep: LUT-GEMV kernel (table lookup / dequantize + GEMM), "
                  "N=4096 K=14336 4-bit", suite_advisor_lut),
]
