"""LUT-GEMV ``pk.lut_gemv``: every bits x scheme x group size x backend x M, odd N/K, float32 and
bfloat16 activations, modes "exact" and "int8", against the float64 ``x @ qw.dequantize().T``.

Tolerances (per output element y[m, n]; u = 2^-24, the float32 unit roundoff):

* exact: the kernel sums, per scale group g, intermediates bounded by
  |s_g| * ((2^b - 1)/2 + |c0 - z_g|) * A_g with A_g = sum_{k in g} |x_k| (the table identity
  sum_k q_k x_k = c0 S_g + 1/2 sum_i 2^i sum_a T_a[idx] has |1/2 sum_i 2^i L_i| <= c0 A_g and
  |(c0 - z) S_g| <= |c0 - z| A_g), or |x_k| |w_nk| for codebooks. With at most K_pad + 16
  roundings on any path, |err| <= (K_pad + 16) u B, B the sum of those bounds (Higham's
  gamma_n bound for recursive summation, n < K_pad + 16).
* int8: each table of an activation group a is quantized with the scale sigma of its (row,
  block of <= 128 k): sigma = max |T| / 127 over the block, and max_idx |T_a[idx]| = sum_{j in a}
  |x_j|. Whatever the block layout, sigma_a <= max over the 63 activation groups around a of
  that sum, / 127. A lookup is off by <= sigma_a / 2; plane i weighs it 2^i / 2, so a group
  adds |s_g| (2^b - 1)/2 sum_{a in g} sigma_a / 2, plus |s_g| |c0 - z_g| sum_a sigma_a / 2 if
  S_g is taken from the quantized T[15]. Codebooks: <= sum_k sigma_a(k) / 2 |w_nk| (covers an
  int8 quantization of x itself); kernels may treat them exactly.
* bfloat16 output: + 2^-8 |ref| (one rounding of the float32 result, unit roundoff 2^-9).

Besides the worst-case bound, the int8 error must be typical of int8 tables: relative L2 error
<= 1.5 x that of a float64 model of the kernel (``simulate_tables``, 128-k blocks) + 1e-3. With
these weights (outlier columns) the model gives ~1.1% for 4-bit g128 and up to ~1.8% for 1-bit
or per-channel groups; codebooks (no table model) must stay under 2%.
"""
import importlib
import importlib.util
import os
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pykernels as pk
from pykernels import lut as lut_mod
from pykernels.lut import LUTWeight
from pykernels.lut_format import unpack_codes

U32 = 2.0 ** -24
BACKENDS = ["reference", "cpu", "triton"]
DTYPES = [torch.float32, torch.bfloat16]
SCHEMES = ["affine", "symmetric", "codebook"]
GROUPS = [32, 64, 128, -1]
# odd N (row padding to 32) and K per group size (K % 64 != 0 for g32, K_pad > K for -1)
SHAPES = {"default": (77, {32: 416, 64: 320, 128: 384, -1: 300}),
          "triton": (50, {32: 224, 64: 192, 128: 256, -1: 100})}   # the interpreter is slow


def _require(backend):
    """Skip when the backend's LUT entry point does not exist yet, unless the integration run
    sets PYKERNELS_REQUIRE_LUT_BACKENDS (then a missing backend fails)."""
    if backend == "reference":
        return
    missing = None
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        missing = "triton is not installed"
    elif backend == "cpu":
        try:
            from pykernels import _C
        except ImportError as e:
            missing = f"pykernels._C is not built ({e})"
        else:
            if not hasattr(_C, "lut_gemv"):
                missing = "pykernels._C has no lut_gemv (kernel not built yet)"
    else:
        modname = f"pykernels.{backend}.lut_gemv"
        if importlib.util.find_spec(modname) is None:
            missing = f"{modname} does not exist yet"
        elif not hasattr(importlib.import_module(modname), "lut_gemv"):
            missing = f"{modname} has no lut_gemv function"
    if missing:
        if os.environ.get("PYKERNELS_REQUIRE_LUT_BACKENDS"):
            pytest.fail(f"{backend}: {missing} (PYKERNELS_REQUIRE_LUT_BACKENDS is set)")
        pytest.skip(missing)


