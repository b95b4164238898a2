"""``TieredKVCache``: a Llama-family KV cache across CPU memory and disk, for long contexts.

Tokens of each layer live in three places, newest first:

* the **window**: the most recent tokens in full precision (``dtype``), in memory;
* **CPU pages**: sealed pages of ``page_tokens`` tokens, in a preallocated pool of
  ``cpu_pages`` pages per layer;
* **disk pages**: older pages, one file each, written atomically (temporary name, then rename)
  with ``O_DIRECT`` and a crc32c kept in memory that every read checks.

A page is plain (K and V in ``dtype``) or quantized in a ``pk.QuantizedKVCache`` format
(``kv_bits`` 8 / 4 / 2 / "fp8", KIVI layout). Plain: the window holds the unsealed page and is
sealed when it reaches ``page_tokens``. Quantized: exactly as ``pk.QuantizedKVCache`` (so the
values held are identical to it, bit for bit): the window keeps the newest ``residual`` tokens
in full precision and every append quantizes the fewest whole groups that bring it back to that,
into an *open page* in the CPU pool, which is sealed when full. A sealed page goes to a free CPU
slot; when the pool is full its oldest page moves to disk first. A page never moves back.

Decode attention is exact over all tiers: the window and the CPU pages (and the open page) in
one kernel call (``pk.decode_attention`` on a paged view of the pool; quantized pages
dequantized in the kernel), the disk pages in chunks read by background threads into a ring of slots (the next
chunks, including the next layer's, are read while the current one computes), each chunk one
more kernel call; the partial ``(out, lse)`` are combined with ``pk.merge_states`` in float32.

The approximate mode (``approx=fraction``, opt-in) keeps each disk page's per-channel key
minimum and maximum in memory and reads, per layer and step, only the ``fraction`` of disk pages
with the largest upper bound of ``q . k`` (Quest's bound), the window and CPU pages always
exactly. ``stats`` counts the pages it skipped and, with ``approx_audit=N``, the cosine of the
approximate output to the exact one, computed every N layer-steps. Its reads start when the
layer's query exists (several in flight, but not overlapped with the previous layer as the exact
mode's are).

Memory the cache holds (``nbytes``) is fixed at construction: windows, the CPU pool, the read
slots, staging and scratch pages and the summaries of up to ``capacity`` tokens. Disk bytes are at most
``disk_bytes_max`` and are checked against ``disk_budget`` and the free space at construction,
and the free space again before every page write: a full disk is an error raised before
writing, never a partial page.
"""
from __future__ import annotations

import errno
import fcntl
import math
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

import pykernels as pk
from pykernels import kv_format
from pykernels.kv_cache import QuantizedKVCache

from .llama import QUERY_BLOCK, check_append
from .store import ALIGN, CorruptPageError, StoreError, _crc32c, _round_up, _write_atomic, aligned_buffer

__all__ = ["TieredKVCache", "page_layout", "page_bytes", "default_kv_dir", "remove_stale_dirs"]

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
#: free space left untouched on the disk when spilling pages (other writers, metadata)
DISK_RESERVE = 64 << 20


