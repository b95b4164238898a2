"""offload.load_model / OffloadedModel end to end: parity with HF transformers for in-memory and
disk-streamed placements, the streaming executor's ordering and error paths, the budget (peak
RSS measured in a subprocess), and the placement planner.

Reference: HF ``LlamaForCausalLM`` on the same demo checkpoint, run in float32 (and bf16 for
the bf16 tolerance).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

import offload  # noqa: E402
from offload import llama  # noqa: E402
from offload.checkpoint import demo_checkpoint  # noqa: E402
from offload.placement import estimate_unit_bytes, parse_bytes, plan_placement  # noqa: E402

_MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return demo_checkpoint(str(root / "tiny32"), preset="tiny", dtype=torch.float32,
                           config_overrides={"num_hidden_layers": 3})


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt16")
    return demo_checkpoint(str(root / "tiny16"), preset="tiny", dtype=torch.bfloat16,
                           config_overrides={"num_hidden_layers": 3})


def _hf(path, dtype):
    m = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    return m.eval()


def _ids(B, T, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


def _load(path, tmp_path, **kw):
    return offload.load_model(path, store_dir=str(tmp_path / "store"), **kw)


@pytest.mark.parametrize("placement", ["memory", "disk", "auto"])
def test_fp32_logits_match_hf(tiny32, tmp_path, placement):
    budgets = None
    if placement == "auto":  # room for the slots and the head: the layers must stream
        with offload.convert(tiny32, str(tmp_path / "store")) as st:
            ub = {u: st.unit_nbytes(u) for u in st.unit_names()}
            least = plan_placement(st.config, unit_bytes=ub, batch=2, context=64, dtype_bytes=4, mode="disk")
        budgets = {"cpu": least.used["cpu"] + ub["head"]}
    with _load(tiny32, tmp_path, placement=placement, budgets=budgets, max_context=64, max_batch=2) as m:
        if placement == "disk":
            assert len(m.placement.streamed()) == m.config.num_layers + 1
        if placement == "auto":  # the budget forces part of the model onto disk
            assert m.placement.tiers["head"] == "cpu" and len(m.placement.streamed()) == m.config.num_layers
        hf = _hf(tiny32, torch.float32)
        ids = _ids(2, 9, m.config.vocab_size)
        with torch.no_grad():
            ref = hf(ids).logits
        got = m.forward(ids)
        # fp32 end to end; differences are summation order only (F.linear vs HF, SDPA vs ours)
        torch.testing.assert_close(got, ref, atol=2e-5 * ref.abs().max().item(), rtol=1e-4)
        # prefill + decode steps through the cache equal the full-sequence logits
        cache = m.new_cache(2, 12)
        parts = [m.forward(ids[:, :5], cache)]
        for t in range(5, 9):
            parts.append(m.forward(ids[:, t:t + 1], cache))
        torch.testing.assert_close(torch.cat(parts, 1), ref, atol=2e-5 * ref.abs().max().item(), rtol=1e-4)


def test_fp32_greedy_matches_hf_generate(tiny32, tmp_path):
    with _load(tiny32, tmp_path, placement="disk", max_context=64) as m:
        hf = _hf(tiny32, torch.float32)
        ids = _ids(1, 6, m.config.vocab_size, seed=3)
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10, pad_token_id=0)
        seen = []
        got = m.generate(ids, 10, streamer=lambda t: seen.append(int(t[0])))
        assert got.tolist() == ref.tolist()
        assert seen == got[0, 6:].tolist()


def test_bf16_streamed_equals_in_memory_and_is_close_to_hf(tiny16, tmp_path):
    ids = _ids(1, 8, 256, seed=5)
    with _load(tiny16, tmp_path, placement="memory", max_context=32) as a:
        la = a.forward(ids)
        ga = a.generate(ids, 6)
    with _load(tiny16, tmp_path, placement="disk", max_context=32) as b:
        lb = b.forward(ids)
        gb = b.generate(ids, 6)
    # the same kernels on the same bytes: streaming must not change a single bit
    assert torch.equal(la, lb) and torch.equal(ga, gb)
    hf32 = _hf(tiny16, torch.float32)
    hf16 = _hf(tiny16, torch.bfloat16)
    with torch.no_grad():
        r32 = hf32(ids).logits
        r16 = hf16(ids).logits.float()
    # bf16 (8 mantissa bits): our error vs the fp32 model is of the order of HF's own bf16 error
    ours, theirs = (lb - r32).abs().max().item(), (r16 - r32).abs().max().item()
    assert ours <= 3 * theirs + 1e-3, (ours, theirs)


def test_weight_bits_4_streams_lut_weights(tiny32, tmp_path):
    with _load(tiny32, tmp_path, placement="disk", weight_bits=4, group_size=16, max_context=32) as m:
        import pykernels as pk
        with m._unit("layer.0", {"disk": 0, "cpu": 0}) as (w, fused):
            assert isinstance(w["self_attn.q_proj.weight"], pk.LUTWeight)
            assert fused == {}  # LUT weights run one projection each
        m._streamer.skip_to_start()
        ids = _ids(1, 5, 256)
        logits = m.forward(ids)
        assert torch.isfinite(logits).all()
        # the same model with the dequantized weights resident computes the same logits (up to
        # lut_gemv's int8 tables: see pykernels.lut_gemv)
        sd = {}
        for u in m.store.unit_names():
            buf = m.store.read_unit(u)
            for k, v in m.store.tensors(u, buf).items():
                v = v.dequantize() if isinstance(v, pk.LUTWeight) else v.clone()
                if u.startswith("layer."):
                    k = f"model.layers.{u[6:]}.{k}"
                sd[{"norm.weight": "model.norm.weight"}.get(k, k)] = v
        ref = llama.InMemoryLlama(m.config, sd, dtype=torch.float32)
        want = ref.forward(ids, ref.new_cache(1, 8))
        err = (logits - want).abs().max().item()
        assert err <= 0.05 * want.abs().max().item(), err


def test_streamed_bytes_and_stats(tiny32, tmp_path):
    with _load(tiny32, tmp_path, placement="disk", max_context=32) as m:
        m.generate(_ids(1, 4, 256), 3)
        s = m.stats.summary()
        per_step = sum(m.store.unit_nbytes(u) for u in m.placement.streamed())
        assert s["decode_steps"] == 2 and s["forwards"] == 3
        # a decode step reads every streamed unit once, plus the embedding page(s) of its token
        assert per_step <= s["bytes_per_step"]["disk"] <= per_step + 2 * m.store.manifest["page_bytes"]
        assert s["tokens_per_s"] > 0 and 0 <= s["stall_fraction"] <= 1


def _interrupted_at_layer_1(fn):
    """Run ``fn`` with a KeyboardInterrupt raised as the second decoder layer starts."""
    real = llama.layer_forward
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    llama.layer_forward = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            fn()
    finally:
        llama.layer_forward = real


def test_interrupted_forward_realigns_the_stream(tiny32, tmp_path):
    with _load(tiny32, tmp_path, placement="disk", max_context=32) as m:
        ids = _ids(1, 4, 256)
        want = m.forward(ids)
        c0 = m.new_cache(1, 8)
        m.forward(ids[:, :3], c0)
        want_step = m.forward(ids[:, 3:], c0)
        _interrupted_at_layer_1(lambda: m.forward(ids))
        assert torch.equal(m.forward(ids), want)
        # the same through a cache: the failed step appended to one layer only, and is discarded
        c1 = m.new_cache(1, 8)
        m.forward(ids[:, :3], c1)
        _interrupted_at_layer_1(lambda: m.forward(ids[:, 3:], c1))
        assert c1.length == 3
        assert torch.equal(m.forward(ids[:, 3:], c1), want_step)


def test_corrupt_page_is_an_error_not_wrong_logits(tiny32, tmp_path):
    with _load(tiny32, tmp_path, placement="disk", max_context=32) as m:
        info = m.store.units["layer.1"]
        path = os.path.join(m.store.store_dir, info["file"])
        off = info["pages"][0][0] + 100
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    with _load(tiny32, tmp_path, placement="disk", max_context=32) as m:
        with pytest.raises(offload.CorruptPageError) as e:
            m.forward(_ids(1, 3, 256))
        assert "layer.1" in str(e.value)
        with pytest.raises(offload.CorruptPageError):  # the model stays failed, never half-read
            m.forward(_ids(1, 3, 256))


def test_bad_arguments(tiny32, tmp_path):
    with pytest.raises(ValueError, match="budgets"):
        _load(tiny32, tmp_path, budgets={"ram": "1GiB"})
    with pytest.raises(ValueError, match="budgets"):
        _load(tiny32, tmp_path, budgets={"cpu": "lots"})
    with pytest.raises(ValueError, match="budgets\\['cpu'\\]"):
        _load(tiny32, tmp_path, budgets={"cpu": "1KiB"}, max_context=16)
    with pytest.raises(NotImplementedError, match="cuda"):
        _load(tiny32, tmp_path, device="cuda")
    with pytest.raises(ValueError, match="weight_bits"):  # checked before a store directory is named
        _load(tiny32, tmp_path, weight_bits=4.0)
    for bad in (-1, float("nan"), 0):
        with pytest.raises(ValueError, match="disk_bandwidth"):
            _load(tiny32, tmp_path, disk_bandwidth=bad)
    with pytest.raises(ValueError, match="placement"):
        _load(tiny32, tmp_path, placement="gpu")
    with pytest.raises(FileNotFoundError, match="path"):
        offload.load_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="dtype"):
        _load(tiny32, tmp_path, dtype=torch.bfloat16)
    with _load(tiny32, tmp_path, max_context=16) as m:
        with pytest.raises(ValueError, match="input_ids"):
            m.forward(torch.tensor([[1, 256]]))
        with pytest.raises(ValueError, match="input_ids"):
            m.forward(torch.zeros(1, 0, dtype=torch.long))
        with pytest.raises(TypeError, match="input_ids"):
            m.forward(torch.zeros(1, 3))
        with pytest.raises(ValueError, match="max_new_tokens: .*max_context"):
            m.generate(_ids(1, 10, 256), 10)
        with pytest.raises(ValueError, match="max_new_tokens"):
            m.generate(_ids(1, 3, 256), -1)
        with pytest.raises(ValueError, match="temperature"):
            m.generate(_ids(1, 3, 256), 2, do_sample=True, temperature=0)
        with pytest.raises(ValueError, match="temperature"):
            m.generate(_ids(1, 3, 256), 2, do_sample=True, temperature=True)
        with pytest.raises(TypeError, match="do_sample"):
            m.generate(_ids(1, 3, 256), 2, do_sample="no")
        with pytest.raises(ValueError, match="eos_token_id"):
            m.generate(_ids(1, 3, 256), 2, eos_token_id="x")
        with pytest.raises(ValueError, match="seed"):
            m.generate(_ids(1, 3, 256), 2, do_sample=True, seed=1.5)
        with pytest.raises(TypeError, match="streamer"):
            m.generate(_ids(1, 3, 256), 2, streamer=5)
        with pytest.raises(ValueError, match="top_p"):
            m.iter_generate(_ids(1, 3, 256), 2, do_sample=True, top_p=1.5)  # checked before the first step
        # token ids are integers: floats and bools are refused, never truncated
        with pytest.raises(TypeError, match="input_ids"):
            m.generate([[1.7, 2.9, 3.99]], 2)
        with pytest.raises(TypeError, match="input_ids"):
            m.forward(torch.tensor([[True, False]]))
        # the budget was planned for max_batch=1 and max_context=16
        with pytest.raises(ValueError, match="batch"):
            m.forward(_ids(2, 3, 256))
        with pytest.raises(ValueError, match="capacity"):
            m.new_cache(1, 17)
    # greedy decoding leaves torch's global RNG alone
    torch.manual_seed(0)
    a = torch.randn(3)
    torch.manual_seed(0)
    with _load(tiny32, tmp_path, max_context=16) as m:
        m.generate(_ids(1, 3, 256), 2)
        m.generate(_ids(1, 3, 256), 2, do_sample=True)
    assert torch.equal(torch.randn(3), a)


def test_top_p_keeps_the_smallest_prefix_reaching_it():
    """As transformers' TopPLogitsWarper: a prefix whose mass equals top_p is enough."""
    from offload.model import OffloadedModel

    gen = torch.Generator().manual_seed(0)
    for p, top_p, keep in (([0.5, 0.25, 0.25], 0.5, {0}), ([0.25] * 4, 0.5, {0, 1}), ([0.5, 0.3, 0.2], 0.6, {0, 1})):
        logits = torch.tensor([p]).log()
        seen = {int(OffloadedModel._pick(logits, True, 1.0, None, top_p, gen)) for _ in range(200)}
        assert seen == keep, (p, top_p, seen)


