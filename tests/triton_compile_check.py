"""Compile the Triton decode-attention kernels to GPU code (PTX + cubin via the ptxas bundled
with triton) without a GPU, for sm_80 and sm_90. Run in a subprocess by the tests because the
kernels must be defined with TRITON_INTERPRET unset.

``python triton_compile_check.py`` compiles the attention kernels; ``... lut`` compiles the
LUT-GEMV kernel (pykernels.triton.lut_gemv) instead."""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

import pykernels.triton.decode_attention as m  # noqa: E402


def compile_one(fn, types, consts, arch, num_warps=4):
    sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def main():
    failures = []
    count = 0
    for arch in (80, 90):
        for dt, dotf32 in (("bf16", False), ("fp16", False), ("fp32", True)):
            ptrs = dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", bt_ptr="*i32", seqlens_ptr="*i32",
                        cum_ptr="*i64", out_ptr=f"*{dt}", lse_ptr="*fp32", po_ptr="*fp32", plse_ptr="*fp32",
                        qk_scale="fp32")
            meta = dict(HKV=2, G=4, D=80, G_PAD=16, D_PAD=128, TILE=64, PAGED=(dt == "bf16"), DOT_F32=dotf32)
            for fn in (m._split_kernel, m._lean_kernel):
                try:
                    k = compile_one(fn, ptrs, meta, arch)
                    assert "cubin" in k.asm and len(k.asm["cubin"]) > 0
                    count += 1
                except Exception as e:  # report every failure, not just the first
                    failures.append(f"{fn.__name__} sm_{arch} {dt}: {e!r}"[:2000])
        meta = dict(HKV=2, G=4, D=80, G_PAD=16, D_PAD=128)
        types = dict(seqlens_ptr="*i32", cum_ptr="*i64", out_ptr="*bf16", lse_ptr="*fp32", po_ptr="*fp32",
                     plse_ptr="*fp32")
        for fn, extra in ((m._split_merge_kernel, dict(TILE=64, SB=32)), (m._lean_merge_kernel, dict(SB=16))):
            try:
                compile_one(fn, types, {**meta, **extra}, arch)
                count += 1
            except Exception as e:
                failures.append(f"{fn.__name__} sm_{arch}: {e!r}"[:2000])
    for f in failures:
        print("FAIL", f)
    print(f"compiled {count} kernels, {len(failures)} failures")
    return 1 if failures else 0


def main_lut():
    """LUT-GEMV: every scheme, 1-8 bits, the three x dtypes (16-bit x: tensor-core dots)."""
    import pykernels.triton.lut_gemv as lut

    failures = []
    count = 0
    fn = lut._lut_gemv_kernel
    cases = [  # (x dtype, bits, scheme, has_scale, cb_per_row, BLOCK_N, BLOCK_K); fp32 x: DOT=2 (bf16 x3)
        ("bf16", 4, 0, True, False, 32, 64), ("fp16", 3, 1, True, False, 32, 32),
        ("fp32", 2, 0, True, False, 32, 64), ("bf16", 8, 1, True, False, 32, 16),
        ("fp32", 4, 2, True, False, 32, 64), ("bf16", 1, 2, False, True, 32, 32),
    ]
    for arch in (80, 90):
        for dt, bits, scheme, has_scale, per_row, bn, bk in cases:
            types = dict(x_ptr=f"*{dt}", planes_ptr="*u8", scales_ptr="*fp16", zeros_ptr="*fp16",
                         cb_ptr="*fp32", out_ptr="*fp32")
            meta = dict(BITS=bits, SCHEME=scheme, HAS_SCALE=has_scale, CB_PER_ROW=per_row, M_PAD=16,
                        BLOCK_N=bn, BLOCK_K=bk, DOT=2 if dt == "fp32" else 1)
            try:
                k = compile_one(fn, types, meta, arch, num_warps=8 if bk >= 64 else 4)  # as launch_config
                assert "cubin" in k.asm and len(k.asm["cubin"]) > 0
                count += 1
            except Exception as e:
                failures.append(f"lut_gemv sm_{arch} {dt} bits={bits} scheme={scheme}: {e!r}"[:2000])
    for f in failures:
        print("FAIL", f)
    print(f"compiled {count} kernels, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main_lut() if sys.argv[1:] == ["lut"] else main())
