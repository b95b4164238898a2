"""Quantized KV cache (pk.QuantizedKVCache): bookkeeping (sink rows, residual window, flushes,
pages), the quantizer's error bound, exact byte counts, rejected appends that leave the cache
unchanged, and decode attention over the cache (reference and CPU backends; Triton through the
public API) against a float64 oracle on the dequantized cache. Unused store slots and fp rows
are NaN-poisoned before attention, so a kernel that reads past a region shows."""
import math

import pytest
import torch

import pykernels as pk
from attention_ref import LSE_ATOL, RTOL, assert_close
from pykernels import kv_format
from pykernels.reference import decode_attention_kv_reference, decode_attention_reference

FORMATS = [8, 4, 2, "fp8"]
BACKENDS = ["reference", "cpu"]  # cpu: pykernels._C, built from this tree (a stale build fails here)


def _triton_kv_status():
    try:
        from pykernels.triton.kv_attention import available
    except ImportError as e:
        return False, f"pykernels.triton.kv_attention cannot be imported: {e}"
    return available()


TRITON_KV = _triton_kv_status()


def make_cache(B=2, capacity=400, Hkv=2, D=64, **kw):
    return pk.QuantizedKVCache(B, capacity, Hkv, D, **{"dtype": torch.bfloat16, **kw})


def kv(B, T, Hkv, D, dtype=torch.float32):
    return torch.randn(B, T, Hkv, D, dtype=dtype), torch.randn(B, T, Hkv, D, dtype=dtype)


def snapshot(c):
    """Every piece of cache state: device tensors (cloned) and the host bookkeeping."""
    s = {name: t.clone() for name, t in c.tensors().items()}
    s["host"] = (list(c._n_sink), list(c._n_quant), list(c._n_res), [list(r) for r in c._table], list(c._free))
    return s


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for name in a:
        if name == "host":
            assert a[name] == b[name], name
        else:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def expected_counts(n, sink, residual, gs):
    """(n_sink, n_quant, n_res) after n tokens: the fewest whole groups leave <= residual."""
    ns = min(n, sink)
    rest = n - ns
    nq = gs * math.ceil(max(0, rest - residual) / gs)
    return ns, nq, rest - nq


