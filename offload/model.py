"""``load_model`` and ``OffloadedModel``: a Llama-family model whose weights stream from disk.

The weights live in a checksummed store (``offload.store``, converted once from the HF
checkpoint; the checkpoint itself is only read). ``offload.plan_placement`` decides which units
stay in CPU memory under the budget; the rest are read every step by ``offload.executor.Streamer``
in background threads while the previous layers compute. The decoder math is
``offload.llama`` (``pykernels.decode_attention``, ``pykernels.QuantizedKVCache``,
``pykernels.lut_gemv`` for low-bit weights).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Callable, Iterator

import torch

from . import llama
from .executor import Streamer
from .placement import PREFILL_CHUNK, Placement, parse_bytes, plan_placement

__all__ = ["load_model", "OffloadedModel"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_store_dir(path: str, weight_bits, group_size: int, quantize_head: bool = False) -> str:
    """``$XDG_CACHE_HOME/pykernels/offload/<name>-<hash of the path>-<format>`` (outside the
    checkpoint: the source directory is never written)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    ap = os.path.realpath(path)
    tag = hashlib.sha1(ap.encode()).hexdigest()[:10]
    fmt = "source" if weight_bits is None else f"w{weight_bits}g{group_size}" + ("h" if quantize_head else "")
    return os.path.join(base, "pykernels", "offload", f"{os.path.basename(ap.rstrip('/')) or 'model'}-{tag}-{fmt}")


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
    bytes used), ``io_busy_s`` (time the reader spent reading). ``summary()`` aggregates the
    decode steps.
    """

    def __init__(self):
        self.steps: list[dict] = []

    def summary(self) -> dict:
        dec = [s for s in self.steps if s["phase"] == "decode"]
        out = {"forwards": len(self.steps), "decode_steps": len(dec)}
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
                 kv_group_size: int = 32, kv_residual: int = 128):
        self.store = store
        self.config = llama.LlamaConfig.from_hf(store.config)
        self.placement = placement
        self.dtype = dtype
        self.kv_bits, self.kv_group_size, self.kv_residual = kv_bits, kv_group_size, kv_residual
        self.stats = Stats()
        self._resident: dict[str, dict] = {}
        self._bufs = []
        self._streamer = None
        self._closed = False
        cfg = self.config
        self.rope = llama.Rope(cfg, placement.batch * placement.context, dtype=torch.float32)
        for unit, tier in placement.tiers.items():
            if tier == "cpu":
                buf = store.alloc(store.unit_nbytes(unit))
                store.read_unit(unit, buf)
                self._bufs.append(buf)
                self._resident[unit] = self._weights(unit, buf)
        streamed = placement.streamed()
        if streamed:
            self._streamer = Streamer(store, streamed, placement.slots, placement.slot_bytes, io_threads)
        self._embed_name = next(iter(store.units["embed"]["tensors"]))

    # ------------------------------------------------------------------ weights
    def _weights(self, unit: str, buf) -> dict:
        return self.store.tensors(unit, buf)

    def _unit_bytes(self, unit: str) -> int:
        return self.store.unit_nbytes(unit)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if "embed" in self._resident:
            table = self._resident["embed"][self._embed_name]
            return table[ids].to(self.dtype)
        uniq, inv = torch.unique(ids, return_inverse=True)
        rows = self.store.read_rows("embed", self._embed_name, uniq.tolist())
        return rows.to(self.dtype)[inv]

    # ------------------------------------------------------------------ public
    def new_cache(self, batch: int, capacity: int) -> "llama.KVCache":
        """A KV cache for ``batch`` sequences of up to ``capacity`` tokens (within the KV the
        placement reserved: ``batch * capacity <= placement.batch * placement.context``)."""
        for name, v in (("batch", batch), ("capacity", capacity)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        p = self.placement
        if batch * capacity > p.batch * p.context:
            raise ValueError(f"capacity: batch {batch} x {capacity} tokens exceeds the KV reserved in the budget "
                             f"({p.batch} x {p.context}); pass max_batch / max_context to load_model")
        return llama.KVCache(self.config, batch, capacity, dtype=self.dtype, kv_bits=self.kv_bits,
                             group_size=self.kv_group_size, residual=self.kv_residual)

    def _check_ids(self, input_ids) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            try:
                input_ids = torch.as_tensor(input_ids, dtype=torch.long)
            except (TypeError, ValueError) as e:
                raise TypeError(f"input_ids: expected token ids [B, T], got {type(input_ids).__name__}") from e
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
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
    def forward(self, input_ids, cache=None, *, last_only: bool = False) -> torch.Tensor:
        """Logits float32 [B, T, vocab] (``[B, 1, vocab]`` with ``last_only``) of ``input_ids``
        [B, T] appended to ``cache`` (a fresh cache of T tokens when None)."""
        if self._closed:
            raise RuntimeError("OffloadedModel: closed")
        ids = self._check_ids(input_ids)
        B, T = ids.shape
        if cache is None:
            cache = self.new_cache(B, T)
        if cache.length + T > cache.capacity:
            raise ValueError(f"input_ids: {T} tokens do not fit the cache ({cache.length} of {cache.capacity} used)")
        if T > PREFILL_CHUNK:  # bounded activations: one pass over the layers per chunk
            outs = [self.forward(ids[:, s:s + PREFILL_CHUNK], cache, last_only=last_only)
                    for s in range(0, T, PREFILL_CHUNK)]
            return outs[-1] if last_only else torch.cat(outs, 1)
        st = self._streamer
        if st is not None and not st.at_start():
            st.skip_to_start()
        t0 = time.perf_counter()
        stall0 = st.stall_s if st else 0.0
        busy0 = st.io_busy_s if st else 0.0
        read0 = st.bytes_read if st else 0
        try:
            logits = self._layers(ids, cache, last_only)
        except BaseException:
            cache.discard_pending()
            raise
        cache.advance(T)
        st = self._streamer
        self.stats.steps.append({
            "phase": "decode" if T == 1 else "prefill", "tokens": B * T, "wall_s": time.perf_counter() - t0,
            "stall_s": (st.stall_s - stall0) if st else 0.0, "io_busy_s": (st.io_busy_s - busy0) if st else 0.0,
            "read_bytes": (st.bytes_read - read0) if st else 0, "disk_bytes": self._disk, "cpu_bytes": self._cpu})
        return logits

    __call__ = forward

    def _layers(self, ids, cache, last_only):
        st = self._streamer
        B, T = ids.shape
        disk = cpu = 0
        if "embed" not in self._resident:
            disk += self._embed_page_bytes(ids)
        else:
            cpu += B * T * self.config.hidden_size * self.dtype.itemsize
        h = self._embed(ids)
        positions = torch.arange(cache.length, cache.length + T)
        cfg = self.config
        for i in range(cfg.num_layers):
            unit = f"layer.{i}"
            w, slot = self._take(unit)
            try:
                h = llama.layer_forward(cfg, w, h, positions, cache, i, self.rope)
            finally:
                del w
                if slot is not None:
                    st.release(slot)
            if slot is None:
                cpu += self._unit_bytes(unit)
            else:
                disk += self._unit_bytes(unit)
        w, slot = self._take("head")
        try:
            hs = h[:, -1:] if last_only else h
            logits = llama.final_logits(cfg, w["norm.weight"], w["lm_head.weight"], hs)
        finally:
            del w
            if slot is not None:
                st.release(slot)
        if slot is None:
            cpu += self._unit_bytes("head")
        else:
            disk += self._unit_bytes("head")
        self._disk, self._cpu = disk, cpu
        return logits

    def _embed_page_bytes(self, ids: torch.Tensor) -> int:
        u = self.store.units["embed"]
        t = u["tensors"][self._embed_name]
        row = t["nbytes"] // t["shape"][0]
        pages = set()
        starts = [p[0] for p in u["pages"]]
        import bisect
        for r in torch.unique(ids).tolist():
            a = t["offset"] + r * row
            for off in (a, a + row - 1):
                pages.add(bisect.bisect_right(starts, off) - 1)
        return sum(u["pages"][p][1] for p in pages)

    def _take(self, unit: str):
        if unit in self._resident:
            return self._resident[unit], None
        slot, buf = self._streamer.acquire(unit)
        try:
            return self._weights(unit, buf), slot
        except BaseException:
            self._streamer.release(slot)
            raise

    def iter_generate(self, input_ids, max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                      eos_token_id: int | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token ids [B] one step at a time (prefill first, then one decode step
        per token). Greedy unless ``do_sample``; sampling uses ``temperature``, ``top_k``,
        ``top_p`` and a generator seeded with ``seed``. Sequences that produced
        ``eos_token_id`` keep producing it."""
        ids = self._check_ids(input_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        if do_sample:
            if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
                raise ValueError(f"temperature: expected a float > 0, got {temperature!r}")
            if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
                raise ValueError(f"top_k: expected an int >= 1 or None, got {top_k!r}")
            if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
                raise ValueError(f"top_p: expected a float in (0, 1] or None, got {top_p!r}")
        if max_new_tokens == 0:
            return
        B, T = ids.shape
        cache = self.new_cache(B, T + max_new_tokens)
        gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        done = torch.zeros(B, dtype=torch.bool)
        x = ids
        for step in range(max_new_tokens):
            logits = self.forward(x, cache, last_only=True)[:, -1]
            nxt = self._pick(logits, do_sample, temperature, top_k, top_p, gen)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            yield nxt
            if eos_token_id is not None and bool(done.all()):
                return
            x = nxt.unsqueeze(1)

    def generate(self, input_ids, max_new_tokens: int, *, streamer: Callable | None = None, **kw) -> torch.Tensor:
        """``input_ids`` [B, T] followed by up to ``max_new_tokens`` generated ids: [B, T + n].

        ``streamer``: called with each step's new ids [B] as soon as it exists. Other keywords
        as :meth:`iter_generate`."""
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
            drop = p.cumsum(-1) - p > top_p  # keep the smallest prefix reaching top_p
            srt = srt.masked_fill(drop, -math.inf)
            z = torch.full_like(z, -math.inf).scatter(-1, idx, srt)
        return torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(-1)

    def close(self) -> None:
        """Stop the reader threads and free the buffers; the store's files stay."""
        if self._closed:
            return
        self._closed = True
        if self._streamer is not None:
            self._streamer.close()
            self._streamer = None
        self._resident.clear()
        self._bufs.clear()
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return (f"OffloadedModel({c.model_type}, {c.num_layers} layers, hidden {c.hidden_size}, "
                f"{len(self.placement.streamed())} units streamed, dtype {self.dtype})")


def load_model(path, *, budgets=None, weight_bits=None, kv_bits=None, device: str = "cpu", placement="auto",
               store_dir=None, group_size: int = 128, dtype=None, max_context: int | None = None,
               max_batch: int = 1, io_threads: int = 4, slots: int = 2, machine=None,
               disk_bandwidth: float | None = None, progress=None, kv_group_size: int = 32,
               kv_residual: int = 128) -> OffloadedModel:
    """Open an HF Llama / Mistral / Qwen2 checkpoint for decoding under memory budgets.

    Parameters
    ----------
    path : a checkpoint directory (``config.json`` + ``model.safetensors`` or a sharded index),
        or a store directory written by ``offload.convert``.
    budgets : {"cpu": bytes or "512MiB", "gpu": ...}: hard limits on what the manager holds
        (resident weights, streaming slots, KV cache, workspace). Missing "cpu": no limit.
    weight_bits : None (the checkpoint's dtype) or 1..4 (LUT-GEMV format, group ``group_size``).
    kv_bits : None (dense KV in the compute dtype) or 8 / 4 / 2 / "fp8" (``pk.QuantizedKVCache``).
    device : "cpu" ("cuda" raises NotImplementedError: the GPU tier is not written yet).
    placement : "auto", "disk" (stream every layer and the head), "memory" (all resident), or a
        ``Placement`` from :func:`offload.plan_placement`.
    store_dir : where the converted store lives (default under ``$XDG_CACHE_HOME/pykernels/offload``);
        conversion runs once, resumes after an interruption, and never writes into ``path``.
    dtype : compute dtype: the checkpoint's (None, or the same dtype; another one raises).
    max_context, max_batch : the KV reserved in the budget (default ``min(max_position_embeddings, 4096)``, 1).
    io_threads, slots : readers in flight, streaming buffers.
    machine, disk_bandwidth : for the placement's prediction (default: this machine's cached profile).

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
                                  "use device='cpu' (see README: what has run where)")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path!r} is not a directory")
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
        if k not in ("cpu", "gpu"):
            raise ValueError(f"budgets: unknown tier {k!r} (expected 'cpu' and/or 'gpu')")
        parse_bytes(v, f"budgets[{k!r}]")

    if _is_store(path):
        store = Store(path)
        if weight_bits is not None and store.weight_bits != weight_bits:
            raise ValueError(f"weight_bits: the store at {path!r} holds weight_bits={store.weight_bits}, "
                             f"got {weight_bits}")
    else:
        ckpt = Checkpoint(path)
        llama.LlamaConfig.from_hf(ckpt.config)  # unsupported architectures fail before converting
        sd = store_dir if store_dir is not None else default_store_dir(path, weight_bits, group_size)
        store = convert(ckpt, sd, weight_bits=weight_bits, group_size=group_size, progress=progress)
    try:
        cfg = llama.LlamaConfig.from_hf(store.config)
        stored = _DTYPES.get(store.units["layer.0"]["tensors"]["input_layernorm.weight"]["dtype"])
        if stored is None:
            raise ValueError(f"path: the store's norms are {store.units['layer.0']['tensors']['input_layernorm.weight']['dtype']}, "
                             f"expected one of {sorted(_DTYPES)}")
        if dtype is None:
            dtype = stored
        elif dtype != stored:
            raise ValueError(f"dtype: the store holds {stored} weights and computes in that dtype (no per-step "
                             f"conversion copies); got {dtype}. Convert a {dtype} checkpoint instead")
        if max_context is None:
            max_context = min(cfg.max_position_embeddings or 4096, 4096)
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
            raise ValueError(f"max_context: expected an int >= 1, got {max_context!r}")
        if isinstance(placement, Placement):
            plan = placement
        else:
            ub = {u: store.unit_nbytes(u) for u in store.unit_names()}
            plan = plan_placement(store.config, machine, budgets, batch=max_batch, context=max_context,
                                  weight_bits=store.weight_bits, kv_bits=kv_bits, device=device,
                                  unit_bytes=ub, slots=slots, page_bytes=store.manifest["page_bytes"],
                                  dtype_bytes=dtype.itemsize, disk_bandwidth=disk_bandwidth, mode=placement)
        return OffloadedModel(store, plan, dtype=dtype, kv_bits=kv_bits, io_threads=io_threads,
                              kv_group_size=kv_group_size, kv_residual=kv_residual)
    except BaseException:
        store.close()
        raise
