"""Analytic roofline: hardware table, cost models, placement and whole-model analysis.

Pure arithmetic, no timing: every expected figure below is derived by hand in a comment.
"""

import doctest
import importlib
import json
import math

import pytest

from roofline import (HARDWARE, Cost, MachineProfile, analyze_model, decode_attention_cost,
                      decode_attention_kv_cost, gemm_cost, get_machine, kv_bytes_per_token,
                      lut_gemv_cost, place, transfer_cost)

# Yao Fu (2024), "Challenges in Deploying Long-Context Transformers: A Theoretical Peak
# Performance Analysis": a 34B GQA model (Yi-34B shape).
YI_34B = dict(hidden_size=7168, num_hidden_layers=60, num_attention_heads=56,
              num_key_value_heads=8, head_dim=128, intermediate_size=20480, vocab_size=64000)
A100 = "A100-80GB-SXM"
# Parameters: per layer q,o 7168^2, k,v 7168*1024, MLP 3*7168*20480 = 557.8M; x60 = 33.47B;
# embedding and (untied) lm_head 64000*7168 = 0.459B each. Total 34.39B -> 68.78 GB in bf16.
LAYER_PARAMS = 2 * 7168 * 7168 + 2 * 7168 * 1024 + 3 * 7168 * 20480
VOCAB_PARAMS = 64000 * 7168


# ---------------------------------------------------------------- Yao Fu 2024 reproduction
def test_yao_fu_kv_cache_size():
    a = analyze_model(YI_34B, batch=1, context=50_000, machine=A100)
    assert a.kv_bytes_per_token == 245_760          # 60 layers * 2 (K,V) * 8 * 128 * 2 bytes
    assert a.kv_bytes_per_sequence == pytest.approx(12.3e9, rel=0.01)   # 12.288 GB
    assert a.weight_bytes == 2 * (60 * LAYER_PARAMS + 2 * VOCAB_PARAMS)


def test_yao_fu_decode_39ms_memory_bound():
    # The paper: read ~68 GB of weights + 12.3 GB of KV per step at ~2 TB/s -> ~39 ms. Here:
    # the decoder layers and lm_head (the embedding is only indexed) are 67.86 GB, KV 12.29 GB,
    # activations ~0.01 GB: 80.16 GB / 2.039e12 B/s = 39.3 ms. Every op is memory-bound at
    # batch 1 (intensity ~1 FLOP/byte against a ridge of 153 FLOP/byte).
    a = analyze_model(YI_34B, batch=1, context=50_000, machine=A100)
    assert a.bound == "memory"
    assert all(r["bound"] == "memory" for r in a.layers)
    assert a.bytes == pytest.approx(2 * (60 * LAYER_PARAMS + VOCAB_PARAMS) + 50_000 * 245_760,
                                    rel=1e-3)
    assert a.time_s == pytest.approx(0.039, rel=0.15)
    assert a.time_s == pytest.approx(a.bytes / 2.039e12, rel=1e-9)
    assert a.tokens_per_s == pytest.approx(1 / a.time_s)


def test_yao_fu_prefill_4k_compute_bound():
    # 2 * 33.93e9 params * 4096 tokens = 2.74e14 FLOPs (lm_head on the last token only), plus
    # causal attention 60 * 4 * 56 * 128 * 4096*4097/2 = 1.44e13: 2.89e14 / 312e12 = 0.93 s
    # (the paper's 0.89 s counts the parameters only).
    p = analyze_model(YI_34B, batch=1, context=4096, phase="prefill", machine=A100)
    assert p.bound == "compute"
    assert p.time_s == pytest.approx(0.89, rel=0.20)
    attention = 60 * 4 * 56 * 128 * 4096 * 4097 // 2
    assert p.flops == 2 * 60 * LAYER_PARAMS * 4096 + 2 * VOCAB_PARAMS + attention
    assert p.tokens_per_s == pytest.approx(4096 / p.time_s)


