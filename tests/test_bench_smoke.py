"""Plumbing of the benchmark harness on tiny sizes: keys, byte counts, JSON/markdown output.

Timings are benchmarks, not tests: nothing here asserts a speed, only that the figures are
well-formed and that bytes are counted by the stated formula.
"""
import json
import math
import os
import re

import pytest
import torch

from bench import attention as A
from bench import cli, report
from bench import kvquant as KV
from bench import lut as LU
from roofline import llc_bytes, machine_info, probe_memory_bandwidth


# run_report() here runs only the suites a test sets (see conftest.no_full_size_suites)
pytestmark = pytest.mark.usefixtures("no_full_size_suites")

ROW_KEYS = {"suite", "config", "label", "method", "backend", "median_ms", "p10_ms", "p90_ms",
            "min_ms", "max_ms", "repeats", "kv_bytes", "q_bytes", "out_bytes", "bytes", "GB_s",
            "pct_bw", "speedup", "threads", "torch_threads", "isa", "torch", "timestamp",
            "hostname", "pool"}


@pytest.fixture(scope="module", autouse=True)
def _roofline_cache(roofline_cache_home):
    """The report and CLI run the quick roofline probe (bench/roof.py): its cache stays private."""
    return roofline_cache_home


def _finite_pos(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_probe_small_keys_and_values():
    p = probe_memory_bandwidth(size_bytes=4 << 20, repeats=3, threads=1, warmup=1)
    for k in ("bandwidth_GB_s", "read_GB_s", "triad_GB_s", "triad_wa_GB_s", "copy_GB_s", "read_1thread_GB_s"):
        assert _finite_pos(p[k]), (k, p[k])
    assert p["bandwidth_GB_s"] == p["read_GB_s"]  # the headline is the read stream
    # the triad is credited with 3 arrays; the write-allocate figure with 4 of the same time
    assert p["triad"]["bytes"] == 3 * p["size_bytes"]
    assert p["copy"]["bytes"] == 2 * p["size_bytes"]  # copy: read a, write b
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
    _, rows = _tiny_rows(("lean", "split", "unsplit", "reference"), lens=(33, 7))
    for r in rows:
        assert "error" not in r and "median_ms" in r and r["check"] == "ok", r
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


def test_cli_attention_num_splits_names_the_row(tmp_path, capsys):
    """--num-splits S: the split row records S and prints as "split S=4" (plain 'split' elsewhere
    means the heuristic's splits); it stays the 'split' baseline of the other rows."""
    out = tmp_path / "rows.json"
    assert cli.main(["attention", "--seqlens", "300", "--batch", "1", "--heads-q", "4", "--heads-kv", "2",
                     "--head-dim", "16", "--dtype", "fp32", "--method", "split,lean", "--num-splits", "4",
                     "--bandwidth", "10", "--repeats", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r.get("num_splits")) for r in rows] == [("split", 4), ("lean", None)]
    assert "vs_split" in rows[1]["speedup"] and all(r.get("check", "ok") == "ok" for r in rows)
    assert "split S=4" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--num-splits: not used with --sweep"):
        cli.main(["attention", "--sweep", "1", "--num-splits", "4", "--bandwidth", "1"])


def test_bench_gpu_suite_without_a_gpu_and_the_report_statement(monkeypatch):
    """suite_gpu on a machine without a GPU: a note, no rows; the report's GPU statement says
    whether the GPU suite ran, was not selected, or failed (faked GPU)."""
    from bench import gpu as G

    if not torch.cuda.is_available():
        res = G.suite_gpu(A.BenchContext(bandwidth_GB_s=1.0))
        assert res["rows"] == [] and "did not run" in res["notes"][0] and "gpu_machine" not in res
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "GPU X")
    assert "Suite gpu-1 timed the CUDA and Triton kernels" in report._gpu_statement(True)["statement"]
    assert "gpu-1) was not selected" in report._gpu_statement(False)["statement"]
    st = report._gpu_statement(False, "RuntimeError: CUDA out of memory")["statement"]
    assert "gpu-1) failed (RuntimeError: CUDA out of memory)" in st


