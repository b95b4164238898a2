"""roofline.report: index.html / report.md / report.json, checked as files and as a rendered page.

The page test renders ``index.html`` in headless Chromium (Debian's ``chromium``; ``make test``
installs it when missing) to a PNG and checks that charts and tables are there: the DOM has the
expected headings, chart SVGs with axis titles and point labels, and table rows; the screenshot
has ink (non-white pixels) where the charts are and coloured marks (the points).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("matplotlib")  # a report extra; make test installs it (pyproject [test])

from roofline import MachineProfile, get_machine, report  # noqa: E402
from roofline.report import collect_points  # noqa: E402

TOY = MachineProfile("toy-cpu", {"bf16": 1e12, "fp32": 2.5e11},
                     {"read": 4e10, "copy": 3e10, "triad": 3e10}, source="measured", notes="probe")


def _rows():
    """Two families, pykernels kernels and a baseline; one memory-bound, one compute-bound."""
    return [
        # 1e6 FLOPs, 4e7 bytes: memory roof 1 ms; measured 2 ms -> 50%
        {"label": "L=4096", "method": "lean", "median_ms": 2.0, "flops": 1e6, "bytes": 4e7,
         "impl": "pk.decode_attention", "suite": "attention-1", "dtype": "bf16"},
        {"label": "L=4096", "method": "sdpa", "median_ms": 8.0, "flops": 1e6, "bytes": 4e7,
         "impl": "F.scaled_dot_product_attention", "suite": "attention-1", "dtype": "bf16"},
        # 4e9 FLOPs at 1e12 = 4 ms; 4e6 bytes = 0.1 ms: compute roof; measured 5 ms -> 80%
        {"label": "M=16", "method": "lut4", "median_ms": 5.0, "flops": 4e9, "bytes": 4e6,
         "impl": "pk.lut_gemv", "suite": "lut-3", "dtype": "bf16"},
        # an fp16 row on a machine without an fp16 peak is placed under bf16
        {"label": "M=1", "method": "lut2", "median_ms": 1.0, "flops": 1e6, "bytes": 2e7,
         "impl": "pk.lut_gemv", "suite": "lut-3", "dtype": "fp16"},
        # not timed (a memory table row): kept out of the points
        {"label": "bytes/token", "method": "int4", "bytes_per_token": 100.0, "suite": "kv-2"},
    ]


def test_points_efficiency_bound_and_baseline():
    pts = collect_points(_rows(), TOY)
    assert len(pts) == 4
    lean, sdpa, lut4, lut2 = pts
    assert lean["efficiency"] == pytest.approx(0.5) and lean["bound"] == "memory"
    assert sdpa["efficiency"] == pytest.approx(0.125) and sdpa["baseline"] and not lean["baseline"]
    assert lut4["efficiency"] == pytest.approx(0.8) and lut4["bound"] == "compute"
    assert lut2["dtype"] == "bf16"
    assert lean["intensity"] == pytest.approx(1e6 / 4e7) and lean["group"] == "attention-1"


def test_points_per_device_and_unknown_device():
    rows = [dict(_rows()[0], device="cuda"), _rows()[2]]
    pts = collect_points(rows, {"cuda": "H100-SXM", "cpu": TOY})
    assert pts[0]["machine"] == "H100-SXM" and pts[1]["machine"] == "toy-cpu"
    h100 = get_machine("H100-SXM")
    assert pts[0]["attainable_seconds"] == pytest.approx(4e7 / h100.mem_bandwidth["read"])
    pts = collect_points([dict(_rows()[0], device="xpu")], {"cuda": "H100-SXM", "cpu": TOY})
    assert "no machine for device 'xpu'" in pts[0]["error"]


def test_report_files(tmp_path):
    recs = [{"topic": "decode attention", "choice": {"method": "lean"}, "reason": "balanced.",
             "predicted_s": 1.2e-3}]
    paths = report(_rows(), TOY, str(tmp_path / "out"), recommendations=recs,
                   statement="no GPU here", notes=["a note"])
    assert set(paths) == {"html", "markdown", "json"}
    page = open(paths["html"]).read()
    # one roofline chart per family with timed FLOP rows, one efficiency chart per suite
    assert page.count('data-chart="roofline"') == 2 and page.count('data-chart="efficiency"') == 2
    assert "arithmetic intensity (FLOP / byte of memory traffic)" in page
    assert "achieved performance (GFLOP/s)" in page
    for label in ("50%", "80%", "12%"):   # points labelled with % of attainable
        assert f">{label}<" in page
    assert "no GPU here" in page and "balanced." in page and "1.200 ms" in page
    assert "src-measured" in page and "a note" in page
    md = open(paths["markdown"]).read()
    assert "| attention-1 | L=4096 | lean | 2.000 | 1.000 | 50.0 | memory |" in md
    assert "| decode attention | method=lean | 1.200 ms | balanced. |" in md
    doc = json.load(open(paths["json"]))
    assert [p["method"] for p in doc["points"]] == ["lean", "sdpa", "lut4", "lut2"]
    assert doc["machines"]["cpu"] == TOY.to_dict()
    assert len(doc["rows"]) == 5  # every row kept, the untimed one too
    assert not any(f.endswith(".tmp" + str(os.getpid())) for f in os.listdir(tmp_path / "out"))


def test_report_of_a_bench_result_dict(tmp_path):
    """bench.report's dict: suites with rows and targets; its keys stay at the JSON top level."""
    res = {"hostname": "h", "suites": [
        {"name": "attention-1", "title": "t", "rows": _rows()[:2],
         "targets": [{"name": "lean % bw", "op": ">=", "threshold": 85.0, "text": "50%", "status": "MISS"}]},
        {"name": "lut-3", "title": "t", "rows": _rows()[2:4], "targets": []}]}
    paths = report(res, TOY, str(tmp_path), extra_markdown="## Details\n\nmore")
    doc = json.load(open(paths["json"]))
    assert doc["hostname"] == "h" and doc["targets"][0]["suite"] == "attention-1"
    assert {p["group"] for p in doc["points"]} == {"attention-1", "lut-3"}
    md = open(paths["markdown"]).read()
    assert "| attention-1 | lean % bw >= 85.0 | 50% | MISS |  |" in md and md.rstrip().endswith("more")
    assert 'class="miss">MISS<' in open(paths["html"]).read()


