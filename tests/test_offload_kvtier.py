"""offload.TieredKVCache: exact attention over window + CPU pages + disk pages (every KV format,
odd lengths), prefill across tiers, the approximate mode, page checksums, disk budgets and
free-space checks, memory accounting, and OffloadedModel spilling its KV during generation.

Reference: attention in float64 over ``cache.dequantize(layer)`` (the tokens as the cache stores
them: pages dequantized with ``pykernels.kv_format``, window rows exact); and the same tokens in
an all-in-memory cache (``cpu_pages=None``) or, for plain pages, ``pk.decode_attention`` on one
dense tensor.
"""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import offload
import pykernels as pk
from offload import kvtier
from offload.kvtier import TieredKVCache
from offload.llama import LlamaConfig
from offload.store import CorruptPageError, StoreError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(Hq=8, Hkv=2, D=32, L=2):
    return LlamaConfig.from_hf(dict(model_type="llama", hidden_size=Hq * D, num_attention_heads=Hq,
                                    num_key_value_heads=Hkv, num_hidden_layers=L, intermediate_size=64,
                                    vocab_size=64, head_dim=D, max_position_embeddings=8192))


def _ref(q, K, V):
    """float64 attention of q [B, Hq, D] over K, V [B, n, Hkv, D] -> [B, Hq, D]."""
    B, Hq, D = q.shape
    Hkv = K.shape[2]
    qq = q.double().view(B, Hkv, Hq // Hkv, D)
    s = torch.einsum("bhgd,bnhd->bhgn", qq, K.double()) / math.sqrt(D)
    return torch.einsum("bhgn,bnhd->bhgd", torch.softmax(s, -1), V.double()).reshape(B, Hq, D)


def _kv(g, B, T, Hkv, D):
    k = torch.randn(B, T, Hkv, D, generator=g)
    k[..., 3] *= 8  # an outlier key channel, as real keys have
    return k, torch.randn(B, T, Hkv, D, generator=g)


# tolerance of float32 kernels + merges against float64 (|out| ~ 1)
TOL = 2e-5


@pytest.mark.parametrize("kv_bits", [None, 8, 4, 2, "fp8"])
@pytest.mark.parametrize("B,Hkv,D", [(1, 2, 32), (2, 1, 80)])
def test_decode_is_exact_over_all_tiers(tmp_path, kv_bits, B, Hkv, D):
    cfg = _cfg(Hq=4 * Hkv, Hkv=Hkv, D=D)
    gs = 32
    kw = dict(kv_bits=kv_bits, group_size=gs, residual=None if kv_bits is None else 32, page_tokens=64,
              dtype=torch.bfloat16)
    tiered = TieredKVCache(cfg, B, 700, cpu_pages=2, disk_dir=tmp_path, **kw)
    memory = TieredKVCache(cfg, B, 700, cpu_pages=None, **kw)  # every page in the CPU pool
    # quantized: pk.QuantizedKVCache with the same format holds exactly the same values
    qref = None if kv_bits is None else [
        pk.QuantizedKVCache(B, 700, Hkv, D, bits=kv_bits, group_size=gs, residual=32, dtype=torch.bfloat16)
        for _ in range(cfg.num_layers)]
    g = torch.Generator().manual_seed(1)
    k, v = _kv(g, B, 37, Hkv, D)  # an odd prompt, then single tokens
    for layer in range(cfg.num_layers):
        for c in (tiered, memory):
            c.append(layer, k, v)
        if qref:
            qref[layer].append(k, v)
    tiered.advance(37)
    memory.advance(37)
    checked = 0
    for step in range(37, 411):
        for layer in range(cfg.num_layers):
            q = torch.randn(B, 1, cfg.num_heads, D, generator=g).bfloat16()
            k, v = _kv(g, B, 1, Hkv, D)
            o = tiered.decode_attend(layer, q, k.bfloat16(), v.bfloat16())
            o_mem = memory.decode_attend(layer, q, k.bfloat16(), v.bfloat16())
            if qref:
                qref[layer].append(k.bfloat16(), v.bfloat16())
            if step in (37, 100, 203, 333, 410):
                K, V = tiered.dequantize(layer)
                assert K.shape[1] == step + 1
                if qref:  # the same tokens quantized at the same moments: identical values
                    qk, qv = qref[layer].dequantize()
                    assert torch.equal(K, qk) and torch.equal(V, qv)
                    o_q = pk.decode_attention(q[:, 0], qref[layer])
                    torch.testing.assert_close(o[:, 0], o_q, atol=2 ** -7 * float(o_q.abs().max()), rtol=0)
                ref = _ref(q[:, 0].float(), K, V)
                # bf16 output: one rounding (half an ulp, 2^-8 relative) of a value <= max|out|;
                # tiered vs in-memory: the same kernels over other page groupings, merged in
                # float32, so at most one ulp apart
                top = float(ref.abs().max())
                torch.testing.assert_close(o, o_mem, atol=2 ** -7 * top, rtol=0)
                # vs float64: plus, for int4 / int2 keys on the avx512_bf16 kernel, q * key scale
                # rounded to bf16 (2^-9 relative per score term; tests/test_kv_cpu.py derives it)
                tol = 2 ** -8 * top + (2e-2 * top if kv_bits in (4, 2) else 1e-6)
                torch.testing.assert_close(o[:, 0].double(), ref, atol=tol, rtol=0)
                checked += 1
        tiered.advance(1)
        memory.advance(1)
    t = tiered.tier_tokens(0)
    assert t["disk"] > 0 and t["cpu"] == 2 * 64 and sum(t.values()) == 411
    assert memory.tier_tokens(0)["disk"] == 0 and memory.disk_bytes == 0
    assert checked == 5 * cfg.num_layers
    assert tiered.stats["disk_bytes"] > 0 and tiered.stats["pages_read"] > 0
    tiered.close()
    memory.close()


def test_plain_pages_match_decode_attention_on_one_dense_cache(tmp_path):
    cfg = _cfg(Hq=8, Hkv=2, D=64, L=1)
    c = TieredKVCache(cfg, 2, 1100, page_tokens=128, cpu_pages=3, disk_dir=tmp_path, dtype=torch.float32,
                      max_append=128)
    g = torch.Generator().manual_seed(2)
    k, v = _kv(g, 2, 1029, 2, 64)
    for s in range(0, 1029, 128):
        c.append(0, k[:, s:s + 128], v[:, s:s + 128])
        c.advance(k[:, s:s + 128].shape[1])
    q = torch.randn(2, 1, 8, 64, generator=g)
    k1, v1 = _kv(g, 2, 1, 2, 64)
    o = c.decode_attend(0, q, k1, v1)
    K, V = torch.cat((k, k1), 1), torch.cat((v, v1), 1)
    dense = pk.decode_attention(q[:, 0], K, V, torch.full((2,), 1030, dtype=torch.int32))
    torch.testing.assert_close(o[:, 0], dense, atol=TOL, rtol=0)
    assert c.tier_tokens(0) == {"window": 6, "cpu": 3 * 128, "disk": 5 * 128}
    c.close()


@pytest.mark.parametrize("cpu_pages", [0, 1])
@pytest.mark.parametrize("kv_bits", [None, 4])
@pytest.mark.parametrize("page,old,T", [(64, 300, 45), (256, 600, 150)])
def test_prefill_is_causal_and_exact_over_all_tiers(tmp_path, kv_bits, cpu_pages, page, old, T):
    # cpu_pages=0: the page sealed during the prefill's append (holding some of its new tokens,
    # quantized) goes straight to disk, and must be read only up to the old tokens. T=150: a
    # chunk longer than the 64-query attention block (OffloadedModel's longer prefill chunks)
    cfg = _cfg(L=1)
    c = TieredKVCache(cfg, 1, old + T + 64, kv_bits=kv_bits, residual=None if kv_bits is None else 32,
                      page_tokens=page, cpu_pages=cpu_pages, disk_dir=tmp_path, dtype=torch.float32,
                      max_append=max(T, 64))
    g = torch.Generator().manual_seed(3)
    k, v = _kv(g, 1, old, 2, 32)
    for s in range(0, old, 64):
        c.append(0, k[:, s:s + 64], v[:, s:s + 64])
        c.advance(k[:, s:s + 64].shape[1])
    assert c.tier_tokens(0)["disk"] > 0
    q = torch.randn(1, T, 8, 32, generator=g)
    kn, vn = _kv(g, 1, T, 2, 32)
    o = c.prefill_attend(0, q, kn, vn)
    K, V = c.dequantize(0)
    assert K.shape[1] == old + T
    for i in sorted({0, 17, 63, 64, 100, T - 1} & set(range(T))):
        # query i sees the old tokens as the cache holds them after the append and new tokens
        # 0..i in full precision (offload.llama.KVCache's rule)
        ref = _ref(q[:, i], torch.cat((K[:, :old], kn[:, :i + 1]), 1), torch.cat((V[:, :old], vn[:, :i + 1]), 1))
        torch.testing.assert_close(o[:, i].double(), ref, atol=TOL, rtol=0)
    c.advance(T)
    c.close()


def test_approximate_mode_reads_the_pages_that_matter_and_counts_the_rest(tmp_path):
    cfg = _cfg(Hq=4, Hkv=1, D=32, L=1)
    S, n_pages = 64, 12
    exact = TieredKVCache(cfg, 1, S * n_pages + 8, page_tokens=S, cpu_pages=0, disk_dir=tmp_path,
                          dtype=torch.float32)
    approx = TieredKVCache(cfg, 1, S * n_pages + 8, page_tokens=S, cpu_pages=0, disk_dir=tmp_path,
                           dtype=torch.float32, approx=0.25, approx_audit=1)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 1, 4, 32, generator=g)
    direction = q[0, 0].mean(0)
    for p in range(n_pages):
        k, v = _kv(g, 1, S, 1, 32)
        k = k * 0.1
        if p in (2, 7):  # two pages hold the keys this query attends to
            k[0] += 12 * direction / direction.norm()  # every token: scores ~6 above the rest
        for c in (exact, approx):
            c.append(0, k, v)
            c.advance(S)
    k1, v1 = _kv(g, 1, 1, 1, 32)
    o_exact = exact.decode_attend(0, q, k1 * 0.1, v1)
    o_approx = approx.decode_attend(0, q, k1 * 0.1, v1)
    st = approx.stats
    # ceil(0.25 * 12) = 3 of 12 pages, then the audit (approx_audit=1) reads all 12 for the exact output
    assert st["pages_read"] == 3 + n_pages and st["pages_skipped"] == n_pages - 3
    assert st["disk_bytes"] == (3 + n_pages) * approx.page_bytes
    cos = torch.nn.functional.cosine_similarity(o_exact.flatten(), o_approx.flatten(), dim=0)
    assert cos > 0.99, cos
    # the audit reports the cosine the test computes
    assert st["approx_audits"] == 1 and abs(st["approx_cosine_min"] - float(cos)) < 1e-5
    # approx=1.0 reads every page and equals the exact mode
    full = TieredKVCache(cfg, 1, S * n_pages + 8, page_tokens=S, cpu_pages=0, disk_dir=tmp_path,
                         dtype=torch.float32, approx=1.0)
    K, V = exact.dequantize(0)
    for p in range(n_pages):
        full.append(0, K[:, p * S:(p + 1) * S], V[:, p * S:(p + 1) * S])
        full.advance(S)
    torch.testing.assert_close(full.decode_attend(0, q, k1 * 0.1, v1), o_exact, atol=TOL, rtol=0)
    assert full.stats["pages_skipped"] == 0
    for c in (exact, approx, full):
        c.close()


