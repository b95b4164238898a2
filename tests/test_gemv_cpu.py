"""Dense bf16 GEMV (pykernels.gemv -> pykernels._C.gemv), every ISA variant this machine runs
(the `isa` fixture of conftest.py), against a float64 oracle.

Tolerance, derived rather than tuned (u = 2**-24, fp32 unit roundoff): every product x_k w_k is
exact in fp32 (bf16 w has 8 significant bits; fp32 FMA / vdpbf16ps round only the sums), and
each output is a sum of K products plus the bias, formed through at most K + 2 fp32 additions
in any order (lanes, k-steps, horizontal reduction), so
    |y - y64| <= (K + 2) * u * (sum_k |x_k w_k| + |b|)
(Higham's gamma_n bound). A bf16 output adds one rounding: + 2**-8 |y64| (bf16 keeps 8
significant bits, so its relative rounding error is <= 2**-9; doubled for the fp32 error it
rounds). A dropped or doubled term is ~ sum |x w| / K, well above (K + 2) u sum |x w|.
The weight buffers are NaN outside the view, so any read past K or past row N - 1 shows up.
"""

import pytest
import torch

from pykernels.gemv import gemv

pytest.importorskip("pykernels._C", reason="pykernels._C not built: run `make test`")

U = 2.0 ** -24


def padded_weight(N, K, gen, lead=3, tail=37):
    """w [N, K] bf16 as a row-strided view of a NaN buffer (NaN before, after and past K)."""
    ldw = K + tail
    buf = torch.full((N + 2, ldw), float("nan"), dtype=torch.bfloat16)
    buf[1:N + 1, lead:lead + K] = torch.randn(N, K, generator=gen).to(torch.bfloat16)
    w = buf[1:N + 1, lead:lead + K]
    assert w.stride() == (ldw, 1)
    return w


def check(y, x, w, bias):
    x64, w64 = x.double().reshape(-1, w.shape[1]), w.double()
    ref = x64 @ w64.T
    mag = x64.abs() @ w64.abs().T
    if bias is not None:
        ref = ref + bias.double()
        mag = mag + bias.double().abs()
    tol = (w.shape[1] + 2) * U * mag
    if y.dtype == torch.bfloat16:
        tol = tol + 2.0 ** -8 * ref.abs()
    err = (y.double().reshape(ref.shape) - ref).abs()
    bad = ~(err <= tol + 1e-30)
    if bad.any():
        i = tuple(int(v) for v in torch.nonzero(bad)[0])
        raise AssertionError(f"{int(bad.sum())} mismatches; first at [m, n] = {i}: got {float(y.reshape(ref.shape)[i])}, "
                             f"want {float(ref[i])} +- {float(tol[i])}")


