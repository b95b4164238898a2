"""Plumbing of the benchmark harness on tiny sizes: keys, byte counts, JSON/markdown output.

Timings are benchmarks, not tests: nothing here asserts a speed, only that the figures are
well-formed and that bytes are counted by the stated formula.
"""
import json
import math

import pytest
import torch

from bench import attention as A
from bench import cli, report
from roofline import llc_bytes, machine_info, probe_memory_bandwidth

ROW_KEYS = {"suite", "config", "label", "method", "backend", "median_ms", "p10_ms", "p90_ms",
            "min_ms", "max_ms", "repeats", "kv_bytes", "q_bytes", "out_bytes", "bytes", "GB_s",
            "pct_bw", "speedup", "threads", "torch_threads", "isa", "torch", "timestamp",
            "hostname", "pool"}


def _finite_pos(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_probe_small_keys_and_values():
    p = probe_memory_bandwidth(size_bytes=4 << 20, repeats=3, threads=1, warmup=1)
    for k in ("bandwidth_GB_s", "read_GB_s", "triad_GB_s", "triad_wa_GB_s", "read_1thread_GB_s"):
        assert _finite_pos(p[k]), (k, p[k])
    assert p["bandwidth_GB_s"] == p["read_GB_s"]  # the headline is the read stream
    # the triad is credited with 3 arrays; the write-allocate figure with 4 of the same time
    assert p["triad"]["bytes"] == 3 * p["size_bytes"]
    assert p["triad_wa_GB_s"] == pytest.approx(p["triad_GB_s"] * 4 / 3)
    assert p["threads"] == 1 and p["size_bytes"] == 4 << 20 and p["read"]["repeats"] == 3
    # 4 MiB fits in (or near) the LLC here, and the probe must say so
    if p["size_bytes"] < 4 * p["llc_bytes"]:
        assert any("LLC" in w for w in p["warnings"])
    for k in ("cpu_model", "logical_cpus", "llc_bytes", "hostname", "torch"):
        assert k in p["machine"]


def test_probe_default_size_is_far_larger_than_llc():
    # checked without running it: the default array is max(8 x LLC, 256 MiB)
    assert llc_bytes() > 0
    assert max(8 * llc_bytes(), 256 << 20) >= 8 * llc_bytes()
    assert machine_info()["usable_cpus"] >= 1


@pytest.mark.parametrize("bad", [dict(size_bytes=100), dict(repeats=0), dict(threads=0)])
def test_probe_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        probe_memory_bandwidth(**{"size_bytes": 1 << 20, **bad})


@pytest.mark.parametrize("dtype,elt", [("bf16", 2), ("fp16", 2), ("fp32", 4)])
def test_byte_count_formula(dtype, elt):
    cfg = A.AttnConfig(3, 8, 2, 80, [17, 1000, 1], dtype)
    c = A.byte_counts(cfg)
    assert c["kv_bytes"] == (17 + 1000 + 1) * 2 * 80 * 2 * elt  # sum(L) * Hkv * D * (K+V) * elt
    assert c["q_bytes"] == c["out_bytes"] == 3 * 8 * 80 * elt
    assert c["bytes"] == c["kv_bytes"] + c["q_bytes"] + c["out_bytes"]
    assert A.flop_count(cfg) == 4 * 1018 * 8 * 80


def test_config_validation():
    with pytest.raises(ValueError, match="seqlens"):
        A.AttnConfig(2, 8, 2, 64, [5], "bf16")
    with pytest.raises(ValueError, match="heads_q"):
        A.AttnConfig(1, 6, 4, 64, [5], "bf16")
    with pytest.raises(ValueError, match="dtype"):
        A.AttnConfig(1, 8, 2, 64, [5], "int8")


def _tiny_rows(methods, lens=(33, 33)):
    cfg = A.AttnConfig(len(lens), 4, 2, 32, list(lens), "fp32")
    rows = A.bench_attention(cfg, methods, repeats=3, warmup=1, min_repeats=2, target_bytes=1 << 20,
                             max_buffers=4, bandwidth_GB_s=10.0, suite="smoke")
    return cfg, rows


def test_bench_attention_rows_torch_baselines():
    cfg, rows = _tiny_rows(("sdpa", "sdpa_grouped", "reference"))
    assert [r["method"] for r in rows] == ["sdpa", "sdpa_grouped", "reference"]
    expect_kv = 2 * 33 * 2 * 32 * 2 * 4
    for r in rows:
        assert "error" not in r, r.get("error")
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["kv_bytes"] == expect_kv and r["bytes"] == expect_kv + 2 * (2 * 4 * 32 * 4)
        assert r["GB_s"] == pytest.approx(r["bytes"] / (r["median_ms"] / 1e3) / 1e9)
        assert r["pct_bw"] == pytest.approx(100 * r["GB_s"] / 10.0)
        assert r["min_ms"] <= r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"]
        assert 2 <= r["repeats"] <= 3
        assert r["check"] == "ok"  # same values in both cache layouts, so SDPA matches the reference
        assert r["pool"]["buffers"] == 4 and r["pool"]["cold"] is False
    sp = rows[0]["speedup"]["vs_reference"]
    assert sp == pytest.approx(rows[2]["median_ms"] / rows[0]["median_ms"])
    json.dumps(rows)  # rows are plain JSON


def test_sdpa_on_unequal_lengths_is_reported_not_run():
    _, rows = _tiny_rows(("sdpa", "reference"), lens=(5, 40))
    assert "error" in rows[0] and "median_ms" not in rows[0]
    assert "median_ms" in rows[1]
    assert "not run" in A.format_rows(rows)


def test_bench_attention_pykernels_methods():
    pk = pytest.importorskip("pykernels")
    if not hasattr(pk, "decode_attention"):
        pytest.skip("pykernels.decode_attention not available yet")
    _, rows = _tiny_rows(("lean", "split", "unsplit", "reference"), lens=(33, 7))
    for r in rows:
        if r["method"] != "reference" and "error" in r:
            pytest.skip(f"CPU backend unavailable: {r['error']}")
        assert "median_ms" in r and r["check"] == "ok", r
    assert rows[0]["backend"] == "cpu" and "vs_unsplit" in rows[0]["speedup"]


def test_kvpool_only_writes_valid_positions_and_layouts_agree():
    cfg = A.AttnConfig(2, 4, 2, 16, [3, 9], "fp32")
    a = A.KVPool(cfg, "blhd", 2)
    b = A.KVPool(cfg, "bhld", 2)
    for (ka, va), (kb, vb) in zip(a.bufs, b.bufs):
        for bi, L in enumerate(cfg.seqlens):
            assert torch.equal(ka[bi, :L], kb[bi, :, :L].transpose(0, 1))
            assert torch.equal(va[bi, :L], vb[bi, :, :L].transpose(0, 1))
    assert not torch.equal(a.bufs[0][0][1, :9], a.bufs[1][0][1, :9])  # buffers differ
    assert A.pool_size(cfg, 1 << 30, max_buffers=8) == 8
    assert A.pool_size(A.AttnConfig(1, 8, 8, 128, [1 << 16], "bf16"), 256 << 20) == 2


def test_cli_attention_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = cli.main(["attention", "--seqlens", "9", "--batch", "2", "--heads-q", "4", "--heads-kv", "2",
                   "--head-dim", "16", "--dtype", "fp32", "--method", "reference,sdpa",
                   "--bandwidth", "10", "--repeats", "2", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["rows"]] == ["reference", "sdpa"]
    assert data["rows"][0]["config"]["seqlens"] == [9, 9]
    assert "GB/s" in capsys.readouterr().out


def test_cli_rejects_unknown_method():
    with pytest.raises(SystemExit):
        cli.main(["attention", "--method", "fast", "--bandwidth", "1"])


def test_report_writes_json_and_markdown(tmp_path, monkeypatch):
    def tiny_suite(ctx):
        cfg = A.AttnConfig(1, 4, 1, 16, [20], "fp32")
        rows = A.bench_attention(cfg, ("sdpa", "reference"), repeats=2, warmup=1, min_repeats=1,
                                 target_bytes=1 << 16, max_buffers=2,
                                 bandwidth_GB_s=ctx.bandwidth_GB_s, suite="tiny")
        r = rows[0]
        return {"rows": rows, "notes": ["tiny"],
                "targets": [A._target("sdpa: % bw", r["pct_bw"], ">=", 0.0, "{value:.1f}%")]}

    def broken_suite(ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(A, "SUITES", [("tiny-1", "tiny", tiny_suite), ("broken-2", "broken", broken_suite)])
    rep = report.run_report(str(tmp_path), probe_size_bytes=1 << 20, log=lambda *a: None)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["gpu"]["cuda_available"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert "NOT run on a GPU" in data["gpu"]["statement"]
    assert len(data["rows"]) == 2 and data["targets"][0]["status"] == "PASS"
    assert data["suites"][1]["error"] == "RuntimeError: boom"  # a broken suite does not lose the others
    md = (tmp_path / "report.md").read_text()
    assert "PASS" in md and "Measured read bandwidth" in md and "boom" in md
    assert rep["probe"]["size_bytes"] == 1 << 20


def test_target_status_and_failed_check_never_passes():
    assert A._target("x", 2.0, ">=", 1.6, "{value:.2f}x")["status"] == "PASS"
    assert A._target("x", 1.0, ">=", 1.6, "{value:.2f}x")["status"] == "MISS"
    assert A._target("x", None, ">=", 1.6, "{value:.2f}x")["status"] == "N/A"
    t = A._target("x", 9.0, ">=", 1.6, "{value:.2f}x", rows=[{"method": "lean", "check": "FAIL"}])
    assert t["status"] == "MISS" and "correctness" in t["note"]


def test_unsplit_bound_and_noise_label():
    cfg = A.AttnConfig(3, 8, 1, 128, [32768, 1024, 512], "bf16")
    probe = {"read_GB_s": 40.0, "read_1thread_GB_s": 40.0}
    b = A.unsplit_speedup_bound(cfg, probe, 2)
    assert b["bound"] == pytest.approx(1.0)  # one core saturates DRAM: nothing beats unsplit
    b = A.unsplit_speedup_bound(cfg, {"read_GB_s": 40.0, "read_1thread_GB_s": 20.0}, 2)
    assert b["bound"] == pytest.approx(2 * 32768 / (32768 + 1024 + 512))
    assert A._target("x", 0.99, ">=", 1.0, "{value}", noise=0.03)["status"] == "MISS (within noise)"
    assert A._target("x", 0.90, ">=", 1.0, "{value}", noise=0.03)["status"] == "MISS"
    assert b["compute_bound_ratio"] == pytest.approx(2 * 32768 / (32768 + 1024 + 512))