def test_generation_arguments_checked_before_the_first_token(tiny32, tmp_path):
    with _load(tiny32, tmp_path, max_context=16) as m:
        ids = _ids(1, 5, 256)
        for bad, match in ((dict(max_new_tokens=12), "max_new_tokens: .*max_context=16"),
                           (dict(max_new_tokens=3, do_sample=True, seed=2 ** 64), "seed")):
            got = []
            with pytest.raises(ValueError, match=match):
                m.generate(ids, streamer=got.append, **bad)
            assert got == []
        small = ids % 100
        out = m.generate(small.to(torch.int8), 3)  # any integer dtype of ids
        assert torch.equal(out, m.generate(small, 3))
        with pytest.raises(TypeError, match="cache: expected a cache from new_cache"):
            m.forward(ids, cache="x")
        s = m.stats
        s.reset()
        m.generate(ids[:, :1], 3)  # a one-token prompt is still the prefill
        assert [x["phase"] for x in s.steps] == ["prefill", "decode", "decode"]
        assert s.summary()["decode_steps"] == 2 and s.summary()["prefill_passes"] == 1
    with pytest.raises(TypeError, match="dtype"):
        _load(tiny32, tmp_path, dtype="float32")
    with pytest.raises(ValueError, match="kv_group_size"):
        _load(tiny32, tmp_path, kv_bits=4, kv_group_size=7)
    with pytest.raises(ValueError, match="kv_residual"):
        _load(tiny32, tmp_path, kv_bits=4, kv_residual=5)


