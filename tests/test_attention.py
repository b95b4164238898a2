"""Decode attention on the CPU backend (every ISA variant this machine runs) and the
reference backend, against a float64 oracle."""
import math
import os
import subprocess
import sys

import pytest
import torch

import pykernels as pk
from pykernels import backends
from attention_ref import ATOL, RTOL, assert_close, check_attention, make_dense, make_paged, oracle

_C = pytest.importorskip("pykernels._C", reason="pykernels._C not built: run `make test`")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MIXED = [1, 17, 1000, 4097]  # odd lengths, one batch


@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["lean", "split", "auto"])
@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_matrix(isa, layout, dtype, method, ratio):
    B, Hkv, D = len(MIXED), 2, 128
    q = torch.randn(B, Hkv * ratio, D).to(dtype)
    if layout == "dense":
        k, v = make_dense(B, max(MIXED) + 3, Hkv, D, dtype, MIXED)
        bt = None
    else:
        k, v, bt = make_paged(B, Hkv, D, dtype, MIXED, block_size=16)
    out, lse = pk.decode_attention(q, k, v, torch.tensor(MIXED), block_table=bt, method=method,
                                   num_splits=3 if method == "split" else None, return_lse=True, backend="cpu")
    check_attention(out, lse, q, k, v, MIXED, bt)


@pytest.mark.parametrize("D", [64, 72, 80, 96, 128, 256])
@pytest.mark.parametrize("method", ["lean", "split"])
def test_head_dims(isa, D, method):
    lens = [17, 300, 5]
    q = torch.randn(3, 8, D, dtype=torch.bfloat16)
    k, v = make_dense(3, 301, 2, D, torch.bfloat16, lens)
    out, lse = pk.decode_attention(q, k, v, torch.tensor(lens), method=method, return_lse=True)
    check_attention(out, lse, q, k, v, lens)


@pytest.mark.parametrize("block_size", [1, 5, 16, 33])
@pytest.mark.parametrize("method", ["lean", "split"])
def test_paged_block_sizes(block_size, method):
    lens = [1, 17, 130, 64]
    q = torch.randn(4, 8, 64, dtype=torch.float16)
    k, v, bt = make_paged(4, 2, 64, torch.float16, lens, block_size)
    out, lse = pk.decode_attention(q, k, v, torch.tensor(lens, dtype=torch.int64), block_table=bt,
                                   method=method, return_lse=True)
    check_attention(out, lse, q, k, v, lens, bt)


@pytest.mark.parametrize("nthreads", [1, 2, 3, 7])
@pytest.mark.parametrize("num_splits", [1, 2, 5, 1000])
def test_threads_and_splits(threads, nthreads, num_splits):
    threads(nthreads)
    lens = [4097, 1, 33, 700, 64, 65]
    q = torch.randn(6, 4, 128)
    k, v = make_dense(6, 4100, 1, 128, torch.float32, lens)
    for method in ("lean", "split"):
        out, lse = pk.decode_attention(q, k, v, torch.tensor(lens), method=method, num_splits=num_splits,
                                       return_lse=True)
        check_attention(out, lse, q, k, v, lens)


def test_strided_inputs_scale_and_out():
    """Non-contiguous q, caches that are views with gaps, mixed q/cache dtypes, out= given."""
    lens = [9, 200]
    qbig = torch.randn(2, 16, 2, 64, dtype=torch.float32)
    q = qbig[:, ::2, 1, :]                                  # [2, 8, 64], strided
    kbig = torch.randn(2, 256, 4, 64, dtype=torch.bfloat16)
    vbig = torch.randn(2, 256, 4, 64, dtype=torch.bfloat16)
    k, v = kbig[:, 10:220, 1:3], vbig[:, 3:213, ::2]        # [2, 210, 2, 64] views
    k[0, 9:] = float("nan")
    v[0, 9:] = float("nan")
    out = torch.empty(2, 8, 64)
    o2, lse = pk.decode_attention(q, k, v, torch.tensor(lens), scale=0.3, out=out, return_lse=True)
    assert o2.data_ptr() == out.data_ptr()
    check_attention(out, lse, q, k, v, lens, scale=0.3)


def test_reference_backend_matches_cpu():
    lens = [5, 77]
    q = torch.randn(2, 8, 64)
    k, v = make_dense(2, 80, 2, 64, torch.float32, lens)
    a = pk.decode_attention(q, k, v, torch.tensor(lens), backend="reference")
    b = pk.decode_attention(q, k, v, torch.tensor(lens), backend="cpu")
    assert_close(a, b, 1e-5)


