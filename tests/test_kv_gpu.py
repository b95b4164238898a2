"""Quantized-KV decode attention on CUDA (pykernels.cuda.kv_attention, csrc/cuda/kv_attention.cuh).

(a) without a GPU: every kernel instantiation compiles through NVRTC for sm_80 and sm_90; the
    source inlines its headers; importing touches neither cupy nor the extension;
(b) without a GPU: the cupy JIT path and the nvcc extension (when built with the kernel) reject
    bad input with the same errors naming the argument, each rule checked on CPU tensors
    (devices are checked last);
(c) without a GPU: the kernel text itself (plan -> attention -> reduce, both schedules, paged
    and dense stores, all formats, GQA) runs on the CPU under a thread-per-CUDA-thread
    emulation (g++, warp shuffles through a per-warp exchange buffer), with the argument tuples
    the JIT path builds, against kv_format.dequantize_kv + decode_attention_reference;
(d) on a GPU: the nvcc build and the cupy JIT path against the same reference.
"""
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvrtc_helpers import nvrtc_or_skip
from pykernels import kv_format
from pykernels.reference import decode_attention_reference

kvc = importlib.import_module("pykernels.cuda.kv_attention")
ROOT = Path(__file__).resolve().parent.parent
FMTS = ["int8", "int4", "int2", "fp8"]
_BITS = {"int8": 8, "int4": 4, "int2": 2, "fp8": "fp8"}


