"""Whole-model decode/prefill time of a Llama/Mistral/Qwen2-style decoder on a roofline.

Every op of one decoder layer (q/k/v/o projections, attention, SwiGLU gate/up/down) and the
lm_head is costed with :mod:`roofline.cost` and timed with :func:`roofline.place.roofline_time`:
``max(flops / peak, bytes / bandwidth, link_bytes / link_bandwidth for each link)``, i.e. compute,
memory traffic and tier transfers are assumed to overlap (weights of the next layer are
prefetched while this one computes, as in FlexGen's cost model). The model total is the sum over
ops. Norms, rotary embedding, the SiLU*mul and residual adds are left out (under 2% of the time
at the shapes this is meant for), as are the embedding-row lookups.

Rules worth knowing:

- Compute roof: activations stay bf16, so every op runs on the ``"bf16"`` roof. Quantized
  weights (``w_bits < 16``) are dequantized in registers: they shrink the bytes, not the roof.
  (An int8 roof would need int8 activations too, which this package does not do.)
- Quantization covers the seven decoder-layer matrices; the embedding and lm_head stay 16-bit,
  as in GPTQ/AWQ checkpoints.
- Decode: each of ``batch`` sequences holds ``context`` tokens of KV and produces one token.
  Prefill: each sequence processes ``context`` new tokens (causal attention) and writes its cache;
  lm_head runs on the last position only, as serving engines do.
- Tensor parallelism over ``tp`` devices: query heads, the MLP width and the vocabulary are split;
  kv heads are split too (``Hkv / tp`` per device), or replicated when ``num_kv_heads < tp`` (one per
  device). Two all-reduces per layer (after attention and after the MLP) of the
  ``tokens * hidden * 2``-byte activations; a ring all-reduce moves ``2 * (tp - 1) / tp`` of that
  over each device's link (``links["nvlink"]``, else ``"xgmi"``, else ``"pcie_p2p"``). All
  FLOPs, bytes and times are *per device* (for ``tp=1``: the whole model).
- Placement across tiers (FlexGen-style): data on ``"cpu"`` crosses ``links["h2d_pinned"]`` each
  time it is used, data on ``"disk"`` crosses ``links["disk_read"]`` and then ``"h2d_pinned"``;
  a prefill writing KV to cpu/disk uses ``"d2h_pinned"`` / ``"disk_write"``. The bytes are still
  read from device memory once they arrived.

Example
-------
>>> cfg = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
...            num_key_value_heads=8, intermediate_size=14336, vocab_size=128256)
>>> a = analyze_model(cfg, batch=1, context=8192, machine="H100-SXM")
>>> a.bound, round(a.time_s * 1e3, 2)
('memory', 4.8)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

from .cost import (_weight_bytes, decode_attention_kv_cost, gemm_cost, kv_bytes_of_sequence,
                   kv_bytes_per_token, prefill_attention_cost, transfer_cost)
from .hardware import MachineProfile, get_machine
from .place import roofline_time

__all__ = ["ModelAnalysis", "analyze_model"]

_TIERS = ("gpu", "cpu", "disk")
_TP_LINKS = ("nvlink", "xgmi", "pcie_p2p")


@dataclass
class ModelAnalysis:
    """Result of :func:`analyze_model`; all figures per device, seconds / bytes / FLOPs.

    ``layers`` holds one row per op of a decoder layer plus ``lm_head``; a row's ``flops``,
    ``bytes``, ``link_bytes`` and ``time_s`` are for one instance, ``count`` says how many there
    are (``num_hidden_layers``, or twice that for the all-reduce). Totals = sum of row * count.
    ``kv_bytes_per_token`` covers all layers; ``max_sequences`` is how many sequences of
    ``context`` tokens fit in device memory beside the weights (None when the capacity is
    unknown or no KV lives on the device).
    """

    machine: str
    phase: str
    batch: int
    context: int
    w_bits: int
    kv_bits: int | str
    tp: int
    time_s: float
    flops: float
    bytes: float
    link_bytes: dict[str, float]
    bound: str
    tokens_per_s: float
    kv_bytes_per_token: float
    kv_bytes_per_sequence: float
    weight_bytes: float
    max_sequences: int | None
    layers: list[dict]

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict."""
        return asdict(self)