def test_close_drops_the_streaming_slots(tiny32, tmp_path):
    m = _load(tiny32, tmp_path, placement="disk", max_context=16)
    assert m._streamer is not None
    m.close()
    assert m._streamer is None
    with pytest.raises(RuntimeError, match="closed"):
        m.forward(_ids(1, 3, 256))


def test_lut_weights_keep_the_projection_biases(tmp_path):
    """A quantized store of a model with biases (Qwen2, Llama attention_bias) keeps them beside
    the LUT planes: the logits stay close to the unquantized model's."""
    ck = demo_checkpoint(str(tmp_path / "ck"), preset="tiny", dtype=torch.float32,
                         config_overrides={"attention_bias": True, "mlp_bias": True})
    ids = _ids(1, 6, 256)
    with offload.load_model(ck, store_dir=str(tmp_path / "s16"), max_context=16) as m:
        ref = m.forward(ids)
    with offload.load_model(ck, store_dir=str(tmp_path / "s4"), weight_bits=4, group_size=16, max_context=16) as m:
        got = m.forward(ids)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert float(cos) > 0.95


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny32, tmp_path):
    with _load(tiny32, tmp_path, max_context=32, max_batch=2) as m:
        ids = _ids(2, 4, 256)
        a = m.generate(ids, 5, do_sample=True, seed=7, top_p=0.9)
        b = m.generate(ids, 5, do_sample=True, seed=7, top_p=0.9)
        assert torch.equal(a, b)
        assert torch.equal(m.generate(ids, 5, do_sample=True, top_k=1, seed=1), m.generate(ids, 5))


