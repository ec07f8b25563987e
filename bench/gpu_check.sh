#!/usr/bin/env bash
# Device check: the gpu-marked tests, then the step benchmark (its table is printed last).
#   bench/gpu_check.sh                      # on a CUDA machine
#   bench/gpu_check.sh --device cpu --repeats 1 --warmup 0 --batch 8 --resnet50-batch 2
# Arguments go to bench/step.py after the defaults, so they override them (on a machine
# without CUDA the gpu-marked tests skip themselves).
set -uo pipefail
cd "$(dirname "$0")/.."

python -m pytest -q -m gpu -p no:cacheprovider
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then  # 5: no test carries the gpu mark
    echo "gpu tests failed (exit $rc)" >&2
    exit $rc
fi

exec python bench/step.py --device cuda --repeats 20 --resnet50 "$@"