def test_offload_and_kvtier_share_one_median():
    from bench import kvtier, offload

    assert kvtier._median is offload._median
    assert offload._median([3.0, 1.0, 2.0]) == 2.0
    assert offload._median([4.0, 1.0, 3.0, 2.0]) == 2.5  # the mean of the middle two
    assert offload._median([]) is None


def test_cli_rejects_unknown_method():
    with pytest.raises(SystemExit):
        cli.main(["attention", "--method", "fast", "--bandwidth", "1"])


_ATT = ["attention", "--seqlens", "9", "--heads-q", "4", "--heads-kv", "2", "--head-dim", "16", "--repeats", "2",
        "--bandwidth", "10", "--method", "reference"]
_LUT = ["lut", "-N", "16", "-K", "64", "--repeats", "2", "--bandwidth", "10"]
_KV = ["kv", "--seqlens", "64", "--heads-q", "4", "--heads-kv", "2", "--head-dim", "64", "--bandwidth", "10"]


@pytest.mark.parametrize("argv,flag", [
    (_ATT + ["--heads-kv", "0"], "--heads-kv"), (_ATT + ["--head-dim", "-64"], "--head-dim"),
    (_ATT + ["--batch", "0"], "--batch"), (_ATT + ["--seqlens", "0"], "--seqlens"),
    (_ATT + ["--dtype", "int8"], "--dtype"), (_ATT + ["--threads", "0"], "--threads"),
    (_ATT + ["--bandwidth", "nan"], "--bandwidth"), (_ATT + ["--bandwidth", "0"], "--bandwidth"),
    (_ATT + ["--sweep", "attention"], "--sweep"), (_ATT + ["--sweep", "4"], "--sweep"),
    (_LUT + ["-N", "0"], "--N"), (_LUT + ["-K", "-8"], "--K"), (_LUT + ["--sweep", "lut-5"], "--sweep"),
    (_KV + ["--batch", "0"], "--batch"), (_KV + ["--head-dim", "60"], "--head-dim"),
    (_KV + ["--sweep", "1", "--batch", "3"], "--batch"), (_KV + ["--accuracy", "--acc-queries", "0"], "--acc-queries"),
    (["probe", "--size-mib", "0"], "--size-mib"),
])
def test_cli_bad_options_are_one_line_errors_before_any_measurement(argv, flag, monkeypatch):
    """A typo is a SystemExit naming the option, raised before the probe or any timing runs."""
    monkeypatch.setattr(cli, "_probe", lambda args: pytest.fail("probed before checking the options"))
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert str(e.value).startswith(flag), str(e.value)


def test_cli_json_is_strict_and_checked_first(tmp_path):
    with pytest.raises(SystemExit, match="--json: .* is a directory"):
        cli.main(_ATT + ["--json", str(tmp_path)])
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(SystemExit, match="--json: cannot write"):
        cli.main(_ATT + ["--json", str(blocked / "out.json")])  # a file where a folder should be
    out = tmp_path / "sub" / "rows.json"
    cli._write_json(str(out), {"a": float("nan"), "b": [float("inf"), 1.5]})
    assert json.loads(out.read_text()) == {"a": None, "b": [None, 1.5]}  # strict: no bare NaN
    assert os.listdir(out.parent) == ["rows.json"]  # written beside and renamed: no temp file left


def test_report_rejects_unknown_suite_names(tmp_path):
    with pytest.raises(SystemExit):
        report.main(["--suites", "kvteir", "--out", str(tmp_path / "rep")])
    assert not (tmp_path / "rep").exists()  # the last real report is never replaced by an empty one


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
    monkeypatch.setattr(LU, "SUITES", [])  # the LUT suites have their own test below
    monkeypatch.setattr(KV, "SUITES", [])  # so do the quantized-KV suites
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


# --------------------------------------------------------------------------------------------
# LUT-GEMV benchmark (bench/lut.py) on tiny shapes

