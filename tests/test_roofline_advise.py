"""roofline.advise: the advisor's model, its choices and its explanations.

The decode-attention model is checked against the schedule the kernels really run
(``pykernels.plan_decode``): the busiest worker's tiles and the partial count it predicts for
lean and for split must be the plan's own.
"""

import json
import math
import os

import numpy as np
import pytest

import pykernels as pk
from roofline import MachineProfile
from roofline.advise import (Advice, _lean_makespan, _split_makespan, advise_decode_attention,
                             advise_kv_format, advise_lut, advise_placement)

CPU = MachineProfile("cpu2", {"bf16": 8e11, "int8": 1.7e12, "fp32": 2e11},
                     {"read": 4e10, "copy": 4e10, "triad": 4e10, "read_1thread": 2.7e10},
                     mem_capacity=24 * 2**30, source="measured")
LLAMA8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256)


@pytest.mark.parametrize("lens,hkv,W", [([32768, 1024, 512], 1, 2), ([4096] * 4, 2, 2), ([4096, 100], 1, 2),
                                        ([5, 7000, 64, 129, 3000], 2, 3), ([1], 1, 4), ([640] * 3, 1, 16)])
def test_makespan_and_partials_match_the_plans(lens, hkv, W):
    tiles = np.repeat(-(-np.array(lens) // 64), hkv)
    lean = pk.plan_decode(lens, hkv, W, method="lean")
    busiest, _, partials = _lean_makespan(tiles, W)
    assert busiest == lean.makespan_tiles() and partials == lean.num_partials
    for S in (1, 2, 3, 8):
        split = pk.plan_decode(lens, hkv, W, method="split", num_splits=S)
        busiest, chunks, partials = _split_makespan(tiles, S, W)
        assert busiest == split.makespan_tiles() and chunks == len(split.tasks)
        assert partials == split.num_partials


def test_decode_attention_choices_and_reasons():
    # one long sequence of an MQA batch: unsplit leaves one worker 512 of 536 tiles
    a = advise_decode_attention([32768, 1024, 512], 8, 1, 128, num_workers=2, machine=CPU)
    assert isinstance(a, Advice) and a.choice == {"method": "lean", "num_splits": None}
    assert "268 of 536" in a.reason and "512" in a.reason and a.reason.endswith("unsplit.")
    unsplit = next(x for x in a.alternatives if x["choice"] == {"method": "split", "num_splits": 1})
    # each worker streams its share, 20 GB/s: the unsplit worker's 512 tiles bound the time
    tile = 64 * 128 * 2 * 2
    assert unsplit["predicted_s"] == pytest.approx(512 * tile / 2e10 + 3 * 1.5e-6 / 2)
    assert a.predicted_s < unsplit["predicted_s"] / 1.3
    assert a.alternatives[0]["predicted_s"] == min(x["predicted_s"] for x in a.alternatives)
    # balanced: lean's cut falls on segment boundaries, nothing to merge (the same balance as
    # one chunk per segment; the tie goes to lean)
    b = advise_decode_attention([4096] * 4, 32, 8, 128, num_workers=2, machine=CPU)
    assert b.choice == {"method": "lean", "num_splits": None} and "0 partials" in b.reason
    # one chunk per segment is as balanced as lean, which merges 2 partials: a near tie, lean
    e = advise_decode_attention([4096, 4032], 8, 1, 128, num_workers=2, machine=CPU)  # 64 + 63 tiles
    assert e.choice["method"] == "lean"
    split1 = next(x for x in e.alternatives if x["choice"] == {"method": "split", "num_splits": 1})
    assert split1["predicted_s"] <= e.predicted_s and split1["partials"] == 0
    # where one worker alone saturates memory (worker_bw = B) balancing gains nothing: the
    # unsplit prediction equals lean's bandwidth time
    c = advise_decode_attention([32768, 1024, 512], 8, 1, 128, num_workers=2, machine=CPU, worker_bw=4e10)
    c1 = next(x for x in c.alternatives if x["choice"] == {"method": "split", "num_splits": 1})
    assert c1["predicted_s"] == pytest.approx(536 * tile / 4e10 + 3 * 1.5e-6 / 2)
    # the pick is never predicted more than 2% slower than the best schedule weighed
    for adv in (a, b, c, e, advise_decode_attention([64] * 512, 8, 1, 128, num_workers=512,
                                                   machine="H100-SXM", device="cuda")):
        assert adv.alternatives[0]["predicted_s"] * 1.02 >= next(
            x["predicted_s"] for x in adv.alternatives if x["choice"] == adv.choice)
    # many workers, one sequence: splitting it is what flash-decoding is for
    d = advise_decode_attention([16384], 8, 1, 128, num_workers=16, machine="H100-SXM", device="cuda")
    assert d.choice["method"] == "lean" and d.alternatives[0]["busiest_tiles"] == 16  # 256 tiles / 16
    s16 = next(x for x in d.alternatives if x["choice"] == {"method": "split", "num_splits": 16})
    assert s16["busiest_tiles"] == 16 and s16["predicted_s"] < next(
        x["predicted_s"] for x in d.alternatives if x["choice"]["num_splits"] == 1) / 8


def test_decode_attention_relative_without_a_profile_and_cache():
    a = advise_decode_attention([32768, 1024, 512], 8, 1, 128, num_workers=2,
                                machine=MachineProfile("bw only", {}, {"read": 1e10}))
    assert a.choice["method"] == "lean"  # B1 unknown: each worker streams B / W
    again = advise_decode_attention([32768, 1024, 512], 8, 1, 128, num_workers=2,
                                    machine=MachineProfile("bw only", {}, {"read": 1e10}))
    assert again == a and again is not a  # memoised, handed out as a copy
    again.choice["method"] = "split"       # so a caller's edit does not leak into later calls
    again.alternatives[0]["choice"]["num_splits"] = 99
    third = advise_decode_attention([32768, 1024, 512], 8, 1, 128, num_workers=2,
                                    machine=MachineProfile("bw only", {}, {"read": 1e10}))
    assert third == a


@pytest.mark.parametrize("kw,match", [
    (dict(seqlens=[], num_heads=8, num_kv_heads=1, head_dim=128, num_workers=2), "seqlens"),
    (dict(seqlens=[0, 4], num_heads=8, num_kv_heads=1, head_dim=128, num_workers=2), "seqlens"),
    (dict(seqlens=[4], num_heads=8, num_kv_heads=3, head_dim=128, num_workers=2), "num_heads"),
    (dict(seqlens=[4], num_heads=8, num_kv_heads=1, head_dim=128, num_workers=0), "num_workers"),
    (dict(seqlens=[4], num_heads=8, num_kv_heads=1, head_dim=128, num_workers=2, device="tpu"), "device"),
])
def test_decode_attention_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        advise_decode_attention(machine=CPU, **kw)


def test_auto_runs_the_advised_schedule():
    """pk.plan_decode(method="auto") is the advisor's choice (its default machine)."""
    lens = [32768, 1024, 512]
    a = pk.plan.advise_schedule(lens, 1, 2, num_heads=1)
    p = pk.plan_decode(lens, 1, 2, method="auto")
    assert p.method == a.choice["method"]
    if p.method == "split":
        assert p.num_splits == a.choice["num_splits"]


def test_kv_format():
    a = advise_kv_format(16384, 32, 8, 128, machine=CPU)
    assert a.choice == {"format": "int4"} and "int4" in a.reason
    assert a.predicted_s == pytest.approx(16384 * 1280 / 4e10)
    assert advise_kv_format(16384, 32, 8, 128, machine=CPU, min_quality="int8").choice == {"format": "int8"}
    assert advise_kv_format(16384, 32, 8, 128, machine=CPU, min_quality="fp8").choice == {"format": "fp8"}
    assert advise_kv_format(16384, 32, 8, 128, machine=CPU, min_quality="bf16").choice == {"format": "bf16"}
    # measured times refine the model: a slow int4 kernel loses to fp8
    m = advise_kv_format(16384, 32, 8, 128, machine=CPU, measured={"int8": 2e-3, "int4": 5e-3, "fp8": 1e-3})
    assert m.choice == {"format": "fp8"} and "measured" in m.reason
    # a budget excludes the big formats; nothing fitting is a clear error
    b = advise_kv_format(16384, 32, 8, 128, machine=CPU, min_quality="int8", memory_budget=40 * 2**20,
                         measured={"int8": 9.0, "bf16": 1e-3})  # bf16 would be faster, but is too big
    assert b.choice == {"format": "int8"}
    assert any("exceeds the budget" in x.get("excluded", "") for x in b.alternatives)
    with pytest.raises(ValueError, match="memory_budget"):
        advise_kv_format(16384, 32, 8, 128, machine=CPU, memory_budget=2**20)
    with pytest.raises(ValueError, match="min_quality"):
        advise_kv_format(16384, 32, 8, 128, machine=CPU, min_quality="int3")


def test_kv_format_follows_measured_timings(autotune_home):
    """bench.kvquant records seconds per token of context per format; the advisor scales them to
    the asked context and ranks by them (bytes alone rank int8 ahead of bf16, which it need not be)."""
    from types import SimpleNamespace

    import torch
    from bench import kvquant as KV

    at = autotune_home
    assert at.kv_bucket(32, 8, 128, 32, 2, "cpu") == "Hq32-Hkv8-D128-g32-W2-cpu"
    model = advise_kv_format(16384, 32, 8, 128, machine=CPU, min_quality="int8")
    assert model.choice == {"format": "int8"} and model.source == "model"
    L = 16384
    label = KV.speed_label(1, 32, 8, 128, L)
    rows = [{"method": m, "label": label, "median_ms": ms}
            for m, ms in (("bf16", 2.0), ("kv-int8", 3.0), ("kv-int4", 1.0), ("kv-int2", 0.9))]
    ctx = SimpleNamespace(record_autotune=True, device="cpu", backend="cpu", heads_q=32, heads_kv=8, head_dim=128,
                          group_size=32, formats=("int8", "int4", "int2"))
    bucket = KV._record_kv_timings(ctx, rows, L)
    W = torch.get_num_threads()
    assert bucket == at.kv_bucket(32, 8, 128, 32, W, "cpu")
    entry = at.lookup("kv_format", bucket)
    assert entry["timings"] == pytest.approx({"bf16": 2e-3 / L, "int8": 3e-3 / L, "int4": 1e-3 / L, "int2": 0.9e-3 / L})
    a = advise_kv_format(2 * L, 32, 8, 128, machine=CPU, min_quality="int8", num_layers=4)
    assert a.choice == {"format": "bf16"} and a.source == "measured"
    assert a.predicted_s == pytest.approx(2e-3 * 2 * 4)  # scaled to 2x the context and 4 layers
    assert "measured on this machine" in a.reason and "bytes alone would take int8" in a.reason
    assert advise_kv_format(L, 32, 8, 128, machine=CPU).choice == {"format": "int4"}  # int2 below the floor
    # another shape, autotune=False, or explicit measurements: the model / the given figures
    assert advise_kv_format(L, 32, 8, 64, machine=CPU, min_quality="int8").source == "model"
    assert advise_kv_format(L, 32, 8, 128, machine=CPU, min_quality="int8", autotune=False).choice == {"format": "int8"}
    assert advise_kv_format(L, 32, 8, 128, machine=CPU, min_quality="int8", num_workers=W + 1).source == "model"
    # nothing recorded without the flag, or for another backend
    assert KV._record_kv_timings(SimpleNamespace(**{**vars(ctx), "record_autotune": False}), rows, L) is None
    assert KV._record_kv_timings(SimpleNamespace(**{**vars(ctx), "backend": "triton"}), rows, L) is None
    # nor timings taken while other processes used the CPUs (bench.attention.busy_note)
    assert KV._record_kv_timings(ctx, [dict(r, other_cpu_load=0.5) for r in rows], L) == "busy"
    # only the recorded length's rows count: a busy shorter length does not block it
    other = KV.speed_label(1, 32, 8, 128, L // 2)
    assert KV._record_kv_timings(ctx, rows + [dict(rows[0], label=other, other_cpu_load=0.5)], L) == bucket


def test_lut():
    a = advise_lut(4096, 14336, M=1, machine=CPU)
    assert a.choice == {"bits": 4, "kernel": "lut_gemv"}
    nbytes = 4096 * 14336 * 4 / 8 + 4 * 4096 * 14336 / 128
    b = advise_lut(4096, 14336, M=1, machine=CPU, weight_budget=nbytes - 1)
    assert b.choice["bits"] == 3  # 4-bit does not fit the budget
    with pytest.raises(ValueError, match="weight_budget"):
        advise_lut(4096, 14336, machine=CPU, weight_budget=1000)
    # a machine without an int8 peak charges the lookups nothing: the LUT kernel is memory-bound
    # and wins at any M here; with the int8 roof its time grows with M
    t1 = advise_lut(4096, 14336, M=1, machine=CPU).predicted_s
    t64 = advise_lut(4096, 14336, M=64, machine=CPU).predicted_s
    assert t64 > 4 * t1
    with pytest.raises(ValueError, match="bits"):
        advise_lut(64, 64, bits=(5,), machine=CPU)


def test_placement_honours_budgets():
    a = advise_placement(LLAMA8B, batch=1, context=8192, machine="A100-40GB-SXM", device_budget=10 * 2**30)
    w, kv = a.choice["weights"], a.choice["kv"]
    assert math.isclose(sum(w.values()), 1.0) and math.isclose(sum(kv.values()), 1.0)
    from roofline import analyze_model
    full = analyze_model(LLAMA8B, batch=1, context=8192, machine="A100-40GB-SXM")
    on_dev = w["gpu"] * full.weight_bytes + kv["gpu"] * full.kv_bytes_per_sequence
    assert on_dev <= 10 * 2**30 * (1 + 1e-6)
    assert a.predicted_s > full.time_s  # PCIe bounds what does not fit
    assert "within 10.0 GiB" in a.reason
    # everything fits: all on the device
    b = advise_placement(LLAMA8B, batch=1, context=8192, machine="A100-80GB-SXM", device_budget=70 * 2**30)
    assert b.choice["weights"]["gpu"] == 1.0 and b.predicted_s == pytest.approx(
        analyze_model(LLAMA8B, batch=1, context=8192, machine="A100-80GB-SXM").time_s)
    with pytest.raises(ValueError, match="device_budget"):
        advise_placement(LLAMA8B, batch=1, context=8192, machine="A100-80GB-SXM", device_budget=0)


# --------------------------------------------------------------------------------------------
# measured autotune results (roofline.autotune) refine the model

@pytest.fixture
def autotune_home(tmp_path, monkeypatch):
    from roofline import autotune

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PYKERNELS_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "_MEMO", {})
    return autotune


def test_decode_bucket():
    from roofline.autotune import decode_bucket

    assert decode_bucket([4096] * 4, 32, 8, 128, 2, 2, "cpu") == "Hq32-Hkv8-D128-e2-W2-cpu-B4-T64-imb1"
    assert decode_bucket([4000] * 3, 32, 8, 128, 2, 2, "cpu") == decode_bucket([3000] * 4, 32, 8, 128, 2, 2, "cpu")
    assert decode_bucket([32768, 1024, 512], 8, 1, 128, 2, 2, "cpu").endswith("imb4")
    assert decode_bucket([100000] + [1] * 40, 8, 1, 128, 2, 2, "cpu").endswith("imb8")
    with pytest.raises(ValueError, match="seqlens"):
        decode_bucket([0, 5], 8, 1, 128, 2, 2, "cpu")


def test_record_and_lookup(autotune_home, tmp_path, monkeypatch):
    at = autotune_home
    assert at.lookup("decode_attention", "b1") is None
    e = at.record("decode_attention", "b1", {"lean": 2e-3, "split4": 1e-3, "split1": float("nan")})
    assert e["best"] == "split4" and set(e["timings"]) == {"lean", "split4"}
    at.record("decode_attention", "b2", {"lean": 1e-3})
    monkeypatch.setattr(at, "_MEMO", {})  # a new process reads the file
    assert at.lookup("decode_attention", "b1")["best"] == "split4"
    assert at.lookup("decode_attention", "b2")["best"] == "lean"
    files = sorted(os.listdir(os.path.dirname(at.path())))
    name = os.path.basename(at.path())
    assert files == [name, name + ".lock"]  # no temporary file left
    monkeypatch.setenv("PYKERNELS_AUTOTUNE", "0")
    assert at.lookup("decode_attention", "b1") is None
    with pytest.raises(ValueError, match="timings"):
        at.record("decode_attention", "b3", {"lean": 0.0})
    monkeypatch.setenv("PYKERNELS_AUTOTUNE", "1")
    # malformed entries (edited by hand, written by another version) are no result, not a crash
    for bad in ({"best": "split2", "timings": {"lean": 1e-3}}, {"best": None, "timings": {"lean": 1e-3}},
                {"timings": {"lean": 1e-3}}, {"best": "lean", "timings": {"lean": "fast"}},
                {"best": "lean", "timings": {"lean": float("inf")}}, [1, 2]):
        open(at.path(), "w").write(json.dumps({"decode_attention": {"b1": bad}}))
        assert at.lookup("decode_attention", "b1") is None
        assert advise_decode_attention([100], 8, 1, 128, num_workers=2, machine=CPU).source == "model"
    open(at.path(), "w").write("{not json")
    assert at.lookup("decode_attention", "b1") is None  # a corrupt file is no result, not a crash


def test_record_from_threads_keeps_every_entry(autotune_home):
    import threading

    at = autotune_home
    errors = []

    def work(t):
        try:
            for i in range(20):
                at.record("decode_attention", f"t{t}-{i}", {"lean": 1e-3 * (i + 1)})
        except Exception as e:  # noqa: BLE001  collected and asserted below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    data = json.load(open(at.path()))
    assert len(data["decode_attention"]) == 80


def test_measured_results_follow_other_processes_but_never_a_table_machine(autotune_home):
    """Advice is memoised per shape; a result another process records afterwards is used (the
    memo key holds the cache file's time), and a datasheet machine (planning for other
    hardware) never follows this machine's timings."""
    import subprocess
    import sys

    lens = [4096, 4096]
    assert advise_decode_attention(lens, 8, 8, 128, num_workers=2, machine=CPU).source == "model"
    bucket = autotune_home.decode_bucket(lens, 8, 8, 128, 2, 2, "cpu")
    subprocess.run([sys.executable, "-c", "from roofline import autotune; autotune.record('decode_attention', "
                    f"{bucket!r}, {{'lean': 2e-3, 'split4': 1e-3}})"], check=True)
    a = advise_decode_attention(lens, 8, 8, 128, num_workers=2, machine=CPU)
    assert a.source == "measured" and a.choice == {"method": "split", "num_splits": 4}
    assert advise_decode_attention(lens, 8, 8, 128, num_workers=2, machine="H100-SXM").source == "model"


def test_measured_result_wins_over_the_model(autotune_home):
    at = autotune_home
    lens = [32768, 1024, 512]
    model = advise_decode_attention(lens, 8, 1, 128, num_workers=2, machine=CPU)
    assert model.choice["method"] == "lean" and model.source == "model"
    at.record("decode_attention", at.decode_bucket(lens, 8, 1, 128, 2, 2, "cpu"),
              {"lean": 2e-3, "split4": 1e-3})
    m = advise_decode_attention(lens, 8, 1, 128, num_workers=2, machine=CPU)
    assert m.choice == {"method": "split", "num_splits": 4} and m.source == "measured"
    assert "measured on this machine" in m.reason and "the model alone would take lean" in m.reason
    assert {a["measured_s"] for a in m.alternatives if a["measured_s"]} == {2e-3, 1e-3}
    # the same bucket: another batch of similar shape follows the measurement too
    assert advise_decode_attention([30000, 1000, 600], 8, 1, 128, num_workers=2, machine=CPU).source == "measured"
    assert advise_decode_attention(lens, 8, 1, 128, num_workers=2, machine=CPU, autotune=False).choice == model.choice
    # pykernels' method="auto" follows it
    assert pk.plan_decode(lens, 1, 2, method="auto").method == "lean"  # Hq=1: another bucket
    from pykernels.attention import _auto_choice
    import torch
    q = torch.zeros(3, 8, 128, dtype=torch.bfloat16)
    assert _auto_choice(torch.tensor(lens, dtype=torch.int32), 1, 2, 64, q, 2) == {"method": "split", "num_splits": 4}
    # lengths of the same tiles but another imbalance class are another bucket: the model decides
    assert _auto_choice(torch.tensor([32768, 32768, 32768], dtype=torch.int32), 1, 2, 64, q, 2)["method"] == "lean"
    import os as _os
    _os.environ["PYKERNELS_AUTOTUNE"] = "0"  # restored by the fixture's monkeypatch
    assert _auto_choice(torch.tensor(lens, dtype=torch.int32), 1, 2, 64, q, 2)["method"] == "lean"


def test_backend_auto_follows_measured_results(monkeypatch):
    """backend="auto": when several backends can serve a call (CUDA and Triton on a GPU), a
    measured autotune entry picks the fastest; otherwise the static order. Simulated on the CPU
    with a stand-in backend (no GPU here)."""
    import dataclasses

    import torch
    from pykernels import backends

    fake = dataclasses.replace(backends.REGISTRY["cuda"], devices=("cpu", "cuda"),
                               probe=lambda: (True, "stand-in"), _status=None)
    monkeypatch.setitem(backends.REGISTRY, "cuda", fake)
    cpu = torch.device("cpu")
    both = lambda name: None  # noqa: E731  every backend accepts the call
    assert backends.select("auto", cpu, both) == "cuda"  # static order, nothing consulted
    assert backends.select("auto", cpu, both, lambda: None) == "cuda"  # nothing measured
    assert backends.select("auto", cpu, both, lambda: {"timings": {"cuda": 2e-3, "cpu": 1e-3}}) == "cpu"
    assert backends.select("auto", cpu, both, lambda: {"timings": {"cuda": 1e-3, "cpu": 2e-3}}) == "cuda"
    assert backends.select("auto", cpu, both, lambda: {"timings": {"triton": 1e-4}}) == "cuda"

    def broken():
        raise OSError("unreadable cache")
    assert backends.select("auto", cpu, both, broken) == "cuda"
    # an explicit backend is never overridden by a measurement
    assert backends.select("cuda", cpu, both, lambda: {"timings": {"cpu": 1e-9}}) == "cuda"
    # the declined backends' reasons are still reported when nothing can serve
    with pytest.raises(NotImplementedError, match="no backend"):
        backends.select("auto", cpu, lambda name: "declined", lambda: {"timings": {"cpu": 1.0}})


def test_lut_backend_lookup_reads_the_bucket(autotune_home):
    """lut_gemv's backend="auto" asks for the entry of its own bucket (N, K to powers of two)."""
    import torch
    from pykernels.lut import _measured_backend

    at = autotune_home
    qw = pk.quantize_weight(torch.randn(96, 192), bits=3, group_size=64)
    x = torch.randn(5, 192)
    assert _measured_backend(x, qw)() is None
    at.record("backend:lut_gemv", at.lut_bucket(96, 192, 5, 3, qw.gs, "cpu"), {"cpu": 1e-3, "triton": 5e-3})
    assert _measured_backend(x, qw)()["best"] == "cpu"
    assert at.lut_bucket(96, 200, 5, 3, 64, "cpu") == at.lut_bucket(128, 256, 5, 3, 64, "cpu")
    assert _measured_backend(torch.randn(6, 192), qw)() is None  # another M


def test_backend_auto_order_for_tensor_caches_on_a_gpu(monkeypatch):
    """decode_attention on a tensor cache asks backend="auto" for Triton before CUDA on a GPU
    (measured 4-5x faster kernels on an H100); an explicit backend and CPU tensors are unaffected;
    a measured autotune entry still wins. Simulated with stand-in backends (no GPU here)."""
    import dataclasses

    import torch
    from pykernels import attention, backends

    for name in ("cuda", "triton"):
        fake = dataclasses.replace(backends.REGISTRY[name], probe=lambda: (True, "stand-in"), _status=None)
        monkeypatch.setitem(backends.REGISTRY, name, fake)
    gpu = torch.device("cuda")
    every = lambda name: None  # noqa: E731
    order = attention._auto_order(gpu)
    assert order == ("triton", "cuda", "cpu", "reference") and attention._auto_order(torch.device("cpu")) is None
    assert backends.select("auto", gpu, every) == "cuda"  # the static order
    assert backends.select("auto", gpu, every, order=order) == "triton"
    assert backends.select("auto", gpu, every, lambda: None, order=order) == "triton"
    assert backends.select("auto", gpu, every, lambda: {"timings": {"cuda": 1e-4, "triton": 2e-4}},
                           order=order) == "cuda"
    assert backends.select("cuda", gpu, every, order=order) == "cuda"
    assert backends.select("auto", gpu, lambda n: "declined" if n == "triton" else None, order=order) == "cuda"
    with pytest.raises(ValueError, match=r"^order: expected a permutation"):
        backends.select("auto", gpu, every, order=("triton", "cuda"))


def test_auto_choice_follows_other_processes_within_the_stamp_interval(autotune_home, monkeypatch):
    """method="auto" memoises its choice per call shape; a timing another process records later
    is followed once autotune.quick_stamp re-reads the file's time (at most once per
    STAMP_INTERVAL_S, so a decode loop does not stat the file on every call)."""
    import subprocess
    import sys

    import torch
    from pykernels.attention import _auto_choice

    lens = [4096, 4096]
    q = torch.zeros(2, 8, 128, dtype=torch.bfloat16)
    t = torch.tensor(lens, dtype=torch.int32)
    first = _auto_choice(t, 8, 2, 64, q, 2)
    assert first == {"method": "lean", "num_splits": None}
    bucket = autotune_home.decode_bucket(lens, 8, 8, 128, 2, 2, "cpu")
    monkeypatch.setattr(autotune_home, "STAMP_INTERVAL_S", 3600.0)
    subprocess.run([sys.executable, "-c", "from roofline import autotune; autotune.record('decode_attention', "
                    f"{bucket!r}, {{'lean': 2e-3, 'split4': 1e-3}})"], check=True)
    assert _auto_choice(t, 8, 2, 64, q, 2) == first  # inside the interval: the memo stands
    monkeypatch.setattr(autotune_home, "STAMP_INTERVAL_S", 0.0)
    assert _auto_choice(t, 8, 2, 64, q, 2) == {"method": "split", "num_splits": 4}
