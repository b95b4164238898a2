"""``load_model`` and ``OffloadedModel``: a Llama-family model whose weights stream from disk.

The weights live in a checksummed store (``offload.store``, converted once from the HF
checkpoint; the checkpoint itself is only read). ``offload.plan_placement`` decides which units
stay in CPU memory under the budget; the rest are read every step by ``offload.executor.Streamer``
in background threads while the previous layers compute. The decoder math is
``offload.llama`` (``pykernels.decode_attention``, ``pykernels.QuantizedKVCache``,
``pykernels.lut_gemv`` for low-bit weights).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import time
import weakref
from typing import Callable, Iterator

import torch

from . import llama
from .executor import Streamer
from .store import _dtype_of, check_weight_bits
from .placement import Placement, parse_bytes, plan_placement

__all__ = ["load_model", "OffloadedModel"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_store_dir(path: str, weight_bits, group_size: int, quantize_head: bool = False) -> str:
    """``$XDG_CACHE_HOME/pykernels/offload/<name>-<hash of the path>-<format>`` (outside the
    checkpoint: the source directory is never written)."""
    from roofline.measure import pykernels_cache

    ap = os.path.realpath(path)
    tag = hashlib.sha1(ap.encode()).hexdigest()[:10]
    fmt = "source" if weight_bits is None else f"w{weight_bits}g{group_size}" + ("h" if quantize_head else "")
    return pykernels_cache("offload", f"{os.path.basename(ap.rstrip('/')) or 'model'}-{tag}-{fmt}")


def _is_store(path: str) -> bool:
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return json.load(f).get("format") == "pykernels-offload-store"
    except (OSError, ValueError):
        return False


class Stats:
    """What each forward moved and waited for.

    ``steps`` holds one dict per forward: ``phase`` ("prefill" / "decode"), ``tokens``
    (sequences x new tokens), ``wall_s``, ``stall_s`` (compute waiting for the disk),
    ``disk_bytes`` (streamed units + embedding pages read), ``cpu_bytes`` (resident weight
    bytes used), ``io_busy_s`` (time the reader spent reading); with a tiered KV cache also
    ``kv_disk_bytes`` / ``kv_cpu_bytes`` (KV pages attended from each tier), ``kv_stall_s``
    (waiting for KV reads), ``kv_pages_read`` and ``kv_pages_skipped`` (approximate mode).
    ``summary()`` aggregates the decode steps.
    """

    def __init__(self):
        self.steps: list[dict] = []

    def summary(self) -> dict:
        dec = [s for s in self.steps if s["phase"] == "decode"]
        pre = [s for s in self.steps if s["phase"] == "prefill"]
        out = {"forwards": len(self.steps), "decode_steps": len(dec)}
        if pre:  # prompt processing: one pass over the layers per prefill chunk
            wall = sum(s["wall_s"] for s in pre)
            toks = sum(s["tokens"] for s in pre)
            out.update(prefill_passes=len(pre), prefill_tokens=toks, prefill_s=wall,
                       prefill_tokens_per_s=toks / wall if wall > 0 else math.inf,
                       prefill_read_bytes=sum(s["read_bytes"] for s in pre))
        if dec:
            wall = sum(s["wall_s"] for s in dec)
            n = len(dec)
            busy = sum(s["io_busy_s"] for s in dec)
            disk = sum(s["disk_bytes"] for s in dec)
            out.update(
                step_s=wall / n,
                tokens_per_s=sum(s["tokens"] for s in dec) / wall if wall > 0 else math.inf,
                stall_s_per_step=sum(s["stall_s"] for s in dec) / n,
                stall_fraction=sum(s["stall_s"] for s in dec) / wall if wall > 0 else 0.0,
                bytes_per_step={"disk": disk / n, "cpu": sum(s["cpu_bytes"] for s in dec) / n},
                disk_read_bandwidth=(sum(s["read_bytes"] for s in dec) / busy) if busy > 0 else None,
                disk_effective_bandwidth=disk / wall if wall > 0 else None,
            )
            if "kv_disk_bytes" in dec[-1]:  # a tiered KV cache: its pages read, waits, skips
                kvs = [s for s in dec if "kv_disk_bytes" in s]
                out["bytes_per_step"].update(kv_disk=sum(s["kv_disk_bytes"] for s in kvs) / len(kvs),
                                             kv_cpu=sum(s["kv_cpu_bytes"] for s in kvs) / len(kvs))
                out["kv_stall_s_per_step"] = sum(s["kv_stall_s"] for s in kvs) / len(kvs)
                read, skip = sum(s["kv_pages_read"] for s in kvs), sum(s["kv_pages_skipped"] for s in kvs)
                out["kv_disk_fraction_read"] = read / (read + skip) if read + skip else None
                cos = [s["kv_approx_cosine_min"] for s in kvs if s.get("kv_approx_cosine_min") is not None]
                if cos:  # the approximate mode's audits: its worst cosine to the exact output
                    out["kv_approx_cosine_min"] = min(cos)
        return out

    def reset(self) -> None:
        self.steps.clear()

    def __repr__(self) -> str:
        return f"Stats({self.summary()})"


class OffloadedModel:
    """A Llama / Mistral / Qwen2 model streamed from a tiered store. Build with :func:`load_model`.

    Attributes
    ----------
    config : offload.llama.LlamaConfig
    placement : offload.Placement (``.explain()``: what lives where and why)
    stats : Stats (bytes per tier per step, stall time, achieved bandwidths)
    store : offload.store.Store
    dtype : compute dtype
    """

    def __init__(self, store, placement: Placement, *, dtype: torch.dtype, kv_bits=None, io_threads: int = 4,
                 kv_group_size: int = 32, kv_residual: int = 128, kv_dir=None, kv_approx: float | None = None,
                 kv_approx_audit: int = 0):
        self.store = store
        self.config = llama.LlamaConfig.from_hf(store.config)
        self.placement = placement
        self.dtype = dtype
        self.kv_bits, self.kv_group_size, self.kv_residual = kv_bits, kv_group_size, kv_residual
        self.kv_dir, self.kv_approx, self.io_threads = kv_dir, kv_approx, io_threads
        self.kv_approx_audit = kv_approx_audit
        self.stats = Stats()
        self._resident: dict[str, dict] = {}
        self._bufs = []
        self._fuse_specs: dict[str, dict] = {}
        self._streamer = None
        self._closed = False
        self._lock = threading.RLock()  # a forward pass vs close() from another thread
        cfg = self.config
        self.rope = llama.Rope(cfg, placement.context, dtype=torch.float32)
        for unit, tier in placement.tiers.items():
            if tier == "cpu":
                buf = store.alloc(store.unit_nbytes(unit))
                store.read_unit(unit, buf)
                self._bufs.append(buf)
                self._resident[unit] = (store.tensors(unit, buf), self._fused(unit, buf))
        streamed = placement.streamed()
        if streamed:
            self._streamer = Streamer(store, streamed, placement.slots, placement.slot_bytes, io_threads)
        # a model dropped without close() still stops its reader threads and closes its files
        self._finalizer = weakref.finalize(self, _release, self._streamer, store)
        self._embed_name = next(iter(store.units["embed"]["tensors"]))

    # ------------------------------------------------------------------ weights
    _GROUPS = {"qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
               "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}

    def _fuse_spec(self, unit: str) -> dict:
        """{"qkv" | "gate_up": (offset, dtype, rows, K)} for the groups the store keeps adjacent
        and dense (the store's canonical layer order does; older stores and LUT weights: none).
        From the manifest alone, so once per unit."""
        if unit in self._fuse_specs:
            return self._fuse_specs[unit]
        spec = self._fuse_specs[unit] = {}
        meta = self.store.units[unit]["tensors"] if unit.startswith("layer.") else {}
        for key, names in self._GROUPS.items():
            if not all(n in meta for n in names):
                continue  # LUT weights (stored as planes/scales) or a missing tensor
            e = [meta[n] for n in names]
            if len({x["dtype"] for x in e}) != 1 or any(a["offset"] + a["nbytes"] != b["offset"] for a, b in zip(e, e[1:])):
                continue
            spec[key] = (e[0]["offset"], _dtype_of(e[0]["dtype"]), sum(x["shape"][0] for x in e), e[0]["shape"][1])
        return spec

    def _fused(self, unit: str, buf) -> dict:
        """Zero-copy [q; k; v] and [gate; up] matrices over ``buf`` (see ``_fuse_spec``)."""
        return {key: torch.frombuffer(buf, dtype=dt, count=rows * K, offset=off).view(rows, K)
                for key, (off, dt, rows, K) in self._fuse_spec(unit).items()}

    @contextlib.contextmanager
    def _unit(self, unit: str, tally: dict):
        """(weights, fused views) of ``unit`` for the block: resident ones, or a streamed slot
        that is handed back after it. Adds the unit's bytes to ``tally["cpu"]`` or ``["disk"]``."""
        if unit in self._resident:
            tally["cpu"] += self.store.unit_nbytes(unit)
            yield self._resident[unit]
            return
        st = self._streamer
        slot, buf = st.acquire(unit)
        try:
            tally["disk"] += self.store.unit_nbytes(unit)
            yield self.store.tensors(unit, buf), self._fused(unit, buf)
        finally:
            st.release(slot)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if "embed" in self._resident:
            table = self._resident["embed"][0][self._embed_name]
            return table[ids].to(self.dtype)
        uniq, inv = torch.unique(ids, return_inverse=True)
        rows = self.store.read_rows("embed", self._embed_name, uniq.tolist())
        return rows.to(self.dtype)[inv]

    # ------------------------------------------------------------------ public
    def new_cache(self, batch: int, capacity: int):
        """A KV cache for ``batch`` sequences of up to ``capacity`` tokens, within what the
        placement reserved in the budget (``batch <= placement.batch``, ``capacity <=
        placement.context``: KV, workspace and RoPE tables were sized for those): an
        ``offload.llama.KVCache``, or an ``offload.TieredKVCache`` (close it when done) when the
        placement spills KV pages to disk (``placement.kv_tiered``)."""
        for name, v in (("batch", batch), ("capacity", capacity)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        p = self.placement
        if batch > p.batch:
            raise ValueError(f"batch: {batch} sequences, but the budget was planned for max_batch={p.batch} "
                             f"(KV and activations); pass max_batch to load_model")
        if capacity > p.context:
            raise ValueError(f"capacity: {capacity} tokens, but the budget was planned for max_context={p.context}; "
                             f"pass max_context to load_model")
        if p.kv_tiered:
            from .kvtier import TieredKVCache

            return TieredKVCache(self.config, batch, capacity, dtype=self.dtype, kv_bits=self.kv_bits,
                                 group_size=self.kv_group_size, residual=self.kv_residual if self.kv_bits else 0,
                                 page_tokens=p.kv_page_tokens, cpu_pages=p.kv_cpu_pages, disk_dir=self.kv_dir,
                                 disk_budget=p.kv_disk_budget, slots=p.kv_slots, chunk_pages=p.kv_chunk_pages,
                                 io_threads=self.io_threads, approx=self.kv_approx,
                                 approx_audit=self.kv_approx_audit, max_append=p.prefill_chunk)
        return llama.KVCache(self.config, batch, capacity, dtype=self.dtype, kv_bits=self.kv_bits,
                             group_size=self.kv_group_size, residual=self.kv_residual)

    def _check_ids(self, input_ids) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            try:
                input_ids = torch.as_tensor(input_ids)  # no dtype: floats must not be truncated to ids
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"input_ids: expected token ids [B, T], got {type(input_ids).__name__}") from e
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"input_ids: expected an integer tensor (int64, int32, int16, int8 or uint8), "
                            f"got {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.shape[1] < 1 or input_ids.shape[0] < 1:
            raise ValueError(f"input_ids: expected [B, T] with B, T >= 1, got shape {tuple(input_ids.shape)}")
        V = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
            raise ValueError(f"input_ids: token ids must be in [0, {V}), got min {int(input_ids.min())} "
                             f"max {int(input_ids.max())}")
        return input_ids.long().cpu()

    @torch.inference_mode()
    def forward(self, input_ids, cache=None, *, last_only: bool = False, _phase: str | None = None) -> torch.Tensor:
        """Logits float32 [B, T, vocab] (``[B, 1, vocab]`` with ``last_only``) of ``input_ids``
        [B, T] appended to ``cache`` (a fresh cache of T tokens when None)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("OffloadedModel: closed")
            return self._forward(input_ids, cache, last_only, _phase)

    def _forward(self, input_ids, cache, last_only, _phase):
        ids = self._check_ids(input_ids)
        B, T = ids.shape
        if cache is None:
            cache = self.new_cache(B, T)
        elif not all(hasattr(cache, a) for a in ("length", "capacity", "advance", "discard_pending")):
            raise TypeError(f"cache: expected a cache from new_cache(), got {type(cache).__name__}")
        if cache.length + T > cache.capacity:
            raise ValueError(f"input_ids: {T} tokens do not fit the cache ({cache.length} of {cache.capacity} used)")
        # bounded activations: one pass over the layers (every streamed weight read once) per chunk
        chunk = min(self.placement.prefill_chunk, getattr(cache, "max_append", T))
        if T > chunk:
            L0, outs = cache.length, []
            try:
                for s in range(0, T, chunk):
                    outs.append(self._forward(ids[:, s:s + chunk], cache, last_only, "prefill"))
            except BaseException:
                if cache.length != L0:  # earlier chunks are committed: a retry of the prompt would repeat them
                    cache._broken = (f"the cache is unusable: a {T}-token input was run in chunks of {chunk} and "
                                     f"failed after {cache.length - L0} of its tokens were committed; start a new "
                                     f"cache (repeating the input would append those tokens twice)")
                raise
            return outs[-1] if last_only else torch.cat(outs, 1)
        st = self._streamer
        if st is not None:
            st.skip_to_start()
        phase = _phase or ("prefill" if T > 1 or cache.length == 0 else "decode")
        t0 = time.perf_counter()
        stall0 = st.stall_s if st else 0.0
        busy0 = st.io_busy_s if st else 0.0
        read0 = st.bytes_read if st else 0
        kv0 = getattr(cache, "stats", None)
        try:
            logits, tally = self._layers(ids, cache, last_only)
        except BaseException:
            cache.discard_pending()
            raise
        cache.advance(T)
        kv1 = getattr(cache, "stats", None)
        kv = {f"kv_{k}": kv1[k] - kv0[k] for k in ("disk_bytes", "cpu_bytes", "stall_s", "pages_skipped",
                                                    "pages_read")} if kv0 else {}
        if kv0 and kv1["approx_audits"] > kv0["approx_audits"]:
            kv["kv_approx_cosine_min"] = kv1["approx_cosine_min"]
        self.stats.steps.append({**kv,
            "phase": phase, "tokens": B * T, "wall_s": time.perf_counter() - t0,
            "stall_s": (st.stall_s - stall0) if st else 0.0, "io_busy_s": (st.io_busy_s - busy0) if st else 0.0,
            "read_bytes": (st.bytes_read - read0) if st else 0, "disk_bytes": tally["disk"], "cpu_bytes": tally["cpu"]})
        return logits

    __call__ = forward

    def _layers(self, ids, cache, last_only):
        """Embedding, every layer, the head -> (logits, {"disk": bytes, "cpu": bytes} used)."""
        B, T = ids.shape
        tally = {"disk": 0, "cpu": 0}
        if "embed" in self._resident:
            tally["cpu"] += B * T * self.config.hidden_size * self.dtype.itemsize
            h = self._embed(ids)
        else:
            r0 = self.store.rows_bytes_read
            h = self._embed(ids)
            tally["disk"] += self.store.rows_bytes_read - r0
        positions = cache.length  # an int start: RoPE tables sliced, no per-layer index or sync
        cfg = self.config
        for i in range(cfg.num_layers):
            with self._unit(f"layer.{i}", tally) as (w, fused):
                h = llama.layer_forward(cfg, w, h, positions, cache, i, self.rope, fused=fused)
        with self._unit("head", tally) as (w, _):
            logits = llama.final_logits(cfg, w["norm.weight"], w["lm_head.weight"], h[:, -1:] if last_only else h)
        return logits, tally

    def stream_pass(self) -> float:
        """Read every streamed unit once, in order, without computing; -> seconds. The I/O
        ceiling of one decode step on this disk right now (0.0 when nothing streams): a
        decode step's time divided by this says how well compute hides behind the reads."""
        with self._lock:
            if self._closed:
                raise RuntimeError("OffloadedModel: closed")
            return self._stream_pass()

    def _stream_pass(self) -> float:
        st = self._streamer
        if st is None:
            return 0.0
        st.skip_to_start()
        t0 = time.perf_counter()
        st.consume(len(st.order))
        return time.perf_counter() - t0

    def iter_generate(self, input_ids, max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                      eos_token_id: int | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token ids [B] one step at a time (prefill first, then one decode step
        per token). Greedy unless ``do_sample``; sampling uses ``temperature``, ``top_k``,
        ``top_p`` and a private generator seeded with ``seed`` (torch's global RNG is never
        touched). Sequences that produced ``eos_token_id`` keep producing it; generation stops
        when all have. Arguments are checked here, before the first step."""
        ids = self._check_ids(input_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        if not isinstance(do_sample, bool):
            raise TypeError(f"do_sample: expected a bool, got {do_sample!r}")
        if do_sample:
            if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0
                    or not math.isfinite(temperature)):
                raise ValueError(f"temperature: expected a float > 0, got {temperature!r}")
            if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
                raise ValueError(f"top_k: expected an int >= 1 or None, got {top_k!r}")
            if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                                      or not 0 < top_p <= 1):
                raise ValueError(f"top_p: expected a float in (0, 1] or None, got {top_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
            raise ValueError(f"seed: expected an int in [0, 2**63) or None, got {seed!r}")
        if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
                                         or not 0 <= eos_token_id < self.config.vocab_size):
            raise ValueError(f"eos_token_id: expected a token id in [0, {self.config.vocab_size}) or None, "
                             f"got {eos_token_id!r}")
        B, T = ids.shape
        if T + max_new_tokens > self.placement.context:
            raise ValueError(f"max_new_tokens: the prompt's {T} tokens + {max_new_tokens} new exceed max_context="
                             f"{self.placement.context} (the KV the budget was planned for; pass max_context to "
                             f"load_model)")
        win = self.config.sliding_window
        if win is not None and T + max_new_tokens > win:
            raise ValueError(f"max_new_tokens: the prompt's {T} tokens + {max_new_tokens} new exceed the "
                             f"{self.config.model_type} attention window of {win} tokens (the windowed mask "
                             f"is not implemented)")
        cache = self.new_cache(B, T + max_new_tokens) if max_new_tokens else None
        gen = None
        if do_sample:
            gen = torch.Generator()
            if seed is None:
                gen.seed()  # fresh entropy for this generator only
            else:
                gen.manual_seed(seed)
        return self._steps(ids, cache, max_new_tokens, do_sample, temperature, top_k, top_p, gen, eos_token_id)

    def _steps(self, ids, cache, n, do_sample, temperature, top_k, top_p, gen, eos):
        try:
            yield from self._steps_in(ids, cache, n, do_sample, temperature, top_k, top_p, gen, eos)
        finally:
            if hasattr(cache, "close"):  # a tiered cache: stop its readers, delete its page files
                cache.close()

    def _steps_in(self, ids, cache, n, do_sample, temperature, top_k, top_p, gen, eos):
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        x = ids
        for _ in range(n):
            logits = self.forward(x, cache, last_only=True)[:, -1]
            nxt = self._pick(logits, do_sample, temperature, top_k, top_p, gen)
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done |= nxt == eos
            yield nxt
            if eos is not None and bool(done.all()):
                return
            x = nxt.unsqueeze(1)

    def generate(self, input_ids, max_new_tokens: int, *, streamer: Callable | None = None, **kw) -> torch.Tensor:
        """``input_ids`` [B, T] followed by up to ``max_new_tokens`` generated ids: [B, T + n].

        ``streamer``: called with each step's new ids [B] as soon as it exists. Other keywords
        as :meth:`iter_generate`."""
        if streamer is not None and not callable(streamer):
            raise TypeError(f"streamer: expected a callable or None, got {type(streamer).__name__}")
        ids = self._check_ids(input_ids)
        out = [ids]
        for nxt in self.iter_generate(ids, max_new_tokens, **kw):
            out.append(nxt.unsqueeze(1))
            if streamer is not None:
                streamer(nxt)
        return torch.cat(out, dim=1)

    @staticmethod
    def _pick(logits, do_sample, temperature, top_k, top_p, gen) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        z = logits.float() / temperature
        if top_k is not None and top_k < z.shape[-1]:
            kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
            z = z.masked_fill(z < kth, -math.inf)
        if top_p is not None and top_p < 1:
            srt, idx = torch.sort(z, dim=-1, descending=True)
            p = torch.softmax(srt, -1)
            drop = p.cumsum(-1) - p >= top_p  # keep the smallest prefix reaching top_p (as HF's warper)
            srt = srt.masked_fill(drop, -math.inf)
            z = torch.full_like(z, -math.inf).scatter(-1, idx, srt)
        return torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(-1)

    def close(self) -> None:
        """Stop the reader threads and free the buffers; the store's files stay. A forward
        running in another thread finishes first; later calls raise "closed"."""
        st = self._streamer
        if st is not None:
            st._stop.set()  # a forward waiting for a read in another thread stops with "closed"
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._finalizer()
            self._resident.clear()
            self._bufs.clear()
            self._streamer = None  # its slot buffers go with it (tensors still viewing one keep it alive)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return (f"OffloadedModel({c.model_type}, {c.num_layers} layers, hidden {c.hidden_size}, "
                f"{len(self.placement.streamed())} units streamed, dtype {self.dtype})")


def _release(streamer, store) -> None:
    """Finalizer of an OffloadedModel (holds no reference to the model itself)."""
    if streamer is not None:
        streamer.close()
    store.close()


def _check_placement(plan: Placement, store, kv_bits) -> None:
    """A Placement given by the caller must describe this store (units, sizes, slots) and the
    KV format it will hold (its budget reserved that KV)."""
    if plan.device != "cpu":
        raise ValueError(f"placement: planned for device={plan.device!r}; this executor runs device='cpu' plans only")
    if plan.kv_bits != kv_bits:
        raise ValueError(f"placement: planned for kv_bits={plan.kv_bits!r}, load_model got kv_bits={kv_bits!r}")
    units = set(store.unit_names())
    if set(plan.tiers) != units:
        raise ValueError(f"placement: its units {sorted(plan.tiers)[:4]}... are not this store's {sorted(units)[:4]}...")
    pc = plan.prefill_chunk
    if isinstance(pc, bool) or not isinstance(pc, int) or pc < 1:
        raise ValueError(f"placement: prefill_chunk expected an int >= 1, got {pc!r}")
    bad = {u: t for u, t in plan.tiers.items() if t not in ("cpu", "disk")}
    if bad:
        raise ValueError(f"placement: tiers {bad} (only 'cpu' and 'disk' on device='cpu')")
    wrong = [u for u in units if plan.unit_bytes.get(u) != store.unit_nbytes(u)]
    if wrong:
        u = wrong[0]
        raise ValueError(f"placement: unit_bytes[{u!r}] = {plan.unit_bytes.get(u)} but the store's unit is "
                         f"{store.unit_nbytes(u)} bytes: plan with unit_bytes from this store")
    st = plan.streamed()
    if st and (plan.slots < 2 or plan.slot_bytes < max(store.unit_nbytes(u) for u in st)):
        raise ValueError(f"placement: {plan.slots} slots of {plan.slot_bytes} bytes cannot stream units of up to "
                         f"{max(store.unit_nbytes(u) for u in st)} bytes")


def _store_dtype(store) -> torch.dtype:
    """The one float dtype of the store's unquantized weights (norms, biases, dense matrices)."""
    seen = set()
    for u in store.unit_names():
        for name, t in store.units[u]["tensors"].items():
            if name.endswith((".weight", ".bias")):
                seen.add(t["dtype"])
    if len(seen) != 1 or next(iter(seen)) not in _DTYPES:
        raise ValueError(f"path: the store's weights are {sorted(seen)}; one of {sorted(_DTYPES)} is supported "
                         f"(no per-step conversion copies)")
    return _DTYPES[seen.pop()]


def load_model(path, *, budgets=None, weight_bits=None, kv_bits=None, device: str = "cpu", placement="auto",
               store_dir=None, group_size: int = 128, dtype=None, max_context: int | None = None,
               max_batch: int = 1, io_threads: int = 4, slots: int = 2, machine=None,
               disk_bandwidth: float | None = None, progress=None, kv_group_size: int = 32,
               kv_residual: int = 128, kv_page_tokens: int = 1024, kv_dir=None,
               kv_approx: float | None = None, kv_approx_audit: int = 0,
               prefill_chunk: int | None = None) -> OffloadedModel:
    """Open an HF Llama / Mistral / Qwen2 checkpoint for decoding under memory budgets.

    Parameters
    ----------
    path : a checkpoint directory (``config.json`` + ``model.safetensors`` or a sharded index),
        or a store directory written by ``offload.convert``.
    budgets : {"cpu": bytes or "512MiB", "gpu": ..., "disk": ...}: hard limits on what the
        manager holds (resident weights, streaming slots, KV cache, workspace). Missing "cpu": no
        limit. When the KV of ``max_context`` does not fit beside the weights, its oldest pages
        spill to disk (``offload.TieredKVCache``), at most "disk" bytes of page files.
    weight_bits : None (the checkpoint's dtype) or 1..4 (LUT-GEMV format, group ``group_size``).
    kv_bits : None (dense KV in the compute dtype) or 8 / 4 / 2 / "fp8" (``pk.QuantizedKVCache``).
    device : "cpu" ("cuda" raises NotImplementedError: the GPU executor is not written yet;
        ``plan_placement(..., device="cuda")`` plans the three tiers on paper).
    placement : "auto", "disk" (stream every layer and the head), "memory" (all resident), or a
        ``Placement`` from :func:`offload.plan_placement`.
    store_dir : where the converted store lives (default under ``$XDG_CACHE_HOME/pykernels/offload``);
        conversion runs once, resumes after an interruption, and never writes into ``path``.
    dtype : compute dtype: the checkpoint's (None, or the same dtype; another one raises).
    max_context, max_batch : the KV reserved in the budget (default ``min(max_position_embeddings, 4096)``, 1).
    io_threads, slots : readers in flight, streaming buffers.
    kv_page_tokens, kv_dir, kv_approx : the tiered KV cache's page size, the directory for its
        page files (default ``$XDG_CACHE_HOME/pykernels/kv-pages``) and its approximate mode (None: exact;
        a fraction: read that share of the disk pages per step, ``TieredKVCache``).
    kv_approx_audit : every this many approximate layer-steps, also compute the exact output and
        record the cosine (``stats.summary()["kv_approx_cosine_min"]``); 0: never.
    machine, disk_bandwidth : for the placement's prediction (default: this machine's cached profile).
    prefill_chunk : prompt tokens per pass over the layers (every pass reads each streamed weight
        and each KV page on disk once); None: ``offload.choose_prefill_chunk`` (up to 512 tokens
        for at most 1/16 of the CPU budget); an int reserves the workspace it needs (with a
        Placement as ``placement``: its ``prefill_chunk``; another value is a ValueError).

    Example
    -------
    >>> m = offload.load_model(offload.demo_checkpoint("/tmp/tiny", preset="tiny"), budgets={"cpu": "64MiB"})
    >>> m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4).shape
    torch.Size([1, 7])
    """
    from .checkpoint import Checkpoint
    from .store import Store, convert

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        raise NotImplementedError("device='cuda': the GPU tier of the offload executor is not written yet; "
                                  "use device='cpu' (see README: what has run where). "
                                  "offload.plan_placement(..., device='cuda') shows where each unit would live")
    check_weight_bits(weight_bits)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path!r} is not a directory")
    if disk_bandwidth is not None and (isinstance(disk_bandwidth, bool) or not isinstance(disk_bandwidth, (int, float))
                                       or not math.isfinite(disk_bandwidth) or disk_bandwidth <= 0):
        raise ValueError(f"disk_bandwidth: expected bytes/s > 0 or None, got {disk_bandwidth!r}")
    for name, v, lo in (("io_threads", io_threads, 1), ("slots", slots, 2), ("max_batch", max_batch, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    if isinstance(placement, str) and placement not in ("auto", "disk", "memory"):
        raise ValueError(f"placement: expected 'auto', 'disk', 'memory' or a Placement, got {placement!r}")
    if not isinstance(placement, (str, Placement)):
        raise TypeError(f"placement: expected 'auto', 'disk', 'memory' or a Placement, got {type(placement).__name__}")
    if budgets is not None and not isinstance(budgets, dict):
        raise TypeError(f"budgets: expected a dict like {{'cpu': '2GiB'}}, got {type(budgets).__name__}")
    for k, v in (budgets or {}).items():
        if k not in ("cpu", "gpu", "disk"):
            raise ValueError(f"budgets: unknown tier {k!r} (expected 'cpu', 'gpu' and/or 'disk')")
        parse_bytes(v, f"budgets[{k!r}]")

    if _is_store(path):
        store = Store(path)
        if weight_bits is not None and store.weight_bits != weight_bits:
            store.close()
            raise ValueError(f"weight_bits: the store at {path!r} holds weight_bits={store.weight_bits}, "
                             f"got {weight_bits}")
    else:
        ckpt = Checkpoint(path)
        llama.LlamaConfig.from_hf(ckpt.config)  # unsupported architectures fail before converting
        sd = store_dir if store_dir is not None else default_store_dir(path, weight_bits, group_size)
        store = convert(ckpt, sd, weight_bits=weight_bits, group_size=group_size, progress=progress)
    try:
        cfg = llama.LlamaConfig.from_hf(store.config)
        stored = _store_dtype(store)
        if dtype is None:
            dtype = stored
        elif not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype: expected a torch.dtype such as torch.bfloat16 or None, got {dtype!r}")
        elif dtype != stored:
            raise ValueError(f"dtype: the store holds {stored} weights and computes in that dtype (no per-step "
                             f"conversion copies); got {dtype}. Convert a {dtype} checkpoint instead")
        if kv_bits is not None:  # checked here, not at the first step, and under these names
            from pykernels.kv_format import GROUP_SIZES
            if isinstance(kv_group_size, bool) or kv_group_size not in GROUP_SIZES:
                raise ValueError(f"kv_group_size: expected one of {GROUP_SIZES}, got {kv_group_size!r}")
            if (isinstance(kv_residual, bool) or not isinstance(kv_residual, int) or kv_residual < kv_group_size
                    or kv_residual % kv_group_size):
                raise ValueError(f"kv_residual: expected a positive multiple of kv_group_size={kv_group_size}, "
                                 f"got {kv_residual!r}")
        if max_context is None:
            max_context = min(cfg.max_position_embeddings or 4096, 4096)
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
            raise ValueError(f"max_context: expected an int >= 1, got {max_context!r}")
        if isinstance(placement, Placement):
            _check_placement(placement, store, kv_bits)
            if prefill_chunk is not None and prefill_chunk != placement.prefill_chunk:
                raise ValueError(f"prefill_chunk: {prefill_chunk!r}, but the given placement was planned with "
                                 f"prefill_chunk={placement.prefill_chunk} (pass it to plan_placement instead)")
            plan = placement
        else:
            ub = {u: store.unit_nbytes(u) for u in store.unit_names()}
            plan = plan_placement(store.config, machine, budgets, batch=max_batch, context=max_context,
                                  weight_bits=store.weight_bits, kv_bits=kv_bits, device=device,
                                  unit_bytes=ub, slots=slots, page_bytes=store.manifest["page_bytes"],
                                  dtype_bytes=dtype.itemsize, disk_bandwidth=disk_bandwidth, mode=placement,
                                  kv_group_size=kv_group_size, kv_residual=kv_residual,
                                  kv_page_tokens=kv_page_tokens, prefill_chunk=prefill_chunk)
        if kv_approx is not None and (isinstance(kv_approx, bool) or not isinstance(kv_approx, (int, float))
                                      or not 0 < kv_approx <= 1):
            raise ValueError(f"kv_approx: expected None or a fraction in (0, 1], got {kv_approx!r}")
        if kv_dir is not None and not os.path.isdir(kv_dir):
            raise FileNotFoundError(f"kv_dir: {kv_dir!r} is not a directory")
        if isinstance(kv_approx_audit, bool) or not isinstance(kv_approx_audit, int) or kv_approx_audit < 0:
            raise ValueError(f"kv_approx_audit: expected an int >= 0, got {kv_approx_audit!r}")
        return OffloadedModel(store, plan, dtype=dtype, kv_bits=kv_bits, io_threads=io_threads,
                              kv_group_size=kv_group_size, kv_residual=kv_residual, kv_dir=kv_dir,
                              kv_approx=kv_approx, kv_approx_audit=kv_approx_audit)
    except BaseException:
        store.close()
        raise
