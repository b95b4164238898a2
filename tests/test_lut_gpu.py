"""LUT-GEMV on the GPU backends: Triton (pykernels.triton.lut_gemv) and CUDA (pykernels.cuda.lut_gemv).

(a) Triton in the interpreter (TRITON_INTERPRET=1, set by conftest.py): bits 1..8 x affine /
    symmetric / codebook (per-tensor with scales, per-channel without) x group 32 / per-channel
    / odd groups x M 1, 3, 16 x fp32 / bf16 / fp16 x, against float64 x @ W^T, with W built from
    the lut_format docstring formulas and the codes packed by lut_format.pack_codes.
(b) CUDA without a GPU: every kernel instantiation compiles through NVRTC; the extension (when
    built) and the cupy JIT path reject bad input with the same errors naming the argument; the
    kernel text itself runs on the CPU under a thread-per-CUDA-thread emulation (g++).
(c) Triton without a GPU: the kernel compiles to sm_80 / sm_90 cubins (subprocess).
(d) On a GPU: the CUDA kernels (nvcc build and cupy JIT) and the compiled Triton kernel against
    the same float64 reference, at larger shapes.
"""
import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from nvrtc_helpers import nvrtc_or_skip
from pykernels.lut_format import pack_codes, padded_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMES = ["affine", "symmetric", "codebook", "codebook_ch"]


# ---- reference --------------------------------------------------------------------------------
def make_case(bits, scheme, N, K, group, M, dtype, seed=0, device="cpu"):
    """Random codes and parameters; -> (kernel args dict, ref [M, N] float64, bound [M, N]).

    W [N, K] follows the lut_format docstring in float64 from the stored (fp16 / fp32) parameters:
      affine:    W = scale * (q - zero)             symmetric: W = scale * (q - (2^bits - 1) / 2)
      codebook:  W = scale * codebook[0, q]         codebook_ch: W = codebook[n, q] (no scales)
    ref = x @ W^T over the padded K (x is zero past K). bound = |x| @ |terms|^T, the sum of the
    magnitudes the kernels accumulate (q x and zero * x separately for the linear schemes)."""
    g = torch.Generator().manual_seed(seed)
    N_pad, K_pad, gs = padded_shape(N, K, group)
    G = K_pad // gs
    codes = torch.zeros(N_pad, K_pad, dtype=torch.int32)
    codes[:N, :K] = torch.randint(0, 1 << bits, (N, K), generator=g)
    sign = torch.where(torch.rand(N, G, generator=g) < 0.5, -1.0, 1.0)
    scales = ((torch.rand(N, G, generator=g) + 0.5) * sign * 2.0 ** -bits).half()
    zeros = codebook = None
    if scheme == "affine":  # zero points in code units, fractional (the format allows any fp16)
        zeros = (torch.rand(N, G, generator=g) * ((1 << bits) - 1)).half()
    if scheme.startswith("codebook"):
        codebook = torch.randn(N if scheme == "codebook_ch" else 1, 1 << bits, generator=g)
        if scheme == "codebook_ch":
            scales = None
    x = torch.zeros(M, K_pad, dtype=dtype)
    x[:, :K] = torch.randn(M, K, generator=g).to(dtype)

    q = codes[:N].double()
    gidx = torch.arange(K_pad) // gs
    s = scales.double()[:, gidx] if scales is not None else torch.ones(N, K_pad, dtype=torch.float64)
    if scheme == "affine":
        z = zeros.double()[:, gidx]
        W, mag = s * (q - z), s.abs() * (q + z.abs())
    elif scheme == "symmetric":
        c0 = ((1 << bits) - 1) / 2
        W, mag = s * (q - c0), s.abs() * (q + c0)
    else:
        rows = torch.arange(N) if scheme == "codebook_ch" else torch.zeros(N, dtype=torch.long)
        W = s * torch.gather(codebook.double()[rows], 1, codes[:N].long())
        mag = W.abs()
    xd = x.double()
    ref, bound = xd @ W.T, xd.abs() @ mag.T
    dev = torch.device(device)
    args = dict(x=x.to(dev), planes=pack_codes(codes, bits).to(dev),
                scales=None if scales is None else scales.to(dev), zeros=None if zeros is None else zeros.to(dev),
                codebook=None if codebook is None else codebook.to(dev),
                out=torch.full((M, N), float("nan"), device=dev), N=N, K_pad=K_pad, bits=bits, gs=gs)
    return args, ref, bound


