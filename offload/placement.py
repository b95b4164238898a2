"""Which units of a model stay resident and which stream from disk, under hard memory budgets.

A model is cut into *units*, each read as a whole: ``embed`` (the embedding table), one
``layer.{i}`` per decoder layer and ``head`` (final norm + lm_head). Every decode step needs
every layer and the head once, so a byte that is not resident costs one disk read per step,
whichever unit it belongs to; the embedding is only indexed (one row per token), so a streamed
embedding costs one checksum page per token instead of the whole table. The planner therefore
keeps the head first, then as many layers as fit, and the embedding last, after reserving what
decoding needs anyway: the KV cache, the streaming slots and a workspace for activations.

The prediction per token is the roofline's: ``max(disk bytes / disk bandwidth, compute time)``
where compute is ``roofline.analyze_model``'s in-memory decode step on this machine's profile
(I/O and compute overlap in the streaming executor).

``device="cuda"`` plans three tiers (:func:`plan_placement` with a "gpu" budget): the GPU holds
the KV cache, the workspace, two device slots and as many units as fit; each unit not on the GPU
is copied into a slot every step (``links["h2d_pinned"]``), from pinned CPU memory where the
"cpu" budget holds it and through the CPU staging slots from disk otherwise. Predicted step:
``max(GPU compute, PCIe bytes / h2d bandwidth, disk bytes / disk bandwidth)``. This is planning
only: the CUDA executor is not written, so ``load_model(device="cuda")`` raises.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

__all__ = ["Placement", "plan_placement", "parse_bytes", "estimate_unit_bytes", "workspace_bytes", "PREFILL_CHUNK",
           "MAX_PREFILL_CHUNK", "choose_prefill_chunk"]

_MiB = 1 << 20
#: Prefill attention takes the queries this many at a time (``offload.llama.QUERY_BLOCK``, the
#: same number), so its scores are bounded whatever the prompt length; also the smallest chunk.
PREFILL_CHUNK = 64
#: Most tokens of a prompt one pass over the layers takes by default (see :func:`choose_prefill_chunk`).
MAX_PREFILL_CHUNK = 512
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_bytes(value, name: str = "budget") -> int:
    """``2 << 30``, ``"2GiB"``, ``"512 MiB"``, ``"1.5GB"`` -> bytes (int >= 0).

    Raises ValueError naming ``name`` for anything else (negative, NaN, unknown unit).
    """
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected bytes (int) or a size string like '2GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: expected bytes >= 0, got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).upper() in _UNITS | {"": 1}:
            return int(float(m.group(1)) * _UNITS.get(m.group(2).upper(), 1))
        raise ValueError(f"{name}: cannot parse {value!r} as a size (e.g. '512MiB', '2GiB', '1.5GB')")
    raise TypeError(f"{name}: expected bytes (int) or a size string like '2GiB', got {type(value).__name__}")


def _cfg(config) -> dict:
    from roofline.model import _load_config

    return _load_config(config)


def workspace_bytes(config, batch: int, context: int, chunk: int = PREFILL_CHUNK) -> int:
    """Activations and scratch of one forward of ``batch`` x ``chunk`` tokens: 8 MiB of kernel
    scratch + float32 hidden/q/k/v/attention out (4 x hidden) and MLP (3 x intermediate) per
    token, the last token's logits, + the attention scores of one block of ``PREFILL_CHUNK``
    queries (prefill attention takes its queries a block at a time) against ``context`` keys, per
    head. (The logits of every token, ``forward(last_only=False)``, are the caller's output:
    [batch, prompt, vocab] float32 whatever the chunk.)"""
    c = _cfg(config)
    per_tok = 4 * c["hidden_size"] + 3 * c["intermediate_size"]
    scores = c["num_attention_heads"] * context
    return 8 * _MiB + 4 * batch * (chunk * per_tok + c["vocab_size"] + min(chunk, PREFILL_CHUNK) * scores)


def choose_prefill_chunk(config, batch: int, context: int, budget: int | None = None) -> int:
    """Tokens of a prompt per pass over the layers: the largest multiple of ``PREFILL_CHUNK`` up
    to ``MAX_PREFILL_CHUNK`` (and no longer than ``context`` needs) whose workspace exceeds a
    ``PREFILL_CHUNK``-token pass's by at most ``budget / 16`` (no budget: no limit).

    Every pass reads each streamed weight and each KV page on disk once, so a prompt of T tokens
    reads them ``ceil(T / chunk)`` times. The memory a longer chunk takes is not there for
    resident weights, so a decode step may read up to budget/16 more (rounded up to whole
    layers: one more streamed layer at most). For TinyLlama's shape under a 512 MiB budget that
    is 384 tokens (6x fewer prefill reads) for 32 MiB."""
    top = max(PREFILL_CHUNK, min(MAX_PREFILL_CHUNK, -(-context // PREFILL_CHUNK) * PREFILL_CHUNK))
    if budget is None:
        return top
    allow = workspace_bytes(config, batch, context) + budget // 16
    lo, hi = PREFILL_CHUNK, top  # the answer is a multiple of PREFILL_CHUNK in [lo, hi]
    while lo < hi:
        mid = (lo + hi + PREFILL_CHUNK) // (2 * PREFILL_CHUNK) * PREFILL_CHUNK
        if workspace_bytes(config, batch, context, mid) <= allow:
            lo = mid
        else:
            hi = mid - PREFILL_CHUNK
    return lo


def estimate_unit_bytes(config, *, weight_bits=None, group_size: int = 128, dtype_bytes: int = 2,
                        quantize_head: bool = False) -> dict[str, int]:
    """Bytes of each unit as the store holds it (4 KiB alignment ignored): used when no store
    exists yet; ``load_model`` plans with the store's exact sizes."""
    c = _cfg(config)
    H, L, V = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    nh = c["num_attention_heads"]
    hd = c.get("head_dim") or H // nh
    kvh = c.get("num_key_value_heads") or nh
    ffn = c["intermediate_size"]

    def mat(n, k, quant):
        if not quant or weight_bits is None:
            return n * k * dtype_bytes
        return n * k * weight_bits // 8 + n * math.ceil(k / group_size) * 4

    bias = (nh + 2 * kvh) * hd * dtype_bytes if (c.get("attention_bias") or c.get("model_type") == "qwen2") else 0
    layer = (mat(nh * hd, H, True) + 2 * mat(kvh * hd, H, True) + mat(H, nh * hd, True)
             + 3 * mat(ffn, H, True) + 2 * H * dtype_bytes + bias)
    out = {"embed": V * H * dtype_bytes}
    out.update({f"layer.{i}": layer for i in range(L)})
    out["head"] = H * dtype_bytes + mat(V, H, quantize_head)
    return out


