"""Triton decode attention over the quantized KV cache (pykernels.triton.kv_attention), in the
triton interpreter.

Stores are built with ``kv_format.quantize_kv`` directly in the page layout [P, Hkv, S, ...]
(dense = one page per sequence, block_table [[0], [1], ..]; paged = shuffled page ids). The
oracle is ``pykernels.reference.decode_attention_reference`` in float64 over the concatenated
[sink fp rows | kv_format.dequantize_kv of the used store tokens | residual fp rows].

Everything the kernel must not read is poisoned: fp rows past n_sink + n_res are NaN, store
slots past n_quant hold random code bytes with NaN scales / zeros, and unused block-table
entries point at a spare page that is entirely such garbage. Any read past the lengths
therefore turns the output NaN. Shapes are small because the interpreter runs in numpy.
"""
import os

# PK_TRITON_TEST_DEVICE=cuda: the kernel cases run compiled on a GPU instead of in the
# interpreter (test_compiled_on_gpu at the end starts that run when a GPU is present).
from triton_device import DEVICE, run_compiled_on_gpu  # noqa: E402  (sets TRITON_INTERPRET first)
from triton_device import to_device as _to_device  # noqa: E402

import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from pykernels import kv_format  # noqa: E402
from pykernels.reference import decode_attention_reference  # noqa: E402
from pykernels.triton.kv_attention import available, decode_attention_kv  # noqa: E402

FMTS = ["int8", "int4", "int2", "fp8"]
METHODS = ["split", "lean"]


# Tests of the launcher's checks and of the interpreter itself: they run in the interpreter only
# (the PK_TRITON_TEST_DEVICE=cuda run checks the kernels' results on the GPU).
interpreter_only = pytest.mark.skipif(DEVICE != "cpu", reason="interpreter-side test (this run: kernels on the GPU)")


def _bits(fmt):
    return "fp8" if fmt == "fp8" else int(fmt[3:])


