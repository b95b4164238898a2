"""Accuracy of the quantized KV cache on the synthetic outlier set (issue 4, "Accuracy").

Reference: float64 attention of the synthetic queries over the full-precision cache (the bf16
rounding of the synthetic K/V, what a bf16 cache holds), ``bench.kvquant.attend``. The cache
under test is ``pk.QuantizedKVCache`` (``dequantize()`` is the oracle the kernels are tested
against in tests/test_kv_cache.py), compared with the plain per-token round-to-nearest baseline
of the same bits (``bench.kvquant.rtn_per_token``). The synthetic set (``bench.kvquant.
synthetic_kv``) has 4 outlier key channels of 10-20x per head, RoPE, an attention sink taking
~40% of the mass, and 1% value outliers; see its docstring for the constants.
"""
import math

import pytest
import torch

import pykernels as pk
from bench import kvquant as KV

L, HKV, D, G, NQ = 2048, 2, 128, 4, 4
INT_FORMATS = (8, 4, 2)


@pytest.fixture(scope="module")
def data():
    d = KV.synthetic_kv(L, HKV, D, G, NQ, seed=7)
    q, k, v = d["q"].bfloat16().float(), d["k"].bfloat16(), d["v"].bfloat16()
    return {"q": q, "k": k, "v": v, "ref": KV.attend(q, k.float(), v.float()), "info": d["info"]}


def _metrics(data, kh, vh):
    return KV.compare(data["ref"], KV.attend(data["q"], kh, vh))


_cache = {}


def _kivi(data, bits, gs, sink=0, residual=128):
    key = (bits, gs, sink, residual)
    if key not in _cache:
        kh, vh, cache = KV.class_kivi(data["k"], data["v"], bits, gs, residual, sink)
        _cache[key] = (_metrics(data, kh, vh), cache, kh, vh)
    return _cache[key]


# ------------------------------------------------------------------ the synthetic set itself

def test_synthetic_set_has_the_reported_structure(data):
    info = data["info"]
    k_pre = KV.rope(data["k"].float(), -torch.arange(L))        # undo RoPE: pre-RoPE keys
    for h in range(HKV):
        ch = info["outlier_channels"][h]
        assert len(ch) == 4
        mag = k_pre[1:, h].abs().mean(0)                          # mean |k| per channel (sink excluded)
        normal = torch.ones(D, dtype=torch.bool)
        normal[ch] = False
        normal[[(c + D // 2) % D for c in ch]] = False
        ratio = mag[ch] / mag[normal].mean()
        assert bool((ratio > 7).all() and (ratio < 25).all()), ratio  # 10-20x offsets (+ unit noise)
        # post-RoPE the outlier's energy stays in its pair but moves between the two channels as
        # the position grows (slow pairs: over 2048 tokens they turn by 0.2 to 2 radians)
        post = data["k"][1:, h].float()
        moved = []
        for c in ch:
            a, b = c % (D // 2), c % (D // 2) + D // 2
            energy = post[:, a] ** 2 + post[:, b] ** 2
            assert float(energy.mean().sqrt() / mag[ch].mean()) == pytest.approx(1.0, abs=0.4)
            share = post[:, a] ** 2 / energy
            moved.append(float(share[-64:].mean() - share[:64].mean()))
        assert max(abs(x) for x in moved) > 0.2, moved
    p = data["ref"][1]
    assert float(p[..., 0].mean()) == pytest.approx(KV.SINK_MASS, abs=0.02)  # the sink takes ~40%
    assert float(data["v"][0].float().abs().max()) < 0.5                    # with a small value
    span = torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum(-1))
    assert float(span.max()) < L / 8                                         # not uniform attention
    frac = float((data["v"][1:].float().abs() > 7.5).float().mean())
    assert 0.007 < frac < 0.013                                              # ~1% value outliers


def test_synthetic_set_is_seeded():
    a, b = KV.synthetic_kv(256, 2, 64, 2, 2, seed=1), KV.synthetic_kv(256, 2, 64, 2, 2, seed=1)
    assert all(torch.equal(a[n], b[n]) for n in ("q", "k", "v"))
    assert not torch.equal(a["k"], KV.synthetic_kv(256, 2, 64, 2, 2, seed=2)["k"])


# ------------------------------------------------------------------ the cache class

@pytest.mark.parametrize("bits", [8, 4, 2, "fp8"])
@pytest.mark.parametrize("gs,sink", [(32, 0), (64, 1), (128, 3)])
def test_cache_class_holds_the_kv_format_quantization(data, bits, gs, sink):
    """The class's dequantized contents are exactly kv_format's KIVI of the same split."""
    _, cache, kh, vh = _kivi(data, bits, gs, sink)
    ek, ev = KV.emulate_kivi(data["k"], data["v"], bits, gs, 128, sink)
    assert torch.equal(kh, ek) and torch.equal(vh, ev)
    assert (int(cache.n_sink), int(cache.n_quant), int(cache.n_res)) == KV.kivi_split(L, gs, 128, sink)


def test_reference_backend_is_the_attention_measured_here(data):
    """pk.decode_attention(backend="reference") on the cache == float64 attention over dequantize()."""
    _, cache, kh, vh = _kivi(data, 4, 32)
    for n in range(NQ):
        q = data["q"][n:n + 1].bfloat16()
        out = pk.decode_attention(q, cache, backend="reference").float()
        ref = KV.attend(q.float(), kh, vh)[0].float()
        # bf16 output: 8 mantissa bits of |out| <= ~3
        assert float((out - ref).abs().max()) <= 2e-2


# ------------------------------------------------------------------ accuracy

@pytest.mark.parametrize("bits", INT_FORMATS)
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("sink", [0, 1])
def test_kivi_never_worse_than_per_token_rtn(data, bits, gs, sink):
    m = _kivi(data, bits, gs, sink)[0]
    r = _metrics(data, *KV.rtn_per_token(data["k"], data["v"], bits, gs))
    assert m["cos_mean"] >= r["cos_mean"], (m, r)
    assert m["cos_min"] >= r["cos_min"], (m, r)
    assert m["rel_l2"] <= r["rel_l2"], (m, r)
    assert m["kl_mean"] <= r["kl_mean"], (m, r)


@pytest.mark.parametrize("gs", [32, 64, 128])
def test_sink_lowers_int2_attention_kl(data, gs):
    """Keeping the first token in full precision lowers KL(p_fp || p_int2) measurably: by 7-30%
    over seeds 0-5 and group sizes 32/64/128 (16-23% on this seed). The output cosine moves by
    less than 0.02 either way, so no cosine claim is made (see the kv-3 report notes)."""
    s0, s1 = _kivi(data, 2, gs, 0)[0], _kivi(data, 2, gs, 1)[0]
    assert s1["kl_mean"] < 0.95 * s0["kl_mean"], (s0, s1)


# Floors measured on this set (seed 7) with margin, so a regression in the quantizer, the split
# or the class shows; they are NOT the targets (int4 >= 0.999, int2 >= 0.99: missed on this set;
# the kv-3 report suite shows the figures against them and why).
FLOORS = {8: 0.9999, "fp8": 0.998, 4: 0.985, 2: 0.75}


@pytest.mark.parametrize("bits", [8, "fp8", 4, 2])
def test_output_cosine_floor(data, bits):
    m = _kivi(data, bits, 32)[0]
    assert m["cos_mean"] >= FLOORS[bits], m
    assert math.isfinite(m["kl_mean"])
