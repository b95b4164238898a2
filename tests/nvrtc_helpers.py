"""Shared by the CUDA build tests: NVRTC compiles without a GPU, so only its absence skips."""
import pytest


def nvrtc_or_skip():
    """-> cupy's NVRTC binding; skips the test only when NVRTC itself is not available."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except Exception as e:  # the only reason to skip: no NVRTC here
        pytest.skip(f"NVRTC not importable (pip install 'pykernels[jit]'): {type(e).__name__}: {e}")
    try:
        nvrtc.getVersion()
    except Exception as e:
        pytest.skip(f"libnvrtc not loadable (pip install nvidia-cuda-nvrtc): {type(e).__name__}: {e}")
    return nvrtc
