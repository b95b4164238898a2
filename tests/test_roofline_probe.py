"""Measured machine profile (``roofline.probe``), disk probe and the ``roofline`` CLI.

Sanity checks only (positive, finite, consistent), never speed targets: timings are benchmarks.
The quick CPU probe runs once per module; its cache lives in a temporary XDG_CACHE_HOME.
"""

import doctest
import errno
import json
import math
import os

import pytest
import torch

import roofline
from roofline import MachineProfile, measure
from roofline.cli import main
from roofline.probe import probe_memory_bandwidth

MiB = 1 << 20
YI_34B = dict(hidden_size=7168, num_hidden_layers=60, num_attention_heads=56,
              num_key_value_heads=8, head_dim=128, intermediate_size=20480, vocab_size=64000)


@pytest.fixture(scope="module")
def cache_home(roofline_cache_home):
    return roofline_cache_home


@pytest.fixture(scope="module")
def quick(cache_home):
    return roofline.probe(quick=True)


def _files(cache_home):
    return sorted(p.name for p in (cache_home / "pykernels" / "roofline").iterdir())


def test_quick_cpu_probe_sanity(quick, cache_home):
    assert quick.source == "measured"
    assert {"fp32", "bf16"} <= set(quick.peak_flops)
    assert all(v > 0 and math.isfinite(v) for v in quick.peak_flops.values())
    if "int8" not in quick.peak_flops:
        assert "int8 not measured" in quick.notes
    bw = quick.mem_bandwidth
    assert set(bw) == {"read", "copy", "triad", "read_1thread"}  # one thread's bare read loop too
    assert all(v > 0 and math.isfinite(v) for v in bw.values())
    assert bw["read"] >= bw["copy"] / 2
    assert quick.mem_capacity > 1 << 30
    if os.path.isdir("/sys/devices/system/cpu/cpu0/cache"):  # Linux: cache sizes from sysfs
        assert quick.caches and all(v > 0 for v in quick.caches.values())
        assert max(quick.caches.values()) == roofline.llc_bytes()
    assert quick.links == {} and quick.disk == {}
    assert f"{torch.get_num_threads()} threads" in quick.notes
    assert isinstance(quick.name, str) and "host-" in quick.name
    assert MachineProfile.from_dict(json.loads(json.dumps(quick.to_dict()))) == quick


def test_cache_hit_and_atomic_write(quick, cache_home, monkeypatch):
    files = _files(cache_home)
    assert len(files) == 1 and "-cpu-quick-" in files[0]  # nothing else: no temp file left

    def boom(*a, **k):
        raise AssertionError("measured again despite the cache")
    monkeypatch.setattr(measure, "_measure", boom)
    assert roofline.probe(quick=True) == quick
    with pytest.raises(AssertionError, match="measured again"):
        roofline.probe(quick=True, refresh=True)


@pytest.mark.parametrize("content", ["{not json", '{"version": 1, "profile": {"x": 1}}', "[]"])
def test_corrupt_cache_is_ignored(tmp_path, monkeypatch, content):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fake = MachineProfile("fake", {"fp32": 1e9}, {"read": 1e9, "copy": 1e9, "triad": 1e9},
                          source="measured")
    calls = []
    monkeypatch.setattr(measure, "_measure", lambda *a: calls.append(a) or fake)
    path = measure._cache_path(measure._identity("cpu"), "cpu", True, (), torch.get_num_threads())
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as fh:
        fh.write(content)
    assert roofline.probe(quick=True) == fake and len(calls) == 1
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temp file left
    assert roofline.probe(quick=True) == fake and len(calls) == 1          # now a valid cache