def test_store_dir_default_is_outside_the_checkpoint(tiny32, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    before = sorted(os.listdir(tiny32))
    with offload.load_model(tiny32, max_context=16) as m:
        assert m.store.store_dir.startswith(str(tmp_path / "cache"))
    assert sorted(os.listdir(tiny32)) == before
    # a store directory can be opened directly
    with offload.load_model(m.store.store_dir, max_context=16) as m2:
        assert m2.config.num_layers == 3


def test_parse_bytes():
    assert parse_bytes("512MiB") == 512 * _MiB
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes(1024) == 1024
    for bad in ("-1GiB", "12 parsecs", -5, float("nan")):
        with pytest.raises(ValueError):
            parse_bytes(bad, "budgets['cpu']")
    with pytest.raises(TypeError):
        parse_bytes(True)


def test_plan_placement_keeps_head_then_layers_and_honours_budget():
    cfg = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=32000, model_type="llama")
    ub = estimate_unit_bytes(cfg)
    p = plan_placement(cfg, budgets={"cpu": "512MiB"}, context=256)
    assert p.tiers["head"] == "cpu" and p.tiers["embed"] == "disk"
    assert p.used["cpu"] <= 512 * _MiB
    assert p.disk_bytes_per_token >= sum(ub[u] for u in p.streamed())
    assert "streams" in p.explain()
    p4 = plan_placement(cfg, budgets={"cpu": "512MiB"}, context=256, weight_bits=4)
    assert len(p4.streamed()) < len(p.streamed())
    big = plan_placement(cfg, budgets={"cpu": "8GiB"}, context=256)
    assert big.streamed() == [] and big.slots == 0
    with pytest.raises(ValueError, match="budgets\\['cpu'\\]"):
        plan_placement(cfg, budgets={"cpu": "100MiB"}, context=256)
    with pytest.raises(ValueError, match="memory"):
        plan_placement(cfg, budgets={"cpu": "1GiB"}, context=256, mode="memory")
    # layers + head resident with no slots beats streaming when it fits (embedding rows on disk)
    fixed = p.kv_bytes + p.workspace_bytes
    fit = fixed + sum(ub[u] for u in ub if u != "embed")
    q = plan_placement(cfg, budgets={"cpu": fit}, context=256)
    assert q.streamed() == [] and q.tiers["embed"] == "disk" and q.used["cpu"] <= fit
    # placement="disk" streams the embedding too: the least memory
    d = plan_placement(cfg, budgets={"cpu": "1GiB"}, context=256, mode="disk")
    assert d.tiers["embed"] == "disk" and len(d.streamed()) == 23
    assert d.used["cpu"] == fixed + 2 * max(ub["layer.0"], ub["head"])


def test_plan_placement_head_larger_than_a_layer():
    # a big vocabulary: the head (150 MiB) is larger than a layer (17 MiB)
    cfg = dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
               intermediate_size=2048, vocab_size=76800, model_type="llama")
    ub = estimate_unit_bytes(cfg)
    d = plan_placement(cfg, context=64, mode="disk")
    fixed = d.kv_bytes + d.workspace_bytes
    assert d.used["cpu"] == fixed + 2 * ub["head"]  # head-sized slots when the head streams
    # the least is the head resident beside layer-sized slots, and the planner finds it
    least = fixed + 2 * ub["layer.0"] + ub["head"]
    p = plan_placement(cfg, budgets={"cpu": least}, context=64)
    assert p.used["cpu"] <= least and p.tiers["head"] == "cpu" and len(p.streamed()) == 4
    with pytest.raises(ValueError, match="too small"):
        plan_placement(cfg, budgets={"cpu": least - 1}, context=64)


@pytest.mark.parametrize("kv_bits", [None, 8, 4, 2, "fp8"])
def test_plan_reserves_exactly_what_the_kv_cache_allocates(kv_bits):
    from offload.checkpoint import PRESETS
    cfg = PRESETS["tiny"]
    lc = llama.LlamaConfig.from_hf(cfg)
    for batch, ctx in ((1, 64), (3, 300)):
        p = plan_placement(cfg, batch=batch, context=ctx, kv_bits=kv_bits, dtype_bytes=2)
        cache = llama.KVCache(lc, batch, ctx, dtype=torch.bfloat16, kv_bits=kv_bits, group_size=32, residual=128)
        assert p.kv_bytes == cache.nbytes, (batch, ctx)
    if kv_bits is not None:  # the formula agrees with the allocation across shapes
        import pykernels as pk
        for batch, cap, h, d, gs, res in ((1, 1, 1, 64, 32, 32), (3, 1000, 2, 80, 32, 128), (2, 4097, 4, 128, 64, 64),
                                          (1, 200, 8, 256, 128, 128)):
            c = pk.QuantizedKVCache(batch, cap, h, d, bits=kv_bits, group_size=gs, residual=res)
            assert pk.QuantizedKVCache.allocation_bytes(batch, cap, h, d, bits=kv_bits, group_size=gs,
                                                        residual=res) == c.nbytes


from rss_helpers import RSS_PRELUDE  # noqa: E402

_RSS_SCRIPT = RSS_PRELUDE + textwrap.dedent(r"""
    ckpt, store, budget, batch, ctx = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    kv_bits = None if sys.argv[6] == "none" else int(sys.argv[6])
    m = offload.load_model(ckpt, store_dir=store, budgets={"cpu": budget}, max_context=ctx, max_batch=batch,
                           kv_bits=kv_bits, kv_residual=32)
    m.generate(torch.arange(1, 1 + batch * (ctx - 16)).view(batch, -1) % 8192, 16)
    peak = proc_kib_field("/proc/self/status", "VmHWM")
    print(json.dumps({"base": base, "peak": peak, "planned": m.placement.used["cpu"],
                      "streamed": len(m.placement.streamed()), "weights": sum(m.placement.unit_bytes.values()),
                      "chunk": m.placement.prefill_chunk}))
""")