def test_memory_only_machine_has_no_roofline_chart(tmp_path):
    m = MachineProfile("mem-only", {}, {"read": 4e10, "copy": 4e10, "triad": 4e10}, source="measured")
    paths = report(_rows()[:2], m, str(tmp_path))
    page = open(paths["html"]).read()
    assert 'data-chart="roofline"' not in page and page.count('data-chart="efficiency"') == 1
    pts = json.load(open(paths["json"]))["points"]
    assert pts[0]["efficiency"] == pytest.approx(0.5) and pts[0]["bound"] == "memory"


def test_odd_rows_and_labels(tmp_path):
    """Bad numbers in one row never lose the report; labels are escaped in HTML and charts; the
    JSON is strict (no NaN tokens, numpy scalars as numbers)."""
    import numpy as np

    rows = _rows()[:2] + [
        dict(_rows()[0], method="nan-bytes", bytes=float("nan")),
        dict(_rows()[0], method="inf-flops", flops=float("inf")),
        dict(_rows()[0], method="neg-flops", flops=-5.0),
        dict(_rows()[0], label='<b>"x" & $y_{$', method="np", median_ms=np.float64(2.0), flops=np.int64(10**6)),
        dict(_rows()[0], method="on-gpu0", device="cuda:0"),
    ]
    paths = report(rows, {"cpu": TOY, "cuda": "H100-SXM"}, str(tmp_path))
    doc = json.loads(open(paths["json"]).read())  # strict parse
    by = {p["method"]: p for p in doc["points"]}
    for m in ("nan-bytes", "inf-flops", "neg-flops"):
        assert "not a finite number" in by[m]["error"]
    assert by["np"]["efficiency"] == pytest.approx(0.5) and by["np"]["seconds"] == 2e-3
    assert by["on-gpu0"]["machine"] == "H100-SXM"
    assert "NaN" not in open(paths["json"]).read()
    page = open(paths["html"]).read()
    assert "<b>\"x\"" not in page and "&lt;b&gt;&quot;x&quot; &amp; $y_{$" in page


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="results"):
        report([1.0], TOY, str(tmp_path))
    with pytest.raises(ValueError, match="machine"):
        report(_rows(), "no-such-gpu", str(tmp_path))
    with pytest.raises(ValueError, match="machine"):
        report(_rows(), {}, str(tmp_path))
    with pytest.raises(ValueError, match="out_dir"):
        report(_rows(), TOY, "")


