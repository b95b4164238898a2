"""LUT-GEMV C++ kernels (pykernels._C.lut_gemv), every kernel variant this machine runs, against
a float64 oracle built straight from the format (pykernels.lut_format), not from pykernels.lut.

Tolerances are derived, not tuned (u = 2**-24, fp32 unit roundoff):

* exact mode: tables T = +-x0 +-x1 +-x2 +-x3 (3 roundings), block sums of <= 2 * bits * 16
  table terms weighted by 2**i, block sums S_b of <= 128 x, and <= nblk block contributions per
  output. Every rounding is bounded by u times the magnitude it acts on, so
      |err| <= u * (8 + 2 * bits * 16 + 128 + nblk) * MAG,
      MAG = sum_g |s_g| * ((2**bits - 1) / 2 + |c0 - z_g|) * sum_{k in g} |x_k|
  (the two terms of sum_k q_k x_k = c0 S_g + 1/2 sum_i 2^i L_i with c0 = (2**bits - 1) / 2;
  symmetric has z = c0). A wrong row, plane or nibble is an O(MAG) error, far above this.
* codebook (fp32 for both modes): |err| <= u * (128 + nblk + 4) * sum_k |s| |codebook[q]| |x_k|.
* int8 mode: each looked-up entry is off by at most ts_b / 2 (ts_b = max over the block's
  activation groups of |x0|+|x1|+|x2|+|x3|, / 127), hence
      |y_int8 - y| <= sum_b |s_g(b)| * (2**bits - 1) * n_b * ts_b / 4      (n_b = groups in block b)
  (the bound documented in csrc/cpu/lut_kernel.h), plus the exact-mode fp32 term.
"""

import pytest
import torch

from pykernels.lut_format import pack_codes, padded_shape

_C = pytest.importorskip("pykernels._C", reason="pykernels._C not built: run `make test`")

U = 2.0 ** -24
_ALL_ISAS = ["scalar", "avx2", "avx512"]


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_best = _C.detected_isa()
ISAS = _ALL_ISAS[: _ALL_ISAS.index("avx512" if _best.startswith("avx512") else _best) + 1]
# AVX-512 has two int8 kernels: vpermb + vpdpbusd (VBMI + VNNI) and vpshufb (BW only, forced
# with PYKERNELS_LUT_VBMI=0, read on every call).
VARIANTS = list(ISAS)
if "avx512" in ISAS and {"avx512vbmi", "avx512_vnni"} <= _cpu_flags():
    VARIANTS.append("avx512_vbmi")


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch):
    prev = _C.active_isa()
    isa = "avx512" if request.param == "avx512_vbmi" else request.param
    monkeypatch.setenv("PYKERNELS_LUT_VBMI", "1" if request.param == "avx512_vbmi" else "0")
    _C.set_isa(isa)
    yield request.param
    _C.set_isa(prev)


# ---------------------------------------------------------------------------------------------
# Weights straight from the format, and the float64 oracle with its error bounds