def poison(c):
    """NaN into every fp row and every store scale that no held token uses."""
    S, gs = c.page_size, c.group_size
    held = set()
    for b, (ns, nq, nr) in enumerate(zip(c._n_sink, c._n_quant, c._n_res)):
        c.fp_k[b, ns + nr:] = float("nan")
        c.fp_v[b, ns + nr:] = float("nan")
        for j in range(math.ceil(nq / S)):
            p = int(c.block_table[b, j])
            held.add(p)
            m = min(S, nq - j * S)
            for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
                t = getattr(c, name)
                if t is not None:
                    t[p, :, (m // gs if name in c._per_group else m):] = float("nan")
    for p in set(range(c.num_pages)) - held:
        for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
            if getattr(c, name) is not None:
                getattr(c, name)[p] = float("nan")


def oracle(q, c, scale=None):
    """float64 attention over the dequantized cache; out stays float64 (not rounded to q's dtype)."""
    k, v = c.dequantize()
    return decode_attention_reference(q.double(), k, v, c.seqlens, None, scale, return_lse=True,
                                      compute_dtype=torch.float64)


def bf16_keys(backend, c):
    """True when `backend` runs the CPU kernel's avx512_bf16 variant on int4 / int2 keys, whose
    scores use q * key scale rounded to bf16 (see test_kv_cpu.py: bf16_key_oracle)."""
    if backend not in ("cpu", "auto") or c.bits not in (4, 2):
        return False
    from pykernels import _C
    return _C.active_isa() == "avx512_bf16"


def bf16_key_oracle(q, c, scale=None):
    """oracle() with the quantized key scores sum_d bf16(q_d s_d) c_d + q . z (q in float32 times
    the softmax scale, as the launcher): the avx512_bf16 kernel's arithmetic, so the usual
    tolerances apply. Codes, scales and zeros per token come from dequantize() of copies of the
    cache with (scale 1, zero 0), (codes 0, zero = scale) and (codes 0)."""
    import copy

    def deq(**over):
        c2 = copy.copy(c)
        for n, t in over.items():
            setattr(c2, n, t)
        return c2.dequantize()[0].double()

    z16 = torch.zeros_like(c.k_scale)
    codes = deq(k_scale=torch.ones_like(c.k_scale), k_zero=z16)
    s = deq(k_codes=torch.zeros_like(c.k_codes), k_zero=c.k_scale)
    z = deq(k_codes=torch.zeros_like(c.k_codes))
    k, v = c.dequantize()
    B, Hq, D = q.shape
    idx = torch.arange(Hq) // (Hq // c.num_kv_heads)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q32 = q.float() * torch.tensor(scale, dtype=torch.float32)
    sq = ((q32[:, None] * s[:, :, idx].float()).to(torch.bfloat16).double() * codes[:, :, idx]).sum(-1) + \
        (q32[:, None].double() * z[:, :, idx]).sum(-1)
    sf = (q32[:, None].double() * k[:, :, idx].double()).sum(-1)  # [B, L, Hq]
    outs, lses = [], []
    for b, (ns, nq) in enumerate(zip(c.n_sink.tolist(), c.n_quant.tolist())):
        L = int(c.seqlens[b])
        sc = sf[b, :L].clone()
        sc[ns:ns + nq] = sq[b, ns:ns + nq]
        lse = torch.logsumexp(sc, 0)
        outs.append(torch.einsum("lh,lhd->hd", torch.exp(sc - lse), v[b, :L].double()[:, idx]))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def check_attention(out, lse, q, c, scale=None, backend="reference"):
    """backend: the one that computed out (picks the avx512_bf16 oracle, see bf16_keys)."""
    ref, ref_lse = (bf16_key_oracle if bf16_keys(backend, c) else oracle)(q, c, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    # Kernels dequantize in float32 and may order the dot products differently (FMA, per-channel
    # scale factored out of q.k): a few float32 ulps of each score; 1e-4 absolute on outputs of
    # |v| ~ 1 covers that, plus half an ulp of q's dtype for the rounded output.
    assert_close(out, ref, 1e-4, RTOL[q.dtype])
    assert_close(lse, ref_lse, LSE_ATOL, 1e-6, what="lse")


# ---------------------------------------------------------------------------------------------
# bookkeeping


@pytest.mark.parametrize("sink,residual", [(0, 32), (3, 32), (0, 64), (5, 64)])
def test_flush_timing_one_token_at_a_time(sink, residual):
    gs = 32
    c = make_cache(B=2, capacity=200, sink=sink, residual=residual, group_size=gs)
    for n in range(1, 201):
        c.append(*kv(2, 1, 2, 64))
        ns, nq, nr = expected_counts(n, sink, residual, gs)
        assert (c._n_sink, c._n_quant, c._n_res) == ([ns] * 2, [nq] * 2, [nr] * 2), n
        if n == sink + residual + 1:
            assert nq == gs and nr == residual - gs + 1
    for name, host in (("n_sink", c._n_sink), ("n_quant", c._n_quant), ("n_res", c._n_res)):
        t = getattr(c, name)
        assert t.dtype == torch.int32 and t.tolist() == host
    assert c.seqlens.dtype == torch.int32 and c.seqlens.tolist() == [200, 200] == c.lengths()


@pytest.mark.parametrize("bits", FORMATS)
@pytest.mark.parametrize("layout", ["dense", "paged"])
def test_token_by_token_equals_chunks(bits, layout):
    """One token at a time, uneven chunks and one prefill give the same cache."""
    B, T, Hkv, D = 2, 150, 2, 64
    k, v = kv(B, T, Hkv, D)
    kw = dict(B=B, capacity=160, Hkv=Hkv, D=D, bits=bits, group_size=32, residual=32, sink=2, layout=layout)
    if layout == "paged":
        kw["page_size"] = 32
    caches = [make_cache(**kw) for _ in range(3)]
    for t in range(T):
        caches[0].append(k[:, t:t + 1], v[:, t:t + 1])
    t0 = 0
    for n in (1, 40, 7, 33, 64, 5):
        caches[1].append(k[:, t0:t0 + n], v[:, t0:t0 + n])
        t0 += n
    caches[2].append(k, v)
    want = caches[0].dequantize()
    for c in caches[1:]:
        got = c.dequantize()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if layout == "dense":
            assert_same_state(snapshot(c), snapshot(caches[0]))
        else:  # page ids depend on the order sequences grew in; the contents do not
            assert snapshot(c)["host"][:3] == snapshot(caches[0])["host"][:3]


def test_lengths_grow_sequences_by_different_amounts():
    """append(..., lengths=) equals growing each sequence on its own; padding rows (NaN, inf here)
    are never read."""
    B, Hkv, D = 3, 2, 64
    steps = [[5, 0, 40], [1, 1, 1], [100, 33, 0], [0, 64, 7]]
    c = make_cache(B=B, capacity=300, Hkv=Hkv, D=D, bits=4, residual=32, sink=1, layout="paged", page_size=64)
    singles = [make_cache(B=1, capacity=300, Hkv=Hkv, D=D, bits=4, residual=32, sink=1) for _ in range(B)]
    for lens in steps:
        T = max(lens)
        k, v = kv(B, T, Hkv, D)
        for b, n in enumerate(lens):
            k[b, n:] = float("nan")
            v[b, n:] = float("inf")
            if n:
                singles[b].append(k[b:b + 1, :n], v[b:b + 1, :n])
        c.append(k, v, lengths=torch.tensor(lens))
    assert c.lengths() == [sum(s[b] for s in steps) for b in range(B)]
    kd, vd = c.dequantize()
    for b, s in enumerate(singles):
        L = s.lengths()[0]
        assert c.lengths()[b] == L
        ks, vs = s.dequantize()
        assert torch.equal(kd[b, :L], ks[0]) and torch.equal(vd[b, :L], vs[0])
        assert not kd[b, L:].any() and not vd[b, L:].any()  # rows past seqlens are zero


@pytest.mark.parametrize("bits", [4, "fp8"])
def test_sink_tokens_stay_exact(bits):
    """The first `sink` tokens are exact even when far outside the float16 range of the scales."""
    sink, Hkv, D = 4, 2, 64
    c = make_cache(B=2, capacity=300, Hkv=Hkv, D=D, bits=bits, residual=32, sink=sink, dtype=torch.float32)
    k, v = kv(2, 200, Hkv, D)
    k[:, :sink] *= 1e6  # attention-sink outliers
    c.append(k[:, :3], v[:, :3])
    c.append(k[:, 3:], v[:, 3:])
    assert (c._n_sink[0], c._n_quant[0], c._n_res[0]) == expected_counts(200, sink, 32, 32)
    kd, vd = c.dequantize()
    assert torch.equal(kd[:, :sink], k[:, :sink]) and torch.equal(vd[:, :sink], v[:, :sink])
    assert torch.equal(c.fp_k[:, :sink], k[:, :sink])
    q = torch.randn(2, 4, D)
    out, lse = pk.decode_attention(q, c, backend="reference", return_lse=True)
    check_attention(out, lse, q, c)


@pytest.mark.parametrize("bits", FORMATS)
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dequantize_error_bound(bits, gs, D, dtype):
    """Quantized tokens: exactly kv_format's quantize/dequantize of those tokens, and within the
    quantizer's error bound of the input; sink and residual tokens exact."""
    B, Hkv, T, sink = 2, 2, 3 * 128 + 50, 3
    k, v = kv(B, T, Hkv, D)
    k = k * torch.linspace(0.1, 20, D) + 3  # per-channel magnitudes (KIVI's outlier channels)
    v[:, 7] = 0.0                            # a constant token: scale 0
    c = make_cache(B=B, capacity=T, Hkv=Hkv, D=D, bits=bits, group_size=gs, residual=gs, sink=sink, dtype=dtype)
    c.append(k, v)
    x = {"k": k.to(dtype).float(), "v": v.to(dtype).float()}   # what the cache stores in fp rows
    got = dict(zip("kv", c.dequantize()))
    assert got["k"].dtype == torch.float32 and got["k"].shape == (B, T, Hkv, D)
    ns, nq, nr = expected_counts(T, sink, gs, gs)
    assert (c._n_sink[0], c._n_quant[0], c._n_res[0]) == (ns, nq, nr) and nq > 0
    for name in "kv":
        assert torch.equal(got[name][:, :ns], x[name][:, :ns])             # sink rows
        assert torch.equal(got[name][:, ns + nq:], x[name][:, ns + nq:])   # residual window
    xq = {name: x[name][:, ns:ns + nq].transpose(1, 2) for name in "kv"}   # [B, Hkv, nq, D]
    f = kv_format.quantize_kv(xq["k"], xq["v"], bits, gs)
    want = dict(zip("kv", kv_format.dequantize_kv(f, bits, gs, D)))
    for name in "kv":
        g = got[name][:, ns:ns + nq].transpose(1, 2)
        assert torch.equal(g, want[name]), name
        err = (g - xq[name]).abs()
        bound = _quant_bound(xq[name], bits, gs, key=(name == "k"))
        worst = float((err - bound).max())
        assert worst <= 0, f"{name}: error exceeds the quantizer bound by {worst:.3g}"


def _quant_bound(x, bits, gs, key):
    """Per-element bound of |dequant(quant(x)) - x| for x [B, Hkv, T, D].

    Integer formats, per group with range [mn, mx], M = 2**bits - 1, s = (mx - mn) / M: the
    quantizer rounds the float16 zero down and the float16 scale up, so no code is clamped and
    the error is half a step of the stored scale (scale/2); the stored scale is itself checked
    to exceed s by no more than float16 rounding. fp8 e4m3: 3 mantissa bits, half an ulp = 2^-4
    relative, or 2^-10 absolute in the subnormal range, of x / scale. Plus float32 rounding of
    the dequantization."""
    B, H, T, D = x.shape
    if bits == "fp8":
        amax = x.reshape(B, H, T // gs, gs * D).abs().amax(-1)
        scale = torch.where(amax > 0, amax / kv_format.FP8_MAX, torch.ones_like(amax))
        scale = scale.repeat_interleave(gs, dim=2)[..., None]
        return 2.0 ** -4 * x.abs() + scale * 2.0 ** -10 + 1e-6 * x.abs()
    M = 2 ** bits - 1
    if key:   # per channel, groups of gs tokens
        g = x.reshape(B, H, T // gs, gs, D)
        mn, mx = g.amin(3, keepdim=True), g.amax(3, keepdim=True)
        expand = lambda t: t.expand_as(g).reshape(x.shape)
    else:     # per token, groups of gs channels (the last one may be shorter)
        idx = torch.arange(D) // gs
        ng = int(idx[-1]) + 1
        mn = torch.stack([x[..., idx == j].amin(-1) for j in range(ng)], -1)[..., idx]
        mx = torch.stack([x[..., idx == j].amax(-1) for j in range(ng)], -1)[..., idx]
        expand = lambda t: t
    s = (mx - mn) / M
    scale, zero = (t.float() for t in kv_format._affine_params(mn, mx, bits))
    assert bool((zero <= mn).all()) and bool((zero >= mn - 2.0 ** -10 * mn.abs() - 2.0 ** -24).all())
    # scale >= (mx - zero) / M >= s, and above it by float16 rounding (2^-10 relative, or one
    # subnormal step 2^-24) of a range widened by the zero's rounding
    assert bool((scale * M >= mx - zero).all())
    assert bool((scale <= (s + (mn - zero) / M) * (1 + 2.0 ** -10) + 2.0 ** -24).all())
    b = scale / 2 + 2.0 ** -22 * (mn.abs() + mx.abs())
    return expand(b)


@pytest.mark.parametrize("bits", FORMATS)
@pytest.mark.parametrize("D", [64, 80])
def test_dense_and_paged_agree(bits, D):
    """Same tokens, dense vs paged (small pages, sequences growing in turns so their pages
    interleave): the same dequantized cache and the same attention."""
    B, Hkv = 3, 2
    dense = make_cache(B=B, capacity=400, Hkv=Hkv, D=D, bits=bits, residual=64, sink=2)
    paged = make_cache(B=B, capacity=400, Hkv=Hkv, D=D, bits=bits, residual=64, sink=2, layout="paged",
                       page_size=32, num_pages=20)
    for lens in ([100, 3, 50], [20, 120, 1], [0, 40, 90], [64, 64, 64]):
        k, v = kv(B, max(lens), Hkv, D)
        for c in (dense, paged):
            c.append(k, v, lengths=lens)
    table = paged.block_table.tolist()
    used = [p for row in table for p in row if p >= 0]
    assert len(used) == len(set(used)) == paged.num_pages - paged.num_free_pages
    assert table[0][:4] == [0, 1, 9, 10] and table[1][:2] == [2, 3]  # taken from the free list as needed
    for a, b in zip(dense.dequantize(), paged.dequantize()):
        assert torch.equal(a, b)
    q = torch.randn(B, 8, D)
    for backend in BACKENDS:
        poison(paged)
        poison(dense)
        od, ld = pk.decode_attention(q, dense, backend=backend, return_lse=True)
        op, lp = pk.decode_attention(q, paged, backend=backend, return_lse=True)
        check_attention(od, ld, q, dense, backend=backend)
        assert_close(op, od, 1e-6)
        assert_close(lp, ld, 1e-6, what="lse")


# ---------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize("bits", FORMATS)
@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("gs,D", [(32, 64), (64, 80), (128, 128)])
def test_nbytes_exact(bits, layout, gs, D):
    B, cap, Hkv, R, sink = 3, 1000, 2, 2 * gs, 4
    kw = dict(page_size=256) if layout == "paged" else {}
    c = make_cache(B=B, capacity=cap, Hkv=Hkv, D=D, bits=bits, group_size=gs, residual=R, sink=sink,
                   layout=layout, dtype=torch.float16, **kw)
    assert c.nbytes == sum(t.numel() * t.element_size() for t in c.tensors().values())
    max_quant = gs * math.ceil((cap - sink - R) / gs)
    assert c.max_quant == max_quant
    if layout == "dense":
        S, P, max_pages = max_quant, B, 1
    else:
        S, max_pages = 256, math.ceil(max_quant / 256)
        P = B * max_pages
    assert (c.page_size, c.num_pages, tuple(c.block_table.shape)) == (S, P, (B, max_pages))
    ng = math.ceil(D / gs)
    if bits == "fp8":
        store = P * Hkv * (2 * S * D + 2 * (S // gs) * 4)
    else:
        store = P * Hkv * (2 * S * D * bits // 8 + 2 * 2 * (S // gs) * D + 2 * 2 * S * ng)
    fp_rows = 2 * B * (sink + R) * Hkv * D * 2
    assert c.nbytes == store + fp_rows + B * max_pages * 4 + 3 * B * 4
    assert c.bytes_per_token() == pytest.approx(store / (P * S))
    k, v = kv(B, 300, Hkv, D)
    before = c.nbytes
    c.append(k, v)
    assert c.nbytes == before  # everything is allocated up front


def test_capacity_is_reachable_and_dense_store_holds_it():
    """Every sequence can be filled to exactly `capacity`, one token at a time or at once."""
    for cap in (1, 31, 32, 33, 95, 96, 97, 130):
        for sink in sorted({0, 1, min(cap, 40)}):
            a = make_cache(B=1, capacity=cap, bits=2, group_size=32, residual=32, sink=sink)
            b = make_cache(B=1, capacity=cap, bits=2, group_size=32, residual=32, sink=sink, layout="paged",
                           page_size=32)
            k, v = kv(1, cap, 2, 64)
            a.append(k, v)
            for t in range(cap):
                b.append(k[:, t:t + 1], v[:, t:t + 1])
            assert a.lengths() == b.lengths() == [cap]
            assert b.num_free_pages == 0 or a.max_quant == 0
            for x, y in zip(a.dequantize(), b.dequantize()):
                assert torch.equal(x, y)
            with pytest.raises(ValueError, match="capacity"):
                a.append(k[:, :1], v[:, :1])


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(bits=3), ValueError, "bits"),
    (dict(bits=4.0), TypeError, "bits"),
    (dict(bits="int4"), ValueError, "bits"),
    (dict(group_size=16), ValueError, "group_size"),
    (dict(group_size=32.0), TypeError, "group_size"),
    (dict(D=60), ValueError, "head_dim"),
    (dict(residual=48), ValueError, "residual"),
    (dict(residual=0), ValueError, "residual"),
    (dict(sink=-1), ValueError, "sink"),
    (dict(sink=1000), ValueError, "sink"),
    (dict(capacity=0), ValueError, "capacity"),
    (dict(B=0), ValueError, "batch"),
    (dict(layout="ring"), ValueError, "layout"),
    (dict(page_size=64), ValueError, "page_size"),
    (dict(layout="paged", page_size=48), ValueError, "page_size"),
    (dict(layout="paged", num_pages=0), ValueError, "num_pages"),
    (dict(dtype=torch.float64), TypeError, "dtype"),
])
def test_bad_constructor(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_cache(**kwargs)


def _bad_append(case):
    """(k, v, kwargs) for one rejected append on a cache (B=2, Hkv=2, D=64, bits=4, holds 60 of
    100 tokens); each would otherwise flush a group, so a partial write would show."""
    k, v = kv(2, 20, 2, 64)
    kw = {}
    if case == "k_rank": k = k[0]
    elif case == "batch": k, v = k[:1], v[:1]
    elif case == "heads": k = torch.randn(2, 20, 3, 64)
    elif case == "head_dim": k, v = torch.randn(2, 20, 2, 80), torch.randn(2, 20, 2, 80)
    elif case == "v_shape": v = v[:, :10]
    elif case == "no_tokens": k, v = k[:, :0], v[:, :0]
    elif case == "k_int": k = k.to(torch.int32)
    elif case == "v_float64": v = v.double()
    elif case == "not_tensor": v = v.tolist()
    elif case == "device": k = k.to("meta")
    elif case == "nan": k[1, 19, 1, 5] = float("nan")
    elif case == "inf": v[0, 3, 0, 0] = float("-inf")
    elif case == "overflow_dtype": k[0, 2, 0, 0] = 1e6          # float32 -> float16 cache (this case): inf
    elif case == "fp16_range": v[1, 0, 1, 1] = 70000.0          # scales/zeros are float16
    elif case == "capacity": k, v = kv(2, 41, 2, 64)
    elif case == "lengths_shape": kw["lengths"] = [5]
    elif case == "lengths_float": kw["lengths"] = torch.tensor([5.0, 1.0])
    elif case == "lengths_range": kw["lengths"] = [21, 3]
    elif case == "lengths_negative": kw["lengths"] = [3, -1]
    return k, v, kw


BAD_APPEND = [
    ("k_rank", ValueError, "k:"), ("batch", ValueError, "k: expected shape"), ("heads", ValueError, "k:"),
    ("head_dim", ValueError, "k:"), ("v_shape", ValueError, "v:"), ("no_tokens", ValueError, "T >= 1"),
    ("k_int", TypeError, "k:"), ("v_float64", TypeError, "v:"), ("not_tensor", TypeError, "v:"),
    ("device", ValueError, "k: on meta"), ("nan", ValueError, r"k\[1, 19\] is not finite"),
    ("inf", ValueError, r"v\[0, 3\] is not finite"), ("overflow_dtype", ValueError, r"k\[0, 2\] overflows"),
    ("fp16_range", ValueError, r"v\[1, 0\] has \|value\| 7\d+ > 65504"), ("capacity", ValueError, "capacity"),
    ("lengths_shape", ValueError, "lengths"), ("lengths_float", TypeError, "lengths"),
    ("lengths_range", ValueError, r"lengths\[0\] = 21"), ("lengths_negative", ValueError, r"lengths\[1\] = -1"),
]


@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("case,exc,match", BAD_APPEND)
def test_bad_append_leaves_cache_unchanged(layout, case, exc, match):
    kw = dict(layout="paged", page_size=32) if layout == "paged" else {}
    dtype = torch.float16 if case == "overflow_dtype" else torch.bfloat16
    c = make_cache(B=2, capacity=100, bits=4, residual=32, sink=1, dtype=dtype, **kw)
    c.append(*kv(2, 60, 2, 64))
    before = snapshot(c)
    k, v, akw = _bad_append(case)
    with pytest.raises(exc, match=match):
        c.append(k, v, **akw)
    assert_same_state(snapshot(c), before)


def test_out_of_pages_leaves_cache_unchanged():
    c = make_cache(B=2, capacity=300, bits=8, residual=32, layout="paged", page_size=64, num_pages=3)
    c.append(*kv(2, 90, 2, 64), lengths=[90, 80])    # 64 quantized tokens each: one page each
    before = snapshot(c)
    with pytest.raises(ValueError, match="num_pages: out of pages: this append needs 2 new pages"):
        c.append(*kv(2, 64, 2, 64))                  # both need a second page; one is free
    assert_same_state(snapshot(c), before)
    c.append(*kv(2, 64, 2, 64), lengths=[64, 0])     # one of them can still grow
    assert c.num_free_pages == 0 and c.block_table.tolist() == [[0, 2, -1, -1, -1], [1, -1, -1, -1, -1]]


@pytest.mark.parametrize("layout", ["dense", "paged"])
def test_failure_while_writing_restores_the_cache(layout, monkeypatch):
    """A copy that fails after the checks (here: the store write of the second sequence, as an
    out-of-memory error would) restores the host bookkeeping, the pages and the fp rows."""
    kw = dict(layout="paged", page_size=32) if layout == "paged" else {}
    c = make_cache(B=2, capacity=200, bits=4, residual=32, sink=1, **kw)
    ref = make_cache(B=2, capacity=200, bits=4, residual=32, sink=1, **kw)
    k1, v1 = kv(2, 50, 2, 64)
    k2, v2 = kv(2, 40, 2, 64)
    for cache in (c, ref):
        cache.append(k1, v1)
    before = snapshot(c)
    real, calls = c._write_store, []

    def failing(b, u0, f):
        calls.append(b)
        if b == 1:
            raise RuntimeError("injected failure")
        real(b, u0, f)

    monkeypatch.setattr(c, "_write_store", failing)
    with pytest.raises(RuntimeError, match="injected"):
        c.append(k2, v2)
    assert calls == [0, 1]                           # sequence 0 was written before the failure
    after = snapshot(c)
    for name in ("fp_k", "fp_v", "block_table", "n_sink", "n_quant", "n_res", "host"):
        assert (after[name] == before[name]) if name == "host" else torch.equal(after[name], before[name]), name
    monkeypatch.undo()
    c.append(k2, v2)                                 # the retry lands exactly like a clean append
    ref.append(k2, v2)
    assert_same_state(snapshot(c), snapshot(ref))


def test_append_ignores_autograd_and_inference_mode():
    """Inputs that require grad are stored without their graph (the cache stays exportable to
    the kernels); a cache built under inference_mode accepts appends outside it, and back."""
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(2, 5, 2, 64)
    c = make_cache(B=2, capacity=100, bits=4, residual=32)
    for _ in range(3):
        c.append(lin(x), lin(x))
    assert not any(t.requires_grad for t in c.tensors().values())
    out = pk.decode_attention(torch.randn(2, 4, 64), c, backend="cpu")
    assert not out.requires_grad and torch.isfinite(out).all()
    with torch.inference_mode():
        c2 = make_cache(B=2, capacity=100, bits=4, residual=32, layout="paged", page_size=32)
    c2.append(*kv(2, 40, 2, 64))
    with torch.inference_mode():
        c2.append(*kv(2, 40, 2, 64))
    assert c2.lengths() == [80, 80]
    k, v = c2.dequantize()
    assert torch.isfinite(k).all() and torch.isfinite(v).all()


def test_large_values_allowed_where_they_fit():
    """fp8 has float32 scales: no float16 range limit; integer formats accept |x| <= 65504;
    NaN in padding rows past `lengths` is never read."""
    k, v = kv(2, 40, 2, 64)
    k[0, 5] = 3e7
    c = make_cache(capacity=100, bits="fp8", residual=32, dtype=torch.float32)
    c.append(k, v)
    assert torch.isfinite(c.dequantize()[0]).all()
    k[0, 5] = 65504.0
    c = make_cache(capacity=100, bits=2, residual=32, dtype=torch.float32)
    c.append(k, v)
    k[1, 30:] = float("nan")
    c.append(k, v, lengths=[40, 30])
    assert c.lengths() == [80, 70]


# ---------------------------------------------------------------------------------------------
# decode attention over the cache


def _filled(bits, gs, D, Hkv, residual, lens, sink=0, layout="dense", dtype=torch.bfloat16):
    B, T = len(lens), max(lens)
    c = make_cache(B=B, capacity=T + 20, Hkv=Hkv, D=D, bits=bits, group_size=gs, residual=residual, sink=sink,
                   layout=layout, dtype=dtype, **(dict(page_size=max(gs, 64)) if layout == "paged" else {}))
    k, v = kv(B, T, Hkv, D)
    cut = T // 3  # a prefill in two uneven chunks
    c.append(k[:, :cut], v[:, :cut], lengths=[min(L, cut) for L in lens])
    c.append(k[:, cut:], v[:, cut:], lengths=[max(0, L - cut) for L in lens])
    poison(c)
    return c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", FORMATS)
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("ratio", [1, 4])
@pytest.mark.parametrize("rfac", [1, 2])
def test_attention_matrix(backend, bits, gs, D, ratio, rfac):
    Hkv, lens = 2, [1, 17, 300]
    c = _filled(bits, gs, D, Hkv, rfac * gs, lens, sink=1 if rfac == 2 else 0)
    assert c._n_quant[2] > 0
    q = torch.randn(len(lens), Hkv * ratio, D, dtype=torch.bfloat16)
    out, lse = pk.decode_attention(q, c, backend=backend, return_lse=True)
    check_attention(out, lse, q, c, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("method,num_splits", [("auto", None), ("lean", None), ("split", None), ("split", 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_attention_methods_layouts_dtypes(backend, layout, method, num_splits, dtype):
    lens = [300, 1, 64, 97, 33]
    c = _filled(4, 32, 64, 2, 32, lens, sink=2, layout=layout, dtype=dtype)
    q = torch.randn(len(lens), 8, 64, dtype=dtype)
    out, lse = pk.decode_attention(q, c, method=method, num_splits=num_splits, backend=backend, return_lse=True)
    check_attention(out, lse, q, c, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_out_scale_and_strided_q(backend):
    c = _filled(2, 64, 128, 2, 64, [17, 300], sink=3)
    qbig = torch.randn(2, 16, 2, 128)
    q = qbig[:, ::2, 1]                                   # [2, 8, 128], strided
    out = torch.empty(2, 8, 128)
    o = pk.decode_attention(q, c, scale=0.3, out=out, backend=backend)
    assert o.data_ptr() == out.data_ptr()
    _, lse = pk.decode_attention(q, c, scale=0.3, backend=backend, return_lse=True)
    check_attention(out, lse, q, c, scale=0.3, backend=backend)


@pytest.mark.skipif(not TRITON_KV[0], reason=f"Triton quantized-KV backend unavailable: {TRITON_KV[1]}")
@pytest.mark.parametrize("bits", FORMATS)
@pytest.mark.parametrize("layout", ["dense", "paged"])
def test_attention_triton_through_public_api(bits, layout):
    """pk.decode_attention(q, cache, backend="triton") end to end (the interpreter on CPU); the
    kernel itself is tested in test_triton_kv.py."""
    c = _filled(bits, 32, 80, 2, 32, [1, 17, 200], sink=2, layout=layout)
    q = torch.randn(3, 8, 80)
    for method in ("lean", "split"):
        out, lse = pk.decode_attention(q, c, method=method, backend="triton", return_lse=True)
        check_attention(out, lse, q, c)


def test_reference_is_dense_attention_over_dequantize():
    c = _filled("fp8", 32, 64, 2, 32, [40, 5])
    q = torch.randn(2, 4, 64)
    o, lse = decode_attention_kv_reference(q, c, return_lse=True)
    k, v = c.dequantize()
    o2, lse2 = decode_attention_reference(q, k, v, torch.tensor([40, 5]), return_lse=True)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)


def test_auto_backend_never_falls_back_to_reference(monkeypatch):
    c = _filled(4, 32, 64, 2, 32, [50, 70])
    q = torch.randn(2, 4, 64)
    out, lse = pk.decode_attention(q, c, return_lse=True)   # the CPU kernel
    check_attention(out, lse, q, c, backend="auto")
    # without the CPU kernel, "auto" refuses (naming why) instead of running the slow reference
    from pykernels import _C
    monkeypatch.delattr(_C, "decode_attention_kv")
    with pytest.raises(NotImplementedError, match="decode_attention_kv"):
        pk.decode_attention(q, c)


@pytest.mark.parametrize("case,exc,match", [
    ("v_cache", ValueError, "v_cache: must be None"),
    ("seqlens", ValueError, "seqlens: must be None"),
    ("block_table", ValueError, "block_table: must be None"),
    ("q_rank", ValueError, "q:"),
    ("q_batch", ValueError, "q: batch"),
    ("q_head_dim", ValueError, "q: head_dim"),
    ("q_heads", ValueError, "q: num_heads 3"),
    ("q_dtype", TypeError, "q:"),
    ("q_device", ValueError, "q: on meta"),
    ("empty", ValueError, "sequence 1 holds no tokens"),
    ("out", ValueError, "out"),
    ("method", ValueError, "method"),
    ("backend", ValueError, "backend"),
])
def test_attention_bad_input(case, exc, match):
    c = make_cache(B=2, capacity=100)
    c.append(*kv(2, 40, 2, 64))
    q = torch.randn(2, 4, 64)
    kw = {}
    if case == "v_cache": kw["v_cache"] = torch.zeros(1)
    elif case == "seqlens": kw["seqlens"] = torch.tensor([40, 40])
    elif case == "block_table": kw["block_table"] = c.block_table
    elif case == "q_rank": q = q[0]
    elif case == "q_batch": q = q[:1]
    elif case == "q_head_dim": q = torch.randn(2, 4, 32)
    elif case == "q_heads": q = torch.randn(2, 3, 64)
    elif case == "q_dtype": q = q.double()
    elif case == "q_device": q = q.to("meta")
    elif case == "empty":
        c = make_cache(B=2, capacity=100)
        c.append(*kv(2, 4, 2, 64), lengths=[4, 0])
    elif case == "out": kw["out"] = torch.empty(2, 4, 32)
    elif case == "method": kw["method"] = "stream"
    elif case == "backend": kw["backend"] = "tpu"
    with pytest.raises(exc, match=match):
        pk.decode_attention(q, c, backend=kw.pop("backend", "reference"), **kw)


def test_torch_library_op_and_torch_compile():
    """pk.decode_attention(q, cache) is one torch.library op under torch.compile (fullgraph: no
    graph break), with the same result as eager; opcheck validates the op's registration."""
    c = _filled(4, 32, 64, 2, 32, [50, 70])
    q = torch.randn(2, 4, 64)
    want, want_lse = pk.decode_attention(q, c, return_lse=True)

    def f(q, cache):
        o, lse = pk.decode_attention(q * 1.0, cache, return_lse=True)
        return o + 1, lse

    got, got_lse = torch.compile(f, backend="inductor", fullgraph=True)(q, c)
    assert torch.allclose(got - 1, want, atol=1e-6, rtol=1e-6)
    assert torch.allclose(got_lse, want_lse, atol=1e-6, rtol=1e-6)
    args = (q, c.k_codes, c.k_scale, c.k_zero, c.v_codes, c.v_scale, c.v_zero, c.fp_k, c.fp_v, c.block_table,
            c.n_sink, c.n_quant, c.n_res, str(c.bits), c.group_size, 0.125, "lean", 0, "cpu")
    torch.library.opcheck(torch.ops.pykernels.decode_attention_kv.default, args)
    o, lse = torch.ops.pykernels.decode_attention_kv(*args)
    check_attention(o, lse, q, c, scale=0.125, backend="cpu")