@dataclass
class Placement:
    """Where every unit lives, what the budgets hold, and the predicted cost per decode step.

    Attributes
    ----------
    device : "cpu" or "cuda" (where the layers compute).
    tiers : unit -> "cpu" | "gpu" | "disk" ("disk" = streamed through the slots every step;
        for ``embed``, rows are read per token).
    unit_bytes : unit -> bytes one full read of it moves.
    budgets : tier -> bytes (None: no limit given).
    slots, slot_bytes : the streaming ring (0 slots when nothing streams).
    kv_bytes : memory reserved for the KV cache of ``batch`` sequences of ``context`` tokens
        (tiered: its windows, CPU pages, read slots and summaries).
    kv_cpu_pages, kv_page_tokens, kv_page_bytes, kv_slots, kv_chunk_pages : the tiered KV
        cache (``kv_cpu_pages`` None: the whole KV stays in memory): pages per layer kept in
        memory, tokens and bytes per page, read slots (prefetch depth) of ``kv_chunk_pages`` pages.
    kv_disk_bytes : KV page bytes on disk (and read every exact decode step) at ``context``.
    kv_disk_budget : the "disk" budget the page files must stay within (None: free space only).
    workspace_bytes : activations and scratch reserved per forward.
    prefill_chunk : tokens of a prompt per pass over the layers (``choose_prefill_chunk``).
    used : tier -> bytes the manager holds there (resident units + slots + KV + workspace).
    disk_bytes_per_token : bytes read from disk per decode step (weights, embedding rows and, at
        ``context``, the KV pages on disk).
    disk_bandwidth, predicted_s, bound_s, compute_s : seconds per decode step (None without
        a measured profile); ``bound_s`` is the disk bound ``disk bytes / disk bandwidth``.
    reasons : unit -> one sentence.
    gpu_slots, gpu_slot_bytes : (device="cuda") device buffers each non-resident unit is copied
        into before it computes (double buffering), each as large as the largest such unit.
    pcie_bytes_per_token, pcie_bandwidth, pcie_s : (device="cuda") bytes copied host -> device
        per decode step (units not on the GPU, embedding rows), the h2d bandwidth used and the
        resulting seconds.
    """

    device: str
    tiers: dict
    unit_bytes: dict
    budgets: dict
    slots: int
    slot_bytes: int
    kv_bytes: int
    workspace_bytes: int
    used: dict
    disk_bytes_per_token: int
    batch: int
    context: int
    weight_bits: int | None
    kv_bits: object
    disk_bandwidth: float | None = None
    compute_s: float | None = None
    bound_s: float | None = None
    predicted_s: float | None = None
    machine: str | None = None
    reasons: dict = field(default_factory=dict)
    kv_cpu_pages: int | None = None
    kv_page_tokens: int | None = None
    kv_page_bytes: int = 0
    kv_slots: int = 0
    kv_chunk_pages: int = 0
    kv_disk_bytes: int = 0
    kv_disk_budget: int | None = None
    kv_reason: str = ""
    prefill_chunk: int = PREFILL_CHUNK
    gpu_slots: int = 0
    gpu_slot_bytes: int = 0
    pcie_bytes_per_token: int = 0
    pcie_bandwidth: float | None = None
    pcie_s: float | None = None

    @property
    def kv_tiered(self) -> bool:
        """True when the KV cache spills pages to disk (``offload.TieredKVCache``)."""
        return self.kv_cpu_pages is not None

    def streamed(self) -> list[str]:
        """Units read from disk every step, in model order (``embed`` excluded)."""
        return [u for u, t in self.tiers.items() if t == "disk" and u != "embed"]

    def resident(self, tier: str = "cpu") -> list[str]:
        return [u for u, t in self.tiers.items() if t == tier]

    def to_dict(self) -> dict:
        return asdict(self)

    def explain(self) -> str:
        """A few lines: budgets, what is resident, what streams, the predicted step."""
        if self.device == "cuda":
            return self._explain_cuda()
        gib = lambda b: f"{b / 2**20:.0f} MiB"
        lines = []
        for tier in ("gpu", "cpu"):
            if tier in self.used:
                cap = self.budgets.get(tier)
                lines.append(f"{tier}: holds {gib(self.used[tier])} of "
                             f"{'no limit' if cap is None else gib(cap)} "
                             f"({', '.join(_ranges(self.resident(tier))) or 'no weights'}; KV {gib(self.kv_bytes)}, "
                             f"{self.slots} streaming slots x {gib(self.slot_bytes)}, "
                             f"workspace {gib(self.workspace_bytes)}: prompts {self.prefill_chunk} tokens per pass)")
        if self.kv_tiered:
            lines.append(f"kv: {self.kv_reason}")
        st = self.streamed()
        lines.append(f"disk: streams {', '.join(_ranges(st)) or 'nothing'} = {gib(self.disk_bytes_per_token)} "
                     f"per decode step; embedding {'rows read per token' if self.tiers['embed'] == 'disk' else 'resident'}")
        if self.predicted_s is not None:
            io = (f"disk {gib(self.disk_bytes_per_token)} / {self.disk_bandwidth / 1e9:.2f} GB/s = "
                  f"{self.bound_s * 1e3:.1f} ms" if self.bound_s is not None else "no disk reads")
            lines.append(f"predicted {self.predicted_s * 1e3:.1f} ms per decode step on {self.machine}: "
                         f"max({io}, compute {self.compute_s * 1e3:.1f} ms) with I/O overlapped")
        else:
            lines.append("no prediction: no measured machine profile (run `roofline probe`)")
        return "\n".join(lines)


    def _explain_cuda(self) -> str:
        mib = lambda b: f"{b / 2**20:.0f} MiB" if b >= 2**20 or b == 0 else f"{b / 2**10:.0f} KiB"
        cap = lambda t: "no limit" if self.budgets.get(t) is None else mib(self.budgets[t])
        off = [u for u, t in self.tiers.items() if t in ("cpu", "disk") and u != "embed"]
        lines = [f"gpu: holds {mib(self.used['gpu'])} of {cap('gpu')} "
                 f"({', '.join(_ranges(self.resident('gpu'))) or 'no weights'}; KV {mib(self.kv_bytes)}, "
                 + (f"{self.gpu_slots} device slots x {mib(self.gpu_slot_bytes)}" if self.gpu_slots
                    else "no device slots")
                 + f", workspace {mib(self.workspace_bytes)}: prompts {self.prefill_chunk} tokens per pass)",
                 f"cpu: holds {mib(self.used['cpu'])} of {cap('cpu')} "
                 f"({', '.join(_ranges([u for u in self.resident('cpu') if u != 'embed'])) or 'no layers'} pinned; "
                 f"embedding {'resident' if self.tiers['embed'] == 'cpu' else 'rows read from disk per token'}; "
                 + (f"{self.slots} staging slots x {mib(self.slot_bytes)})" if self.slots else "no staging slots)"),
                 f"pcie: copies {', '.join(_ranges(off)) or 'nothing but embedding rows'} = "
                 f"{mib(self.pcie_bytes_per_token)} host -> device per decode step",
                 f"disk: streams {', '.join(_ranges(self.streamed())) or 'nothing'} = "
                 f"{mib(self.disk_bytes_per_token)} per decode step"]
        if self.predicted_s is not None:
            parts = [f"compute {self.compute_s * 1e3:.1f} ms"]
            if self.pcie_s is not None:
                parts.append(f"pcie {mib(self.pcie_bytes_per_token)} / {self.pcie_bandwidth / 1e9:.1f} GB/s = "
                             f"{self.pcie_s * 1e3:.1f} ms")
            if self.bound_s is not None:
                parts.append(f"disk {mib(self.disk_bytes_per_token)} / {self.disk_bandwidth / 1e9:.2f} GB/s = "
                             f"{self.bound_s * 1e3:.1f} ms")
            lines.append(f"predicted {self.predicted_s * 1e3:.1f} ms per decode step on {self.machine}: "
                         f"max({', '.join(parts)}) with copies and reads overlapped")
        elif self.machine is None:
            lines.append("no prediction: no GPU profile (pass machine=, e.g. 'A100-80GB-SXM', or run "
                         "`roofline probe --device cuda` on the GPU machine)")
        else:
            lines.append(f"no prediction: {self.machine} has no host -> device bandwidth, or units are read "
                         f"from disk at an unknown disk bandwidth (pass disk_bandwidth=)")
        lines.append("planning only: the CUDA executor is not written (load_model(device='cuda') raises)")
        return "\n".join(lines)