# Both modes are exact on these backends (fp32 accumulation of exact products). The kernels sum
# q x and zero * x (or table entries) separately, so the rounding error is relative to `bound`,
# not to |ref|: at most ~K * 2^-24 * bound in the worst case, ~1e-7 * bound in practice.
RTOL_BOUND = 1e-5


def check(out, ref, bound, what=""):
    out = out.double().cpu()
    bad = ~((out - ref).abs() <= RTOL_BOUND * bound)  # NaN (an unwritten output) counts as bad
    if bad.any():
        err = torch.where(torch.isnan(out), torch.full_like(out, float("inf")), (out - ref).abs() / bound)
        idx = tuple(int(i) for i in torch.unravel_index(torch.argmax(err), out.shape))
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} outputs off; worst at {idx}: got "
                             f"{out[idx].item()!r}, expected {ref[idx].item()!r} (bound {bound[idx].item():.3g})")


# ---- (a) Triton in the interpreter --------------------------------------------------------------
triton_lut = importlib.import_module("pykernels.triton.lut_gemv")  # never fails; available() says why


def _triton_or_skip():
    ok, reason = triton_lut.available()
    if not ok:
        pytest.skip(reason)
    return triton_lut


def run_triton(args, mode="int8"):
    _triton_or_skip().lut_gemv(**args, mode=mode)
    return args["out"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("group", [32, -1], ids=["gs32", "per_channel"])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_triton_matches_reference(bits, scheme, group, M, dtype):
    # N = 40 -> two tiles, the second mostly padding; K per-channel not a multiple of 16 (136) or
    # of 8 (61 -> K_pad 64); grouped K of 2-4 groups.
    K = {32: (64, 96, 128, 96), -1: (136, 61, 100, 136)}[group][bits - 1]
    args, ref, bound = make_case(bits, scheme, 40, K, group, M, dtype, seed=bits)
    check(run_triton(args), ref, bound, f"triton bits={bits} {scheme} gs={args['gs']} M={M}")


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_triton_wide_codes(bits, scheme):
    args, ref, bound = make_case(bits, scheme, 33, 96, 32, 2, torch.float32, seed=bits)
    check(run_triton(args), ref, bound, f"triton bits={bits} {scheme}")


@pytest.mark.parametrize("group", [8, 24, 40], ids=lambda g: f"gs{g}")
def test_triton_odd_group_sizes(group):
    # groups that are multiples of 8 but not of the BLOCK_K slice: the last slice is masked
    args, ref, bound = make_case(3, "affine", 70, 5 * group, group, 5, torch.float16)
    check(run_triton(args), ref, bound, f"triton gs={group}")


@pytest.mark.parametrize("split_k", [2, 3, 7])
@pytest.mark.parametrize("scheme,group", [("affine", 32), ("symmetric", -1), ("codebook", 64)])
def test_triton_split_k(scheme, group, split_k):
    # on a GPU K is cut into ranges when there are few row blocks; ranges may cut scale groups
    # (the group formula is linear) and the partial sums are added in a fixed order
    args, ref, bound = make_case(2, scheme, 50, 192, group, 3, torch.float32)
    _triton_or_skip().lut_gemv(**args, split_k=split_k)
    check(args["out"], ref, bound, f"triton split_k={split_k} {scheme} gs={args['gs']}")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_triton_sixteen_rows_and_modes_agree(scheme):
    args, ref, bound = make_case(4, scheme, 96, 128, 64, 16, torch.bfloat16)
    y_int8 = run_triton(args, "int8").clone()
    check(y_int8, ref, bound, f"triton M=16 {scheme}")
    args["out"].fill_(float("nan"))
    assert torch.equal(run_triton(args, "exact"), y_int8)  # int8 is served by the exact kernel


@pytest.mark.parametrize("change,match", [
    (dict(mode="fp8"), r"^mode: "), (dict(gs=12), r"^gs: "), (dict(bits=9), r"^bits: "),
    (dict(x=torch.zeros(17, 64), out=torch.zeros(17, 40)), r"^x: "), (dict(scales=None, zeros=None), r"^scales: "),
], ids=["mode", "gs", "bits", "rows", "scales"])
def test_triton_rejects_bad_arguments(change, match):
    args, _, _ = make_case(4, "affine", 40, 64, 32, 1, torch.float32)
    with pytest.raises(ValueError, match=match):
        _triton_or_skip().lut_gemv(**{**args, "mode": "int8", **change})


def test_triton_available_in_interpreter():
    ok, reason = _triton_or_skip().available()
    assert ok and "interpreter" in reason, reason


def test_triton_import_without_triton_does_not_fail():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "from pykernels.triton.lut_gemv import available\n"
            "ok, reason = available(); assert not ok and 'triton' in reason, reason")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr


def _env_without_interpreter():
    import pykernels  # run against the same pykernels this session imported

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(pykernels.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def test_triton_kernel_compiles_for_gpu_without_a_gpu():
    """The interpreter does not check GPU-only rules (layouts, dot shapes, shared memory):
    compile the kernel for sm_80 and sm_90 down to cubins, without TRITON_INTERPRET."""
    if triton_lut.triton is None:
        pytest.skip("triton not installed")
    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    r = subprocess.run([sys.executable, script, "lut"], env=_env_without_interpreter(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "compiled 12 kernels, 0 failures" in r.stdout, r.stdout


# ---- (b) CUDA without a GPU -------------------------------------------------------------------
cuda_lut = importlib.import_module("pykernels.cuda.lut_gemv")




def test_every_cuda_kernel_compiles_with_nvrtc():
    nvrtc_or_skip()
    names = cuda_lut.kernel_names()
    assert len(names) == 8 * 2 * 5  # bits 1..8 x {linear, codebook} x rows per pass {1, 2, 4, 8, 16}
    for arch in ("sm_80", "sm_90"):  # -G: the full front end and PTX generation, unoptimised (fast)
        sizes = cuda_lut.compile_nvrtc(arch, optimize=False)
        assert sorted(sizes) == sorted(names)
        assert all(s > 0 for s in sizes.values())


def test_cuda_kernels_compile_optimised_with_nvrtc():
    # what the JIT path runs: optimised PTX of the largest instantiations (the nvcc build in
    # setup.py compiles all of them optimised)
    nvrtc_or_skip()
    names = [cuda_lut._kernel_name(b, k, mt) for b in (1, 4, 8) for k in (0, 1) for mt in (1, 16)]
    sizes = cuda_lut.compile_nvrtc("sm_80", names)
    assert sorted(sizes) == sorted(names)


def test_cuda_compile_error_reports_the_nvrtc_log(monkeypatch):
    nvrtc_or_skip()
    monkeypatch.setattr(cuda_lut, "kernel_source", lambda: "this is not C++;\n")
    with pytest.raises(RuntimeError, match="NVRTC failed"):
        cuda_lut.compile_nvrtc("sm_80", optimize=False)


def test_cuda_source_inlines_the_headers():
    src = cuda_lut.kernel_source()
    quoted = [ln for ln in src.splitlines() if ln.lstrip().startswith("#") and "include" in ln and '"' in ln]
    assert quoted == [], quoted
    for name in ("lut_build_table", "lut_group_result", "lut_plane_offset", "lut_gemv_kernel"):
        assert name in src


def test_cuda_kernel_config():
    for M in range(1, 17):
        mt, threads = cuda_lut.kernel_config(M)
        assert mt >= M and mt & (mt - 1) == 0 and mt < 2 * M and threads % 32 == 0
    with pytest.raises(ValueError, match=r"^x: "):
        cuda_lut.kernel_config(17)


def test_cuda_import_touches_neither_cupy_nor_the_extension():
    code = ("import sys, pykernels.cuda.lut_gemv; "
            "print('cupy' in sys.modules, 'pykernels._cuda' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"]


def test_cuda_available_never_raises_and_explains():
    ok, reason = cuda_lut.available()
    assert isinstance(ok, bool) and "pykernels._cuda" in reason and "cupy" in reason
    if not torch.cuda.is_available():
        assert not ok and "fix:" in reason


def _native_or_skip():
    try:
        m = importlib.import_module("pykernels._cuda")
    except ImportError as e:
        pytest.skip(f"pykernels._cuda not built (nvcc absent or PYKERNELS_CUDA=0): {e}")
    if not hasattr(m, "lut_gemv"):
        pytest.skip("pykernels._cuda predates the LUT kernels (rebuild: make build)")
    return m


def _bad_calls():
    """(name, kwargs changes, exception, message start): every rule the launchers check, each
    checkable on CPU tensors (devices are checked last)."""
    return [
        ("bits", dict(bits=9), ValueError, "bits: expected 1..8"),
        ("mode", dict(mode="fp8"), ValueError, "mode: expected 'int8' or 'exact'"),
        ("gs", dict(gs=12), ValueError, "gs: expected a multiple of 8"),
        ("K_pad", dict(K_pad=60), ValueError, "K_pad: expected a positive multiple of 8"),
        ("x dtype", dict(x=torch.zeros(2, 64, dtype=torch.float64)), TypeError, "x: expected float32"),
        ("x rows", dict(x=torch.zeros(17, 64), out=torch.zeros(17, 40)), ValueError, "x: expected [M, K_pad=64]"),
        ("planes shape", dict(planes=torch.zeros(2, 8, 3, 32, dtype=torch.uint8)), ValueError,
         "planes: expected shape [2, 8, 4, 32]"),
        ("planes dtype", dict(planes=torch.zeros(2, 8, 4, 32, dtype=torch.int8)), TypeError, "planes: expected uint8"),
        ("out shape", dict(out=torch.zeros(2, 41)), ValueError, "out: expected shape [2, 40]"),
        ("scales dtype", dict(scales=torch.zeros(40, 2)), TypeError, "scales: expected float16"),
        ("zeros shape", dict(zeros=torch.zeros(40, 1, dtype=torch.float16)), ValueError,
         "zeros: expected shape [40, 2]"),
        ("codebook shape", dict(codebook=torch.zeros(3, 16), zeros=None), ValueError,
         "codebook: expected shape [1 or N=40, 16]"),
        ("codebook with zeros", dict(codebook=torch.zeros(1, 16)), ValueError, "zeros: must be None for a codebook"),
        ("scales missing", dict(scales=None), ValueError, "scales: required"),
        ("contiguity", dict(out=torch.zeros(40, 2).t()), ValueError, "out: expected a contiguous tensor"),
        ("device", {}, ValueError, "x: the CUDA backend needs CUDA tensors"),
    ]


def _cpu_args():
    args, _, _ = make_case(4, "affine", 40, 64, 32, 2, torch.float32)
    return dict(args, mode="int8")


@pytest.mark.parametrize("impl", ["native", "jit"])
def test_cuda_launchers_reject_bad_input_naming_the_argument(impl):
    if impl == "native":
        _native_or_skip()
    for what, change, exc, msg in _bad_calls():
        kw = dict(_cpu_args(), **change)
        with pytest.raises(exc) as info:
            cuda_lut.lut_gemv(**kw, impl=impl)
        assert str(info.value).startswith(msg), f"{what}: {info.value}"


def test_cuda_native_lut_rows_matches_python():
    m = _native_or_skip()
    for M in range(1, 17):
        assert m.lut_rows(M) == cuda_lut.kernel_config(M)[0]


# CPU emulation of the CUDA kernel: one std::thread per CUDA thread, std::barrier for
# __syncthreads / __syncwarp, `static` locals for __shared__ (CTAs run one after another). The
# kernel uses no warp shuffles, so this runs the real lut_gemv.cuh text, indexing, group
# boundaries, K split between warps and the cross-warp reduction included, without a GPU.
_EMU_SRC = r"""
#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>
struct Dim { unsigned x = 0, y = 0, z = 0; };
thread_local Dim threadIdx;
Dim blockIdx;
static std::unique_ptr<std::barrier<>> g_block;
static std::vector<std::unique_ptr<std::barrier<>>> g_warps;
inline void __syncthreads() { g_block->arrive_and_wait(); }
inline void __syncwarp() { g_warps[threadIdx.x >> 5]->arrive_and_wait(); }
template <class T> inline T __ldg(const T* p) { return *p; }
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#include "lut_gemv.cuh"
namespace ck = pykernels::cuda_kernels;

template <int BITS, int KIND, int MT>
void launch(const void* x, long long dt, long long M, const unsigned char* p, const uint16_t* s, const uint16_t* z,
            const float* cb, long long cbpr, float* o, long long N, long long K, long long gs) {
  const int threads = ck::LutShape<BITS, MT>::kThreads, W = ck::LutShape<BITS, MT>::W;
  for (long long t = 0; t < (N + 31) / 32; ++t) {
    blockIdx.x = (unsigned)t;
    g_block.reset(new std::barrier<>(threads));
    g_warps.clear();
    for (int w = 0; w < W; ++w) g_warps.emplace_back(new std::barrier<>(32));
    std::vector<std::thread> th;
    for (int i = 0; i < threads; ++i)
      th.emplace_back([=] {
        threadIdx.x = i;
        ck::lut_gemv_kernel<BITS, KIND, MT>(x, dt, M, p, s, z, cb, cbpr, o, N, K, gs);
      });
    for (auto& h : th) h.join();
  }
}

#define PK_CASE(B, KD, T) \
  if (bits == B && kind == KD && mt == T) { launch<B, KD, T>(x, dt, M, p, s, z, cb, cbpr, o, N, K, gs); return 0; }
#define PK_MTS(B, KD) PK_CASE(B, KD, 1) PK_CASE(B, KD, 2) PK_CASE(B, KD, 4) PK_CASE(B, KD, 8) PK_CASE(B, KD, 16)
extern "C" int run(int bits, int kind, int mt, const void* x, long long dt, long long M, const unsigned char* p,
                   const uint16_t* s, const uint16_t* z, const float* cb, long long cbpr, float* o, long long N,
                   long long K, long long gs) {
  PK_MTS(1, 0) PK_MTS(1, 1) PK_MTS(3, 0) PK_MTS(3, 1) PK_MTS(4, 0) PK_MTS(4, 1) PK_MTS(8, 0) PK_MTS(8, 1)
  return 1;
}
"""


@pytest.fixture(scope="module")
def cuda_emulator(tmp_path_factory):
    import ctypes
    import shutil

    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found (needed to emulate the CUDA kernel on the CPU)")
    d = tmp_path_factory.mktemp("lut_emu")
    probe = d / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    if subprocess.run([cxx, "-std=c++20", "-pthread", str(probe), "-o", str(d / "probe")],
                      capture_output=True).returncode != 0:
        pytest.skip("g++ without C++20 <barrier> support")
    include_dir, cuda_dir = cuda_lut._source_roots()
    (d / "emu.cpp").write_text(_EMU_SRC)
    lib = d / "emu.so"
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{include_dir}",
                        f"-I{cuda_dir}", str(d / "emu.cpp"), "-o", str(lib)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    emu = ctypes.CDLL(str(lib))
    P, I = ctypes.c_void_p, ctypes.c_longlong
    emu.run.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, P, I, I, P, P, P, P, I, P, I, I, I]
    return emu


@pytest.mark.parametrize("bits,scheme,N,K,group,M,dtype", [
    (4, "affine", 40, 136, -1, 1, torch.float32),     # 16 warps split 17 byte columns: empty and 1-2 column ranges
    (4, "symmetric", 70, 256, 32, 2, torch.bfloat16),  # group boundaries inside warp ranges
    (3, "affine", 33, 96, 24, 3, torch.float16),       # odd group size, MT 4
    (1, "codebook", 40, 64, 32, 5, torch.float32),     # MT 8
    (8, "codebook_ch", 64, 1000, -1, 16, torch.float32),  # MT 16, 8-bit per-channel codebook
    (8, "affine", 40, 520, 8, 16, torch.bfloat16),     # a scale group per byte column
    (3, "symmetric", 100, 2048, 128, 1, torch.float32),  # long warp ranges, several steps
])
def test_cuda_kernel_logic_emulated_on_cpu(cuda_emulator, bits, scheme, N, K, group, M, dtype):
    args, ref, bound = make_case(bits, scheme, N, K, group, M, dtype, seed=K)
    mt, _ = cuda_lut.kernel_config(M)
    kind = cuda_lut.KIND_CODEBOOK if args["codebook"] is not None else cuda_lut.KIND_LINEAR
    cb_per_row = args["codebook"] is not None and args["codebook"].shape[0] == N

    def ptr(t):
        return None if t is None else t.data_ptr()

    rc = cuda_emulator.run(bits, kind, mt, ptr(args["x"]), cuda_lut._DTYPE_CODE[dtype], M, ptr(args["planes"]),
                           ptr(args["scales"]), ptr(args["zeros"]), ptr(args["codebook"]), int(cb_per_row),
                           ptr(args["out"]), N, args["K_pad"], args["gs"])
    assert rc == 0, "instantiation missing from the emulator"
    check(args["out"], ref, bound, f"emulated cuda bits={bits} {scheme} M={M}")


# ---- (d) on a GPU -------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def _cuda_impls():
    try:
        has_native = hasattr(importlib.import_module("pykernels._cuda"), "lut_gemv")
    except ImportError:
        has_native = False
    has_cupy = importlib.util.find_spec("cupy") is not None
    return [i for i, ok in (("native", has_native), ("jit", has_cupy)) if ok] or ["none"]


@gpu
@pytest.mark.parametrize("impl", _cuda_impls())
@pytest.mark.parametrize("M", [1, 2, 5, 16])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_cuda_parity(impl, bits, scheme, M):
    if impl == "none":
        pytest.skip("neither pykernels._cuda (with lut_gemv) nor cupy is available")
    dtype = (torch.float32, torch.bfloat16, torch.float16)[(bits + M) % 3]
    for N, K, group in ((300, 1024, 128), (33, 4104, -1), (4096, 512, 32)):
        args, ref, bound = make_case(bits, scheme, N, K, group, M, dtype, seed=bits * 31 + M, device="cuda")
        cuda_lut.lut_gemv(**args, mode="int8", impl=impl)
        torch.cuda.synchronize()
        check(args["out"], ref, bound, f"cuda[{impl}] bits={bits} {scheme} M={M} N={N} K={K} {dtype}")


@gpu
@pytest.mark.parametrize("impl", _cuda_impls())
def test_cuda_side_stream(impl):
    if impl == "none":
        pytest.skip("neither pykernels._cuda (with lut_gemv) nor cupy is available")
    args, ref, bound = make_case(4, "affine", 512, 2048, 128, 3, torch.bfloat16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cuda_lut.lut_gemv(**args, mode="exact", impl=impl)
    s.synchronize()
    check(args["out"], ref, bound, f"cuda[{impl}] side stream")


def _triton_gpu_main():
    """Compiled Triton on a GPU (run in a subprocess without TRITON_INTERPRET)."""
    import pykernels.triton.lut_gemv as tl_mod

    assert not tl_mod._INTERPRET
    n = 0
    for bits in (1, 2, 3, 4, 8):
        for scheme in SCHEMES:
            for M, dtype in ((1, torch.bfloat16), (3, torch.float32), (16, torch.float16)):
                for N, K, group in ((300, 1024, 128), (8192, 256, 32), (33, 4104, -1)):
                    args, ref, bound = make_case(bits, scheme, N, K, group, M, dtype, seed=n, device="cuda")
                    tl_mod.lut_gemv(**args, mode="int8")
                    torch.cuda.synchronize()
                    check(args["out"], ref, bound, f"triton-gpu bits={bits} {scheme} M={M} N={N} K={K} {dtype}")
                    n += 1
    print(f"triton gpu parity: {n} cases ok")


@gpu
def test_triton_compiled_parity():
    if triton_lut.triton is None:
        pytest.skip("triton not installed")
    env = _env_without_interpreter()
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env["PYTHONPATH"]])
    code = "import test_lut_gpu as t; t._triton_gpu_main()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "cases ok" in r.stdout
