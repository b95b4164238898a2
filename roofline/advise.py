"""The advisor: configurations chosen from the roofline model of a (measured) machine.

Each ``advise_*`` function returns an :class:`Advice`: the choice, a one-sentence reason, the
predicted time of the choice and of every alternative it weighed.

- :func:`advise_decode_attention`: ``method`` ("lean" or "split") and ``num_splits``. Time of a
  schedule = ``max(total KV bytes / B, busiest worker's bytes / B1) + merge bytes / B + per-piece
  overhead``, with ``B`` the machine's read bandwidth and ``B1`` what one worker streams while
  others idle: ``B / W`` unless given (measured on the 2-core CPU this was built on, a decode-
  attention worker is latency-bound and is no faster alone, although a bare read loop on one
  thread reaches most of ``B``). The busiest worker of "split" is found by simulating the
  in-order claiming of chunks by ``W`` workers (what the CPU pool and a CUDA grid do); of "lean"
  it is the ceiling of tiles / ``W``. Among schedules predicted within 2% of the best, lean is
  taken: at equal balance it measured up to 21% faster than one chunk per (sequence, kv-head)
  on that CPU (``bench/advisor.py``, suite advisor-1). ``pykernels`` ``method="auto"`` calls this.
- :func:`advise_kv_format`: the KV format (bf16, int8, fp8, int4, int2) with the least
  predicted attention time among those at or above a quality floor and within a memory budget.
- :func:`advise_lut`: LUT-GEMV bits (the most bits whose weights fit a budget) and whether the
  table-lookup kernel or dequantize-then-GEMM serves ``M`` rows faster.
- :func:`advise_placement`: fractions of weights and KV on device / CPU / disk under memory
  budgets, by ``analyze_model`` (links bound the time, as in FlexGen's model).

Example
-------
>>> from roofline import MachineProfile
>>> m = MachineProfile("cpu", {"bf16": 8e11}, {"read": 4e10, "copy": 4e10, "triad": 4e10,
...                                             "read_1thread": 2.7e10})
>>> a = advise_decode_attention([32768, 1024, 512], 8, 1, 128, num_workers=2, machine=m)
>>> a.choice["method"], a.choice["num_splits"]
('lean', None)
"""

from __future__ import annotations

import heapq
import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from . import autotune as _autotune
from .cost import kv_bytes_per_token, lut_gemv_cost
from .hardware import MachineProfile, get_machine
from .place import roofline_time

__all__ = ["Advice", "as_seqlens", "schedule_label", "parse_schedule_label", "advise_decode_attention", "advise_kv_format", "advise_lut",
           "advise_placement", "default_machine"]

# per piece of work (claiming a task, setting up a (sequence, kv-head) range): measured order of
# magnitude of the CPU pool; a CUDA CTA's prologue is of the same order
PIECE_OVERHEAD_S = {"cpu": 1.5e-6, "cuda": 2e-6}
SPLIT_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
TIE = 0.02  # predictions within 2% are a tie: the simpler schedule (fewer partials) wins


@dataclass
class Advice:
    """One recommendation.

    Attributes
    ----------
    topic : str
        ``"decode_attention"``, ``"kv_format"``, ``"lut"`` or ``"placement"``.
    choice : dict
        The configuration, e.g. ``{"method": "lean", "num_splits": None}``.
    reason : str
        One sentence: why this choice, in the model's figures.
    predicted_s : float or None
        Predicted seconds of the choice (per call / per decode step).
    alternatives : list of dict
        Every configuration weighed: ``{"choice", "predicted_s"}`` (and ``"excluded"`` with the
        reason where one was ruled out), best first.
    machine : str
        The machine the prediction is for.
    source : str
        ``"model"`` (the roofline model chose) or ``"measured"`` (a recorded autotune result
        for this machine and shape bucket chose, see ``roofline.autotune``).
    """

    topic: str
    choice: dict
    reason: str
    predicted_s: float | None
    alternatives: list = field(default_factory=list)
    machine: str = ""
    source: str = "model"

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# machine

_DEFAULT: dict[str, MachineProfile | None] = {}