def test_numpy_inputs_through_dlpack():
    np = pytest.importorskip("numpy")
    lens = [3, 8]
    q = torch.randn(2, 4, 64)
    k, v = make_dense(2, 8, 1, 64, torch.float32, lens)
    out = pk.decode_attention(q.numpy(), k.numpy(), v.numpy(), np.array(lens))
    check_attention(out, oracle(q, k, v, lens)[1], q, k, v, lens)


# ---------------------------------------------------------------------------------------------
# merge_states


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_states_random_splits(dtype):
    L, Hkv, D = 1000, 2, 64
    q = torch.randn(1, 8, D).to(dtype)
    k, v = make_dense(1, L, Hkv, D, dtype, [L], nan_fill=False)
    full, full_lse = oracle(q, k, v, [L])
    for cut in (1, 17, 500, 999):
        oa, la = pk.decode_attention(q, k[:, :cut], v[:, :cut], torch.tensor([cut]), return_lse=True)
        ob, lb = pk.decode_attention(q, k[:, cut:], v[:, cut:], torch.tensor([L - cut]), return_lse=True)
        o, lse = pk.merge_states(oa, la, ob, lb)
        assert o.dtype == dtype and lse.dtype == torch.float32
        # Two roundings to the dtype: the partials (half an ulp of |o_a|, |o_b|, carried with
        # weights w_a, w_b) and the merged output (half an ulp of |o|).
        wa = torch.exp(la.double() - full_lse.double()).unsqueeze(-1)
        wb = torch.exp(lb.double() - full_lse.double()).unsqueeze(-1)
        bound = ATOL[dtype] + RTOL[dtype] * (wa * oa.double().abs() + wb * ob.double().abs() + full.double().abs())
        err = (o.double() - full.double()).abs()
        assert (err <= bound).all(), f"cut {cut}: max excess {float((err - bound).max()):.3g}"
        assert_close(lse, full_lse, 1e-4, what="lse")


def test_merge_states_properties():
    o = [torch.randn(3, 5, 32, dtype=torch.float64) for _ in range(3)]
    l = [torch.randn(3, 5) * 3 for _ in range(3)]
    ab_c = pk.merge_states(*pk.merge_states(o[0], l[0], o[1], l[1]), o[2], l[2])
    a_bc = pk.merge_states(o[0], l[0], *pk.merge_states(o[1], l[1], o[2], l[2]))
    ba = pk.merge_states(o[1], l[1], o[0], l[0])
    ab = pk.merge_states(o[0], l[0], o[1], l[1])
    assert_close(ab_c[0], a_bc[0], 1e-6)
    assert_close(ab_c[1], a_bc[1], 1e-5, what="lse")
    assert_close(ab[0], ba[0], 1e-12)
    # an empty side (lse = -inf) is the identity; two empty sides give zeros and -inf
    empty = torch.full((3, 5), float("-inf"))
    e = pk.merge_states(o[0], l[0], torch.full_like(o[0], float("nan")).nan_to_num(7.0), empty)
    assert_close(e[0], o[0], 1e-6)
    z = pk.merge_states(o[0], empty, o[1], empty)
    assert torch.equal(z[0], torch.zeros_like(z[0])) and torch.isneginf(z[1]).all()


def test_merge_states_errors():
    o, l = torch.randn(2, 4, 8), torch.randn(2, 4)
    with pytest.raises(ValueError, match="o_b"):
        pk.merge_states(o, l, torch.randn(2, 4, 9), l)
    with pytest.raises(ValueError, match="lse_a"):
        pk.merge_states(o, torch.randn(2, 5), o, l)
    with pytest.raises(TypeError, match="lse_b"):
        pk.merge_states(o, l, o, [1.0])


# ---------------------------------------------------------------------------------------------
# plan


