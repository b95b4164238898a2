"""The KV cache across CPU memory and disk at long context (issue 7's benchmark).

A narrow, long model (``offload.demo_checkpoint`` preset "long": 8 layers, 8 kv heads, head dim
128, bf16 weights resident) decodes with a 64k-token ``offload.TieredKVCache`` whose pages are
all on disk (``cpu_pages=0``: what a CPU budget too small for the KV leaves), in two formats:
plain bf16 pages and int4 pages (KIVI, group 32). The caches are filled with synthetic KV
(``append``, no prefill: a 64k prefill of attention would take hours here): keys N(0, 1) with 4
outlier channels x 8 plus a per-page "topic" direction (pages of related tokens, the locality the
approximate mode relies on), values N(0, 1).

Items (ratios within one run; the disk's speed drifts by tens of percent minute to minute, so
decode steps alternate with I/O-only passes and the two formats alternate step by step):

1. bf16 decode step vs the tier-bandwidth bound: ``TieredKVCache.read_pass`` (the reader reads
   exactly the disk pages of a step, O_DIRECT, same threads, no compute) right before each
   step; the ratio is pass / step (median over steps). The CPU tier (weights and the window,
   from memory) is far below it.
2. int4 pages vs bf16 pages: median step time ratio.
3. The approximate mode: per fraction of disk pages read, bytes from disk per step, step time,
   and the attention output's cosine to the exact one (layer 0, queries near page topics).
4. Predicted vs measured: ``max(disk bytes / disk bandwidth, roofline decode compute)``, the
   same formula as ``offload.plan_placement``, vs the median bf16 and int4 steps. The disk
   bandwidth is the one the reader achieved in this run's I/O-only passes (all of them, both
   formats: one figure), as the offload-1 suite does; the prediction with the profile's figure
   (or a one-thread ``roofline.probe_disk`` when the profile has none) is reported beside it.
"""
from __future__ import annotations

import os
import time

from .offload import _median

__all__ = ["SUITES", "suite_kvtier"]

_MiB = 1 << 20