def default_machine(device: str = "cpu") -> MachineProfile | None:
    """The profile ``roofline.probe`` cached for this machine (full probe preferred), looked up
    once per process; None when this machine was never probed (``roofline probe`` fills it)."""
    if device not in _DEFAULT:
        from .measure import cached_profile
        try:
            _DEFAULT[device] = cached_profile(device)
        except Exception:  # an unreadable cache is "no profile", never a failed kernel call
            _DEFAULT[device] = None
    return _DEFAULT[device]


def _is_this_machine(machine, device: str) -> bool:
    """False for a datasheet machine (a ``roofline.HARDWARE`` name or a ``source="table"``
    profile: planning for other hardware), whose advice must not follow the timings recorded on
    this one; True for None (this machine) and measured profiles."""
    if machine is None:
        return True
    try:
        return get_machine(machine).source != "table"
    except (ValueError, TypeError):
        return False


def _bandwidth(machine) -> tuple[float | None, str]:
    """(read bandwidth or None when unknown, machine name)."""
    if machine is None:
        return None, "no profile"
    m = get_machine(machine)
    return m.mem_bandwidth.get("read"), m.name


# --------------------------------------------------------------------------------------------
# decode attention

def as_seqlens(seqlens) -> np.ndarray:
    """Sequence lengths as a 1-D int64 array; ValueError naming ``seqlens`` unless non-empty,
    integer and every entry >= 1 (a list, numpy array or tensor on any device)."""
    if hasattr(seqlens, "detach"):
        seqlens = seqlens.detach().cpu().numpy()
    a = np.asarray(seqlens)
    if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"seqlens: expected a non-empty 1-D integer sequence, got {a.dtype} shape {a.shape}")
    if (a < 1).any():
        raise ValueError(f"seqlens: every entry must be >= 1, got min {int(a.min())}")
    return a.astype(np.int64)


