"""The tiered on-disk weight store: resumable conversion from an HF checkpoint, and checked reads.

A store directory holds one file per *unit* -- ``embed.bin``, ``layer.{i}.bin``, ``head.bin`` --
plus ``manifest.json``. In a unit file every tensor starts at a 4096-byte-aligned offset and the
file is padded to a multiple of 4096, so whole-file ``O_DIRECT`` reads work; the file is cut into
``PAGE_BYTES`` (4 MiB) pages, each with a crc32c in the manifest, verified on every read.

Conversion (``convert``) writes each unit to a temp name, fsyncs and renames it, then rewrites the
journal ``progress.json``; ``manifest.json`` is written last, so its presence means complete. A
re-run with the same options resumes after the last journaled unit.

Reading (``Store``) keeps one descriptor per unit and reads with ``os.preadv`` at explicit
offsets (thread-safe, releases the GIL); crc32c also releases the GIL. Reads use ``O_DIRECT``
when the filesystem allows it, else buffered reads followed by ``POSIX_FADV_DONTNEED`` so the page
cache never holds the store (``Store.read_mode`` says which).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import re
import shutil
import threading

import crc32c as _crc32c
import torch

from .checkpoint import Checkpoint, _fsync_dir

__all__ = ["convert", "Store", "StoreError", "IncompleteStoreError", "CorruptPageError",
           "ALIGN", "PAGE_BYTES", "FORMAT", "VERSION"]

ALIGN = 4096                      # tensor offsets, file sizes and O_DIRECT transfers
PAGE_BYTES = 4 << 20              # checksum page
FORMAT = "pykernels-offload-store"
VERSION = 1
_JOURNAL_FORMAT = "pykernels-offload-store-progress"
_MANIFEST = "manifest.json"
_JOURNAL = "progress.json"
_PROJ = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
         "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
_UNIT_FILE = re.compile(r"^(embed|head|layer\.\d+)\.bin(\.tmp)?$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class StoreError(OSError):
    """Base error of the store (an OSError: disk full, truncated or unreadable files)."""

    def __init__(self, message):
        super().__init__(message)


class IncompleteStoreError(StoreError):
    """The store directory has no manifest.json (conversion not finished)."""


class CorruptPageError(StoreError):
    """A checksum page's crc32c does not match the manifest.

    Attributes: ``file`` (path), ``offset`` (page offset in bytes), ``expected``, ``got`` (crc32c).
    """

    def __init__(self, file, offset, expected, got):
        self.file, self.offset, self.expected, self.got = file, offset, expected, got
        super().__init__(f"{file}: corrupt page at offset {offset}: crc32c {got:#010x}, "
                         f"manifest says {expected:#010x}")


def _round_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _dtype_of(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"manifest: unknown dtype {name!r}")
    return dt


def _write_atomic(path: str, mv: memoryview, *, direct: bool = False, durable: bool = True) -> bool:
    """``path + ".tmp"`` + os.replace; disk full -> StoreError naming the file, the temp file
    removed and any old ``path`` intact. ``durable``: fsync the file and the directory.
    ``direct``: write with O_DIRECT (``mv`` page-aligned, a multiple of 4096 long), falling back
    to a buffered write + fdatasync + POSIX_FADV_DONTNEED where the filesystem refuses it (the
    data never stays in the page cache). -> whether O_DIRECT was used."""
    tmp = path + ".tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    cold = direct  # the caller wants the bytes out of the page cache
    try:
        while True:
            try:
                fd = os.open(tmp, flags | (os.O_DIRECT if direct else 0), 0o644)
            except OSError as e:
                if not direct or e.errno != errno.EINVAL:
                    raise
                direct = False  # the filesystem refuses O_DIRECT: buffered
                continue
            try:
                try:
                    _write_all(fd, mv, 0)
                except OSError as e:
                    if not direct or e.errno != errno.EINVAL:
                        raise
                    direct = False  # O_DIRECT accepted at open, refused at write: buffered
                    continue
                if durable:
                    os.fsync(fd)
                elif cold and not direct:
                    os.fdatasync(fd)  # written back, so DONTNEED can drop it
                if cold and not direct:
                    os.posix_fadvise(fd, 0, len(mv), os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            break
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quiet(tmp)
        if e.errno in _DISK_FULL:
            raise StoreError(f"disk full while writing {tmp}: {e}") from e
        raise
    if durable:
        _fsync_dir(os.path.dirname(path))
    return direct


def _write_json_atomic(path: str, obj) -> None:
    _write_atomic(path, memoryview(json.dumps(obj, indent=1).encode()))


def _write_all(fd, mv, offset):
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:done + (64 << 20)], offset + done)


def check_weight_bits(weight_bits) -> None:
    """ValueError naming ``weight_bits`` unless it is None or an int in 1..4 (the store formats)."""
    if weight_bits is not None and (isinstance(weight_bits, bool) or not isinstance(weight_bits, int)
                                    or weight_bits not in (1, 2, 3, 4)):
        raise ValueError(f"weight_bits: expected None or one of 1, 2, 3, 4, got {weight_bits!r}")


def _is_own_tmp(fname: str) -> bool:
    """A temp file this module writes (``<unit>.bin.tmp``, ``manifest.json.tmp``,
    ``progress.json.tmp``): what a killed conversion can leave behind."""
    return fname.endswith(".tmp") and bool(_UNIT_FILE.match(fname) or fname[:-4] in (_MANIFEST, _JOURNAL))


def _unlink_quiet(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _pages(nbytes: int) -> list[tuple[int, int]]:
    return [(o, min(PAGE_BYTES, nbytes - o)) for o in range(0, nbytes, PAGE_BYTES)]


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------
#: Order of a layer's tensors in its unit: the q, k, v weights adjacent, then gate and up, so the
#: runtime can run each group as one matrix (a zero-copy view over the adjacent rows).
_LAYER_ORDER = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                "self_attn.v_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias",
                "self_attn.v_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
                "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                "mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias"]


def _layer_order(item) -> tuple:
    name = item[0]
    return (_LAYER_ORDER.index(name) if name in _LAYER_ORDER else len(_LAYER_ORDER), name)


def _plan_units(ck: Checkpoint) -> dict:
    """unit -> list of (stored name, source name or None for a tied lm_head copy)."""
    cfg = ck.config
    layer_re = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    layers: dict[int, list] = {}
    other = []
    for n in ck.names:
        m = layer_re.match(n)
        if m:
            layers.setdefault(int(m.group(1)), []).append((m.group(2), n))
        elif n not in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            other.append(n)
    if other:
        raise ValueError(f"checkpoint: {ck.path!r} has tensors outside embed/layers/norm/lm_head that "
                         f"the store does not know where to put: {other[:5]}")
    L = cfg.get("num_hidden_layers")
    if L is None or sorted(layers) != list(range(int(L))):
        raise ValueError(f"checkpoint: config num_hidden_layers={L} but tensors exist for layers "
                         f"{sorted(layers)[:5]}...")
    for need in ("model.embed_tokens.weight", "model.norm.weight"):
        if need not in ck.names:
            raise ValueError(f"checkpoint: {ck.path!r} has no {need!r}")
    units = {"embed": [("model.embed_tokens.weight", "model.embed_tokens.weight")]}
    for i in range(int(L)):
        units[f"layer.{i}"] = sorted(layers[i], key=_layer_order)
    if "lm_head.weight" in ck.names:
        head = ("lm_head.weight", "lm_head.weight")
    elif cfg.get("tie_word_embeddings", False):
        head = ("lm_head.weight", "model.embed_tokens.weight")
    else:
        raise ValueError(f"checkpoint: {ck.path!r} has no lm_head.weight and tie_word_embeddings is not set")
    units["head"] = [("norm.weight", "model.norm.weight"), head]
    return units


def _quantized(unit: str, name: str, weight_bits, quantize_head) -> bool:
    if weight_bits is None:
        return False
    if unit.startswith("layer."):
        return name in _PROJ
    return unit == "head" and quantize_head and name == "lm_head.weight"


def _lut_sizes(N, K, bits, group_size) -> list[int]:
    from pykernels.lut_format import padded_shape
    N_pad, K_pad, gs = padded_shape(N, K, group_size)
    G = K_pad // gs
    # planes, scales, zeros (fp16), meta (5 x int64), scheme ("affine")
    return [N_pad * K_pad * bits // 8, N * G * 2, N * G * 2, 40, 6]


def _estimate(ck, plan, weight_bits, group_size, quantize_head) -> dict:
    """unit -> padded bytes it will take (exact for this layout)."""
    out = {}
    for unit, items in plan.items():
        total = 0
        for name, src in items:
            dt, shape = ck.meta(src)
            if _quantized(unit, name, weight_bits, quantize_head):
                sizes = _lut_sizes(shape[0], shape[1], weight_bits, group_size)
            else:
                n = dt.itemsize
                for s in shape:
                    n *= s
                sizes = [n]
            total += sum(_round_up(s) for s in sizes)
        out[unit] = max(total, ALIGN)
    return out


def _unit_tensors(ck, unit, items, weight_bits, group_size, quantize_head) -> list:
    import pykernels
    out = []
    for name, src in items:
        t = ck.load(src)
        if _quantized(unit, name, weight_bits, quantize_head):
            qw = pykernels.quantize_weight(t.float(), bits=weight_bits, group_size=group_size, scheme="affine")
            out.extend(qw.state_dict(prefix=name[:-len("weight")]).items())
        else:
            out.append((name, t))
    return out


def _write_unit(store_dir, unit, tensors) -> dict:
    """Lay the tensors out 4096-aligned, write <unit>.bin.tmp, fsync, rename; -> manifest entry."""
    entries, off = {}, 0
    for name, t in tensors:
        nb = t.numel() * t.element_size()
        entries[name] = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "offset": off, "nbytes": nb}
        off = _round_up(off + nb)
    size = max(off, ALIGN)
    buf = bytearray(size)                         # zero padding; ~one layer of memory
    for name, t in tensors:
        e = entries[name]
        if e["nbytes"]:
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            buf[e["offset"]:e["offset"] + e["nbytes"]] = raw.data
    mv = memoryview(buf)
    pages = [[o, n, _crc32c.crc32c(mv[o:o + n])] for o, n in _pages(size)]
    fname = f"{unit}.bin"
    _write_atomic(os.path.join(store_dir, fname), mv)
    return {"file": fname, "nbytes": size, "tensors": entries, "pages": pages}


def _load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(f"store_dir: {path} is not valid JSON ({e}); remove the directory to start over") from None


def _discard(store_dir: str, journal: dict) -> None:
    """Remove what a previous conversion created (our file names only), nothing else.

    The new ``journal`` is written first and the old manifest removed before any unit file, so
    a kill at any point leaves a directory that is still recognised as ours (resumable)."""
    _write_json_atomic(os.path.join(store_dir, _JOURNAL), journal)
    _unlink_quiet(os.path.join(store_dir, _MANIFEST))
    for fname in os.listdir(store_dir):
        if _UNIT_FILE.match(fname) or fname in (_MANIFEST + ".tmp", _JOURNAL + ".tmp"):
            _unlink_quiet(os.path.join(store_dir, fname))


def convert(checkpoint, store_dir, *, weight_bits=None, group_size=128, quantize_head=False,
            progress=None, _fail_after_units=None) -> "Store":
    if not isinstance(store_dir, (str, os.PathLike)):
        raise TypeError(f"store_dir: expected a path, got {type(store_dir).__name__}")
    store_dir = os.path.abspath(os.fspath(store_dir))
    if os.path.lexists(store_dir) and not os.path.isdir(store_dir):
        raise ValueError(f"store_dir: {store_dir!r} exists and is not a directory")
    created = not os.path.exists(store_dir)
    os.makedirs(store_dir, exist_ok=True)
    # one conversion per store at a time (two load_model calls on one default store): the
    # second waits, then finds the store complete or resumes it
    fd = os.open(store_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _convert(checkpoint, store_dir, weight_bits=weight_bits, group_size=group_size,
                        quantize_head=quantize_head, progress=progress, _fail_after_units=_fail_after_units)
    except BaseException:
        if created and not os.listdir(store_dir):  # rejected before writing: leave nothing behind
            os.rmdir(store_dir)
        raise
    finally:
        os.close(fd)  # releases the lock


def _convert(checkpoint, store_dir, *, weight_bits=None, group_size=128, quantize_head=False,
             progress=None, _fail_after_units=None) -> "Store":
    """Convert an HF checkpoint into a store directory (resumable), one unit at a time.

    Units: "embed" (one tensor, named "model.embed_tokens.weight" as in HF), "layer.{i}" (every tensor of
    decoder layer i, without the ``model.layers.{i}.`` prefix), "head" ("norm.weight",
    "lm_head.weight"; a copy of the embedding when the checkpoint ties them). With
    ``weight_bits`` the 7 projection weights of each layer (and lm_head if ``quantize_head``) are
    stored as ``pykernels.quantize_weight(w.float(), bits, group_size, scheme="affine")
    .state_dict(prefix)`` tensors ("self_attn.q_proj.planes", ".scales", ".zeros", ".meta",
    ".scheme"); norms, biases and unquantized weights keep the source dtype.

    Memory ~ one layer (source tensors + the unit's file image). The free space is checked
    against the exact size first; a full disk mid-write raises StoreError and leaves no partial
    file, and a later call resumes from the journal.

    Parameters
    ----------
    checkpoint : path of an HF checkpoint directory, or a ``Checkpoint``.
    store_dir : directory to create or resume in. A non-empty directory without our manifest or
        journal is refused (ValueError). A complete store with the same options and source is
        returned as is; with other options or a changed source, what the store created is
        discarded and conversion restarts.
    weight_bits : None or 1, 2, 3, 4.
    group_size : -1 or a positive multiple of 8 dividing the K of every quantized weight
        (checked before writing; only used with ``weight_bits``).
    quantize_head : bool, quantize lm_head too.
    progress : None/False, or True for a tqdm bar over units.
    _fail_after_units : test hook: raise RuntimeError after this many units were written.

    Returns
    -------
    Store

    Example
    -------
    >>> st = convert(demo_checkpoint("/tmp/tiny", "tiny"), "/tmp/tiny-store", weight_bits=4, group_size=16)
    >>> st.unit_names()
    ['embed', 'layer.0', 'layer.1', 'head']
    """
    check_weight_bits(weight_bits)
    if (isinstance(group_size, bool) or not isinstance(group_size, int)
            or not (group_size == -1 or (group_size >= 8 and group_size % 8 == 0))):
        raise ValueError(f"group_size: expected -1 or a positive multiple of 8, got {group_size!r}")
    if not isinstance(quantize_head, bool):
        raise ValueError(f"quantize_head: expected a bool, got {quantize_head!r}")
    if progress not in (None, False, True):
        raise ValueError(f"progress: expected None, False or True, got {progress!r}")
    if _fail_after_units is not None and (isinstance(_fail_after_units, bool)
                                          or not isinstance(_fail_after_units, int) or _fail_after_units < 0):
        raise ValueError(f"_fail_after_units: expected None or an int >= 0, got {_fail_after_units!r}")
    if not isinstance(store_dir, (str, os.PathLike)):
        raise TypeError(f"store_dir: expected a str or os.PathLike, got {type(store_dir).__name__}")
    if not isinstance(checkpoint, (Checkpoint, str, os.PathLike)):
        raise TypeError(f"checkpoint: expected a Checkpoint or a directory path, got {type(checkpoint).__name__}")
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    store_dir = os.path.abspath(os.fspath(store_dir))
    plan = _plan_units(ck)
    if weight_bits is not None and group_size != -1:
        for unit, items in plan.items():
            for name, src in items:
                if _quantized(unit, name, weight_bits, quantize_head):
                    K = ck.meta(src)[1][1]
                    if K % group_size:
                        raise ValueError(f"group_size: {group_size} does not divide K={K} of {src!r}; "
                                         f"use a divisor of K that is a multiple of 8, or -1 (per-channel)")

    # group_size and quantize_head mean nothing without weight_bits: not part of such a store's
    # identity (a different group_size must not rewrite an unquantized store)
    options = {"weight_bits": weight_bits, "group_size": group_size if weight_bits is not None else None,
               "quantize_head": quantize_head and weight_bits is not None,
               "source": {"path": ck.path, "fingerprint": ck.fingerprint()}}

    # -- what is already there -------------------------------------------------------------------
    done: dict = {}
    if os.path.lexists(store_dir) and not os.path.isdir(store_dir):
        raise ValueError(f"store_dir: {store_dir!r} exists and is not a directory")
    present = os.listdir(store_dir) if os.path.isdir(store_dir) else []
    if present and all(_is_own_tmp(f) for f in present):
        for fname in present:  # only the temp files of a run killed before its first rename
            _unlink_quiet(os.path.join(store_dir, fname))
    if os.path.isdir(store_dir) and os.listdir(store_dir):
        man = _load_json(os.path.join(store_dir, _MANIFEST))
        jour = _load_json(os.path.join(store_dir, _JOURNAL))
        man_ok = isinstance(man, dict) and man.get("format") == FORMAT
        jour_ok = isinstance(jour, dict) and jour.get("format") == _JOURNAL_FORMAT
        if not man_ok and not jour_ok:
            raise ValueError(f"store_dir: {store_dir!r} is a non-empty directory without a "
                             f"{FORMAT} manifest.json or progress.json; refusing to write into it")
        if man_ok and {k: man.get(k) for k in options} == options and man.get("complete"):
            return Store(store_dir)
        if not man_ok and jour.get("options") == options and jour.get("version") == VERSION:
            done = {u: e for u, e in jour.get("units", {}).items() if u in plan}
        else:                                     # other options / source: start over
            _discard(store_dir, {"format": _JOURNAL_FORMAT, "version": VERSION, "options": options, "units": {}})
    os.makedirs(store_dir, exist_ok=True)
    for fname in os.listdir(store_dir):           # a temp file of a killed run
        if _is_own_tmp(fname):
            _unlink_quiet(os.path.join(store_dir, fname))
    for unit in list(done):
        try:
            ok = os.stat(os.path.join(store_dir, done[unit]["file"])).st_size == done[unit]["nbytes"]
        except (OSError, KeyError, TypeError):
            ok = False
        if not ok:
            del done[unit]

    # -- space check before writing anything ------------------------------------------------------
    sizes = _estimate(ck, plan, weight_bits, group_size, quantize_head)
    need = sum(s for u, s in sizes.items() if u not in done) + (1 << 20)   # + manifest/journal
    free = shutil.disk_usage(store_dir).free
    if need > free:
        raise StoreError(f"store_dir: {store_dir!r} has {free} bytes free, the conversion needs "
                         f"{need} bytes more ({len(plan) - len(done)} units)")

    journal = {"format": _JOURNAL_FORMAT, "version": VERSION, "options": options, "units": dict(done)}
    if not done:
        _write_json_atomic(os.path.join(store_dir, _JOURNAL), journal)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="convert")
        if done:
            bar.update(sum(sizes[u] for u in done))
            bar.set_postfix_str(f"resumed: {len(done)} of {len(plan)} units already converted, skipped")
    written = 0
    try:
        for unit, items in plan.items():
            if unit in done:
                continue
            tensors = _unit_tensors(ck, unit, items, weight_bits, group_size, quantize_head)
            entry = _write_unit(store_dir, unit, tensors)
            del tensors
            journal["units"][unit] = entry
            _write_json_atomic(os.path.join(store_dir, _JOURNAL), journal)
            written += 1
            if bar is not None:
                bar.update(entry["nbytes"])
                bar.set_postfix_str(unit)
            if _fail_after_units is not None and written >= _fail_after_units:
                raise RuntimeError(f"_fail_after_units={_fail_after_units}: simulated interruption "
                                   f"after {unit}")
    finally:
        if bar is not None:
            bar.close()

    manifest = {"format": FORMAT, "version": VERSION, "config": ck.config, "source": options["source"],
                "weight_bits": weight_bits, "group_size": options["group_size"],
                "quantize_head": options["quantize_head"], "checksum": "crc32c", "page_bytes": PAGE_BYTES,
                "units": {u: journal["units"][u] for u in plan}, "complete": True}
    _write_json_atomic(os.path.join(store_dir, _MANIFEST), manifest)
    _unlink_quiet(os.path.join(store_dir, _JOURNAL))   # redundant once the manifest exists
    return Store(store_dir)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
convert.__doc__ = _convert.__doc__


def aligned_buffer(nbytes: int) -> memoryview:
    """A page-aligned, zeroed, writable buffer of ``nbytes`` >= 1 (anonymous mmap: usable for
    O_DIRECT)."""
    return memoryview(mmap.mmap(-1, _round_up(nbytes, mmap.PAGESIZE)))[:nbytes]


def _address(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class Store:
    """Checked reads from a converted store directory.

    Parameters
    ----------
    store_dir : a directory written by ``convert``.
    direct : read with O_DIRECT when the filesystem allows it (default). When it refuses
        (EINVAL on open or read), reads are buffered and followed by POSIX_FADV_DONTNEED;
        ``read_mode`` ("direct" | "buffered") and ``read_mode_reason`` say which and why.

    Attributes
    ----------
    store_dir, manifest, config (HF config dict), weight_bits, group_size, units (manifest units).

    Example
    -------
    >>> with Store("/tmp/tiny-store") as st:
    ...     buf = st.alloc(st.unit_nbytes("layer.0"))
    ...     st.read_unit("layer.0", buf)
    ...     w = st.tensors("layer.0", buf)["self_attn.q_proj.weight"]
    """

    def __init__(self, store_dir, *, direct=True):
        if not isinstance(store_dir, (str, os.PathLike)):
            raise TypeError(f"store_dir: expected a str or os.PathLike, got {type(store_dir).__name__}")
        if not isinstance(direct, bool):
            raise ValueError(f"direct: expected a bool, got {direct!r}")
        self.store_dir = os.path.abspath(os.fspath(store_dir))
        self._fds: dict = {}
        self._bfds: dict = {}
        self._lock = threading.Lock()
        if not os.path.isdir(self.store_dir):
            raise FileNotFoundError(f"store_dir: {self.store_dir!r} does not exist")
        mpath = os.path.join(self.store_dir, _MANIFEST)
        if not os.path.isfile(mpath):
            jour = os.path.isfile(os.path.join(self.store_dir, _JOURNAL))
            raise IncompleteStoreError(
                f"{self.store_dir}: incomplete: run convert again to resume (no {_MANIFEST}"
                f"{'; ' + _JOURNAL + ' records a partial conversion' if jour else ''})")
        try:
            with open(mpath) as f:
                self.manifest = json.load(f)
        except ValueError as e:
            raise StoreError(f"{mpath}: not valid JSON: {e}") from None
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise StoreError(f"{mpath}: not a {FORMAT} manifest")
        if m.get("version") != VERSION:
            raise StoreError(f"{mpath}: version {m.get('version')!r}, this code reads version {VERSION}")
        if not m.get("complete"):
            raise IncompleteStoreError(f"{self.store_dir}: incomplete: run convert again to resume")
        self.config = m["config"]
        self.weight_bits = m["weight_bits"]
        self.group_size = m["group_size"]
        self.page_bytes = m["page_bytes"]
        self.units = m["units"]
        self.direct = direct
        self.read_mode = "direct" if direct else "buffered"
        self.read_mode_reason = None if direct else "direct=False"
        self.rows_bytes_read = 0  # pages read by read_rows, for callers' accounting
        try:
            for unit, e in self.units.items():
                path = os.path.join(self.store_dir, e["file"])
                fd = self._open(path)
                self._fds[unit] = fd
                size = os.fstat(fd).st_size
                if size != e["nbytes"]:
                    raise StoreError(f"{path}: size {size} bytes, manifest says {e['nbytes']} bytes "
                                     f"(truncated or replaced)")
        except BaseException:
            self.close()
            raise

    def _open(self, path) -> int:
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        try:
            if self.read_mode == "direct":
                try:
                    return os.open(path, flags | os.O_DIRECT)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._to_buffered(f"open(O_DIRECT) of {path}: {e.strerror}")
            return os.open(path, flags)
        except FileNotFoundError:
            raise StoreError(f"{path}: unit file is missing (listed in {_MANIFEST})") from None

    def _to_buffered(self, reason):
        self.read_mode = "buffered"
        if self.read_mode_reason is None:
            self.read_mode_reason = reason

    # -- sizes ---------------------------------------------------------------------------------
    def _unit(self, unit) -> dict:
        try:
            return self.units[unit]
        except (KeyError, TypeError):
            raise ValueError(f"unit: no unit {unit!r} in {self.store_dir} (has {', '.join(self.units)})") from None

    def unit_names(self) -> list[str]:
        """Units in stream order: "embed", "layer.0" ... "layer.{L-1}", "head"."""
        return list(self.units)

    def unit_nbytes(self, unit) -> int:
        """Padded size on disk = bytes a full ``read_unit`` moves."""
        return self._unit(unit)["nbytes"]

    def tensor_nbytes(self, unit) -> int:
        """Sum of the unit's tensor sizes (no padding)."""
        return sum(t["nbytes"] for t in self._unit(unit)["tensors"].values())

    def pages(self, unit) -> list:
        """[[offset, nbytes, crc32c], ...] checksum pages of ``unit``."""
        return self._unit(unit)["pages"]

    # -- raw reads -----------------------------------------------------------------------------
    def alloc(self, nbytes) -> memoryview:
        """A page-aligned writable buffer of ``nbytes`` (anonymous mmap; usable for O_DIRECT)."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
            raise ValueError(f"nbytes: expected an int >= 1, got {nbytes!r}")
        return aligned_buffer(nbytes)

    def _fd_for(self, unit) -> int:
        if self.read_mode == "direct":
            fd = self._fds.get(unit)
            if fd is None:
                raise StoreError(f"{self.store_dir}: store is closed")
            return fd
        fd = self._bfds.get(unit)
        if fd is None:
            with self._lock:
                fd = self._bfds.get(unit)
                if fd is None:
                    if self._fds.get(unit) is None:
                        raise StoreError(f"{self.store_dir}: store is closed")
                    path = os.path.join(self.store_dir, self.units[unit]["file"])
                    fd = self._bfds[unit] = (self._fds[unit] if not self._is_direct(self._fds[unit])
                                             else os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        return fd

    @staticmethod
    def _is_direct(fd) -> bool:
        import fcntl
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)

    def _pread(self, unit, mv, offset) -> None:
        """Fill mv (len a multiple of 4096, page-aligned when direct) from ``offset`` of ``unit``."""
        path = os.path.join(self.store_dir, self.units[unit]["file"])
        n = len(mv)
        got = 0
        while got < n:
            direct = self.read_mode == "direct"
            fd = self._fd_for(unit)
            try:
                k = os.preadv(fd, [mv[got:]], offset + got)
            except OSError as e:
                if e.errno == errno.EINVAL and direct:
                    with self._lock:
                        self._to_buffered(f"read(O_DIRECT) of {path}: {e.strerror}")
                    continue
                raise StoreError(f"{path}: read of {n - got} bytes at offset {offset + got} failed: {e}") from e
            if k == 0 or (direct and k % ALIGN and got + k < n):
                raise StoreError(f"{path}: short read at offset {offset + got}: got {k} of {n - got} bytes "
                                 f"(file truncated after open?)")
            got += k
        if self.read_mode != "direct":
            os.posix_fadvise(self._fd_for(unit), offset, n, os.POSIX_FADV_DONTNEED)

    def _check_buf(self, buf, need):
        if not isinstance(buf, memoryview):
            buf = memoryview(buf)
        if buf.readonly:
            raise ValueError("buf: expected a writable buffer")
        buf = buf.cast("B")
        if len(buf) < need:
            raise ValueError(f"buf: {len(buf)} bytes, need at least {need} (Store.alloc(unit_nbytes))")
        if self.read_mode == "direct" and _address(buf) % ALIGN:
            raise ValueError(f"buf: address not {ALIGN}-aligned, O_DIRECT needs an aligned buffer "
                             f"(use Store.alloc)")
        return buf

    def _verify(self, unit, mv, offset, expected) -> None:
        got = _crc32c.crc32c(mv)
        if got != expected:
            raise CorruptPageError(os.path.join(self.store_dir, self.units[unit]["file"]), offset, expected, got)

    def read_page(self, unit, index, buf) -> None:
        """Read checksum page ``index`` of ``unit`` into ``buf[offset : offset + nbytes]`` and verify it.

        ``buf`` is laid out like the whole unit (e.g. from ``alloc(unit_nbytes(unit))``), so several
        threads can fill one buffer page by page."""
        pages = self._unit(unit)["pages"]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(pages):
            raise ValueError(f"index: expected an int in [0, {len(pages)}), got {index!r}")
        off, n, crc = pages[index]
        buf = self._check_buf(buf, off + n)
        mv = buf[off:off + n]
        self._pread(unit, mv, off)
        self._verify(unit, mv, off, crc)

    def read_unit(self, unit, buf=None) -> memoryview:
        """Read all of ``unit`` into ``buf`` (``alloc``'d when None), verifying every page's crc32c.

        Returns the buffer (a memoryview of ``unit_nbytes(unit)`` bytes, or of all of ``buf``)."""
        e = self._unit(unit)
        if buf is None:
            buf = self.alloc(e["nbytes"])
        buf = self._check_buf(buf, e["nbytes"])
        pages = e["pages"]
        step = 4                                    # pages per syscall: 16 MiB requests
        for i in range(0, len(pages), step):
            grp = pages[i:i + step]
            off0 = grp[0][0]
            end = grp[-1][0] + grp[-1][1]
            self._pread(unit, buf[off0:end], off0)
            for off, n, crc in grp:
                self._verify(unit, buf[off:off + n], off, crc)
        return buf

    # -- tensors -------------------------------------------------------------------------------
    def views(self, unit, buf) -> dict:
        """Zero-copy tensors {name: Tensor} over ``buf`` (as filled by ``read_unit``)."""
        e = self._unit(unit)
        buf = memoryview(buf).cast("B")
        if len(buf) < e["nbytes"]:
            raise ValueError(f"buf: {len(buf)} bytes, unit {unit!r} needs {e['nbytes']}")
        out = {}
        for name, t in e["tensors"].items():
            dt = _dtype_of(t["dtype"])
            shape = tuple(t["shape"])
            if t["nbytes"] == 0:
                out[name] = torch.empty(shape, dtype=dt)
            else:
                out[name] = torch.frombuffer(buf, dtype=dt, count=t["nbytes"] // dt.itemsize,
                                             offset=t["offset"]).view(shape)
        return out

    def tensors(self, unit, buf) -> dict:
        """Like ``views``, with each quantized projection's state_dict group reassembled (no copies)
        as a ``pykernels.LUTWeight`` under its weight name, e.g. "self_attn.q_proj.weight"."""
        v = self.views(unit, buf)
        prefixes = [n[:-len("planes")] for n in v if n.endswith(".planes")]
        if not prefixes:
            return v
        from pykernels import LUTWeight
        from pykernels.lut import STATE_KEYS
        for p in prefixes:
            qw = LUTWeight.from_state_dict(v, prefix=p)
            for k in [k for k in v if k.startswith(p) and k[len(p):] in STATE_KEYS]:
                del v[k]  # the LUTWeight's own fields; a projection's bias stays
            v[p + "weight"] = qw
        return v

    def read_rows(self, unit, name, rows) -> torch.Tensor:
        """Rows ``rows`` of 2-D tensor ``name`` of ``unit`` (e.g. embedding rows for token ids), a
        new tensor [len(rows), cols], reading (and crc-checking) only the pages that cover them."""
        e = self._unit(unit)
        if name not in e["tensors"]:
            raise ValueError(f"name: no tensor {name!r} in unit {unit!r} (has {list(e['tensors'])[:8]})")
        t = e["tensors"][name]
        if len(t["shape"]) != 2:
            raise ValueError(f"name: {name!r} has shape {t['shape']}, read_rows needs a 2-D tensor")
        R, C = t["shape"]
        idx = torch.as_tensor(rows) if not (isinstance(rows, (list, tuple)) and len(rows) == 0) else \
            torch.zeros(0, dtype=torch.int64)  # [] is an empty list of ids, not a float tensor
        if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"rows: expected a 1-D sequence of ints, got {idx.dtype} shape {tuple(idx.shape)}")
        idx = idx.to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= R):
            raise ValueError(f"rows: expected values in [0, {R}), got min {int(idx.min())}, max {int(idx.max())}")
        dt = _dtype_of(t["dtype"])
        row_bytes = C * dt.itemsize
        uniq = torch.unique(idx)                  # sorted
        out = torch.empty(len(uniq), row_bytes, dtype=torch.uint8)
        pages = e["pages"]
        starts = [t["offset"] + int(r) * row_bytes for r in uniq.tolist()]
        need = sorted({p for s in starts for p in range(s // PAGE_BYTES, (s + row_bytes - 1) // PAGE_BYTES + 1)})
        pbuf = self.alloc(PAGE_BYTES)
        pt = torch.frombuffer(pbuf, dtype=torch.uint8)
        self.rows_bytes_read += sum(pages[p][1] for p in need)
        import bisect
        for p in need:
            off, n, crc = pages[p]
            mv = pbuf[:n]
            self._pread(unit, mv, off)
            self._verify(unit, mv, off, crc)
            lo = bisect.bisect_left(starts, off - row_bytes + 1)
            hi = bisect.bisect_left(starts, off + n)
            for j in range(lo, hi):
                s = starts[j]
                a, b = max(s, off), min(s + row_bytes, off + n)
                if a < b:
                    out[j, a - s:b - s] = pt[a - off:b - off]
        del pt
        res = out.view(dt).view(len(uniq), C)
        return res[torch.searchsorted(uniq, idx)] if len(uniq) != len(idx) or not torch.equal(uniq, idx) else res

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the unit files (idempotent)."""
        fds = set(self._fds.values()) | set(self._bfds.values())
        self._fds, self._bfds = {}, {}
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"Store({self.store_dir!r}, {len(self.units)} units, weight_bits={self.weight_bits}, "
                f"read_mode={self.read_mode!r})")