# --------------------------------------------------------------------------------------------
# the page as a user sees it: headless Chromium

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _browser_or_skip() -> str:
    exe = _chromium()
    if exe:
        return exe
    if os.environ.get("PYKERNELS_REQUIRE_CHROMIUM") == "1":
        pytest.fail("chromium is not installed: make test installs Debian's chromium (apt-get, as "
                    "root); install it by hand (apt-get install chromium) where that cannot run")
    pytest.skip("chromium not installed (make test installs it and then requires it)")


def _run_browser(exe: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", "--disable-dev-shm-usage", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_page_renders_in_chromium(tmp_path):
    exe = _browser_or_skip()
    from PIL import Image

    paths = report(_rows(), TOY, str(tmp_path), statement="no GPU here")
    url = "file://" + os.path.abspath(paths["html"])
    dom = _run_browser(exe, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    assert "<h1>Roofline report: toy-cpu</h1>" in text
    assert len(re.findall(r"<svg\b", text)) == 4  # 2 roofline + 2 efficiency charts
    assert "achieved performance (GFLOP/s)" in text and "Every measured row" in text
    assert len(re.findall(r"<tr>", text)) == (1 + 5) + (1 + 4)  # machine table, rows table

    shot = tmp_path / "shot.png"
    r = _run_browser(exe, f"--screenshot={shot}", "--window-size=1280,3600", url)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    im = Image.open(shot).convert("RGB")
    assert im.size == (1280, 3600)
    w, h = im.size
    px = im.load()
    # ink per 300-px band of the page's upper part: headings, tables and charts all draw there
    bands = []
    for y0 in range(0, 2400, 300):
        ink = sum(1 for y in range(y0, y0 + 300, 3) for x in range(0, w, 3) if sum(px[x, y]) < 600)
        bands.append(ink)
    assert sum(b > 200 for b in bands) >= 6, bands
    # coloured marks (chart points and bars), not just black text on white
    colour = sum(1 for y in range(0, h, 2) for x in range(0, w, 2)
                 if max(px[x, y]) - min(px[x, y]) > 80)
    assert colour > 2000, colour


# --------------------------------------------------------------------------------------------
# the CLI: roofline report --out DIR

def test_cli_report(tmp_path, capsys):
    from roofline.cli import main

    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps({"rows": _rows()}))
    cfg = tmp_path / "llama" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=14336, vocab_size=128256)))
    out = tmp_path / "rep"
    assert main(["report", "--out", str(out), "--device", "A100-80GB-SXM", "--results", str(rows),
                 "--model", str(cfg), "--context", "8192", "--threads", "4"]) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    doc = json.load(open(out / "report.json"))
    assert doc["machines"]["cpu"]["name"] == "A100-80GB-SXM" and len(doc["points"]) == 4
    assert [r["topic"] for r in doc["recommendations"]] == ["decode_attention", "kv_format", "lut"]
    assert [a["kv_bits"] for a in doc["analyses"]] == [16, 4] and doc["analyses"][0]["model"] == "llama"
    assert "Predicted for" in doc["report_notes"][0]
    # a GPU's decode attention is planned for its CTAs (2 per SM: 216 on an A100), not for the
    # --threads of this host
    assert "each of 216 workers" in doc["recommendations"][0]["reason"]


