"""bench.probe_check on small sizes: keys, argument checks, ratio and target arithmetic.

Correctness only: nothing here asserts a speed or that the probe agrees with numpy.
"""
import math

import pytest

from bench import probe_check as PC
from bench.attention import BenchContext

SMALL = 64 << 20  # bytes per array: large enough to leave L2, small enough to be quick


def _finite_pos(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("threads", [1, 2])
def test_measure_numpy_bandwidth_small(threads):
    r = PC.measure_numpy_bandwidth(SMALL, threads=threads, repeats=2)
    for k in ("read_GB_s", "copy_GB_s", "read_1thread_GB_s"):
        assert _finite_pos(r[k]), (k, r[k])
    assert r["threads"] == threads and r["size_bytes"] == SMALL and r["repeats"] == 2
    assert isinstance(r["method"], str) and "\n" not in r["method"]
    assert not any("wrong" in w for w in r["warnings"]), r["warnings"]


def test_measure_numpy_bandwidth_rounds_size_to_elements():
    assert PC.measure_numpy_bandwidth((1 << 20) + 5, threads=1, repeats=1)["size_bytes"] == 1 << 20


@pytest.mark.parametrize("bad, name", [(dict(size_bytes=0), "size_bytes"), (dict(size_bytes=-8), "size_bytes"),
                                       (dict(threads=0), "threads"), (dict(threads=-1), "threads"),
                                       (dict(repeats=0), "repeats")])
def test_measure_numpy_bandwidth_rejects_bad_arguments(bad, name):
    kw = dict(size_bytes=1 << 20, threads=1, repeats=1)
    kw.update(bad)
    with pytest.raises(ValueError, match=name):
        PC.measure_numpy_bandwidth(**kw)


def test_default_size_is_far_larger_than_llc():
    llc = PC.llc_bytes()
    full, quick = PC.default_size_bytes(), PC.default_size_bytes(quick=True)
    assert full % 8 == 0 and quick % 8 == 0 and quick <= full
    mem = PC._mem_total_bytes()
    if mem is None or mem // 16 >= 8 * llc:  # not capped by a small machine's memory
        assert full >= 8 * llc and quick >= 4 * llc


@pytest.fixture(scope="module")
def suite_result(monkeypatch_module):
    """The suite on tiny arrays: quick mode, sizes shrunk to 16 MiB so it takes a second."""
    monkeypatch_module.setattr(PC, "default_size_bytes", lambda quick=False: 16 << 20)
    logged = []
    ctx = BenchContext(bandwidth_GB_s=None, quick=True, probe={"threads": 1}, log=logged.append)
    return PC.suite_probe_check(ctx), logged


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_suite_rows_ratio_is_probe_over_numpy(suite_result):
    res, logged = suite_result
    assert [r["label"] for r in res["rows"]] == ["read", "copy (2 arrays)", "read, 1 thread"]
    for r in res["rows"]:
        assert {"label", "method", "probe_GB_s", "numpy_GB_s", "ratio"} <= set(r)
        assert _finite_pos(r["probe_GB_s"]) and _finite_pos(r["numpy_GB_s"])
        assert r["ratio"] == r["probe_GB_s"] / r["numpy_GB_s"]
        assert len(r["round_ratios"]) == 5  # quick: 5 interleaved rounds
        assert r["round_ratios"] == [p / m for p, m in zip(r["probe_rounds_GB_s"], r["numpy_rounds_GB_s"])]
        assert r["probe_size_bytes"] == r["numpy_size_bytes"] == 16 << 20
    assert res["rows"][0]["threads"] == 1  # the thread count came from ctx.probe
    assert any("probe GB/s" in line for line in logged)  # the table went to ctx.log


def test_suite_targets_are_percent_deviation(suite_result):
    res, _ = suite_result
    assert len(res["targets"]) == 2
    for t, r in zip(res["targets"], res["rows"]):
        assert t["value"] == 100 * abs(r["ratio"] - 1)
        assert t["op"] == "<=" and t["threshold"] == 15.0
        assert t["passed"] == (t["value"] <= 15.0)
        assert t["status"] == ("PASS" if t["passed"] else "MISS")
        assert f"{t['value']:.1f}%" in t["text"] and "numpy" in t["text"]
    assert any("fresh probe" in n for n in res["notes"])


def test_format_rows_and_suite_registration(suite_result):
    res, _ = suite_result
    text = PC.format_rows(res["rows"])
    assert len(text.splitlines()) == 1 + len(res["rows"])
    assert f"{res['rows'][0]['ratio']:.3f}" in text
    assert [s[0] for s in PC.SUITES] == ["probe-1"] and PC.SUITES[0][2] is PC.suite_probe_check