# ---------------------------------------------------------------------------------------------
# oracle and error bounds
_W64 = {}


def _w64(qw):
    """qw.dequantize(float64), cached for the lru-cached test weights."""
    key = id(qw)
    if key not in _W64 or _W64[key][0] is not qw:
        _W64[key] = (qw, qw.dequantize(torch.float64))
    return _W64[key][1]


def oracle(x, qw):
    """float64 x @ W^T from the dequantized weight (what every backend must compute)."""
    return x.double() @ _w64(qw).T


def _stored_x(x, qw):
    """x as the kernels see it: gathered by perm, zero-padded to K_pad; float64 [M, K_pad]."""
    xs = x.double().reshape(-1, qw.shape[1])
    if qw.perm is not None:
        xs = xs[:, qw.perm]
    return F.pad(xs, (0, qw.K_pad - qw.shape[1]))


def _stored_w(qw):
    """W in stored column order, zero-padded: float64 [N, K_pad]."""
    w = _w64(qw)
    if qw.perm is not None:
        w = w[:, qw.perm]
    return F.pad(w, (0, qw.K_pad - qw.shape[1]))


def _group_factor(qw):
    """|s_g| ((2^b - 1)/2 + |c0 - z_g|) [N, G] (affine / symmetric)."""
    c0 = ((1 << qw.bits) - 1) / 2
    z = qw.zeros.double() if qw.zeros is not None else torch.full_like(qw.scales, c0, dtype=torch.float64)
    return qw.scales.double().abs() * (c0 + (c0 - z).abs())


def bounds(x, qw):
    """(exact tolerance, extra int8 tolerance), both float64 [M, N]; see the module docstring."""
    xs = _stored_x(x, qw)
    ax = xs.abs()
    M, Kp = ax.shape
    G, gs = Kp // qw.gs, qw.gs
    A = ax.view(M, Kp // 4, 4).sum(-1)                                  # max |T_a| per group a
    sigma = F.max_pool1d(A[:, None], 63, stride=1, padding=31)[:, 0] / 127
    if qw.scheme == "codebook":
        mag = _stored_w(qw).abs()
        B = ax @ mag.T
        e8 = (0.5 * sigma).repeat_interleave(4, 1) @ mag.T
    else:
        f = _group_factor(qw)
        B = ax.view(M, G, gs).sum(-1) @ f.T
        e8 = (0.5 * sigma).view(M, G, gs // 4).sum(-1) @ f.T
    return (Kp + 16) * U32 * B, e8 * (1 + 1e-3)


def assert_within(y, ref, tol, what):
    assert y.shape == ref.shape, f"{what}: shape {tuple(y.shape)} != {tuple(ref.shape)}"
    d = (y.double() - ref).abs()
    assert torch.isfinite(y).all(), f"{what}: non-finite output at {torch.nonzero(~torch.isfinite(y))[:5].tolist()}"
    excess = d - tol
    i = int(excess.argmax())
    idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), excess.shape))
    assert float(excess.max()) <= 0, (f"{what}: |y - ref| = {float(d[idx]):.4g} > bound {float(tol[idx]):.4g} at "
                                      f"{idx}: got {float(y[idx])}, want {float(ref[idx])}")


