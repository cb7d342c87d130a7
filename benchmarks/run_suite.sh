#!/usr/bin/env bash
# The whole performance suite of benchmarks/RESULTS.md in one go, on the CPU or on a GPU:
#
#     bash benchmarks/run_suite.sh            # CPU (this project's 2-core machine: about 90 minutes, 60 of them
#                                         the deployment forms at 1024x2048)
#     bash benchmarks/run_suite.sh cuda       # GPU: adds the bf16-autocast and torch.compile variants
#
# Everything printed also goes to outputs/benchmarks/suite-<device>-<date>.txt. Each script measures both sides
# of its comparison in the same run and prints medians and ratios; see the script docstrings.
set -euo pipefail
device="${1:-cpu}"
case "$device" in cpu|cuda|cuda:*) ;; *) echo "usage: $0 [cpu|cuda|cuda:N]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p outputs/benchmarks
log="outputs/benchmarks/suite-${device/:/}-$(date +%Y%m%d-%H%M%S).txt"

run() {
    echo "\$ $*" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log"
    echo | tee -a "$log"
}

{ echo "# suite on $device, $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -n)"; "$PY" -c 'import torch; print("torch", torch.__version__, "| cuda:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'; echo; } | tee -a "$log"

if [ "$device" = cpu ]; then
    run "$PY" benchmarks/bench_model.py --repeats 5
    run "$PY" benchmarks/bench_postprocess.py --repeats 5 --threads 2
    run "$PY" benchmarks/bench_pixel_metrics.py
    OMP_NUM_THREADS=1 run "$PY" benchmarks/bench_training.py --steps 5 --repeats 4 --num-workers 2 --unfrozen
    run "$PY" benchmarks/bench_predict.py --quick --profile
    run "$PY" benchmarks/bench_backends.py --threads 2 --repeats 3 --profile
else
    for variant in "" "--autocast bf16" "--compile" "--autocast bf16 --compile"; do
        # shellcheck disable=SC2086
        run "$PY" benchmarks/bench_model.py --device "$device" --repeats 20 --height 1024 --width 2048 $variant
    done
    run "$PY" benchmarks/bench_model.py --device "$device" --repeats 20
    run "$PY" benchmarks/bench_postprocess.py --device "$device" --repeats 5
    run "$PY" benchmarks/bench_predict.py --device "$device" --images 11
    run "$PY" benchmarks/bench_predict.py --device "$device" --images 11 --dtype bfloat16
    gpu="${device#cuda}"; gpu="${gpu#:}"  # accelerate takes the first visible GPU
    CUDA_VISIBLE_DEVICES="${gpu:-${CUDA_VISIBLE_DEVICES:-0}}" run "$PY" benchmarks/bench_training.py --steps 10 --repeats 4 --num-workers 2 --unfrozen
    run "$PY" benchmarks/bench_pixel_metrics.py  # numpy on the CPU, the same on either machine (incl. streaming)
fi
echo "results in $log"
