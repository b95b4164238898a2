"""Triton decode attention (pykernels.triton.decode_attention) in the triton interpreter.

Both schedules ("split" flash-decoding, "lean" stream-K), dense and paged caches, GQA 1/4/8,
odd lengths, fp32/fp16/bf16, against a float64 reference. Unused cache slots (and unused
block-table entries, which point at an all-NaN block) are NaN, so any read past seqlens shows.
Shapes are small because the interpreter runs every program in numpy.
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

from pykernels.triton.decode_attention import available, decode_attention  # noqa: E402


# ---------------------------------------------------------------------------------------------
# reference: softmax(q k^T * scale) v and lse = logsumexp(q k^T * scale), in float64.
# reads B*L*Hkv*D K and V elements once per query head (no GQA sharing); fine for an oracle.
def reference(q, k, v, lengths, scale):
    """q [B, Hq, D]; k, v logical dense [B, Lmax, Hkv, D]; returns (out [B, Hq, D], lse [B, Hq]) f64."""
    B, Hq, D = q.shape
    G = Hq // k.shape[2]
    out = torch.empty(B, Hq, D, dtype=torch.float64)
    lse = torch.empty(B, Hq, dtype=torch.float64)
    for b, L in enumerate(lengths):
        kb = k[b, :L].double().repeat_interleave(G, dim=1)  # [L, Hq, D]; query head i uses kv head i // G
        vb = v[b, :L].double().repeat_interleave(G, dim=1)
        s = torch.einsum("hd,lhd->hl", q[b].double(), kb) * scale
        lse[b] = torch.logsumexp(s, dim=-1)
        out[b] = torch.einsum("hl,lhd->hd", torch.exp(s - lse[b][:, None]), vb)
    return out, lse


# |out - ref| <= atol + rtol * |ref|, per output dtype:
# - fp32: fp32 accumulation and exp2/log2 rounding only (~1e-7 relative per op).
# - fp16: rtol covers rounding the output to fp16 (half ulp <= 2^-11 relative); atol covers the
#   probabilities being rounded to fp16 before the P@V dot (2^-11 relative per term, times |v|).
# - bf16: the same two roundings with an 8-bit significand (2^-8 relative each); the interpreter
#   path is tighter still and is checked bit-for-bit in test_bf16_output_is_rounded_to_nearest.
# lse is always fp32, computed from fp32-accumulated dots of the (already rounded) inputs.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5, lse=2e-5),
    torch.float16: dict(atol=2e-3, rtol=1e-3, lse=1e-4),
    torch.bfloat16: dict(atol=1e-2, rtol=8e-3, lse=1e-4),
}


def assert_close(name, got, ref, atol, rtol):
    """Compare in float64; on failure name the worst element's index."""
    got = got.double()
    bad = ~((got - ref).abs() <= atol + rtol * ref.abs())  # NaN counts as bad
    if bad.any():
        err = torch.where(torch.isnan(got), torch.full_like(got, math.inf), (got - ref).abs() - rtol * ref.abs())
        idx = tuple(int(i) for i in torch.unravel_index(torch.argmax(err), got.shape))
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} elements differ; worst at {idx}: "
                             f"got {got[idx].item()!r}, expected {ref[idx].item()!r} (atol={atol}, rtol={rtol})")


