"""CUDA backend: build checks that run anywhere, parity tests that run where a GPU is.

(a) every kernel instantiation compiles through NVRTC (no GPU needed), from the same
    preprocessed source the cupy JIT path compiles;
(b) pykernels._cuda (built by setup.py when nvcc is present) imports without a GPU and rejects
    bad input with errors naming the argument;
(c) on a GPU: both methods x dense/paged x GQA 1/4/8 x fp32/fp16/bf16 x mixed odd lengths against
    a float64 reference, through the nvcc build and the cupy JIT path.
"""
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pykernels.cuda as pkc
from attention_ref import make_dense, make_paged
from nvrtc_helpers import nvrtc_or_skip
from pykernels.reference import decode_attention_reference
cuda_da = importlib.import_module("pykernels.cuda.decode_attention")  # the module (the package re-exports the function)

ROOT = Path(__file__).resolve().parent.parent


# ---- float64 reference (the oracle): pykernels.reference in float64 on the CPU ----------------
def reference(q, k, v, seqlens, block_table=None, scale=None):
    """out [B, Hq, D] float64 and lse [B, Hq]. Only the first seqlens[b] tokens are read."""
    bt = None if block_table is None else block_table.cpu()
    return decode_attention_reference(q.cpu().double(), k.cpu(), v.cpu(), seqlens.cpu(), bt, scale,
                                      return_lse=True, compute_dtype=torch.float64)




# ---- (a) NVRTC, no GPU needed ---------------------------------------------------------------
def test_every_kernel_compiles_with_nvrtc():
    nvrtc_or_skip()
    sizes = pkc.compile_nvrtc("sm_80")
    assert sorted(sizes) == sorted(pkc.kernel_names())
    assert len(sizes) == 3 * 3 * 4 + 2  # cache dtypes x lanes-per-D x heads-per-pass, + plan, reduce
    empty = [n for n, s in sizes.items() if s <= 0]
    assert not empty, f"no PTX for {empty}"


def test_kernel_source_inlines_the_pykernels_headers():
    # The cupy cache key is the source text, so every compiled line must be in it: no quoted
    # includes left. (Host-only headers are guarded by __CUDACC_RTC__; the NVRTC compile above
    # is what proves the text is NVRTC-clean.)
    src = pkc.kernel_source()
    quoted = [ln for ln in src.splitlines() if ln.lstrip().startswith("#") and "include" in ln and '"' in ln]
    assert quoted == [], quoted
    for name in ("softmax_rescale", "merge_lse", "lean_partial_slot", "decode_attention_kernel"):
        assert name in src


def test_compile_error_reports_the_nvrtc_log(monkeypatch):
    nvrtc_or_skip()
    monkeypatch.setattr(cuda_da, "kernel_source", lambda: "this is not C++;\n")
    with pytest.raises(RuntimeError, match="NVRTC failed"):
        pkc.compile_nvrtc("sm_80")


def test_kernel_config_covers_the_instantiations():
    names = set(pkc.kernel_names())
    for D in (1, 32, 64, 65, 80, 96, 128, 129, 200, 256):
        for G in (1, 2, 3, 4, 5, 8, 12, 16, 64):
            epl, gb = pkc.kernel_config(D, G)
            assert D <= 32 * epl
            for ctype in ("float", "pykernels::fp16_t", "pykernels::bf16_t"):
                assert f"pykernels::cuda_kernels::decode_attention_kernel<{ctype}, {epl}, {gb}>" in names


def test_import_touches_neither_cupy_nor_the_extension():
    code = "import sys, pykernels.cuda; print('cupy' in sys.modules, 'pykernels._cuda' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"]


def test_available_never_raises_and_explains():
    ok, reason = pkc.available()
    assert isinstance(ok, bool) and isinstance(reason, str)
    assert "pykernels._cuda" in reason and "torch.cuda.is_available()" in reason and "cupy" in reason
    if not torch.cuda.is_available():
        assert not ok and "fix:" in reason


def test_jit_cache_is_outside_the_package():
    pkg = Path(cuda_da.__file__).resolve().parent.parent
    assert not Path(cuda_da._cupy_cache_dir()).resolve().is_relative_to(pkg)


