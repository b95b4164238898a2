"""bench/offload.py (issue 6's benchmark) in its quick form: the small preset under a 12 MiB
budget (12 MiB), every configuration in its own subprocess. Checks that each configuration runs, that the
figures are consistent with each other, and that the budget held; speed is the benchmark's
business (``make report``), not asserted here."""
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from bench import offload as OB  # noqa: E402

_MiB = 1 << 20


def test_quick_offload_suite(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    res = OB.suite_offload(SimpleNamespace(quick=True, log=lambda *a: None, machine=None))
    rows = {r["label"]: r for r in res["rows"]}
    assert set(rows) == {"bf16 stream", "4-bit stream", "accelerate", "bf16 in memory"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and len(r["step_s"]) >= 2
    b16, b4, acc, mem = (rows[k] for k in ("bf16 stream", "4-bit stream", "accelerate", "bf16 in memory"))
    # the same bf16 weights in memory and streamed compute the same greedy tokens, bit for bit
    assert b16["tokens"] == mem["tokens"][:len(b16["tokens"])]
    # streaming read something from disk every step, O_DIRECT, and stayed within the budget
    assert b16["streamed_units"] > 0 and b16["disk_bytes_per_step"] > 0 and b16["read_mode"] == "direct"
    assert mem["streamed_units"] == 0
    for r in (b16, b4):
        assert r["planned_bytes"] <= 12 * _MiB
        assert r["rss_over_base"] <= 12 * _MiB + 32 * _MiB, r
        # O_DIRECT reads reach the device: /proc/self/io counts at least the streamed bytes
        if r["device_bytes_per_forward"] is not None:
            assert r["device_bytes_per_forward"] >= 0.9 * (r["disk_bytes_per_step"] - 8 * _MiB)
    names = {t["name"].split(" ")[0] for t in res["targets"]}
    assert {"offload-1", "offload-2", "offload-3"} <= names <= {"offload-1", "offload-2", "offload-3", "offload-4"}
    for t in res["targets"]:
        assert t["value"] is not None and (t["value"] > 0 or t["name"].startswith("offload-4"))
        assert t["status"] in ("PASS", "MISS", "MISS (within noise)")
    assert any("cold read bandwidth" in n for n in res["notes"])
    # the prefill comparison: one pass over the layers per chunk, each reading the streamed layers once
    for key, r in res["prefill"].items():
        assert "error" not in r, r
        assert r["prefill_chunk"] == 64 or key == "auto"
        assert r["passes"] == -(-128 // r["prefill_chunk"]) and r["prefill_tokens_per_s"] > 0
        assert r["passes"] * r["streamed_bytes"] - 8 * _MiB <= r["read_bytes"] <= r["passes"] * r["streamed_bytes"] + 8 * _MiB
        assert r["planned_bytes"] <= 12 * _MiB and r["peak_rss"] - r["base_rss"] <= 12 * _MiB + 32 * _MiB, r
    assert any(n.startswith("prefill of a 128-token prompt") for n in res["notes"])
    assert os.path.isdir(os.path.join(str(tmp_path), "pykernels", "offload"))
