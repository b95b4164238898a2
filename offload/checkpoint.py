"""HF safetensors checkpoints: a read-only view (``Checkpoint``) and deterministic demo writers.

``demo_checkpoint`` writes a random-init Llama checkpoint in the Hugging Face layout
(``config.json`` + ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` shards with
``model.safetensors.index.json``) that ``transformers.LlamaForCausalLM.from_pretrained`` loads.
It generates one tensor at a time from a generator seeded by (seed, tensor index), so peak
memory is about one shard, and it writes into a temp directory that is renamed into place at
the end: a killed write never leaves a complete-looking checkpoint.

``Checkpoint`` parses the safetensors headers itself (8-byte little-endian length + JSON), so
``meta`` / ``nbytes`` touch no tensor data, and ``load`` reads exactly one tensor's bytes with
``os.pread`` on a read-only descriptor: the source checkpoint is never modified or mmapped.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import uuid

import torch

__all__ = ["PRESETS", "demo_checkpoint", "Checkpoint", "SAFETENSORS_DTYPES"]

_BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pretraining_tp": 1,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}


def _preset(**kw) -> dict:
    d = copy.deepcopy(_BASE)
    d.update(kw)
    return d


#: HF ``config.json`` dicts for the demo models ("1b" has the TinyLlama-1.1B shape).
PRESETS: dict[str, dict] = {
    "tiny": _preset(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=176, vocab_size=256, max_position_embeddings=512),
    "small": _preset(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                     intermediate_size=704, vocab_size=1024, max_position_embeddings=1024),
    "1b": _preset(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                  intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048),
    # narrow and long: 8 layers x 8 kv heads x head dim 128, whose KV outgrows memory first
    # (2 GiB of bf16 KV at 64k tokens beside 270 MB of weights; the tiered KV benchmark)
    "long": _preset(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                    intermediate_size=2816, vocab_size=32000, max_position_embeddings=131072),
}

#: safetensors dtype tag -> torch dtype
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    SAFETENSORS_DTYPES.update({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})

_DEMO_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_SIDECAR = ".pykernels-demo.json"
_SIDECAR_FORMAT = "pykernels-demo-checkpoint"
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


# --------------------------------------------------------------------------------------------
# Demo checkpoints
# --------------------------------------------------------------------------------------------
def llama_tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes of a Llama checkpoint for ``config``, in file order.

    q [H*D, E], k/v [Hkv*D, E], o [E, H*D], gate/up [F, E], down [E, F], norms [E], embed and
    lm_head [V, E] (lm_head omitted when ``tie_word_embeddings``); biases when
    ``attention_bias`` (q, k, v, o) / ``mlp_bias`` (gate, up, down) are set.
    """
    try:
        E, L = int(config["hidden_size"]), int(config["num_hidden_layers"])
        H, F, V = int(config["num_attention_heads"]), int(config["intermediate_size"]), int(config["vocab_size"])
    except KeyError as e:
        raise ValueError(f"config: missing key {e.args[0]!r}") from None
    Hkv = int(config.get("num_key_value_heads") or H)
    D = int(config.get("head_dim") or E // H)
    out = [("model.embed_tokens.weight", (V, E))]
    for i in range(L):
        p = f"model.layers.{i}."
        out.append((p + "input_layernorm.weight", (E,)))
        for proj, n_out in (("q", H * D), ("k", Hkv * D), ("v", Hkv * D)):
            out.append((p + f"self_attn.{proj}_proj.weight", (n_out, E)))
            if config.get("attention_bias"):
                out.append((p + f"self_attn.{proj}_proj.bias", (n_out,)))
        out.append((p + "self_attn.o_proj.weight", (E, H * D)))
        if config.get("attention_bias"):
            out.append((p + "self_attn.o_proj.bias", (E,)))
        out.append((p + "post_attention_layernorm.weight", (E,)))
        for proj, shp in (("gate", (F, E)), ("up", (F, E)), ("down", (E, F))):
            out.append((p + f"mlp.{proj}_proj.weight", shp))
            if config.get("mlp_bias"):
                out.append((p + f"mlp.{proj}_proj.bias", (shp[0],)))
    out.append(("model.norm.weight", (E,)))
    if not config.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (V, E)))
    return out