# ---- cases ------------------------------------------------------------------------------------
def make_case(fmt, gs, D, Hkv, G, regions, *, S=None, paged=True, fp_dtype=torch.float16, q_dtype=torch.float32,
              out_dtype=None, seed=0, device="cpu"):
    """A quantized cache holding sequences with regions [(n_sink, n_quant, n_res), ...].

    -> (kwargs of decode_attention_kv, ref_out float64 [B, Hq, D], ref_lse [B, Hq]). The
    reference attends K / V = sink rows | kv_format.dequantize_kv(store) | residual rows in
    float64. Unused fp rows are NaN and unused store slots have NaN scales, so any read outside
    the regions shows up as NaN in the output."""
    g = torch.Generator().manual_seed(seed)
    bits = _BITS[fmt]
    B, Hq = len(regions), Hkv * G
    nqmax = max(r[1] for r in regions)
    if S is None:
        S = max(gs, 2 * gs) if paged else max(gs, nqmax)
    npages = [-(-r[1] // S) for r in regions]
    P = sum(npages) + 2 if paged else B
    F = max(r[0] + r[2] for r in regions) + 2
    RB = kv_format.row_bytes(bits, D)
    NG = kv_format.num_value_groups(D, gs)
    nan16 = torch.tensor(float("nan"), dtype=torch.float16)
    k_codes = torch.randint(0, 256, (P, Hkv, S, RB), generator=g, dtype=torch.uint8)
    v_codes = torch.randint(0, 256, (P, Hkv, S, RB), generator=g, dtype=torch.uint8)
    if fmt == "fp8":
        k_scale = torch.full((P, Hkv, S // gs), float("nan"))
        v_scale = torch.full((P, Hkv, S // gs), float("nan"))
        k_zero = v_zero = None
    else:
        k_scale = nan16.repeat(P, Hkv, S // gs, D)
        k_zero = nan16.repeat(P, Hkv, S // gs, D)
        v_scale = nan16.repeat(P, Hkv, S, NG)
        v_zero = nan16.repeat(P, Hkv, S, NG)
    fp_k = torch.full((B, F, Hkv, D), float("nan"), dtype=fp_dtype)
    fp_v = torch.full((B, F, Hkv, D), float("nan"), dtype=fp_dtype)
    maxp = max(max(npages), 1) + 1
    block_table = torch.full((B, maxp), -1, dtype=torch.int32)
    perm = torch.randperm(P, generator=g).tolist()
    L_max = max(sum(r) for r in regions)
    k_ref = torch.full((B, L_max, Hkv, D), float("nan"), dtype=torch.float64)
    v_ref = torch.full((B, L_max, Hkv, D), float("nan"), dtype=torch.float64)
    nxt = 0
    for b, (ns, nq, nr) in enumerate(regions):
        kf = torch.randn(ns + nr, Hkv, D, generator=g).to(fp_dtype)
        vf = torch.randn(ns + nr, Hkv, D, generator=g).to(fp_dtype)
        fp_k[b, :ns + nr], fp_v[b, :ns + nr] = kf, vf
        k_ref[b, :ns], v_ref[b, :ns] = kf[:ns].double(), vf[:ns].double()
        k_ref[b, ns + nq:ns + nq + nr], v_ref[b, ns + nq:ns + nq + nr] = kf[ns:].double(), vf[ns:].double()
        if nq == 0:
            continue
        # a spread of magnitudes per channel so that scales differ between groups
        kq = torch.randn(Hkv, nq, D, generator=g) * (1 + 3 * torch.rand(1, 1, D, generator=g))
        vq = torch.randn(Hkv, nq, D, generator=g)
        f = kv_format.quantize_kv(kq, vq, bits, gs)
        kd, vd = kv_format.dequantize_kv(f, bits, gs, D)  # [Hkv, nq, D] float32
        k_ref[b, ns:ns + nq] = kd.transpose(0, 1).double()
        v_ref[b, ns:ns + nq] = vd.transpose(0, 1).double()
        for j in range(npages[b]):
            if paged:
                pid = perm[nxt]
                nxt += 1
                block_table[b, j] = pid
            else:
                pid = b
            t0, t1 = j * S, min((j + 1) * S, nq)
            n = t1 - t0
            k_codes[pid, :, :n] = f["k_codes"][:, t0:t1]
            v_codes[pid, :, :n] = f["v_codes"][:, t0:t1]
            if fmt == "fp8":
                k_scale[pid, :, :n // gs] = f["k_scale"][:, t0 // gs:t1 // gs]
                v_scale[pid, :, :n // gs] = f["v_scale"][:, t0 // gs:t1 // gs]
            else:
                k_scale[pid, :, :n // gs] = f["k_scale"][:, t0 // gs:t1 // gs]
                k_zero[pid, :, :n // gs] = f["k_zero"][:, t0 // gs:t1 // gs]
                v_scale[pid, :, :n] = f["v_scale"][:, t0:t1]
                v_zero[pid, :, :n] = f["v_zero"][:, t0:t1]
    q = torch.randn(B, Hq, D, generator=g).to(q_dtype)
    seqlens = torch.tensor([sum(r) for r in regions], dtype=torch.int32)
    ref_out, ref_lse = decode_attention_reference(q.double(), k_ref, v_ref, seqlens, None, None, return_lse=True,
                                                  compute_dtype=torch.float64)
    dev = torch.device(device)

    def to(t):
        return None if t is None else t.to(dev)

    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=dev)  # noqa: E731
    kw = dict(q=to(q), k_codes=to(k_codes), k_scale=to(k_scale), k_zero=to(k_zero), v_codes=to(v_codes),
              v_scale=to(v_scale), v_zero=to(v_zero), fp_k=to(fp_k), fp_v=to(fp_v),
              block_table=to(block_table) if paged else None,
              n_sink=i32([r[0] for r in regions]), n_quant=i32([r[1] for r in regions]),
              n_res=i32([r[2] for r in regions]),
              out=torch.full((B, Hq, D), float("nan"), dtype=out_dtype or q_dtype, device=dev),
              lse=torch.full((B, Hq), float("nan"), device=dev), scale=D ** -0.5, fmt=fmt, group_size=gs)
    return kw, ref_out, ref_lse


# The store is dequantized in fp32 (an FMA against the reference's two roundings) and the rest
# is fp32 accumulation: ~1e-6 relative; plus rounding of a 16-bit output.
ATOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LSE_ATOL = 1e-4


def check(out, lse, ref_out, ref_lse, what=""):
    for name, got, want, tol in (("out", out, ref_out, ATOL[out.dtype]), ("lse", lse, ref_lse, LSE_ATOL)):
        got = got.double().cpu()
        assert torch.isfinite(got).all(), f"{what} {name}: non-finite at {torch.nonzero(~torch.isfinite(got))[:5].tolist()}"
        err = (got - want).abs()
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        assert err.max() <= tol, (f"{what} {name}: max |diff| {float(err.max()):.3g} > {tol} at {idx}: "
                                  f"got {float(got[idx])}, want {float(want[idx])}")


# ---- (a) NVRTC, no GPU needed -------------------------------------------------------------------
def test_every_kernel_instantiation_compiles_with_nvrtc():
    nvrtc_or_skip()
    names = kvc.kernel_names()
    assert len(names) == 4 * 3 * 4 + 2  # formats x lanes-per-D x heads-per-pass, + plan, reduce
    for arch in ("sm_80", "sm_90"):  # -G: the full front end and PTX generation, unoptimised (fast)
        sizes = kvc.compile_nvrtc(arch, optimize=False)
        assert sorted(sizes) == sorted(names)
        assert all(s > 0 for s in sizes.values())


def test_kernels_compile_optimised_with_nvrtc():
    # what the JIT path runs: optimised PTX of the largest instantiation of every format
    nvrtc_or_skip()
    names = [kvc._kernel_name(f, 8, 8) for f in kvc.FORMATS.values()] + [kvc._kernel_name(2, 2, 1)]
    for arch in ("sm_80", "sm_90"):
        assert sorted(kvc.compile_nvrtc(arch, names)) == sorted(names)


def test_compile_error_reports_the_nvrtc_log(monkeypatch):
    nvrtc_or_skip()
    monkeypatch.setattr(kvc, "kernel_source", lambda: "this is not C++;\n")
    with pytest.raises(RuntimeError, match="NVRTC failed"):
        kvc.compile_nvrtc("sm_80", optimize=False)


def test_source_inlines_the_headers_and_reuses_the_attention_body():
    src = kvc.kernel_source()
    quoted = [ln for ln in src.splitlines() if ln.lstrip().startswith("#") and "include" in ln and '"' in ln]
    assert quoted == [], quoted
    for name in ("kv_code_in_word", "kv_fp8_to_fp16_bits", "kv_dequant", "decode_attention_body", "merge_lse",
                 "decode_attention_plan_kernel", "decode_attention_reduce_kernel", "decode_attention_kv_kernel"):
        assert name in src


def test_kernel_config_covers_the_instantiations():
    names = set(kvc.kernel_names())
    for D in range(8, 257, 8):
        for G in (1, 2, 3, 4, 5, 8, 12, 64):
            epl, gb = kvc.kernel_config(D, G)
            assert D <= 32 * epl
            for f in kvc.FORMATS.values():
                assert kvc._kernel_name(f, epl, gb) in names


def test_import_touches_neither_cupy_nor_the_extension():
    code = "import sys, pykernels.cuda.kv_attention; print('cupy' in sys.modules, 'pykernels._cuda' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"]


def test_available_never_raises_and_explains():
    ok, reason = kvc.available()
    assert isinstance(ok, bool) and "pykernels._cuda" in reason and "cupy" in reason
    if not torch.cuda.is_available():
        assert not ok and "fix:" in reason


def test_build_py_ships_the_kernel_source(tmp_path):
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env={**__import__("os").environ, "PYKERNELS_CUDA": "0"})
    assert res.returncode == 0, res.stdout + res.stderr
    root = tmp_path / "pykernels" / "_csrc"
    for rel in ("include/pykernels/kv_quant.h", "cuda/kv_attention.cuh", "cuda/decode_attention.cuh"):
        assert (root / rel).is_file(), f"{rel} missing from the built package"


# ---- (b) bad input, CPU tensors --------------------------------------------------------------
def _native_or_skip():
    try:
        m = importlib.import_module("pykernels._cuda")
    except ImportError as e:
        pytest.skip(f"pykernels._cuda not built (nvcc absent or PYKERNELS_CUDA=0): {e}")
    # built from this tree: a module without the kernel is a stale build, a failure, not a skip
    assert hasattr(m, "decode_attention_kv"), "pykernels._cuda has no decode_attention_kv: stale build, run `make build`"
    return m


def _base(fmt="int4", paged=True):
    kw, _, _ = make_case(fmt, 32, 64, 2, 2, [(2, 64, 3), (0, 32, 1)], paged=paged)
    return dict(kw, method="split", num_splits=2, num_workers=3, tile=32)


def _bad_calls():
    """(what, fmt, changes, exception, message start): one per rule, each on CPU tensors."""
    k = _base()
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    bt_bad = k["block_table"].clone()
    bt_bad[1, 0] = k["k_codes"].shape[0]
    return [
        ("method", "int4", dict(method="stream"), ValueError, "method: expected 'lean' or 'split'"),
        ("tile", "int4", dict(tile=0), ValueError, "tile: expected >= 1"),
        ("num_workers", "int4", dict(num_workers=0), ValueError, "num_workers: expected >= 1"),
        ("num_splits", "int4", dict(num_splits=0), ValueError, "num_splits: expected >= 1"),
        ("scale", "int4", dict(scale=float("inf")), ValueError, "scale: must be finite"),
        ("fmt", "int4", dict(fmt="int3"), ValueError, "fmt: expected 'int8', 'int4', 'int2' or 'fp8'"),
        ("group_size", "int4", dict(group_size=48), ValueError, "group_size: expected one of (32, 64, 128)"),
        ("not a tensor", "int4", dict(k_scale=[1.0]), TypeError, "k_scale: "),
        ("q ndim", "int4", dict(q=torch.zeros(2, 64)), ValueError, "q: expected 3 dimensions"),
        ("q dtype", "int4", dict(q=torch.zeros(2, 4, 64, dtype=torch.float64)), TypeError, "q: expected float32"),
        ("head_dim", "int4", dict(q=torch.zeros(2, 4, 60)), ValueError, "q: head_dim 60 is not supported"),
        ("head_dim max", "int4", dict(q=torch.zeros(2, 4, 264)), ValueError, "q: head_dim 264 is not supported"),
        ("codes dtype", "int4", dict(k_codes=k["k_codes"].to(torch.int8)), TypeError, "k_codes: expected uint8"),
        ("gqa", "int4", dict(q=torch.zeros(2, 3, 64)), ValueError, "q: num_heads 3 is not a multiple"),
        ("row bytes", "int4", dict(fmt="int8"), ValueError, "k_codes: expected 64 bytes per row"),
        ("page tokens", "int4", dict(group_size=128), ValueError, "k_codes: page_tokens 64 is not a positive multiple"),
        ("v_codes shape", "int4", dict(v_codes=k["v_codes"][:, :, :32].contiguous()), ValueError,
         "v_codes: expected shape"),
        ("k_zero missing", "int4", dict(k_zero=None), ValueError, "k_zero: required for the integer formats"),
        ("k_scale dtype", "int4", dict(k_scale=k["k_scale"].float()), TypeError, "k_scale: expected float16"),
        ("v_zero shape", "int4", dict(v_zero=k["v_zero"][..., :1, :]), ValueError, "v_zero: expected shape"),
        ("k_scale layout", "int4", dict(k_scale=k["k_scale"].transpose(0, 1).contiguous().transpose(0, 1)),
         ValueError, "k_scale: expected a contiguous tensor"),
        ("fp8 zeros", "fp8", dict(k_zero=torch.zeros(1)), ValueError, "k_zero: must be None for fp8"),
        ("fp8 scale dtype", "fp8", dict(v_scale=torch.zeros(6, 2, 64 // 32, dtype=torch.float16)), TypeError,
         "v_scale: expected float32"),
        ("fp_k shape", "int4", dict(fp_k=k["fp_k"][:, :, :1].contiguous()), ValueError, "fp_k: expected shape [B=2"),
        ("fp_k dtype", "int4", dict(fp_k=k["fp_k"].to(torch.int32)), TypeError, "fp_k: expected float32"),
        ("fp_k stride", "int4", dict(fp_k=k["fp_k"].transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
         "fp_k: last dimension must have stride 1"),
        ("fp_v dtype", "int4", dict(fp_v=k["fp_v"].float()), TypeError, "fp_v: dtype float32 differs"),
        ("fp_v shape", "int4", dict(fp_v=k["fp_v"][:, :2]), ValueError, "fp_v: shape"),
        ("block_table dtype", "int4", dict(block_table=k["block_table"].long()), ValueError,
         "block_table: expected int32 [2, max_pages]"),
        ("dense store pages", "int4", dict(block_table=None, k_codes=k["k_codes"][:1], v_codes=k["v_codes"][:1],
                                           k_scale=k["k_scale"][:1], k_zero=k["k_zero"][:1],
                                           v_scale=k["v_scale"][:1], v_zero=k["v_zero"][:1]), ValueError,
         "k_codes: without a block_table"),
        ("n_sink dtype", "int4", dict(n_sink=k["n_sink"].long()), ValueError, "n_sink: expected int32 [2]"),
        ("n_res shape", "int4", dict(n_res=i32([1, 1, 1])), ValueError, "n_res: expected int32 [2]"),
        ("out shape", "int4", dict(out=torch.zeros(2, 4, 32)), ValueError, "out: expected shape [B, Hq, D]"),
        ("out contiguous", "int4", dict(out=torch.zeros(2, 64, 4).transpose(1, 2)), ValueError,
         "out: expected a contiguous tensor"),
        ("lse dtype", "int4", dict(lse=torch.zeros(2, 4, dtype=torch.float64)), ValueError, "lse: expected float32 [B, Hq]"),
        ("n_sink negative", "int4", dict(n_sink=i32([2, -1])), ValueError, "n_sink: n_sink[1] = -1 is negative"),
        ("n_quant group", "int4", dict(n_quant=i32([64, 16])), ValueError,
         "n_quant: n_quant[1] = 16 is not a multiple of group_size 32"),
        ("n_quant capacity", "int4", dict(n_quant=i32([64, 32 * 64])), ValueError,
         "n_quant: n_quant[1] = 2048 exceeds the store capacity"),
        ("fp rows", "int4", dict(n_res=i32([3, 100])), ValueError, "n_res: n_sink[1] + n_res[1] = 100 exceeds"),
        ("empty sequence", "int4", dict(n_quant=i32([64, 0]), n_res=i32([3, 0])), ValueError,
         "n_res: sequence 1 has no tokens"),
        ("page id", "int4", dict(block_table=bt_bad), ValueError, "block_table: block_table[1, 0] = "),
        ("device", "int4", {}, ValueError, "q: the CUDA backend needs CUDA tensors"),
    ]


def _impls_cpu():
    return ["jit", "native"]


@pytest.mark.parametrize("impl", _impls_cpu())
def test_launchers_reject_bad_input_naming_the_argument(impl):
    if impl == "native":
        _native_or_skip()
    for what, fmt, change, exc, msg in _bad_calls():
        kw = dict(_base(fmt), **change)
        with pytest.raises(exc) as info:
            kvc.decode_attention_kv(**kw, impl=impl)
        assert str(info.value).startswith(msg), f"{what}: {info.value!r}"


@pytest.mark.parametrize("impl", _impls_cpu())
def test_launchers_accept_the_good_arguments_up_to_the_device_check(impl):
    # the base case passes every rule but the device one, in every format, paged or dense
    if impl == "native":
        _native_or_skip()
    for fmt in FMTS:
        for paged in (True, False):
            with pytest.raises(ValueError, match=r"^q: the CUDA backend needs CUDA tensors"):
                kvc.decode_attention_kv(**_base(fmt, paged), impl=impl)


def test_fp8_codes_may_be_float8_tensors():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("torch without float8_e4m3fn")
    kw = _base("fp8")
    kw["k_codes"] = kw["k_codes"].view(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"^q: the CUDA backend needs CUDA tensors"):
        kvc.decode_attention_kv(**kw, impl="jit")


# ---- (c) the kernel text on the CPU -------------------------------------------------------------
# One std::thread per CUDA thread; std::barrier for __syncthreads / __syncwarp; a warp shuffle
# writes its value to a per-warp exchange buffer between two warp barriers; `static` locals for
# __shared__ (CTAs run one after another); blockIdx / gridDim globals, threadIdx thread_local.
_EMU_SRC = r"""
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
struct Dim { unsigned x = 0, y = 0, z = 0; };
thread_local Dim threadIdx;
Dim blockIdx, gridDim;
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
static std::unique_ptr<std::barrier<>> g_block;
static std::vector<std::unique_ptr<std::barrier<>>> g_warps;
static float g_xchg[8][32];
inline void __syncthreads() { g_block->arrive_and_wait(); }
inline void __syncwarp() { g_warps[threadIdx.x >> 5]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  g_warps[w]->arrive_and_wait();
  g_xchg[w][l] = v;
  g_warps[w]->arrive_and_wait();
  return g_xchg[w][l ^ o];
}
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#include "kv_attention.cuh"
namespace ck = pykernels::cuda_kernels;
typedef pk_i64 ll;

template <class Fn>
void run_grid(unsigned grid, int threads, Fn fn) {
  gridDim.x = grid;
  for (unsigned blk = 0; blk < grid; ++blk) {
    blockIdx.x = blk;
    g_block.reset(new std::barrier<>(threads));
    g_warps.clear();
    for (int w = 0; w < threads / 32; ++w) g_warps.emplace_back(new std::barrier<>(32));
    std::vector<std::thread> th;
    for (int i = 0; i < threads; ++i) th.emplace_back([=] { threadIdx.x = (unsigned)i; fn(); });
    for (auto& h : th) h.join();
  }
}

extern "C" void emu_plan(const int32_t* sl, ll sls, ll B, ll Hkv, ll tile, ll cap, ll ns, ll* cum, ll* sb) {
  run_grid(1, ck::kPlanThreads, [=] { ck::decode_attention_plan_kernel(sl, sls, B, Hkv, tile, cap, ns, cum, sb); });
}
extern "C" void emu_reduce(unsigned grid, const ll* cum, const ll* sb, const float* po, const float* pl, ll nsl,
                           void* out, ll odt, float* lse, ll B, ll Hq, ll Hkv, ll D, ll mode, ll nsp, ll W) {
  run_grid(grid, ck::kThreads, [=] {
    ck::decode_attention_reduce_kernel(cum, sb, po, pl, nsl, out, odt, lse, B, Hq, Hkv, D, mode, nsp, W);
  });
}

#define KV_PARAMS const void* q, ll q_s0, ll q_s1, ll q_s2, ll q_dtype, const unsigned char* kc, const void* ks, \
  const pk_u16* kz, const unsigned char* vc, const void* vs, const pk_u16* vz, const void* fk, const void* fv,      \
  ll fk_s0, ll fk_s1, ll fk_s2, ll fv_s0, ll fv_s1, ll fv_s2, ll fp_dtype, ll F, const int32_t* bt, ll bt_stride,  \
  ll max_pages, ll P, ll S, ll gs_shift, const int32_t* meta, ll capacity, const ll* cum, const ll* sb, void* out,  \
  ll out_dtype, float* lse, float* po, float* pl, ll nsl, ll B, ll Hq, ll Hkv, ll D, ll tile, ll mode, ll nsp,      \
  float scale, ll vec
#define KV_ARGS q, q_s0, q_s1, q_s2, q_dtype, kc, ks, kz, vc, vs, vz, fk, fv, fk_s0, fk_s1, fk_s2, fv_s0, fv_s1,    \
  fv_s2, fp_dtype, F, bt, bt_stride, max_pages, P, S, gs_shift, meta, capacity, cum, sb, out, out_dtype, lse, po,  \
  pl, nsl, B, Hq, Hkv, D, tile, mode, nsp, scale, vec

#define PK_CASE(FM, E, G) \
  if (fmt == FM && epl == E && gb == G) { \
    run_grid(grid, ck::kThreads, [=] { ck::decode_attention_kv_kernel<FM, E, G>(KV_ARGS); }); return 0; }
extern "C" int emu_kv(int fmt, int epl, int gb, unsigned grid, KV_PARAMS) {
  PK_CASES
  return 1;
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    import ctypes
    import shutil

    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found (needed to emulate the CUDA kernel on the CPU)")
    d = tmp_path_factory.mktemp("kv_emu")
    probe = d / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    if subprocess.run([cxx, "-std=c++20", "-pthread", str(probe), "-o", str(d / "probe")],
                      capture_output=True).returncode != 0:
        pytest.skip("g++ without C++20 <barrier> support")
    include_dir, cuda_dir = kvc._source_roots()
    cases = " ".join(f"PK_CASE({f}, {e}, {g})" for f, e, g in sorted(EMU_INSTANCES))
    (d / "emu.cpp").write_text(_EMU_SRC.replace("PK_CASES", cases))
    lib = d / "emu.so"
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-fno-strict-aliasing", "-shared", "-fPIC", "-pthread",
                        f"-I{include_dir}", f"-I{cuda_dir}", str(d / "emu.cpp"), "-o", str(lib)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    emu = ctypes.CDLL(str(lib))
    return emu


def _ctype(x):
    import ctypes

    import numpy as np

    if isinstance(x, np.uint64):
        return ctypes.c_uint64(int(x))
    if isinstance(x, np.float32):
        return ctypes.c_float(float(x))
    return ctypes.c_longlong(int(x))


def emulate(emu, kw, method, num_splits, num_workers, tile):
    """Run plan -> attention -> reduce through the emulator with the argument tuples the JIT
    path builds (kvc._prepare, every check but the device one), on CPU tensors."""
    args = dict(kw, method=method, num_splits=num_splits, num_workers=num_workers, tile=tile)
    names = ("q", "k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "fp_k", "fp_v", "block_table",
             "n_sink", "n_quant", "n_res", "out", "lse", "scale", "fmt", "group_size", "method", "num_splits",
             "num_workers", "tile")
    p = kvc._prepare(*[args[n] for n in names], check_devices=False)
    assert (p["fmt_code"], p["epl"], p["gb"]) in EMU_INSTANCES, "instantiation missing from the emulator"
    emu.emu_plan(*[_ctype(x) for x in p["plan_args"]])
    rc = emu.emu_kv(p["fmt_code"], p["epl"], p["gb"], p["grid"], *[_ctype(x) for x in p["kv_args"]])
    assert rc == 0
    if p["num_slots"] > 0:
        emu.emu_reduce(p["nseg"], *[_ctype(x) for x in p["reduce_args"]])
    return kw["out"], kw["lse"]


# (fmt, gs, D, Hkv, G, regions, S, paged, fp dtype, q dtype, out dtype, method, num_splits, workers, tile)
EMU_CASES = [
    # pages crossed inside a warp step (n_sink odd), a sequence without store, tiles cut by
    # the schedule at any token
    ("int4", 32, 64, 2, 4, [(3, 128, 5), (0, 128, 17), (4, 0, 9)], 64, True, torch.float16, torch.float32,
     torch.float32, "split", 3, 5, 64),
    ("int4", 32, 64, 2, 4, [(3, 128, 5), (0, 128, 17), (4, 0, 9)], 64, True, torch.float16, torch.float32,
     torch.float32, "lean", 3, 5, 48),
    # G = 12: two passes of 8 heads over the same K / V
    ("int8", 64, 128, 1, 12, [(1, 192, 3), (0, 64, 0)], 64, True, torch.bfloat16, torch.bfloat16,
     torch.float32, "lean", 3, 4, 64),
    ("int2", 32, 40, 2, 1, [(2, 96, 1), (5, 32, 2)], None, False, torch.float32, torch.float16,
     torch.float32, "split", 2, 3, 32),
    ("fp8", 32, 256, 1, 2, [(2, 64, 7)], 32, True, torch.float16, torch.float32, torch.float32,
     "lean", 3, 3, 32),
    ("int4", 128, 136, 2, 3, [(0, 128, 0), (6, 0, 0)], 128, True, torch.float32, torch.float32,
     torch.float16, "split", 4, 3, 128),
]
EMU_INSTANCES = {(kvc.FORMATS[c[0]],) + kvc.kernel_config(c[2], c[4]) for c in EMU_CASES} | {
    (kvc.FORMATS["fp8"],) + kvc.kernel_config(64, 4)}  # test_kernel_scalar_load_paths_emulated_on_cpu


@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: f"{c[0]}-gs{c[1]}-D{c[2]}-G{c[4]}-{c[11]}-{'paged' if c[7] else 'dense'}")
def test_kernel_logic_emulated_on_cpu(emulator, case):
    fmt, gs, D, Hkv, G, regions, S, paged, fdt, qdt, odt, method, nsp, W, tile = case
    kw, ref_out, ref_lse = make_case(fmt, gs, D, Hkv, G, regions, S=S, paged=paged, fp_dtype=fdt, q_dtype=qdt,
                                     out_dtype=odt, seed=D + G)
    out, lse = emulate(emulator, kw, method, nsp, W, tile)
    check(out, lse, ref_out, ref_lse, f"emulated {fmt} {method}")


def _unaligned(kw, device="cpu"):
    """Codes at an odd byte offset, fp rows with an odd padded stride and K scales / zeros at
    a 2-byte offset: the kernels must take the scalar load paths (vec flags off)."""
    for name in ("k_codes", "v_codes", "k_scale", "k_zero"):
        t = kw[name]
        if t is None:
            continue
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        kw[name] = view
    for name in ("fp_k", "fp_v"):
        t = kw[name]
        pad = torch.full(t.shape[:-1] + (t.shape[-1] + 1,), float("nan"), dtype=t.dtype, device=device)[..., :-1]
        pad.copy_(t)
        kw[name] = pad
    return kw


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_kernel_scalar_load_paths_emulated_on_cpu(emulator, fmt):
    kw, ref_out, ref_lse = make_case(fmt, 32, 64, 2, 4, [(3, 128, 5), (0, 64, 2)], S=64, fp_dtype=torch.float16,
                                     seed=7)
    kw = _unaligned(kw)
    p = kvc._prepare(*[dict(kw, method="lean", num_splits=1, num_workers=3, tile=64)[n] for n in (
        "q", "k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "fp_k", "fp_v", "block_table",
        "n_sink", "n_quant", "n_res", "out", "lse", "scale", "fmt", "group_size", "method", "num_splits",
        "num_workers", "tile")], check_devices=False)
    assert int(p["kv_args"][-1]) == 0, "expected every vector-load flag off"
    out, lse = emulate(emulator, kw, "lean", 1, 3, 64)
    check(out, lse, ref_out, ref_lse, f"emulated {fmt} scalar loads")


# ---- (d) on a GPU -------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def _impls():
    out = []
    try:
        if hasattr(importlib.import_module("pykernels._cuda"), "decode_attention_kv"):
            out.append("native")
    except ImportError:
        pass
    if importlib.util.find_spec("cupy") is not None:
        out.append("jit")
    return out or ["none"]


REGIONS = [(4, 1024, 100), (0, 32, 1), (4, 0, 3), (0, 2048, 0), (1, 4096, 128)]


@gpu
@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("method", ["lean", "split"])
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "dense"])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("fmt", FMTS)
def test_gpu_parity(impl, fmt, G, paged, method):
    if impl == "none":
        pytest.skip("neither pykernels._cuda (with decode_attention_kv) nor cupy is available")
    gs = 32
    kw, ref_out, ref_lse = make_case(fmt, gs, 128, 2, G, REGIONS, S=256 if paged else None, paged=paged,
                                     fp_dtype=torch.bfloat16, q_dtype=torch.float16, out_dtype=torch.float32,
                                     seed=G, device="cuda")
    kvc.decode_attention_kv(**kw, method=method, num_splits=8, num_workers=37, tile=64, impl=impl)
    torch.cuda.synchronize()
    check(kw["out"], kw["lse"], ref_out, ref_lse, f"cuda[{impl}] {fmt} G={G} {method}")


@gpu
@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("D", [8, 40, 64, 96, 128, 200, 256])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("fmt", FMTS)
def test_gpu_head_dims_and_groups(impl, fmt, gs, D):
    if impl == "none":
        pytest.skip("neither pykernels._cuda (with decode_attention_kv) nor cupy is available")
    regions = [(3, 2 * gs, 5), (0, 8 * gs, gs + 1), (2, gs, 0)]
    for method in ("lean", "split"):
        kw, ref_out, ref_lse = make_case(fmt, gs, D, 2, 3, regions, S=2 * gs, fp_dtype=torch.float16,
                                         q_dtype=torch.bfloat16, out_dtype=torch.bfloat16, seed=D, device="cuda")
        kvc.decode_attention_kv(**kw, method=method, num_splits=3, num_workers=7, impl=impl)
        torch.cuda.synchronize()
        check(kw["out"], kw["lse"], ref_out, ref_lse, f"cuda[{impl}] {fmt} gs={gs} D={D} {method}")


@gpu
@pytest.mark.parametrize("impl", _impls())
def test_gpu_side_stream_and_unaligned_views(impl):
    if impl == "none":
        pytest.skip("neither pykernels._cuda (with decode_attention_kv) nor cupy is available")
    kw, ref_out, ref_lse = make_case("int4", 32, 96, 2, 4, [(2, 320, 7), (0, 64, 1)], S=64, fp_dtype=torch.float32,
                                     device="cuda")
    kw = _unaligned(kw, "cuda")  # the scalar load paths
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kvc.decode_attention_kv(**kw, method="lean", num_workers=5, impl=impl)
    s.synchronize()
    check(kw["out"], kw["lse"], ref_out, ref_lse, f"cuda[{impl}] side stream, unaligned")


@gpu
@pytest.mark.parametrize("impl", _impls())
def test_gpu_bad_values_raise(impl):
    if impl == "none":
        pytest.skip("neither pykernels._cuda (with decode_attention_kv) nor cupy is available")
    kw, _, _ = make_case("int8", 32, 64, 2, 2, [(2, 64, 3), (0, 32, 1)], device="cuda")
    bad = kw["block_table"].clone()
    bad[0, 0] = -3  # a page sequence 0 uses (its 64 quantized tokens fill page 0 of 64 tokens)
    with pytest.raises(ValueError, match=r"^block_table: block_table\[0, 0\] = -3"):
        kvc.decode_attention_kv(**dict(kw, block_table=bad), impl=impl)
    with pytest.raises(ValueError, match=r"^n_quant: n_quant\[1\] = 40 is not a multiple"):
        kvc.decode_attention_kv(**dict(kw, n_quant=torch.tensor([64, 40], dtype=torch.int32, device="cuda")),
                                impl=impl)
    with pytest.raises(ValueError, match=r"^n_sink: the CUDA backend needs CUDA tensors"):
        kvc.decode_attention_kv(**dict(kw, n_sink=kw["n_sink"].cpu()), impl=impl)
