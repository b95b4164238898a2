"""Roofline columns of benchmark rows (bench/roof.py): attainable time, efficiency, bound.

Tiny shapes; the quick roofline probe (~1-2 s) runs once per module into a temporary
XDG_CACHE_HOME so its cache never leaks into the user's.
"""
import json

import pytest

import roofline
from bench import attention as A
from bench import cli, report
from bench import kvquant as KV
from bench import lut as LU
from bench import roof


# run_report() here runs only the suites a test sets (see conftest.no_full_size_suites)
pytestmark = pytest.mark.usefixtures("no_full_size_suites")


BW = 10.0  # GB/s: the "run's probe figure" both % bw and the memory roof use
PROBE = {"bandwidth_GB_s": BW, "read_GB_s": BW, "triad_GB_s": 9.0}


@pytest.fixture(scope="module", autouse=True)
def cache_home(roofline_cache_home):
    return roofline_cache_home


@pytest.fixture(scope="module")
def machine(cache_home):
    return roof.machine_for_run(PROBE)


def _check_roof_rows(rows):
    """Every timed row has the columns; a memory-bound row's efficiency is its % bw / 100."""
    timed = [r for r in rows if "median_ms" in r]
    assert timed
    for r in timed:
        assert r["attainable_ms"] > 0 and 0 < r["efficiency"], r
        assert r["bound"] in ("memory", "compute")
        assert r["efficiency"] == pytest.approx(r["attainable_ms"] / r["median_ms"], rel=1e-9)
        if r["bound"] == "memory":
            assert abs(r["efficiency"] - r["pct_bw"] / 100) < 1e-6, r
    json.dumps(rows, default=str)
    return timed


def test_machine_for_run_takes_the_runs_bandwidth(machine):
    base = roofline.probe(device="cpu", quick=True)  # cached by the fixture above
    assert machine.mem_bandwidth["read"] == BW * 1e9 and machine.mem_bandwidth["triad"] == 9.0e9
    assert machine.mem_bandwidth["copy"] == base.mem_bandwidth["copy"]  # the run has no copy figure
    assert machine.peak_flops == base.peak_flops and "probe_memory_bandwidth" in machine.notes
    assert roof.machine_for_run(None, bandwidth_GB_s=40.0).mem_bandwidth["read"] == 40e9  # --bandwidth
    assert roof.compute_dtype("fp16", machine) in ("fp16", "bf16")


def test_attention_rows_carry_roofline_columns(machine):
    cfg = A.AttnConfig(2, 4, 2, 32, [33, 33], "fp32")  # ~1 FLOP/byte: memory-bound at 10 GB/s
    rows = A.bench_attention(cfg, ("lean", "sdpa", "reference"), repeats=3, warmup=1, min_repeats=2,
                             target_bytes=1 << 20, max_buffers=4, bandwidth_GB_s=BW, suite="smoke",
                             machine=machine)
    timed = _check_roof_rows(rows)
    assert any(r["bound"] == "memory" for r in timed)
    r = timed[0]
    assert r["attainable_ms"] == pytest.approx(r["bytes"] / (BW * 1e9) * 1e3)
    assert f"{100 * r['efficiency']:6.1f}" in A.format_rows(rows) and "roof%" in A.format_rows(rows)


def test_lut_and_kv_rows_carry_roofline_columns(machine):
    from pykernels import _C
    assert hasattr(_C, "lut_gemv"), "pykernels._C has no lut_gemv: stale build"
    rows = LU.bench_lut(64, 256, [(LU.lut(4, 128), 1), (LU.TORCH_BF16, 1)], backend="cpu", repeats=2,
                        warmup=1, min_repeats=1, target_bytes=1 << 14, max_buffers=2, bandwidth_GB_s=BW,
                        machine=machine)
    _check_roof_rows(rows)
    assert "roof%" in LU.format_rows(rows)
    rows = KV.bench_kv(200, (4,), heads_q=4, heads_kv=2, head_dim=64, kinds=("bf16", "dequant_sdpa"),
                       repeats=2, warmup=1, min_repeats=1, target_bytes=1 << 14, max_buffers=2,
                       time_budget_s=0.2, bandwidth_GB_s=BW, machine=machine)
    _check_roof_rows(rows)
    assert all(r["flops"] == 4 * 200 * 4 * 64 for r in rows)
    assert "roof%" in KV.format_speed(rows)


def test_probe_failure_leaves_rows_without_columns(monkeypatch, capsys):
    def broken(**kw):
        raise RuntimeError("no probe here")

    monkeypatch.setattr(roofline, "probe", broken)
    m, note = roof.run_machine(PROBE)
    assert m is None and "no probe here" in note
    rows = A.bench_attention(A.AttnConfig(1, 4, 2, 16, [9], "fp32"), ("reference",), repeats=2, warmup=1,
                             min_repeats=1, target_bytes=1 << 16, max_buffers=2, bandwidth_GB_s=BW,
                             machine=m)
    assert "median_ms" in rows[0] and "efficiency" not in rows[0]
    assert report._md_table(rows)[2].count("| - | - |") == 1
    assert cli.main(["attention", "--seqlens", "9", "--heads-q", "4", "--heads-kv", "2", "--head-dim", "16",
                     "--dtype", "fp32", "--method", "reference", "--bandwidth", "10", "--repeats", "2"]) == 0
    assert "no roofline columns" in capsys.readouterr().out


def test_report_and_cli_show_roofline_columns(tmp_path, monkeypatch, capsys):
    def tiny_suite(ctx):
        cfg = A.AttnConfig(1, 4, 1, 16, [20], "fp32")
        return {"rows": A._run_config(ctx, "tiny", cfg, ("reference",), repeats=2, check=False),
                "targets": [], "notes": []}

    monkeypatch.setattr(A, "SUITES", [("tiny-1", "tiny", tiny_suite)])
    monkeypatch.setattr(LU, "SUITES", [])
    monkeypatch.setattr(KV, "SUITES", [])
    rep = report.run_report(str(tmp_path), probe_size_bytes=1 << 20, log=lambda *a: None)
    assert rep["roofline"]["machine"]["mem_bandwidth"]["read"] == rep["probe"]["bandwidth_GB_s"] * 1e9
    _check_roof_rows(rep["rows"])
    md = (tmp_path / "report.md").read_text()
    assert "| roof ms | eff % |" in md and "Roofline:" in md
    out = tmp_path / "rows.json"
    assert cli.main(["attention", "--seqlens", "9", "--heads-q", "4", "--heads-kv", "2", "--head-dim", "16",
                     "--dtype", "fp32", "--method", "reference", "--bandwidth", "10", "--repeats", "2",
                     "--json", str(out)]) == 0
    assert "roof%" in capsys.readouterr().out
    data = json.loads(out.read_text())
    _check_roof_rows(data["rows"])
    assert data["roofline"]["machine"]["mem_bandwidth"]["read"] == 10e9