@pytest.mark.parametrize("seed", range(12))
def test_plan_invariants_and_kernel_schedule(seed):
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 9, (1,), generator=g))
    lens = torch.randint(1, 3000, (B,), generator=g).tolist()
    Hkv = int(torch.randint(1, 5, (1,), generator=g))
    W = int(torch.randint(1, 40, (1,), generator=g))
    tile = [1, 16, 64, 100][seed % 4]
    for method in ("lean", "split"):
        splits = None if method == "lean" else 1 + seed % 7
        plan = pk.plan_decode(lens, Hkv, W, method=method, tile=tile, num_splits=splits)
        # every token of every (b, h) covered exactly once
        cover = {}
        for task in plan.tasks:
            for p in task:
                cover.setdefault((p.b, p.h), []).append((p.t0, p.t1))
        assert sorted(cover) == [(b, h) for b in range(B) for h in range(Hkv)]
        for (b, h), ranges in cover.items():
            ranges.sort()
            assert ranges[0][0] == 0 and ranges[-1][1] == lens[b]
            assert all(r0[1] == r1[0] for r0, r1 in zip(ranges, ranges[1:]))
            assert all(t0 < t1 for t0, t1 in ranges)
        # partial slots: unique, and exactly the pieces of the segments that were cut
        slots = [p.slot for t in plan.tasks for p in t if p.slot >= 0]
        assert len(slots) == len(set(slots)) == plan.num_partials
        if method == "lean":
            per = plan.tiles_per_task()
            assert max(per) - min(per) <= 1, per        # balanced within one tile
            assert len(plan.tasks) == min(W, plan.total_tiles)
        # the C++ kernel runs exactly this schedule
        tasks, reds = _C.decode_schedule(lens, Hkv, method, plan.num_splits, W, tile)
        assert tasks == [[(p.b, p.h, p.t0, p.t1, p.slot) for p in t] for t in plan.tasks]
        assert reds == [(b, h, s) for b, h, s in plan.reductions]


def test_plan_lean_balances_imbalanced_batch():
    lens = [32768, 1024, 512]
    lean = pk.plan_decode(lens, 1, 2, method="lean")
    unsplit = pk.plan_decode(lens, 1, 2, method="split", num_splits=1)
    assert lean.makespan_tiles() == math.ceil((512 + 16 + 8) / 2)
    assert unsplit.makespan_tiles() == 512
    assert "lean" in repr(lean)


def test_auto_rule(monkeypatch):
    """method="auto" is the roofline advisor's schedule (tests/test_roofline_advise.py has the
    model): balanced, with nothing to merge, or balanced by lean for mixed lengths. Without a
    cached machine profile (made so here: the choice must not depend on this machine's probe),
    each worker is modelled as streaming an equal share of the bandwidth."""
    import roofline.advise

    monkeypatch.setattr(roofline.advise, "_DEFAULT", {"cpu": None})
    monkeypatch.setattr(roofline.advise, "_CACHE", type(roofline.advise._CACHE)())
    p = pk.plan_decode([4096] * 4, 2, 2, method="auto")
    assert p.makespan_tiles() == 4 * 64 * 2 // 2 and p.num_partials == 0
    assert pk.plan_decode([4096, 100], 1, 2, method="auto").method == "lean"
    p = pk.plan_decode([4096], 1, 2, method="auto")
    assert p.method == "lean" and p.makespan_tiles() == 32 and p.num_partials == 2
    p = pk.plan_decode([4096, 4096, 4096], 1, 2, method="auto")  # 3 segments on 2 workers
    assert p.makespan_tiles() == math.ceil(3 * 64 / 2)


# ---------------------------------------------------------------------------------------------
# errors: a clear ValueError / TypeError naming the argument, never a crash or OOB read


def _inputs(B=2, Hq=8, Hkv=2, D=64, L=32, dtype=torch.float32):
    return (torch.randn(B, Hq, D, dtype=dtype), torch.randn(B, L, Hkv, D, dtype=dtype),
            torch.randn(B, L, Hkv, D, dtype=dtype), torch.tensor([L] * B))