def test_yao_fu_sequences_beside_weights():
    # 80 GiB (85.9e9 bytes) - 68.8 GB of weights = 17.1e9 bytes: one 12.3 GB sequence fits,
    # matching the paper's "concurrency 1" (with a decimal 80e9 it would be 0).
    a = analyze_model(YI_34B, batch=1, context=50_000, machine=A100)
    cap = get_machine(A100).mem_capacity
    assert cap == 80 * 2**30
    assert a.max_sequences == math.floor((cap - a.weight_bytes) / a.kv_bytes_per_sequence) == 1
    assert analyze_model(YI_34B, batch=1, context=10_000).max_sequences == 6
    tiny = MachineProfile("tiny", {"bf16": 1e12}, {"read": 1e11}, mem_capacity=1e9)
    assert analyze_model(YI_34B, batch=1, context=8, machine=tiny).max_sequences == 0
    unknown = MachineProfile("unknown", {"bf16": 1e12}, {"read": 1e11})
    assert analyze_model(YI_34B, batch=1, context=8, machine=unknown).max_sequences is None


# ---------------------------------------------------------------- GQA and KV formats
def test_kv_bytes_scale_with_kv_heads_not_query_heads():
    base = decode_attention_cost(4, 1000, 32, 8, 128)
    more_q = decode_attention_cost(4, 1000, 64, 8, 128)
    more_kv = decode_attention_cost(4, 1000, 32, 16, 128)
    qo = lambda hq: 2 * 4 * hq * 128 * 2  # noqa: E731  (q read + out written)
    assert base.bytes - qo(32) == more_q.bytes - qo(64) == 2 * 8 * 128 * 1000 * 2 * 4
    assert more_kv.bytes - qo(32) == 2 * (base.bytes - qo(32))
    assert more_q.flops == 2 * base.flops == 2 * 4 * 4 * 32 * 128 * 1000

    cfg = YI_34B
    a = analyze_model(cfg, batch=1, context=1000)
    b = analyze_model({**cfg, "num_attention_heads": 112, "head_dim": 128}, batch=1, context=1000)
    c = analyze_model({**cfg, "num_key_value_heads": 4}, batch=1, context=1000)
    assert b.kv_bytes_per_token == a.kv_bytes_per_token
    assert a.kv_bytes_per_token == 2 * c.kv_bytes_per_token      # 8 kv heads vs 4


def test_kv_bytes_per_token_formats():
    # H=8, D=128, g=32. Codes 2*8*128*bits/8; KIVI scale+zero: 2 (K,V) * 8 heads * 4 * 128/32 = 256.
    assert kv_bytes_per_token(8, 128) == 4096
    assert kv_bytes_per_token(8, 128, kv_bits=8) == 2048 + 256 == 2304
    assert kv_bytes_per_token(8, 128, kv_bits=4) == 1024 + 256 == 1280
    assert kv_bytes_per_token(8, 128, kv_bits=2) == 512 + 256 == 768
    # fp8: 2048 codes + an fp32 scale per 32 tokens for K and V of each head: 2*8*4/32 = 2.
    assert kv_bytes_per_token(8, 128, kv_bits="fp8") == 2050
    # residual window: of 1000 tokens, 28 whole groups of 32 are quantized (896), 104 stay bf16
    c = decode_attention_kv_cost(1, 1000, 8, 8, 128, kv_bits=4, residual=128)
    assert c.bytes == 896 * 1280 + 104 * 4096 + 2 * 8 * 128 * 2
    a4 = analyze_model(YI_34B, batch=1, context=50_000, kv_bits=4)
    assert a4.kv_bytes_per_token == 60 * 1280


@pytest.mark.parametrize("scheme", ["affine", "symmetric", "codebook"])
def test_lut_gemv_bytes_match_the_weight_format(scheme):
    import torch

    import pykernels as pk
    from roofline.cost import lut_gemv_cost

    N, K = 64, 256
    for bits in (2, 4):
        qw = pk.quantize_weight(torch.randn(N, K), bits=bits, group_size=128, scheme=scheme)
        c = lut_gemv_cost(N, K, 1, bits, 128, scheme=scheme)
        assert c.bytes == qw.nbytes + K * 2 + N * 2  # weights + x read + y written
        c40 = lut_gemv_cost(N, K, 40, bits, 128, scheme=scheme)  # 3 passes of <= 16 rows
        assert c40.bytes == 3 * qw.nbytes + 40 * (K * 2 + N * 2)
    import pykernels.lut as L
    from roofline.cost import LUT_MAX_M
    assert LUT_MAX_M == L.MAX_M