def test_build_py_ships_the_cuda_sources(tmp_path):
    """setup.py build_py copies the headers and .cuh into the package (pykernels/_csrc)."""
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYKERNELS_CUDA": "0"})
    assert res.returncode == 0, res.stdout + res.stderr
    root = tmp_path / "pykernels" / "_csrc"
    for rel in ("include/pykernels/common.h", "include/pykernels/softmax.h", "include/pykernels/lean_plan.h",
                "cuda/decode_attention.cuh"):
        assert (root / rel).is_file(), f"{rel} missing from the built package"


# ---- (b) the nvcc-built extension -----------------------------------------------------------
def _native_or_skip():
    try:
        return importlib.import_module("pykernels._cuda")
    except ImportError as e:
        pytest.skip(f"pykernels._cuda not built (nvcc absent or PYKERNELS_CUDA=0): {e}")


def test_native_imports_and_counts_devices():
    m = _native_or_skip()
    n = m.device_count()
    assert isinstance(n, int) and n >= 0
    if not torch.cuda.is_available():
        assert n == 0 or torch.version.cuda is None  # a CPU torch on a GPU machine still sees devices


def test_native_kernel_config_matches_python():
    m = _native_or_skip()
    for D in (1, 64, 80, 96, 128, 200, 256):
        for G in (1, 2, 3, 4, 6, 8, 16):
            assert tuple(m.kernel_config(D, G)) == pkc.kernel_config(D, G)


def _cpu_args():
    B, Hq, Hkv, D, L = 2, 4, 2, 64, 8
    return dict(q=torch.randn(B, Hq, D), k_cache=torch.randn(B, L, Hkv, D), v_cache=torch.randn(B, L, Hkv, D),
                seqlens=torch.tensor([3, 8], dtype=torch.int32), block_table=None, out=torch.empty(B, Hq, D),
                lse=torch.empty(B, Hq))


def test_native_rejects_cpu_tensors_naming_the_argument():
    m = _native_or_skip()
    a = _cpu_args()
    with pytest.raises(ValueError, match=r"^q: the CUDA backend needs CUDA tensors"):
        m.decode_attention(a["q"], a["k_cache"], a["v_cache"], a["seqlens"], None, a["out"], a["lse"],
                           0.125, "lean", 4, 8, 16, 0)
    with pytest.raises(TypeError, match=r"^k_cache: expected a tensor supporting DLPack"):
        m.decode_attention(a["q"], [1, 2], a["v_cache"], a["seqlens"], None, a["out"], a["lse"],
                           0.125, "split", 4, 8, 16, 0)
    with pytest.raises(TypeError):  # pybind11 argument conversion, not a crash
        m.decode_attention(a["q"], a["k_cache"], a["v_cache"], a["seqlens"], None, a["out"], a["lse"],
                           "not a float", "lean", 4, 8, 16, 0)


@pytest.mark.parametrize("impl", ["auto", "jit"])
def test_wrapper_rejects_cpu_tensors(impl):
    if impl == "auto":
        _native_or_skip()
    a = _cpu_args()
    with pytest.raises(ValueError, match=r"^q: "):
        pkc.decode_attention(**a, scale=None, method="lean", impl=impl)


# ---- (c) parity on a GPU --------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

# Error against the float64 oracle, per output dtype. Inputs are exactly representable in their
# dtype (the oracle reads the same rounded values); the error is fp32 accumulation over <= 4097
# tokens (~1e-6 relative) plus rounding the output: half an ulp of |o| < 4 (fp16 2^-11 * 4,
# bf16 2^-8 * 4). lse is fp32 in every dtype.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LSE_ATOL = 1e-4
LENGTHS = [1, 17, 1000, 4097]


def _impls():
    out = []
    if cuda_da._native()[0] is not None:
        out.append("native")
    if importlib.util.find_spec("cupy") is not None:
        out.append("jit")
    return out or ["none"]


def make_cache(lengths, Hkv, D, dtype, paged, block_size=16, device="cuda"):
    """(k, v, block_table or None); unused rows and blocks are NaN, so any read past seqlens
    makes the output NaN."""
    if not paged:
        k, v = make_dense(len(lengths), max(lengths) + 5, Hkv, D, dtype, lengths)
        return k.to(device), v.to(device), None
    k, v, bt = make_paged(len(lengths), Hkv, D, dtype, lengths, block_size)
    return k.to(device), v.to(device), bt.to(device)


