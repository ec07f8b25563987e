#!/usr/bin/env bash
# Device check: the gpu-marked tests, the per-layer overhead table (bench/overhead.py), the
# autocast steps of ResNet-18 (bfloat16; ghlc's H in float32 and in bfloat16), then the step
# benchmark (its table is printed last).
#   bench/gpu_check.sh                      # on a CUDA machine
#   bench/gpu_check.sh --device cpu --repeats 1 --warmup 0 --batch 8 --resnet50-batch 2
# Arguments go to bench/step.py after the defaults, so they override them (on a machine
# without CUDA the gpu-marked tests skip themselves). If ghlc is not importable it is
# installed from this checkout first (editable, no dependencies, no network).
# With OUT set, logs and the JSON results are also written there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import ghlc" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_errors_runtime.py \
    tests/test_cli.py tests/test_autocast.py
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then  # 5: no test carries the gpu mark
    echo "gpu tests failed (exit $rc)" >&2
fi

json=bench/step_cuda.json
dev=cuda
args=(--device cuda --repeats 20 --resnet50 "$@")
for a in "$@"; do [ "$a" = "cpu" ] && json=bench/step_cpu_check.json && dev=cpu; done
"$PY" bench/overhead.py --device "$dev" --steps 100  # per-plastic-layer host cost
amp=ghlc_amp_graph,ghlc_amp_low_graph
[ "$dev" = cpu ] && amp=ghlc_amp,ghlc_amp_low
amp_json=${json%.json}_amp.json
"$PY" bench/step.py --device cuda --repeats 10 --models resnet18 "$@" --variants "$amp" \
    --no-prepare-bench --json "$amp_json"
arc=$?
"$PY" bench/step.py "${args[@]}" --json "$json"
brc=$?
[ $brc -eq 0 ] && brc=$arc
if [ -n "${OUT:-}" ]; then
    for f in "$json" "$amp_json"; do [ -f "$f" ] && cp "$f" "$OUT/"; done
fi
exit $(( rc != 0 && rc != 5 ? rc : brc ))