def test_degenerate_machines_and_timings_are_refused():
    with pytest.raises(ValueError, match="peak_flops\\['bf16'\\]"):
        MachineProfile("z", {"bf16": 0.0}, {"read": 1e10})
    with pytest.raises(ValueError, match="mem_bandwidth\\['read'\\]"):
        MachineProfile("z", {"bf16": 1e12}, {"read": float("nan")})
    with pytest.raises(ValueError, match="seconds"):
        place(decode_attention_cost(1, 1024, 8, 8, 128), 1e-320, "H100-SXM")


def test_analyze_model_reads_the_quantized_caches_window_at_16_bits():
    from roofline.cost import kv_bytes_of_sequence

    cfg = dict(YI_34B, num_hidden_layers=2)
    a = analyze_model(cfg, batch=2, context=1000, kv_bits=4, placement={"kv": "cpu"})  # default window 128
    z = analyze_model(cfg, batch=2, context=1000, kv_bits=4, kv_residual=0, placement={"kv": "cpu"})
    att = lambda r: next(x for x in r.layers if x["op"] == "attention")  # noqa: E731
    per_seq = kv_bytes_of_sequence(1000, 8, 128, kv_bits=4, residual=128)
    assert per_seq == 896 * 1280 + 104 * 4096
    assert att(a)["link_bytes"]["h2d_pinned"] == 2 * per_seq
    assert att(z)["link_bytes"]["h2d_pinned"] == 2 * (992 * 1280 + 8 * 4096)  # whole groups only
    assert a.kv_bytes_per_token == z.kv_bytes_per_token == 2 * 1280  # the per-token figure stays quantized
    with pytest.raises(ValueError, match="kv_residual"):
        analyze_model(cfg, batch=1, context=10, kv_bits=4, kv_residual=-1)


def test_kv_bytes_match_what_the_quantized_cache_stores():
    """Value scales per ceil(D / g) channel groups, and the full-precision window as
    pk.QuantizedKVCache keeps it: whole groups are quantized once it would exceed ``residual``."""
    from pykernels import kv_format

    for D, g in ((128, 32), (80, 32), (64, 128), (96, 64)):
        for bits in (8, 4, 2, "fp8"):
            assert kv_bytes_per_token(8, D, kv_bits=bits, group_size=g) == pytest.approx(
                kv_format.bytes_per_token(bits, g, 8, D)), (D, g, bits)
    f, q = kv_bytes_per_token(8, 128), kv_bytes_per_token(8, 128, kv_bits=4)
    for L, n_res in ((100, 100), (128, 128), (129, 97), (160, 128), (161, 97)):
        c = decode_attention_kv_cost(1, L, 8, 8, 128, kv_bits=4, residual=128, group_size=32)
        assert c.bytes == (L - n_res) * q + n_res * f + 2 * 8 * 128 * 2, L


def test_paged_and_split_bytes():
    dense = decode_attention_cost(2, [100, 33], 8, 2, 64)
    paged = decode_attention_cost(2, [100, 33], 8, 2, 64, paged=True, block_size=16)
    assert paged.bytes - dense.bytes == (7 + 3) * 4          # ceil(100/16) + ceil(33/16) entries
    split = decode_attention_cost(2, [100, 33], 8, 2, 64, method="split", num_splits=4)
    assert split.bytes - dense.bytes == 2 * (2 * 8 * 4) * (64 + 2) * 4
    lean = decode_attention_cost(2, [100, 33], 8, 2, 64, method="lean", num_splits=5)
    assert lean.bytes - dense.bytes == 2 * (2 * 4 * 4) * (64 + 2) * 4  # 2 partials per cut


# ---------------------------------------------------------------- weight quantization
def test_gemm_and_lut_gemv_bytes():
    g = gemm_cost(1, 4096, 4096)
    assert (g.flops, g.bytes, g.dtype) == (2 * 4096**2, 2 * 4096**2 + 2 * 4096 * 2, "bf16")
    q = lut_gemv_cost(4096, 4096, M=8, bits=4, group_size=128)
    assert q.flops == 2 * 8 * 4096**2
    assert q.bytes == 4096**2 / 2 + 4096 * 32 * 4 + (8 * 4096 + 8 * 4096) * 2
    assert q.dtype == "bf16"


