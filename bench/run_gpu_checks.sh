#!/bin/bash
# GPU checks in one go: tests, sanitizers, kernel benchmarks, then (unless SKIP_EXTRA) the layer
# and model benchmarks of gpu_extra.sh. Logs go to $OUT (or /tmp/gpu_out).
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > "$OUT/device.txt" 2>&1
python3 -m pytest -m gpu tests/ --maxfail=25 --timeout=300 -q -p no:cacheprovider ${PYTEST_ARGS:-} > "$OUT/pytest_gpu.log" 2>&1
echo "pytest rc $?" | tee -a "$OUT/summary.txt"
tail -5 "$OUT/pytest_gpu.log" | tee -a "$OUT/summary.txt"
if [ -z "${SKIP_SANITIZER:-}" ]; then
  for tool in memcheck racecheck; do
    timeout 240 compute-sanitizer --tool $tool --error-exitcode 3 python3 bench/sanitize_gpu.py > "$OUT/sanitizer_$tool.log" 2>&1
    echo "sanitizer $tool rc $?" | tee -a "$OUT/summary.txt"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer_$tool.log" | tee -a "$OUT/summary.txt"
  done
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout ${BENCH_TIMEOUT:-450} python3 bench/bench_gpu.py ${BENCH_ARGS:-} > "$OUT/bench_gpu.log" 2>&1
  echo "bench rc $?" | tee -a "$OUT/summary.txt"
  cp bench/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null
fi
if [ -z "${SKIP_KERNEL_TIMING:-}" ]; then
  # The kernels alone, built here for sm_90a (no TensorFlow in the measurement).
  kt=/tmp/kernel_timing
  mkdir -p $kt
  python3 bench/kernel_timing/dump_layouts.py $kt/layouts > /dev/null &&
    bash bench/kernel_timing/build.sh . $kt/kernel_timing > $OUT/kernel_timing_build.log 2>&1 &&
    bash bench/kernel_timing/run.sh $kt/layouts $kt/kernel_timing > $OUT/kernel_timing.txt 2>&1
  echo "kernel timing rc $?" | tee -a "$OUT/summary.txt"
fi
if [ -z "${SKIP_EXTRA:-}" ] && [ -f bench/gpu_extra.sh ]; then
  timeout ${EXTRA_TIMEOUT:-1500} bash bench/gpu_extra.sh > "$OUT/gpu_extra.log" 2>&1
  echo "gpu_extra rc $?" | tee -a "$OUT/summary.txt"
fi