def make_inputs(lengths, Hq, Hkv, D, dtype, block_size=None, seed=0, q_dtype=None):
    """Random q and a KV cache holding `lengths` tokens per sequence; everything else is NaN.

    Returns q, k_cache, v_cache, block_table (None when dense), k, v (logical dense
    [B, Lmax, Hkv, D] copies of the stored values for the reference)."""
    g = torch.Generator().manual_seed(seed)
    B, Lmax = len(lengths), max(lengths) + 3
    q = torch.randn(B, Hq, D, generator=g).to(q_dtype or dtype)
    k = torch.randn(B, Lmax, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, Lmax, Hkv, D, generator=g).to(dtype)
    for b, L in enumerate(lengths):
        k[b, L:] = float("nan")
        v[b, L:] = float("nan")
    if block_size is None:
        return q, k.clone(), v.clone(), None, k, v
    nblocks = [-(-L // block_size) for L in lengths]
    num_blocks = sum(nblocks) + 2  # two spare blocks stay NaN
    perm = torch.randperm(num_blocks, generator=g)  # shuffled, non-contiguous block ids
    k_cache = torch.full((num_blocks, block_size, Hkv, D), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    # unused table entries point at a NaN block: reading one (instead of masking) poisons the result
    block_table = torch.full((B, max(nblocks) + 1), int(perm[-1]), dtype=torch.int32)
    nxt = 0
    for b, L in enumerate(lengths):
        for j in range(nblocks[b]):
            blk = int(perm[nxt])
            nxt += 1
            block_table[b, j] = blk
            rows = min(block_size, L - j * block_size)
            k_cache[blk, :rows] = k[b, j * block_size: j * block_size + rows]
            v_cache[blk, :rows] = v[b, j * block_size: j * block_size + rows]
    return q, k_cache, v_cache, block_table, k, v


def run_and_check(q, k_cache, v_cache, block_table, k, v, lengths, method, *, num_splits=3,
                  num_workers=5, tile=16, scale=None):
    B, Hq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out = torch.full((B, Hq, D), float("nan"), dtype=q.dtype, device=DEVICE)  # every element must be written
    lse = torch.full((B, Hq), float("nan"), dtype=torch.float32, device=DEVICE)
    dq, dk, dv, dbt = (_to_device(t) for t in (q, k_cache, v_cache, block_table))
    decode_attention(dq, dk, dv, seqlens, dbt, out, lse, scale, method, num_splits, num_workers, tile)
    out, lse = out.cpu(), lse.cpu()
    ref_out, ref_lse = reference(q, k, v, lengths, scale)
    tol = TOL[q.dtype]
    assert_close("out", out, ref_out, tol["atol"], tol["rtol"])
    assert_close("lse", lse, ref_lse, tol["lse"], tol["lse"])


METHODS = ["split", "lean"]


# Tests of the launcher's checks and of the interpreter itself: they run in the interpreter only
# (the PK_TRITON_TEST_DEVICE=cuda run checks the kernels' results on the GPU).
interpreter_only = pytest.mark.skipif(DEVICE != "cpu", reason="interpreter-side test (this run: kernels on the GPU)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [None, 16, 5], ids=["dense", "paged16", "paged5"])
@pytest.mark.parametrize("method", METHODS)
def test_layouts_and_dtypes(method, block_size, dtype):
    lengths = [1, 17, 300]
    args = make_inputs(lengths, 8, 2, 80, dtype, block_size, seed=1)
    run_and_check(*args, lengths, method)


@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa4", "mqa8"])
@pytest.mark.parametrize("method", METHODS)
def test_gqa_and_head_dims(method, Hq, Hkv, D):
    lengths = [17, 70, 1]
    args = make_inputs(lengths, Hq, Hkv, D, torch.float16, block_size=5, seed=D + Hq * Hkv)
    run_and_check(*args, lengths, method, num_splits=2, num_workers=4)


@pytest.mark.parametrize("lengths", [[1], [17], [300], [1, 17, 300], [300, 1, 1, 17]],
                         ids=lambda x: "-".join(map(str, x)))
@pytest.mark.parametrize("method", METHODS)
def test_lengths(method, lengths):
    args = make_inputs(lengths, 4, 1, 64, torch.float32, seed=sum(lengths))
    run_and_check(*args, lengths, method)


# Schedules: num_splits above the tile count (S' = min(S, n)), num_workers of 1 (no merge),
# ranges crossing segment boundaries, and W above the total tile count (empty worker ranges
# between the first and last owner of a segment).
@pytest.mark.parametrize("tile", [16, 32, 64])
@pytest.mark.parametrize("num_splits,num_workers", [(1, 1), (2, 2), (4, 3), (7, 7), (64, 64)])
def test_schedules(tile, num_splits, num_workers):
    lengths = [1, 17, 300, 33]
    args = make_inputs(lengths, 4, 2, 64, torch.float32, block_size=16, seed=tile)
    for method in METHODS:
        run_and_check(*args, lengths, method, num_splits=num_splits, num_workers=num_workers, tile=tile)


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_huge_split_and_worker_counts_are_clamped(paged):
    """num_splits / num_workers far beyond the tile count: same result, and neither the launch
    nor the partial-state buffers are sized by them (10**9 slots would not fit in memory)."""
    lengths = [1, 17, 300]
    args = make_inputs(lengths, 4, 2, 64, torch.float32, block_size=16 if paged else None, seed=3)
    for method in METHODS:
        run_and_check(*args, lengths, method, num_splits=10**9, num_workers=10**9, tile=16)


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("method", METHODS)
def test_strided_inputs(method, paged):
    lengths = [9, 130]
    q, k_cache, v_cache, bt, k, v = make_inputs(lengths, 8, 2, 80, torch.float16, 7 if paged else None, seed=5)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # q [B, Hq, D] with stride(2) != 1
    assert q.stride(2) != 1

    def pad_heads(c):  # same values, but head and row strides that are not those of a packed tensor
        big = torch.full((c.shape[0], c.shape[1], c.shape[2] + 1, c.shape[3] + 16), float("nan"), dtype=c.dtype)
        big[:, :, 1:, :c.shape[3]] = c
        return big[:, :, 1:, :c.shape[3]]

    k_cache, v_cache = pad_heads(k_cache), pad_heads(v_cache)
    if bt is not None:
        bt = torch.cat([bt, torch.zeros_like(bt)], dim=1)[:, : bt.shape[1]]  # row stride != width
    run_and_check(q, k_cache, v_cache, bt, k, v, lengths, method, scale=0.3)


@pytest.mark.parametrize("method", METHODS)
def test_q_dtype_differs_from_cache(method):
    # fp16 q against a bf16 cache: dots run in fp32; output tolerance is fp16's
    lengths = [17, 40]
    args = make_inputs(lengths, 8, 2, 64, torch.bfloat16, block_size=None, seed=9, q_dtype=torch.float16)
    run_and_check(*args, lengths, method)


@interpreter_only
@pytest.mark.parametrize("method", METHODS)
def test_bf16_output_is_rounded_to_nearest(method):
    # The interpreter holds bf16 as raw uint16: its dots on bf16 are garbage and its fp32 -> bf16
    # cast truncates. The launcher works around both there (fp32 dots, torch rounds the output),
    # so the result must be the float64 reference rounded to nearest bf16, up to values that sit
    # within fp32 noise of a rounding boundary. Truncation would make about half the elements
    # differ by one ulp, which the tolerance above cannot see.
    lengths = [1, 17, 300]
    q, k_cache, v_cache, bt, k, v = make_inputs(lengths, 8, 2, 64, torch.bfloat16, block_size=5, seed=3)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    lse = torch.empty(3, 8)
    decode_attention(q, k_cache, v_cache, seqlens, bt, out, lse, 0.125, method, 3, 5, 16)
    ref = reference(q, k, v, lengths, 0.125)[0].to(torch.bfloat16)
    same = (out.view(torch.int16) == ref.view(torch.int16)).double().mean().item()
    assert same > 0.99, f"only {same:.1%} of bf16 outputs equal the correctly rounded reference"
    assert_close("out", out, ref.double(), 0.0, 2.0 ** -7)  # the rest is off by at most one ulp


@interpreter_only
@pytest.mark.parametrize("tile", [8, 24, 48, 0])
def test_tile_must_be_power_of_two_at_least_16(tile):
    q, k_cache, v_cache, _, _, _ = make_inputs([5], 4, 4, 64, torch.float32)
    out, lse = torch.empty_like(q), torch.empty(1, 4)
    with pytest.raises(ValueError, match="tile"):
        decode_attention(q, k_cache, v_cache, torch.tensor([5], dtype=torch.int32), None, out, lse,
                         0.125, "split", 1, 1, tile)


@interpreter_only
def test_available_in_interpreter():
    ok, reason = available()
    assert ok, reason
    assert "interpreter" in reason


@interpreter_only
def test_import_without_triton_does_not_fail():
    # a missing triton is a reason from available(), never an import error
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "from pykernels.triton.decode_attention import available\n"
            "ok, reason = available(); assert not ok and 'triton' in reason, reason; print(reason)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr


@interpreter_only
def test_kernels_compile_for_gpu_without_a_gpu():
    """The interpreter does not check GPU-only rules (layouts, shared memory, dot shapes):
    compile every kernel for sm_80 and sm_90 down to a cubin, in a subprocess without
    TRITON_INTERPRET."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    import pykernels  # run against the same pykernels this session imported

    root = os.path.dirname(os.path.dirname(os.path.abspath(pykernels.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "compiled 16 kernels, 0 failures" in r.stdout, r.stdout


@pytest.mark.skipif(DEVICE != "cpu" or not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_compiled_on_gpu():
    """This module's kernel cases again, compiled by Triton and run on the GPU."""
    run_compiled_on_gpu(__file__)



@interpreter_only
def test_interpreter_self_check(monkeypatch):
    """available() runs a one-off loop with a loaded bound in the interpreter: Triton 3.6's
    interpreter fails there under NumPy 2.5 (int() of a 1-element array), and then every kernel
    would fail; the backend is then unavailable with that reason instead."""
    from pykernels.triton import _runtime

    assert _runtime.interpreter_problem() is None  # the installed triton runs it
    monkeypatch.setattr(_runtime, "_LOOP_CHECK", [])

    class Broken:
        def __getitem__(self, grid):
            def run(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return run

    monkeypatch.setattr(_runtime, "_loop_probe", Broken())
    ok, why = available()
    assert not ok and "cannot run a loop with a loaded bound" in why and "0-dimensional" in why
    assert _runtime.interpreter_problem() == why  # decided once per process


@interpreter_only
def test_launchers_run_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: the launchers make the first tensor's device
    current for the call when it is not (a q on cuda:1 while cuda:0 is current); no device switch
    for CPU tensors or when the device is already current. Simulated: no GPU here."""
    import contextlib
    from types import SimpleNamespace

    from pykernels.triton import _runtime

    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(str(dev))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    seen = []
    run = _runtime.launch_on_device(lambda t, x: seen.append((t, x)) or "ran")
    on1 = SimpleNamespace(device=torch.device("cuda", 1))
    assert run(on1, 5) == "ran" and entered == ["cuda:1"] and seen == [(on1, 5)]
    assert run(SimpleNamespace(device=torch.device("cuda", 0)), 6) == "ran" and entered == ["cuda:1"]
    assert run(torch.zeros(1), 7) == "ran" and entered == ["cuda:1"] and len(seen) == 3
    assert run(t=on1, x=8) == "ran" and entered == ["cuda:1", "cuda:1"]  # passed by keyword
    from pykernels.triton import decode_attention as da, kv_attention as kv, lut_gemv as lg
    assert all(getattr(f, "__wrapped__", None) is not None
               for f in (da.decode_attention, kv.decode_attention_kv, lg.lut_gemv))