def test_int4_weights_quarter_bytes_and_keep_bf16_roof():
    a16 = analyze_model(YI_34B, batch=1, context=50_000)
    a4 = analyze_model(YI_34B, batch=1, context=50_000, w_bits=4, group_size=128)
    # decoder matrices: 4 bits + 2 fp16 per 128 weights = 0.53125 bytes/weight; embedding and
    # lm_head stay bf16.
    assert a4.weight_bytes == 60 * LAYER_PARAMS * (0.5 + 4 / 128) + 2 * VOCAB_PARAMS * 2
    q16 = next(r for r in a16.layers if r["op"] == "q_proj")["weight_bytes"]
    q4 = next(r for r in a4.layers if r["op"] == "q_proj")["weight_bytes"]
    assert q4 / q16 == pytest.approx(0.25 * (1 + 1 / 16))
    assert 0.25 < a4.weight_bytes / a16.weight_bytes < 0.3
    assert a4.bound == "memory" and a4.time_s < 0.5 * a16.time_s
    p16 = analyze_model(YI_34B, batch=1, context=4096, phase="prefill")
    p4 = analyze_model(YI_34B, batch=1, context=4096, phase="prefill", w_bits=4)
    assert p4.bound == "compute" and p4.flops == p16.flops
    assert all(r["dtype"] == "bf16" for r in p4.layers)
    assert p4.time_s == pytest.approx(p16.time_s, rel=1e-3)   # same roof, same FLOPs


# ---------------------------------------------------------------- tiers and tensor parallelism
def test_placement_links_bound_time():
    a = analyze_model(YI_34B, batch=1, context=50_000, placement={"weights": "cpu"})
    assert a.bound == "link:h2d_pinned"
    streamed = a.weight_bytes - VOCAB_PARAMS * 2                  # the embedding is not streamed
    assert a.link_bytes["h2d_pinned"] == pytest.approx(streamed)
    link = get_machine(A100).links["h2d_pinned"]
    assert a.time_s == pytest.approx(streamed / link, rel=0.05)  # + attention's 6 ms
    assert a.max_sequences == math.floor(80 * 2**30 / a.kv_bytes_per_sequence)
    half = analyze_model(YI_34B, batch=1, context=50_000,
                         placement={"kv": {"gpu": 0.5, "cpu": 0.5}})
    assert half.link_bytes["h2d_pinned"] == pytest.approx(0.5 * 50_000 * 245_760)
    disk = MachineProfile.from_dict({**get_machine(A100).to_dict(), "name": "with-disk"})
    disk.links["disk_read"] = 5e9
    d = analyze_model(YI_34B, batch=1, context=1000, placement={"weights": "disk"}, machine=disk)
    assert d.bound == "link:disk_read"


def test_tensor_parallel_comm():
    a1 = analyze_model(YI_34B, batch=8, context=4096)
    a4 = analyze_model(YI_34B, batch=8, context=4096, tp=4)
    ar = next(r for r in a4.layers if r["op"] == "allreduce")
    assert ar["count"] == 120
    assert ar["link_bytes"] == {"nvlink": 2 * 3 / 4 * 8 * 7168 * 2}   # ring: 2(tp-1)/tp * bytes
    assert a4.weight_bytes == pytest.approx(a1.weight_bytes / 4)
    assert a1.time_s / 4 < a4.time_s < a1.time_s / 3
    with pytest.raises(ValueError, match="tp"):
        analyze_model(YI_34B, batch=1, context=10, tp=2, machine="RTX-4090")
    # kv heads: split evenly or replicated; other combinations are refused, naming tp
    odd = dict(YI_34B, num_attention_heads=40, num_key_value_heads=8, intermediate_size=20480)
    with pytest.raises(ValueError, match="tp: num_key_value_heads=8 and tp=5"):
        analyze_model(odd, batch=1, context=10, tp=5)
    rep = analyze_model(dict(odd, num_key_value_heads=2), batch=1, context=4096, tp=4)
    one = analyze_model(dict(odd, num_key_value_heads=1), batch=1, context=4096, tp=4)
    assert rep.kv_bytes_per_token == one.kv_bytes_per_token  # one replicated kv head per device
    with pytest.raises(ValueError, match="num_key_value_heads"):  # 0 is an error, not MHA
        analyze_model(dict(YI_34B, num_key_value_heads=0), batch=1, context=10)


