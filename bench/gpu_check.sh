#!/bin/bash
# GPU check on a machine whose python already has torch, triton, pybind11 (and nvcc on PATH); no
# pip, no network (a lent GPU box): build pykernels in place for this GPU's architecture, run the
# GPU tests, then the GPU suite (bench/gpu.py). Logs go to $OUT (default ./gpu-check); the exit
# status is 1 when any step failed.
#   bash bench/gpu_check.sh [all|tests|triton|bench]
# tests: the CUDA parity tests (about 3 min on an H100 host); triton: the Triton kernels compiled
# on the GPU (several minutes); bench: python -m bench.gpu. The build takes about 2 min.
set -u
cd "$(dirname "$0")/.." || exit 1  # the repository root
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
arch=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')") || exit 1
nvidia-smi -L; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
s=$(date +%s)
PYKERNELS_CUDA_ARCHS=$arch $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "build for sm_$arch: $(( $(date +%s) - s )) s"

failed=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, print the verdict
  local name=$1 lim=$2 t0 rc
  shift 2
  t0=$(date +%s)
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || failed=1
  echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/$name.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/$name.log" | cut -c1-240 | head -10
}

P="$PY -m pytest -q -p no:cacheprovider --tb=short -W ignore::DeprecationWarning"
mode=${1:-all}
if [ "$mode" = all ] || [ "$mode" = tests ]; then
  step cuda_attention 150 $P tests/test_cuda_build.py
  step cuda_kv 200 $P tests/test_kv_gpu.py -k gpu
  step cuda_lut 150 $P tests/test_lut_gpu.py -k "cuda_parity or side_stream"
fi
if [ "$mode" = all ] || [ "$mode" = triton ]; then
  step triton_attention 300 $P tests/test_triton_attention.py -k compiled_on_gpu
  step triton_kv 300 $P tests/test_triton_kv.py -k compiled_on_gpu
  step triton_lut 300 $P tests/test_lut_gpu.py -k compiled_parity
fi
if [ "$mode" = all ] || [ "$mode" = bench ]; then
  step bench_gpu 300 $PY -m bench.gpu --json "$OUT/gpu.json"
  cat "$OUT/bench_gpu.log"
fi
exit $failed