def _filled(tmp_path, n=5, extra=8, **kw):
    cfg = _cfg(L=1)
    c = TieredKVCache(cfg, 1, 64 * n + extra, page_tokens=64, cpu_pages=1, disk_dir=tmp_path, dtype=torch.float32, **kw)
    g = torch.Generator().manual_seed(5)
    for _ in range(n):
        k, v = _kv(g, 1, 64, 2, 32)
        c.append(0, k, v)
        c.advance(64)
    return c, g


def test_corrupt_page_is_detected(tmp_path):
    c, g = _filled(tmp_path)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(c.directory) for f in fs if f != ".lock")
    assert len(files) == 4 and all(f.endswith(".kv") for f in files)  # 5 pages, 1 in memory
    with open(files[1], "r+b") as f:
        f.seek(777)
        b = f.read(1)
        f.seek(777)
        f.write(bytes([b[0] ^ 0x10]))
    k, v = _kv(g, 1, 1, 2, 32)
    with pytest.raises(CorruptPageError, match="page000001"):
        c.decode_attend(0, torch.randn(1, 1, 8, 32), k, v)
    c.discard_pending()
    with pytest.raises(CorruptPageError):
        c.dequantize(0)
    c.close()


def test_disk_budget_is_checked_before_anything_is_written(tmp_path):
    cfg = _cfg(L=2)
    need = TieredKVCache.memory_bytes(2, 1, 64 * 9, 2, 32, page_tokens=64, cpu_pages=1, dtype=torch.float32)["disk"]
    assert need == 2 * 8 * kvtier.page_bytes(1, 64, 2, 32, None, 32, torch.float32)
    with pytest.raises(ValueError, match="disk_budget"):
        TieredKVCache(cfg, 1, 64 * 9, page_tokens=64, cpu_pages=1, disk_dir=tmp_path, disk_budget=need - 1,
                      dtype=torch.float32)
    assert os.listdir(tmp_path) == []
    c = TieredKVCache(cfg, 1, 64 * 9, page_tokens=64, cpu_pages=1, disk_dir=tmp_path, disk_budget=need,
                      dtype=torch.float32)
    assert c.disk_bytes_max == need
    c.close()
    import gc
    import weakref
    c = TieredKVCache(cfg, 1, 64 * 9, page_tokens=64, cpu_pages=0, disk_dir=tmp_path, dtype=torch.float32)
    c.append(0, torch.zeros(1, 64, 2, 32), torch.zeros(1, 64, 2, 32))
    c.append(1, torch.zeros(1, 64, 2, 32), torch.zeros(1, 64, 2, 32))
    c.advance(64)
    d, ref = c.directory, weakref.ref(c)
    assert os.listdir(d)
    del c
    gc.collect()
    assert ref() is None and not os.path.exists(d)  # dropped without close: files deleted
    with pytest.raises(FileNotFoundError, match="disk_dir"):
        TieredKVCache(cfg, 1, 64 * 9, page_tokens=64, cpu_pages=1, disk_dir=tmp_path / "nope")