# (1, 600): a 584-token prompt in passes of the planner's longer prefill chunk
@pytest.mark.parametrize("batch,ctx,kv_bits", [(1, 48, "none"), (2, 300, "4"), (1, 600, "none")])
def test_budget_honoured_peak_rss_in_subprocess(tmp_path, batch, ctx, kv_bits):
    # ~107 MiB of bf16 weights under a 40 MiB budget: most layers stream
    ck = demo_checkpoint(str(tmp_path / "medium"), preset="small", dtype=torch.bfloat16,
                         config_overrides={"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                                           "vocab_size": 8192, "num_attention_heads": 8, "num_key_value_heads": 2})
    offload.convert(ck, str(tmp_path / "store")).close()  # conversion outside the measured process
    budget = 40 * _MiB
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, ck, str(tmp_path / "store"), str(budget), str(batch),
                        str(ctx), kv_bits],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["weights"] > 2 * budget and res["streamed"] > 0
    assert res["planned"] <= budget
    assert res["chunk"] > 64 or ctx < 600
    # the stated overhead: the process's own base RSS plus 32 MiB of allocator and code slack
    assert res["peak"] - res["base"] <= budget + 32 * _MiB, res


def test_interrupted_forward_makes_a_quantized_cache_unusable(tiny32, tmp_path):
    with _load(tiny32, tmp_path, placement="disk", kv_bits=8, kv_residual=32, max_context=64) as m:
        ids = _ids(1, 4, 256)
        c = m.new_cache(1, 8)
        m.forward(ids[:, :3], c)
        _interrupted_at_layer_1(lambda: m.forward(ids[:, 3:], c))
        # a quantized cache cannot un-append: it refuses further use instead of misaligning layers
        with pytest.raises(RuntimeError, match="unusable"):
            m.forward(ids[:, 3:], c)
        fresh = m.new_cache(1, 8)
        assert torch.isfinite(m.forward(ids, fresh)).all()


def test_stream_pass_reads_the_streamed_units_and_keeps_the_order(tiny32, tmp_path):
    with _load(tiny32, tmp_path, placement="disk", max_context=32) as m:
        ids = _ids(1, 4, 256)
        want = m.forward(ids)
        r0 = m._streamer.bytes_read
        assert m.stream_pass() > 0
        # one pass reads each streamed unit once, give or take the slots' read-ahead
        per_pass = sum(m.store.unit_nbytes(u) for u in m.placement.streamed())
        ahead = m.placement.slots * m.placement.slot_bytes
        assert per_pass - ahead <= m._streamer.bytes_read - r0 <= per_pass + ahead
        assert torch.equal(m.forward(ids), want)
    with _load(tiny32, tmp_path, placement="memory", max_context=32) as m:
        assert m.stream_pass() == 0.0


def test_dropped_model_stops_its_threads_and_close_from_another_thread(tiny32, tmp_path):
    import gc
    import threading

    def readers():
        return [t for t in threading.enumerate() if t.name == "offload-prefetch" and t.is_alive()]

    before = len(readers())
    m = _load(tiny32, tmp_path, placement="disk", max_context=64)
    m.generate(_ids(1, 3, 256), 2)
    assert len(readers()) == before + 1
    del m
    gc.collect()
    assert len(readers()) == before
    # close() while another thread generates: that thread gets a clear "closed" error
    m = _load(tiny32, tmp_path, placement="disk", max_context=64)
    errs = []

    def run():
        try:
            for _ in range(200):
                m.generate(_ids(1, 3, 256), 4)
        except RuntimeError as e:
            errs.append(str(e))

    t = threading.Thread(target=run)
    t.start()
    m.close()
    t.join(30)
    assert not t.is_alive()
    assert errs and "closed" in errs[0]


def test_given_placement_must_match_the_store(tiny32, tmp_path):
    with offload.convert(tiny32, str(tmp_path / "store")) as st:
        cfg = st.config
        ub = {u: st.unit_nbytes(u) for u in st.unit_names()}
    est = plan_placement(cfg, context=16, mode="disk", dtype_bytes=4)  # estimated sizes, not the store's
    with pytest.raises(ValueError, match="placement"):
        _load(tiny32, tmp_path, placement=est, max_context=16)
    ok = plan_placement(cfg, context=16, mode="disk", dtype_bytes=4, unit_bytes=ub)
    with _load(tiny32, tmp_path, placement=ok, max_context=16) as m:
        assert len(m.placement.streamed()) == 4
    with _load(tiny32, tmp_path, placement=ok, max_context=16, prefill_chunk=ok.prefill_chunk) as m:
        assert m.placement.prefill_chunk == ok.prefill_chunk
    with pytest.raises(ValueError, match="prefill_chunk"):  # the plan's chunk is what its budget reserved
        _load(tiny32, tmp_path, placement=ok, max_context=16, prefill_chunk=ok.prefill_chunk + 64)


@pytest.mark.parametrize("chunk", [64, 128, None])
def test_long_prompt_is_prefill_in_chunks(tiny32, tmp_path, chunk):
    """A prompt is one pass over the layers per chunk of ``placement.prefill_chunk`` tokens (each
    pass reads every streamed layer once); inside a pass, attention takes 64 queries at a time.
    Whatever the chunk, the logits are HF's."""
    from offload.placement import PREFILL_CHUNK
    T = 2 * PREFILL_CHUNK + 9
    with _load(tiny32, tmp_path, placement="disk", max_context=3 * PREFILL_CHUNK, prefill_chunk=chunk) as m:
        pc = m.placement.prefill_chunk
        assert pc == (chunk or 3 * PREFILL_CHUNK)  # no budget: the whole context in one pass
        ids = _ids(1, T, 256)
        full = m.forward(ids)
        passes = -(-T // pc)
        assert [s["phase"] for s in m.stats.steps] == ["prefill"] * passes
        assert [s["tokens"] for s in m.stats.steps] == [min(pc, T - s) for s in range(0, T, pc)]
        summ = m.stats.summary()
        assert summ["decode_steps"] == 0 and summ["prefill_passes"] == passes and summ["prefill_tokens"] == T
        assert summ["prefill_tokens_per_s"] > 0
        # every pass streams each layer once: the prompt's reads scale with the number of passes
        per_pass = sum(m.store.unit_nbytes(u) for u in m.placement.streamed())
        ahead = m.placement.slots * m.placement.slot_bytes
        read = summ["prefill_read_bytes"]
        assert passes * per_pass - ahead <= read <= passes * per_pass + ahead
        hf = _hf(tiny32, torch.float32)
        with torch.no_grad():
            ref = hf(ids).logits
        torch.testing.assert_close(full, ref, atol=2e-5 * ref.abs().max().item(), rtol=1e-4)
        # on a cache that already holds tokens (the mask is bottom-right aligned in every block)
        c = m.new_cache(1, 3 * PREFILL_CHUNK)
        m.forward(ids[:, :5], c)
        torch.testing.assert_close(m.forward(ids[:, 5:], c), ref[:, 5:], atol=2e-5 * ref.abs().max().item(),
                                   rtol=1e-4)


def test_chunked_input_failing_part_way_makes_the_cache_unusable(tiny32, tmp_path, monkeypatch):
    """A long input runs as several passes; if a later pass fails, the earlier ones are already
    committed, so repeating the input would append them twice: the cache refuses further use."""
    from offload import llama as llama_mod

    with _load(tiny32, tmp_path, max_context=256, prefill_chunk=64) as m:
        ids = _ids(1, 150, 256)
        c = m.new_cache(1, 256)
        real, calls = llama_mod.layer_forward, {"n": 0}

        def flaky(*a, **kw):
            calls["n"] += 1
            if calls["n"] == m.config.num_layers + 1:  # the first layer of the second pass
                raise KeyboardInterrupt
            return real(*a, **kw)

        monkeypatch.setattr(llama_mod, "layer_forward", flaky)
        with pytest.raises(KeyboardInterrupt):
            m.forward(ids, c)
        monkeypatch.undo()
        assert c.length == 64
        with pytest.raises(RuntimeError, match="64 of its tokens were committed"):
            m.forward(ids, c)
        c2 = m.new_cache(1, 256)  # a failure in the first pass commits nothing: the cache stays usable
        monkeypatch.setattr(llama_mod, "layer_forward", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            m.forward(ids, c2)
        monkeypatch.undo()
        assert c2.length == 0
        torch.testing.assert_close(m.forward(ids, c2), m.forward(ids))


def test_prefill_chunk_choice_and_workspace():
    from offload.llama import QUERY_BLOCK
    from offload.placement import (MAX_PREFILL_CHUNK, PREFILL_CHUNK, choose_prefill_chunk, plan_placement,
                                   workspace_bytes)
    assert PREFILL_CHUNK == QUERY_BLOCK  # the workspace counts the scores of one query block
    cfg = dict(model_type="llama", hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
               num_hidden_layers=22, intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096)
    # no budget: the whole context (up to MAX_PREFILL_CHUNK) in one pass
    assert choose_prefill_chunk(cfg, 1, 100) == 128
    assert choose_prefill_chunk(cfg, 1, 4096) == MAX_PREFILL_CHUNK
    base = workspace_bytes(cfg, 1, 4096)
    last = 0
    for budget in (16 << 20, 256 << 20, 512 << 20, 2 << 30):
        c = choose_prefill_chunk(cfg, 1, 4096, budget)
        assert c % PREFILL_CHUNK == 0 and PREFILL_CHUNK <= c <= MAX_PREFILL_CHUNK and c >= last
        # the longest chunk within 1/16 of the budget of extra workspace
        assert c == PREFILL_CHUNK or workspace_bytes(cfg, 1, 4096, c) - base <= budget // 16
        assert c == MAX_PREFILL_CHUNK or workspace_bytes(cfg, 1, 4096, c + PREFILL_CHUNK) - base > budget // 16
        last = c
    assert choose_prefill_chunk(cfg, 1, 4096, 16 << 20) == PREFILL_CHUNK
    assert choose_prefill_chunk(cfg, 1, 4096, 512 << 20) == 384  # TinyLlama's shape, 512 MiB: 6x fewer passes
    # attention scores are held for one block of 64 queries whatever the chunk
    assert (workspace_bytes(cfg, 1, 4096, 256) - workspace_bytes(cfg, 1, 4096, 128)
            == workspace_bytes(cfg, 1, 256, 256) - workspace_bytes(cfg, 1, 256, 128))
    # the plan reserves the chunk's workspace; an explicit chunk is honoured and reserved
    p = plan_placement(cfg, budgets={"cpu": "512MiB"}, context=4096)
    assert p.prefill_chunk == 384 and f"{p.prefill_chunk} tokens per pass" in p.explain()
    q = plan_placement(cfg, budgets={"cpu": "512MiB"}, context=4096, prefill_chunk=64)
    assert q.prefill_chunk == 64 and p.workspace_bytes - q.workspace_bytes == (
        workspace_bytes(cfg, 1, 4096, 384) - workspace_bytes(cfg, 1, 4096, 64))
    assert p.used["cpu"] <= 512 << 20 and q.used["cpu"] <= 512 << 20
    for bad in (0, -64, 1.5, True, "64"):
        with pytest.raises(ValueError, match="prefill_chunk"):
            plan_placement(cfg, budgets={"cpu": "512MiB"}, context=4096, prefill_chunk=bad)


def test_fused_qkv_and_gate_up_are_views_of_the_slot(tiny32, tmp_path):
    with _load(tiny32, tmp_path, placement="memory", max_context=16) as m:
        w, f = m._resident["layer.1"]
        assert set(f) == {"qkv", "gate_up"}
        torch.testing.assert_close(f["qkv"], torch.cat([w[f"self_attn.{p}_proj.weight"] for p in "qkv"]), rtol=0, atol=0)
        torch.testing.assert_close(f["gate_up"], torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]]),
                                   rtol=0, atol=0)
        assert f["qkv"].data_ptr() == w["self_attn.q_proj.weight"].data_ptr()  # zero-copy
        # the same layer with and without the fused matrices
        h = torch.randn(1, 3, m.config.hidden_size)
        outs = []
        for fused in (f, None):
            c = m.new_cache(1, 8)
            outs.append(llama.layer_forward(m.config, w, h, 0, c, 0, m.rope, fused=fused))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="fused"):
            llama.layer_forward(m.config, w, h, 0, m.new_cache(1, 8), 0, m.rope, fused={"qkv": f["gate_up"]})


