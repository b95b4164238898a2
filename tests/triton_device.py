"""Where tests/test_triton_attention.py and tests/test_triton_kv.py run their kernel cases: in the
Triton interpreter on CPU tensors (default), or compiled on a GPU with PK_TRITON_TEST_DEVICE=cuda
(``run_compiled_on_gpu`` starts that run in a subprocess when a GPU is present). Import this
before triton: it sets TRITON_INTERPRET for the interpreter run."""
import os
import subprocess
import sys

DEVICE = os.environ.get("PK_TRITON_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import torch  # noqa: E402


def to_device(t):
    """``t`` on DEVICE with its strides kept (a plain ``.to()`` packs a non-dense view, which would
    hide the head / row / page strides a test sets up); the gaps between elements hold NaN
    (floats) or 0, as the CPU originals do."""
    if t is None or DEVICE == "cpu":
        return t
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 1
    fill = float("nan") if t.is_floating_point() else 0
    out = torch.full((span,), fill, dtype=t.dtype, device=DEVICE).as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


def run_compiled_on_gpu(test_file: str) -> None:
    """Run ``test_file``'s kernel cases compiled by Triton on the GPU (the interpreter checks the
    kernels' logic, not GPU code generation): pytest in a subprocess with
    PK_TRITON_TEST_DEVICE=cuda and without TRITON_INTERPRET; asserts that it passed."""
    import pykernels

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PK_TRITON_TEST_DEVICE"] = "cuda"
    root = os.path.dirname(os.path.dirname(os.path.abspath(pykernels.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                        os.path.abspath(test_file)], env=env, capture_output=True, text=True, timeout=1800)
    tail = r.stdout[-6000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and " failed" not in r.stdout, tail