@pytest.mark.parametrize("N", [1, 7, 33, 257, 4099])
@pytest.mark.parametrize("K", [1, 5, 31, 64, 1000, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_matches_float64(isa, N, K, dtype):
    gen = torch.Generator().manual_seed(N * 7919 + K)
    w = padded_weight(N, K, gen)
    for M in (1, 2, 3, 4, 5, 8, 11):
        x = torch.randn(M, K, generator=gen).to(dtype)
        for bias in (None, torch.randn(N, generator=gen)):
            y = gemv(x, w, bias)
            assert y.shape == (M, N) and y.dtype == dtype
            check(y, x, w, bias)


def test_gemv_1d_out_noncontig_bias_dtypes(isa):
    gen = torch.Generator().manual_seed(1)
    N, K = 130, 77
    w = padded_weight(N, K, gen)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(K, generator=gen).to(dtype)
        y = gemv(x, w)
        assert y.shape == (N,)
        check(y, x, w, None)
        # out= (contiguous: written in place)
        out = torch.full((N,), float("nan"), dtype=dtype)
        b16 = torch.randn(N, generator=gen).to(torch.bfloat16)
        assert gemv(x, w, b16, out=out) is out
        check(out, x, w, b16)
        # non-contiguous x (a column-strided view) and a non-contiguous out [M, N]
        xs = torch.randn(K, 10, generator=gen).to(dtype)[:, ::2].T  # [5, K], stride (2, 10)
        assert not xs.is_contiguous()
        out2 = torch.empty(N, 5, dtype=dtype).T
        gemv(xs, w, None, out=out2)
        check(out2, xs, w, None)
        # a float64 bias is cast to float32
        b64 = torch.randn(N, generator=gen, dtype=torch.float64)
        check(gemv(x, w, b64), x, w, b64.float())


def test_gemv_contiguous_weight_and_threads(isa, threads):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(1000, 96, generator=gen).to(torch.bfloat16)
    x = torch.randn(2, 96, generator=gen).to(torch.bfloat16)
    for n in (1, 2, 3):
        threads(n)
        check(gemv(x, w), x, w, None)


def test_gemv_reference_backend():
    gen = torch.Generator().manual_seed(3)
    w = padded_weight(40, 50, gen)
    x = torch.randn(3, 50, generator=gen)
    b = torch.randn(40, generator=gen)
    want = (x.double() @ w.double().T + b.double()).float()
    torch.testing.assert_close(gemv(x, w, b, backend="reference"), want, rtol=0, atol=0)
    check(gemv(x, w, b, backend="cpu"), x, w, b)


def test_gemv_errors_name_the_argument():
    w = torch.randn(8, 16).to(torch.bfloat16)
    x = torch.randn(16).to(torch.bfloat16)
    with pytest.raises(TypeError, match="w: expected dtype torch.bfloat16"):
        gemv(x, w.float())
    with pytest.raises(TypeError, match="x: expected dtype"):
        gemv(x.half(), w)
    with pytest.raises(ValueError, match="x: expected .*K=16"):
        gemv(torch.randn(15).to(torch.bfloat16), w)
    with pytest.raises(ValueError, match="x: expected"):
        gemv(torch.randn(2, 2, 16).to(torch.bfloat16), w)
    with pytest.raises(ValueError, match="w: expected unit stride along K"):
        gemv(x, torch.randn(16, 8).to(torch.bfloat16).T)
    with pytest.raises(ValueError, match="w: expected 2 dimensions"):
        gemv(x, w.reshape(-1))
    with pytest.raises(ValueError, match="bias: expected shape"):
        gemv(x, w, torch.randn(9))
    with pytest.raises(TypeError, match="bias: expected a floating"):
        gemv(x, w, torch.ones(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="out: expected"):
        gemv(x, w, out=torch.empty(8))  # float32 out for a bf16 x
    with pytest.raises(ValueError, match="out: expected"):
        gemv(x, w, out=torch.empty(9, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="backend: expected"):
        gemv(x, w, backend="triton")
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        gemv([1.0] * 16, w)


def test_native_checks_again():
    """The launcher re-validates (no out-of-bounds read whatever Python passes)."""
    from pykernels import _C

    w = torch.randn(8, 16).to(torch.bfloat16)
    x = torch.randn(1, 16).to(torch.bfloat16)
    out = torch.empty(1, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x: expected 1 <= M <= 8"):
        _C.gemv(torch.randn(9, 16).to(torch.bfloat16), w, None, torch.empty(9, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="w: expected shape"):
        _C.gemv(x, w[:, :15], None, out)
    with pytest.raises(ValueError, match="w: expected unit stride"):
        _C.gemv(torch.randn(1, 8).to(torch.bfloat16), w.T, None, torch.empty(1, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="w: expected a row stride"):
        _C.gemv(x, torch.randn(32).to(torch.bfloat16).as_strided((8, 16), (2, 1)), None, out)
    with pytest.raises(TypeError, match="out: expected x's dtype"):
        _C.gemv(x, w, None, torch.empty(1, 8))
    with pytest.raises(ValueError, match="out: expected shape"):
        _C.gemv(x, w, None, torch.empty(1, 9, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bias: expected shape"):
        _C.gemv(x, w, torch.randn(7), out)
    with pytest.raises(TypeError, match="w: expected bfloat16"):
        _C.gemv(x, w.float(), None, out)
    with pytest.raises(ValueError, match="x: expected a contiguous"):
        _C.gemv(torch.randn(16, 2).to(torch.bfloat16).T, w, None, torch.empty(2, 8, dtype=torch.bfloat16))


def test_cuda_tensors_route_to_linear_or_raise():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    w = torch.randn(8, 16, device="cuda").to(torch.bfloat16)
    x = torch.randn(16, device="cuda").to(torch.bfloat16)
    with pytest.raises(NotImplementedError, match="gemv: CPU only"):
        gemv(x, w, backend="cpu")
    torch.testing.assert_close(gemv(x, w), torch.nn.functional.linear(x, w))


def test_out_must_not_alias_inputs_and_parameters_work():
    w = torch.randn(16, 16).to(torch.bfloat16)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="out: overlaps x"):
        gemv(x, w, out=x)
    with pytest.raises(ValueError, match="out"):
        gemv(x.to(torch.bfloat16), w, out=w[:2])
    # an nn.Parameter (requires_grad) is read like any weight: no autograd, no DLPack refusal
    p = torch.nn.Parameter(w.clone())
    torch.testing.assert_close(gemv(x, p), gemv(x, w), rtol=0, atol=0)