def test_full_disk_fails_the_forward_before_plain_pages_change(tmp_path, monkeypatch):
    """Plain pages seal in advance(), after every layer ran: the first layer's append checks the
    room for the pages that will spill, so a full disk fails the forward with nothing committed
    and the caller can simply retry it."""
    c, g = _filled(tmp_path, n=2, extra=200)  # pages 0 (disk) and 1 (memory)
    K0, V0 = c.dequantize(0)
    monkeypatch.setattr(kvtier, "_disk_free", lambda path: 1 << 20)
    k, v = _kv(g, 1, 64, 2, 32)
    with pytest.raises(StoreError, match="nothing was written"):
        c.append(0, k, v)  # its page would push page 1 to disk
    assert c.length == 128 and c._pending == [0] and c.disk_bytes == c.page_bytes
    K1, V1 = c.dequantize(0)
    assert torch.equal(K1, K0) and torch.equal(V1, V0)
    monkeypatch.undo()
    c.append(0, k, v)  # the same forward, now with room
    c.advance(64)
    assert c.length == 192 and c.tier_tokens(0) == {"window": 0, "cpu": 64, "disk": 128}
    K2, _ = c.dequantize(0)
    assert torch.equal(K2[:, :128], K0) and torch.equal(K2[:, 128:], k)
    c.close()