def _split_makespan(ntiles: np.ndarray, S: int, W: int) -> tuple[int, int, int]:
    """(busiest worker's tiles, chunks, partial slots) of flash-decoding with S chunks per
    segment, chunks claimed in order by W workers (each takes the next when it is free)."""
    Se = np.minimum(ntiles, S)
    chunks = int(Se.sum())
    partials = int(Se[Se > 1].sum())
    if W == 1:
        return int(ntiles.sum()), chunks, partials
    biggest = int(np.max(-(-ntiles // Se)))
    if chunks <= W:  # every chunk has a worker of its own
        return biggest, chunks, partials
    if chunks > 128:  # too many to simulate on every call: the average load plus half of the
        # biggest chunk beyond one tile (list scheduling ends within one chunk of the average)
        return max(biggest, int(math.ceil(ntiles.sum() / W + (biggest - 1) / 2))), chunks, partials
    heap = [0] * W
    for n, se in zip(ntiles.tolist(), Se.tolist()):
        for c in range(se):
            size = (n * (c + 1)) // se - (n * c) // se
            heapq.heappush(heap, heapq.heappop(heap) + size)
    return max(heap), chunks, partials


def _lean_makespan(ntiles: np.ndarray, W: int) -> tuple[int, int, int]:
    """(busiest worker's tiles, pieces, partial slots) of the stream-K cut into W ranges."""
    total = int(ntiles.sum())
    W = max(1, min(W, total))
    cum = np.concatenate([[0], np.cumsum(ntiles)])
    begins = np.array([(total * w) // W for w in range(1, W)], dtype=np.int64)
    inner = begins[~np.isin(begins, cum)]           # boundaries that cut a segment
    seg = np.searchsorted(cum, inner, side="right") - 1
    _, cuts_per = np.unique(seg, return_counts=True)
    partials = int((cuts_per + 1).sum())
    pieces = len(ntiles) + len(inner)
    return -(-total // W), pieces, partials


_CACHE: "OrderedDict[tuple, Advice]" = OrderedDict()
_CACHE_SIZE = 2048
_CACHE_LOCK = threading.Lock()  # decode calls may come from several threads


def advise_decode_attention(seqlens, num_heads: int, num_kv_heads: int, head_dim: int, *,
                            num_workers: int, dtype_bytes: int = 2, tile: int = 64,
                            machine=None, device: str = "cpu", worker_bw: float | None = None,
                            autotune: bool = True) -> Advice:
    """Choose ``method`` and ``num_splits`` for a decode-attention call.

    Parameters
    ----------
    seqlens : sequence of int or 1-D tensor, [B], each >= 1
    num_heads, num_kv_heads, head_dim : int
        Query heads, kv heads (their ratio is the GQA group), head size.
    num_workers : int
        Workers the kernel runs on (CPU threads; CUDA CTAs resident at once).
    dtype_bytes : int
        Bytes per K/V element (2 for bf16/fp16; a quantized cache passes its average).
    tile : int
        Tokens per KV tile (the unit lean ranges are cut in).
    machine : MachineProfile, HARDWARE name or None
        None: :func:`default_machine` (the cached probe), else the relative model below.
    device : "cpu" or "cuda"
    worker_bw : float, optional
        Bytes/s one worker streams while the others idle (default: its share, ``B / W``).
    autotune : bool
        Prefer the fastest schedule measured on this machine for this shape bucket, when
        ``roofline.autotune`` has one (``bench/advisor.py`` records them); False: the model only.

    Returns
    -------
    Advice with ``choice = {"method": "lean" | "split", "num_splits": int | None}``.

    Without a bandwidth figure the prediction is relative (``B = 1`` byte/s), which ranks the
    schedules as on any machine whose workers each stream an equal share.
    """
    a = as_seqlens(seqlens)
    for name, v in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim), ("num_workers", num_workers), ("tile", tile)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    for name, v in (("dtype_bytes", dtype_bytes), ("worker_bw", worker_bw)):
        if v is None and name == "worker_bw":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads: must be a multiple of num_kv_heads ({num_kv_heads}), got {num_heads}")
    if device not in PIECE_OVERHEAD_S:
        raise ValueError(f"device: expected one of {list(PIECE_OVERHEAD_S)}, got {device!r}")
    if machine is None:
        machine = default_machine(device)
    W = int(num_workers)
    B, mname = _bandwidth(machine)
    if B is not None and not (math.isfinite(B) and B > 0):
        B = None                              # no usable bandwidth figure: relative prediction
    B1 = worker_bw
    tiles_seq = -(-a // tile)                # the model depends on lengths in tiles only, the
    # recorded timings are this machine's: never for the advice about another one (a table GPU)
    use_measured = bool(autotune) and _autotune.enabled() and _is_this_machine(machine, device)
    key = (tiles_seq.tobytes(), _autotune.imbalance_class(int(a.max()), a.size, int(a.sum())),
           num_heads, num_kv_heads, head_dim, W, float(dtype_bytes), tile, device, mname, B, B1,
           use_measured, _autotune.stamp(device) if use_measured else None)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
    if hit is not None:
        return _copy(hit)

    relative = B is None
    if relative:
        B = 1.0
    if not B1:
        B1 = B / W
    B1 = min(B1, B)
    overhead = PIECE_OVERHEAD_S[device] * (0.0 if relative else 1.0)
    Hkv, G, D = int(num_kv_heads), int(num_heads) // int(num_kv_heads), int(head_dim)
    tile_bytes = tile * D * 2 * dtype_bytes                 # K and V of one tile, one kv head
    partial_bytes = 2 * G * (D + 2) * 4                     # write + read back one (m, l, acc)
    ntiles = np.repeat(tiles_seq, Hkv)
    total = int(ntiles.sum())

    def predict(busiest, pieces, partials):
        return (max(total * tile_bytes / B, busiest * tile_bytes / B1)
                + partials * partial_bytes / B + overhead * pieces / W)

    cands = []
    busiest, pieces, partials = _lean_makespan(ntiles, W)
    cands.append(({"method": "lean", "num_splits": None}, predict(busiest, pieces, partials),
                  partials, busiest))
    for S in SPLIT_CANDIDATES:
        if S > 1 and S > int(ntiles.max()):
            break
        busiest_s, chunks, partials_s = _split_makespan(ntiles, S, W)
        cands.append(({"method": "split", "num_splits": S},
                      predict(busiest_s, chunks, partials_s), partials_s, busiest_s))
    best_t = min(c[1] for c in cands)
    # among the near-best: lean (each worker walks one contiguous range; see the module notes),
    # then the fewest partials (least merge work), then fewer splits
    near = [c for c in cands if c[1] <= best_t * (1 + TIE)]
    pick = min(near, key=lambda c: (c[0]["method"] != "lean", c[2], c[0]["num_splits"] or 0))
    unsplit = next(c for c in cands if c[0].get("num_splits") == 1)
    if pick[0]["method"] == "lean":
        why = (f"lean gives each of {min(W, total)} workers {pick[3]} of {total} KV tiles "
               f"(the busiest unsplit worker has {unsplit[3]}) with {pick[2]} partials to merge")
    elif pick[0]["num_splits"] == 1:
        why = (f"one chunk per (sequence, kv-head) already spreads {total} tiles over {W} workers "
               f"with at most {pick[3]} each and nothing to merge")
    else:
        why = (f"{pick[0]['num_splits']} splits per (sequence, kv-head) leave the busiest of {W} "
               f"workers {pick[3]} of {total} tiles with {pick[2]} partials to merge")
    unit = "relative to one byte/s" if relative else f"on {mname}"
    reason = (f"{why}; predicted {pick[1] * (1 if relative else 1e3):.4g}"
              f"{'' if relative else ' ms'} {unit} vs {unsplit[1] * (1 if relative else 1e3):.4g} unsplit.")
    alts = [{"choice": c[0], "predicted_s": c[1], "partials": c[2], "busiest_tiles": c[3]}
            for c in sorted(cands, key=lambda c: c[1])]
    adv = Advice("decode_attention", dict(pick[0]), reason, None if relative else pick[1], alts, mname)
    if use_measured:
        measured = _measured_schedule(a, num_heads, num_kv_heads, head_dim, dtype_bytes, W, device, tile,
                                      cands, pick, relative)
        if measured is not None:
            adv.choice, adv.reason, adv.predicted_s, timings = measured
            adv.source = "measured"
            for alt in adv.alternatives:
                alt["measured_s"] = timings.get(schedule_label(alt["choice"]))
    with _CACHE_LOCK:
        _CACHE[key] = adv
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return _copy(adv)


def _copy(adv: Advice) -> Advice:
    """A copy a caller may edit without changing the memoised advice."""
    return replace(adv, choice=dict(adv.choice),
                   alternatives=[dict(x, choice=dict(x["choice"])) for x in adv.alternatives])


def schedule_label(choice: dict) -> str:
    """``"lean"`` or ``"split<S>"``: the label autotune results are recorded under."""
    return "lean" if choice["method"] == "lean" else f"split{choice['num_splits']}"


def parse_schedule_label(label: str) -> dict | None:
    """Inverse of :func:`schedule_label`: ``{"method", "num_splits"}``, or None for another name."""
    if label == "lean":
        return {"method": "lean", "num_splits": None}
    if label.startswith("split") and label[5:].isdigit() and int(label[5:]) >= 1:
        return {"method": "split", "num_splits": int(label[5:])}
    return None


def _measured_schedule(a, num_heads, num_kv_heads, head_dim, dtype_bytes, W, device, tile, cands, pick,
                       relative):
    """(choice, reason, predicted_s, timings) from the autotune cache, or None."""
    try:
        if not _autotune.has_topic("decode_attention", device):
            return None
        bucket = _autotune.decode_bucket(a.tolist(), num_heads, num_kv_heads, head_dim, dtype_bytes, W,
                                         device, tile)
        entry = _autotune.lookup("decode_attention", bucket, device)
    except Exception:  # an unreadable cache or machine identity: the model's choice stands
        return None
    if entry is None:
        return None
    choice = parse_schedule_label(entry["best"])
    if choice is None:
        return None
    model = next((c for c in cands if c[0] == choice), None)
    t = entry["timings"]
    others = sorted((v, k) for k, v in t.items() if k != entry["best"])
    reason = (f"measured on this machine for shapes like this ({bucket}, {entry.get('recorded', '?')}): "
              f"{entry['best']} {t[entry['best']] * 1e3:.3f} ms, fastest of {len(t)} schedules timed"
              + (f" (next {others[0][1]} {others[0][0] * 1e3:.3f} ms)" if others else "")
              + f"; the model alone would take {schedule_label(pick[0])}.")
    return choice, reason, None if (model is None or relative) else model[1], t


# --------------------------------------------------------------------------------------------
# KV format

# quality order (best first) and the format names of pykernels.QuantizedKVCache
KV_FORMATS = (("bf16", 16), ("int8", 8), ("fp8", "fp8"), ("int4", 4), ("int2", 2))


def advise_kv_format(context: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                     batch: int = 1, num_layers: int = 1, min_quality: str = "int4",
                     memory_budget: float | None = None, group_size: int = 32,
                     machine=None, measured: dict | None = None, num_workers: int | None = None,
                     autotune: bool = True) -> Advice:
    """Choose the KV-cache format for decoding at ``context`` tokens.

    Candidates are the formats at least as accurate as ``min_quality`` (order bf16 > int8 >
    fp8 > int4 > int2: KIVI's int4 keeps attention near-lossless, int2 needs its residual window
    and loses more) whose cache (``batch * context * num_layers`` tokens) fits
    ``memory_budget`` bytes. The pick is the least predicted attention time per decode step:
    bytes read / read bandwidth, or ``measured[format]`` seconds where given. Without
    ``measured``, a recorded autotune result for this shape (``roofline.autotune.kv_bucket``,
    ``num_workers`` default: torch's thread count; recorded by ``bench.kvquant``'s speed suite:
    seconds per token of context, scaled here to ``batch * context * num_layers``) is used
    unless ``autotune=False``: on CPUs where the fused kernels are compute-bound, bytes alone
    rank the formats wrongly (int8 read 1.8x fewer bytes than bf16 but ran slower on the 2-core
    dev machine).
    """
    names = [n for n, _ in KV_FORMATS]
    if min_quality not in names:
        raise ValueError(f"min_quality: expected one of {names}, got {min_quality!r}")
    for name, v in (("context", context), ("batch", batch), ("num_layers", num_layers)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float))
                                      or not memory_budget > 0):
        raise ValueError(f"memory_budget: expected bytes > 0 or None, got {memory_budget!r}")
    for k, v in (measured or {}).items():
        if k not in names or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"measured: expected {{format in {names}: seconds > 0}}, got {k!r}: {v!r}")
    m = get_machine(machine) if machine is not None else default_machine("cpu")
    B = m.mem_bandwidth["read"] if m is not None else 1.0
    mname = m.name if m is not None else "no profile"
    tuned = None
    if measured is None and autotune and m is not None and _is_this_machine(m, "cpu"):
        tuned = _measured_kv(num_heads, num_kv_heads, head_dim, group_size, num_workers)
        if tuned is not None:
            measured = {k: v * batch * context * num_layers for k, v in tuned[1]["timings"].items() if k in names}
    if m is None and measured:  # relative byte counts and seconds do not compare
        raise ValueError("measured: needs a machine profile (machine=...) to compare measured seconds "
                         "with the model's predictions")
    alts, pick = [], None
    floor = names.index(min_quality)
    for i, (name, bits) in enumerate(KV_FORMATS):
        per_tok = kv_bytes_per_token(num_kv_heads, head_dim, bits, group_size)
        cache_bytes = per_tok * batch * context * num_layers
        t = (measured or {}).get(name, cache_bytes / B)
        alt = {"choice": {"format": name}, "predicted_s": t, "cache_bytes": cache_bytes}
        if i > floor:
            alt["excluded"] = f"below the quality floor {min_quality}"
        elif tuned is not None and name not in measured:  # model seconds do not compare with measured ones
            alt["excluded"] = "not among the formats measured for this shape (autotune)"
        elif memory_budget is not None and cache_bytes > memory_budget:
            alt["excluded"] = f"{cache_bytes / 2**30:.2f} GiB exceeds the budget {memory_budget / 2**30:.2f} GiB"
        elif pick is None or t < pick["predicted_s"]:
            pick = alt
        alts.append(alt)
    if pick is None:
        raise ValueError(f"memory_budget: no format at or above {min_quality} fits "
                         f"{memory_budget / 2**30:.2f} GiB (smallest: "
                         f"{min(x['cache_bytes'] for x in alts[:floor + 1]) / 2**30:.2f} GiB)")
    bf16 = alts[0]
    src = "measured" if measured and pick["choice"]["format"] in measured else "predicted"
    reason = (f"{pick['choice']['format']} is the fastest format at or above {min_quality}: "
              f"{pick['cache_bytes'] / 2**20:.1f} MiB read per step vs {bf16['cache_bytes'] / 2**20:.1f} MiB "
              f"for bf16, {src} {pick['predicted_s'] * 1e3:.3g} ms vs {bf16['predicted_s'] * 1e3:.3g} ms"
              + (f" on {mname}" if m is not None else " (relative: no machine profile)"))
    if tuned is not None:
        bucket, entry = tuned
        model = min((a for a in alts if "excluded" not in a), key=lambda a: a["cache_bytes"])
        reason += (f" (measured on this machine for shapes like this: {bucket}, {entry.get('recorded', '?')}, "
                   f"scaled to {batch * context * num_layers} tokens; "
                   + ("bytes alone agree)" if model["choice"] == pick["choice"]
                      else f"bytes alone would take {model['choice']['format']})"))
    reason += "."
    alts.sort(key=lambda x: ("excluded" in x, x["predicted_s"]))
    return Advice("kv_format", dict(pick["choice"]), reason, pick["predicted_s"] if m is not None else None,
                  alts, mname, source="measured" if tuned is not None and src == "measured" else "model")


def _measured_kv(num_heads, num_kv_heads, head_dim, group_size, num_workers):
    """(bucket, entry) of the recorded KV-format timings for this shape, or None."""
    try:
        if not _autotune.has_topic("kv_format", "cpu"):
            return None
        if num_workers is None:
            import torch
            num_workers = torch.get_num_threads()
        bucket = _autotune.kv_bucket(num_heads, num_kv_heads, head_dim, group_size, num_workers, "cpu")
        entry = _autotune.lookup("kv_format", bucket, "cpu")
    except Exception:  # an unreadable cache or machine identity: the model's choice stands
        return None
    return None if entry is None else (bucket, entry)


# --------------------------------------------------------------------------------------------
# LUT-GEMV

def advise_lut(N: int, K: int, *, M: int = 1, bits=(4, 3, 2, 1), group_size: int = 128,
               weight_budget: float | None = None, machine=None) -> Advice:
    """Choose LUT-GEMV bits and kernel for ``y[M, N] = x[M, K] @ W^T``.

    Bits: the most bits in ``bits`` (quality rises with bits) whose weights fit
    ``weight_budget`` bytes (all of them when None). Kernel: ``"lut_gemv"`` (weights read once
    for all M rows, tables built per row) or ``"dequant_gemm"`` (unpack W to bf16, then a dense
    GEMM at the bf16 peak): the roofline time of each, with the LUT kernel's lookups charged
    at the int8 peak (one table lookup per weight bit per row; T-MAC's compute) where the
    machine lists one.
    """
    for name, v in (("N", N), ("K", K), ("M", M), ("group_size", group_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    bits = (bits,) if isinstance(bits, int) and not isinstance(bits, bool) else tuple(bits)
    if not bits or any(b not in (1, 2, 3, 4) for b in bits):
        raise ValueError(f"bits: expected a non-empty choice of 1..4, got {bits!r}")
    m = get_machine(machine) if machine is not None else default_machine("cpu")
    if m is None:
        raise ValueError("machine: no profile given and none cached; run `roofline probe` or pass one")
    fits = []
    for b in sorted(bits, reverse=True):
        wb = lut_gemv_cost(N, K, 1, b, group_size).bytes
        if weight_budget is None or wb <= weight_budget:
            fits.append((b, wb))
    if not fits:
        raise ValueError(f"weight_budget: even {min(bits)}-bit weights need "
                         f"{lut_gemv_cost(N, K, 1, min(bits), group_size).bytes / 2**20:.1f} MiB")
    b, wb = fits[0]
    lut = lut_gemv_cost(N, K, M, b, group_size)
    t_lut_mem, _ = roofline_time(lut, m)
    lookups = M * N * K * b / 4                          # one lookup per 4 weights per bit per row
    t_lut = max(t_lut_mem, lookups / m.peak_flops["int8"]) if "int8" in m.peak_flops else t_lut_mem
    # dequantize: read the packed W, write and re-read bf16 W; then the dense GEMM
    deq_bytes = wb + 2 * (2 * N * K)
    t_deq = deq_bytes / m.mem_bandwidth["read"] + 2 * M * N * K / m.peak("bf16")
    alts = [{"choice": {"bits": b, "kernel": "lut_gemv"}, "predicted_s": t_lut},
            {"choice": {"bits": b, "kernel": "dequant_gemm"}, "predicted_s": t_deq}]
    alts.sort(key=lambda x: x["predicted_s"])
    pick = alts[0]
    reason = (f"{b}-bit is the most bits that fit" + ("" if weight_budget is None else
                                                      f" {weight_budget / 2**20:.0f} MiB")
              + f" ({wb / 2**20:.1f} MiB); {pick['choice']['kernel']} is predicted "
              f"{pick['predicted_s'] * 1e3:.3g} ms vs {alts[1]['predicted_s'] * 1e3:.3g} ms for "
              f"{alts[1]['choice']['kernel']} at M={M} on {m.name}.")
    return Advice("lut", dict(pick["choice"]), reason, pick["predicted_s"], alts, m.name)


# --------------------------------------------------------------------------------------------
# placement

def _fracs(dev: float, cpu: float, disk: float) -> dict:
    """{tier: fraction} rounded to 1e-6, the last tier absorbing the rounding (they sum to 1)."""
    total = dev + cpu + disk
    d, c = round(dev / total, 6), round(cpu / total, 6)
    return {"gpu": d, "cpu": c, "disk": max(0.0, round(1.0 - d - c, 6))}


def advise_placement(config, *, batch: int, context: int, machine, device_budget: float,
                     cpu_budget: float | None = None, w_bits: int = 16, kv_bits=16,
                     steps: int = 20) -> Advice:
    """Fractions of weights and KV on the device, CPU and disk tiers for decoding.

    Every decode step reads all weights and the whole KV once, so a byte off the device costs
    its link time whichever tensor it belongs to; the search tries weight fractions on the
    device in ``1/steps`` steps (KV gets the device memory left, then CPU, then disk) and keeps
    the least ``analyze_model`` time that fits ``device_budget`` / ``cpu_budget`` bytes.
    """
    from .model import analyze_model

    if isinstance(device_budget, bool) or not isinstance(device_budget, (int, float)) or not device_budget > 0:
        raise ValueError(f"device_budget: expected bytes > 0, got {device_budget!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if cpu_budget is not None and (isinstance(cpu_budget, bool) or not isinstance(cpu_budget, (int, float))
                                   or not cpu_budget >= 0):
        raise ValueError(f"cpu_budget: expected bytes >= 0 or None, got {cpu_budget!r}")
    m = get_machine(machine)
    base = analyze_model(config, batch=batch, context=context, w_bits=w_bits, kv_bits=kv_bits, machine=m)
    W, KV = base.weight_bytes, base.kv_bytes_per_sequence * batch
    cpu_cap = math.inf if cpu_budget is None else cpu_budget

    def split(nbytes, dev_free, cpu_free):
        d = min(nbytes, dev_free)
        c = min(nbytes - d, cpu_free)
        return d, c, nbytes - d - c

    alts = []
    for i in range(steps, -1, -1):
        wd = min(W * i / steps, device_budget)
        wc = min(W - wd, cpu_cap)
        wk = W - wd - wc
        kd, kc, kk = split(KV, device_budget - wd, cpu_cap - wc)
        fr = {"weights": _fracs(wd, wc, wk), "kv": _fracs(kd, kc, kk) if KV else "gpu"}
        needs_disk = wk > 0 or kk > 0
        try:
            r = analyze_model(config, batch=batch, context=context, w_bits=w_bits, kv_bits=kv_bits,
                              machine=m, placement={k: ({t: f for t, f in v.items() if f > 0}
                                                        if isinstance(v, dict) else v)
                                                    for k, v in fr.items()})
        except ValueError as e:
            alts.append({"choice": fr, "predicted_s": math.inf, "excluded": str(e)})
            continue
        alts.append({"choice": fr, "predicted_s": r.time_s, "disk": needs_disk})
    ok = [x for x in alts if math.isfinite(x["predicted_s"])]
    if not ok:
        raise ValueError(f"machine: {m.name} lacks the links this placement needs: {alts[0].get('excluded')}")
    pick = min(ok, key=lambda x: x["predicted_s"])
    fr = pick["choice"]
    pct = lambda d: ", ".join(f"{t} {100 * f:.0f}%" for t, f in d.items() if f > 0) if isinstance(d, dict) else d
    reason = (f"weights {pct(fr['weights'])} and KV {pct(fr['kv'])} keep the most bytes on the "
              f"device within {device_budget / 2**30:.1f} GiB, predicted {pick['predicted_s'] * 1e3:.3g} ms "
              f"per decode step on {m.name} vs {base.time_s * 1e3:.3g} ms with everything on the device.")
    ok.sort(key=lambda x: x["predicted_s"])
    return Advice("placement", fr, reason, pick["predicted_s"], ok, m.name)
