#!/usr/bin/env bash
# Run the grad-sampler benchmark on a lent GPU machine (see benchmarks/README.md):
# installs the carried wheels (.whl: opacus and pydantic, absent there) and dpcore
# itself into /tmp/site, then runs the suite with the given arguments.
set -euo pipefail
REPO=$(pwd)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation --no-index --no-compile \
  --target /tmp/site "$REPO" 2>&1 | grep -v WARNING || true
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
cd /tmp
python3 -c "import torch, dpcore, opacus; print('torch', torch.__version__, 'opacus', opacus.__version__, torch.cuda.get_device_name())"
python3 "$REPO/benchmarks/${BENCH:-bench_grad_samplers.py}" "$@"