def _ranges(units: list[str]) -> list[str]:
    """['layer.0', 'layer.1', 'layer.2', 'head'] -> ['layers 0-2', 'head']."""
    idx = [int(u.split(".")[1]) for u in units if u.startswith("layer.")]
    out, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(f"layer {idx[i]}" if i == j else f"layers {idx[i]}-{idx[j]}")
        i = j + 1
    return out + [u for u in units if not u.startswith("layer.")]


def _spread(n_layers: int, n_stream: int) -> set[int]:
    """Indices of ``n_stream`` layers spread evenly over ``n_layers`` (so resident layers'
    compute time is spread between streamed ones)."""
    if n_stream <= 0:
        return set()
    return {min(n_layers - 1, int((k + 0.5) * n_layers / n_stream)) for k in range(n_stream)}


def least_bytes(fixed: int, layer: int, head: int, slots: int) -> int:
    """The least CPU memory a plan can hold: every layer and the embedding streamed, the head
    resident beside layer-sized slots, or streamed through head-sized slots."""
    return fixed + min(slots * layer + head, slots * max(layer, head))


def _machine(machine, device: str = "cpu"):
    """The MachineProfile to plan with: ``machine`` (a profile or a ``roofline.HARDWARE``
    name), or this machine's cached profile for ``device``; None when there is none."""
    from roofline.advise import default_machine
    from roofline.hardware import get_machine

    return default_machine(device) if machine is None else get_machine(machine)