def test_decode_workers():
    from roofline.hardware import GPU_SM_COUNT, HARDWARE, decode_workers

    assert decode_workers("H100-SXM") == ("cuda", 264)
    assert decode_workers("MI300X", cpu_threads=3) == ("cuda", 608)
    cpu = MachineProfile("box", {"fp32": 1e11}, {"read": 4e10, "copy": 4e10, "triad": 4e10})
    assert decode_workers(cpu, cpu_threads=3) == ("cpu", 3)
    assert decode_workers(cpu)[1] == (os.cpu_count() or 1)
    gpu = MachineProfile("NVIDIA H100 80GB HBM3 on a host", {"bf16": 6.8e14}, {"read": 2.6e12},
                         links={"h2d_pinned": 5.3e10}, source="measured")
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert decode_workers(gpu) == ("cuda", 2 * sms)
    else:
        with pytest.raises(ValueError, match=r"^machine: .*GPU profile.*H100-SXM"):
            decode_workers(gpu)
    with pytest.raises(ValueError, match=r"^machine: "):
        decode_workers("no-such-gpu")
    assert all(name in HARDWARE for name in GPU_SM_COUNT)


def test_report_of_a_profile_with_a_disk_probe_and_under_an_ascii_locale(tmp_path):
    """probe_disk adds a "method" text beside the bandwidths; files are written as UTF-8
    whatever the locale (matplotlib's tick labels hold a U+2212 minus sign)."""
    m = MachineProfile("box", {"fp32": 1e11}, {"read": 4e10, "copy": 4e10, "triad": 4e10},
                       disk={"/data": {"read": 1.2e9, "write": 1.3e9, "method": "o_direct"}}, source="measured")
    paths = report(_rows(), m, str(tmp_path / "a"))
    assert "o_direct" in open(paths["markdown"], encoding="utf-8").read()
    code = ("import sys, json; sys.path.insert(0, %r); from test_roofline_report import _rows; "
            "from roofline import MachineProfile, report; "
            "m = MachineProfile('box', {'fp32': 1e11}, {'read': 4e10, 'copy': 4e10, 'triad': 4e10}); "
            "report(_rows(), m, %r)") % (os.path.dirname(__file__), str(tmp_path / "b"))
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0",
               PYTHONIOENCODING="ascii")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "b")) == ["index.html", "report.json", "report.md"]  # no temp left


def test_cli_bad_files_and_disk_dirs(tmp_path, capsys):
    from roofline.cli import main

    bad = tmp_path / "cfg.json"
    bad.write_bytes(b"\xff\xfe{not utf-8")
    for argv in (["analyze", "--model", str(bad), "--batch", "1", "--context", "16"],
                 ["report", "--out", str(tmp_path / "r"), "--results", str(bad), "--device", "H100-SXM"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "not valid JSON" in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores the mode bits: a file instead of a folder
            ro.chmod(0o700)
            ro = tmp_path / "plain-file"
            ro.write_text("x")
        with pytest.raises(SystemExit) as e:  # before any measurement
            main(["probe", "--quick", "--disk", str(ro)])
        assert e.value.code == 2 and "--disk" in capsys.readouterr().err
    finally:
        if ro.is_dir():
            ro.chmod(0o700)


@pytest.mark.parametrize("args,match", [
    (["--results", "/no/such.json"], "--results"),
    (["--model", "/no/such/config.json"], "--model"),
    (["--device", "no-such-gpu"], "machine"),
    (["--threads", "0"], "--threads"),
])
def test_cli_report_errors(tmp_path, capsys, args, match):
    from roofline.cli import main

    with pytest.raises(SystemExit) as e:
        main(["report", "--out", str(tmp_path / "r")] + (args if "--device" in args
                                                          else args + ["--device", "H100-SXM"]))
    assert e.value.code == 2 and match in capsys.readouterr().err