def test_disk_filled_after_the_check_commits_the_tokens_and_says_so(tmp_path, monkeypatch):
    """Another process fills the disk between the forward's check and advance(): the tokens
    stay committed (nothing lost), the error says so, and advance(0) writes the page later."""
    c, g = _filled(tmp_path, n=2, extra=200)  # pages 0 (disk) and 1 (memory)
    K0, V0 = c.dequantize(0)
    real = kvtier._disk_free
    k, v = _kv(g, 1, 64, 2, 32)
    c.append(0, k, v)  # checked with room
    monkeypatch.setattr(kvtier, "_disk_free", lambda path: 1 << 20)
    with pytest.raises(StoreError, match="ARE committed"):
        c.advance(64)  # the third page would push page 1 to disk
    assert c.length == 192
    assert not [f for _, _, fs in os.walk(c.directory) for f in fs if f.endswith(".tmp")]
    K1, V1 = c.dequantize(0)  # all 192 tokens still there: 2 pages + 64 in the window
    assert K1.shape[1] == 192 and torch.equal(K1[:, :128], K0) and torch.equal(K1[:, 128:], k)
    monkeypatch.setattr(kvtier, "_disk_free", real)
    c.advance(0)  # retries the spill
    assert c.tier_tokens(0) == {"window": 0, "cpu": 64, "disk": 128}
    K2, _ = c.dequantize(0)
    torch.testing.assert_close(K2, K1)
    c.close()


def test_full_disk_during_a_quantized_append_changes_nothing(tmp_path, monkeypatch):
    cfg = _cfg(L=1)
    c = TieredKVCache(cfg, 1, 400, kv_bits=4, residual=32, page_tokens=64, cpu_pages=1, disk_dir=tmp_path,
                      dtype=torch.float32)
    ref = pk.QuantizedKVCache(1, 400, 2, 32, bits=4, group_size=32, residual=32, dtype=torch.float32)
    g = torch.Generator().manual_seed(8)
    for _ in range(2):  # 128 tokens: 96 quantized (page 0 sealed in memory, 32 in the open page), 32 fp
        k, v = _kv(g, 1, 64, 2, 32)
        c.append(0, k, v)
        ref.append(k, v)
        c.advance(64)
    K0, V0 = c.dequantize(0)
    real = kvtier._disk_free
    monkeypatch.setattr(kvtier, "_disk_free", lambda path: 1 << 20)
    k, v = _kv(g, 1, 64, 2, 32)
    with pytest.raises(StoreError, match="nothing was written"):
        c.append(0, k, v)  # seals page 1: page 0 must move to disk first
    K1, V1 = c.dequantize(0)
    assert torch.equal(K1, K0) and torch.equal(V1, V0) and c.length == 128 and c.disk_bytes == 0
    monkeypatch.setattr(kvtier, "_disk_free", real)
    c.append(0, k, v)  # the same append, now with room
    c.advance(64)
    ref.append(k, v)
    assert c.tier_tokens(0)["disk"] == 64 and c.disk_bytes == c.page_bytes
    qk, qv = ref.dequantize()
    K2, V2 = c.dequantize(0)
    assert torch.equal(K2, qk) and torch.equal(V2, qv)
    c.close()