def _demo_tensor(name: str, shape: tuple, index: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    # One generator per tensor: any tensor can be regenerated alone, and memory stays at one
    # tensor (float32 temporary) + the shard being assembled.
    g = torch.Generator().manual_seed((seed * 1_000_003 + index) % (1 << 63))
    t = torch.randn(shape, generator=g, dtype=torch.float32)
    if name.endswith("norm.weight"):
        t.mul_(0.1).add_(1.0)                 # norms != 1 so a kernel that ignores them fails tests
    else:
        t.mul_(0.02)                          # matrices and biases ~ N(0, 0.02)
    return t.to(dtype)


def _plan_shards(shapes, itemsize, max_shard_bytes):
    shards, cur, cur_bytes = [], [], 0
    for i, (name, shp) in enumerate(shapes):
        nb = itemsize
        for s in shp:
            nb *= s
        if cur and cur_bytes + nb > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((i, name, shp, nb))
        cur_bytes += nb
    if cur:
        shards.append(cur)
    return shards


_ST_TAGS = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _write_safetensors(file, shard, dtype, make, bar=None):
    """Stream one safetensors file tensor by tensor (memory ~ one tensor, unlike save_file,
    which assembles the whole file in memory): 8-byte LE header length, JSON header padded
    with spaces to a multiple of 8, then the tensors back to back in header order."""
    hdr, off = {"__metadata__": {"format": "pt"}}, 0
    for i, name, shp, nb in shard:
        hdr[name] = {"dtype": _ST_TAGS[dtype], "shape": list(shp), "data_offsets": [off, off + nb]}
        off += nb
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for i, name, shp, nb in shard:
            t = make(i, name, shp)
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
            if bar is not None:
                bar.update(1)


def _read_sidecar(path):
    try:
        with open(os.path.join(path, _SIDECAR)) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("format") == _SIDECAR_FORMAT else None


def _sidecar_complete(path, side) -> bool:
    files = side.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for fname, size in files.items():
        try:
            if os.stat(os.path.join(path, fname)).st_size != size:
                return False
        except OSError:
            return False
    return True


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def demo_checkpoint(path, preset="1b", *, dtype=torch.bfloat16, seed=0, max_shard_bytes=512 << 20,
                    progress=None, config_overrides=None) -> str:
    """Write a deterministic random-init Llama checkpoint in HF format into directory ``path``.

    Matrices ~ N(0, 0.02), norm weights 1 + 0.1 N(0, 1), each tensor from a generator seeded by
    (``seed``, tensor index). Files: ``config.json`` + ``model.safetensors``, or shards
    ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` when the tensors
    exceed ``max_shard_bytes``; a sidecar ``.pykernels-demo.json`` (written last) records the
    parameters. Peak memory ~ one shard (the "1b" preset, ~2.2 GB bf16, in 512 MiB shards).

    Parameters
    ----------
    path : directory to create (its parent must exist). If it already holds a complete demo
        checkpoint with the same (preset, dtype, seed, config_overrides) it is returned as is
        (the shard layout is not part of that identity); a demo checkpoint with other
        parameters is replaced; any other non-empty directory is refused (ValueError).
    preset : a key of ``PRESETS`` ("tiny", "small", "1b", "long").
    dtype : torch.bfloat16 | torch.float16 | torch.float32 (``torch_dtype`` in config.json).
    seed : int >= 0.
    max_shard_bytes : int >= 1; a tensor larger than this gets a shard of its own.
    progress : None/False, or True for a tqdm bar over tensors.
    config_overrides : dict merged into the preset's config (e.g. {"tie_word_embeddings": True,
        "num_hidden_layers": 1, "attention_bias": True}).

    Returns
    -------
    str : ``path`` as an absolute path.

    Example
    -------
    >>> p = demo_checkpoint("/tmp/tiny-llama", "tiny")
    >>> transformers.LlamaForCausalLM.from_pretrained(p)
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    if dtype not in _DEMO_DTYPES:
        raise ValueError(f"dtype: expected one of {list(_DEMO_DTYPES)}, got {dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes: expected an int >= 1, got {max_shard_bytes!r}")
    if progress not in (None, False, True):
        raise ValueError(f"progress: expected None, False or True, got {progress!r}")
    if config_overrides is not None and not isinstance(config_overrides, dict):
        raise ValueError(f"config_overrides: expected a dict or None, got {type(config_overrides).__name__}")
    overrides = dict(config_overrides or {})
    try:
        json.dumps(overrides)
    except TypeError as e:
        raise ValueError(f"config_overrides: must be JSON-serialisable: {e}") from None

    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"path: parent directory {parent!r} does not exist")
    identity = {"preset": preset, "dtype": _DEMO_DTYPES[dtype], "seed": seed, "config_overrides": overrides}

    ours = False
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise ValueError(f"path: {path!r} exists and is not a directory")
        side = _read_sidecar(path)
        if side is not None:
            ours = True
            if side.get("identity") == identity and _sidecar_complete(path, side):
                return path
        elif os.listdir(path):
            raise ValueError(f"path: {path!r} is a non-empty directory that is not a demo checkpoint "
                             f"(no {_SIDECAR}); refusing to write into it")

    config = copy.deepcopy(PRESETS[preset])
    config.update(copy.deepcopy(overrides))
    config["torch_dtype"] = _DEMO_DTYPES[dtype]
    shapes = llama_tensor_shapes(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(shapes, itemsize, max_shard_bytes)
    n = len(shards)
    fnames = [_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(s) for s in shards), desc=f"demo checkpoint {preset}", unit="tensor")
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        weight_map, total, files = {}, 0, {}
        for fname, shard in zip(fnames, shards):
            _write_safetensors(os.path.join(tmp, fname), shard, dtype,
                               lambda i, name, shp: _demo_tensor(name, shp, i, seed, dtype), bar)
            for i, name, shp, nb in shard:
                weight_map[name] = fname
                total += nb
        if n > 1:
            with open(os.path.join(tmp, _INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        for fname in os.listdir(tmp):
            fd = os.open(os.path.join(tmp, fname), os.O_RDONLY)
            try:
                os.fsync(fd)
                files[fname] = os.fstat(fd).st_size
            finally:
                os.close(fd)
        side = {"format": _SIDECAR_FORMAT, "version": 1, "identity": identity, "files": files}
        with open(os.path.join(tmp, _SIDECAR), "w") as f:   # written last: marks the set complete
            json.dump(side, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if ours:
            # Replace our own stale checkpoint: move it aside first so ``path`` is never half-written.
            old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)                  # replaces an empty directory atomically too
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return path


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def _read_header(file: str) -> tuple[dict, int]:
    """-> (tensor entries, data start offset) of one .safetensors file, reading only its header."""
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{file}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"{file}: not a safetensors file (header length {n} for a {size}-byte file)")
        try:
            hdr = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{file}: bad safetensors header: {e}") from None
    if not isinstance(hdr, dict):
        raise ValueError(f"{file}: bad safetensors header (not a JSON object)")
    hdr.pop("__metadata__", None)
    start = 8 + n
    for name, e in hdr.items():
        try:
            b, end = e["data_offsets"]
            dt, shape = e["dtype"], tuple(e["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{file}: bad safetensors header entry for {name!r}: {e!r}") from None
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (b, end, *shape)):
            raise ValueError(f"{file}: bad safetensors header entry for {name!r}: data_offsets and shape must be "
                             f"integers >= 0, got {e!r}")
        if dt not in SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {dt!r}")
        numel = 1
        for s in shape:
            numel *= s
        want = numel * torch.empty((), dtype=SAFETENSORS_DTYPES[dt]).element_size()
        if end - b != want or b < 0 or start + end > size:
            raise ValueError(f"{file}: tensor {name!r} data_offsets {[b, end]} do not fit its "
                             f"{dt}{list(shape)} ({want} bytes) inside the {size}-byte file")
    return hdr, start


class Checkpoint:
    """Read-only view of a Hugging Face safetensors checkpoint directory.

    Parameters
    ----------
    path : directory with ``config.json`` and ``model.safetensors`` or
        ``model.safetensors.index.json`` (+ the shards it names).

    Attributes
    ----------
    path : str (absolute);  config : dict (config.json);  names : list[str] (all tensor names,
    in file order).

    Example
    -------
    >>> ck = Checkpoint(demo_checkpoint("/tmp/tiny-llama", "tiny"))
    >>> ck.meta("model.embed_tokens.weight")
    (torch.bfloat16, (256, 64))
    """

    def __init__(self, path):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"path: checkpoint directory {self.path!r} does not exist")
        cfg = os.path.join(self.path, "config.json")
        if not os.path.isfile(cfg):
            raise FileNotFoundError(f"path: {cfg!r} is missing (not an HF checkpoint directory)")
        try:
            with open(cfg) as f:
                self.config = json.load(f)
        except ValueError as e:
            raise ValueError(f"{cfg}: not valid JSON: {e}") from None
        if not isinstance(self.config, dict):
            raise ValueError(f"{cfg}: expected a JSON object")
        self._files = ["config.json"]
        index = os.path.join(self.path, _INDEX)
        single = os.path.join(self.path, _SINGLE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    wm = json.load(f)["weight_map"]
                if not isinstance(wm, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{index}: expected JSON with a 'weight_map' object") from None
            self._files.append(_INDEX)
            shard_files = list(dict.fromkeys(wm.values()))
        elif os.path.isfile(single):
            wm, shard_files = None, [_SINGLE]
        else:
            raise FileNotFoundError(f"path: neither {single!r} nor {index!r} exists")
        self._where = {}                            # name -> (file, dtype tag, shape, abs offset, nbytes)
        for fname in shard_files:
            full = os.path.join(self.path, fname)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{index}: names shard {fname!r}, but {full!r} is missing")
            hdr, start = _read_header(full)
            self._files.append(fname)
            for name, e in sorted(hdr.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if wm is not None and wm.get(name) != fname:
                    continue                        # listed elsewhere (or not at all) in the index
                b, end = e["data_offsets"]
                self._where[name] = (full, e["dtype"], tuple(int(s) for s in e["shape"]), start + b, end - b)
        if wm is not None:
            missing = [n for n in wm if n not in self._where]
            if missing:
                raise ValueError(f"{index}: {len(missing)} tensors are not in their shards, e.g. {missing[:3]}")
        self.names = list(self._where)

    def _entry(self, name):
        try:
            return self._where[name]
        except KeyError:
            raise KeyError(f"name: no tensor {name!r} in checkpoint {self.path!r}") from None

    def meta(self, name) -> tuple[torch.dtype, tuple]:
        """(dtype, shape) of tensor ``name`` from the safetensors header (no data read)."""
        _, dt, shape, _, _ = self._entry(name)
        return SAFETENSORS_DTYPES[dt], shape

    def nbytes(self, name) -> int:
        """Bytes of tensor ``name``'s data."""
        return self._entry(name)[4]

    def load(self, name) -> torch.Tensor:
        """Tensor ``name`` as a new CPU tensor (reads only its bytes; the file is opened read-only)."""
        file, dt, shape, off, nb = self._entry(name)
        buf = bytearray(nb)
        mv = memoryview(buf)
        fd = os.open(file, os.O_RDONLY)
        try:
            got = 0
            while got < nb:
                k = os.preadv(fd, [mv[got:]], off + got)
                if k == 0:
                    raise ValueError(f"{file}: tensor {name!r} ends past the end of the file "
                                     f"(read {got} of {nb} bytes at offset {off})")
                got += k
        finally:
            os.close(fd)
        dtype = SAFETENSORS_DTYPES[dt]
        if nb == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def fingerprint(self) -> dict:
        """{file: [size, mtime_ns]} for config.json, the index and every shard (resume checks)."""
        out = {}
        for fname in self._files:
            st = os.stat(os.path.join(self.path, fname))
            out[fname] = [st.st_size, st.st_mtime_ns]
        return out

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, {len(self.names)} tensors, {len(self._files) - 1} files)"
