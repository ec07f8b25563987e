#!/usr/bin/env bash
# Device check: the gpu-marked tests, the per-layer overhead table (bench/overhead.py), the
# standard layout against channels-last (bench/layout.py), the autocast steps of ResNet-18
# (bfloat16; ghlc's H in float32 and in bfloat16), then the step benchmark (its table is
# printed last).
#   bench/gpu_check.sh                      # on a CUDA machine
#   bench/gpu_check.sh --device cpu --repeats 1 --warmup 0 --batch 8 --resnet50-batch 2
# Arguments go to bench/step.py after the defaults, so they override them (on a machine
# without CUDA the gpu-marked tests skip themselves). If ghlc is not importable it is
# installed from this checkout first (editable, no dependencies, no network).
# With OUT set, logs and the JSON results are also written there. With TESTS=0 the gpu tests
# are skipped (a rerun of the benchmarks alone). Each part first prints the seconds since
# the script began (to budget a time-limited machine); the step table still comes last.
# With ACCURACY=1 it first trains FastHebb for 10 epochs three ways (GHL in float32; under
# bfloat16 autocast with H in float32; with H in bfloat16) and prints their test accuracy:
# the accuracy cost of the mixed-precision modes (docs/ACCURACY.md). It reads
# cifar10-subset.npz from DATA_DIR (default ../shared/data) and needs about a minute or two.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
part() { echo "== gpu_check ${SECONDS}s: $*"; }

if ! "$PY" -c "import ghlc" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

rc=5
if [ "${TESTS:-1}" != 0 ]; then
    part "gpu tests"
    "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
        tests/test_errors_runtime.py tests/test_cli.py tests/test_autocast.py
    rc=$?
fi
if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then  # 5: no test carries the gpu mark
    echo "gpu tests failed (exit $rc)" >&2
fi

if [ "${ACCURACY:-0}" = 1 ]; then
    part "accuracy runs"
    acc_dev=cuda
    for a in "$@"; do [ "$a" = "cpu" ] && acc_dev=cpu; done
    "$PY" bench/accuracy.py --nets fasthebb --methods ghl --seeds 0 --epochs 10 --lr 1e-2 \
        --augment --ablations amp-bf16,amp-bf16-low --device "$acc_dev" --no-report \
        --no-progress --data-dir "${DATA_DIR:-../shared/data}" || echo "accuracy runs failed" >&2
    if [ -n "${OUT:-}" ]; then
        for d in bench/runs/fasthebb-ghl-s0 bench/runs/fasthebb-ghl-amp-bf16*-s0; do
            [ -f "$d/metrics.jsonl" ] && cp "$d/metrics.jsonl" "$OUT/$(basename "$d").jsonl"
        done
    fi
fi

json=bench/step_cuda.json
dev=cuda
args=(--device cuda --repeats 20 --resnet50 "$@")
for a in "$@"; do [ "$a" = "cpu" ] && json=bench/step_cpu_check.json && dev=cpu; done
part "host cost per plastic layer"
"$PY" bench/overhead.py --device "$dev" --steps 100
lay_json=${json%.json}_layout.json  # the standard layout against channels-last (eager steps)
part "layouts"
if [ "$dev" = cpu ]; then
    "$PY" bench/layout.py --models fasthebb --repeats 1 --warmup 0 --batch 8 --json "$lay_json"
else
    "$PY" bench/layout.py --device cuda --models deephebb,fasthebb,resnet18 --repeats 20 \
        --json "$lay_json"
fi
lrc=$?
amp=ghlc_amp_graph,ghlc_amp_low_graph
[ "$dev" = cpu ] && amp=ghlc_amp,ghlc_amp_low
amp_json=${json%.json}_amp.json
part "autocast steps"
"$PY" bench/step.py --device cuda --repeats 10 --models resnet18 "$@" --variants "$amp" \
    --no-prepare-bench --json "$amp_json"
arc=$?
part "step table"
"$PY" bench/step.py "${args[@]}" --json "$json"
brc=$?
[ $brc -eq 0 ] && brc=$arc
[ $brc -eq 0 ] && brc=$lrc
if [ -n "${OUT:-}" ]; then
    for f in "$json" "$amp_json" "$lay_json"; do [ -f "$f" ] && cp "$f" "$OUT/"; done
fi
exit $(( rc != 0 && rc != 5 ? rc : brc ))
