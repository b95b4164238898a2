"""Build pykernels._C (C++ CPU kernels) and, when nvcc is present, pykernels._cuda.

Environment:
  PYKERNELS_CUDA=0/1        force the CUDA extension off / on (default: on when nvcc is found)
  PYKERNELS_CUDA_ARCHS      e.g. "80;90" (default), compute capabilities to build SASS for
  CUDA_HOME                 CUDA toolkit root (default: dirname(dirname(which nvcc)))
  PYKERNELS_BUILD_JOBS      source files compiled at once (default: the number of CPUs)
"""
import glob
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = [os.path.join("csrc", "include"), "csrc"]
SHARED_HEADERS = sorted(glob.glob("csrc/include/pykernels/*.h")) + ["csrc/tensor_arg.h"]
CPU_HEADERS = SHARED_HEADERS + ["csrc/attention_args.h"] + sorted(glob.glob("csrc/cpu/*.h"))
CUDA_HEADERS = SHARED_HEADERS + ["csrc/attention_args.h"] + sorted(glob.glob("csrc/cuda/*.cuh") + glob.glob("csrc/cuda/*.h"))

# Per-ISA translation units: the file suffix picks the flags. Never -march=native: the wheel
# may run on another machine; the right variant is chosen at run time by CPUID.
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
           "-Wno-maybe-uninitialized"]  # GCC 12 false positive inside avx512fintrin.h
ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512.cpp": _AVX512,
    "_avx512bf16.cpp": _AVX512 + ["-mavx512bf16"],
    "_avx512vbmi.cpp": _AVX512 + ["-mavx512vbmi", "-mavx512vnni"],
}


def log(msg):
    print(f"[pykernels setup] {msg}", flush=True)


def find_nvcc():
    mode = os.environ.get("PYKERNELS_CUDA", "").strip()
    if mode == "0":
        log("PYKERNELS_CUDA=0: not building pykernels._cuda")
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        for cand in ("/usr/local/cuda/bin/nvcc",):
            if os.path.exists(cand):
                nvcc = cand
                break
        else:
            nvcc = None
    if nvcc is None:
        if mode == "1":
            sys.exit("PYKERNELS_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        log("nvcc not found: not building pykernels._cuda (the cupy JIT path can still compile "
            "the CUDA kernels at run time when a GPU is present)")
        return None
    return os.path.realpath(nvcc)


def cuda_root(nvcc):
    """The toolkit root: nvcc on PATH may be a wrapper script outside the toolkit."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(nvcc)), "/usr/local/cuda"]
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    sys.exit(f"nvcc found at {nvcc} but no CUDA toolkit root with include/cuda_runtime.h among {cands}; "
             "set CUDA_HOME (or PYKERNELS_CUDA=0 to skip the CUDA extension)")


def cuda_archs():
    archs = os.environ.get("PYKERNELS_CUDA_ARCHS", "80;90")
    out = []
    for a in archs.replace(",", ";").split(";"):
        a = a.strip().replace(".", "")
        if a:
            out += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return out


class BuildExt(build_ext):
    """Adds per-file flags: ISA flags by file suffix, nvcc for .cu files."""

    def build_extensions(self):
        self.compiler.src_extensions.append(".cu")
        default_compile = self.compiler._compile
        nvcc = getattr(self, "nvcc", None)

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            if src.endswith(".cu"):
                cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                       "--expt-relaxed-constexpr", "-lineinfo"] + cuda_archs()
                cmd += [a for a in pp_opts if a.startswith(("-I", "-D"))]
                log(" ".join(cmd))
                subprocess.check_call(cmd)
                return
            extra = list(extra_postargs)
            for suffix, flags in ISA_FLAGS.items():
                if src.endswith(suffix):
                    extra += flags
            default_compile(obj, src, ext, cc_args, extra, pp_opts)

        self.compiler._compile = _compile
        super().build_extensions()


def extensions():
    common = ["-O3", "-fvisibility=hidden", "-pthread", "-fno-math-errno"]
    cpu_sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    exts = [
        Pybind11Extension(
            "pykernels._C",
            cpu_sources,
            include_dirs=INCLUDE,
            extra_compile_args=common,
            extra_link_args=["-pthread"],
            depends=CPU_HEADERS,
            cxx_std=17,
        )
    ]
    nvcc = find_nvcc()
    if nvcc is not None:
        cuda_home = cuda_root(nvcc)
        lib = os.path.join(cuda_home, "lib64")
        if not os.path.isdir(lib):
            lib = os.path.join(cuda_home, "targets", "x86_64-linux", "lib")
        log(f"building pykernels._cuda with {nvcc} for archs {os.environ.get('PYKERNELS_CUDA_ARCHS', '80;90')}")
        exts.append(
            Pybind11Extension(
                "pykernels._cuda",
                ["csrc/bindings_cuda.cpp"] + sorted(glob.glob("csrc/cuda/*.cu")),
                include_dirs=INCLUDE + [os.path.join(cuda_home, "include")],
                library_dirs=[lib],
                # static cudart: the module imports on machines without the CUDA runtime library;
                # calls then fail with a clear "no CUDA device" error instead.
                libraries=["cudart_static", "dl", "rt", "pthread"],
                extra_compile_args=common,
                depends=CUDA_HEADERS,
                cxx_std=17,
            )
        )
    return exts


class _BuildExtWithNvcc(BuildExt):
    def run(self):
        self.nvcc = find_nvcc()
        super().run()


class _BuildPyWithCudaSources(build_py):
    """Ships the CUDA kernel sources inside the package (pykernels/_csrc/...) so the cupy JIT
    path can compile them on a machine where pykernels._cuda was not built."""

    def run(self):
        super().run()
        if self.dry_run:
            return
        for pattern, sub in (("csrc/include/pykernels/*.h", "include/pykernels"), ("csrc/cuda/*.cuh", "cuda")):
            dst = os.path.join(self.build_lib, "pykernels", "_csrc", sub)
            self.mkpath(dst)
            for src in sorted(glob.glob(os.path.join(ROOT, pattern))):
                self.copy_file(src, os.path.join(dst, os.path.basename(src)))


# Compile an extension's source files in parallel (each .cu file takes about a minute in nvcc).
ParallelCompile("PYKERNELS_BUILD_JOBS", default=0).install()
setup(ext_modules=extensions(), cmdclass={"build_ext": _BuildExtWithNvcc, "build_py": _BuildPyWithCudaSources})