def test_plan_streams_a_small_layer_to_keep_the_embedding():
    # tiny layers, a big embedding and batch 4: streaming layers frees room for the embedding,
    # which saves more per step than the layers cost (one embedding page per sequence)
    ub = {"embed": 10 * _MiB, "head": 50 * _MiB, **{f"layer.{i}": 3 * _MiB for i in range(4)}}
    cfg = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=512, vocab_size=1000, model_type="llama")
    d = plan_placement(cfg, unit_bytes=ub, batch=4, context=16, mode="disk")
    fixed = d.kv_bytes + d.workspace_bytes
    cap = fixed + ub["head"] + 2 * 3 * _MiB + 1 * 3 * _MiB + ub["embed"]  # slots + 1 layer + embed
    p = plan_placement(cfg, unit_bytes=ub, budgets={"cpu": cap}, batch=4, context=16, page_bytes=4 * _MiB)
    assert p.used["cpu"] <= cap
    assert p.tiers["embed"] == "cpu" and len(p.streamed()) == 3
    assert p.disk_bytes_per_token == 9 * _MiB  # vs 16 MiB of embedding pages with every layer resident


def test_given_placement_must_match_the_kv_format(tiny32, tmp_path):
    with offload.convert(tiny32, str(tmp_path / "store")) as st:
        cfg = st.config
        ub = {u: st.unit_nbytes(u) for u in st.unit_names()}
    p = plan_placement(cfg, context=64, mode="disk", dtype_bytes=4, unit_bytes=ub)
    with pytest.raises(ValueError, match="kv_bits"):
        _load(tiny32, tmp_path, placement=p, kv_bits=8, kv_residual=32, max_context=64)


