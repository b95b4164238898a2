"""offload.checkpoint (demo writer, HF reader) and offload.store (conversion, checked reads)."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from offload import store
from offload.checkpoint import Checkpoint, demo_checkpoint
from offload.store import ALIGN, CorruptPageError, IncompleteStoreError, Store, StoreError, convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny: hidden 64, intermediate 176 -> 16 is the largest multiple of 8 dividing every K
GS = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return demo_checkpoint(str(tmp_path_factory.mktemp("ck") / "tiny"), "tiny")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return demo_checkpoint(str(tmp_path_factory.mktemp("ck") / "small"), "small")


def _hash_dir(path):
    out = {}
    for f in sorted(os.listdir(path)):
        with open(os.path.join(path, f), "rb") as fh:
            out[f] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _crcs(st):
    return {u: [p[2] for p in st.pages(u)] for u in st.unit_names()}


def _expected(ck, unit, name):
    """Source tensor for a stored (unit, name)."""
    if unit == "embed":
        return ck.load(name)
    if unit == "head":
        src = {"norm.weight": "model.norm.weight"}.get(name, name)
        if src not in ck.names:
            src = "model.embed_tokens.weight"           # tied
        return ck.load(src)
    return ck.load(f"model.layers.{unit.split('.')[1]}.{name}")


# --------------------------------------------------------------------------------------------
# checkpoint
# --------------------------------------------------------------------------------------------
def test_demo_loads_in_transformers(tiny):
    transformers = pytest.importorskip("transformers")
    m = transformers.LlamaForCausalLM.from_pretrained(tiny)
    sd = m.state_dict()
    ck = Checkpoint(tiny)
    assert set(ck.names) == set(sd)
    for n in ck.names:
        t = ck.load(n)
        assert ck.meta(n) == (t.dtype, tuple(t.shape)) and ck.nbytes(n) == t.numel() * 2
        assert torch.equal(sd[n], t), n
    norm = ck.load("model.layers.0.input_layernorm.weight").float()
    assert (norm - 1).abs().max() > 0.05                # norms are not all ones


def test_demo_sharded_index_and_deterministic(tmp_path, tiny):
    p = demo_checkpoint(str(tmp_path / "sh"), "tiny", max_shard_bytes=40_000)
    files = os.listdir(p)
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    idx = json.load(open(os.path.join(p, "model.safetensors.index.json")))
    assert set(idx["weight_map"].values()) == set(shards)
    a, b = Checkpoint(p), Checkpoint(tiny)
    assert idx["metadata"]["total_size"] == sum(a.nbytes(n) for n in a.names)
    assert sorted(a.names) == sorted(b.names)
    for n in a.names:                                   # same tensors regardless of sharding
        assert torch.equal(a.load(n), b.load(n))
    assert set(a.fingerprint()) == {"config.json", "model.safetensors.index.json", *shards}


def test_demo_idempotent_and_replaces_own(tmp_path):
    p = str(tmp_path / "c")
    demo_checkpoint(p, "tiny", seed=1)
    st = os.stat(os.path.join(p, "model.safetensors")).st_mtime_ns
    demo_checkpoint(p, "tiny", seed=1)
    assert os.stat(os.path.join(p, "model.safetensors")).st_mtime_ns == st
    demo_checkpoint(p, "tiny", seed=2, dtype=torch.float32)       # ours, other params: rewritten
    assert Checkpoint(p).meta("lm_head.weight")[0] == torch.float32
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".c.")]


def test_demo_refuses_foreign_dir_and_bad_args(tmp_path):
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="path"):
        demo_checkpoint(str(d), "tiny")
    assert os.listdir(d) == ["notes.txt"]
    for kw, arg in [({"preset": "huge"}, "preset"), ({"dtype": torch.int8}, "dtype"), ({"seed": -1}, "seed"),
                    ({"max_shard_bytes": 0}, "max_shard_bytes"), ({"config_overrides": 3}, "config_overrides")]:
        with pytest.raises(ValueError, match=arg):
            demo_checkpoint(str(tmp_path / "x"), **{"preset": "tiny", **kw})


def test_checkpoint_errors(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="nope"):
        Checkpoint(str(tmp_path / "nope"))
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Checkpoint(str(d))
    shutil.copy(os.path.join(tiny, "config.json"), d)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Checkpoint(str(d))
    (d / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="model.safetensors"):
        Checkpoint(str(d))
    (d / "config.json").write_text("{bad")
    with pytest.raises(ValueError, match="config.json"):
        Checkpoint(str(d))


# --------------------------------------------------------------------------------------------
# convert + read
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tied", [False, True])
def test_convert_roundtrip_exact(tmp_path, dtype, tied):
    over = {"tie_word_embeddings": True, "attention_bias": True} if tied else None
    src = demo_checkpoint(str(tmp_path / "ck"), "tiny", dtype=dtype, config_overrides=over)
    before = _hash_dir(src)
    ck = Checkpoint(src)
    st = convert(src, str(tmp_path / "st"))
    assert st.unit_names() == ["embed", "layer.0", "layer.1", "head"]
    assert st.config == ck.config and st.weight_bits is None
    assert st.read_mode == "direct", st.read_mode_reason     # /tmp is ext4 here: O_DIRECT is used
    n_src = 0
    for u in st.unit_names():
        e = st.units[u]
        size = os.path.getsize(os.path.join(st.store_dir, e["file"]))
        assert size == st.unit_nbytes(u) and size % ALIGN == 0
        assert all(t["offset"] % ALIGN == 0 for t in e["tensors"].values())
        assert st.tensor_nbytes(u) == sum(t["nbytes"] for t in e["tensors"].values()) <= size
        buf = st.read_unit(u)
        v = st.views(u, buf)
        for name, t in v.items():
            ref = _expected(ck, u, name)
            assert t.dtype == dtype and torch.equal(t, ref), (u, name)
            n_src += 1
        if u.startswith("layer"):
            assert "self_attn.q_proj.weight" in v and "mlp.down_proj.weight" in v
            assert ("self_attn.q_proj.bias" in v) == tied
    assert n_src == len(ck.names) + (1 if tied else 0)
    rows = [7, 0, 255, 7]
    assert torch.equal(st.read_rows("embed", "model.embed_tokens.weight", rows),
                       ck.load("model.embed_tokens.weight")[rows])
    assert _hash_dir(src) == before                          # source untouched
    st.close()


@pytest.mark.parametrize("bits", [4, 2])
def test_convert_quantized_matches_quantize_weight(tmp_path, tiny, bits):
    import pykernels
    ck = Checkpoint(tiny)
    st = convert(ck, str(tmp_path / "st"), weight_bits=bits, group_size=GS, quantize_head=(bits == 2))
    buf = st.alloc(st.unit_nbytes("layer.1"))
    st.read_unit("layer.1", buf)
    ts = st.tensors("layer.1", buf)
    for name in store._PROJ:
        qw = ts[name]
        assert isinstance(qw, pykernels.LUTWeight) and qw.bits == bits
        ref = pykernels.quantize_weight(ck.load(f"model.layers.1.{name}").float(), bits=bits, group_size=GS,
                                        scheme="affine")
        assert torch.equal(qw.dequantize(), ref.dequantize()), name
    assert ts["input_layernorm.weight"].dtype == torch.bfloat16
    assert qw.planes.data_ptr() == torch.frombuffer(buf, dtype=torch.uint8).data_ptr() + \
        st.units["layer.1"]["tensors"]["mlp.down_proj.planes"]["offset"]            # zero-copy
    head = st.tensors("head", st.read_unit("head"))
    assert isinstance(head["lm_head.weight"], pykernels.LUTWeight) == (bits == 2)


def test_read_page_threads_and_fallback_mode(tmp_path, small):
    from concurrent.futures import ThreadPoolExecutor
    st = convert(small, str(tmp_path / "st"))
    u = "embed"                                               # 1024 x 256 bf16 = 512 KiB
    ref = bytes(st.read_unit(u))
    buf = st.alloc(st.unit_nbytes(u))
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda i: st.read_page(u, i, buf), range(len(st.pages(u)))))
    assert bytes(buf) == ref
    with Store(st.store_dir, direct=False) as sb:               # buffered + DONTNEED path
        assert sb.read_mode == "buffered"
        assert bytes(sb.read_unit(u)) == ref
    with pytest.raises(ValueError, match="buf"):
        st.read_unit(u, bytearray(10))
    with pytest.raises(ValueError, match="unit"):
        st.unit_nbytes("layer.99")
    with pytest.raises(ValueError, match="rows"):
        st.read_rows(u, "model.embed_tokens.weight", [1024])


def test_multi_page_unit_and_rows(tmp_path):
    # vocab 9000 x 256 fp32 = 9.2 MB embedding: 3 pages; rows straddle page boundaries
    src = demo_checkpoint(str(tmp_path / "ck"), "tiny", dtype=torch.float32,
                          config_overrides={"vocab_size": 9000, "hidden_size": 256, "intermediate_size": 64,
                                            "num_hidden_layers": 1})
    st = convert(src, str(tmp_path / "st"))
    assert len(st.pages("embed")) == 3 and st.pages("embed")[-1][1] % ALIGN == 0
    ck = Checkpoint(src)
    rows = [0, 4095, 4096, 8191, 8999, 4096]
    assert torch.equal(st.read_rows("embed", "model.embed_tokens.weight", rows),
                       ck.load("model.embed_tokens.weight")[rows])


def _corrupt(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_corrupt_page(tmp_path):
    src = demo_checkpoint(str(tmp_path / "ck"), "tiny", dtype=torch.float32,
                          config_overrides={"vocab_size": 9000, "hidden_size": 256, "intermediate_size": 64,
                                            "num_hidden_layers": 1})
    st = convert(src, str(tmp_path / "st"))
    f = os.path.join(st.store_dir, "embed.bin")
    page = store.PAGE_BYTES
    _corrupt(f, page + 12345)                                  # page 1
    with pytest.raises(CorruptPageError) as ei:
        st.read_unit("embed")
    assert ei.value.file == f and ei.value.offset == page and ei.value.expected == st.pages("embed")[1][2]
    assert f in str(ei.value) and str(page) in str(ei.value)
    row_in_p1 = (page + 12345) // (256 * 4)
    assert st.read_rows("embed", "model.embed_tokens.weight", [0, 1]).shape == (2, 256)   # page 0 fine
    with pytest.raises(CorruptPageError) as ei:
        st.read_rows("embed", "model.embed_tokens.weight", [row_in_p1])
    assert ei.value.offset == page
    with pytest.raises(CorruptPageError):
        st.read_page("embed", 1, st.alloc(st.unit_nbytes("embed")))


def test_truncated_missing_manifest(tmp_path, tiny):
    st = convert(tiny, str(tmp_path / "st"))
    d = st.store_dir
    st.close()
    f = os.path.join(d, "layer.1.bin")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - ALIGN)
    with pytest.raises(StoreError, match=rf"layer\.1\.bin.*{size - ALIGN}.*{size}"):
        Store(d)
    os.unlink(f)
    with pytest.raises(StoreError, match=r"layer\.1\.bin.*missing"):
        Store(d)
    os.unlink(os.path.join(d, "manifest.json"))
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        Store(d)


def test_truncated_after_open(tmp_path, tiny):
    st = convert(tiny, str(tmp_path / "st"))
    f = os.path.join(st.store_dir, "layer.0.bin")
    os.truncate(f, ALIGN)
    with pytest.raises(StoreError, match=r"layer\.0\.bin.*short read at offset 4096"):
        st.read_unit("layer.0")


def test_store_dir_guards_and_bad_args(tmp_path, tiny):
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="store_dir"):
        convert(tiny, str(d))
    assert os.listdir(d) == ["keep.txt"]
    for kw, arg in [({"weight_bits": 5}, "weight_bits"), ({"weight_bits": True}, "weight_bits"),
                    ({"weight_bits": 4, "group_size": 12}, "group_size"),
                    ({"weight_bits": 4, "group_size": 128}, "group_size"),    # does not divide K=64
                    ({"quantize_head": 1}, "quantize_head"), ({"progress": "yes"}, "progress"),
                    ({"weight_bits": 4.0, "group_size": 16}, "weight_bits")]:
        with pytest.raises(ValueError, match=arg):
            convert(tiny, str(tmp_path / "new"), **kw)
        assert not os.path.exists(tmp_path / "new")
    with pytest.raises(TypeError, match="checkpoint"):
        convert(123, str(tmp_path / "new"))


def test_only_temp_files_of_a_killed_first_run_do_not_block_it(tmp_path, tiny):
    """A run killed while writing its first progress.json leaves only progress.json.tmp: the
    next run clears it and converts (a foreign file still blocks, as above)."""
    d = tmp_path / "st"
    d.mkdir()
    (d / "progress.json.tmp").write_bytes(b'{"form')
    (d / "layer.0.bin.tmp").write_bytes(b"\0" * 100)
    with convert(tiny, str(d)) as st:
        assert sorted(os.listdir(d)) == sorted(["manifest.json"] + [st.units[u]["file"] for u in st.unit_names()])


def test_unquantized_store_is_not_rewritten_for_an_unused_group_size(tmp_path, tiny):
    d = str(tmp_path / "st")
    convert(tiny, d).close()
    m0 = os.stat(os.path.join(d, "layer.0.bin")).st_mtime_ns
    with convert(tiny, d, group_size=64, quantize_head=True) as st:  # both meaningless without weight_bits
        assert st.weight_bits is None
    assert os.stat(os.path.join(d, "layer.0.bin")).st_mtime_ns == m0


@pytest.mark.parametrize("direct", [True, False])
def test_reads_after_close_and_empty_rows(tmp_path, tiny, direct):
    d = str(tmp_path / "st")
    convert(tiny, d).close()
    st = Store(d, direct=direct)
    name = next(iter(st.units["embed"]["tensors"]))
    assert st.read_rows("embed", name, []).shape[0] == 0
    st.close()
    for call in (lambda: st.read_unit("layer.0"), lambda: st.read_rows("embed", name, [0])):
        with pytest.raises(StoreError, match="closed"):
            call()


@pytest.mark.parametrize("entry", [{"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]},
                                   {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]},
                                   {"dtype": "F32", "shape": [-2], "data_offsets": [8, 0]},
                                   {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}])
def test_malformed_safetensors_header_names_the_file(tmp_path, tiny, entry):
    d = tmp_path / "ck"
    d.mkdir()
    shutil.copy(os.path.join(tiny, "config.json"), d)
    hdr = json.dumps({"t": entry}).encode()
    (d / "model.safetensors").write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\0" * 8)
    with pytest.raises(ValueError, match="model.safetensors.*integers >= 0"):
        Checkpoint(str(d))


def test_resume_after_interrupt_and_options_change(tmp_path, tiny):
    one = convert(tiny, str(tmp_path / "one"), weight_bits=4, group_size=GS)
    d = str(tmp_path / "st")
    with pytest.raises(RuntimeError, match="simulated"):
        convert(tiny, d, weight_bits=4, group_size=GS, _fail_after_units=2)
    with pytest.raises(IncompleteStoreError, match="run convert again"):
        Store(d)
    mt = os.stat(os.path.join(d, "embed.bin")).st_mtime_ns
    st = convert(tiny, d, weight_bits=4, group_size=GS, progress=True)
    assert os.stat(os.path.join(d, "embed.bin")).st_mtime_ns == mt        # not rewritten
    assert _crcs(st) == _crcs(one)
    mt = os.stat(os.path.join(d, "manifest.json")).st_mtime_ns
    assert convert(tiny, d, weight_bits=4, group_size=GS).manifest == st.manifest      # complete: no-op
    assert os.stat(os.path.join(d, "manifest.json")).st_mtime_ns == mt
    # options change on a partial store: restart (embed rewritten), foreign files kept
    with pytest.raises(RuntimeError):
        convert(tiny, str(tmp_path / "p"), weight_bits=4, group_size=GS, _fail_after_units=2)
    (tmp_path / "p" / "mine.txt").write_text("x")
    st2 = convert(tiny, str(tmp_path / "p"), weight_bits=2, group_size=GS)
    assert st2.weight_bits == 2 and os.path.exists(tmp_path / "p" / "mine.txt")
    assert _crcs(st2) == _crcs(convert(tiny, str(tmp_path / "two"), weight_bits=2, group_size=GS))
    # options change on a complete store: restart
    st3 = convert(tiny, d)
    assert st3.weight_bits is None and _crcs(st3) != _crcs(one)


_CHILD = textwrap.dedent("""
    import os, resource, signal, sys, time
    sys.path.insert(0, {root!r})
    from offload import store
    limit = int(sys.argv[3])
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    slow = sys.argv[4] == "slow"
    if slow:                             # widen the window between units so the kill lands mid-run
        orig = store._write_unit
        def _write_unit(*a, **k):
            time.sleep(0.3)
            return orig(*a, **k)
        store._write_unit = _write_unit
    try:
        store.convert(sys.argv[1], sys.argv[2])
    except store.StoreError as e:
        print("STOREERROR", e)
        sys.exit(3)