def _lut_backend():
    """The CPU kernel: pykernels._C is built from this tree, so a build without it is stale and
    fails here rather than quietly benchmarking the reference."""
    from pykernels import _C
    assert hasattr(_C, "lut_gemv"), "pykernels._C has no lut_gemv: stale build, run `make build`"
    return "cpu"


def _lut_bytes(N, K, bits, gs, M, x_elt, y_elt):
    """The stated formula: planes [N_pad/32, K/8, bits, 32] + fp16 scales and zeros [N, K/gs],
    plus x [M, K] read and y [M, N] written."""
    N_pad = -(-N // 32) * 32
    w = N_pad * K // 8 * bits + 2 * (N * (K // gs) * 2)
    return w, w + M * K * x_elt + M * N * y_elt


def test_random_lut_weights_are_packed_uniform_codes():
    from pykernels.lut_format import pack_codes
    ws = LU.random_lut_weights(70, 64, 3, group_size=32, n=2, seed=1)
    for w in ws:
        q = w.codes()                                    # [N, K_pad] in [0, 8)
        assert q.shape == (70, 64) and int(q.max()) <= 7
        full = torch.zeros(96, 64, dtype=torch.uint8)
        full[:70] = q
        assert torch.equal(pack_codes(full, 3), w.planes)  # padding rows 70..95 hold code 0
        assert w.scales.dtype == w.zeros.dtype == torch.float16 and w.scales.shape == (70, 2)
        assert float(w.zeros.min()) >= 0 and float(w.zeros.max()) <= 7
    assert not torch.equal(ws[0].planes, ws[1].planes)  # distinct sets for cold caches
    assert all(len(set(q.codes().flatten().tolist())) == 8 for q in ws)


def test_bench_lut_rows_bytes_and_check():
    be = _lut_backend()
    N, K, gs = 100, 256, 128  # N not a multiple of 32: padded rows are read and counted
    cases = [(LU.lut(b, gs), 1) for b in (1, 2, 3, 4)] + [(LU.TORCH_BF16, 1), (LU.dequant(4, gs), 1),
                                                           (LU.lut(4, gs), 3), (LU.TORCH_BF16, 3)]
    rows = LU.bench_lut(N, K, cases, dtype="bf16", backend=be, repeats=3, warmup=1, min_repeats=2,
                        target_bytes=1 << 16, max_buffers=4, bandwidth_GB_s=10.0, suite="smoke")
    assert [(r["method"], r["M"]) for r in rows] == [("lut1", 1), ("lut2", 1), ("lut3", 1), ("lut4", 1),
                                                     ("torch_bf16", 1), ("dequant4", 1), ("lut4", 3),
                                                     ("torch_bf16", 3)]
    for r, (m, M) in zip(rows, cases):
        assert "error" not in r, r.get("error")
        assert r["check"] == "ok", (r["method"], r["M"], r.get("rel_err"))
        assert _finite_pos(r["GB_s"]) and _finite_pos(r["weight_GB_s"]) and _finite_pos(r["median_ms"])
        assert r["pct_bw"] == pytest.approx(100 * r["GB_s"] / 10.0)
        assert r["GB_s"] == pytest.approx(r["bytes"] / (r["median_ms"] / 1e3) / 1e9)
        assert r["min_ms"] <= r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"]
        assert 2 <= r["repeats"] <= 3 and r["pool"]["buffers"] >= 2
        assert r["x_bytes"] == M * K * 2
        if m.quantized:
            wb, total = _lut_bytes(N, K, m.bits, gs, M, 2, r["y_bytes"] // (M * N))
            assert r["weight_bytes"] == wb and r["bytes"] == total
        else:
            assert r["weight_bytes"] == N * K * 2 and r["bits_per_weight"] == 16.0
        if m.kind == "lut":
            assert r["backend"] == be and "vs_torch_bf16" in r["speedup"]
    assert rows[3]["bits_per_weight"] == pytest.approx(8 * _lut_bytes(N, K, 4, gs, 1, 2, 4)[0] / (N * K))
    assert rows[3]["speedup"]["vs_dequant"] == pytest.approx(rows[5]["median_ms"] / rows[3]["median_ms"])
    assert rows[6]["speedup"]["vs_torch_bf16"] == pytest.approx(rows[7]["median_ms"] / rows[6]["median_ms"])
    assert "lut4" in LU.format_rows(rows)
    json.dumps(rows)


def test_lut_suites_on_tiny_shapes(monkeypatch):
    be = _lut_backend()
    monkeypatch.setattr(LU, "DOWN_PROJ", (64, 256))
    monkeypatch.setattr(LU, "LLAMA3_8B_LINEARS", (("q_proj", 64, 128), ("k_proj", 32, 128),
                                                  ("o_proj", 64, 128)))
    ctx = LU.LutContext(bandwidth_GB_s=10.0, backend=be, repeats=2, quick=True, target_bytes=1 << 15,
                        time_budget_s=0.5, log=lambda *a: None)
    res = {name: fn(ctx) for name, _, fn in LU.SUITES}
    for name, r in res.items():
        assert r["rows"] and all("median_ms" in row for row in r["rows"]), name
        assert all(row.get("check", "ok") == "ok" for row in r["rows"]), name
    t1 = res["lut-1"]["targets"]
    assert [t["threshold"] for t in t1] == [85.0, 1.1, 0.8, 10.0, 16.0]
    assert all(t["status"] in ("PASS", "MISS", "MISS (within noise)") for t in t1)
    r4 = next(r for r in res["lut-1"]["rows"] if r["method"] == "lut4")
    # ms-equivalent: our time to read llama.cpp Q4_K's bytes of this shape at our weight rate
    assert t1[1]["value"] == pytest.approx(r4["median_ms"] * 64 * 256 * 4.5 / 8 / r4["weight_bytes"])
    assert "QUOTED" in " ".join(res["lut-1"]["notes"])
    assert sorted({r["method"] for r in res["lut-2"]["rows"]}) == ["lut1", "lut2", "lut3", "lut4", "torch_bf16"]
    assert res["lut-3"]["targets"][0]["threshold"] == 2.5
    assert {r["M"] for r in res["lut-3"]["rows"]} >= {1, 8}
    assert len(res["lut-4"]["rows"]) == 4  # 2 distinct shapes x (lut4, torch_bf16)


def test_llamacpp_quoted_rates():
    # the figure: Q4_K moves 4096 * 14336 * 4.5 / 8 bytes in 1.1 ms
    assert LU.llamacpp_GB_s("Q4_K") == pytest.approx(4096 * 14336 * 4.5 / 8 / 1.1e-3 / 1e9)
    row = {"config": {"N": 4096, "K": 14336}, "median_ms": 1.0, "weight_bytes": LU.llamacpp_bytes("Q4_K") / 2}
    assert LU.ms_equivalent(row, "Q4_K") == pytest.approx(2.0)


def test_cli_lut_writes_json(tmp_path, capsys):
    be = _lut_backend()
    out = tmp_path / "lut.json"
    rc = cli.main(["lut", "-N", "64", "-K", "128", "--bits", "2,4", "-M", "1,2", "--group-size", "64",
                   "--method", "lut,torch_bf16,dequant", "--backend", be, "--bandwidth", "10",
                   "--repeats", "2", "--time-budget", "0.2", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    names = [(r["method"], r["M"]) for r in data["rows"]]
    assert names == [(m, M) for M in (1, 2) for m in ("lut2-g64", "lut4-g64", "torch_bf16",
                                                       "dequant2-g64", "dequant4-g64")]
    assert all(r["check"] == "ok" and r["GB_s"] > 0 for r in data["rows"])
    assert "GB/s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["lut", "--method", "fast", "--bandwidth", "1"])


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("scheme,gs,K", [("affine", 32, 96), ("symmetric", -1, 70), ("codebook", 64, 128)])
def test_dequant_baseline_matches_library_dequantize(bits, scheme, gs, K):
    from pykernels.lut_format import unpack_codes
    w = LU.random_lut_weights(45, K, bits, group_size=gs, scheme=scheme, seed=bits)[0]
    assert torch.equal(LU.unpack_codes_fast(w.planes, bits), unpack_codes(w.planes, bits))
    ref = w.dequantize()
    assert torch.equal(LU.dequantize_fast(w, torch.float32)[:, :K], ref)  # fp32: exact
    x = torch.randn(3, K)
    y = LU.dequant_matmul(x, w)
    torch.testing.assert_close(y, x @ ref.T, rtol=1e-5, atol=1e-6)


def test_check_rows_spread_covers_first_and_last_tile():
    tiles, rows = LU.check_rows(4096, max_tiles=4)
    assert tiles == [0, 42, 85, 127] and len(rows) == 128 and int(rows[-1]) == 4095
    tiles, rows = LU.check_rows(100, max_tiles=4)  # 4 tiles, the last partial: every row
    assert tiles == [0, 1, 2, 3] and torch.equal(rows, torch.arange(100))
    tiles, rows = LU.check_rows(1000, max_tiles=2)
    assert tiles == [0, 31] and rows.tolist() == list(range(32)) + list(range(992, 1000))


def test_bench_lut_row_subset_check_on_padded_rows():
    be = _lut_backend()
    # N=1000: 32 tiles, the last one partial; force the subset check with check_all_weights=0
    rows = LU.bench_lut(1000, 64, [(LU.lut(2, 32), 2), (LU.TORCH_BF16, 2)], backend=be, repeats=2,
                        warmup=1, target_bytes=1 << 14, max_buffers=2, check_all_weights=0,
                        check_tiles=3)
    assert all(r["check"] == "ok" and r["check_rows"] == 2 * 32 + 8 for r in rows), rows


def test_report_renders_lut_rows(tmp_path, monkeypatch):
    be = _lut_backend()

    def tiny_lut(ctx):
        rows = LU.bench_lut(64, 128, [(LU.lut(4), 1), (LU.TORCH_BF16, 1)], backend=be, repeats=2,
                            warmup=1, target_bytes=1 << 14, max_buffers=2,
                            bandwidth_GB_s=ctx.bandwidth_GB_s, suite="lut-tiny")
        return {"rows": rows, "notes": [LU.llamacpp_note()], "targets": []}

    monkeypatch.setattr(A, "SUITES", [])
    monkeypatch.setattr(LU, "SUITES", [("lut-1", "tiny lut", tiny_lut)])
    monkeypatch.setattr(KV, "SUITES", [])
    report.run_report(str(tmp_path), probe_size_bytes=1 << 20, log=lambda *a: None)
    md = (tmp_path / "report.md").read_text()
    assert "weight GB/s" in md and "| lut4 |" in md and "QUOTED" in md and "LUTWeight.nbytes" in md
    data = json.loads((tmp_path / "report.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["lut4", "torch_bf16"]


# --------------------------------------------------------------------------------------------
# quantized KV cache benchmark (bench/kvquant.py) on tiny shapes



def _fused_kernel_built():
    try:
        from pykernels import _C
        return hasattr(_C, "decode_attention_kv")
    except ImportError:
        return False


def test_kv_bytes_read_formula():
    # int4 g32, Hkv=2, D=64: K: 64*4/8 codes + 2 fp16 (scale, zero) per channel per 32 tokens;
    # V: 32 codes + 2 fp16 per group of 32 channels per token; fp rows bf16
    per_tok = 2 * ((32 + 4 * 64 / 32) + (32 + 4 * 2))
    assert KV.kv_bytes_read(4, 1, 64, 50, 32, 2, 64) == round(64 * per_tok) + 51 * 2 * 64 * 2 * 2
    assert KV.kv_bytes_read("fp8", 0, 96, 0, 32, 2, 64) == round(96 * 2 * 2 * (64 + 4 / 32))
    assert KV.kivi_split(1000, 32, 128, 1) == (1, 896, 103)
    assert KV.kivi_split(100, 32, 128, 0) == (0, 0, 100)
    assert [KV.parse_format(f) for f in ("int8", "4", 2, "FP8")] == [8, 4, 2, "fp8"]
    with pytest.raises(ValueError):
        KV.parse_format("int3")


def test_bench_kv_rows_on_tiny_shapes():
    L, Hkv, D = 300, 2, 64
    rows = KV.bench_kv(L, (4, "fp8"), heads_q=4, heads_kv=Hkv, head_dim=D, kinds=("fused", "bf16", "dequant_sdpa"),
                       repeats=2, warmup=1, min_repeats=1, target_bytes=1 << 16, max_buffers=2,
                       bandwidth_GB_s=10.0, time_budget_s=0.5, suite="smoke")
    by = {r["method"]: r for r in rows}
    assert set(by) == {"bf16", "kv-int4", "dequant_sdpa-int4", "kv-fp8", "dequant_sdpa-fp8"}
    split = KV.kivi_split(L, 32, 128, 0)
    for r in rows:
        assert r["kv_table"] == "speed" and r["label"] == "B=1 Hq=4 Hkv=2 D=64 L=300"
        if r["kind"] == "bf16":
            assert r["kv_bytes"] == L * Hkv * D * 2 * 2
        else:
            assert r["kv_bytes"] == KV.kv_bytes_read(4 if r["format"] == "int4" else "fp8", *split, 32, Hkv, D)
            assert r["mem_bytes_per_token"] > 0
        assert r["bytes"] == r["kv_bytes"] + 2 * 4 * D * 2
        if r["kind"] == "fused" and not _fused_kernel_built():
            assert "median_ms" not in r and "not available" in r["error"]  # no fake numbers
            continue
        assert "error" not in r, r.get("error")
        assert r["check"] == "ok", (r["method"], r.get("max_abs_err"))
        assert _finite_pos(r["median_ms"]) and r["pct_bw"] == pytest.approx(100 * r["GB_s"] / 10.0)
        assert r["GB_s"] == pytest.approx(r["bytes"] / (r["median_ms"] / 1e3) / 1e9)
    if _fused_kernel_built():
        f = by["kv-int4"]
        assert f["speedup"]["vs_bf16"] == pytest.approx(by["bf16"]["median_ms"] / f["median_ms"])
        assert f["speedup"]["vs_dequant_sdpa"] == pytest.approx(by["dequant_sdpa-int4"]["median_ms"] / f["median_ms"])
    assert "kv-int4" in KV.format_speed(rows)
    json.dumps(rows, default=str)


def test_bench_kv_hf_baseline_or_clear_skip():
    ok, why = KV.hf_status()
    # fp8 (Fp8QuantizedLayer) and int8 only: quanto's int4/int2 path JIT-compiles a C++ extension on
    # its first use (~45 s on a fresh machine), which the benchmark's warm-up absorbs but a test should not
    rows = KV.bench_kv(160, ("fp8", 8), heads_q=4, heads_kv=2, head_dim=64, kinds=("hf",), repeats=2, warmup=1,
                       min_repeats=1, target_bytes=1 << 16, time_budget_s=0.5, bandwidth_GB_s=10.0)
    by = {r["method"]: r for r in rows}
    assert "median_ms" not in by["hf-int8"]  # no 8-bit HF KV backend here: said, not faked
    if not ok:
        assert by["hf-fp8"]["error"].startswith("not available") and "pip install" in by["hf-fp8"]["error"]
    else:
        assert _finite_pos(by["hf-fp8"]["median_ms"]), by["hf-fp8"].get("error")
        assert "Fp8QuantizedLayer" in by["hf-fp8"]["impl"] and "int8" in by["hf-int8"]["error"]


def test_kv_memory_rows():
    rows = KV.memory_rows(4096, (8, 4, 2, "fp8"), heads_kv=8, head_dim=128)
    by = {r["format"]: r for r in rows}
    assert by["bf16"]["bytes_per_token"] == 4096
    # store: int4 = 8 heads x (64 + 64*4/32*... ) = 1280 B; plus the bf16 residual window amortized
    assert by["int4"]["store_bytes_per_token"] == 1280 and by["int2"]["store_bytes_per_token"] == 768
    for f in ("int8", "int4", "int2", "fp8"):
        assert by[f]["store_bytes_per_token"] < by[f]["bytes_per_token"] < by[f]["store_bytes_per_token"] + 300
        assert by[f]["vs_bf16"] == pytest.approx(4096 / by[f]["bytes_per_token"])
    assert "int2" in KV.format_memory(rows)


def test_cli_kv_writes_json(tmp_path, capsys):
    out = tmp_path / "kv.json"
    rc = cli.main(["kv", "--seqlens", "200", "--heads-q", "4", "--heads-kv", "2", "--head-dim", "64",
                   "--formats", "int2", "--method", "fused,bf16", "--bandwidth", "10", "--repeats", "2",
                   "--time-budget", "0.2", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["rows"]] == ["bf16", "kv-int2"]
    assert data["rows"][0]["GB_s"] > 0
    assert "kv-int2" in capsys.readouterr().out
    for bad in (["--formats", "int3"], ["--method", "fast"], ["--group-size", "48"], ["--residual", "40"]):
        with pytest.raises(SystemExit):
            cli.main(["kv", "--bandwidth", "1"] + bad)


def test_cli_kv_accuracy(capsys):
    rc = cli.main(["kv", "--accuracy", "--acc-len", "512", "--acc-queries", "1", "--formats", "int4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "rtn-token" in text and "kivi-s1" in text and "KIVI never worse" in text


def test_report_renders_kv_rows(tmp_path, monkeypatch):

    def tiny_kv(ctx):
        rows = KV.bench_kv(200, (4,), heads_q=4, heads_kv=2, head_dim=64, kinds=("bf16", "dequant_sdpa"),
                           repeats=2, warmup=1, min_repeats=1, target_bytes=1 << 14, max_buffers=2,
                           time_budget_s=0.2, bandwidth_GB_s=ctx.bandwidth_GB_s, suite="kv-tiny")
        rows += KV.memory_rows(512, (4,), heads_kv=2, head_dim=64)
        data = KV.synthetic_kv(256, 2, 64, 2, 1, seed=3)
        rows += KV.accuracy_rows(data, (4,), group_sizes=(32,), sinks=(0,))
        return {"rows": rows, "notes": ["kv tiny"], "targets": []}

    monkeypatch.setattr(A, "SUITES", [])
    monkeypatch.setattr(LU, "SUITES", [])
    monkeypatch.setattr(KV, "SUITES", [("kv-1", "tiny kv", tiny_kv)])
    report.run_report(str(tmp_path), probe_size_bytes=1 << 20, log=lambda *a: None)
    md = (tmp_path / "report.md").read_text()
    assert "| dequant_sdpa-int4 |" in md and "bytes/token/layer" in md and "| rtn-token |" in md
    assert "Quantized KV (suites kv-*)" in md and "kv tiny" in md
    data = json.loads((tmp_path / "report.json").read_text())
    assert {r["kv_table"] for r in data["rows"]} == {"speed", "memory", "accuracy"}


@pytest.mark.parametrize("bits", [8, 4, 2, "fp8"])
def test_kv_dequantize_dense_baseline_matches_the_cache(bits):
    """The dequantize-then-SDPA baseline dequantizes exactly what the cache holds."""
    import pykernels as pk
    from bench.kvquant import dequantize_dense

    c = pk.QuantizedKVCache(2, 500, 2, 64, bits=bits, residual=64, sink=3)
    c.append(torch.randn(2, 300, 2, 64), torch.randn(2, 300, 2, 64))
    k, v = dequantize_dense(c, torch.float32)
    rk, rv = c.dequantize()
    assert torch.equal(k, rk.transpose(1, 2)) and torch.equal(v, rv.transpose(1, 2))


def test_bench_gpu_without_a_gpu_says_so_and_formats_rows():
    """bench.gpu (the GPU suite: kernel time vs per-call time) refuses clearly without a GPU; its
    table shows both times, GB/s and % of HBM, and a case that could not run with its reason."""
    from bench import gpu

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            gpu.main([])
    doc = {"device": "GPU X", "torch": "2.x", "probe": {"mem_bandwidth": {"read": 2.5e12}},
           "rows": [dict(group="attention L=16k", name="pk triton split", bytes=64 << 20, kernel_us=40.0,
                         call_us=400.0, kernel_GB_s=1677.7, pct_hbm=67.1),
                    dict(group="attention L=16k", name="pk cuda lean", bytes=64 << 20,
                         error="NotImplementedError: no backend"),
                    dict(group="lut", name="torch linear bf16", bytes=None, kernel_us=43.5, call_us=45.6)]}
    text = gpu.format_rows(doc)
    assert "HBM read 2.50 TB/s" in text
    assert re.search(r"pk triton split\s+40\.0\s+400\.0\s+1678\s+67\.1", text), text
    assert "pk cuda lean                 not run: NotImplementedError: no backend" in text
    assert re.search(r"torch linear bf16\s+43\.5\s+45\.6\s+-\s+-", text), text


def test_report_places_the_gpu_suite_on_the_gpu_roofline(tmp_path, monkeypatch):
    """bench.report with the GPU suite (bench.gpu): its rows (device "cuda") go on a roofline of the
    measured GPU profile beside the CPU's, and report.md gets the kernel / per-call table. The GPU
    run itself is faked (no GPU here): a run() document of the shape bench.gpu.run returns."""
    from bench import gpu as G
    from roofline import MachineProfile

    prof = MachineProfile("GPU X", {"bf16": 6.8e14, "fp32": 5.2e13}, {"read": 2.6e12, "copy": 3.0e12, "triad": 3.0e12},
                          links={"h2d_pinned": 5.3e10}, source="measured")
    doc = {"device": "GPU X", "torch": "2.x", "probe": prof.to_dict(), "rows": [
        dict(group="attention L=16k", name="pk triton split", bytes=64 << 20, flops=4 * 32 * 16384 * 128,
             kernel_us=30.0, call_us=300.0, kernel_GB_s=2237.0, pct_hbm=86.0,
             kernels=[{"name": "_split_kernel", "us": 27.0}, {"name": "_split_merge_kernel", "us": 3.0}]),
        dict(group="attention L=16k", name="torch sdpa", bytes=64 << 20, flops=4 * 32 * 16384 * 128,
             kernel_us=29.0, call_us=47.0, kernels=[]),
        dict(group="attention L=16k", name="pk cuda lean", bytes=64 << 20, flops=1, error="RuntimeError: x")]}

    def fake_suite(ctx):
        return {"rows": G.rows_for_report(doc), "targets": [], "notes": ["faked"], "gpu_machine": doc["probe"]}

    monkeypatch.setattr(G, "SUITES", [("gpu-1", "GPU kernels", fake_suite)])
    monkeypatch.setattr(A, "SUITES", [])
    monkeypatch.setattr(LU, "SUITES", [])
    monkeypatch.setattr(KV, "SUITES", [])
    report.run_report(str(tmp_path), probe_size_bytes=1 << 20, log=lambda *a: None, suites=["gpu"])
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data["machines"]) == {"cpu", "cuda"} and data["machines"]["cuda"]["name"] == "GPU X"
    pts = [p for p in data["points"] if p["device"] == "cuda"]
    assert {p["method"] for p in pts} == {"pk triton split", "torch sdpa"}  # the failed case has no point
    split = next(p for p in pts if p["method"] == "pk triton split")
    assert split["seconds"] == pytest.approx(30e-6)
    md = (tmp_path / "report.md").read_text()
    assert "| attention L=16k | pk triton split | 30.0 | 300.0 | 2237 | 86.0 | _split_kernel 27.0, _split_merge_kernel 3.0 |" in md
    assert "| attention L=16k | pk cuda lean | not run | | | | RuntimeError: x |" in md
    assert "GPU X" in (tmp_path / "index.html").read_text()