def test_full_disk_in_a_quantized_forward_is_caught_before_the_first_layer_changes(tmp_path, monkeypatch):
    cfg = _cfg(L=3)
    c = TieredKVCache(cfg, 1, 400, kv_bits=4, residual=32, page_tokens=64, cpu_pages=0, disk_dir=tmp_path,
                      dtype=torch.float32)
    g = torch.Generator().manual_seed(9)
    k, v = _kv(g, 1, 64, 2, 32)
    for layer in range(3):  # 64 tokens: 32 quantized into each open page, 32 in the window
        c.append(layer, k, v)
    c.advance(64)
    before = [c.dequantize(i) for i in range(3)]
    page = c.page_bytes
    # room for one layer's page but not three: the first layer's append must refuse
    monkeypatch.setattr(kvtier, "_disk_free", lambda path: kvtier.DISK_RESERVE + 2 * page)
    k2, v2 = _kv(g, 1, 64, 2, 32)
    with pytest.raises(StoreError, match="nothing was written"):
        c.append(0, k2, v2)
    assert c._pending == [0, 0, 0] and c.disk_bytes == 0
    for i in range(3):
        K, V = c.dequantize(i)
        assert torch.equal(K, before[i][0]) and torch.equal(V, before[i][1])
    monkeypatch.undo()
    q = torch.randn(1, 1, 8, 32, generator=g)
    for layer in range(3):  # the cache is still usable: the same forward, now with room
        c.prefill_attend(layer, q.expand(1, 64, 8, 32).contiguous(), k2, v2)
    c.advance(64)
    assert c.tier_tokens(0)["disk"] == 64 and c.disk_bytes == 3 * page
    c.close()