def test_unwritable_cache_warns(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")  # XDG_CACHE_HOME is a file: the cache dir cannot exist
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    fake = MachineProfile("fake", {"fp32": 1e9}, {"read": 1e9, "copy": 1e9, "triad": 1e9})
    monkeypatch.setattr(measure, "_measure", lambda *a: fake)
    with pytest.warns(UserWarning, match="cannot write the cache"):
        assert roofline.probe(quick=True) == fake


def test_probe_disk(tmp_path):
    d = roofline.probe_disk(tmp_path, size_bytes=8 * MiB)
    assert d["read"] > 0 and d["write"] > 0 and d["size_bytes"] == 8 * MiB
    assert d["method"] in ("o_direct", "fadvise")
    assert list(tmp_path.iterdir()) == []


def test_probe_disk_falls_back_to_fadvise(tmp_path, monkeypatch):
    real = measure._disk_pass

    def refuse_direct(name, size, buf, direct):  # as tmpfs on older kernels does
        if direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(name, size, buf, direct)
    monkeypatch.setattr(measure, "_disk_pass", refuse_direct)
    d = roofline.probe_disk(tmp_path, size_bytes=1 * MiB + 5)
    assert d["method"] == "fadvise" and d["size_bytes"] == 1 * MiB and d["read"] > 0
    assert list(tmp_path.iterdir()) == []


def test_probe_disk_removes_file_on_error(tmp_path, monkeypatch):
    def fail(*a):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(measure, "_disk_pass", fail)
    with pytest.raises(OSError, match="No space"):
        roofline.probe_disk(tmp_path, size_bytes=MiB)
    assert list(tmp_path.iterdir()) == []


def test_probe_with_disk_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "_measure_cpu",
                        lambda quick, threads: ({"fp32": 1e9}, {"read": 1.0, "copy": 1.0,
                                                                "triad": 1.0}, 1e9, []))
    m = roofline.probe(quick=True, disk_dirs=[tmp_path], cache=False)
    assert list(m.disk) == [str(tmp_path)] and m.disk[str(tmp_path)]["read"] > 0
    assert m.links["disk_read"] == m.disk[str(tmp_path)]["read"]
    assert m.links["disk_write"] == m.disk[str(tmp_path)]["write"]


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="path"):
        roofline.probe_disk(tmp_path / "missing")
    with pytest.raises(ValueError, match="disk_dirs: .* does not exist"):
        roofline.probe(disk_dirs=[tmp_path / "missing"], cache=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="disk_dirs: .* not a directory"):
        roofline.probe(disk_dirs=[tmp_path / "f"], cache=False)
    with pytest.raises(ValueError, match="device"):
        roofline.probe(device="tpu")
    with pytest.raises(TypeError, match="device"):
        roofline.probe(device=0)
    with pytest.raises(TypeError, match="threads"):
        roofline.probe(threads=1.5)
    with pytest.raises(ValueError, match="size_bytes"):
        roofline.probe_disk(tmp_path, size_bytes=100)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu():
    with pytest.raises(RuntimeError, match="device: 'cuda'.*no CUDA GPU"):
        roofline.probe(device="cuda")


def test_gpu_identity_never_raises():
    info = roofline.gpu_identity()
    assert isinstance(info, dict) and "gpu" in info
    if info["gpu"] is None:
        assert info["reason"]


def test_probe_function_and_module_both_importable():
    assert callable(roofline.probe) and roofline.probe is measure.probe
    assert callable(probe_memory_bandwidth)
    from roofline.probe import CpuLoadMeter, llc_bytes
    assert llc_bytes() > 0 and CpuLoadMeter is not None


def test_docstring_examples():
    result = doctest.testmod(measure, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------------ CLI
def test_cli_probe_json(quick, capsys):
    assert main(["probe", "--quick", "--json"]) == 0
    assert MachineProfile.from_dict(json.loads(capsys.readouterr().out)) == quick


def test_cli_probe_table(quick, capsys):
    assert main(["probe", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "read" in out and "GB/s" in out


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(YI_34B))
    return path


def test_cli_analyze_json(config, capsys):
    assert main(["analyze", "--model", str(config), "--batch", "1", "--context", "1024",
                 "--device", "A100-80GB-SXM", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["time_s"] > 0 and r["machine"] == "A100-80GB-SXM" and r["kv_bytes_per_token"] == 245_760


def test_cli_analyze_this_machine(config, quick, capsys):
    assert main(["analyze", "--model", str(config), "--batch", "2", "--context", "512",
                 "--kv-bits", "fp8", "--phase", "prefill", "--device", "this"]) == 0
    out = capsys.readouterr().out
    assert quick.name in out and "tokens/s" in out and "lm_head" in out


@pytest.mark.parametrize("argv", [
    ["analyze", "--model", "/nonexistent/config.json", "--batch", "1", "--context", "8"],
    ["analyze", "--model", "{cfg}", "--batch", "1", "--context", "8", "--device", "nope"],
    ["analyze", "--model", "{cfg}", "--batch", "0", "--context", "8"],
    ["analyze", "--model", "{cfg}", "--batch", "1", "--context", "8", "--kv-bits", "3"],
    ["probe", "--disk", "/nonexistent/dir"],
    ["frobnicate"],
])
def test_cli_errors_exit_2(argv, config, capsys):
    with pytest.raises(SystemExit) as exc:
        main([a.replace("{cfg}", str(config)) for a in argv])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cache_file_stems_keep_long_identities_apart():
    """A machine identity longer than the 100-character stem keeps a hash of the whole: two hosts
    whose names agree on the first 100 characters (the host hash comes last) get different files;
    short identities keep their plain stem (existing cache files stay valid)."""
    from roofline.measure import file_stem

    short = "AMD EPYC 7B13 x2 host-1a2b3c4d"
    assert file_stem(short) == "AMD_EPYC_7B13_x2_host-1a2b3c4d"
    a = "NVIDIA H100 80GB HBM3 on " + "Intel(R) Xeon(R) Platinum 8480+ " * 3 + "x16 host-aaaaaaaa"
    b = a.replace("host-aaaaaaaa", "host-bbbbbbbb")
    assert len(file_stem(a)) == 100 and file_stem(a) != file_stem(b)
    assert file_stem(a).startswith("NVIDIA_H100_80GB_HBM3_on_Intel")