def _load_config(config) -> dict:
    if isinstance(config, (str, os.PathLike)):
        with open(config) as fh:
            config = json.load(fh)
    if not isinstance(config, dict):
        raise ValueError(f"config: expected a dict or a path to config.json, got "
                         f"{type(config).__name__}")
    out = {}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "vocab_size"):
        if key not in config:
            raise ValueError(f"config: missing key {key!r}")
        out[key] = config[key]
    kvh = config.get("num_key_value_heads")  # absent or null: MHA; 0 is an error, not MHA
    out["num_key_value_heads"] = out["num_attention_heads"] if kvh is None else kvh
    for key, val in out.items():
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"config: {key!r} must be an int >= 1, got {val!r}")
    head_dim = config.get("head_dim")
    if head_dim is None:
        if out["hidden_size"] % out["num_attention_heads"]:
            raise ValueError("config: hidden_size is not a multiple of num_attention_heads; "
                             "give head_dim")
        head_dim = out["hidden_size"] // out["num_attention_heads"]
    out["head_dim"] = head_dim
    out["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    if out["num_attention_heads"] % out["num_key_value_heads"]:
        raise ValueError("config: num_attention_heads must be a multiple of num_key_value_heads")
    return out


def _fractions(placement: dict | None, key: str) -> dict[str, float]:
    where = (placement or {}).get(key, "gpu")
    if isinstance(where, str):
        where = {where: 1.0}
    if not isinstance(where, dict):
        raise ValueError(f"placement[{key!r}]: expected a tier name or {{tier: fraction}}, "
                         f"got {where!r}")
    for tier, frac in where.items():
        if tier not in _TIERS:
            raise ValueError(f"placement[{key!r}]: unknown tier {tier!r}, expected one of "
                             f"{list(_TIERS)}")
        if not isinstance(frac, (int, float)) or frac < 0:
            raise ValueError(f"placement[{key!r}][{tier!r}]: expected a fraction >= 0, "
                             f"got {frac!r}")
    if not math.isclose(sum(where.values()), 1.0, abs_tol=1e-9):
        raise ValueError(f"placement[{key!r}]: fractions must sum to 1, got {where!r}")
    return {t: float(where.get(t, 0.0)) for t in _TIERS}


def _tier_links(nbytes: float, frac: dict[str, float], write: bool) -> dict[str, float]:
    """Link bytes to bring ``nbytes`` to (or, if ``write``, from) the device per use."""
    off = nbytes * (frac["cpu"] + frac["disk"])
    host, disk = ("d2h_pinned", "disk_write") if write else ("h2d_pinned", "disk_read")
    links = {host: off} if off else {}
    if frac["disk"]:
        links[disk] = nbytes * frac["disk"]
    return links


def _int_arg(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def analyze_model(config, *, batch: int, context: int, phase: str = "decode", w_bits: int = 16,
                  kv_bits=16, machine: str | MachineProfile = "A100-80GB-SXM",
                  placement: dict | None = None, tp: int = 1, group_size: int = 128,
                  kv_group_size: int = 32, kv_residual: int = 128) -> ModelAnalysis:
    """Predict one decode step (or one prefill) of a decoder-only model on a roofline.

    Parameters
    ----------
    config : dict or path
        HF ``config.json`` (or its dict): ``hidden_size``, ``num_hidden_layers``,
        ``num_attention_heads``, ``intermediate_size``, ``vocab_size``; optional
        ``num_key_value_heads`` (default: attention heads), ``head_dim`` (default:
        hidden / heads), ``tie_word_embeddings`` (default False).
    batch : int
        Sequences processed together.
    context : int
        Decode: KV tokens each sequence attends to. Prefill: prompt tokens per sequence.
    phase : {"decode", "prefill"}
    w_bits : int
        Bits of the decoder-layer weights: 16, or 1..8 (grouped, fp16 scale+zero per
        ``group_size`` weights).
    kv_bits : {16, 8, 4, 2, "fp8"}
        KV-cache format (see :func:`roofline.cost.kv_bytes_per_token`, groups of
        ``kv_group_size``).
    kv_residual : int
        Quantized formats: the full-precision window of recent tokens ``pk.QuantizedKVCache``
        keeps (its default, 128); decode reads those tokens at 16 bits (see
        :func:`roofline.cost.decode_attention_kv_cost`). ``kv_bytes_per_token`` stays the
        quantized per-token figure.
    machine : str or MachineProfile
        A ``HARDWARE`` name or a profile.
    placement : dict, optional
        ``{"weights": tier, "kv": tier}`` with tier ``"gpu"``, ``"cpu"`` or ``"disk"``, or a
        ``{tier: fraction}`` dict. Default: everything on the device.
    tp : int
        Tensor-parallel degree.

    Returns
    -------
    ModelAnalysis

    Example
    -------
    >>> cfg = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
    ...            intermediate_size=11008, vocab_size=32000)
    >>> analyze_model(cfg, batch=1, context=2048, phase="prefill").bound
    'compute'
    """
    cfg = _load_config(config)
    _int_arg("batch", batch)
    _int_arg("context", context)
    if phase not in ("decode", "prefill"):
        raise ValueError(f"phase: expected 'decode' or 'prefill', got {phase!r}")
    if w_bits not in (1, 2, 3, 4, 5, 6, 7, 8, 16):
        raise ValueError(f"w_bits: expected 16 or 1..8, got {w_bits!r}")
    if kv_bits not in (16, 8, 4, 2, "fp8"):
        raise ValueError(f"kv_bits: expected one of [16, 8, 4, 2, 'fp8'], got {kv_bits!r}")
    _int_arg("group_size", group_size)
    _int_arg("kv_group_size", kv_group_size)
    if isinstance(kv_residual, bool) or not isinstance(kv_residual, int) or kv_residual < 0:
        raise ValueError(f"kv_residual: expected an int >= 0, got {kv_residual!r}")
    _int_arg("tp", tp)
    m = get_machine(machine)
    if placement is not None and (not isinstance(placement, dict)
                                  or set(placement) - {"weights", "kv"}):
        raise ValueError(f"placement: expected a dict with keys 'weights' and/or 'kv', "
                         f"got {placement!r}")
    wfrac, kvfrac = _fractions(placement, "weights"), _fractions(placement, "kv")

    hidden, nl, d = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["head_dim"]
    hq, hkv, inter, vocab = (cfg["num_attention_heads"], cfg["num_key_value_heads"],
                             cfg["intermediate_size"], cfg["vocab_size"])
    if hq % tp or inter % tp:
        raise ValueError(f"tp: num_attention_heads={hq} and intermediate_size={inter} must be "
                         f"multiples of tp, got tp={tp}")
    if (hkv % tp if hkv >= tp else tp % hkv):  # split evenly, or replicated on groups of tp / hkv devices
        raise ValueError(f"tp: num_key_value_heads={hkv} and tp={tp}: one must divide the other (kv heads are "
                         f"split evenly or replicated, as serving engines require)")
    hq_d, hkv_d = hq // tp, max(1, hkv // tp)
    inter_d, vocab_d = inter // tp, math.ceil(vocab / tp)
    tokens = batch if phase == "decode" else batch * context

    rows = []

    def add(op, cost, count, weight_bytes=0.0, kv_read=0.0, kv_write=0.0):
        cost.link_bytes = dict(cost.link_bytes)
        for nbytes, frac, write in ((weight_bytes, wfrac, False), (kv_read, kvfrac, False),
                                    (kv_write, kvfrac, True)):
            for k, v in _tier_links(nbytes, frac, write).items():
                cost.link_bytes[k] = cost.link_bytes.get(k, 0.0) + v
        t, bound = roofline_time(cost, m)
        rows.append({"op": op, "count": count, "flops": cost.flops, "bytes": cost.bytes,
                     "weight_bytes": weight_bytes, "link_bytes": cost.link_bytes,
                     "dtype": cost.dtype, "time_s": t, "bound": bound})

    def linear(op, n, k, bits, count=nl, m_rows=tokens):
        add(op, gemm_cost(m_rows, n, k, 2, bits, group_size), count,
            weight_bytes=_weight_bytes(n, k, bits, group_size))

    kv_tok = kv_bytes_per_token(hkv_d, d, kv_bits, kv_group_size)  # one layer, this device
    linear("q_proj", hq_d * d, hidden, w_bits)
    linear("k_proj", hkv_d * d, hidden, w_bits)
    linear("v_proj", hkv_d * d, hidden, w_bits)
    if phase == "decode":
        res = 0 if kv_bits == 16 else kv_residual
        add("attention", decode_attention_kv_cost(batch, context, hq_d, hkv_d, d, kv_bits, kv_group_size, res), nl,
            kv_read=batch * kv_bytes_of_sequence(context, hkv_d, d, kv_bits, kv_group_size, res))
    else:
        add("attention", prefill_attention_cost(batch, context, hq_d, hkv_d, d, kv_bits,
                                                kv_group_size), nl,
            kv_write=batch * context * kv_tok)
    linear("o_proj", hidden, hq_d * d, w_bits)
    linear("gate_proj", inter_d, hidden, w_bits)
    linear("up_proj", inter_d, hidden, w_bits)
    linear("down_proj", hidden, inter_d, w_bits)
    if tp > 1:
        link = next((k for k in _TP_LINKS if k in m.links), None)
        if link is None:
            raise ValueError(f"tp: tp={tp} needs a GPU-GPU link in machine.links, one of "
                             f"{list(_TP_LINKS)}; {m.name!r} has {sorted(m.links)}")
        add("allreduce", transfer_cost(2 * (tp - 1) / tp * tokens * hidden * 2, link), 2 * nl)
    linear("lm_head", vocab_d, hidden, 16, count=1, m_rows=batch)

    time_s = sum(r["time_s"] * r["count"] for r in rows)
    by_bound: dict[str, float] = {}
    links: dict[str, float] = {}
    for r in rows:
        by_bound[r["bound"]] = by_bound.get(r["bound"], 0.0) + r["time_s"] * r["count"]
        for k, v in r["link_bytes"].items():
            links[k] = links.get(k, 0.0) + v * r["count"]
    embed = 0.0 if cfg["tie_word_embeddings"] else vocab_d * hidden * 2  # resident, rows read
    weight_bytes = sum(r["weight_bytes"] * r["count"] for r in rows) + embed
    kv_all = kv_tok * nl
    kv_seq = kv_all * context
    max_seq = None
    kv_seq_gpu = kv_seq * kvfrac["gpu"]
    if m.mem_capacity is not None and kv_seq_gpu > 0:
        free = m.mem_capacity - weight_bytes * wfrac["gpu"]
        max_seq = max(0, math.floor(free / kv_seq_gpu))
    return ModelAnalysis(
        machine=m.name, phase=phase, batch=batch, context=context, w_bits=w_bits,
        kv_bits=kv_bits, tp=tp, time_s=time_s,
        flops=sum(r["flops"] * r["count"] for r in rows),
        bytes=sum(r["bytes"] * r["count"] for r in rows), link_bytes=links,
        bound=max(by_bound, key=by_bound.get),
        tokens_per_s=(batch if phase == "decode" else batch * context) / time_s,
        kv_bytes_per_token=kv_all, kv_bytes_per_sequence=kv_seq, weight_bytes=weight_bytes,
        max_sequences=max_seq, layers=rows)