def disk_read_bandwidth(m) -> float | None:
    """Cold read bytes/s a MachineProfile holds: its fastest measured directory, else its
    ``links["disk_read"]``; None when it has no disk figure."""
    reads = [d.get("read") for d in m.disk.values() if d.get("read")]
    return max(reads) if reads else m.links.get("disk_read")


def _kv_tier(c: dict, batch, context, kv_bits, group_size, residual, page_tokens, dtype_name, layer_bytes,
             machine, disk_bandwidth, max_append: int = PREFILL_CHUNK):
    """Sizes of an ``offload.TieredKVCache`` for this model with no page in memory (None when
    ``context`` holds no whole page): {"memory", "page_bytes", "max_pages", "chunk_pages",
    "slots", "slots_why"}.

    Prefetch depth from the roofline: while a layer's weights compute (``layer_bytes`` at the
    measured memory bandwidth) no KV chunk is consumed, so the ring must hold what the disk
    delivers meanwhile, ``disk bandwidth x that time``, plus the chunk being attended and one
    being read: ``slots = 2 + ceil(that / chunk bytes)`` in [3, 16] (4 without a profile)."""
    import torch

    from .kvtier import TieredKVCache, _max_pages, default_chunk_pages, page_bytes

    L = c["num_hidden_layers"]
    nh = c["num_attention_heads"]
    hd = c.get("head_dim") or c["hidden_size"] // nh
    kvh = c.get("num_key_value_heads") or nh
    dt = getattr(torch, dtype_name)
    pb = page_bytes(batch, page_tokens, kvh, hd, kv_bits, group_size, dt)
    R = residual if kv_bits is not None else 0
    max_pages = _max_pages(context, page_tokens, kv_bits, group_size, R)
    if max_pages == 0:
        return None
    chunk = default_chunk_pages(pb, max_pages)
    slots, why = 4, "default: no machine profile (run `roofline probe`)"
    try:
        m = _machine(machine)
    except (ValueError, OSError):
        m = None
    dbw, mbw = disk_bandwidth, None
    if m is not None:
        dbw = dbw or disk_read_bandwidth(m)
        mbw = m.mem_bandwidth.get("read") or max(m.mem_bandwidth.values(), default=0)
        if not dbw:
            why = "default: the machine profile has no disk bandwidth (roofline probe with a disk directory)"
    if dbw and mbw:
        gap = layer_bytes / mbw
        slots = int(min(16, max(3, 2 + math.ceil(dbw * gap / (chunk * pb)))))
        why = (f"a layer's weights compute {gap * 1e3:.1f} ms at {mbw / 1e9:.1f} GB/s, while the disk reads "
               f"{dbw * gap / _MiB:.1f} MiB at {dbw / 1e9:.2f} GB/s")
    sizes = TieredKVCache.memory_bytes(L, batch, context, kvh, hd, kv_bits=kv_bits, group_size=group_size,
                                       residual=R, page_tokens=page_tokens, cpu_pages=0, slots=slots,
                                       chunk_pages=chunk, dtype=dt, max_append=max_append)
    return {"memory": sizes["memory"], "page_bytes": pb, "max_pages": max_pages, "chunk_pages": chunk,
            "slots": slots, "slots_why": why}