@pytest.mark.parametrize("case,exc,match", [
    ("q_rank", ValueError, "q:"),
    ("k_rank", ValueError, "k_cache:"),
    ("v_shape", ValueError, "v_cache:"),
    ("gqa", ValueError, "multiple"),
    ("head_dim", ValueError, "head_dim"),
    ("seqlen_zero", ValueError, r"seqlens\[1\]"),
    ("seqlen_big", ValueError, r"seqlens\[0\] = 33"),
    ("seqlen_shape", ValueError, "seqlens"),
    ("seqlen_dtype", TypeError, "seqlens"),
    ("q_dtype", TypeError, "q:"),
    ("kv_dtype_mismatch", TypeError, "v_cache"),
    ("k_dtype", TypeError, "k_cache"),
    ("device", ValueError, "k_cache"),
    ("last_stride", ValueError, "stride"),
    ("method", ValueError, "method"),
    ("num_splits", ValueError, "num_splits"),
    ("scale", ValueError, "scale"),
    ("scale_bool", ValueError, "scale"),
    ("num_splits_bool", ValueError, "num_splits"),
    ("num_splits_huge", ValueError, "num_splits"),
    ("seqlen_strings", TypeError, "seqlens"),
    ("seqlen_int8", TypeError, "seqlens: expected int32, int64, int16 or uint8"),
    ("out_shape", ValueError, "out"),
    ("backend", ValueError, "backend"),
    ("batch", ValueError, "k_cache: batch"),
])
def test_bad_input(case, exc, match):
    q, k, v, sl = _inputs()
    kw = {}
    if case == "q_rank": q = q[0]
    elif case == "k_rank": k = k[0]
    elif case == "v_shape": v = v[:, :16]
    elif case == "gqa": q = torch.randn(2, 7, 64)
    elif case == "head_dim": q = torch.randn(2, 8, 32)
    elif case == "seqlen_zero": sl = torch.tensor([5, 0])
    elif case == "seqlen_big": sl = torch.tensor([33, 1])
    elif case == "seqlen_shape": sl = torch.tensor([5])
    elif case == "seqlen_dtype": sl = torch.tensor([5.0, 1.0])
    elif case == "q_dtype": q = q.to(torch.float64)
    elif case == "kv_dtype_mismatch": v = v.half()
    elif case == "k_dtype": k, v = k.int(), v.int()
    elif case == "device": k = k.to("meta")
    elif case == "last_stride": k = torch.randn(2, 32, 2, 128)[..., ::2]
    elif case == "method": kw["method"] = "stream"
    elif case == "num_splits": kw["num_splits"] = 0
    elif case == "scale": kw["scale"] = float("nan")
    elif case == "scale_bool": kw["scale"] = True
    elif case == "num_splits_bool": kw["num_splits"] = True
    elif case == "num_splits_huge": kw["num_splits"] = 2 ** 70
    elif case == "seqlen_strings": sl = ["5", "1"]
    elif case == "seqlen_int8": sl = torch.tensor([5, 1], dtype=torch.int8)
    elif case == "out_shape": kw["out"] = torch.empty(2, 8, 32)
    elif case == "backend": kw["backend"] = "tpu"
    elif case == "batch": k, v = k[:1], v[:1]
    with pytest.raises(exc, match=match):
        pk.decode_attention(q, k, v, sl, **kw)


def test_bad_block_table():
    q = torch.randn(2, 4, 64)
    k, v, bt = make_paged(2, 1, 64, torch.float32, [20, 5], block_size=8)
    bad = bt.clone()
    bad[0, 1] = k.shape[0]  # one past the last block
    with pytest.raises(ValueError, match=r"block_table\[0, 1\]"):
        pk.decode_attention(q, k, v, torch.tensor([20, 5]), block_table=bad)
    bad = bt.clone()
    bad[1, 0] = -1
    with pytest.raises(ValueError, match=r"block_table\[1, 0\]"):
        pk.decode_attention(q, k, v, torch.tensor([20, 5]), block_table=bad)
    with pytest.raises(ValueError, match="seqlens"):  # more tokens than the table can hold
        pk.decode_attention(q, k, v, torch.tensor([8 * bt.shape[1] + 1, 5]), block_table=bt)
    with pytest.raises(TypeError, match="block_table"):
        pk.decode_attention(q, k, v, torch.tensor([20, 5]), block_table=bt.float())


def test_native_launcher_checks_again():
    """Bypassing Python validation must still give errors, not out-of-bounds reads."""
    q, k, v, _ = _inputs()
    out, lse = torch.empty_like(q), torch.empty(2, 8)
    args = dict(scale=0.1, method="lean", num_splits=1, num_workers=2, tile=64)
    with pytest.raises(ValueError, match="seqlens"):
        _C.decode_attention(q, k, v, torch.tensor([33, 1], dtype=torch.int32), None, out, lse, **args)
    with pytest.raises(ValueError, match="seqlens"):
        _C.decode_attention(q, k, v, torch.tensor([0, 1], dtype=torch.int32), None, out, lse, **args)
    kp, vp, bt = make_paged(2, 2, 64, torch.float32, [20, 5], block_size=8)
    bt[0, 2] = 10 ** 6
    with pytest.raises(ValueError, match="block_table"):
        _C.decode_attention(q, kp, vp, torch.tensor([20, 5], dtype=torch.int32), bt, out, lse, **args)
    with pytest.raises(ValueError, match="method"):
        _C.decode_attention(q, k, v, torch.tensor([3, 1], dtype=torch.int32), None, out, lse,
                            **{**args, "method": "x"})
    with pytest.raises(TypeError, match="q"):
        _C.decode_attention(q.double(), k, v, torch.tensor([3, 1], dtype=torch.int32), None, out, lse, **args)
    with pytest.raises(TypeError, match="k_cache"):
        _C.decode_attention(q, [1, 2], v, torch.tensor([3, 1], dtype=torch.int32), None, out, lse, **args)