def check(y, x, qw, mode, what=""):
    ref = oracle(x, qw).reshape(y.shape)
    exact, e8 = bounds(x, qw)
    tol = (exact + (e8 if mode == "int8" else 0)).reshape(y.shape)
    if y.dtype != torch.float32:
        tol = tol * 1.01 + 2.0 ** -8 * ref.abs()
    assert y.dtype == x.dtype
    assert_within(y, ref, tol, f"{what} mode={mode}")
    return float((y.double() - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------------------------
# weights, cached across the M / dtype parametrization
@lru_cache(maxsize=None)
def weight(bits, scheme, group_size, N, K, seed=0, fast=False):
    g = torch.Generator().manual_seed(1000 * bits + 10 * group_size + seed + N + K)
    w = torch.randn(N, K, generator=g) * 0.05
    w[:, :: max(1, K // 5)] *= 6                                   # outlier input columns
    kw = dict(clip_grid=0, iters=10) if fast else {}
    return pk.quantize_weight(w, bits=bits, group_size=group_size, scheme=scheme, **kw)


def shapes(backend, group_size):
    N, ks = SHAPES["triton" if backend == "triton" else "default"]
    return N, ks[group_size]


# ---------------------------------------------------------------------------------------------
# the matrix
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 8, 16])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matrix(backend, bits, scheme, group_size, M, dtype):
    _require(backend)
    N, K = shapes(backend, group_size)
    qw = weight(bits, scheme, group_size, N, K, fast=True)   # plain RTN: the kernel is under test
    x = torch.randn(M, K).to(dtype)
    for mode in ("exact", "int8"):
        y = pk.lut_gemv(x, qw, backend=backend, mode=mode)
        assert y.shape == (M, N)
        rel = check(y, x, qw, mode, f"{backend} b{bits} {scheme} g{group_size} M{M} {dtype}")
        if mode == "int8" and dtype == torch.float32:
            assert rel <= int8_rel_limit(x, qw), f"int8 relative L2 error {rel:.3g}"


@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("bits,scheme,group_size", [(4, "affine", 128), (2, "symmetric", 64),
                                                    (3, "codebook", -1), (1, "affine", 32)])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_large(backend, bits, scheme, group_size, M):
    _require(backend)
    qw = weight(bits, scheme, group_size, 1000, 4224, fast=True)
    x = torch.randn(M, 4224)
    for mode in ("exact", "int8"):
        rel = check(pk.lut_gemv(x, qw, backend=backend, mode=mode), x, qw, mode, f"{backend} large")
        if mode == "int8":
            assert rel <= int8_rel_limit(x[:1] if M > 1 else x, qw, slack=0.5 if M > 1 else 0), rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_perm_out_strided(backend, dtype):
    """M > 16 (split into chunks), an act-order perm, out=, a strided x, and a 1-D x."""
    _require(backend)
    N, K = (40, 128) if backend == "triton" else (70, 256)
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (N, K), generator=gen)
    qw = LUTWeight.from_codes(codes, torch.rand(N, K // 32, generator=gen) * 0.1 + 0.01,
                              torch.randint(0, 16, (N, K // 32), generator=gen).float(), bits=4, group_size=32,
                              perm=torch.randperm(K, generator=gen))
    xt = torch.randn(K, 37, generator=gen).to(dtype)
    x = xt.t()                                                     # [37, K], not contiguous
    out = torch.full((37, N), float("nan"), dtype=dtype)
    for mode in ("exact", "int8"):
        y = pk.lut_gemv(x, qw, backend=backend, out=out, mode=mode)
        assert y is out
        check(y, x, qw, mode, f"{backend} M=37 perm")
        y1 = pk.lut_gemv(x[5], qw, backend=backend, mode=mode)
        assert y1.shape == (N,)
        check(y1, x[5], qw, mode, f"{backend} 1-D")


# ---------------------------------------------------------------------------------------------
# the int8 bound itself, against a float64 model of the int8 table kernel
def simulate_tables(x, qw, block=128, quantize=True):
    """T-MAC in float64 (affine/symmetric): per activation group a, T_a[idx] = sum_j +-x_j;
    quantized per (row, block of `block` k) with sigma = max|T| / 127; y from the identity
    sum_k q_k x_k = c0 S_g + 1/2 sum_i 2^i sum_a T_a[idx_ia]."""
    xs = _stored_x(x, qw)
    M, Kp = xs.shape
    A, N, b = Kp // 4, qw.shape[0], qw.bits
    sign = torch.tensor([[1.0 if (i >> j) & 1 else -1.0 for j in range(4)] for i in range(16)], dtype=torch.float64)
    T = xs.view(M, A, 4) @ sign.T                                  # [M, A, 16]
    if quantize:
        nb = block // 4
        Tp = F.pad(T, (0, 0, 0, (-A) % nb))
        sig = Tp.view(M, -1, nb * 16).abs().amax(-1) / 127
        sig = torch.where(sig > 0, sig, torch.ones_like(sig)).repeat_interleave(nb, 1)[:, :A, None]
        T = torch.clamp(torch.round(T / sig), -127, 127) * sig
    q = unpack_codes(qw.planes, b)[:N].long().view(N, A, 4)
    idx = torch.stack([(((q >> i) & 1) << torch.arange(4)).sum(-1) for i in range(b)], -1)  # [N, A, b]
    L = T[:, torch.arange(A)[None, :, None], idx]                  # [M, N, A, b]
    look = (L * (2.0 ** torch.arange(b, dtype=torch.float64))).sum(-1)
    G = Kp // qw.gs
    lg = look.view(M, N, G, -1).sum(-1)                            # [M, N, G]
    Sg = xs.view(M, G, -1).sum(-1)                                 # exact S_g
    c0 = ((1 << b) - 1) / 2
    z = qw.zeros.double() if qw.zeros is not None else torch.full_like(qw.scales, c0, dtype=torch.float64)
    return (qw.scales.double() * (0.5 * lg + (c0 - z) * Sg[:, None, :])).sum(-1)


def int8_rel_limit(x, qw, slack=0.0):
    """Largest acceptable relative L2 error of mode="int8" (see the module docstring)."""
    if qw.scheme == "codebook":
        return 2e-2
    ref = oracle(x, qw)
    model = float((simulate_tables(x, qw, block=128) - ref).norm() / ref.norm())
    return 1.5 * model * (1 + slack) + 1e-3


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("scheme", ["affine", "symmetric"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_int8_bound_on_model_kernel(bits, scheme, group_size, block):
    N, K = shapes("reference", group_size)
    qw = weight(bits, scheme, group_size, N, K)
    x = torch.randn(8, K)
    ref = oracle(x, qw)
    exact_model = simulate_tables(x, qw, quantize=False)
    assert torch.allclose(exact_model, ref, rtol=1e-10, atol=1e-10)   # the table identity
    y = simulate_tables(x, qw, block=block)
    exact, e8 = bounds(x, qw)
    assert_within(y, ref, e8, f"model b{bits} {scheme} g{group_size}")
    rel = float((y - ref).norm() / ref.norm())
    # ~1% typically; 1-bit affine (levels {0, s}) has small outputs next to its tables: ~4%
    assert rel < 5e-2, rel
    assert float((y - ref).abs().max()) > 0.01 * float(e8.max())   # the bound is not vacuous


# ---------------------------------------------------------------------------------------------
# dispatch: what lut_gemv hands a backend (contract in the module docstring of pykernels.lut)
def test_dispatch_contract(monkeypatch):
    """A fake CPU entry point checks every argument and computes from the planes itself."""
    calls = []

    def fake(x, planes, scales, zeros, codebook, out, N, K_pad, bits, gs, mode):
        assert x.is_contiguous() and out.is_contiguous() and out.dtype == torch.float32
        assert 1 <= x.shape[0] <= 16 and x.shape[1] == K_pad and out.shape == (x.shape[0], N)
        q = unpack_codes(planes, bits)[:N].double()
        g = torch.arange(K_pad) // gs
        w = (q - zeros.double()[:, g]) * scales.double()[:, g]
        out.copy_(x.double() @ w.T)
        calls.append((x.shape[0], x.dtype, mode))

    monkeypatch.setattr(lut_mod, "_entry", lambda name: (fake, None) if name == "cpu" else (None, "disabled"))
    if not pk.backends.REGISTRY["cpu"].status()[0]:
        pytest.skip("pykernels._C not built")
    w = torch.randn(45, 300)
    qw = pk.quantize_weight(w, bits=3, group_size=-1)              # K_pad = 304
    x = torch.randn(35, 300, dtype=torch.bfloat16)
    y = pk.lut_gemv(x, qw, mode="exact")                           # auto -> cpu
    assert [c[0] for c in calls] == [16, 16, 3] and all(c[1:] == (torch.bfloat16, "exact") for c in calls)
    check(y, x, qw, "exact")
    qg, *_ = _gptq_like(act_order=True)
    xg = torch.randn(5, qg.shape[1])
    check(pk.lut_gemv(xg, qg, backend="cpu", mode="int8"), xg, qg, "exact")


def _gptq_like(act_order):
    N, K, gs = 40, 128, 32
    gen = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 16, (N, K), generator=gen)
    perm = torch.randperm(K, generator=gen) if act_order else None
    qw = LUTWeight.from_codes(codes, torch.rand(N, K // gs, generator=gen), torch.full((N, K // gs), 8.0),
                              bits=4, group_size=gs, perm=perm)
    return qw, codes


def test_auto_never_uses_reference(monkeypatch):
    monkeypatch.setattr(lut_mod, "_entry", lambda name: (None, f"{name} disabled for this test"))
    qw = pk.quantize_weight(torch.randn(32, 64), bits=2, group_size=32)
    with pytest.raises(NotImplementedError) as e:
        pk.lut_gemv(torch.randn(64), qw)
    msg = str(e.value)
    assert "cpu:" in msg and "triton:" in msg and "cuda:" in msg and "reference" in msg
    with pytest.raises(NotImplementedError, match="cpu disabled"):
        pk.lut_gemv(torch.randn(64), qw, backend="cpu")
    assert pk.lut_gemv(torch.randn(64), qw, backend="reference").shape == (32,)


def test_missing_cpu_entry_reason():
    fn, why = lut_mod._entry("cpu") if pk.backends.REGISTRY["cpu"].status()[0] else (None, "x")
    assert (fn is None) != (why is None)
    if fn is None and why != "x":
        assert "lut_gemv" in why and "pip install" in why


def test_lut_gemv_errors():
    qw = pk.quantize_weight(torch.randn(40, 128), bits=4, group_size=64)
    x = torch.randn(3, 128)
    with pytest.raises(ValueError, match="x: last dimension 127"):
        pk.lut_gemv(torch.randn(3, 127), qw, backend="reference")
    with pytest.raises(ValueError, match="x: expected"):
        pk.lut_gemv(torch.randn(2, 3, 128), qw, backend="reference")
    with pytest.raises(TypeError, match="x: expected dtype"):
        pk.lut_gemv(x.double(), qw, backend="reference")
    with pytest.raises(TypeError, match="x: expected dtype"):
        pk.lut_gemv(x.int(), qw, backend="reference")
    with pytest.raises(ValueError, match="out: expected"):
        pk.lut_gemv(x, qw, backend="reference", out=torch.empty(3, 41))
    with pytest.raises(ValueError, match="out: expected"):
        pk.lut_gemv(x, qw, backend="reference", out=torch.empty(3, 40, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="out"):
        pk.lut_gemv(x, qw, backend="reference", out=[0.0])
    with pytest.raises(ValueError, match="mode"):
        pk.lut_gemv(x, qw, backend="reference", mode="int4")
    with pytest.raises(ValueError, match="backend"):
        pk.lut_gemv(x, qw, backend="gpu")
    with pytest.raises(TypeError, match="qw"):
        pk.lut_gemv(x, torch.randn(40, 128))
    with pytest.raises(ValueError, match="x: on meta"):
        pk.lut_gemv(x.to("meta"), qw, backend="reference")


# ---------------------------------------------------------------------------------------------
# nn.Module, torch.library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_lut_linear(scheme, dtype):
    lin = nn.Linear(200, 70, bias=True)
    layer = pk.LUTLinear.from_linear(lin, bits=3, group_size=40, scheme=scheme,
                                     mode="exact", backend="reference")
    assert layer.weight.shape == (70, 200) and layer.weight.dtype == torch.float32
    x = torch.randn(2, 5, 200).to(dtype)
    y = layer(x)
    want = F.linear(x.double(), layer.weight.double(), lin.bias.double())
    assert y.shape == (2, 5, 70) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(y.double(), want, rtol=tol, atol=tol)
    # the quantized layer is close to the float one (3 bits, group 40)
    with torch.no_grad():
        yf = lin(x.float()).double()
    rel = float((y.double() - yf).norm() / yf.norm())
    assert rel < 0.25
    r = repr(layer)
    assert "in_features=200" in r and "out_features=70" in r and "bits=3" in r and f"'{scheme}'" in r
    assert layer(x[0, 0]).shape == (70,)


def test_lut_linear_state_dict_and_to():
    lin = nn.Linear(64, 40, bias=False)
    a = pk.LUTLinear.from_linear(lin, bits=2, group_size=32, backend="reference")
    assert a.bias is None and "bias=False" in repr(a)
    b = pk.LUTLinear(pk.quantize_weight(torch.randn(40, 64), bits=2, group_size=32), backend="reference")
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(a(x), b(x))
    c = a.to("cpu")
    assert c(x).shape == (3, 40)
    with pytest.raises(TypeError, match="linear"):
        pk.LUTLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="x: expected"):
        a(torch.randn(3, 65))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_lut_linear_in_a_cast_model_without_no_grad(scheme):
    """A whole-model dtype cast leaves the packed format (fp16 scales, fp32 codebook) exact, and
    a forward without torch.no_grad() (the input requires grad) runs: inference-only kernels read
    it detached."""
    torch.manual_seed(0)
    layer = pk.LUTLinear.from_linear(nn.Linear(64, 32), bits=2, group_size=32, scheme=scheme, backend="reference")
    w0 = layer.weight.clone()
    model = nn.Sequential(nn.Linear(64, 64), layer)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(model)
        assert layer.scales.dtype == torch.float16 and torch.equal(layer.weight, w0)
        if layer.codebook is not None:
            assert layer.codebook.dtype == torch.float32
    x = torch.randn(3, 64)
    y = model(x)  # no torch.no_grad(): the first Linear's output requires grad
    with torch.no_grad():
        assert torch.equal(y.detach(), model(x))


def test_lut_gemv_int8_tables_of_tiny_activations_stay_within_the_bound():
    """|x| ~ 1e-38: 127 / max|T| would overflow float32; the tables are scaled by 2^100 first, so
    the int8 mode keeps its usual relative error."""
    _require("cpu")
    g = torch.Generator().manual_seed(0)
    qw = pk.quantize_weight(torch.randn(64, 256, generator=g), bits=4, group_size=64)
    x = torch.randn(256, generator=g)
    for tiny in (1e-30, 1e-38):
        y8 = pk.lut_gemv(x * tiny, qw, backend="cpu", mode="int8").double()
        ye = pk.lut_gemv(x * tiny, qw, backend="cpu", mode="exact").double()
        assert float((y8 - ye).norm() / ye.norm()) < 0.02, tiny


@pytest.mark.parametrize("scheme", SCHEMES)
def test_opcheck(scheme):
    qw, _ = _gptq_like(act_order=True) if scheme == "affine" else (
        pk.quantize_weight(torch.randn(40, 96), bits=3, group_size=-1 if scheme == "codebook" else 32,
                           scheme=scheme), None)
    x = torch.randn(3, qw.shape[1])
    args = (x, qw.planes, qw.scales, qw.zeros, qw.codebook, qw.perm, qw.shape[0], qw.shape[1], qw.bits,
            qw.group_size, qw.scheme, "exact", "reference")
    torch.library.opcheck(torch.ops.pykernels.lut_gemv.default, args)
    y = torch.ops.pykernels.lut_gemv(*args)
    check(y, x, qw, "exact")


def test_torch_compile():
    qw = pk.quantize_weight(torch.randn(40, 96), bits=4, group_size=32)
    x = torch.randn(2, 96)

    def f(x):
        return pk.lut_gemv(x * 2, qw, backend="reference", mode="exact") + 1

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert torch.allclose(got, f(x), rtol=1e-6, atol=1e-6)