def plan_placement(config, machine=None, budgets=None, *, batch: int = 1, context: int = 2048,
                   weight_bits=None, kv_bits=None, group_size: int = 128, device: str = "cpu",
                   unit_bytes: dict | None = None, slots: int = 2, page_bytes: int = 4 * _MiB,
                   dtype_bytes: int = 2, disk_bandwidth: float | None = None,
                   mode: str = "auto", kv_group_size: int = 32, kv_residual: int = 128,
                   kv_page_tokens: int = 1024, prefill_chunk: int | None = None) -> Placement:
    """Decide which units stay in CPU memory and which stream from disk each decode step.

    Parameters
    ----------
    config : HF ``config.json`` dict or path.
    machine : ``roofline.MachineProfile``, a ``roofline.HARDWARE`` name, or None (this machine's
        cached profile, if ``roofline probe`` ran; else no prediction).
    budgets : {"cpu": bytes or "2GiB", "gpu": ..., "disk": ...}; a missing "cpu" means no limit;
        "disk" limits the KV page files when the KV spills (default: the free space).
    batch, context : the KV reserved is for ``batch`` sequences of ``context`` tokens.
    weight_bits, kv_bits, group_size : the store's weight format and the KV format.
    kv_group_size, kv_residual : the quantized KV cache's group and full-precision window
        (``pk.QuantizedKVCache``); its exact allocation is what the budget reserves.
    kv_page_tokens : page size of the tiered KV cache, used when the budget cannot hold the
        whole KV: then memory left after the weights holds the newest pages and the rest spill to
        disk (``offload.TieredKVCache``), read every step like streamed weights.
    prefill_chunk : tokens of a prompt per pass over the layers (each pass reads every streamed
        weight and KV page on disk once); None: :func:`choose_prefill_chunk` (at most 1/16 of the
        CPU budget more workspace than a ``PREFILL_CHUNK``-token pass); the workspace reserved is
        what the chunk needs. At most ``kv_page_tokens`` when the KV spills to disk.
    device : "cpu", or "cuda" (planning only: three tiers, a "gpu" budget or a ``machine`` with
        ``mem_capacity`` required; the KV cache stays whole on the GPU; see the module notes. The
        CUDA executor is not written, so ``load_model`` refuses the result).
    unit_bytes : exact unit sizes (``Store.unit_nbytes``); default: :func:`estimate_unit_bytes`.
    slots : streaming buffers (2 = double buffering), each as large as the largest streamed unit.
    dtype_bytes : bytes per element of the compute dtype (activations, dense KV).
    disk_bandwidth : cold read bytes/s of the store's disk; default from ``machine``.
    mode : "auto" (the fewest disk bytes per step within the budget), "disk" (stream every
        layer and the head, embedding rows per token), "memory" (everything resident; ValueError
        if it does not fit).

    Returns
    -------
    Placement (``.explain()`` says why).
    """

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if mode not in ("auto", "disk", "memory"):
        raise ValueError(f"mode: expected 'auto', 'disk' or 'memory', got {mode!r}")
    for name, v, lo in (("batch", batch, 1), ("context", context, 1), ("slots", slots, 2),
                        ("page_bytes", page_bytes, 4096)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    if weight_bits not in (None, 1, 2, 3, 4):
        raise ValueError(f"weight_bits: expected None, 1, 2, 3 or 4, got {weight_bits!r}")
    if kv_bits not in (None, 8, 4, 2, "fp8"):
        raise ValueError(f"kv_bits: expected None, 8, 4, 2 or 'fp8', got {kv_bits!r}")
    budgets = dict(budgets or {})
    for k in budgets:
        if k not in ("cpu", "gpu", "disk"):
            raise ValueError(f"budgets: unknown tier {k!r} (expected 'cpu', 'gpu' and/or 'disk')")
    if isinstance(kv_page_tokens, bool) or not isinstance(kv_page_tokens, int) or kv_page_tokens < PREFILL_CHUNK:
        raise ValueError(f"kv_page_tokens: expected an int >= {PREFILL_CHUNK} (a prefill chunk must fit a page), got {kv_page_tokens!r}")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk: expected None or an int >= 1, got {prefill_chunk!r}")
    if device == "cpu" and budgets.get("gpu") not in (None, 0, "0"):
        raise ValueError("budgets: a 'gpu' budget needs device='cuda'")
    cpu_cap = None if budgets.get("cpu") is None else parse_bytes(budgets["cpu"], "budgets['cpu']")
    disk_cap = None if budgets.get("disk") is None else parse_bytes(budgets["disk"], "budgets['disk']")
    c = _cfg(config)
    L = c["num_hidden_layers"]
    ub = dict(unit_bytes) if unit_bytes is not None else estimate_unit_bytes(
        c, weight_bits=weight_bits, group_size=group_size, dtype_bytes=dtype_bytes)
    need = ["embed", *(f"layer.{i}" for i in range(L)), "head"]
    missing = [u for u in need if u not in ub]
    if missing:
        raise ValueError(f"unit_bytes: missing {missing[:3]}")
    nh = c["num_attention_heads"]
    hd = c.get("head_dim") or c["hidden_size"] // nh
    kvh = c.get("num_key_value_heads") or nh
    if kv_bits is None:  # offload.llama.KVCache: one [L, 2, B, context, Hkv, D] tensor
        kv = L * 2 * batch * context * kvh * hd * dtype_bytes
    else:  # what pk.QuantizedKVCache holds (pages, scales, the fp sink/residual rows, huge pages)
        import torch

        from pykernels.kv_cache import QuantizedKVCache
        dt = {4: torch.float32, 2: torch.bfloat16}.get(dtype_bytes, torch.bfloat16)
        kv = L * QuantizedKVCache.allocation_bytes(batch, context, kvh, hd, bits=kv_bits, group_size=kv_group_size,
                                                   residual=kv_residual, dtype=dt, resident=True)
    gpu_m = gpu_cap = None
    if device == "cuda":  # the workspace lives on the GPU: its budget bounds the prefill chunk
        gpu_m = _machine(machine, "cuda")
        if budgets.get("gpu") is not None:
            gpu_cap = parse_bytes(budgets["gpu"], "budgets['gpu']")
        elif gpu_m is not None and gpu_m.mem_capacity:
            gpu_cap = int(gpu_m.mem_capacity * GPU_CAPACITY_FRACTION)
        else:
            raise ValueError("budgets: device='cuda' needs a 'gpu' budget (or a machine with mem_capacity, e.g. "
                             "machine='A100-80GB-SXM')")
    # activations + the RoPE cos/sin tables (float32 [context, head_dim] each)
    chunk = (choose_prefill_chunk(c, batch, context, cpu_cap if device == "cpu" else gpu_cap)
             if prefill_chunk is None else prefill_chunk)
    ws = workspace_bytes(c, batch, context, chunk) + 2 * 4 * context * hd
    fixed = kv + ws
    if device == "cuda":
        return _plan_cuda(c, ub, gpu_m, gpu_cap, cpu_cap, disk_cap, kv=kv, ws=ws, chunk=chunk, batch=batch,
                          context=context, weight_bits=weight_bits, kv_bits=kv_bits, slots=slots,
                          page_bytes=page_bytes, disk_bandwidth=disk_bandwidth, mode=mode, dtype_bytes=dtype_bytes)
    cap = math.inf if cpu_cap is None else cpu_cap
    reasons = {}
    layers = [f"layer.{i}" for i in range(L)]
    lay = max(ub[u] for u in layers)
    weights = sum(ub.values())
    embed_cost = min(ub["embed"], batch * page_bytes)  # one checksum page per sequence's token, at most

    # the tiered KV cache: memory held besides its CPU pages, and the bytes of a page
    dt_kv = {4: "float32", 2: "bfloat16"}.get(dtype_bytes, "bfloat16")
    if kv_bits is not None and kv_page_tokens % kv_group_size:
        raise ValueError(f"kv_page_tokens: expected a multiple of kv_group_size={kv_group_size} for quantized "
                         f"pages, got {kv_page_tokens}")
    tier = _kv_tier(c, batch, context, kv_bits, kv_group_size, kv_residual, kv_page_tokens, dt_kv, lay, machine,
                    disk_bandwidth, max_append=min(chunk, kv_page_tokens))

    def option(stream_head: bool, n_stream: int, embed_disk: bool = False):
        """(tiers, cpu bytes, disk bytes per token, KV pages per layer in memory or None) with
        ``n_stream`` layers (spread) streamed, or None when it does not fit ``cap``. The KV stays
        whole in memory if it fits, else spills its oldest pages; the embedding joins the
        resident set only when everything else fits (a resident page of KV saves a page read
        per step, the resident embedding one page per token)."""
        idx = _spread(L, n_stream)
        st = [u for i, u in enumerate(layers) if i in idx] + (["head"] if stream_head else [])
        slot = max((ub[u] for u in st), default=0)
        held = ws + (slots * slot if st else 0) + sum(ub[u] for u in need if u not in st and u != "embed")
        t = {u: ("disk" if u in st else "cpu") for u in need}
        disk = sum(ub[u] for u in st)
        if held + kv <= cap:
            held += kv
            if not embed_disk and held + ub["embed"] <= cap:
                held += ub["embed"]
            else:
                t["embed"] = "disk"
            return t, held, disk + (embed_cost if t["embed"] == "disk" else 0), None
        if tier is None or held + tier["memory"] > cap:
            return None
        pb, mp = tier["page_bytes"], tier["max_pages"]
        cpu_pages = int(min(mp, (cap - held - tier["memory"]) // (L * pb)))
        if disk_cap is not None and L * (mp - cpu_pages) * pb > disk_cap:
            return None
        t["embed"] = "disk"
        held += tier["memory"] + L * cpu_pages * pb
        return t, held, disk + embed_cost + L * (mp - cpu_pages) * pb, cpu_pages

    kv_pages = None
    if mode == "memory":
        total = fixed + weights
        if total > cap:
            raise ValueError(f"budgets['cpu']: placement='memory' needs {total / _MiB:.0f} MiB "
                             f"(weights {weights / _MiB:.0f} + KV {kv / _MiB:.0f} + workspace "
                             f"{ws / _MiB:.0f}), budget is {cap / _MiB:.0f} MiB")
        tiers = {u: "cpu" for u in need}
        used_cpu = total
    else:
        # placement="disk": every layer and the head stream, the embedding rows per token;
        # "auto": the fewest disk bytes per step over every number of streamed layers, head
        # resident or streamed (streaming one more layer can free room for the embedding)
        opts = ([option(True, L, embed_disk=True)] if mode == "disk"
                else [option(h, n) for h in (False, True) for n in range(L + 1)])
        best = None
        for o in opts:
            if o is not None and (best is None or o[2] < best[2]):
                best = o
        if best is None:
            least = least_bytes(fixed, lay, ub["head"], slots)
            if tier is None:
                spill = f"; the KV cannot spill: context {context} holds no whole page of {kv_page_tokens} tokens"
            else:
                spill = (f"; with every KV page spilled to disk it needs {(least - kv + tier['memory']) / _MiB:.1f} MiB"
                         + ("" if disk_cap is None else
                            f" and {L * tier['max_pages'] * tier['page_bytes'] / _MiB:.0f} MiB of KV pages on disk "
                            f"(budgets['disk'] {disk_cap / _MiB:.0f} MiB)"))
            raise ValueError(
                f"budgets['cpu']: {cap / _MiB:.1f} MiB is too small: with every layer and the embedding "
                f"streamed this model still needs {least / _MiB:.1f} MiB (KV {kv / _MiB:.1f} MiB for "
                f"batch={batch}, context={context}; workspace {ws / _MiB:.1f} MiB; {slots} streaming slots; "
                f"the head resident or streamed, whichever needs less){spill}")
        tiers, used_cpu, _, kv_pages = best
    for u in need:
        if tiers[u] == "cpu":
            reasons[u] = ("resident: the whole model fits" if all(t == "cpu" for t in tiers.values())
                          else "resident in CPU memory (read every step, so kept before the embedding)")
        elif u == "embed":
            reasons[u] = "on disk: only the rows of the input tokens are read (one checksum page each)"
        else:
            reasons[u] = ("placement='disk': streamed every step" if mode == "disk"
                          else "streamed every step: the CPU budget is full")
    streamed = [u for u in need if tiers[u] == "disk" and u != "embed"]
    slot_bytes = max((ub[u] for u in streamed), default=0)
    n_slots = slots if streamed else 0
    disk_tok = sum(ub[u] for u in streamed) + (embed_cost if tiers["embed"] == "disk" else 0)
    kv_held, kv_disk = kv, 0
    if kv_pages is not None:
        kv_disk = L * (tier["max_pages"] - kv_pages) * tier["page_bytes"]
        kv_held = tier["memory"] + L * kv_pages * tier["page_bytes"]
        disk_tok += kv_disk
    p = Placement(device=device, tiers=tiers, unit_bytes=ub, budgets={"cpu": cpu_cap, "disk": disk_cap},
                  slots=n_slots, slot_bytes=slot_bytes, kv_bytes=kv_held, workspace_bytes=ws, used={"cpu": used_cpu},
                  disk_bytes_per_token=disk_tok, batch=batch, context=context, weight_bits=weight_bits,
                  kv_bits=kv_bits, reasons=reasons, prefill_chunk=chunk)
    if kv_pages is not None:
        p.prefill_chunk = min(chunk, kv_page_tokens)  # the tiered cache appends at most a page per call
        p.kv_cpu_pages, p.kv_page_tokens, p.kv_page_bytes = kv_pages, kv_page_tokens, tier["page_bytes"]
        p.kv_slots, p.kv_chunk_pages, p.kv_disk_bytes, p.kv_disk_budget = (tier["slots"], tier["chunk_pages"],
                                                                           kv_disk, disk_cap)
        p.kv_reason = (f"the whole KV ({kv / _MiB:.0f} MiB at context {context}) does not fit beside the weights: "
                       f"the newest {kv_pages} of {tier['max_pages']} pages of {kv_page_tokens} tokens per layer "
                       f"stay in memory, {kv_disk / _MiB:.0f} MiB of older pages spill to disk and are read every "
                       f"step ({tier['slots']} read slots of {tier['chunk_pages']} pages: {tier['slots_why']})")
    _predict(p, c, machine, disk_bandwidth, dtype_bytes)
    return p


#: device buffers a unit that is not resident on the GPU is copied into (double buffering)
GPU_SLOTS = 2
#: share of a machine's GPU memory the planner uses when no "gpu" budget is given (the CUDA
#: context, the allocator's fragmentation and other tensors need the rest)
GPU_CAPACITY_FRACTION = 0.9


def _plan_cuda(c: dict, ub: dict, m, gpu_cap: int, cpu_cap, disk_cap, *, kv: int, ws: int, chunk: int, batch: int,
               context: int, weight_bits, kv_bits, slots: int, page_bytes: int, disk_bandwidth, mode: str,
               dtype_bytes: int) -> Placement:
    """plan_placement for device="cuda" (see the module notes). ``m``: the GPU's profile or None."""
    L = c["num_hidden_layers"]
    layers = [f"layer.{i}" for i in range(L)]
    units = layers + ["head"]
    need = ["embed", *units]
    if kv + ws > gpu_cap:
        raise ValueError(f"budgets['gpu']: {gpu_cap / _MiB:.0f} MiB cannot hold the KV cache ({kv / _MiB:.0f} MiB for "
                         f"batch={batch}, context={context}) and the workspace ({ws / _MiB:.0f} MiB); with "
                         f"device='cuda' the KV cache stays whole on the GPU (spilling it to CPU memory or disk "
                         f"is only planned for device='cpu')")
    cpu = math.inf if cpu_cap is None else cpu_cap
    embed_cost = min(ub["embed"], batch * page_bytes)

    def gpu_option(head_off: bool, n_off: int):
        """(units off the GPU, GPU bytes held) with ``n_off`` layers (spread) and maybe the head
        copied in every step; None when it does not fit the GPU budget."""
        idx = _spread(L, n_off)
        off = [u for i, u in enumerate(layers) if i in idx] + (["head"] if head_off else [])
        slot = max((ub[u] for u in off), default=0)
        held = kv + ws + (GPU_SLOTS * slot if off else 0) + sum(ub[u] for u in units if u not in off)
        return None if held > gpu_cap else (off, held)

    def cpu_option(off: list, head_disk: bool, n_disk: int, embed_disk: bool = False):
        """(tiers, CPU bytes held, disk bytes per token) with ``n_disk`` of the off-GPU layers
        (spread) and maybe the head read from disk; None when it does not fit the CPU budget."""
        off_layers = [u for u in off if u != "head"]
        idx = _spread(len(off_layers), n_disk)
        disk = [u for i, u in enumerate(off_layers) if i in idx] + (["head"] if head_disk and "head" in off else [])
        slot = max((ub[u] for u in disk), default=0)
        held = (slots * slot if disk else 0) + sum(ub[u] for u in off if u not in disk)
        if held > cpu:
            return None
        t = {u: ("gpu" if u not in off else "disk" if u in disk else "cpu") for u in units}
        if not embed_disk and held + ub["embed"] <= cpu:
            held += ub["embed"]
            t["embed"] = "cpu"
        else:
            t["embed"] = "disk"
        return t, held, sum(ub[u] for u in disk) + (embed_cost if t["embed"] == "disk" else 0)

    if mode == "memory":
        g = gpu_option(False, 0)
        if g is None:
            total = kv + ws + sum(ub[u] for u in units)
            raise ValueError(f"budgets['gpu']: placement='memory' needs {total / _MiB:.0f} MiB on the GPU "
                             f"(layers and head {(total - kv - ws) / _MiB:.0f} + KV {kv / _MiB:.0f} + workspace "
                             f"{ws / _MiB:.0f}), budget is {gpu_cap / _MiB:.0f} MiB")
        best_cpu = cpu_option([], False, 0)
        if best_cpu is None or best_cpu[0]["embed"] != "cpu":
            raise ValueError(f"budgets['cpu']: placement='memory' keeps the embedding ({ub['embed'] / _MiB:.0f} MiB) "
                             f"in CPU memory, budget is {cpu / _MiB:.0f} MiB")
    else:
        if mode == "disk":
            gpu_opts = [gpu_option(True, L)]
        else:  # the fewest bytes copied to the GPU per step
            gpu_opts = [gpu_option(h, n) for h in (False, True) for n in range(L + 1)]
        g = min((o for o in gpu_opts if o is not None), key=lambda o: (sum(ub[u] for u in o[0]), o[1]), default=None)
        if g is None:
            least = kv + ws + GPU_SLOTS * max(ub[u] for u in units)
            raise ValueError(f"budgets['gpu']: {gpu_cap / _MiB:.1f} MiB is too small: with every layer and the head "
                             f"copied in per step the GPU still needs {least / _MiB:.1f} MiB (KV {kv / _MiB:.1f} MiB, "
                             f"workspace {ws / _MiB:.1f} MiB, {GPU_SLOTS} device slots of the largest unit)")
        off = g[0]
        n_layers_off = sum(1 for u in off if u != "head")
        if mode == "disk":
            cpu_opts = [cpu_option(off, True, n_layers_off, embed_disk=True)]
        else:  # then the fewest bytes read from disk per step
            cpu_opts = [cpu_option(off, h, n) for h in (False, True) for n in range(n_layers_off + 1)]
        best_cpu = min((o for o in cpu_opts if o is not None), key=lambda o: o[2], default=None)
        if best_cpu is None:
            raise ValueError(f"budgets['cpu']: {cpu / _MiB:.1f} MiB cannot hold {slots} staging slots for the "
                             f"units read from disk ({max(ub[u] for u in off) / _MiB:.1f} MiB each)")
    tiers, used_cpu, disk_tok = best_cpu
    off, used_gpu = g  # (budgets["disk"] limits KV page files, which a cuda plan never writes)
    reasons = {}
    for u in need:
        t = tiers[u]
        if u == "embed":
            reasons[u] = ("resident in CPU memory: rows looked up on the host, copied to the GPU per token"
                          if t == "cpu" else "on disk: only the rows of the input tokens are read")
        elif t == "gpu":
            reasons[u] = "resident in GPU memory"
        elif t == "cpu":
            reasons[u] = "pinned in CPU memory, copied into a device slot every step: the GPU budget is full"
        else:
            reasons[u] = ("placement='disk': read from disk and copied to the GPU every step" if mode == "disk"
                          else "read from disk and copied to the GPU every step: the GPU and CPU budgets are full")
    streamed = [u for u in units if tiers[u] == "disk"]
    p = Placement(device="cuda", tiers={u: tiers[u] for u in need}, unit_bytes=ub,
                  budgets={"gpu": gpu_cap, "cpu": cpu_cap, "disk": disk_cap},
                  slots=slots if streamed else 0, slot_bytes=max((ub[u] for u in streamed), default=0),
                  kv_bytes=kv, workspace_bytes=ws, used={"gpu": used_gpu, "cpu": used_cpu},
                  disk_bytes_per_token=disk_tok, batch=batch, context=context, weight_bits=weight_bits,
                  kv_bits=kv_bits, reasons=reasons, prefill_chunk=chunk,
                  gpu_slots=GPU_SLOTS if off else 0, gpu_slot_bytes=max((ub[u] for u in off), default=0),
                  pcie_bytes_per_token=sum(ub[u] for u in off) + batch * c["hidden_size"] * dtype_bytes)
    _predict_cuda(p, c, m, disk_bandwidth)
    return p


def _predict_cuda(p: Placement, c: dict, m, disk_bandwidth) -> None:
    """Prediction fields of a device="cuda" plan (in place): nothing without the GPU's profile,
    and none when units are read from disk at an unknown disk bandwidth."""
    from roofline.model import analyze_model

    if m is None:
        return
    h2d = m.links.get("h2d_pinned")
    bw = disk_bandwidth if disk_bandwidth is not None else m.links.get("disk_read")
    if bw is None:  # the host's measured disk (the GPU's profile has none)
        try:
            host = _machine(None)
        except (ValueError, OSError):
            host = None
        bw = disk_read_bandwidth(host) if host is not None else None
    try:
        a = analyze_model(c, batch=p.batch, context=p.context, w_bits=p.weight_bits or 16,
                          kv_bits=16 if p.kv_bits is None else p.kv_bits, machine=m)
    except ValueError:
        return
    p.machine, p.compute_s, p.disk_bandwidth, p.pcie_bandwidth = m.name, a.time_s, bw, h2d
    times = [a.time_s]
    if p.pcie_bytes_per_token and h2d:
        p.pcie_s = p.pcie_bytes_per_token / h2d
        times.append(p.pcie_s)
    elif p.pcie_bytes_per_token:
        return  # copies of unknown cost
    if p.disk_bytes_per_token:
        if not bw:
            return
        p.bound_s = p.disk_bytes_per_token / bw
        times.append(p.bound_s)
    p.predicted_s = max(times)


def _predict(p: Placement, c: dict, machine, disk_bandwidth, dtype_bytes) -> None:
    """Fill the prediction fields from the roofline (in place); nothing without a profile."""
    from roofline.model import analyze_model

    m = _machine(machine)
    if m is None:
        return
    bw = disk_bandwidth if disk_bandwidth is not None else disk_read_bandwidth(m)
    try:
        a = analyze_model(c, batch=p.batch, context=p.context, w_bits=p.weight_bits or 16,
                          kv_bits=16 if p.kv_bits is None else p.kv_bits, machine=m)
    except ValueError:
        return
    p.machine = m.name
    p.compute_s = a.time_s
    p.disk_bandwidth = bw
    if p.disk_bytes_per_token and bw:
        p.bound_s = p.disk_bytes_per_token / bw
        p.predicted_s = max(p.bound_s, a.time_s)
    elif not p.disk_bytes_per_token:
        p.predicted_s = a.time_s