# ------------------------------------------------------------------ device="cuda": planning only

_L3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
              intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, model_type="llama")


def _cuda_accounting(p, ub):
    """The three tiers' books of a device="cuda" plan must balance exactly."""
    units = [u for u in ub if u != "embed"]
    off = [u for u in units if p.tiers[u] != "gpu"]
    disk = [u for u in units if p.tiers[u] == "disk"]
    assert p.device == "cuda" and set(p.tiers.values()) <= {"gpu", "cpu", "disk"}
    assert p.streamed() == disk
    assert p.gpu_slots == (2 if off else 0) and p.gpu_slot_bytes == max((ub[u] for u in off), default=0)
    assert p.used["gpu"] == (p.kv_bytes + p.workspace_bytes + p.gpu_slots * p.gpu_slot_bytes
                             + sum(ub[u] for u in units if p.tiers[u] == "gpu"))
    assert p.slots == (2 if disk else 0) and p.slot_bytes == max((ub[u] for u in disk), default=0)
    assert p.used["cpu"] == (p.slots * p.slot_bytes + sum(ub[u] for u in units if p.tiers[u] == "cpu")
                             + (ub["embed"] if p.tiers["embed"] == "cpu" else 0))
    assert p.pcie_bytes_per_token == sum(ub[u] for u in off) + p.batch * 4096 * 2
    assert p.disk_bytes_per_token == sum(ub[u] for u in disk) + (
        min(ub["embed"], p.batch * 4 * _MiB) if p.tiers["embed"] == "disk" else 0)
    for tier in ("gpu", "cpu"):
        assert p.budgets[tier] is None or p.used[tier] <= p.budgets[tier]


@pytest.mark.parametrize("budgets", [{"gpu": "40GiB"}, {"gpu": "12GiB", "cpu": "2GiB"}, {"gpu": "8GiB", "cpu": "8GiB"},
                                     {"gpu": "6GiB", "cpu": "3GiB"}, {"gpu": "6GiB"}])