def test_explicit_backend_unavailable_lists_reasons(monkeypatch):
    q, k, v, sl = _inputs()
    with pytest.raises(NotImplementedError) as e:
        pk.decode_attention(q, k, v, sl, backend="cuda")
    assert "cuda" in str(e.value)
    st = backends.status()
    assert set(st) == {"cuda", "triton", "cpu", "reference"}
    assert st["cpu"][0] is True
    assert all(isinstance(r, str) and r for _, r in st.values())


def test_explicit_backend_error_says_what_the_others_would_do(monkeypatch):
    q = torch.randn(1, 2, 12)
    k = torch.randn(1, 4, 1, 12)
    with pytest.raises(NotImplementedError) as e:
        pk.decode_attention(q, k, k, torch.tensor([4]), backend="cpu")
    msg = str(e.value)
    assert "cpu: head_dim must be a multiple of 8" in msg
    assert "reference: could serve this call (backend='reference')" in msg
    # Triton takes CPU tensors only in interpreter mode; without it the reason says so
    monkeypatch.setattr(backends, "_triton_interprets", lambda: False)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        pk.decode_attention(q, k, k, torch.tensor([4]), backend="triton")


def test_auto_dispatch_on_cpu_never_imports_triton():
    """Importing triton costs ~50 MB of RSS and seconds: a CPU call with backend="auto" must not
    do it (the offload benchmark's memory budget test caught a version that did)."""
    code = ("import sys, torch, pykernels as pk; "
            "pk.decode_attention(torch.randn(1, 2, 64), torch.randn(1, 4, 1, 64), torch.randn(1, 4, 1, 64), [4]); "
            "print('triton' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_environment_switches_are_validated(monkeypatch):
    from roofline.probe import env_switch, env_threads

    for v, want in (("0", False), ("OFF", False), ("false", False), ("1", True), ("Yes", True), ("", True)):
        monkeypatch.setenv("PYKERNELS_AUTOTUNE", v)
        assert env_switch("PYKERNELS_AUTOTUNE") is want
    monkeypatch.setenv("PYKERNELS_AUTOTUNE", "of")
    with pytest.raises(ValueError, match="PYKERNELS_AUTOTUNE"):
        env_switch("PYKERNELS_AUTOTUNE")
    for v in ("abc", "0", "-2", "3x"):
        monkeypatch.setenv("PYKERNELS_NUM_THREADS", v)
        with pytest.raises(ValueError, match="PYKERNELS_NUM_THREADS"):
            env_threads()
    monkeypatch.setenv("PYKERNELS_NUM_THREADS", "3")
    assert env_threads() == 3
    code = "import torch, pykernels as pk; pk.decode_attention(torch.randn(1, 2, 64), torch.randn(1, 4, 1, 64), " \
           "torch.randn(1, 4, 1, 64), [4], backend='cpu')"
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYKERNELS_NUM_THREADS="abc"),
                       capture_output=True, text=True)
    assert r.returncode != 0 and "PYKERNELS_NUM_THREADS" in r.stderr