def _fill(cache, cfg, ctx, topics, seed):
    """Synthetic KV of ``ctx`` tokens into every layer (64-token appends)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    S = cache.page_tokens
    Hkv, D = cfg.num_kv_heads, cfg.head_dim
    for s in range(0, ctx, 64):
        n = min(64, ctx - s)
        for layer in range(cfg.num_layers):
            k = torch.randn(1, n, Hkv, D, generator=g)
            k[..., :4] *= 8
            k += 2.0 * topics[layer, (s // S) % topics.shape[1]]
            v = torch.randn(1, n, Hkv, D, generator=g)
            cache.append(layer, k.bfloat16(), v.bfloat16())
        cache.advance(n)


def suite_kvtier(ctx) -> dict:
    import torch

    import offload
    from offload.kvtier import TieredKVCache, default_kv_dir
    from offload.placement import _kv_tier, disk_read_bandwidth
    from roofline.hardware import get_machine
    from roofline.measure import pykernels_cache
    from roofline.model import analyze_model

    from .attention import _target

    quick = getattr(ctx, "quick", False)
    log = getattr(ctx, "log", print)
    root = pykernels_cache("offload-demo")
    os.makedirs(root, exist_ok=True)
    preset = "small" if quick else "long"
    context = 2048 if quick else 65536
    page = 256 if quick else 1024
    steps = 3 if quick else 6
    ckpt = os.path.join(root, f"{preset}-bf16")
    t0 = time.perf_counter()
    offload.demo_checkpoint(ckpt, preset=preset, progress=False)
    notes = [f"checkpoint: offload.demo_checkpoint({preset!r}) (ready in {time.perf_counter() - t0:.0f} s); "
             f"context {context} tokens, pages of {page} tokens, every page on disk (cpu_pages=0)"]
    kv_dir = default_kv_dir()
    model = offload.load_model(ckpt, placement="memory", max_context=context + 64, progress=False)
    cfg = model.config
    L, Hkv, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    mach = getattr(ctx, "machine", None)
    if mach is None:
        from roofline.advise import default_machine
        mach = default_machine("cpu")
    mach = get_machine(mach) if mach is not None else None
    from roofline.measure import probe_disk
    bw0 = probe_disk(kv_dir, size_bytes=(64 if quick else 1024) * _MiB)["read"]  # for the read slots
    notes.append(f"cold read bandwidth of the page directory before the fill: {bw0 / 1e9:.2f} GB/s (probe_disk)")
    g = torch.Generator().manual_seed(0)
    topics = torch.randn(L, 64, Hkv, D, generator=g)  # a direction per page (cycled), per layer
    caches, rows, plans = {}, [], {}
    try:
        for bits in (None, 4):
            tier = _kv_tier(model.store.config, 1, context + 64, bits, 32, 128, page, "bfloat16",
                            max(model.store.unit_nbytes(f"layer.{i}") for i in range(L)), mach, bw0)
            plans[bits] = tier
            t0 = time.perf_counter()
            c = TieredKVCache(cfg, 1, context + 64, dtype=torch.bfloat16, kv_bits=bits, group_size=32,
                              residual=None if bits is None else 128, page_tokens=page, cpu_pages=0,
                              disk_dir=kv_dir, slots=tier["slots"], chunk_pages=tier["chunk_pages"])
            caches[bits] = c
            _fill(c, cfg, context, topics, seed=1)
            notes.append(f"{'bf16' if bits is None else 'int4'} pages: {c.disk_bytes / _MiB:.0f} MiB on disk in "
                         f"{time.perf_counter() - t0:.0f} s; {tier['slots']} read slots of {tier['chunk_pages']} "
                         f"pages ({tier['slots_why']}); reads {c.stats['read_mode']}")
        tok = torch.tensor([[1]])
        rec = {None: [], 4: []}
        passes = {None: [], 4: []}
        for i in range(steps + 1):  # alternate formats; each step right after its I/O-only pass
            for bits, c in caches.items():
                rp = c.read_pass()
                t = time.perf_counter()
                model.forward(tok, c, last_only=True)
                dt = time.perf_counter() - t
                if i:  # the first step of each warms the reader
                    rec[bits].append(dt)
                    passes[bits].append(rp)
            log(f"  step {i}: " + ", ".join(f"{'bf16' if b is None else 'int4'} {rec[b][-1] * 1e3:.0f} ms "
                                           f"(pass {passes[b][-1] * 1e3:.0f} ms)" for b in rec if rec[b]))
        for bits, c in caches.items():
            med = _median(rec[bits])
            ratio = _median([p / s for p, s in zip(passes[bits], rec[bits])])
            disk = c.disk_bytes
            rows.append({"kv_tier": True, "label": f"{'bf16' if bits is None else 'int4'} pages on disk",
                         "context": context, "kv_disk_bytes": disk, "step_s": rec[bits], "median_step_s": med,
                         "read_pass_s": passes[bits], "bound_ratio": ratio,
                         "disk_GB_s": disk / _median(passes[bits]) / 1e9, "tokens_per_s": 1 / med})
        r16, r4 = rows
        targets = [_target("offload-kv-1 bf16 decode step vs tier-bandwidth bound (read pass / step)",
                           r16["bound_ratio"], ">=", 0.85,
                           "{value:.3f}: " + f"{r16['kv_disk_bytes'] / _MiB:.0f} MiB from disk per step at "
                           f"{r16['disk_GB_s']:.2f} GB/s; step {r16['median_step_s'] * 1e3:.0f} ms")]
        targets.append(_target("offload-kv-2 int4 pages vs bf16 pages on disk (step time ratio)",
                               r16["median_step_s"] / r4["median_step_s"], ">=", 2.8,
                               "{value:.2f}x: " + f"{r4['kv_disk_bytes'] / _MiB:.0f} vs {r16['kv_disk_bytes'] / _MiB:.0f} "
                               f"MiB per step ({r16['kv_disk_bytes'] / r4['kv_disk_bytes']:.2f}x fewer bytes); int4 "
                               f"{r4['median_step_s'] * 1e3:.0f} ms, its read pass / step {r4['bound_ratio']:.2f}"))
        # 3. approximate mode, bf16 pages: per fraction, bytes, step time, cosine at layer 0
        c = caches[None]
        qs = []
        for j in range(8):  # queries near a page topic (plus noise), one per head group
            t = topics[0, (j * 7) % topics.shape[1]]
            q = (t + 0.5 * torch.randn(Hkv, D, generator=g)).repeat_interleave(cfg.num_heads // Hkv, 0)
            qs.append((q * 0.3)[None, None].bfloat16())
        kz = torch.zeros(1, 1, Hkv, D, dtype=torch.bfloat16)
        exact = []
        for q in qs:
            exact.append(c.decode_attend(0, q, kz, kz).float())
            c.discard_pending()
        approx_rows = []
        for frac in ((0.25, 1.0) if quick else (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)):
            c.set_approx(frac)
            cos = []
            for q, e in zip(qs, exact):
                o = c.decode_attend(0, q, kz, kz).float()
                c.discard_pending()
                cos.append(float(torch.nn.functional.cosine_similarity(o.flatten(), e.flatten(), dim=0)))
            s0 = dict(c.stats)
            t = time.perf_counter()
            model.forward(tok, c, last_only=True)
            dt = time.perf_counter() - t
            s1 = c.stats
            read = s1["disk_bytes"] - s0["disk_bytes"]
            approx_rows.append({"fraction": frac, "disk_bytes_per_step": read, "step_s": dt,
                                "cosine_min": min(cos), "cosine_mean": sum(cos) / len(cos)})
            log(f"  approx {frac:.3f}: {read / _MiB:.0f} MiB/step, {dt * 1e3:.0f} ms, cosine min {min(cos):.4f}")
        c.set_approx(None)
        targets.append({"name": "offload-kv-3 approximate mode: disk MiB per step, step ms, min cosine vs exact",
                        "value": None, "op": "table", "threshold": "-", "passed": None, "status": "TABLE",
                        "text": "; ".join(f"{r['fraction']:.3g}: {r['disk_bytes_per_step'] / _MiB:.0f} MiB, "
                                          f"{r['step_s'] * 1e3:.0f} ms, cos {r['cosine_min']:.4f}" for r in approx_rows),
                        "note": None})
        # 4. predicted vs measured: the roofline's max(disk bytes / disk bandwidth, compute),
        # with the disk bandwidth the reader achieved in this run's I/O-only passes (both
        # formats together: one figure per run, as offload-1 does); the profile's or a
        # one-thread probe_disk figure is reported beside it
        if mach is not None:
            alt = disk_read_bandwidth(mach)
            alt_src = "the machine profile"
            if not alt:
                alt = probe_disk(kv_dir, size_bytes=(64 if quick else 1024) * _MiB)["read"]
                alt_src = "probe_disk (1 thread, 4 MiB reads), after the steps"
            dbw = (sum(r["kv_disk_bytes"] * len(r["read_pass_s"]) for r in (r16, r4))
                   / sum(sum(r["read_pass_s"]) for r in (r16, r4)))
            for r, bits in ((r16, None), (r4, 4)):
                a = analyze_model(model.store.config, batch=1, context=context, w_bits=16,
                                  kv_bits=16 if bits is None else bits, machine=mach)
                pred = max(r["kv_disk_bytes"] / dbw, a.time_s)
                pred_alt = max(r["kv_disk_bytes"] / alt, a.time_s)
                r["predicted_s"] = pred
                ratio = pred / r["median_step_s"]
                targets.append(_target(f"offload-kv-4 predicted vs measured decode step, {r['label']}",
                                       abs(ratio - 1), "<=", 0.2,
                                       f"predicted/measured {ratio:.3f}: predicted {pred * 1e3:.0f} ms (disk "
                                       f"{dbw / 1e9:.2f} GB/s, the reader's I/O-only passes of this run; compute "
                                       f"{a.time_s * 1e3:.0f} ms) vs {r['median_step_s'] * 1e3:.0f} ms"
                                       + " (|ratio - 1| = {value:.3f})",
                                       note=f"with {alt / 1e9:.2f} GB/s from {alt_src}: predicted "
                                            f"{pred_alt * 1e3:.0f} ms, ratio {pred_alt / r['median_step_s']:.3f}"))
        else:
            notes.append("item 4: no machine profile (run `roofline probe`): no prediction")
        rows.extend({"kv_tier": True, "label": f"bf16, approx {r['fraction']:.3g}", "median_step_s": r["step_s"],
                     "kv_disk_bytes": r["disk_bytes_per_step"], **r} for r in approx_rows)
    finally:
        for c in caches.values():
            c.close()
        model.close()
    return {"rows": rows, "targets": targets, "notes": notes}


SUITES = [("kvtier-1", "A 64k-token KV cache on disk: tiered decode attention", suite_kvtier)]