def page_layout(B: int, S: int, Hkv: int, D: int, kv_bits, gs: int, dtype: torch.dtype):
    """Byte layout of one block (S tokens of one sequence, K and V): ([(name, dtype, shape,
    offset)], block_bytes). A page is B blocks; ``block_bytes`` is a multiple of 4096 so pages
    and blocks stay O_DIRECT-aligned."""
    if kv_bits is None:
        fields = [("k", dtype, (S, Hkv, D)), ("v", dtype, (S, Hkv, D))]
    elif kv_bits == "fp8":
        rb = kv_format.row_bytes("fp8", D)
        fields = [("k_codes", torch.uint8, (Hkv, S, rb)), ("v_codes", torch.uint8, (Hkv, S, rb)),
                  ("k_scale", torch.float32, (Hkv, S // gs)), ("v_scale", torch.float32, (Hkv, S // gs))]
    else:
        rb, ng = kv_format.row_bytes(kv_bits, D), kv_format.num_value_groups(D, gs)
        fields = [("k_codes", torch.uint8, (Hkv, S, rb)), ("v_codes", torch.uint8, (Hkv, S, rb)),
                  ("k_scale", torch.float16, (Hkv, S // gs, D)), ("k_zero", torch.float16, (Hkv, S // gs, D)),
                  ("v_scale", torch.float16, (Hkv, S, ng)), ("v_zero", torch.float16, (Hkv, S, ng))]
    out, off = [], 0
    for name, dt, shape in fields:
        out.append((name, dt, shape, off))
        off = _round_up(off + math.prod(shape) * dt.itemsize, 64)
    return out, _round_up(off, ALIGN)


def page_bytes(batch: int, page_tokens: int, num_kv_heads: int, head_dim: int, kv_bits=None, group_size: int = 32,
               dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one page (``page_tokens`` tokens of ``batch`` sequences, K and V, one layer) as
    memory and disk hold it."""
    return batch * page_layout(batch, page_tokens, num_kv_heads, head_dim, kv_bits, group_size, dtype)[1]


def _max_pages(capacity: int, S: int, kv_bits, gs: int, residual: int) -> int:
    """Pages a layer seals at ``capacity``: plain, every whole page; quantized, the whole pages
    of the tokens quantized by then (KIVI: all but the last ``residual``, in whole groups)."""
    if kv_bits is None:
        return capacity // S
    return gs * -(-max(0, capacity - residual) // gs) // S


def default_chunk_pages(page_bytes: int, max_pages: int) -> int:
    """Pages per disk read of the ring by default: about 8 MiB, at most an eighth of a layer's
    pages (so a few slots hold less than a layer), at least one."""
    return max(1, min((8 << 20) // page_bytes, max_pages // 8))


def _views(buf: torch.Tensor, layout, nblocks: int) -> dict:
    """{field: tensor [nblocks, *shape]} over the uint8 tensor ``buf`` of ``nblocks`` blocks."""
    fields, bb = layout
    out = {}
    for name, dt, shape, off in fields:
        flat = buf.view(dt)
        st = [1]
        for s in reversed(shape[1:]):
            st.insert(0, st[0] * s)
        out[name] = flat.as_strided((nblocks, *shape), (bb // dt.itemsize, *st), off // dt.itemsize)
    return out


def default_kv_dir() -> str:
    """``$XDG_CACHE_HOME/pykernels/kv-pages`` (made if missing): page files on a real disk by
    default (a tmpfs /tmp would hold them in memory, outside every budget)."""
    from roofline.measure import pykernels_cache

    d = pykernels_cache("kv-pages")
    os.makedirs(d, exist_ok=True)
    return d


_PRIVATE = re.compile(r"^pk-kv-([A-Za-z0-9_]+)-(\d+)-[A-Za-z0-9_]+$")
_LOCK = ".lock"


def _host_tag() -> str:
    """This host's name as it appears in page directory names (letters, digits and _)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", os.uname().nodename)[:40] or "host"


def _make_private_dir(parent: str) -> tuple[str, int]:
    """A new page directory ``pk-kv-<host>-<pid>-*`` under ``parent`` holding ``.lock``, locked
    (flock) by this process for the directory's life -> (path, lock fd). The lock is taken on a
    temporary name and renamed into place, so no other process ever sees an unlocked ``.lock``."""
    d = tempfile.mkdtemp(prefix=f"pk-kv-{_host_tag()}-{os.getpid()}-", dir=parent)
    tmp = os.path.join(d, ".lock-new")
    fd = os.open(tmp, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, os.path.join(d, _LOCK))
    except BaseException:
        os.close(fd)
        shutil.rmtree(d, ignore_errors=True)
        raise
    return d, fd


def remove_stale_dirs(parent: str) -> list[str]:
    """Delete the page directories under ``parent`` left by caches whose process died without
    closing them (killed, crashed) -> the directories removed. A directory is stale when it is
    this user's, was made on this host, and its ``.lock`` can be locked: the owning process holds
    that lock (flock) for as long as it lives, whatever its pid namespace. Directories without a
    lock file, of another host (a shared NFS cache) or another user are never touched."""
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    host = _host_tag()
    for name in names:
        m = _PRIVATE.match(name)
        if not m or m.group(1) != host:
            continue
        path = os.path.join(parent, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            fd = os.open(os.path.join(path, _LOCK), os.O_RDWR)
        except OSError:
            continue  # no lock file (being made, or not ours) or unreadable: leave it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # locked: its process is alive
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _disk_free(path: str) -> int:
    """Bytes free to this user on the filesystem of ``path`` (patched in tests)."""
    return shutil.disk_usage(path).free


class _Reader:
    """Reads disk pages into a ring of slots with a thread pool, in a fixed cyclic order
    (``schedule``: (layer, page ids) chunks of every layer), keeping every slot busy ahead of
    the consumer, so the next chunks (the next layer's too) are read while one computes."""

    def __init__(self, pages: list, page_bytes: int, nslots: int, slot_bytes: int, io_threads: int):
        self.pages, self.page_bytes = pages, page_bytes  # the cache's page records (no reference to it)
        self.slot_bytes = slot_bytes
        self.bufs = [aligned_buffer(slot_bytes) for _ in range(nslots)]
        self.tensors = [torch.frombuffer(b, dtype=torch.uint8) for b in self.bufs]
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="pk-kv-read")
        self.free = deque(range(nslots))
        self.inflight = deque()  # (schedule index | None, slot, futures, pages)
        self.schedule: list = []
        self.first: dict = {}  # layer -> index of its first chunk in the schedule
        self.next = 0
        self.lock = threading.Lock()
        self.busy_s = 0.0
        self.stall_s = 0.0
        self.bytes = 0
        self.direct = True

    def read_page(self, path: str, mv: memoryview, crc: int) -> None:
        """Fill mv from the page file at ``path`` and check its crc32c (any thread)."""
        t0 = time.perf_counter()
        fd = None
        try:
            fd = self._open(path)
            got, n = 0, len(mv)
            while got < n:
                try:
                    k = os.preadv(fd, [mv[got:]], got)
                except OSError as e:
                    if e.errno != errno.EINVAL or not self.direct:
                        raise
                    self.direct = False  # O_DIRECT accepted at open, refused at read: buffered
                    os.close(fd)
                    fd = self._open(path)
                    continue
                if k == 0:
                    raise StoreError(f"{path}: short read: {got} of {n} bytes (page file truncated)")
                got += k
            if not self.direct:
                os.posix_fadvise(fd, 0, n, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"{path}: read failed: {e}") from e
        finally:
            if fd is not None:
                os.close(fd)
        got_crc = _crc32c.crc32c(mv)
        if got_crc != crc:
            raise CorruptPageError(path, 0, crc, got_crc)
        with self.lock:
            self.busy_s += time.perf_counter() - t0
            self.bytes += len(mv)

    def _open(self, path: str) -> int:
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        try:
            if self.direct:
                try:
                    return os.open(path, flags | os.O_DIRECT)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self.direct = False  # filesystem without O_DIRECT: buffered + DONTNEED
            return os.open(path, flags)
        except FileNotFoundError:
            raise StoreError(f"{path}: KV page file is missing") from None

    def _submit(self, idx, pages):
        slot = self.free.popleft()
        pb = self.page_bytes
        futs = []
        for j, (layer, p) in enumerate(pages):
            rec = self.pages[layer][p]
            futs.append(self.pool.submit(self.read_page, rec["path"], self.bufs[slot][j * pb:(j + 1) * pb], rec["crc"]))
        self.inflight.append((idx, slot, futs, pages))

    def _fill(self):
        while self.free and self.schedule:
            i = self.next % len(self.schedule)
            self.next = i + 1
            self._submit(i, self.schedule[i][1])

    def _wait(self, futs):
        err = None
        for f in futs:
            try:
                f.result()
            except BaseException as e:  # every read of the slot must end before it is reused
                err = err or e
        return err

    def drain(self):
        while self.inflight:
            _, slot, futs, _ = self.inflight.popleft()
            self._wait(futs)
            self.free.append(slot)

    def set_schedule(self, schedule: list):
        """Replace the cyclic order (after pages moved to disk); waits for reads in flight."""
        self.drain()
        self.schedule = schedule
        self.first = {}
        for i, (layer, _) in enumerate(schedule):
            self.first.setdefault(layer, i)
        self.next = 0

    def chunks(self, layer: int, items=None):
        """Yield (slot tensor, pages) for each chunk of ``layer``, in order: the scheduled
        ones (``items`` None), or the given list of page-id chunks (read now, several in
        flight). The consumer must finish with a slot before asking for the next."""
        if items is None:
            start = self.first.get(layer)
            if start is None:
                return
            if not self.inflight or self.inflight[0][0] != start:
                self.drain()  # out of order (a failed step, a prefill): restart at this layer
                self.next = start
            self._fill()
            count = sum(1 for lay, _ in self.schedule if lay == layer)
        else:
            self.drain()
            queue = deque(items)
            count = len(items)
        for _ in range(count):
            if items is not None:
                while self.free and queue:
                    self._submit(None, queue.popleft())
            idx, slot, futs, pages = self.inflight.popleft()
            t0 = time.perf_counter()
            err = self._wait(futs)
            self.stall_s += time.perf_counter() - t0
            try:
                if err is not None:
                    raise err
                yield self.tensors[slot], pages
            finally:
                self.free.append(slot)
                if items is None:
                    self._fill()

    def close(self):
        if threading.current_thread().name.startswith("pk-kv-read"):
            # collected on one of our own threads: it cannot wait for itself
            self.pool.shutdown(wait=False, cancel_futures=True)
            return
        self.drain()
        self.pool.shutdown(wait=True)


class TieredKVCache:
    """Per-layer K and V of ``batch`` sequences that advance together, across CPU memory and disk.

    Same protocol as ``offload.llama.KVCache`` (``prefill_attend`` / ``decode_attend`` per layer,
    then ``advance``), so ``offload.llama.layer_forward`` and ``OffloadedModel`` use either.

    Parameters
    ----------
    cfg : offload.llama.LlamaConfig.
    batch, capacity : sequences and most tokens one sequence may hold.
    dtype : full-precision dtype of the window (and of plain pages).
    kv_bits : None (plain pages in ``dtype``) or 8 / 4 / 2 / "fp8" (``pk.QuantizedKVCache``
        formats; ``group_size`` 32 / 64 / 128).
    residual : the full-precision window of quantized pages (``pk.QuantizedKVCache``'s
        ``residual``; default 128, a multiple of ``group_size``); 0 for plain pages.
    page_tokens : tokens per page (a multiple of ``group_size`` for quantized pages).
    cpu_pages : pages per layer held in memory (None: enough for ``capacity``: nothing spills).
    disk_dir : where a private directory of page files (``pk-kv-<pid>-*``) is made (default
        ``default_kv_dir()``: ``$XDG_CACHE_HOME/pykernels/kv-pages``, on disk, not a RAM-backed
        /tmp); removed by ``close`` (or when the cache is garbage-collected). Directories left
        there by processes that died are removed when a new cache is built there.
    disk_budget : most bytes of page files (None: no limit besides the free space).
    slots, chunk_pages, io_threads : the disk read ring: ``slots`` buffers of ``chunk_pages``
        pages, read by ``io_threads`` threads (default: about 8 MiB, at most an eighth of a
        layer's pages).
    approx : None (exact) or a fraction in (0, 1]: read only that share of each layer's disk
        pages per decode step, chosen by their key bounds (see the module docstring).
    approx_audit : with ``approx``, every this many approximate layer-steps also compute the
        exact output (reading every disk page once more) and record the cosine between the two
        in ``stats`` (``approx_audits``, ``approx_cosine_min``, ``approx_cosine_last``); 0: never.
    max_append : most tokens one call appends (the window holds ``page_tokens + residual +
        max_append``); default 64; ``OffloadedModel`` passes its ``placement.prefill_chunk``;
        at most ``page_tokens``.

    Attributes
    ----------
    length, capacity, batch, nbytes (memory held), disk_bytes (page files now),
    disk_bytes_max (at ``capacity``), page_bytes, stats (counters: ``cpu_bytes`` and
    ``disk_bytes`` attended, ``stall_s`` waiting for reads, ``read_busy_s``, ``pages_read``,
    ``pages_skipped`` by the approximate mode).
    """

    def __init__(self, cfg, batch: int, capacity: int, *, dtype=torch.bfloat16, kv_bits=None, group_size: int = 32,
                 residual: int | None = None, page_tokens: int = 1024, cpu_pages: int | None = None,
                 disk_dir=None, disk_budget: int | None = None, slots: int = 4, chunk_pages: int | None = None,
                 io_threads: int = 4, approx: float | None = None, max_append: int = 64,
                 approx_audit: int = 0):
        def pos_int(name, v, lo=1):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")

        pos_int("batch", batch)
        pos_int("capacity", capacity)
        pos_int("page_tokens", page_tokens, 16)
        pos_int("slots", slots, 2)
        pos_int("io_threads", io_threads)
        pos_int("max_append", max_append)
        pos_int("approx_audit", approx_audit, 0)
        if dtype not in _FLOAT:
            raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype!r}")
        Hkv, D = cfg.num_kv_heads, cfg.head_dim
        if kv_bits is not None:
            kv_format.check_format(kv_bits, group_size, D)
            if page_tokens % group_size:
                raise ValueError(f"page_tokens: expected a multiple of group_size={group_size}, got {page_tokens}")
        if residual is None:
            residual = 0 if kv_bits is None else 128
        pos_int("residual", residual, 0)
        if kv_bits is not None and (residual < group_size or residual % group_size):
            raise ValueError(f"residual: expected a positive multiple of group_size={group_size}, got {residual}")
        if kv_bits is None and residual:
            raise ValueError(f"residual: plain pages keep every token in full precision; expected 0, got {residual}")
        if approx is not None and (isinstance(approx, bool) or not isinstance(approx, (int, float))
                                   or not 0 < approx <= 1):
            raise ValueError(f"approx: expected None or a fraction in (0, 1], got {approx!r}")
        self.cfg, self.batch, self.capacity, self.dtype = cfg, batch, capacity, dtype
        self.kv_bits, self.group_size, self.residual, self.page_tokens = kv_bits, group_size, residual, page_tokens
        self.approx = None if approx is None else float(approx)
        self.approx_audit = approx_audit
        self._approx_steps = 0
        self._audit_cos: list[float] = []
        S, L = page_tokens, cfg.num_layers
        self.max_pages = _max_pages(capacity, S, kv_bits, group_size, residual)  # sealed at capacity
        self.cpu_pages = self.max_pages if cpu_pages is None else cpu_pages
        pos_int("cpu_pages", self.cpu_pages, 0)
        self.cpu_pages = min(self.cpu_pages, self.max_pages)
        self._layout = page_layout(batch, S, Hkv, D, kv_bits, group_size, dtype)
        self.page_bytes = batch * self._layout[1]
        self.disk_bytes_max = L * (self.max_pages - self.cpu_pages) * self.page_bytes
        if disk_budget is not None:
            pos_int("disk_budget", disk_budget, 0)
            if self.disk_bytes_max > disk_budget:
                raise ValueError(f"disk_budget: {disk_budget} bytes, but {self.max_pages - self.cpu_pages} pages per "
                                 f"layer x {L} layers x {self.page_bytes} bytes = {self.disk_bytes_max} bytes spill to "
                                 f"disk at capacity {capacity}")
        self.disk_budget = disk_budget
        self._dirbox = [None, None]  # the private page directory and its lock fd, shared with the finalizer
        if disk_dir is not None and not isinstance(disk_dir, (str, os.PathLike)):
            raise TypeError(f"disk_dir: expected a directory path (str or os.PathLike), got {type(disk_dir).__name__}")
        if disk_dir is not None and not isinstance(os.fspath(disk_dir), str):
            raise TypeError(f"disk_dir: expected a str path, got {os.fspath(disk_dir)!r}")
        if self.disk_bytes_max:
            parent = os.fspath(disk_dir) if disk_dir is not None else default_kv_dir()
            if not os.path.isdir(parent):
                raise FileNotFoundError(f"disk_dir: {parent!r} is not a directory")
            free = _disk_free(parent)
            if self.disk_bytes_max + DISK_RESERVE > free:
                raise StoreError(f"disk_dir: {parent} has {free / 2**20:.0f} MiB free; the KV pages need "
                                 f"{self.disk_bytes_max / 2**20:.0f} MiB (+{DISK_RESERVE >> 20} MiB reserve) at "
                                 f"capacity {capacity}")
            self._parent = parent  # the private directory is made at the first spill
            remove_stale_dirs(parent)
        # memory: windows, CPU pool, staging page, summaries, read slots
        self.max_append = min(max_append, S)
        # plain: the window holds the unsealed page (< S) + one append; quantized: at most
        # `residual` after an append (KIVI), + the append being quantized
        self._win_cap = (S if kv_bits is None else residual) + self.max_append
        quant = kv_bits is not None
        pool_slots = self.cpu_pages + quant  # quantized: one more, the open page being filled
        with torch.inference_mode(False):
            self._win_k = torch.zeros(L, batch, self._win_cap, Hkv, D, dtype=dtype)
            self._win_v = torch.zeros_like(self._win_k)
            self._pool_mem = [aligned_buffer(pool_slots * self.page_bytes) if pool_slots else None for _ in range(L)]
            self._pool = [None if m is None else _views(torch.frombuffer(m, dtype=torch.uint8), self._layout,
                                                        pool_slots * batch) for m in self._pool_mem]
            self._stage_mem = aligned_buffer(self.page_bytes)
            self._stage = _views(torch.frombuffer(self._stage_mem, dtype=torch.uint8), self._layout, batch)
            self._kmin = torch.zeros(L, self.max_pages + 1, batch, Hkv, D, dtype=torch.float32)
            self._kmax = torch.zeros_like(self._kmin)
        if chunk_pages is None:
            chunk_pages = default_chunk_pages(self.page_bytes, self.max_pages)
        pos_int("chunk_pages", chunk_pages)
        self.chunk_pages = chunk_pages
        self._pages: list[list[dict]] = [[] for _ in range(L)]  # per layer, oldest first
        self._reader = (_Reader(self._pages, self.page_bytes, slots, chunk_pages * self.page_bytes, io_threads)
                        if self.disk_bytes_max else None)
        # a page read outside the ring (prefill, dequantize)
        self._scratch_mem = aligned_buffer(self.page_bytes) if self._reader is not None else None
        self._cpu_free = [list(range(self.cpu_pages)) for _ in range(L)]
        self._open_slot = [self.cpu_pages] * L  # quantized: the pool slot of the open page
        self._open_n = [0] * L                  # and its quantized tokens
        self._win_n = [0] * L
        self.length = 0
        self._pending = [0] * L
        self._broken = None
        self.disk_bytes = 0
        self._stale = False
        self._cpu_attended = 0
        self._disk_attended = 0
        self._skipped = 0
        self._read_pages = 0
        self._tables: dict = {}
        self._dummy_fp = torch.zeros(batch, 1, Hkv, D, dtype=dtype)
        self._zero = torch.zeros(batch, dtype=torch.int32)
        self._finalizer = weakref.finalize(self, _cleanup, self._reader, self._dirbox)

    # ------------------------------------------------------------------ introspection
    @property
    def nbytes(self) -> int:
        """Memory the cache holds (fixed at construction): windows, CPU pool, staging and
        scratch pages, read slots and key summaries (``memory_bytes`` of its arguments)."""
        n = 2 * self._win_k.numel() * self._win_k.element_size()
        n += sum(len(m) for m in self._pool_mem if m is not None) + len(self._stage_mem)
        n += 2 * self._kmin.numel() * 4
        if self._reader is not None:
            n += len(self._reader.bufs) * self._reader.slot_bytes + len(self._scratch_mem)
        return n

    @staticmethod
    def memory_bytes(num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int, *, kv_bits=None,
                     group_size: int = 32, residual: int | None = None, page_tokens: int = 1024,
                     cpu_pages: int | None = None, slots: int = 4, chunk_pages: int | None = None,
                     dtype: torch.dtype = torch.bfloat16, max_append: int = 64) -> dict:
        """What a cache built with these arguments holds, computed without building it:
        {"memory": its ``nbytes``, "disk": its ``disk_bytes_max``, "page_bytes", "max_pages",
        "cpu_pages", "chunk_pages"} (for budgets)."""
        R = (0 if kv_bits is None else 128) if residual is None else residual
        S, L, B = page_tokens, num_layers, batch
        pb = page_bytes(B, S, num_kv_heads, head_dim, kv_bits, group_size, dtype)
        max_pages = _max_pages(capacity, S, kv_bits, group_size, R)
        cp = max_pages if cpu_pages is None else min(cpu_pages, max_pages)
        cp_ = default_chunk_pages(pb, max_pages) if chunk_pages is None else chunk_pages
        win = (S if kv_bits is None else R) + min(max_append, S)
        mem = 2 * L * B * win * num_kv_heads * head_dim * dtype.itemsize
        mem += L * (cp + (kv_bits is not None)) * pb + pb + 2 * L * (max_pages + 1) * B * num_kv_heads * head_dim * 4
        disk = L * (max_pages - cp) * pb
        if disk:
            mem += slots * cp_ * pb + pb
        return {"memory": mem, "disk": disk, "page_bytes": pb, "max_pages": max_pages, "cpu_pages": cp,
                "chunk_pages": cp_}

    @property
    def directory(self) -> str | None:
        """The private directory of this cache's page files (None before the first spill)."""
        return self._dirbox[0]

    @property
    def stats(self) -> dict:
        r = self._reader
        return {"cpu_bytes": self._cpu_attended, "disk_bytes": self._disk_attended, "stall_s": r.stall_s if r else 0.0,
                "read_busy_s": r.busy_s if r else 0.0, "read_bytes": r.bytes if r else 0,
                "pages_read": self._read_pages, "pages_skipped": self._skipped,
                "approx_audits": len(self._audit_cos),
                "approx_cosine_min": min(self._audit_cos) if self._audit_cos else None,
                "approx_cosine_last": self._audit_cos[-1] if self._audit_cos else None,
                "read_mode": None if r is None else ("direct" if r.direct else "buffered")}

    def _check_layer(self, layer) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.cfg.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.cfg.num_layers}), got {layer!r}")

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("TieredKVCache: closed")
        if self._broken:
            raise RuntimeError(self._broken)

    def tier_tokens(self, layer: int = 0) -> dict:
        """Tokens of ``layer`` per tier: {"window", "cpu", "disk"} (committed and pending)."""
        self._check_layer(layer)
        pages = self._pages[layer]
        nd = sum(1 for p in pages if p["tier"] == "disk")
        S = self.page_tokens
        return {"window": self._win_n[layer] + self._plain_pending(layer),
                "cpu": (len(pages) - nd) * S + self._open_n[layer], "disk": nd * S}

    def _plain_pending(self, layer) -> int:
        """Tokens appended to ``layer`` in this forward that sit in the window uncommitted
        (plain pages; a quantized append updates the window at once, as pk.QuantizedKVCache)."""
        return self._pending[layer] if self.kv_bits is None else 0

    def __repr__(self):
        t = self.tier_tokens(0)
        return (f"TieredKVCache(kv_bits={self.kv_bits!r}, batch={self.batch}, capacity={self.capacity}, "
                f"length={self.length}, page_tokens={self.page_tokens}, tokens per tier {t}, "
                f"nbytes={self.nbytes}, disk_bytes={self.disk_bytes}, approx={self.approx})")

    # ------------------------------------------------------------------ appends
    def _reserve(self, layer, q, k, v, T_expected=None, need_q=True):
        self._check_open()
        for name, t in (("q", q), ("k", k), ("v", v)):
            if name == "q" and not need_q:
                continue  # append(): no query
            if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT or t.device.type != "cpu":
                raise TypeError(f"{name}: expected a float32 / float16 / bfloat16 tensor on the CPU, got "
                                f"{getattr(t, 'dtype', type(t).__name__)} on {getattr(t, 'device', '-')}")
        T = check_append(self, layer, q, k, v, T_expected)
        if T > self.max_append:
            raise ValueError(f"k: at most max_append={self.max_append} tokens per call, got {T} (split the chunk)")
        if self._win_n[layer] + T > self._win_cap:
            raise RuntimeError(f"the full-precision window of layer {layer} is full ({self._win_n[layer]} tokens): "
                               f"an earlier page spill failed; free disk space and call advance(0)")
        if self.kv_bits is None:
            if self._reader is not None and not any(self._pending):
                # advance(T) will seal pages in every layer, and pages that find no free CPU slot
                # spill to disk: check the room for all of them before the first layer appends,
                # so a full disk fails the forward with nothing committed (a retry is safe)
                S, need = self.page_tokens, 0
                for i in range(self.cfg.num_layers):
                    seals = (self._win_n[i] + T) // S
                    need += seals if self.cpu_pages == 0 else max(0, seals - len(self._cpu_free[i]))
                if need:
                    self._check_disk(need * self.page_bytes)
            n0 = self._win_n[layer]
            self._win_k[layer, :, n0:n0 + T] = k
            self._win_v[layer, :, n0:n0 + T] = v
        else:
            kd, vd = k.detach().to(self.dtype), v.detach().to(self.dtype)
            for name, x in (("k", kd), ("v", vd)):  # what pk.QuantizedKVCache rejects too
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(f"{name}: non-finite values cannot be quantized")
                if self.kv_bits != "fp8" and float(x.abs().max()) > 65504:
                    raise ValueError(f"{name}: |value| > 65504 exceeds the float16 scales and zeros")
            self._append_quantized(layer, kd, vd, T)
        self._pending[layer] = T
        return T

    @torch.no_grad()
    def append(self, layer: int, k, v) -> None:
        """Append k, v [B, T, Hkv, D] (T <= max_append) to ``layer`` without attending (loading
        a precomputed cache); ``advance(T)`` after every layer, as in a forward."""
        self._reserve(layer, None, k, v, need_q=False)

    def discard_pending(self) -> None:
        """Forget what layers appended since the last ``advance`` (a forward that failed part
        way). Plain pages: the window rows are just ignored. Quantized: an append has already
        quantized groups (as pk.QuantizedKVCache does) and cannot be undone, so the cache is
        marked unusable and every later call raises (never silently misaligned)."""
        if any(self._pending) and self.kv_bits is not None:
            self._broken = ("the cache is unusable: a forward failed after some layers appended to the "
                            "quantized cache, which cannot roll back; start a new cache")
        self._pending = [0] * self.cfg.num_layers

    def advance(self, T: int) -> None:
        """Commit the T tokens every layer has appended; plain pages: then seal full pages
        (moving the oldest CPU pages to disk when the pool is full). A failed page write (disk
        full) raises StoreError with the tokens committed and nothing lost: the window keeps
        them and the next ``advance`` retries. (Quantized pages seal during the append: the
        first layer's append checks the room for every layer's page and raises before changing
        anything; a write failing at a later layer leaves the forward failed and the cache
        unusable, as any failed forward on a quantized cache.)"""
        if not self._finalizer.alive:
            raise RuntimeError("TieredKVCache: closed")
        if isinstance(T, bool) or not isinstance(T, int) or T < 0:
            raise ValueError(f"T: expected an int >= 0, got {T!r}")
        bad = [i for i, p in enumerate(self._pending) if p != T]
        if bad:
            raise ValueError(f"T: advance({T}) but layer {bad[0]} appended {self._pending[bad[0]]} tokens in this "
                             "forward (every layer must append the same T tokens first)")
        self.length += T
        self._pending = [0] * self.cfg.num_layers
        if self.kv_bits is not None:
            return  # quantized appends already placed their tokens
        for i in range(self.cfg.num_layers):
            self._win_n[i] += T
        try:
            for i in range(self.cfg.num_layers):
                while self._win_n[i] >= self.page_tokens + self.residual:
                    self._seal(i)
        except StoreError as e:  # the disk filled up since the forward's check
            raise StoreError(f"{e}. The {T} tokens of this forward ARE committed (length {self.length}): do not "
                             f"append them again; the page is written at the next advance() once there is "
                             f"room (advance(0) retries)") from e

    # ------------------------------------------------------------------ pages
    def _write_fields(self, views, slot, start, f, a, b):
        """Quantized fields f (token axis 2, [B, Hkv, n, ...]) tokens a..b -> block ``slot`` of
        ``views`` from token ``start`` (all multiples of group_size)."""
        B, gs = self.batch, self.group_size
        per_group = {"k_scale", "k_zero"} | ({"v_scale"} if self.kv_bits == "fp8" else set())
        for name, t in f.items():
            if t is None:
                continue
            d = gs if name in per_group else 1
            views[name][slot * B:(slot + 1) * B, :, start // d:(start + b - a) // d] = t[:, :, a // d:b // d]

    def _append_quantized(self, layer, kd, vd, T):
        """Append T tokens as pk.QuantizedKVCache does: into the window, then the fewest whole
        groups that bring it back to ``residual`` tokens are quantized into the open page; a
        full open page is sealed (to a free CPU slot; else the oldest CPU page moves to disk
        first, or, with no CPU pool, the page itself). The disk write comes first: when it
        fails nothing has changed. ``kd``, ``vd``: the new tokens in ``dtype``."""
        S, gs, R, B = self.page_tokens, self.group_size, self.residual, self.batch
        n0 = self._win_n[layer]
        W = n0 + T
        nq = gs * max(0, -(-(W - R) // gs))
        if not nq:
            self._win_k[layer, :, n0:W] = kd
            self._win_v[layer, :, n0:W] = vd
            self._win_n[layer] = W
            return
        Wk = torch.cat((self._win_k[layer, :, :n0], kd), 1)
        Wv = torch.cat((self._win_v[layer, :, :n0], vd), 1)
        f = kv_format.quantize_kv(Wk[:, :nq].transpose(1, 2), Wv[:, :nq].transpose(1, 2), self.kv_bits, gs)
        kf = Wk[:, :nq].float()
        pool, o, slot = self._pool[layer], self._open_n[layer], self._open_slot[layer]
        c1 = min(nq, S - o)
        idx = len(self._pages[layer])
        seal, rec, freed = o + nq >= S, None, None
        if seal:
            if idx >= self.max_pages:
                raise RuntimeError(f"layer {layer}: more than {self.max_pages} pages (capacity {self.capacity})")
            spills = self.cpu_pages == 0 or not self._cpu_free[layer]
            if spills and not any(self._pending):
                # every layer seals (and spills) in this same forward: check room for all of
                # them before the first layer changes anything, so a full disk leaves the cache
                # usable (a later layer can still fail if another process fills the disk meanwhile)
                self._check_disk(self.cfg.num_layers * self.page_bytes)
            if self.cpu_pages == 0:  # the page goes straight to disk, from the staging page
                for name, t in self._stage.items():
                    t.copy_(pool[name][slot * B:(slot + 1) * B])
                self._write_fields(self._stage, 0, o, f, 0, c1)
                rec = {"index": idx}
                self._spill(layer, rec, self._stage_mem)
            elif not self._cpu_free[layer]:  # the pool is full: its oldest page goes to disk first
                old = next(p for p in self._pages[layer] if p["tier"] == "cpu")
                freed = old["slot"]
                self._spill(layer, old, self._pool_mem[layer][freed * self.page_bytes:(freed + 1) * self.page_bytes])
        # nothing below needs the disk
        self._write_fields(pool, slot, o, f, 0, c1)
        self._summarize(layer, idx, kf[:, :c1], first=o == 0)
        if seal:
            if rec is None:
                rec = {"index": idx, "tier": "cpu", "slot": slot}
                slot = freed if freed is not None else self._cpu_free[layer].pop(0)
            self._pages[layer].append(rec)
            rest = nq - c1
            if rest:
                self._write_fields(pool, slot, 0, f, c1, nq)
                self._summarize(layer, idx + 1, kf[:, c1:], first=True)
            self._open_slot[layer], self._open_n[layer] = slot, rest
        else:
            self._open_n[layer] = o + nq
        keep = W - nq
        self._win_k[layer, :, :keep] = Wk[:, nq:]
        self._win_v[layer, :, :keep] = Wv[:, nq:]
        self._win_n[layer] = keep

    def _summarize(self, layer, idx, kf, first):
        """Fold keys kf [B, n, Hkv, D] into page ``idx``'s per-channel min / max."""
        lo, hi = kf.amin(1), kf.amax(1)
        if first:
            self._kmin[layer, idx], self._kmax[layer, idx] = lo, hi
        else:
            torch.minimum(self._kmin[layer, idx], lo, out=self._kmin[layer, idx])
            torch.maximum(self._kmax[layer, idx], hi, out=self._kmax[layer, idx])

    def _seal(self, layer: int) -> None:
        """Plain pages: turn the oldest ``page_tokens`` of the window into a page (a page
        written to disk marks the reader's schedule stale, in ``_spill``)."""
        S, B = self.page_tokens, self.batch
        kp, vp = self._win_k[layer, :, :S], self._win_v[layer, :, :S]
        idx = len(self._pages[layer])
        if idx >= self.max_pages:
            raise RuntimeError(f"layer {layer}: more than {self.max_pages} pages (capacity {self.capacity})")
        free = self._cpu_free[layer]
        if free:
            slot = free.pop(0)
        elif self.cpu_pages:  # the pool is full: its oldest page goes to disk first
            old = next(p for p in self._pages[layer] if p["tier"] == "cpu")
            slot = old["slot"]
            mv = self._pool_mem[layer][slot * self.page_bytes:(slot + 1) * self.page_bytes]
            self._spill(layer, old, mv)
        else:
            slot = None
        rec = {"index": idx}
        if slot is None:  # no CPU pool: to disk from the staging page
            self._stage["k"].copy_(kp)
            self._stage["v"].copy_(vp)
            self._spill(layer, rec, self._stage_mem)
        else:
            pool = self._pool[layer]
            pool["k"][slot * B:(slot + 1) * B].copy_(kp)
            pool["v"][slot * B:(slot + 1) * B].copy_(vp)
            rec.update(tier="cpu", slot=slot)
        self._summarize(layer, idx, kp.float(), first=True)
        self._pages[layer].append(rec)
        n = self._win_n[layer] - S
        self._win_k[layer, :, :n] = self._win_k[layer, :, S:S + n].clone()
        self._win_v[layer, :, :n] = self._win_v[layer, :, S:S + n].clone()
        self._win_n[layer] = n

    def _check_disk(self, n: int) -> None:
        """StoreError, before anything is written, when ``n`` more bytes of pages would exceed
        the disk budget or the free space (less ``DISK_RESERVE``)."""
        if self.disk_budget is not None and self.disk_bytes + n > self.disk_budget:
            raise StoreError(f"disk_budget: {self.disk_bytes + n} bytes of KV pages would exceed {self.disk_budget}; "
                             "nothing was written")
        free = _disk_free(self._parent)
        if free < n + DISK_RESERVE:
            raise StoreError(f"{self._parent}: {free / 2**20:.0f} MiB free, KV pages need {n / 2**20:.1f} MiB "
                             f"(+{DISK_RESERVE >> 20} MiB reserve); nothing was written")

    def _spill(self, layer: int, rec: dict, mv: memoryview) -> None:
        """Write page ``rec`` (bytes ``mv``) to its file atomically; on success ``rec`` becomes a
        disk page. Raises StoreError before writing when the disk budget or free space is short."""
        n = len(mv)
        self._check_disk(n)
        if self._dirbox[0] is None:
            self._dirbox[0], self._dirbox[1] = _make_private_dir(self._parent)
        d = os.path.join(self._dirbox[0], f"layer{layer}")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"page{rec['index']:06d}.kv")
        crc = _crc32c.crc32c(mv)
        # O_DIRECT (no page cache: later reads are cold), not fsynced: the pages die with the
        # process; the checksum catches a torn page, the rename a half-written one
        self._reader.direct = _write_atomic(path, mv, direct=self._reader.direct, durable=False)
        rec.pop("slot", None)  # a CPU page's slot: reused by the caller
        rec.update(tier="disk", path=path, crc=crc)
        self.disk_bytes += n
        self._stale = True  # the reader's schedule lacks this page: rebuilt before the next read

    def _fresh_schedule(self):
        """Rebuild the reader's schedule if a page went to disk since it was made."""
        if self._stale:
            self._reschedule()

    def _reschedule(self):
        """The reader's cyclic order: every layer's disk pages in chunks of ``chunk_pages``."""
        self._stale = False
        sched = []
        for layer, pages in enumerate(self._pages):
            disk = [(layer, p["index"]) for p in pages if p["tier"] == "disk"]
            for s in range(0, len(disk), self.chunk_pages):
                sched.append((layer, disk[s:s + self.chunk_pages]))
        if self._reader is not None:
            self._reader.set_schedule([] if self.approx is not None else sched)

    def set_approx(self, approx: float | None) -> None:
        """Switch the approximate mode (None: exact; a fraction in (0, 1]) between steps."""
        if approx is not None and (isinstance(approx, bool) or not isinstance(approx, (int, float))
                                   or not 0 < approx <= 1):
            raise ValueError(f"approx: expected None or a fraction in (0, 1], got {approx!r}")
        if any(self._pending):
            raise RuntimeError("set_approx: a forward is in progress (call advance first)")
        self.approx = None if approx is None else float(approx)
        self._reschedule()

    def _disk_pages(self, layer):
        return [p["index"] for p in self._pages[layer] if p["tier"] == "disk"]

    def _cpu_table(self, layer):
        """(block table int32 [B, n], n sealed pages) of the CPU pages of ``layer``, in order;
        quantized: then the open page (partly filled: the kernel's paged view ends in it)."""
        slots = [p["slot"] for p in self._pages[layer] if p["tier"] == "cpu"]
        n = len(slots)
        if self.kv_bits is not None:
            slots.append(self._open_slot[layer])
        B = self.batch
        key = (layer, tuple(slots))
        t = self._tables.get(key)
        if t is None:
            if len(self._tables) > 4 * self.cfg.num_layers:
                self._tables.clear()
            t = self._tables[key] = torch.tensor([[s * B + b for s in slots] or [0] for b in range(B)], dtype=torch.int32)
        return t, n

    def _chunk_table(self, n):
        B = self.batch
        key = ("chunk", n)
        t = self._tables.get(key)
        if t is None:
            t = self._tables[key] = torch.tensor([[j * B + b for j in range(n)] for b in range(B)], dtype=torch.int32)
        return t

    # ------------------------------------------------------------------ attention
    def _attend_pages(self, qf, views, table, npages, fp_k=None, fp_v=None, n_fp=0, extra=0):
        """(out, lse) of qf [B, Hq, D] float32 over ``npages`` pages of ``views`` (block ids in
        ``table``), then ``extra`` quantized tokens of the next block, and, for quantized pages,
        ``n_fp`` full-precision rows of fp_k/fp_v."""
        B, S = self.batch, self.page_tokens
        if self.kv_bits is None:
            sl = torch.full((B,), npages * S, dtype=torch.int32)
            return pk.decode_attention(qf, views["k"], views["v"], sl, block_table=table, return_lse=True)
        n_q = torch.full((B,), npages * S + extra, dtype=torch.int32)
        n_r = torch.full((B,), n_fp, dtype=torch.int32)
        c = QuantizedKVCache.from_tensors(
            views["k_codes"], views["k_scale"], views.get("k_zero"), views["v_codes"], views["v_scale"],
            views.get("v_zero"), self._dummy_fp if fp_k is None else fp_k, self._dummy_fp if fp_v is None else fp_v,
            table, self._zero, n_q, n_r, bits=self.kv_bits, group_size=self.group_size)
        return pk.decode_attention(qf, c, return_lse=True)

    def _attend_resident(self, layer, qf):
        """(out, lse) over the window and the CPU pages of ``layer`` (float32)."""
        n_win = self._win_n[layer] + self._plain_pending(layer)
        wk, wv = self._win_k[layer], self._win_v[layer]
        table, n = self._cpu_table(layer)
        no = self._open_n[layer]
        self._cpu_attended += ((n * self.page_tokens + no) * self.page_bytes // self.page_tokens
                               + 2 * n_win * self.batch * wk[0, 0].numel() * wk.element_size())
        if self.kv_bits is not None:
            return self._attend_pages(qf, self._pool[layer], table, n, wk, wv, n_win, extra=no)
        sl = torch.full((self.batch,), n_win, dtype=torch.int32)
        o, lse = pk.decode_attention(qf, wk, wv, sl, return_lse=True)
        if n:
            o2, lse2 = self._attend_pages(qf, self._pool[layer], table, n)
            o, lse = pk.merge_states(o, lse, o2, lse2)
        return o, lse

    def _select(self, layer, qf, pages):
        """The ``approx`` share of ``pages`` with the largest bound max_k q.k (Quest)."""
        keep = max(1, math.ceil(self.approx * len(pages)))
        if keep >= len(pages):
            return pages
        G = self.cfg.num_heads // self.cfg.num_kv_heads
        B, Hkv, D = self.batch, self.cfg.num_kv_heads, self.cfg.head_dim
        idx = torch.tensor(pages)
        q = qf.view(B, Hkv, G, D)[None]                                  # [1, B, Hkv, G, D]
        lo, hi = self._kmin[layer, idx][:, :, :, None], self._kmax[layer, idx][:, :, :, None]  # [P, B, Hkv, 1, D]
        bound = torch.maximum(q * lo, q * hi).sum(-1).amax(dim=(1, 2, 3))  # [P]
        top = torch.topk(bound, keep).indices.sort().values
        self._skipped += len(pages) - keep
        return [pages[i] for i in top.tolist()]

    @torch.no_grad()
    def decode_attend(self, layer: int, q, k, v) -> torch.Tensor:
        """Append one token k, v [B, 1, Hkv, D], then attention of q [B, 1, Hq, D] over every
        tier, exact (or approximate on the disk pages with ``approx``). -> [B, 1, Hq, D]."""
        self._reserve(layer, q, k, v, T_expected=1)
        self._fresh_schedule()
        qf = q[:, 0].float()
        o, lse = self._attend_resident(layer, qf)
        disk = self._disk_pages(layer)
        if disk:
            if self.approx is None:
                o, lse = self._attend_disk(layer, qf, o, lse, None, disk)
            else:
                sel = self._select(layer, qf, disk)
                o_r, lse_r = o, lse
                o, lse = self._attend_disk(layer, qf, o, lse, sel, disk)
                self._approx_steps += 1
                if self.approx_audit and self._approx_steps % self.approx_audit == 0 and len(sel) < len(disk):
                    # the audit: this step's exact output too, and how far the approximation is
                    ex, _ = self._attend_disk(layer, qf, o_r, lse_r, disk, disk)
                    cos = torch.nn.functional.cosine_similarity(o.flatten(1), ex.flatten(1), dim=1)
                    self._audit_cos.append(float(cos.min()))
        return o.to(q.dtype)[:, None]

    def _read_disk(self, layer, pages=None):
        """Yield (views of n pages, their page ids) for ``layer``'s disk pages: every one through
        the scheduled prefetch (``pages`` None), or ``pages`` read now, in chunks; counts them
        as attended once the consumer is done with each chunk."""
        items = None if pages is None else [[(layer, p) for p in c] for c in _chunks(pages, self.chunk_pages)]
        for buf, got in self._reader.chunks(layer, items):
            n = len(got)
            yield _views(buf, self._layout, n * self.batch), [p for _, p in got]
            self._disk_attended += n * self.page_bytes
            self._read_pages += n

    def _attend_disk(self, layer, qf, o, lse, sel, disk):
        """Merge into (o, lse) the attention over ``layer``'s disk pages: every one through the
        scheduled prefetch (``sel`` None), or the pages ``sel`` read now."""
        seen = 0
        for views, pages in self._read_disk(layer, sel):
            n = len(pages)
            o2, lse2 = self._attend_pages(qf, views, self._chunk_table(n), n)
            o, lse = pk.merge_states(o, lse, o2, lse2)
            seen += n
        if sel is None and seen != len(disk):  # a schedule out of date: never a silent skip
            raise RuntimeError(f"layer {layer}: read {seen} of {len(disk)} disk pages (stale read schedule)")
        return o, lse

    def _page_kv(self, layer, rec, scratch):
        """(k, v) float32 [B, S, Hkv, D] of one page (read and checked if on disk)."""
        if rec["tier"] == "cpu":
            s, B = rec["slot"], self.batch
            return self._fields_kv({n: t[s * B:(s + 1) * B] for n, t in self._pool[layer].items()})
        self._reader.read_page(rec["path"], scratch[0], rec["crc"])
        return self._fields_kv(_views(scratch[1], self._layout, self.batch))

    def _fields_kv(self, f):
        """(k, v) float32 [B, S, Hkv, D], new tensors, of one page's fields (B blocks)."""
        if self.kv_bits is None:  # a copy: read buffers are reused
            return f["k"].to(torch.float32, copy=True), f["v"].to(torch.float32, copy=True)
        k, v = kv_format.dequantize_kv(f, self.kv_bits, self.group_size, self.cfg.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def _scratch(self):
        return self._scratch_mem, torch.frombuffer(self._scratch_mem, dtype=torch.uint8)

    @torch.no_grad()
    def prefill_attend(self, layer: int, q, k, v) -> torch.Tensor:
        """Append k, v [B, T, Hkv, D] and return the causal attention of q [B, T, Hq, D] over
        all held tokens and the new ones (query i sees the new tokens 0..i), exact over every
        tier, page by page in float32 (disk pages read by the reader threads, several in
        flight, while earlier ones compute). -> [B, T, Hq, D] in q's dtype.

        Each call reads every disk page once for all T queries, so a prompt over a spilled cache
        costs (prompt chunks x disk pages) reads: ``OffloadedModel`` passes chunks of
        ``placement.prefill_chunk`` tokens (``max_append`` at most), on top of attention's own
        quadratic compute."""
        L0 = self.length
        T = self._reserve(layer, q, k, v)
        qf = q.float()
        B, S = self.batch, self.page_tokens
        if self.kv_bits is None:  # the window holds the old unsealed tokens and the new ones
            n_win = self._win_n[layer] + T
            mask = (torch.arange(n_win)[None, :] <= (n_win - T + torch.arange(T))[:, None])
            o, lse = _attend_dense(qf, self._win_k[layer, :, :n_win], self._win_v[layer, :, :n_win], mask)
            limit = None
        else:  # as offload.llama.KVCache: the new tokens in full precision (causal), the old
            # ones as the cache holds them after this append (some now quantized)
            kd, vd = k.to(self.dtype), v.to(self.dtype)
            o, lse = _attend_dense(qf, kd, vd, torch.ones(T, T, dtype=torch.bool).tril())
            limit = L0
            start = len(self._pages[layer]) * S  # open page, then window
            segs = [(self._open_kv(layer), start), ((self._win_k[layer, :, :self._win_n[layer]].float(),
                                                     self._win_v[layer, :, :self._win_n[layer]].float()),
                                                    start + self._open_n[layer])]
        o_l = [o, lse]

        def attend(kk, vv, pos):
            """Attend the tokens at positions pos.. of kk, vv that are older than L0."""
            m = kk.shape[1] if limit is None else min(kk.shape[1], limit - pos)
            if m > 0:
                o2, lse2 = _attend_dense(qf, kk[:, :m], vv[:, :m], None)
                o_l[:] = _merge(o_l[0], o_l[1], o2, lse2)

        if limit is not None:
            for (kk, vv), pos in segs:
                attend(kk, vv, pos)
        for rec in self._pages[layer]:
            if rec["tier"] == "cpu":
                attend(*self._page_kv(layer, rec, None), rec["index"] * S)
        disk = self._disk_pages(layer)
        if disk:
            for views, pages in self._read_disk(layer, disk):
                for j, p in enumerate(pages):
                    attend(*self._fields_kv({n: t[j * B:(j + 1) * B] for n, t in views.items()}), p * S)
        return o_l[0].to(q.dtype)

    def _open_kv(self, layer):
        """(k, v) float32 [B, open_n, Hkv, D] of the quantized open page."""
        s, B, n = self._open_slot[layer], self.batch, self._open_n[layer]
        k, v = self._fields_kv({name: t[s * B:(s + 1) * B] for name, t in self._pool[layer].items()})
        return k[:, :n], v[:, :n]

    def dequantize(self, layer: int):
        """(k, v) float32 [B, n, Hkv, D] of every token ``layer`` holds, in order (pages as
        stored, dequantized; then the window): what its attention reads."""
        self._check_open()
        self._check_layer(layer)
        scratch = self._scratch() if self._disk_pages(layer) else None
        ks, vs = [], []
        for rec in self._pages[layer]:
            kk, vv = self._page_kv(layer, rec, scratch)
            ks.append(kk)
            vs.append(vv)
        if self.kv_bits is not None:
            kk, vv = self._open_kv(layer)
            ks.append(kk)
            vs.append(vv)
        n = self._win_n[layer] + self._plain_pending(layer)
        ks.append(self._win_k[layer, :, :n].float())
        vs.append(self._win_v[layer, :, :n].float())
        return torch.cat(ks, 1), torch.cat(vs, 1)

    def read_pass(self) -> float:
        """Read every disk page once through the reader (no compute) -> seconds: the disk
        bound of one exact decode step right now."""
        self._check_open()
        r = self._reader
        if r is None or not any(self._disk_pages(i) for i in range(self.cfg.num_layers)):
            return 0.0
        self._fresh_schedule()
        r.drain()
        t0 = time.perf_counter()
        for layer in range(self.cfg.num_layers):
            for _ in r.chunks(layer, [[(layer, p) for p in c] for c in _chunks(self._disk_pages(layer), self.chunk_pages)]):
                pass
        dt = time.perf_counter() - t0
        self._reschedule()
        return dt

    def close(self) -> None:
        """Stop the readers and delete the page files (the cache is unusable afterwards)."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _chunks(xs, n):
    return [xs[s:s + n] for s in range(0, len(xs), n)]


def _attend_dense(qf, k, v, mask):
    """Float32 attention of qf [B, T, Hq, D] over k, v [B, n, Hkv, D] (GQA), mask [T, n] or None
    -> (o [B, T, Hq, D], lse [B, T, Hq]); QUERY_BLOCK queries at a time (bounded scores)."""
    B, T, Hq, D = qf.shape
    if T > QUERY_BLOCK:
        parts = [_attend_dense(qf[:, a:a + QUERY_BLOCK], k, v, None if mask is None else mask[a:a + QUERY_BLOCK])
                 for a in range(0, T, QUERY_BLOCK)]
        return torch.cat([o for o, _ in parts], 1), torch.cat([lse for _, lse in parts], 1)
    Hkv = k.shape[2]
    G = Hq // Hkv
    s = torch.einsum("bthgd,bnhd->bhgtn", qf.view(B, T, Hkv, G, D), k.float()) / math.sqrt(D)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    o = torch.einsum("bhgtn,bnhd->bthgd", torch.exp(s - lse[..., None]), v.float())
    return o.reshape(B, T, Hq, D), lse.permute(0, 3, 1, 2).reshape(B, T, Hq)


def _merge(o1, l1, o2, l2):
    B, T, Hq, D = o1.shape
    o, lse = pk.merge_states(o1.reshape(B * T, Hq, D), l1.reshape(B * T, Hq), o2.reshape(B * T, Hq, D),
                             l2.reshape(B * T, Hq))
    return o.view(B, T, Hq, D), lse.view(B, T, Hq)


def _cleanup(reader, dirbox) -> None:
    """Finalizer of a TieredKVCache (holds no reference to it): stop the readers, delete the
    page files."""
    if reader is not None:
        reader.close()
    if dirbox[0] is not None:
        shutil.rmtree(dirbox[0], ignore_errors=True)
    if dirbox[1] is not None:  # the lock goes last: the directory is gone before it is free
        os.close(dirbox[1])
        dirbox[1] = None
