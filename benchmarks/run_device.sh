#!/usr/bin/env bash
# Run benchmarks on a lent GPU machine (see benchmarks/README.md): installs the carried
# wheels (.whl: opacus and pydantic, absent there), dpcore and dpcore-transformers into
# /tmp/site, then
#   bash benchmarks/run_device.sh ARGS...   runs bench_grad_samplers.py ARGS (or $BENCH ARGS)
#   bash benchmarks/run_device.sh all DIR   runs the GPU tests, bench_hf.py and
#                                           bench_grad_samplers.py into DIR (one device call)
set -euo pipefail
REPO=$(pwd)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation --no-index --no-compile \
  --target /tmp/site "$REPO" "$REPO/plugins/dpcore-transformers" 2>&1 | grep -v WARNING || true
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -c "import torch, dpcore, opacus; print('torch', torch.__version__, 'opacus', opacus.__version__, torch.cuda.get_device_name())"
if [ "${1:-}" = all ]; then
  out=${2:?usage: run_device.sh all OUTDIR}
  mkdir -p "$out"
  # GPU tests: the CPU suite's CUDA counterparts (skipped on a machine without a GPU)
  python3 -m pytest -q -p no:cacheprovider tests/engine/test_cuda_graphs.py \
    tests/engine/test_gpu.py tests/grad_sample/test_gpu.py tests/correlated/test_bandmf_gpu.py \
    plugins/dpcore-transformers/tests/test_peft.py >"$out/gpu_tests.txt" 2>&1 || true
  tail -1 "$out/gpu_tests.txt"
  cd /tmp
  python3 "$REPO/benchmarks/bench_hf.py" --steps 20 --out "$out/hf" | tail -9
  python3 "$REPO/benchmarks/bench_grad_samplers.py" --mode non-private --mode dpcore-bk \
    --mode opacus-ghost --mode opacus-hooks --mode opacus-ew --steps 30 --out "$out/gs" | tail -3
  exit 0
fi
cd /tmp
python3 "$REPO/benchmarks/${BENCH:-bench_grad_samplers.py}" "$@"