def make_case(fmt, gs, D, Hq, Hkv, counts, *, page_tokens=None, fp_dtype=torch.float32, q_dtype=None,
              seed=0):
    """counts: [(n_sink, n_quant, n_res)] per sequence. page_tokens None: dense store (one page
    of the whole capacity per sequence, block_table [[0], [1], ..]); else paged with shuffled
    page ids. Returns (args dict for decode_attention_kv minus out/lse/schedule, reference K, V
    [B, Lmax, Hkv, D] float64, lengths)."""
    g = torch.Generator().manual_seed(seed)
    bits = _bits(fmt)
    B = len(counts)
    nq = [c[1] for c in counts]
    if page_tokens is None:
        S = max(gs, -(-max(nq) // gs) * gs + gs)  # capacity > n_quant: trailing slots unused
        P = B
        bt = torch.arange(B, dtype=torch.int32)[:, None]
        npages = [1] * B
    else:
        S = page_tokens
        npages = [-(-n // S) for n in nq]
        P = sum(npages) + 1  # + one spare page that stays garbage
        perm = torch.randperm(P, generator=g)
        bt = torch.full((B, max(npages) + 1), int(perm[-1]), dtype=torch.int32)  # unused -> spare
        nxt = 0
        for b in range(B):
            for j in range(npages[b]):
                bt[b, j] = int(perm[nxt])
                nxt += 1
    # keys with per-channel offsets and spreads (the KIVI setting); values plain
    k = torch.randn(P, Hkv, S, D, generator=g) * (0.5 + 2 * torch.rand(D, generator=g)) + torch.randn(D, generator=g)
    v = torch.randn(P, Hkv, S, D, generator=g)
    f = kv_format.quantize_kv(k, v, bits, gs)
    used = torch.zeros(P, S, dtype=torch.bool)
    for b in range(B):
        for j in range(npages[b] if nq[b] else 0):
            used[int(bt[b, j]), : min(S, nq[b] - j * S)] = True
    gused = used[:, ::gs]  # n_quant is a multiple of gs: groups are wholly used or unused
    nan = float("nan")
    for name in ("k_codes", "v_codes"):
        c = f[name].permute(0, 2, 1, 3)
        c[~used] = torch.randint(0, 256, c[~used].shape, generator=g, dtype=torch.uint8)
    if bits == "fp8":
        f["k_scale"].permute(0, 2, 1)[~gused] = nan
        f["v_scale"].permute(0, 2, 1)[~gused] = nan
    else:
        f["k_scale"].permute(0, 2, 1, 3)[~gused] = nan
        f["k_zero"].permute(0, 2, 1, 3)[~gused] = nan
        f["v_scale"].permute(0, 2, 1, 3)[~used] = nan
        f["v_zero"].permute(0, 2, 1, 3)[~used] = nan
    kd, vd = kv_format.dequantize_kv(f, bits, gs, D)  # [P, Hkv, S, D] fp32 (NaN where unused)

    F = max(c[0] + c[2] for c in counts) + 2
    fp_k = torch.randn(B, F, Hkv, D, generator=g).to(fp_dtype)
    fp_v = torch.randn(B, F, Hkv, D, generator=g).to(fp_dtype)
    for b, (ns, _, nr) in enumerate(counts):
        fp_k[b, ns + nr:] = nan
        fp_v[b, ns + nr:] = nan
    q = torch.randn(B, Hq, D, generator=g).to(q_dtype or fp_dtype)

    lengths = [sum(c) for c in counts]
    K = torch.full((B, max(lengths), Hkv, D), nan, dtype=torch.float64)
    V = torch.full_like(K, nan)
    for b, (ns, n, nr) in enumerate(counts):
        u = torch.arange(n)
        pages = bt[b, u // S].long()
        Kq = kd[pages, :, u % S]  # [n, Hkv, D]
        Vq = vd[pages, :, u % S]
        K[b, : ns + n + nr] = torch.cat([fp_k[b, :ns].double(), Kq.double(), fp_k[b, ns:ns + nr].double()])
        V[b, : ns + n + nr] = torch.cat([fp_v[b, :ns].double(), Vq.double(), fp_v[b, ns:ns + nr].double()])
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    args = dict(q=q, k_codes=f["k_codes"], k_scale=f["k_scale"], k_zero=f["k_zero"], v_codes=f["v_codes"],
                v_scale=f["v_scale"], v_zero=f["v_zero"], fp_k=fp_k, fp_v=fp_v, block_table=bt,
                n_sink=i32([c[0] for c in counts]), n_quant=i32(nq), n_res=i32([c[2] for c in counts]),
                fmt=fmt, group_size=gs)
    return args, K, V, lengths


# Tolerances: the kernel dequantizes every code to the same fp32 value as kv_format.dequantize_kv
# (up to an FMA in scale * code + zero, <= 1 fp32 ulp of the value) and runs the scores, the
# online softmax and P @ V in fp32 ("ieee" dots, no 16-bit rounding of K, V or P). Against the
# float64 reference on the same dequantized values, the only differences are fp32 rounding in a
# different summation order (~1e-7 relative per operation, a few dozen operations deep), hence
# 2e-5. A 16-bit out adds one final round-to-nearest: half an ulp, 2^-11 (fp16) / 2^-8 (bf16)
# relative. lse is fp32 in every case.
FP32_TOL = 2e-5
OUT_RTOL = {torch.float32: FP32_TOL, torch.float16: 2.0 ** -11 + FP32_TOL, torch.bfloat16: 2.0 ** -8 + FP32_TOL}


def assert_close(name, got, ref, atol, rtol):
    got = got.double()
    bad = ~((got - ref).abs() <= atol + rtol * ref.abs())  # NaN counts as bad
    if bad.any():
        err = torch.where(torch.isnan(got), torch.full_like(got, math.inf), (got - ref).abs() - rtol * ref.abs())
        idx = tuple(int(i) for i in torch.unravel_index(torch.argmax(err), got.shape))
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} elements differ; worst at {idx}: "
                             f"got {got[idx].item()!r}, expected {ref[idx].item()!r} (atol={atol}, rtol={rtol})")


def run_and_check(args, K, V, lengths, method, *, num_splits=3, num_workers=5, tile=16, scale=None,
                  out_dtype=None, **kw):
    q = args["q"]
    B, Hq, D = q.shape
    out = torch.full((B, Hq, D), float("nan"), dtype=out_dtype or q.dtype, device=DEVICE)  # every element must be written
    lse = torch.full((B, Hq), float("nan"), dtype=torch.float32, device=DEVICE)
    dargs = {k: (_to_device(t) if isinstance(t, torch.Tensor) else t) for k, t in args.items()}
    decode_attention_kv(**dargs, out=out, lse=lse, scale=scale, method=method, num_splits=num_splits,
                        num_workers=num_workers, tile=tile, **kw)
    out, lse = out.cpu(), lse.cpu()
    scale = 1.0 / math.sqrt(D) if scale is None else scale  # None: the kernel's default
    ref_out, ref_lse = decode_attention_reference(q.double(), K, V, torch.tensor(lengths), None, scale,
                                                  return_lse=True, compute_dtype=torch.float64)
    assert_close("out", out, ref_out, FP32_TOL, OUT_RTOL[out.dtype])
    assert_close("lse", lse, ref_lse.double(), FP32_TOL, FP32_TOL)


# sink > 0 crossing a tile edge, a sequence without a store (n_quant 0), one without fp rows
def _counts(gs):
    return [(5, 2 * gs, 7), (3, 0, 9), (0, gs, 0)]


@pytest.mark.parametrize("gs", [32, 128])
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("method", METHODS)
def test_formats_paged(method, fmt, gs):
    # pages of gs tokens: a 2-group store spans two shuffled pages
    args, K, V, lengths = make_case(fmt, gs, 80, 8, 2, _counts(gs), page_tokens=gs, seed=gs + len(fmt))
    run_and_check(args, K, V, lengths, method, tile=32)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("method", METHODS)
def test_formats_dense(method, fmt):
    args, K, V, lengths = make_case(fmt, 32, 64, 4, 1, [(2, 64, 3), (0, 32, 1)], seed=3)
    run_and_check(args, K, V, lengths, method, num_splits=2, num_workers=3)


@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (8, 2)], ids=["G1", "G4"])
@pytest.mark.parametrize("method", METHODS)
def test_head_dims_and_gqa(method, Hq, Hkv, D):
    fmt = {64: "int2", 80: "int4", 128: "int8"}[D]
    args, K, V, lengths = make_case(fmt, 32, D, Hq, Hkv, [(1, 64, 4), (0, 32, 17)], page_tokens=64,
                                    seed=D + Hq)
    run_and_check(args, K, V, lengths, method)


def test_head_dim_256_fp8():
    args, K, V, lengths = make_case("fp8", 32, 256, 4, 2, [(3, 32, 2)], page_tokens=32, seed=256)
    run_and_check(args, K, V, lengths, "lean", num_workers=2)


# the sink / store / residual boundaries at every position relative to a 16-token tile
@pytest.mark.parametrize("n_sink", [0, 1, 15, 16, 17])
def test_region_boundaries(n_sink):
    args, K, V, lengths = make_case("int4", 32, 64, 4, 2, [(n_sink, 64, 5), (n_sink, 32, 0)], page_tokens=32,
                                    seed=n_sink)
    for method in METHODS:
        run_and_check(args, K, V, lengths, method, num_splits=4, num_workers=4, tile=16)


def test_fp_rows_only_and_store_only():
    # F = 2 (only poisoned rows) for store-only sequences; fp-only sequences never touch a page
    args, K, V, lengths = make_case("int8", 32, 64, 4, 2, [(0, 64, 0), (0, 32, 0)], page_tokens=32, seed=7)
    for method in METHODS:
        run_and_check(args, K, V, lengths, method)
    args, K, V, lengths = make_case("int4", 32, 64, 4, 2, [(4, 0, 30), (0, 0, 1)], page_tokens=32, seed=8)
    for method in METHODS:
        run_and_check(args, K, V, lengths, method)


def test_no_pages_and_no_fp_rows():
    # a store with no pages at all and an empty block table (n_quant 0 everywhere)
    args, K, V, lengths = make_case("int4", 32, 64, 4, 2, [(4, 0, 30), (0, 0, 1)], page_tokens=32, seed=8)
    empty = kv_format.quantize_kv(torch.randn(0, 2, 32, 64), torch.randn(0, 2, 32, 64), 4, 32)
    args.update({k: empty[k] for k in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")})
    args["block_table"] = torch.zeros(2, 0, dtype=torch.int32)
    for method in METHODS:
        run_and_check(args, K, V, lengths, method)
    # fp_k / fp_v with zero rows (no sink, no residual)
    args, K, V, lengths = make_case("fp8", 32, 64, 4, 2, [(0, 64, 0), (0, 32, 0)], page_tokens=32, seed=7)
    args["fp_k"], args["fp_v"] = args["fp_k"][:, :0], args["fp_v"][:, :0]
    for method in METHODS:
        run_and_check(args, K, V, lengths, method)


# Schedules: one chunk / one worker (no merge), ranges crossing segment boundaries, more splits
# than tiles (S' = min(S, n)), more workers than tiles (empty ranges between owners).
@pytest.mark.parametrize("tile", [16, 64, 8, 48])  # any int >= 1: 8 < BF = 16, 48 not a power of 2
@pytest.mark.parametrize("num_splits,num_workers", [(1, 1), (2, 3), (64, 64)])
def test_schedules(tile, num_splits, num_workers):
    args, K, V, lengths = make_case("int2", 32, 64, 4, 2, [(3, 96, 4), (0, 32, 0), (1, 0, 1)], page_tokens=64,
                                    seed=tile + num_workers)
    for method in METHODS:
        run_and_check(args, K, V, lengths, method, num_splits=num_splits, num_workers=num_workers, tile=tile)


def test_huge_split_and_worker_counts_are_clamped():
    """num_splits / num_workers far beyond the tile count give the same result without sizing
    the launch or the partial-state buffers by them (10**9 slots would not fit in memory)."""
    args, K, V, lengths = make_case("int4", 32, 64, 4, 2, [(3, 96, 4), (0, 32, 0)], page_tokens=64, seed=5)
    for method in METHODS:
        run_and_check(args, K, V, lengths, method, num_splits=10**9, num_workers=10**9, tile=16)


@pytest.mark.parametrize("fp_dtype,q_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)], ids=["fp16", "bf16", "bf16-q32"])
@pytest.mark.parametrize("method", METHODS)
def test_dtypes(method, fp_dtype, q_dtype):
    args, K, V, lengths = make_case("int4", 32, 64, 8, 2, [(4, 32, 6), (0, 64, 3)], page_tokens=32,
                                    fp_dtype=fp_dtype, q_dtype=q_dtype, seed=11)
    run_and_check(args, K, V, lengths, method)


@pytest.mark.parametrize("method", METHODS)
def test_conveniences_of_the_cuda_backend(method):
    # block_table None (sequence b -> page b), fp8 codes as float8_e4m3fn, scale None (D ** -0.5),
    # default schedule sizes, and an out dtype (bf16) other than q's (fp32)
    args, K, V, lengths = make_case("fp8", 32, 64, 4, 2, [(3, 64, 2), (0, 32, 5)], seed=13)
    assert args["block_table"].tolist() == [[0], [1]]
    args["block_table"] = None
    args["k_codes"] = args["k_codes"].view(torch.float8_e4m3fn)
    args["v_codes"] = args["v_codes"].view(torch.float8_e4m3fn)
    run_and_check(args, K, V, lengths, method, out_dtype=torch.bfloat16, num_splits=8, num_workers=None,
                  tile=None)


@pytest.mark.parametrize("method", METHODS)
def test_strided_inputs(method):
    args, K, V, lengths = make_case("int4", 32, 64, 8, 2, [(3, 64, 5), (2, 32, 0)], page_tokens=32, seed=12)
    args["q"] = args["q"].transpose(1, 2).contiguous().transpose(1, 2)  # stride(2) != 1
    for name in ("fp_k", "fp_v"):  # padded head and row strides
        t = args[name]
        big = torch.full((t.shape[0], t.shape[1] + 1, t.shape[2] + 1, t.shape[3] + 8), float("nan"))
        big[:, 1:, 1:, : t.shape[3]] = t
        args[name] = big[:, 1:, 1:, : t.shape[3]]
    for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):  # pages of a bigger pool
        t = args[name]
        big = torch.zeros((2 * t.shape[0], *t.shape[1:]), dtype=t.dtype)
        big[1::2] = t
        args[name] = big[1::2]
    bt = args["block_table"]
    args["block_table"] = torch.cat([bt, torch.zeros_like(bt)], dim=1)[:, : bt.shape[1]]  # row stride != width
    run_and_check(args, K, V, lengths, method, scale=0.3)


# ------------------------------------------------------------------------------ bad inputs

def _valid_call():
    args, _, _, _ = make_case("int4", 32, 64, 4, 2, [(2, 32, 3)], page_tokens=32, seed=1)
    B, Hq, D = args["q"].shape
    args.update(out=torch.empty(B, Hq, D), lse=torch.empty(B, Hq), scale=0.125, method="lean", num_splits=1,
                num_workers=2, tile=16)
    return args


def _fp8_with_zero(a):
    f = kv_format.quantize_kv(torch.randn(2, 2, 32, 64), torch.randn(2, 2, 32, 64), "fp8", 32)
    a.update(k_codes=f["k_codes"], v_codes=f["v_codes"], k_scale=f["k_scale"], v_scale=f["v_scale"], fmt="fp8")
    a["v_zero"] = None  # k_zero stays an (int-format) tensor


BAD = {
    "fmt": lambda a: a.update(fmt="int3"),
    "group_size": lambda a: a.update(group_size=16),
    "q": lambda a: a.update(q=a["q"][0]),
    "q-dtype": lambda a: a.update(q=a["q"].to(torch.int32)),
    "q-heads": lambda a: a.update(q=a["q"][:, :3], out=a["out"][:, :3].contiguous(), lse=a["lse"][:, :3].contiguous()),
    "q-head_dim": lambda a: a.update(q=torch.randn(1, 4, 264)),
    "k_codes": lambda a: a.update(k_codes=a["k_codes"].to(torch.int8)),
    "k_codes-row_bytes": lambda a: a.update(fmt="int8"),
    "k_codes-page_tokens": lambda a: a.update(group_size=64),
    "v_codes": lambda a: a.update(v_codes=a["v_codes"][:, :, :16]),
    "k_scale": lambda a: a.update(k_scale=a["k_scale"].float()),
    "v_scale": lambda a: a.update(v_scale=a["v_scale"][..., :1]),
    "k_zero": lambda a: a.update(k_zero=None),
    "v_zero": lambda a: a.update(v_zero=a["v_zero"][:1]),
    "k_zero-fp8": _fp8_with_zero,
    "fp_k": lambda a: a.update(fp_k=a["fp_k"][..., :32]),
    "fp_v": lambda a: a.update(fp_v=a["fp_v"][:, :1]),
    "fp_k-dtype": lambda a: a.update(fp_k=a["fp_k"].double()),
    "block_table": lambda a: a.update(block_table=a["block_table"].long()),
    "block_table-range": lambda a: a["block_table"].fill_(99),
    "n_sink": lambda a: a.update(n_sink=a["n_sink"].long()),
    "n_sink-negative": lambda a: a["n_sink"].fill_(-1),
    "n_quant": lambda a: a["n_quant"].fill_(16),
    "n_quant-capacity": lambda a: a["n_quant"].fill_(128),
    "n_res": lambda a: a["n_res"].fill_(100),
    "n_res-empty": lambda a: (a["n_sink"].zero_(), a["n_quant"].zero_(), a["n_res"].zero_()),
    "out": lambda a: a.update(out=a["out"][:, :2]),
    "out-dtype": lambda a: a.update(out=a["out"].to(torch.int32)),
    "lse": lambda a: a.update(lse=a["lse"][:, :2]),
    "scale": lambda a: a.update(scale=float("nan")),
    "method": lambda a: a.update(method="auto"),
    "num_splits": lambda a: a.update(num_splits=0),
    "num_workers": lambda a: a.update(num_workers=0),
    "tile": lambda a: a.update(tile=0),
    "k_scale-device": lambda a: a.update(k_scale=a["k_scale"].to("meta")),
}


@interpreter_only
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_name_the_argument(case):
    a = _valid_call()
    BAD[case](a)
    name = case.split("-")[0]
    if case == "n_res-empty":
        name = "n_res"
    with pytest.raises((ValueError, TypeError), match=rf"^{name}\b"):
        decode_attention_kv(**a)


@interpreter_only
def test_valid_call_passes():
    a = _valid_call()
    decode_attention_kv(**a)
    assert torch.isfinite(a["out"]).all() and torch.isfinite(a["lse"]).all()


@interpreter_only
def test_available_in_interpreter():
    ok, reason = available()
    assert ok, reason
    assert "interpreter" in reason


@interpreter_only
def test_import_without_triton_does_not_fail():
    # a missing triton is a reason from available(), never an import error
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "from pykernels.triton.kv_attention import available\n"
            "ok, reason = available(); assert not ok and 'triton' in reason, reason; print(reason)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr


_COMPILE = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
import pykernels.triton.kv_attention as m

fails, n = [], 0
# int4 covers the shift / mask unpacking (int8 / int2 only change constants); fp8 the bitcast decode
for arch, bits, dt, D, fn in ((90, 4, "bf16", 80, m._kv_split_kernel), (80, 0, "fp16", 256, m._kv_lean_kernel)):
    sc = "*fp32" if bits == 0 else "*fp16"
    types = dict(q_ptr=f"*{dt}", kc_ptr="*u8", vc_ptr="*u8", ks_ptr=sc, kz_ptr=sc, vs_ptr=sc, vz_ptr=sc,
                 fpk_ptr=f"*{dt}", fpv_ptr=f"*{dt}", bt_ptr="*i32", ns_ptr="*i32", nq_ptr="*i32",
                 len_ptr="*i32", cum_ptr="*i64", out_ptr=f"*{dt}", lse_ptr="*fp32", po_ptr="*fp32",
                 plse_ptr="*fp32", qk_scale="fp32")
    DP = 1 << (D - 1).bit_length()
    cap = 64 if DP <= 128 else 32
    meta = dict(HKV=2, G=4, D=D, G_PAD=16, D_PAD=DP, TILE=64 if bits else 48, BITS=bits, GS=32, BQ=min(32, cap), BF=min(64, cap))
    sig = {a: ("constexpr" if a in meta else types.get(a, "i32")) for a in fn.arg_names}
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs=meta), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": 8 if DP >= 256 else 4})
        assert k.asm["cubin"]
        n += 1
    except Exception as e:
        fails.append(f"{fn.__name__} sm_{arch} bits={bits} {dt}: {e!r}"[:3000])
for f in fails:
    print("FAIL", f)
print(f"compiled {n} kernels, {len(fails)} failures")
"""


@interpreter_only
def test_kernels_compile_for_gpu_without_a_gpu():
    """The interpreter skips GPU-only rules (layouts, dot shapes, bitcasts): compile the split and
    lean kernels for sm_80 / sm_90 down to a cubin, across formats, in a subprocess without
    TRITON_INTERPRET."""
    import pykernels

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(pykernels.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "compiled 2 kernels, 0 failures" in r.stdout, r.stdout


@pytest.mark.skipif(DEVICE != "cpu" or not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_compiled_on_gpu():
    """This module's kernel cases again, compiled by Triton and run on the GPU."""
    run_compiled_on_gpu(__file__)
