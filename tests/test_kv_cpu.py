"""CPU decode attention fused with the quantized KV cache (``_C.decode_attention_kv``).

Stores are built with ``pykernels.kv_format.quantize_kv`` directly (no cache class). The oracle
dequantizes them with ``kv_format.dequantize_kv`` and runs ``decode_attention_reference`` in
float64 on the concatenated [sink | dequantized store | residual] tokens of each sequence.

Tolerances: the kernel computes with exactly the dequantized values the oracle sees (codes are
exact small integers or e4m3 values, scales and zeros fp16/fp32), only regrouped algebraically
(sum_d (q_d s_d) c_d + q.z instead of q . (s c + z), p s c + p z instead of p (s c + z)) and summed
in another order in fp32. Those differences are a few fp32 roundings per term, so float32
outputs must agree to ~1e-5: we allow rtol 1e-4 / atol 2e-5 (out) and 1e-4 (lse). A wrong
permutation, group, scale or region is off by O(1) and cannot pass. The avx512_bf16 variant rounds
q * key scale to bf16 for int4 / int2 keys; it is checked against an oracle with that rounding
(bf16_key_oracle) and against a derived bound (bf16_bound).

Every store is poisoned where the kernel must not read: unused slots and pages have NaN scales
and zeros (and 0xFF codes), fp rows past n_sink + n_res are NaN, block-table entries past the
pages in use are out of range. Any such read makes the output NaN or raises.
"""
import functools
import math
import random

import pytest
import torch

from pykernels import kv_format as kf
from pykernels.reference import decode_attention_reference

_C = pytest.importorskip("pykernels._C", reason="pykernels._C not built: run `make test`")
# _C is built from this tree: a build without the kernel is stale and must fail, not skip
assert hasattr(_C, "decode_attention_kv"), "pykernels._C has no decode_attention_kv: stale build, run `make build`"

from conftest import ISAS  # noqa: E402  (the variants the `isa` fixture runs)

FORMATS = [8, 4, 2, "fp8"]
RTOL, ATOL, LSE_ATOL = 1e-4, 2e-5, 1e-4
NAN16 = float("nan")