def test_page_directories_of_dead_processes_are_removed(tmp_path):
    """Stale = its .lock is free: the owner holds it (flock) while alive, in whatever pid
    namespace; another host's, an unlocked-by-design (no lock file) or a foreign-named directory
    is never touched."""
    import fcntl

    from offload.kvtier import _host_tag, _make_private_dir, remove_stale_dirs

    host = _host_tag()
    # a live owner in another process: it holds its lock until told to exit
    live = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from offload.kvtier import _make_private_dir
        d, fd = _make_private_dir({str(tmp_path)!r})
        print(d, flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    live_dir = live.stdout.readline().strip()
    dead = subprocess.run([sys.executable, "-c", f"from offload.kvtier import _make_private_dir; "
                           f"print(_make_private_dir({str(tmp_path)!r})[0])"], capture_output=True, text=True,
                          check=True).stdout.strip()  # its process exited: the lock is free
    mine, fd = _make_private_dir(str(tmp_path))  # this process's, alive
    for d in (live_dir, dead, mine):
        (tmp_path / d / "page000000.kv").write_bytes(b"x" * 4096)
    other = tmp_path / f"pk-kv-otherhost-{os.getpid() + 1}-abc123"  # another host's (shared NFS)
    other.mkdir()
    (other / ".lock").write_bytes(b"")
    nolock = tmp_path / f"pk-kv-{host}-1-abc123"  # no lock file (being made, or an old layout)
    nolock.mkdir()
    (tmp_path / "pk-kv-notapid").mkdir()
    try:
        assert remove_stale_dirs(str(tmp_path)) == [dead]
        c = TieredKVCache(_cfg(L=1), 1, 64 * 4, page_tokens=64, cpu_pages=0, disk_dir=tmp_path, dtype=torch.float32)
        c.close()
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(os.path.basename(d) for d in (live_dir, mine, other, nolock, tmp_path / "pk-kv-notapid"))
    finally:
        live.communicate("")
    assert remove_stale_dirs(str(tmp_path)) == [live_dir]  # its owner has exited now
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    assert remove_stale_dirs(str(tmp_path)) == [mine]


def test_memory_is_fixed_and_accounted(tmp_path):
    cfg = _cfg(L=3)
    for kv_bits in (None, 4):
        kw = dict(kv_bits=kv_bits, residual=None if kv_bits is None else 64, page_tokens=128, cpu_pages=2, slots=3,
                  max_append=128)
        c = TieredKVCache(cfg, 2, 2000, disk_dir=tmp_path, **kw)
        plan = TieredKVCache.memory_bytes(3, 2, 2000, 2, 32, **kw)
        assert c.nbytes == plan["memory"] and c.disk_bytes_max == plan["disk"]
        g = torch.Generator().manual_seed(6)
        for s in range(0, 1900, 128):
            for layer in range(3):
                k, v = _kv(g, 2, 128, 2, 32)
                c.append(layer, k, v)
            c.advance(128)
        assert 0 < c.disk_bytes <= c.disk_bytes_max
        d = c.directory
        assert d is not None and os.path.isdir(d)
        c.close()
        assert not os.path.exists(d)


def test_bad_arguments_name_the_argument(tmp_path):
    cfg = _cfg(L=1)
    with pytest.raises(ValueError, match="page_tokens"):
        TieredKVCache(cfg, 1, 100, kv_bits=4, group_size=32, page_tokens=48)
    with pytest.raises(ValueError, match="residual"):
        TieredKVCache(cfg, 1, 100, residual=32)
    with pytest.raises(ValueError, match="residual"):  # a quantized window needs a whole group
        TieredKVCache(cfg, 1, 100, kv_bits=4, group_size=32, residual=0)
    with pytest.raises(ValueError, match="approx"):
        TieredKVCache(cfg, 1, 100, approx=0)
    with pytest.raises(ValueError, match="bits"):
        TieredKVCache(cfg, 1, 100, kv_bits=3)
    c = TieredKVCache(cfg, 1, 100, page_tokens=64, cpu_pages=0, disk_dir=tmp_path)
    k = torch.zeros(1, 65, 2, 32)
    with pytest.raises(ValueError, match="max_append"):
        c.append(0, k, k)
    with pytest.raises(ValueError, match="k:"):
        c.append(0, torch.zeros(1, 3, 3, 32), torch.zeros(1, 3, 3, 32))
    c.append(0, k[:, :60], k[:, :60])
    with pytest.raises(ValueError, match="layer"):
        c.append(0, k[:, :1], k[:, :1])
    with pytest.raises(ValueError, match="advance"):
        c.advance(61)
    c.advance(60)
    with pytest.raises(ValueError, match="capacity"):
        c.append(0, k[:, :41], k[:, :41])
    with pytest.raises(ValueError, match="T: expected an int"):
        c.advance(1.0)  # would leave float lengths behind
    with pytest.raises(ValueError, match="layer"):
        c.dequantize(-1)
    with pytest.raises(ValueError, match="layer"):
        c.tier_tokens(1)
    q = torch.zeros(1, 1, 8, 32)
    for bad in (None, q.long(), q.to(torch.complex64)):  # rejected before anything is appended
        with pytest.raises(TypeError, match="q:"):
            c.decode_attend(0, bad, k[:, :1], k[:, :1])
        assert c._pending == [0]
    c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.append(0, k[:, :1], k[:, :1])
    with pytest.raises(RuntimeError, match="closed"):
        c.advance(0)
    for call in (lambda: c.dequantize(0), c.read_pass):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    with pytest.raises(ValueError, match="group_size"):
        TieredKVCache(cfg, 1, 100, kv_bits=4, group_size=32.0, page_tokens=64, residual=64)
    for bad_dir in (123, str(tmp_path).encode()):
        with pytest.raises(TypeError, match="disk_dir"):
            TieredKVCache(cfg, 1, 100, page_tokens=64, cpu_pages=0, disk_dir=bad_dir)


# -------------------------------------------------------------------- in OffloadedModel
@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvckpt")
    return offload.demo_checkpoint(str(root / "tiny32"), preset="tiny", dtype=torch.float32,
                                   config_overrides={"num_hidden_layers": 2})


def test_planner_spills_the_kv_when_the_weights_leave_too_little_room(tmp_path):
    from offload.placement import estimate_unit_bytes, plan_placement

    cfg = dict(model_type="llama", hidden_size=1024, num_attention_heads=8, num_key_value_heads=8, head_dim=128,
               num_hidden_layers=8, intermediate_size=2816, vocab_size=32000, max_position_embeddings=131072)
    ub = estimate_unit_bytes(cfg)
    ctx = 16384
    mem = plan_placement(cfg, context=ctx)  # no budget: KV and weights in memory
    assert not mem.kv_tiered and mem.kv_bytes == 8 * 2 * ctx * 8 * 128 * 2
    cap = 640 << 20  # weights (~270 MiB) fit, the 512 MiB of KV does not
    p = plan_placement(cfg, budgets={"cpu": cap}, context=ctx)
    assert p.kv_tiered and p.streamed() == [] and p.used["cpu"] <= cap
    mp = ctx // 1024  # pages per layer at full context
    assert 0 < p.kv_cpu_pages < mp and p.kv_disk_bytes == 8 * (mp - p.kv_cpu_pages) * p.kv_page_bytes
    assert p.disk_bytes_per_token == p.kv_disk_bytes + min(ub["embed"], 4 << 20)
    assert "spill" in p.explain() and 3 <= p.kv_slots <= 16
    # the prefetch depth from the roofline: the disk's reads while a layer's weights compute
    from roofline.hardware import MachineProfile
    nodisk = MachineProfile("toy", {"bf16": 1e12, "fp32": 1e12}, {"read": 1e10, "copy": 1e10, "triad": 1e10})
    pn = plan_placement(cfg, nodisk, {"cpu": cap}, context=ctx)
    assert pn.kv_slots == 4 and "no disk bandwidth" in pn.explain()
    fast = MachineProfile("toy", {"bf16": 1e12, "fp32": 1e12}, {"read": 1e10, "copy": 1e10, "triad": 1e10},
                          disk={str(tmp_path): {"read": 2e10, "write": 1e9}})
    pf = plan_placement(cfg, fast, {"cpu": cap}, context=ctx)
    gap = ub["layer.0"] / 1e10  # seconds of weights per layer at 10 GB/s
    chunk = pf.kv_chunk_pages * pf.kv_page_bytes
    assert pf.kv_slots == min(16, max(3, 2 + math.ceil(2e10 * gap / chunk))) > 4
    assert "while the disk reads" in pf.explain()
    # what the planner reserves is what the cache holds
    c = TieredKVCache(_cfg(Hq=8, Hkv=8, D=128, L=8), 1, ctx, page_tokens=p.kv_page_tokens, cpu_pages=p.kv_cpu_pages,
                      slots=p.kv_slots, chunk_pages=p.kv_chunk_pages, disk_dir=tmp_path, max_append=p.prefill_chunk)
    assert c.nbytes == p.kv_bytes and c.disk_bytes_max == p.kv_disk_bytes
    assert 64 < p.prefill_chunk <= p.kv_page_tokens  # a prefill chunk fits a page
    c.close()
    # a smaller disk budget: fewer pages spill (layers stream instead); none at all: no plan
    q = plan_placement(cfg, budgets={"cpu": cap, "disk": p.kv_disk_bytes // 2}, context=ctx)
    assert q.kv_disk_bytes <= p.kv_disk_bytes // 2 and q.streamed() and q.used["cpu"] <= cap
    with pytest.raises(ValueError, match="budgets\\['disk'\\] 0 MiB"):
        plan_placement(cfg, budgets={"cpu": cap, "disk": 0}, context=ctx)
    with pytest.raises(ValueError, match="kv_page_tokens"):
        plan_placement(cfg, budgets={"cpu": cap}, context=ctx, kv_page_tokens=32)
    with pytest.raises(ValueError, match="kv_page_tokens"):  # quantized pages hold whole groups
        plan_placement(cfg, budgets={"cpu": cap}, context=ctx, kv_bits=4, kv_group_size=64, kv_page_tokens=1056)


@pytest.mark.parametrize("kv_bits", [None, 4])
def test_generation_spills_kv_to_disk_and_matches_in_memory(tiny32, tmp_path, kv_bits):
    import dataclasses

    ctx = 700
    # the same prefill chunks in both runs (a quantized cache's prefill sees the earlier chunks
    # quantized, so the chunking is part of the result)
    kw = dict(store_dir=str(tmp_path / "store"), max_context=ctx, kv_bits=kv_bits, kv_page_tokens=64,
              kv_residual=32, kv_group_size=32, prefill_chunk=64)
    with offload.load_model(tiny32, **kw) as m:  # no budget: offload.llama.KVCache in memory
        full = m.placement
        assert not full.kv_tiered
        assert not isinstance(m.new_cache(1, ctx), TieredKVCache)
        ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(7))
        ref = m.generate(ids, max_new_tokens=ctx - 150)
    # the same weights placement with the KV in pages, 2 pages per layer in memory and older
    # pages on disk (the tiny model's KV is too small for the planner to prefer spilling it:
    # see the test above)
    pb = offload.kvtier.page_bytes(1, 64, 2, 16, kv_bits, 32, torch.float32)
    tiered = dataclasses.replace(full, kv_cpu_pages=2, kv_page_tokens=64, kv_page_bytes=pb, kv_slots=3,
                                 kv_chunk_pages=2, kv_disk_budget=64 << 20)
    with offload.load_model(tiny32, placement=tiered, kv_dir=str(tmp_path), **kw) as m:
        cache = m.new_cache(1, ctx)
        assert isinstance(cache, TieredKVCache) and cache.cpu_pages == 2 and cache.disk_bytes_max > 0
        cache.close()
        out = m.generate(ids, max_new_tokens=ctx - 150)
        s = m.stats.summary()
        assert s["bytes_per_step"]["kv_disk"] > 0 and s["kv_disk_fraction_read"] == 1.0
    assert torch.equal(out, ref)  # identical greedy tokens (quantized: the same KIVI groups quantized)
    # the approximate mode through the model: the share read and the audited cosine are reported
    with offload.load_model(tiny32, placement=tiered, kv_dir=str(tmp_path), kv_approx=0.5, kv_approx_audit=4,
                            **kw) as m:
        m.generate(ids, max_new_tokens=ctx - 150)
        s = m.stats.summary()
        assert 0.5 <= s["kv_disk_fraction_read"] < 1  # half the pages (rounded up), plus the audits' reads
        assert -1 <= s["kv_approx_cosine_min"] <= 1
    assert [f for f in os.listdir(tmp_path) if f.startswith("pk-kv-")] == []  # page files removed


from rss_helpers import RSS_PRELUDE  # noqa: E402

_RSS_SCRIPT = RSS_PRELUDE + textwrap.dedent(r"""
    ckpt, store, budget, ctx, kv_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    m = offload.load_model(ckpt, store_dir=store, budgets={"cpu": budget}, max_context=ctx, kv_page_tokens=256,
                           kv_dir=kv_dir)
    c = m.new_cache(1, ctx)
    cfg, g = m.config, torch.Generator().manual_seed(0)
    for s in range(0, ctx - 16, 64):  # a long context loaded directly (a prefill would re-read every page)
        n = min(64, ctx - 16 - s)
        for layer in range(cfg.num_layers):
            k = torch.randn(1, n, cfg.num_kv_heads, cfg.head_dim, generator=g, dtype=torch.bfloat16)
            c.append(layer, k, k)
        c.advance(n)
    tok = torch.tensor([[1]])
    for _ in range(8):
        tok = m.forward(tok, c, last_only=True)[:, -1].argmax(-1, keepdim=True)
    peak = proc_kib_field("/proc/self/status", "VmHWM")
    p = m.placement
    print(json.dumps({"base": base, "peak": peak, "planned": p.used["cpu"], "tiered": p.kv_tiered,
                      "cache_nbytes": c.nbytes, "kv_bytes": p.kv_bytes, "disk_bytes": c.disk_bytes,
                      "kv_full": 2 * cfg.num_layers * ctx * cfg.num_kv_heads * cfg.head_dim * 2}))
    c.close()
""")


def test_budget_honoured_with_the_kv_on_disk_peak_rss_in_subprocess(tmp_path):
    # 4 layers x 8 kv heads x head dim 64 at 8192 tokens: 64 MiB of bf16 KV, a 96 MiB budget
    ck = offload.demo_checkpoint(str(tmp_path / "wide-kv"), preset="small", dtype=torch.bfloat16,
                                 config_overrides={"hidden_size": 512, "num_attention_heads": 8,
                                                   "num_key_value_heads": 8, "intermediate_size": 1024,
                                                   "vocab_size": 4096, "max_position_embeddings": 8192})
    offload.convert(ck, str(tmp_path / "store")).close()
    budget = 96 << 20
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, ck, str(tmp_path / "store"), str(budget), "8192",
                        str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["tiered"] and res["planned"] <= budget and res["cache_nbytes"] == res["kv_bytes"]
    assert res["disk_bytes"] > res["kv_full"] // 4  # most of the KV is on disk
    # the stated overhead: the process's own base RSS plus 32 MiB of allocator and code slack
    assert res["peak"] - res["base"] <= budget + 32 * (1 << 20), res


def test_tiered_kv_cache_is_exported_by_the_package():
    """The issue's API name: offload.TieredKVCache (loaded lazily like the other names)."""
    import offload
    import offload.kvtier

    assert offload.TieredKVCache is offload.kvtier.TieredKVCache and "TieredKVCache" in offload.__all__
