"""bench.advisor on tiny shapes: every configuration is measured, the advisor's pick is marked,
and the target is t(best) / t(pick) over the timed rows (bench/ measures the real shapes)."""

import os

import pytest

from bench import advisor as AD
from bench import attention as A
from bench import lut as LU
from roofline import MachineProfile

MACHINE = MachineProfile("toy", {"bf16": 8e11, "int8": 1.7e12, "fp32": 2e11},
                         {"read": 4e10, "copy": 4e10, "triad": 4e10, "read_1thread": 2.7e10},
                         source="measured")


def _ctx():
    return LU.LutContext(bandwidth_GB_s=40.0, repeats=2, quick=True, target_bytes=1 << 16,
                         machine=MACHINE, log=lambda *a: None, time_budget_s=0.5)


def _check(res, pick_count):
    rows = [r for r in res["rows"] if "median_ms" in r]
    picks = [r for r in rows if r["advisor_pick"]]
    assert len(picks) == pick_count
    t = res["targets"][0]
    ratios = []
    for p in picks:
        same = [r for r in rows if r["label"] == p["label"] and r.get("M") == p.get("M") and r["method"] != "auto"]
        ratios.append(min(r["median_ms"] for r in same) / p["median_ms"])
    assert t["value"] == pytest.approx(min(ratios))
    if min(ratios) >= 0.95:
        assert t["status"] == "PASS"
    else:
        assert t["status"].startswith("MISS")
    assert all(n.startswith(("Advisor:", "Schedules:", "Recorded as", "Not recorded")) or "ratio" in n
               for n in res["notes"])


def test_attention_suite(monkeypatch, tmp_path):
    from roofline import autotune

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the sweep's timings are recorded there
    monkeypatch.setattr(autotune, "_MEMO", {})
    cases = [A.AttnConfig(3, 4, 1, 16, [700, 64, 30], "fp32"), A.AttnConfig(2, 4, 2, 16, [256, 256], "fp32")]
    monkeypatch.setattr(AD, "attention_cases", lambda quick: cases)
    monkeypatch.setattr(AD, "busy_note", lambda rows: None)  # recorded whatever else runs here
    res = AD.suite_advisor_attention(_ctx())
    _check(res, 2)
    # every configuration's timings are recorded as autotune results for its shape bucket
    monkeypatch.setenv("PYKERNELS_AUTOTUNE", "1")
    for cfg in cases:
        b = autotune.decode_bucket(cfg.seqlens, cfg.heads_q, cfg.heads_kv, cfg.head_dim, cfg.elt_size,
                                   res["rows"][0]["threads"], "cpu")
        e = autotune.lookup("decode_attention", b)
        timed = {r["method"]: r["median_ms"] / 1e3 for r in res["rows"]
                 if r["label"] == cfg.label() and r["method"] != "auto"}
        assert e["timings"] == pytest.approx(timed) and e["best"] == min(timed, key=timed.get)
    methods = {r["method"] for r in res["rows"] if r["label"] == cases[0].label()}
    # lean, split S up to the 11 tiles of the longest sequence, and auto itself
    assert methods == {"lean", "split1", "split2", "split4", "split8", "auto"}
    assert any("lean gives each" in n or "splits per" in n or "one chunk per" in n for n in res["notes"])


def test_attention_suite_records_nothing_measured_on_a_busy_machine(monkeypatch, tmp_path):
    from roofline import autotune

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(autotune, "_MEMO", {})
    cases = [A.AttnConfig(2, 4, 2, 16, [256, 256], "fp32")]
    monkeypatch.setattr(AD, "attention_cases", lambda quick: cases)
    monkeypatch.setattr(AD, "busy_note", lambda rows: "machine busy: other processes used up to 60% of the CPUs")
    res = AD.suite_advisor_attention(_ctx())
    assert not os.path.exists(autotune.path())
    assert any(n.startswith("Not recorded as autotune results, the machine being busy") and cases[0].label() in n
               for n in res["notes"])


def test_lut_suite(monkeypatch):
    monkeypatch.setattr(AD, "DOWN_PROJ", (64, 256))
    res = AD.suite_advisor_lut(_ctx())
    _check(res, 2)  # quick: M = 1 and 16
    assert {r["method"] for r in res["rows"]} == {"lut4", "dequant4"}


def test_report_advice():
    recs, preds, notes = AD.report_advice(MACHINE, 2)
    assert [r.topic.split(",")[0].split(" B=")[0] for r in recs] == \
        ["decode attention", "decode attention", "KV format", "LUT-GEMV", "placement"]
    assert all(r.reason.endswith(".") and r.choice for r in recs)
    assert len(preds) == 6 and {p["machine"] for p in preds} == {"toy", "A100-80GB-SXM", "H100-SXM"}
    assert all(p["model"] == "Llama-3-8B" and p["time_s"] > 0 for p in preds)
    assert "not measurements" in notes[-1]
    # the advisor's memoised Advice objects keep their own topic
    again = AD.advise_schedule([16384], 8, 2, num_heads=32, head_dim=128, dtype_bytes=2, machine=MACHINE)
    assert again.topic == "decode_attention"
