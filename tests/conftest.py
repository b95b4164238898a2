import os

# Triton kernels run in the interpreter on CPU-only machines; this must be set before triton
# is imported anywhere in the test session. PK_TRITON_TEST_DEVICE=cuda is the run of
# tests/test_triton_attention.py and tests/test_triton_kv.py compiled on a GPU (their
# test_compiled_on_gpu starts it in a subprocess when a GPU is present): no interpreter there.
if os.environ.get("PK_TRITON_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# method="auto" must not follow autotune results a benchmark recorded on this machine
# (roofline.autotune): tests that exercise them turn lookups on with a private cache folder.
os.environ["PYKERNELS_AUTOTUNE"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# CPU-kernel tests: `isa` runs a test once per ISA variant this machine supports (the AVX2 and
# scalar paths stay tested on an AVX-512 machine), `threads` sets the kernel thread count; both
# restore the previous setting.
try:
    from pykernels import _C
except ImportError:  # not built: the CPU test files skip themselves
    _C = None
_ALL_ISAS = ["scalar", "avx2", "avx512", "avx512_bf16"]  # each a superset of the one before
ISAS = _ALL_ISAS[: _ALL_ISAS.index(_C.detected_isa()) + 1] if _C is not None else []


@pytest.fixture(params=ISAS)
def isa(request):
    prev = _C.active_isa()
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(prev)


@pytest.fixture
def threads():
    prev = _C.get_num_threads()
    yield lambda n: _C.set_num_threads(n)
    _C.set_num_threads(prev)


@pytest.fixture(scope="module")
def roofline_cache_home(tmp_path_factory):
    """A private XDG_CACHE_HOME for the module: roofline.probe's JSON cache (written by the
    roofline tests and by the report / CLI through bench/roof.py) never touches ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("xdg")
        mp.setenv("XDG_CACHE_HOME", str(home))
        yield home


@pytest.fixture
def no_full_size_suites(monkeypatch):
    """Empty the suite lists of bench.report whose shapes are full size and not chosen by the
    test (the probe check, the advisor sweeps and the offload benchmark; tests/test_probe_check.py,
    tests/test_bench_advisor.py and tests/test_bench_offload.py run them on small shapes)."""
    from bench import advisor, gpu, kvtier, offload, probe_check

    monkeypatch.setattr(advisor, "SUITES", [])
    monkeypatch.setattr(offload, "SUITES", [])  # tests/test_bench_offload.py runs its quick form
    monkeypatch.setattr(probe_check, "SUITES", [])
    monkeypatch.setattr(kvtier, "SUITES", [])  # tests/test_bench_kvtier.py runs its quick form
    monkeypatch.setattr(gpu, "SUITES", [])  # full GPU shapes (tests/test_bench_smoke.py fakes its run)