# ---------------------------------------------------------------- place()
def test_place_roof_and_ridge():
    m = get_machine(A100)
    ridge = m.peak("bf16") / m.mem_bandwidth["read"]              # ~153 FLOP/byte
    mem = Cost(flops=0.5 * ridge * 1e9, bytes=1e9)
    p = place(mem, 1e9 / m.mem_bandwidth["read"], m)
    assert p.bound == "memory" and p.efficiency == pytest.approx(1.0)
    assert p.attainable_flops == pytest.approx(p.intensity * m.mem_bandwidth["read"])
    comp = Cost(flops=2 * ridge * 1e9, bytes=1e9)
    p = place(comp, 2 * comp.flops / m.peak("bf16"), m)
    assert p.bound == "compute" and p.efficiency == pytest.approx(0.5)
    assert p.attainable_flops == m.peak("bf16")
    assert p.achieved_flops == pytest.approx(0.5 * m.peak("bf16"))
    t = place(transfer_cost(1e9, "h2d_pinned"), 1.0, m)
    assert t.bound == "link:h2d_pinned" and t.to_dict()["intensity"] is None
    json.dumps(t.to_dict())
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="seconds"):
            place(mem, bad, m)
    with pytest.raises(ValueError, match="nvlink"):
        place(transfer_cost(1, "nvlink"), 1.0, "L4")


# ---------------------------------------------------------------- serialisation and errors
def test_json_round_trips():
    assert set(HARDWARE) == {"A100-40GB-SXM", "A100-80GB-SXM", "H100-SXM", "H100-PCIe",
                             "H200-SXM", "L4", "L40S", "RTX-4090", "MI300X"}
    for prof in HARDWARE.values():
        assert all(v > 0 and math.isfinite(v) for v in prof.peak_flops.values())
        assert MachineProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof
    a = analyze_model(YI_34B, batch=2, context=1000, tp=2, placement={"kv": "cpu"})
    d = json.loads(json.dumps(a.to_dict()))
    assert d["time_s"] == a.time_s and len(d["layers"]) == len(a.layers) == 10
    assert (Cost(1, 2, name="a") + transfer_cost(3, "x")).to_dict() == {
        "name": "a + transfer[x]", "flops": 1, "bytes": 2, "dtype": "bf16", "link_bytes": {"x": 3}}


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="machine.*A100-80GB-SXM"):
        get_machine("A100")
    with pytest.raises(ValueError, match="dtype"):
        get_machine(A100).peak("fp8")
    with pytest.raises(ValueError, match="batch"):
        analyze_model(YI_34B, batch=-1, context=10)
    with pytest.raises(ValueError, match="intermediate_size"):
        analyze_model({k: v for k, v in YI_34B.items() if k != "intermediate_size"},
                      batch=1, context=10)
    with pytest.raises(ValueError, match=r"placement\['weights'\].*'ssd'"):
        analyze_model(YI_34B, batch=1, context=10, placement={"weights": "ssd"})
    with pytest.raises(ValueError, match="disk_read"):
        analyze_model(YI_34B, batch=1, context=10, placement={"kv": "disk"})
    with pytest.raises(ValueError, match="kv_bits"):
        kv_bytes_per_token(8, 128, kv_bits=3)
    with pytest.raises(ValueError, match="num_q_heads"):
        decode_attention_cost(1, 10, 12, 8, 128)
    with pytest.raises(ValueError, match="seqlens_or_context"):
        decode_attention_cost(2, [10], 8, 8, 128)


def test_config_json_path(tmp_path):
    path = tmp_path / "config.json"
    cfg = {k: v for k, v in YI_34B.items() if k != "head_dim"}       # head_dim = 7168 / 56
    path.write_text(json.dumps({**cfg, "model_type": "llama", "tie_word_embeddings": True}))
    a = analyze_model(path, batch=1, context=50_000)
    b = analyze_model(str(path), batch=1, context=50_000)
    assert a.kv_bytes_per_token == b.kv_bytes_per_token == 245_760
    assert a.weight_bytes == 2 * (60 * LAYER_PARAMS + VOCAB_PARAMS)  # tied: counted once


@pytest.mark.parametrize("module", ["hardware", "cost", "place", "model"])
def test_docstring_examples(module):
    mod = importlib.import_module(f"roofline.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