""")


def _child(tmp_path, src, d, limit=0, slow=False):
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=ROOT))
    return subprocess.Popen([sys.executable, str(script), src, d, str(limit), "slow" if slow else "fast"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_conversion_resumes_identically(tmp_path, small):
    one = convert(small, str(tmp_path / "one"))
    d = str(tmp_path / "st")
    p = _child(tmp_path, small, d, slow=True)
    deadline = time.time() + 30
    while not os.path.exists(os.path.join(d, "layer.0.bin")):
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(d, "manifest.json"))
    with pytest.raises(IncompleteStoreError, match="incomplete: run convert again to resume"):
        Store(d)
    st = convert(small, d)
    assert _crcs(st) == _crcs(one) and st.units == one.units
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]


def test_disk_full_precheck(tmp_path, tiny, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=50_000))
    d = tmp_path / "st"
    with pytest.raises(StoreError, match=r"st.*50000 bytes free.*needs \d+ bytes"):
        convert(tiny, str(d))
    assert not d.exists() or os.listdir(d) == []


def test_disk_full_mid_write_rlimit(tmp_path, small):
    d = str(tmp_path / "st")
    # "small": embed 512 KiB, each layer ~1.3 MiB: a 1 MiB file-size limit fails inside layer.0
    p = _child(tmp_path, small, d, limit=1 << 20)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 3, out
    assert "STOREERROR disk full while writing" in out and ".bin.tmp" in out
    files = os.listdir(d)
    assert not [f for f in files if f.endswith(".tmp")] and "manifest.json" not in files
    jour = json.load(open(os.path.join(d, "progress.json")))
    assert jour["units"] and set(jour["units"]) < {"embed", "layer.0", "layer.1", "layer.2", "layer.3", "head"}
    st = convert(small, d)
    assert _crcs(st) == _crcs(convert(small, str(tmp_path / "one")))


def test_disk_full_tmpfs(tmp_path, small):
    if os.geteuid() != 0:
        pytest.skip("tmpfs-full case needs root to mount a tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"mount -t tmpfs not permitted here: {r.stderr.strip()}")
    try:
        d = str(mnt / "st")
        # the store needs ~6.3 MiB; beat the pre-check so the real ENOSPC happens mid-write
        real = shutil.disk_usage
        orig = shutil.disk_usage
        shutil.disk_usage = lambda p: real(p)._replace(free=1 << 40)
        try:
            with pytest.raises(StoreError, match="disk full while writing"):
                convert(small, d)
        finally:
            shutil.disk_usage = orig
        assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
        assert json.load(open(os.path.join(d, "progress.json")))["units"]
        with pytest.raises(StoreError, match="bytes free"):                  # honest pre-check
            convert(small, d)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_interrupted_discard_stays_ours_and_resumes(tmp_path, tiny, monkeypatch):
    sd = str(tmp_path / "st")
    convert(tiny, sd).close()
    real = store._unlink_quiet
    calls = []

    def dying(path):
        calls.append(path)
        if len(calls) == 3:  # manifest and one unit file gone, the rest still there
            raise KeyboardInterrupt
        real(path)

    monkeypatch.setattr(store, "_unlink_quiet", dying)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny, sd, weight_bits=4, group_size=16)
    monkeypatch.setattr(store, "_unlink_quiet", real)
    with pytest.raises(IncompleteStoreError):
        Store(sd)
    with convert(tiny, sd, weight_bits=4, group_size=16) as st:  # recognised as ours, converted
        assert st.weight_bits == 4