def check(out, lse, ref_out, ref_lse, dtype):
    for what, got, want, tol in (("out", out, ref_out, ATOL[dtype]), ("lse", lse, ref_lse, LSE_ATOL)):
        got = got.double().cpu()
        assert torch.isfinite(got).all(), f"{what}: non-finite at {torch.nonzero(~torch.isfinite(got))[:5].tolist()}"
        err = (got - want).abs()
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        assert err.max() <= tol, f"{what}: max |diff| {float(err.max()):.3g} > {tol} at {idx}: got {float(got[idx])}, want {float(want[idx])}"


def run(impl, q, k, v, seqlens, bt, method, out_dtype=None, **kw):
    B, Hq, D = q.shape
    out = torch.full((B, Hq, D), float("nan"), dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.full((B, Hq), float("nan"), dtype=torch.float32, device=q.device)
    pkc.decode_attention(q, k, v, seqlens, bt, out, lse, None, method, impl=impl, **kw)
    torch.cuda.synchronize()
    return out, lse


@gpu
@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("method", ["lean", "split"])
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_parity_mixed_lengths(impl, method, paged, group, dtype):
    if impl == "none":
        pytest.skip("neither pykernels._cuda nor cupy is available")
    Hkv, D = 2, 128
    k, v, bt = make_cache(LENGTHS, Hkv, D, dtype, paged)
    q = torch.randn(len(LENGTHS), Hkv * group, D).to(dtype).cuda()
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32, device="cuda")
    out, lse = run(impl, q, k, v, seqlens, bt, method, num_splits=8, num_workers=37, tile=64)
    check(out, lse, *reference(q, k, v, seqlens, bt), dtype)


@gpu
@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256, 33])
@pytest.mark.parametrize("method", ["lean", "split"])
def test_parity_head_dims_and_strides(impl, head_dim, method):
    if impl == "none":
        pytest.skip("neither pykernels._cuda nor cupy is available")
    lengths, Hkv, G, dtype = [17, 1000, 1], 2, 4, torch.bfloat16
    k, v, bt = make_cache(lengths, Hkv, head_dim, dtype, paged=True, block_size=7)
    # q non-contiguous and fp32 while the cache is bf16; out in fp16
    q = torch.randn(len(lengths), head_dim, Hkv * G, device="cuda").transpose(1, 2)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    out, lse = run(impl, q, k, v, seqlens, bt, method, out_dtype=torch.float16, num_splits=3, num_workers=5, tile=16)
    check(out, lse, *reference(q, k, v, seqlens, bt), torch.float16)


@gpu
@pytest.mark.parametrize("impl", _impls())
def test_parity_strided_dense_cache_on_a_side_stream(impl):
    if impl == "none":
        pytest.skip("neither pykernels._cuda nor cupy is available")
    lengths, Hkv, G, D = [4097, 5, 300], 4, 8, 96
    base = torch.randn(len(lengths), Hkv, max(lengths) + 2, D + 16, dtype=torch.float16, device="cuda")
    k = base.transpose(1, 2)[..., :D]  # [B, L, Hkv, D] with a padded, head-major layout
    v = torch.randn_like(base).transpose(1, 2)[..., :D]
    for b, L in enumerate(lengths):
        k[b, L:] = float("nan")
        v[b, L:] = float("nan")
    q = torch.randn(len(lengths), Hkv * G, D, dtype=torch.float16, device="cuda")
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out, lse = run(impl, q, k, v, seqlens, None, "lean", num_workers=64, tile=32)
    check(out, lse, *reference(q, k, v, seqlens, None), torch.float16)


@gpu
@pytest.mark.parametrize("impl", _impls())
def test_bad_lengths_and_block_ids_raise(impl):
    if impl == "none":
        pytest.skip("neither pykernels._cuda nor cupy is available")
    k, v, bt = make_cache([20, 9], 2, 64, torch.float16, paged=True, block_size=8)
    q = torch.randn(2, 4, 64, dtype=torch.float16, device="cuda")
    too_long = torch.tensor([20, 10_000], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"^seqlens: seqlens\[1\] = 10000"):
        run(impl, q, k, v, too_long, bt, "lean")
    bad = bt.clone()
    bad[1, 0] = k.shape[0]
    with pytest.raises(ValueError, match=r"^block_table: block_table\[1, 0\]"):
        run(impl, q, k, v, torch.tensor([20, 9], dtype=torch.int32, device="cuda"), bad, "split")
    with pytest.raises(ValueError, match=r"^q: num_heads 3 is not a multiple"):
        run(impl, q[:, :3], k, v, torch.tensor([20, 9], dtype=torch.int32, device="cuda"), bt, "lean")