def test_cupy_cache_dir_follows_xdg(monkeypatch, tmp_path):
    import importlib

    cuda_att = importlib.import_module("pykernels.cuda.decode_attention")
    monkeypatch.delenv("CUPY_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cuda_att._cupy_cache_dir() == str(tmp_path / "pykernels" / "cupy")


def test_cpu_head_dim_not_multiple_of_8_declined():
    q = torch.randn(1, 2, 60)
    k = torch.randn(1, 4, 1, 60)
    with pytest.raises(NotImplementedError, match="multiple of 8"):
        pk.decode_attention(q, k, k, torch.tensor([4]), backend="cpu")
    out = pk.decode_attention(q, k, k, torch.tensor([4]), backend="reference")
    assert out.shape == q.shape


# ---------------------------------------------------------------------------------------------
# ISA selection and torch integration


def test_isa_env_var_and_invalid_value():
    code = "import pykernels._C as C; print(C.active_isa())"
    env = dict(os.environ, PYKERNELS_ISA="scalar")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "scalar", r.stderr
    env["PYKERNELS_ISA"] = "sse9"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "PYKERNELS_ISA" in r.stderr
    with pytest.raises(ValueError, match="isa"):
        _C.set_isa("neon")


def test_opcheck():
    lens = torch.tensor([5, 40])
    q = torch.randn(2, 4, 64)
    k, v = make_dense(2, 40, 2, 64, torch.float32, [5, 40], nan_fill=False)
    torch.library.opcheck(torch.ops.pykernels.decode_attention.default,
                          (q, k, v, lens, None, 0.125, "lean", 0, "auto"))
    o, l = torch.randn(3, 4, 8), torch.randn(3, 4)
    torch.library.opcheck(torch.ops.pykernels.merge_states.default, (o, l, o * 2, l - 1))
    # transposed inputs: the fake's layout must be the real op's (torch.compile checks strides)
    ot, lt = torch.randn(4, 3, 8).transpose(0, 1), torch.randn(4, 3).t()
    torch.library.opcheck(torch.ops.pykernels.merge_states.default, (ot, lt, o, l))


def test_torch_compile():
    lens = torch.tensor([5, 40])
    q = torch.randn(2, 4, 64)
    k, v = make_dense(2, 40, 2, 64, torch.float32, [5, 40], nan_fill=False)

    def f(q, k, v, lens):
        return pk.decode_attention(q * 2, k, v, lens, method="lean") + 1

    got = torch.compile(f, backend="inductor", fullgraph=False)(q, k, v, lens)
    want = oracle(q * 2, k, v, [5, 40])[0] + 1
    assert_close(got, want, 1e-4)


def test_concurrent_python_threads_and_fork():
    """The GIL is released during kernels: calls from several Python threads share the pool
    safely; a forked child rebuilds the pool (its parent's worker threads do not exist there)."""
    import multiprocessing as mp
    import threading

    lens = [300, 7]
    q = torch.randn(2, 8, 64)
    k, v = make_dense(2, 300, 2, 64, torch.float32, lens)
    want = oracle(q, k, v, lens)[0]
    errors = []

    def worker():
        try:
            for _ in range(20):
                got = pk.decode_attention(q, k, v, torch.tensor(lens), method="lean")
                err = float((got.double() - want.double()).abs().max())
                if not err <= 1e-4:
                    errors.append(err)
        except BaseException as e:  # an exception in a thread must fail the test, not just warn
            errors.append(repr(e))

    ts = [threading.Thread(target=worker) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors

    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got, runtime = pool.apply(_child_attention, (q, k, v, lens))
    assert_close(got, want, 1e-4)
    # GNU OpenMP cannot run in a child forked after the parent used it: the child uses the pool
    assert runtime == "pool"


def _child_attention(q, k, v, lens):
    from pykernels import _C
    return pk.decode_attention(q, k, v, torch.tensor(lens), method="lean"), _C.threading_runtime()


def test_threading_runtime(monkeypatch):
    """CPU kernels run on the process's GNU OpenMP team (torch's) when one is loaded, so torch's
    idle OpenMP workers do not spin on the cores our threads need; PYKERNELS_THREADING=pool
    selects pykernels' own threads. Both give the same result."""
    from pykernels import _C
    import ctypes
    uses_gomp = hasattr(ctypes.CDLL(None), "GOMP_parallel")  # torch's CPU wheels: True
    lens = [1000, 17, 4097]
    q = torch.randn(3, 8, 128)
    k, v = make_dense(3, 4097, 2, 128, torch.bfloat16, lens)
    want = oracle(q, k, v, lens)[0]
    got = {}
    for mode in ("auto", "pool", "openmp"):
        monkeypatch.setenv("PYKERNELS_THREADING", mode)
        if mode == "openmp" and not uses_gomp:
            with pytest.raises(ValueError, match="PYKERNELS_THREADING"):
                pk.decode_attention(q, k, v, torch.tensor(lens), method="lean")
            continue
        got[mode] = pk.decode_attention(q, k, v, torch.tensor(lens), method="lean")
        assert _C.threading_runtime() == ("pool" if mode == "pool" or not uses_gomp else "openmp")
        assert_close(got[mode], want, 1e-4)
    # the schedule does not depend on which threads run it: identical bits
    assert torch.equal(got["auto"], got["pool"])
    monkeypatch.setenv("PYKERNELS_THREADING", "gomp")
    with pytest.raises(ValueError, match="PYKERNELS_THREADING"):
        pk.decode_attention(q, k, v, torch.tensor(lens), method="lean")


@pytest.mark.parametrize("runtime", ["auto", "pool"])
def test_set_num_threads_during_calls(monkeypatch, runtime):
    """Another Python thread changing the thread count while kernels run (GIL released) must not
    let a kernel use more threads than it sized its scratch for (it used to corrupt the heap)."""
    import threading
    import time

    from pykernels import _C

    monkeypatch.setenv("PYKERNELS_THREADING", runtime)
    before = _C.get_num_threads()
    lens = [700, 300, 64, 1]
    q = torch.randn(4, 8, 64)
    k, v = make_dense(4, 700, 2, 64, torch.float32, lens)
    want = oracle(q, k, v, lens)[0]
    stop = threading.Event()

    def toggle():
        while not stop.is_set():
            _C.set_num_threads(16)
            time.sleep(2e-4)
            _C.set_num_threads(1)
            time.sleep(2e-4)

    t = threading.Thread(target=toggle)
    t.start()
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            got = pk.decode_attention(q, k, v, torch.tensor(lens), method="split", num_splits=4, backend="cpu")
            assert_close(got, want, 1e-4)
    finally:
        stop.set()
        t.join()
        _C.set_num_threads(before)


def test_inputs_that_require_grad_are_read_detached():
    """Inference kernels: an activation that requires grad (a model run without torch.no_grad())
    is accepted, and the result equals the no-grad one (DLPack alone would refuse it)."""
    q, k, v, sl = _inputs()
    ref = pk.decode_attention(q, k, v, sl, backend="cpu")
    out = pk.decode_attention(q.clone().requires_grad_(), k.clone().requires_grad_(), v, sl, backend="cpu")
    assert torch.equal(out, ref) and not out.requires_grad


def test_kernel_module_availability_is_asked_once(monkeypatch):
    """backends.module_status imports a kernel module and asks its available() once per process
    (asking on every call stat'ed the file system for cupy: ~150 us per call on a GPU host); a
    module that cannot be imported, or says it is unavailable, gives the reason instead."""
    import sys
    import types

    calls = []
    fake = types.ModuleType("pk_fake_kernels")
    fake.available = lambda: (calls.append(1), (True, "ok"))[1]
    monkeypatch.setitem(sys.modules, "pk_fake_kernels", fake)
    monkeypatch.setattr(backends, "_MODULE_STATUS", {})
    assert backends.module_status("pk_fake_kernels") == (fake, "")
    assert backends.module_status("pk_fake_kernels") == (fake, "")
    assert len(calls) == 1
    off = types.ModuleType("pk_fake_off")
    off.available = lambda: (False, "no GPU here")
    monkeypatch.setitem(sys.modules, "pk_fake_off", off)
    assert backends.module_status("pk_fake_off") == (None, "no GPU here")
    mod, why = backends.module_status("pk_no_such_module_xyz")
    assert mod is None and "pk_no_such_module_xyz cannot be imported (ModuleNotFoundError" in why
    broken = types.ModuleType("pk_fake_broken")
    broken.available = lambda: 1 / 0
    monkeypatch.setitem(sys.modules, "pk_fake_broken", broken)
    assert backends.module_status("pk_fake_broken") == (
        None, "pk_fake_broken.available() failed: ZeroDivisionError: division by zero")


def test_host_seqlens_for_a_device_q():
    """Lengths kept on the host (a CPU tensor or a list) for a q on another device: checked and
    planned from the host values, copied to q's device for the kernels (no device-to-host sync on
    a GPU). Lengths on a third, non-CPU device are refused. (The meta device stands in for a GPU.)"""
    from pykernels import attention

    q = torch.empty(2, 4, 16, device="meta")
    k = torch.empty(2, 8, 2, 16, device="meta")
    for given in ([5, 8], torch.tensor([5, 8], dtype=torch.int32)):
        *_, sl, bt, scale, lens_host = attention._validate(q, k, k, given, None, None, "auto", None, None)
        assert sl.device.type == "meta" and lens_host.device.type == "cpu" and lens_host.tolist() == [5, 8]
    with pytest.raises(ValueError, match=r"^seqlens: seqlens\[1\] = 9 is outside \[1, 8\]"):
        attention._validate(q, k, k, torch.tensor([5, 9]), None, None, "auto", None, None)
    qc, kc = torch.randn(2, 4, 16), torch.randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match=r"^seqlens: on meta, but q is on cpu"):
        attention._validate(qc, kc, kc, torch.tensor([5, 8], device="meta"), None, None, "auto", None, None)
    # a paged cache's block table on the host too: checked there (used entries only)
    kp = torch.empty(6, 4, 2, 16, device="meta")
    bt = torch.tensor([[0, 1, -1], [2, 3, 4]], dtype=torch.int32)
    *_, sl, btd, _, lens_host = attention._validate(q, kp, kp, [5, 9], bt, None, "auto", None, None)
    assert btd.device.type == "meta" and btd.shape == (2, 3) and lens_host.tolist() == [5, 9]
    with pytest.raises(ValueError, match=r"^block_table: block_table\[1, 2\] = 7 is outside \[0, 6\)"):
        attention._validate(q, kp, kp, [5, 9], torch.tensor([[0, 1, -1], [2, 3, 7]], dtype=torch.int32),
                            None, "auto", None, None)
    with pytest.raises(ValueError, match=r"^block_table: on meta, but q is on cpu"):
        attention._validate(qc, torch.randn(6, 4, 2, 16), torch.randn(6, 4, 2, 16), [5, 9], bt.to("meta"),
                            None, "auto", None, None)
    # on the CPU both ways the lengths are used as given
    *_, sl, _, _, lens_host = attention._validate(qc, kc, kc, torch.tensor([5, 8]), None, None, "auto", None, None)
    assert sl.device.type == "cpu" and lens_host.tolist() == [5, 8]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_host_lengths_reach_the_launcher_without_a_device_read(backend, monkeypatch):
    """pk.decode_attention end to end with q on the meta device (standing in for a GPU: any read
    back of a meta tensor raises, so finishing proves the call never syncs) and the lengths (and a
    paged table) on the host: the launcher gets contiguous int32 tensors on q's device, and the
    schedule was planned from the host values. The launchers are stubbed (no GPU here)."""
    import importlib

    seen = {}

    def fake_launch(q, k, v, sl, bt, out, lse, scale, method, ns, W, tile):
        seen.update(sl=(sl.device.type, sl.dtype, sl.is_contiguous()),
                    bt=None if bt is None else (bt.device.type, bt.dtype), method=method, ns=ns)

    mod = importlib.import_module(f"pykernels.{backend}.decode_attention")
    monkeypatch.setattr(mod, "decode_attention", fake_launch)
    monkeypatch.setattr(backends, "select", lambda *a, **kw: backend)
    q = torch.empty(3, 4, 16, device="meta")
    k = torch.empty(3, 300, 2, 16, device="meta")
    for lens in ([5, 300, 7], torch.tensor([5, 255, 7], dtype=torch.uint8),
                 torch.tensor([5, 0, 300, 0, 7], dtype=torch.int16)[::2]):
        for method in ("auto", "split", "lean"):
            seen.clear()
            pk.decode_attention(q, k, k, lens, method=method, backend=backend)
            assert seen["sl"] == ("meta", torch.int32, True) and seen["bt"] is None
            assert seen["method"] in ("lean", "split") and seen["ns"] >= 1
    kp = torch.empty(10, 64, 2, 16, device="meta")
    bt = torch.tensor([[0, 1, 2, 3, 4], [5, 6, -1, -1, -1], [7, 8, 9, -1, -1]])
    seen.clear()
    pk.decode_attention(q, kp, kp, [300, 100, 150], block_table=bt, backend=backend)
    assert seen["bt"] == ("meta", torch.int32)


def test_host_lengths_trace_under_torch_compile():
    """_validate with host lengths for a (meta, standing in for GPU) q traces with fullgraph=True
    (is_pinned() does not; a compiled graph takes the plain copy)."""
    from pykernels import attention

    def f(q, k, s):
        return attention._validate(q, k, k, s, None, None, "auto", None, None)[3]

    q, k = torch.empty(2, 4, 16, device="meta"), torch.empty(2, 8, 2, 16, device="meta")
    sl = torch.compile(f, backend="eager", fullgraph=True)(q, k, torch.tensor([5, 8], dtype=torch.int32))
    assert sl.device.type == "meta" and sl.shape == (2,)
