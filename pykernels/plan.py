"""Decode-attention schedules: flash-decoding splits and LeanAttention stream-K.

The partition is the one in ``csrc/include/pykernels/lean_plan.h`` (run by the CPU and CUDA
kernels, mirrored by the Triton kernel); ``plan_decode`` builds it in Python so it can be
inspected, and the tests check it against the schedule the C++ kernel actually runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from roofline.advise import advise_decode_attention
from roofline.advise import as_seqlens as _lens  # the one seqlens check of both packages

DEFAULT_TILE = 64          # tokens per KV tile: the unit lean ranges are cut in
MIN_SPLIT_TOKENS = 256     # split heuristic: no chunk shorter than this (merge cost > gain)


@dataclass(frozen=True)
class Piece:
    """Tokens [t0, t1) of sequence b, kv-head h; ``slot`` -1 = whole segment, else partial slot."""
    b: int
    h: int
    t0: int
    t1: int
    slot: int


@dataclass
class DecodePlan:
    """An inspectable decode schedule.

    ``tasks[i]`` is the list of pieces run by one unit of work: lean worker i (a CPU thread,
    CUDA CTA or Triton program), or one split chunk. ``reductions`` lists, for every
    (b, h) that was cut, the partial slots merged into its output.
    """
    method: str
    tile: int
    num_workers: int
    num_splits: int
    seqlens: np.ndarray
    num_kv_heads: int
    cum: np.ndarray                     # tile prefix sums over segments s = b * Hkv + h
    tasks: List[List[Piece]] = field(default_factory=list)
    reductions: List[Tuple[int, int, List[int]]] = field(default_factory=list)

    @property
    def total_tiles(self) -> int:
        return int(self.cum[-1])

    def tiles_per_task(self) -> List[int]:
        return [sum(math.ceil(p.t1 / self.tile) - p.t0 // self.tile for p in t) for t in self.tasks]

    def tokens_per_task(self) -> List[int]:
        return [sum(p.t1 - p.t0 for p in t) for t in self.tasks]

    @property
    def num_partials(self) -> int:
        return sum(len(s) for _, _, s in self.reductions)

    def makespan_tiles(self, workers: Optional[int] = None) -> int:
        """Tiles on the busiest worker: lean = its range; split = greedy in-order claiming
        of chunks by ``workers`` threads (what the CPU pool does)."""
        per = self.tiles_per_task()
        if self.method == "lean":
            return max(per) if per else 0
        w = workers or self.num_workers
        load = [0] * max(1, w)
        for t in per:
            i = load.index(min(load))
            load[i] += t
        return max(load)

    def __repr__(self):
        per = self.tiles_per_task()
        return (f"DecodePlan(method={self.method!r}, tile={self.tile}, workers={self.num_workers}, "
                f"splits={self.num_splits}, segments={len(self.cum) - 1}, tiles={self.total_tiles}, "
                f"tasks={len(self.tasks)}, tiles/task min..max={min(per) if per else 0}..{max(per) if per else 0}, "
                f"partials={self.num_partials})")


def default_num_splits(seqlens, num_kv_heads: int, num_workers: int) -> int:
    """Flash-decoding heuristic: enough chunks for ~4 per worker, none under 256 tokens.

    S = clamp(ceil(4 W / (B Hkv)), 1, ceil(max L / 256)).
    """
    a = _lens(seqlens)
    nseg = a.size * num_kv_heads
    s = math.ceil(4 * num_workers / nseg)
    return int(max(1, min(s, math.ceil(int(a.max()) / MIN_SPLIT_TOKENS))))


def advise_schedule(seqlens, num_kv_heads: int, num_workers: int, tile: int = DEFAULT_TILE, *,
                    num_heads: Optional[int] = None, head_dim: int = 128, dtype_bytes: float = 2,
                    device: str = "cpu", machine=None, autotune: bool = True):
    """The ``method="auto"`` choice: ``roofline.advise.advise_decode_attention``.

    It predicts every schedule (lean, split with 1..64 chunks) from the machine's roofline (the
    read bandwidth ``roofline probe`` measured and cached; relative figures without one): the
    busiest worker's KV bytes over its share of the bandwidth, plus merge and per-piece costs,
    and takes lean unless another schedule is predicted more than 2% faster; a schedule measured
    fastest on this machine for the call's shape bucket (``roofline.autotune``; ``autotune=False``
    or ``PYKERNELS_AUTOTUNE=0`` ignores them) wins over the model. Returns the ``Advice``
    (``.choice`` = ``{"method", "num_splits"}``, ``.reason`` says why, ``.source``).
    """
    hkv = int(num_kv_heads)
    return advise_decode_attention(seqlens, int(num_heads or hkv), hkv, int(head_dim),
                                   num_workers=int(num_workers), dtype_bytes=dtype_bytes,
                                   tile=int(tile), machine=machine, device=device, autotune=autotune)


def choose_method(seqlens, num_kv_heads: int, num_workers: int, tile: int = DEFAULT_TILE, **kw) -> str:
    """The ``method="auto"`` rule: the method of :func:`advise_schedule` (keywords go to it).

    In effect lean, whose worker ranges differ by at most one tile for any mix of lengths (at
    the cost of merging at most 2 W partials), unless a split schedule is predicted faster.
    """
    return advise_schedule(_lens(seqlens), num_kv_heads, num_workers, tile, **kw).choice["method"]


def plan_decode(seqlens, num_kv_heads: int, num_workers: int, method: str = "lean",
                tile: int = DEFAULT_TILE, num_splits: Optional[int] = None) -> DecodePlan:
    """Build the decode schedule the kernels run.

    Parameters
    ----------
    seqlens : sequence of int or 1-D tensor, [B], each >= 1
    num_kv_heads : int, Hkv; segments are (b, h) in order s = b * Hkv + h
    num_workers : int, W: lean workers (CPU threads / CTAs / programs); for split, the number
        of threads the chunks are spread over (used by the heuristic and ``makespan_tiles``)
    method : "lean", "split" or "auto" (see ``advise_schedule``; plan_decode knows no query
        heads, head size or element size, so "auto" here advises for Hq = Hkv, D = 128, 2-byte
        elements: ``decode_attention(method="auto")`` passes the call's own, which can select
        another measured autotune bucket)
    tile : tokens per KV tile
    num_splits : chunks per segment for "split" (None: ``default_num_splits``)

    Example
    -------
    >>> p = plan_decode([32768, 1024, 512], num_kv_heads=1, num_workers=2)
    >>> p.tiles_per_task()
    [268, 268]
    """
    a = _lens(seqlens)
    for name, v in (("num_kv_heads", num_kv_heads), ("num_workers", num_workers), ("tile", tile)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if num_splits is not None and (not isinstance(num_splits, (int, np.integer)) or num_splits < 1):
        raise ValueError(f"num_splits: expected None or an int >= 1, got {num_splits!r}")
    if method == "auto":
        choice = advise_schedule(a, num_kv_heads, num_workers, tile).choice
        method = choice["method"]
        num_splits = choice["num_splits"] if method == "split" and num_splits is None else num_splits
    if method not in ("lean", "split"):
        raise ValueError(f"method: expected 'auto', 'lean' or 'split', got {method!r}")
    Hkv = int(num_kv_heads)
    seg_len = np.repeat(a, Hkv)
    ntiles = -(-seg_len // tile)
    cum = np.concatenate([[0], np.cumsum(ntiles)]).astype(np.int64)
    nseg = seg_len.size
    total = int(cum[-1])
    plan = DecodePlan(method, int(tile), int(num_workers), 1, a, Hkv, cum)
    if method == "lean":
        W = max(1, min(int(num_workers), total))
        plan.num_workers = W
        begin = [(total * w) // W for w in range(W + 1)]
        for w in range(W):
            gb, ge = begin[w], begin[w + 1]
            pieces, g = [], gb
            while g < ge:
                s = int(np.searchsorted(cum, g, side="right")) - 1
                se = min(ge, int(cum[s + 1]))
                whole = g == cum[s] and se == cum[s + 1]
                slot = -1 if whole else 2 * w + (1 if gb < cum[s] else 0)
                pieces.append(Piece(s // Hkv, s % Hkv, int(g - cum[s]) * tile,
                                    int(min(seg_len[s], (se - cum[s]) * tile)), slot))
                g = se
            plan.tasks.append(pieces)

        def owner(g):
            return max(w for w in range(W) if begin[w] <= g)

        for s in range(nseg):
            w0, w1 = owner(int(cum[s])), owner(int(cum[s + 1]) - 1)
            if w0 != w1:
                slots = [2 * w + (1 if begin[w] < cum[s] else 0) for w in range(w0, w1 + 1)]
                plan.reductions.append((s // Hkv, s % Hkv, slots))
    else:
        S = default_num_splits(a, Hkv, num_workers) if num_splits is None else int(num_splits)
        plan.num_splits = S
        slot = 0
        for s in range(nseg):
            n = int(ntiles[s])
            Se = min(S, n)
            slots = []
            for c in range(Se):
                tb, te = (n * c) // Se, (n * (c + 1)) // Se
                sl = -1 if Se == 1 else slot
                if Se > 1:
                    slots.append(slot)
                    slot += 1
                plan.tasks.append([Piece(s // Hkv, s % Hkv, tb * tile, int(min(seg_len[s], te * tile)), sl)])
            if Se > 1:
                plan.reductions.append((s // Hkv, s % Hkv, slots))
    return plan