def build(seqs, Hkv, D, bits, gs, *, G=4, S=None, fp_dtype=torch.float32, q_dtype=torch.float32, seed=0,
          spare_pages=2, shuffle=True):
    """seqs: list of (n_sink, n_quant, n_res). Returns the kernel arguments (dict) and the oracle
    caches (dense [B, Lmax, Hkv, D] float64 K, V and lengths)."""
    g = torch.Generator().manual_seed(seed)
    B = len(seqs)
    S = S or 2 * gs
    pages_per = [-(-nq // S) for _, nq, _ in seqs]
    P = sum(pages_per) + spare_pages
    ids = list(range(P))
    if shuffle:
        random.Random(seed).shuffle(ids)
    max_pages = max(pages_per + [1]) + 1
    bt = torch.full((B, max_pages), 10 ** 6, dtype=torch.int32)  # out-of-range past the pages in use
    used, nxt = {}, 0
    for b, n in enumerate(pages_per):
        for j in range(n):
            bt[b, j] = ids[nxt]
            used[ids[nxt]] = (b, j)
            nxt += 1
    # Raw K/V of every page, quantized page by page ([P, Hkv, S, D], key groups inside pages).
    k = torch.randn(P, Hkv, S, D, generator=g) * 1.5 + 0.3
    v = torch.randn(P, Hkv, S, D, generator=g)
    f = {n: (t.contiguous() if t is not None else None) for n, t in kf.quantize_kv(k, v, bits, gs).items()}
    kd, vd = kf.dequantize_kv(f, bits, gs, D)  # [P, Hkv, S, D] float32, before poisoning
    # Key codes, scales and zeros per token (int4 / int2: the avx512_bf16 oracle, bf16_key_oracle)
    kq = None
    if bits in (4, 2):
        zc = torch.zeros_like(f["k_zero"])
        kq = [kf.unpack_codes(f["k_codes"], bits)[..., :D].float(),  # c
              kf.dequantize_keys(torch.zeros_like(f["k_codes"]), zc, f["k_scale"], bits, gs, D),  # s
              kf.dequantize_keys(torch.zeros_like(f["k_codes"]), zc, f["k_zero"], bits, gs, D)]  # z
    # Poison every slot no sequence uses.
    for p in range(P):
        b, j = used.get(p, (None, None))
        first = 0 if b is None else max(0, min(S, seqs[b][1] - j * S))
        if first >= S:
            continue
        f["k_codes"][p, :, first:] = 0xFF
        f["v_codes"][p, :, first:] = 0xFF
        if bits == "fp8":
            f["k_scale"][p, :, first // gs:] = NAN16
            f["v_scale"][p, :, first // gs:] = NAN16
        else:
            for n in ("k_scale", "k_zero"):
                f[n][p, :, first // gs:] = NAN16
            for n in ("v_scale", "v_zero"):
                f[n][p, :, first:] = NAN16
    F = max(ns + nr for ns, _, nr in seqs) + 3
    fp_k = torch.full((B, F, Hkv, D), float("nan"), dtype=fp_dtype)
    fp_v = torch.full((B, F, Hkv, D), float("nan"), dtype=fp_dtype)
    lens = [ns + nq + nr for ns, nq, nr in seqs]
    Lmax = max(lens)
    K = torch.zeros(B, Lmax, Hkv, D, dtype=torch.float64)
    V = torch.zeros(B, Lmax, Hkv, D, dtype=torch.float64)
    KQ = torch.zeros(3, B, Lmax, Hkv, D, dtype=torch.float64) if kq is not None else None  # c, s, z
    isq = torch.zeros(B, Lmax, dtype=torch.bool)  # quantized-store tokens
    for b, (ns, nq, nr) in enumerate(seqs):
        n = ns + nr
        fp_k[b, :n] = torch.randn(n, Hkv, D, generator=g).to(fp_dtype)
        fp_v[b, :n] = torch.randn(n, Hkv, D, generator=g).to(fp_dtype)
        qk = torch.cat([kd[int(bt[b, j])] for j in range(pages_per[b])], dim=1) if nq else torch.zeros(Hkv, 0, D)
        qv = torch.cat([vd[int(bt[b, j])] for j in range(pages_per[b])], dim=1) if nq else torch.zeros(Hkv, 0, D)
        K[b, :ns + nq + nr] = torch.cat([fp_k[b, :ns].double(), qk[:, :nq].transpose(0, 1).double(),
                                         fp_k[b, ns:n].double()])
        V[b, :ns + nq + nr] = torch.cat([fp_v[b, :ns].double(), qv[:, :nq].transpose(0, 1).double(),
                                         fp_v[b, ns:n].double()])
        isq[b, ns:ns + nq] = True
        if KQ is not None and nq:
            for i, t in enumerate(kq):
                KQ[i, b, ns:ns + nq] = torch.cat([t[int(bt[b, j])] for j in range(pages_per[b])], dim=1)[:, :nq].transpose(0, 1).double()
    q = torch.randn(B, Hkv * G, D, generator=g).to(q_dtype)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    args = dict(q=q, k_codes=f["k_codes"], k_scale=f["k_scale"], k_zero=f["k_zero"], v_codes=f["v_codes"],
                v_scale=f["v_scale"], v_zero=f["v_zero"], fp_k=fp_k, fp_v=fp_v, block_table=bt,
                n_sink=i32([s[0] for s in seqs]), n_quant=i32([s[1] for s in seqs]), n_res=i32([s[2] for s in seqs]),
                out=torch.empty(B, Hkv * G, D, dtype=q_dtype), lse=torch.empty(B, Hkv * G),
                scale=1.0 / math.sqrt(D), fmt=kf.format_name(bits), group_size=gs, method="lean", num_splits=1,
                num_workers=2, tile=gs)
    return args, (K, V, lens, (KQ, isq) if KQ is not None else None)


@functools.lru_cache(maxsize=64)
def build_cached(seqs, Hkv, D, bits, gs, G=4, S=None, seed=0):
    """build() shared by the ISA variants of a test (callers never modify the tensors)."""
    return build(list(seqs), Hkv, D, bits, gs, G=G, S=S, seed=seed)


def run(args, **over):
    a = dict(args, **over)
    a["out"] = torch.empty_like(args["out"])
    a["lse"] = torch.empty_like(args["lse"])
    _C.decode_attention_kv(**a)
    return a["out"], a["lse"]


# avx512_bf16 variant, int4 / int2 keys: the kernel rounds qs_d = q_d s_d (q already times the
# softmax scale, fp32) to bf16 once per key group and query head (round-to-nearest-even:
# |qs~ - qs| <= 2^-9 |qs|) and dots it with the exact codes in bf16 pairs (fp32 accumulation; the
# bf16 code offset B = 16 / 8 is removed with B * sum qs~ of the same rounded values). So it is not
# within the fp32 tolerances of the exact oracle. Two checks:
#  1. bf16_key_oracle: the same float64 attention with the quantized scores computed from the
#     rounded qs~ (the kernel's model exactly), at the fp32 tolerances RTOL / ATOL / LSE_ATOL.
#     This is the tight one: a wrong code, scale, zero, permutation or group is off by >= 1e-3.
#  2. bf16_bound: the derived worst-case bound against the exact oracle. Per score,
#       |ds_t| <= 2^-9 sum_d |q_d s_d c_td| + (fp32 accumulation) <= 2^-8 sum_d |q_d s_d (c_td + 1)|
#     (margin 2; the "+1" covers the accumulation of D / 2 pair sums of size <= (B + c) |qs~|
#     for D <= 512). With d = max_t |ds_t| (fp rows: ds = 0): |d lse| <= d and
#     |d out| <= (e^{2d} - 1) max_t |v_t| (each p_t moves by a factor in [e^{-2d}, e^{2d}]).
#     It is rigorous but ~100x looser than the typical error (rounding errors do not align), so
#     it documents the contract; check 1 is what catches a wrong kernel.
def bf16_key_oracle(args, oracle):
    """(out [B, Hq, D], lse [B, Hq]) float64 with the bf16-rounded q * key scale (see above)."""
    K, V, lens, (KQ, isq) = oracle
    B, Hq, D = args["q"].shape
    idx = torch.arange(Hq) // (Hq // K.shape[2])
    q32 = args["q"].float() * torch.tensor(args["scale"], dtype=torch.float32)  # as the launcher
    c, s, z = (t[:, :, idx] for t in KQ)  # [B, L, Hq, D]
    qs = (q32[:, None] * s.float()).to(torch.bfloat16).double()
    sq = (qs * c).sum(-1) + (q32[:, None].double() * z).sum(-1)
    sf = (q32[:, None].double() * K[:, :, idx]).sum(-1)
    sc = torch.where(isq[:, :, None], sq, sf)  # [B, L, Hq]
    outs, lses = [], []
    for b in range(B):
        lse = torch.logsumexp(sc[b, :lens[b]], 0)
        p = torch.exp(sc[b, :lens[b]] - lse)
        outs.append(torch.einsum("lh,lhd->hd", p, V[b, :lens[b]][:, idx]))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def bf16_bound(args, oracle):
    """The derived bound (see above): (out bound [B, Hq, 1], lse bound [B, Hq])."""
    K, V, lens, (KQ, isq) = oracle
    q = args["q"].double() * args["scale"]
    B, Hq, D = q.shape
    idx = torch.arange(Hq) // (Hq // K.shape[2])
    c, s = KQ[0][:, :, idx], KQ[1][:, :, idx]
    d = (2.0 ** -8 * torch.einsum("bhd,blhd->bhl", q.abs(), s.abs() * (c + 1))).amax(dim=-1)  # [B, Hq]
    vmax = torch.stack([V[b, :lens[b]].abs().amax(dim=(0, 2)) for b in range(B)])[:, idx]
    return (torch.expm1(2 * d) * vmax).unsqueeze(-1), d


def check(out, lse, args, oracle, rtol=RTOL, atol=ATOL, isa=None):
    """isa: the variant that computed out (default: the active one)."""
    K, V, lens, KQ = oracle
    o_ref, l_ref = decode_attention_reference(args["q"].double(), K, V, torch.tensor(lens), scale=args["scale"],
                                              return_lse=True, compute_dtype=torch.float64)
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
    if (isa or _C.active_isa()) == "avx512_bf16" and KQ is not None:
        ob, lb = bf16_bound(args, oracle)
        err = (out.double() - o_ref.double()).abs()
        assert (err <= atol + rtol * o_ref.double().abs() + ob).all(), "out: outside the derived bf16 bound"
        assert ((lse.double() - l_ref.double()).abs() <= LSE_ATOL + lb).all(), "lse: outside the derived bf16 bound"
        o_ref, l_ref = bf16_key_oracle(args, oracle)
    torch.testing.assert_close(out.double(), o_ref.double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(lse.double(), l_ref.double(), rtol=0, atol=LSE_ATOL)


# Sequences (n_sink, n_quant, n_res): sinks that put lean / split piece boundaries in the middle
# of key groups, an empty store, a store with no fp rows, single tokens.
def mixed(gs):
    return [(3, 4 * gs, 17), (0, gs, 0), (5, 0, 1), (0, 0, 1), (1, 0, 0), (4, 3 * gs, 0), (0, 2 * gs, 9)]


@pytest.mark.parametrize("bits", FORMATS, ids=str)
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_formats(isa, bits, gs):
    args, oracle = build_cached(tuple(mixed(gs)), 2, 128, bits, gs, G=4)
    for method, W, splits, tile in [("lean", 3, 1, gs), ("split", 2, 3, gs), ("lean", 5, 1, 7)]:
        out, lse = run(args, method=method, num_workers=W, num_splits=splits, tile=tile)
        check(out, lse, args, oracle)


@pytest.mark.parametrize("bits", FORMATS, ids=str)
@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("G", [1, 4, 8])
def test_head_dims_and_groups(isa, bits, D, G):
    gs = 32 if D % 64 else 64  # D=80, 96: value channel groups that do not divide D
    seqs = ((2, 3 * gs, 5), (0, gs, 0), (1, 0, 0))
    args, oracle = build_cached(seqs, 2, D, bits, gs, G=G, seed=D + G)
    out, lse = run(args, num_workers=4, tile=gs)
    check(out, lse, args, oracle)


@pytest.mark.parametrize("bits", FORMATS, ids=str)
@pytest.mark.parametrize("G", [3, 6, 32])
def test_odd_and_large_groups(isa, bits, G):
    """Query heads per kv-head walked in chunks of 8 / 4 / 2 / 1 (6 = 4 + 2, 32 = 4 x 8)."""
    args, oracle = build_cached(((1, 64, 2), (0, 128, 0)), 1, 64, bits, 32, G=G, seed=G)
    out, lse = run(args, num_workers=3, tile=32)
    check(out, lse, args, oracle)


@pytest.mark.parametrize("bits", FORMATS, ids=str)
def test_head_dims_gs32_odd(isa, bits):
    """D = 72 / 80 / 104: partial unpacking units (code rows not a multiple of the SIMD unit)."""
    for D in (72, 80, 104):
        args, oracle = build_cached(((3, 64, 2), (0, 32, 1)), 1, D, bits, 32, G=3, seed=D)
        out, lse = run(args, num_workers=3, tile=32)
        check(out, lse, args, oracle)


@pytest.mark.parametrize("method", ["lean", "split"])
@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_schedules(method, workers, threads):
    threads(3)
    args, oracle = build(mixed(32) + [(7, 12 * 32, 31)], 3, 128, 4, 32, G=4, S=96)
    for splits in (1, 2, 5):
        for tile in (32, 96, 5):
            out, lse = run(args, method=method, num_workers=workers, num_splits=splits, tile=tile)
            check(out, lse, args, oracle)


@pytest.mark.parametrize("nthreads", [1, 2, 3])
@pytest.mark.parametrize("bits", [4, "fp8"], ids=str)
def test_threads_match(threads, nthreads, bits):
    """Results do not depend on the thread count (same pieces, same arithmetic)."""
    args, oracle = build(mixed(32), 2, 128, bits, 32, G=4)
    threads(1)
    ref = run(args, num_workers=3)
    threads(nthreads)
    out, lse = run(args, num_workers=3)
    assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1])


@pytest.mark.parametrize("fp_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dtypes(isa, fp_dtype, q_dtype):
    args, oracle = build([(3, 64, 17), (1, 32, 0)], 2, 64, 4, 32, G=4, fp_dtype=fp_dtype, q_dtype=q_dtype)
    out, lse = run(args)
    # out rounded to q's dtype: half an ulp of it on values of magnitude ~1
    tol = {torch.float32: ATOL, torch.float16: 1e-3, torch.bfloat16: 8e-3}[q_dtype]
    check(out, lse, args, oracle, rtol=tol, atol=tol)


def test_dense_single_page_and_strided_views():
    """Dense layout (one page per sequence), store tensors that are views (page / head strides
    of a larger buffer), non-contiguous q."""
    gs, D, Hkv = 32, 64, 2
    args, oracle = build([(0, 128, 0), (2, 64, 3)], Hkv, D, 2, gs, S=128, shuffle=False, spare_pages=0)
    big = {}
    for n in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
        t = args[n]
        buf = torch.full((t.shape[0] + 1, t.shape[1] + 2) + tuple(t.shape[2:]), 0, dtype=t.dtype)
        if t.dtype == torch.float16:
            buf.fill_(float("nan"))
        buf[1:, 1:1 + t.shape[1]] = t
        big[n] = buf[1:, 1:1 + t.shape[1]]
        assert not big[n].is_contiguous()
    qbig = torch.randn(args["q"].shape[0], args["q"].shape[1], 2 * D)
    qbig[..., ::2] = args["q"]
    out, lse = run(args, q=qbig[..., ::2], **big)
    ref = run(args)
    check(ref[0], ref[1], args, oracle)
    torch.testing.assert_close(out, ref[0], rtol=0, atol=0)


def test_long_sequence_avx512_matches_scalar():
    """A long sequence through every ISA: the variants agree with each other and the oracle."""
    args, oracle = build([(4, 32 * 40, 100)], 2, 128, 4, 32, G=4, S=256)
    prev = _C.active_isa()
    outs = []
    try:
        for name in ISAS:
            _C.set_isa(name)
            outs.append(run(args, num_workers=2, tile=64))
    finally:
        _C.set_isa(prev)
    for name, (out, lse) in zip(ISAS, outs):
        check(out, lse, args, oracle, isa=name)


@pytest.mark.skipif("avx512_bf16" not in ISAS, reason="needs AVX512-BF16")
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("mutation", ["code", "scale", "swap"])
def test_bf16_keys_tolerance_rejects_wrong_store(isa, bits, mutation):
    """The avx512_bf16 checks are tight enough to fail a kernel that reads one key group wrongly:
    run on a store with one group altered (codes c ^ 1, one channel's scale x 1.02, two channels'
    scales swapped) and check against the oracle of the unaltered store."""
    args, oracle = build_cached(tuple(mixed(32)), 2, 128, bits, 32, G=4)
    out, lse = run(args)
    check(out, lse, args, oracle)
    p = int(args["block_table"][0, 1])
    bad = {}
    if mutation == "code":
        bad["k_codes"] = args["k_codes"].clone()
        bad["k_codes"][p, 0, 5] ^= 0x11 if bits == 4 else 0x55  # one token
    elif mutation == "scale":
        bad["k_scale"] = args["k_scale"].clone()
        bad["k_scale"][p, 0, 0, 7] *= 1.02
    else:
        bad["k_scale"] = args["k_scale"].clone()
        bad["k_scale"][p, 0, 0, [8, 9]] = bad["k_scale"][p, 0, 0, [9, 8]]
    out, lse = run(args, **bad)
    with pytest.raises(AssertionError):
        check(out, lse, args, oracle)


# ------------------------------------------------------------------ bad inputs


def _bad_cases():
    def base():
        return build([(2, 64, 3)], 2, 64, 4, 32, G=2)[0]

    cases = []

    def case(name, err, mutate):
        cases.append(pytest.param(mutate, err, name, id=name))

    case("fmt", ValueError, lambda a: a.update(fmt="int3"))
    case("group_size", ValueError, lambda a: a.update(group_size=16))
    case("method", ValueError, lambda a: a.update(method="stream"))
    case("tile", ValueError, lambda a: a.update(tile=0))
    case("num_workers", ValueError, lambda a: a.update(num_workers=0))
    case("num_splits", ValueError, lambda a: a.update(num_splits=0))
    case("scale", ValueError, lambda a: a.update(scale=float("inf")))
    case("q", TypeError, lambda a: a.update(q=a["q"].to(torch.int32)))
    case("q", ValueError, lambda a: a.update(q=a["q"][..., :60], out=a["out"][..., :60].contiguous()))
    case("out", ValueError, lambda a: a.update(out=torch.empty(1, 4, 32)))
    case("lse", ValueError, lambda a: a.update(lse=torch.empty(1, 4, dtype=torch.float64)))
    case("k_codes", TypeError, lambda a: a.update(k_codes=a["k_codes"].to(torch.int16)))
    case("k_codes", ValueError, lambda a: a.update(k_codes=a["k_codes"][..., :16].contiguous()))
    case("k_codes", ValueError, lambda a: a.update(k_codes=a["k_codes"][:, :, :48].contiguous()))
    case("k_codes", ValueError, lambda a: a.update(k_codes=a["k_codes"].transpose(2, 3).contiguous().transpose(2, 3)))
    case("v_codes", ValueError, lambda a: a.update(v_codes=a["v_codes"][:1].contiguous()))
    case("k_scale", TypeError, lambda a: a.update(k_scale=a["k_scale"].float()))
    case("k_scale", ValueError, lambda a: a.update(k_scale=a["k_scale"][:, :, :1].contiguous()))
    case("k_zero", ValueError, lambda a: a.update(k_zero=None))
    case("v_scale", ValueError, lambda a: a.update(v_scale=a["v_scale"][..., :1, :].contiguous()))
    case("v_zero", TypeError, lambda a: a.update(v_zero=a["v_zero"].to(torch.bfloat16)))
    case("fp_k", ValueError, lambda a: a.update(fp_k=a["fp_k"][:, :, :1].contiguous()))
    case("fp_v", TypeError, lambda a: a.update(fp_v=a["fp_v"].half()))
    case("block_table", ValueError, lambda a: a.update(block_table=None))
    case("block_table", ValueError, lambda a: a.update(block_table=a["block_table"].long()))
    case("block_table", ValueError, lambda a: a["block_table"].__setitem__((0, 0), a["k_codes"].shape[0]))
    case("block_table", ValueError, lambda a: a["block_table"].__setitem__((0, 0), -1))
    case("n_sink", ValueError, lambda a: a.update(n_sink=a["n_sink"].long()))
    case("n_sink", ValueError, lambda a: a["n_sink"].fill_(-1))
    case("n_quant", ValueError, lambda a: a["n_quant"].fill_(48))  # not a multiple of group_size
    case("n_quant", ValueError, lambda a: a["n_quant"].fill_(32 * 1000))  # past max_pages * S
    case("n_quant", ValueError, lambda a: (a["n_quant"].fill_(0), a["n_sink"].fill_(0), a["n_res"].fill_(0)))
    case("n_res", ValueError, lambda a: a["n_res"].fill_(100))  # n_sink + n_res > F
    case("n_res", ValueError, lambda a: a.update(n_res=torch.zeros(2, dtype=torch.int32)))
    return base, cases


_BASE, _CASES = _bad_cases()


@pytest.mark.parametrize("mutate,err,name", _CASES)
def test_bad_inputs(mutate, err, name):
    a = _BASE()
    mutate(a)
    with pytest.raises(err, match=name):
        _C.decode_attention_kv(**a)


def test_fp8_zero_must_be_none():
    a = build([(0, 32, 1)], 1, 64, "fp8", 32, G=1)[0]
    a["k_zero"] = torch.zeros(1)
    with pytest.raises(ValueError, match="k_zero"):
        _C.decode_attention_kv(**a)
    a["k_zero"] = None
    a["v_scale"] = a["v_scale"].half()
    with pytest.raises(TypeError, match="v_scale"):
        _C.decode_attention_kv(**a)