def test_plan_cuda_three_tiers_balance_and_prefer_the_gpu(budgets):
    ub = estimate_unit_bytes(_L3_8B)
    p = plan_placement(_L3_8B, "A100-80GB-SXM", budgets, device="cuda", context=8192, disk_bandwidth=2e9)
    _cuda_accounting(p, ub)
    layer = ub["layer.0"]
    # the GPU is filled first: one more resident layer would not fit beside the device slots
    assert p.used["gpu"] + layer > p.budgets["gpu"] or all(t == "gpu" for u, t in p.tiers.items() if u != "embed")
    if p.budgets["cpu"] is not None:  # then CPU memory, before the disk
        assert p.used["cpu"] + layer > p.budgets["cpu"] or not p.streamed()
    # prediction: max of the three overlapped costs
    parts = [p.compute_s, p.pcie_bytes_per_token / p.pcie_bandwidth] + (
        [p.disk_bytes_per_token / 2e9] if p.disk_bytes_per_token else [])
    assert p.predicted_s == pytest.approx(max(parts))
    text = p.explain()
    assert "gpu: holds" in text and "pcie: copies" in text and "planning only" in text


def test_plan_cuda_modes_and_errors():
    ub = estimate_unit_bytes(_L3_8B)
    whole = plan_placement(_L3_8B, "A100-80GB-SXM", None, device="cuda", context=8192)  # 90% of 80 GiB
    assert whole.budgets["gpu"] == int(0.9 * 80 * 2**30) and whole.streamed() == [] and whole.gpu_slots == 0
    assert whole.tiers["embed"] == "cpu" and whole.pcie_bytes_per_token == 4096 * 2
    mem = plan_placement(_L3_8B, "A100-80GB-SXM", {"gpu": "20GiB", "cpu": "2GiB"}, device="cuda", context=8192,
                         mode="memory")
    assert all(t == "gpu" for u, t in mem.tiers.items() if u != "embed") and mem.tiers["embed"] == "cpu"
    disk = plan_placement(_L3_8B, "A100-80GB-SXM", {"gpu": "6GiB", "cpu": "2GiB"}, device="cuda", context=8192,
                          mode="disk", disk_bandwidth=2e9)
    _cuda_accounting(disk, ub)
    assert set(disk.tiers.values()) == {"disk"} and len(disk.streamed()) == 33
    with pytest.raises(ValueError, match="budgets\\['gpu'\\].*KV cache stays whole"):
        plan_placement(_L3_8B, "A100-80GB-SXM", {"gpu": "1GiB"}, device="cuda", context=8192)
    with pytest.raises(ValueError, match="budgets\\['gpu'\\].*memory"):
        plan_placement(_L3_8B, "A100-80GB-SXM", {"gpu": "10GiB"}, device="cuda", context=8192, mode="memory")
    with pytest.raises(ValueError, match="budgets\\['gpu'\\].*too small"):  # KV + workspace fit, slots do not
        plan_placement(_L3_8B, "A100-80GB-SXM", {"gpu": "1400MiB"}, device="cuda", context=8192)
    with pytest.raises(ValueError, match="budgets\\['cpu'\\].*staging"):
        plan_placement(_L3_8B, "A100-80GB-SXM", {"gpu": "4GiB", "cpu": "100MiB"}, device="cuda", context=8192)
    with pytest.raises(ValueError, match="'gpu' budget"):  # no budget and no capacity to derive one from
        plan_placement(_L3_8B, None, None, device="cuda", context=8192)
    with pytest.raises(ValueError, match="'gpu' budget needs device='cuda'"):
        plan_placement(_L3_8B, budgets={"gpu": "8GiB"}, context=8192)


def test_plan_cuda_without_a_disk_bandwidth_predicts_nothing(monkeypatch):
    import offload.placement as pl

    real = pl._machine  # no host profile (with a disk figure); the named GPU profile still resolves
    monkeypatch.setattr(pl, "_machine", lambda machine, device="cpu": None if machine is None else real(machine, device))
    p = plan_placement(_L3_8B, "A100-80GB-SXM", {"gpu": "6GiB", "cpu": "3GiB"}, device="cuda", context=8192)
    assert p.streamed() and p.predicted_s is None and p.compute_s is not None
    assert "no prediction" in p.explain() and "disk_bandwidth" in p.explain()
    q = plan_placement(_L3_8B, "A100-80GB-SXM", {"gpu": "40GiB"}, device="cuda", context=8192)  # nothing on disk
    assert q.predicted_s == pytest.approx(q.compute_s)


def test_plan_cuda_is_planning_only(tiny32, tmp_path):
    with offload.convert(tiny32, str(tmp_path / "store")) as st:
        cfg = st.config
        ub = {u: st.unit_nbytes(u) for u in st.unit_names()}
    p = plan_placement(cfg, "A100-80GB-SXM", {"gpu": "1GiB"}, device="cuda", context=16, dtype_bytes=4, unit_bytes=ub)
    assert p.device == "cuda"
    with pytest.raises(ValueError, match="device='cuda'"):  # the CPU executor refuses a GPU plan
        _load(tiny32, tmp_path, placement=p, max_context=16)
    with pytest.raises(NotImplementedError, match="plan_placement"):
        _load(tiny32, tmp_path, device="cuda")
    out = subprocess.run([sys.executable, "-m", "offload", "plan", tiny32, "--device", "cuda", "--gpu-budget", "1GiB",
                          "--machine", "H100-SXM", "--max-context", "16"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gpu: holds" in out.stdout and "planning only" in out.stdout
    js = subprocess.run([sys.executable, "-m", "offload", "plan", tiny32, "--max-context", "16", "--json"],
                        capture_output=True, text=True, timeout=120)
    assert js.returncode == 0, js.stderr
    assert json.loads(js.stdout)["device"] == "cpu" and "disk:" in js.stderr  # stdout is the JSON alone
