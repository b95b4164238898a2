"""bench/kvtier.py (issue 7's benchmark) in its quick form: the small preset, 2048 tokens of KV
on disk in pages of 256. Checks that it runs, reads what it says from disk, and that its figures
are consistent; speed is the benchmark's business (``make report``), not asserted here."""
from types import SimpleNamespace

from bench import kvtier as KB
from bench.report import _md_table_kvtier


def test_quick_kvtier_suite(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    res = KB.suite_kvtier(SimpleNamespace(quick=True, log=lambda *a: None, machine=None))
    rows = {r["label"]: r for r in res["rows"]}
    b16, b4 = rows["bf16 pages on disk"], rows["int4 pages on disk"]
    # every page on disk: the small preset's 4 layers x 8 pages of 256 tokens
    assert b16["kv_disk_bytes"] == 4 * 8 * 256 * 2 * 2 * 32 * 2  # x (K, V) x 2 kv heads x dim 32 x bf16
    assert 3 < b16["kv_disk_bytes"] / b4["kv_disk_bytes"] < 4  # int4 + scales vs bf16
    for r in (b16, b4):
        assert len(r["step_s"]) == 3 and all(s > 0 for s in r["step_s"]) and r["bound_ratio"] > 0
    ap = [r for r in res["rows"] if "fraction" in r]
    assert [r["fraction"] for r in ap] == [0.25, 1.0]
    assert ap[-1]["disk_bytes_per_step"] == b16["kv_disk_bytes"] and ap[-1]["cosine_min"] > 0.999
    assert ap[0]["disk_bytes_per_step"] == 4 * 2 * b16["kv_disk_bytes"] // (4 * 8)  # 2 of 8 pages per layer
    names = [t["name"] for t in res["targets"]]
    assert any(n.startswith("offload-kv-1") for n in names) and any(n.startswith("offload-kv-2") for n in names)
    assert len(_md_table_kvtier(res["rows"])) == 2 + len(res["rows"])
    assert not list((tmp_path / "pykernels" / "kv-pages").iterdir())  # page files removed