class W:
    """Random codes, packed planes and per-group parameters of a [N, K] weight."""

    def __init__(self, N, K, bits, group_size, scheme, cb_rows=1, scaled_codebook=True, gen=None):
        self.N, self.K, self.bits, self.scheme = N, K, bits, scheme
        self.N_pad, self.K_pad, self.gs = padded_shape(N, K, group_size)
        self.G = self.K_pad // self.gs
        L = 1 << bits
        # Padded rows get random codes too: they must not leak into the kept outputs.
        self.codes = torch.randint(0, L, (self.N_pad, self.K_pad), generator=gen)
        self.planes = pack_codes(self.codes, bits)
        self.scales = (torch.rand(N, self.G, generator=gen) * 0.05 + 0.001).to(torch.float16)
        self.zeros = self.codebook = None
        if scheme == "affine":
            self.zeros = (torch.rand(N, self.G, generator=gen) * (L - 1)).to(torch.float16)
        elif scheme == "codebook":
            self.codebook = torch.randn(cb_rows, L, generator=gen).sort(dim=1).values.contiguous()
            if not scaled_codebook:
                self.scales = None

    def dequant(self):
        """W [N, K_pad] float64 by the formulas of pykernels.lut_format."""
        q = self.codes[: self.N].double()
        s = (self.scales.double() if self.scales is not None else torch.ones(self.N, self.G, dtype=torch.float64))
        s = s.repeat_interleave(self.gs, dim=1)
        if self.scheme == "affine":
            return s * (q - self.zeros.double().repeat_interleave(self.gs, dim=1))
        if self.scheme == "symmetric":
            return s * (q - ((1 << self.bits) - 1) / 2)
        cb = self.codebook.double()
        rows = cb[0][self.codes[: self.N]] if cb.shape[0] == 1 else torch.gather(cb, 1, self.codes[: self.N])
        return s * rows

    def nblk_and_blocks(self):
        """Table blocks (lut_gemv.h): each scale group cut into pieces of <= 128 k."""
        blocks = []
        for g in range(self.G):
            for k0 in range(g * self.gs, (g + 1) * self.gs, 128):
                blocks.append((g, k0, min(k0 + 128, (g + 1) * self.gs)))
        return blocks

    def run(self, x, mode, out=None):
        M = x.shape[0]
        out = torch.empty(M, self.N) if out is None else out
        _C.lut_gemv(x, self.planes, self.scales, self.zeros, self.codebook, out, self.N, self.K_pad, self.bits,
                    self.gs, mode)
        return out

    def bounds(self, x):
        """(float64 reference, exact-mode fp32 bound, int8-mode extra bound), each [M, N]."""
        xd = x.double()
        Wd = self.dequant()
        ref = xd @ Wd.T
        ax = xd.abs()
        nblk = len(self.nblk_and_blocks())
        s = self.scales.double().abs() if self.scales is not None else torch.ones(self.N, self.G, dtype=torch.float64)
        if self.scheme == "codebook":
            exact = U * (128 + nblk + 4) * (ax @ Wd.abs().T)
            return ref, exact, torch.zeros_like(exact)
        c0 = ((1 << self.bits) - 1) / 2
        zt = (c0 - self.zeros.double()).abs() if self.zeros is not None else torch.zeros_like(s)
        X = ax.view(x.shape[0], self.G, self.gs).sum(-1)                               # [M, G]
        mag = X @ (s * (c0 + zt)).T
        exact = U * (8 + 2 * self.bits * 16 + 128 + nblk) * mag
        # int8: per block, ts_b = max over activation groups of sum |x_j| / 127
        grp = ax.view(x.shape[0], -1, 4).sum(-1)                                       # [M, K/4]
        ts = torch.stack([grp[:, k0 // 4: k1 // 4].max(dim=1).values / 127 for _, k0, k1 in self.nblk_and_blocks()], 1)
        nb = torch.tensor([(k1 - k0) / 4 for _, k0, k1 in self.nblk_and_blocks()], dtype=torch.float64)
        sg = torch.stack([s[:, g] for g, _, _ in self.nblk_and_blocks()], 1)          # [N, nblk]
        int8 = ((2 ** self.bits - 1) / 4) * ((ts * nb) @ sg.T)
        return ref, exact, int8 * (1 + 1e-3)  # 1e-3: fp32 rounding of ts and of T / ts


def _x(M, K, K_pad, dtype=torch.float32, gen=None):
    x = torch.zeros(M, K_pad)
    x[:, :K] = torch.randn(M, K, generator=gen)
    return x.to(dtype)


def check(w, x, mode, out=None):
    got = w.run(x, mode, out).double()
    ref, exact, int8 = w.bounds(x)
    bound = exact + (int8 if mode == "int8" else 0)
    err = (got - ref).abs()
    bad = err > bound
    if bad.any():
        i = int((err - bound).flatten().argmax())
        m, n = divmod(i, w.N)
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} outputs off; worst at (m={m}, n={n}): "
                             f"got {got[m, n]:.6g}, ref {ref[m, n]:.6g}, err {err[m, n]:.3g} > bound {bound[m, n]:.3g}")
    return got, ref, bound


# ---------------------------------------------------------------------------------------------
# The matrix: bits x scheme x group size x M x variant x mode (small K), then a few large shapes

SCHEMES = ["affine", "symmetric", "codebook", "codebook_channel"]


def _make(N, K, bits, gsz, scheme, gen):
    if scheme == "codebook_channel":
        return W(N, K, bits, gsz, "codebook", cb_rows=N, gen=gen)
    return W(N, K, bits, gsz, scheme, gen=gen)


# codebook weights run in fp32 whatever the mode: one mode covers them
SCHEME_MODES = [("affine", "int8"), ("affine", "exact"), ("symmetric", "int8"), ("symmetric", "exact"),
                ("codebook", "int8"), ("codebook_channel", "exact")]


@pytest.mark.parametrize("scheme, mode", SCHEME_MODES, ids=lambda v: v)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("gsz", [24, 32, 64, 128, -1])
def test_matrix(variant, bits, scheme, gsz, mode):
    gen = torch.Generator().manual_seed(bits * 1000 + gsz)
    # 384 = 3 * 128 is a multiple of every group size; per-channel uses an odd K = 33 * 8 (table
    # blocks 128 + 128 + 8). Group size 24 = 3 byte columns: odd column counts in every block.
    K = 264 if gsz == -1 else 384
    w = _make(45, K, bits, gsz, scheme, gen)   # 45 rows: two tiles, the last one short
    for M in (1, 3, 8, 16):
        check(w, _x(M, K, w.K_pad, gen=gen), mode)


@pytest.mark.parametrize("case", [(1000, 4096 + 128, 4, 128, "affine", 3, "int8"),
                                  (1000, 4096 + 128, 4, 128, "affine", 16, "exact"),
                                  (1000, 4096 + 128, 2, -1, "symmetric", 8, "int8"),
                                  (1000, 4096 + 128, 3, 64, "codebook_channel", 5, "int8")],
                         ids=lambda c: f"{c[4]}-b{c[2]}-g{c[3]}-M{c[5]}-{c[6]}")
def test_large(variant, case):
    N, K, bits, gsz, scheme, M, mode = case
    gen = torch.Generator().manual_seed(7)
    w = _make(N, K, bits, gsz, scheme, gen)
    check(w, _x(M, K, w.K_pad, gen=gen), mode)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_x_dtypes(variant, dtype):
    gen = torch.Generator().manual_seed(3)
    w = _make(70, 256, 4, 64, "affine", gen)
    check(w, _x(4, 256, w.K_pad, dtype, gen=gen), "int8")   # the oracle sees the same rounded x
    check(w, _x(4, 256, w.K_pad, dtype, gen=gen), "exact")


def test_codebook_without_scales(variant):
    gen = torch.Generator().manual_seed(4)
    w = W(40, 128, 3, -1, "codebook", cb_rows=40, scaled_codebook=False, gen=gen)
    check(w, _x(2, 128, w.K_pad, gen=gen), "exact")


def test_int8_agrees_with_exact(variant):
    """Same weights, both modes: they differ by at most the int8 bound (plus both fp32 terms)."""
    gen = torch.Generator().manual_seed(5)
    w = _make(96, 1024, 4, 128, "affine", gen)
    x = _x(8, 1024, w.K_pad, gen=gen)
    a, b = w.run(x, "int8").double(), w.run(x, "exact").double()
    _, exact, int8 = w.bounds(x)
    assert ((a - b).abs() <= 2 * exact + int8).all()
    # The bound is not vacuous: int8 really differs from exact, and by far less than the bound.
    assert (a - b).abs().max() > 0
    assert (a - b).abs().max() < 0.5 * int8.max()


def test_variants_agree():
    """Every variant builds the same int8 tables (same operation order) and sums the lookups
    exactly in integers, and the SIMD epilogues do the same fp32 operations: symmetric int8
    results are bit-identical across SIMD variants, and the scalar kernel (plain mul + add instead
    of fma) differs by rounding only. One table entry off by one step would move y by about
    scale * ts / 4 (~1e-4 relative), far above the 1e-6 allowed here."""
    gen = torch.Generator().manual_seed(6)
    w = _make(100, 512, 3, 64, "symmetric", gen)
    x = _x(5, 512, w.K_pad, gen=gen)
    prev = _C.active_isa()
    outs = {}
    try:
        for v in VARIANTS:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("PYKERNELS_LUT_VBMI", "1" if v == "avx512_vbmi" else "0")
                _C.set_isa("avx512" if v == "avx512_vbmi" else v)
                outs[v] = w.run(x, "int8")
    finally:
        _C.set_isa(prev)
    simd = [o for v, o in outs.items() if v != "scalar"]
    for o in simd[1:]:
        assert torch.equal(o, simd[0])
    for o in simd:
        assert (o - outs["scalar"]).abs().max() <= 1e-6 * outs["scalar"].abs().max()


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_bits_5_to_7(variant, bits):
    gen = torch.Generator().manual_seed(bits)
    for scheme, mode in (("affine", "int8"), ("symmetric", "exact"), ("codebook", "int8")):
        w = _make(70, 384, bits, 64, scheme, gen)
        check(w, _x(3, 384, w.K_pad, gen=gen), mode)


# ---------------------------------------------------------------------------------------------
# Padding, threads, output overwrite


def test_padding_cannot_leak(variant):
    """N = 33 (one full tile + 1 row): padded rows hold all-ones codes, out starts as NaN and the
    scales/zeros are exactly N rows (anything read past them would be a fault or garbage)."""
    gen = torch.Generator().manual_seed(8)
    for scheme in ("affine", "codebook_channel"):
        w = _make(33, 200, 4, -1, scheme, gen)
        w.codes[33:] = 15
        w.planes = pack_codes(w.codes, 4)
        for mode in ("int8", "exact"):
            out = torch.full((3, 33), float("nan"))
            got, _, _ = check(w, _x(3, 200, w.K_pad, gen=gen), mode, out=out)
            assert torch.isfinite(got).all()


def test_threads_agree(variant):
    gen = torch.Generator().manual_seed(9)
    w = _make(300, 512, 4, 128, "affine", gen)
    x = _x(3, 512, w.K_pad, gen=gen)
    prev = _C.get_num_threads()
    try:
        _C.set_num_threads(1)
        a = w.run(x, "int8")
        _C.set_num_threads(3)
        b = w.run(x, "int8")
    finally:
        _C.set_num_threads(prev)
    assert torch.equal(a, b)  # tiles are independent: threads cannot change the sums


def test_nan_in_x_propagates(variant):
    gen = torch.Generator().manual_seed(10)
    w = _make(40, 128, 2, 64, "symmetric", gen)
    x = _x(2, 128, w.K_pad, gen=gen)
    x[1, 70] = float("nan")
    for mode in ("int8", "exact"):
        y = w.run(x, mode)
        assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()


# ---------------------------------------------------------------------------------------------
# Argument checks: every bad argument is named


def _args(**over):
    gen = torch.Generator().manual_seed(11)
    w = W(40, 128, 4, 64, "affine", gen=gen)
    a = dict(x=torch.randn(2, 128), planes=w.planes, scales=w.scales, zeros=w.zeros, codebook=None,
             out=torch.empty(2, 40), N=40, K_pad=128, bits=4, gs=64, mode="int8")
    a.update(over)
    return a


def _call(a):
    _C.lut_gemv(a["x"], a["planes"], a["scales"], a["zeros"], a["codebook"], a["out"], a["N"], a["K_pad"],
                a["bits"], a["gs"], a["mode"])


@pytest.mark.parametrize("over, exc, name", [
    (dict(planes=torch.zeros(2, 16, 4, 32, dtype=torch.int8)), TypeError, "planes"),
    (dict(planes=torch.zeros(2, 16, 3, 32, dtype=torch.uint8)), ValueError, "planes"),
    (dict(planes=torch.zeros(2, 16, 4, 32, dtype=torch.uint8)[:, ::2]), ValueError, "planes"),
    (dict(x=torch.randn(0, 128)), ValueError, "x"),
    (dict(x=torch.randn(17, 128), out=torch.empty(17, 40)), ValueError, "x"),
    (dict(x=torch.randn(2, 120)), ValueError, "x"),
    (dict(x=torch.randn(2, 128, dtype=torch.float64)), TypeError, "x"),
    (dict(x=torch.randn(128, 2).T), ValueError, "x"),
    (dict(x=torch.randn(128)), ValueError, "x"),
    (dict(bits=9), ValueError, "bits"),
    (dict(bits=0), ValueError, "bits"),
    (dict(gs=48), ValueError, "gs"),
    (dict(gs=12), ValueError, "gs"),
    (dict(K_pad=100), ValueError, "K_pad"),
    (dict(N=0), ValueError, "N"),
    (dict(N=41), ValueError, "scales"),
    (dict(scales=torch.ones(40, 2)), TypeError, "scales"),
    (dict(scales=torch.ones(40, 3, dtype=torch.float16)), ValueError, "scales"),
    (dict(scales=None), ValueError, "scales"),
    (dict(zeros=torch.ones(40, 2, dtype=torch.int32)), TypeError, "zeros"),
    (dict(codebook=torch.ones(1, 8)), ValueError, "codebook"),
    (dict(codebook=torch.ones(3, 16), zeros=None), ValueError, "codebook"),
    (dict(codebook=torch.ones(1, 16, dtype=torch.float64), zeros=None), TypeError, "codebook"),
    (dict(codebook=torch.ones(1, 16)), ValueError, "zeros"),
    (dict(out=torch.empty(2, 40, dtype=torch.float16)), TypeError, "out"),
    (dict(out=torch.empty(2, 41)), ValueError, "out"),
    (dict(out=torch.empty(40, 2).T), ValueError, "out"),
    (dict(mode="fp8"), ValueError, "mode"),
    (dict(x=[1.0, 2.0]), TypeError, "x"),
])
def test_bad_arguments(over, exc, name):
    with pytest.raises(exc, match=name):
        _call(_args(**over))


def test_good_arguments_baseline():
    _call(_args())  # the base case of test_bad_arguments is valid
