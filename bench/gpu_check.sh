#!/usr/bin/env bash
# The project's GPU check: on a machine with CUDA, install the package (offline), run the whole
# test suite with Triton compiled for real, run the benchmarks, and write a report.
#
#   bash bench/gpu_check.sh OUTDIR        # e.g. "$OUT" on the device machine
#
# Leaves in OUTDIR: report.md (device, versions, test summary, ratio tables), info.txt,
# tests.log + tests.xml, bench_<name>.log + bench_<name>.json, install.log. Budget (seconds,
# overridable): TEST_BUDGET=200 of tests, TRAIN_BUDGET=150 of GPU training, then per benchmark
# file (BENCHES="name:seconds ...") reshape 40, logprobs 150, importance 50, perturbation 150.
# The first H200 run (tests, benchmarks, no training) took about 4 minutes.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
# --no-deps: the device machine has torch/triton/pytest and no network.
"$py" -m pip install --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 \
  || { echo "install failed, see install.log"; tail -20 "$out/install.log"; exit 1; }
"$py" -m oar_kernels info | tee "$out/info.txt"

# Parallel workers mostly overlap Triton's JIT compiles; a per-test limit keeps one hang from
# taking the rest of the budget.
plugins=()
# Files stay whole on one worker (--dist loadfile): a file's warm-start cache is then built
# once; two threads per worker keep six workers from oversubscribing the CPU.
"$py" -c "import xdist" 2>/dev/null && plugins+=(-n 6 --dist loadfile) && export OMP_NUM_THREADS=2
"$py" -c "import pytest_timeout" 2>/dev/null && plugins+=(--timeout 150)
timeout "${TEST_BUDGET:-200}" "$py" -m pytest tests -q -rs "${plugins[@]}" \
  --junitxml "$out/tests.xml" 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
unset OMP_NUM_THREADS
# The reference GRPO loop on the GPU: warm start (CPU, cached), then OAR-G steps on CUDA.
timeout "${TRAIN_BUDGET:-150}" "$py" -m oar_kernels train --device cuda --method oar-g \
  --steps 10 --eval-every 5 --out-dir "$out/gpu-train" --no-progress 2>&1 | tee "$out/train.log"
train_rc=${PIPESTATUS[0]}
# One run per benchmark file, each with its own budget and JSON, so a slow one cannot take
# the others' results with it.
bench_rc=0
for spec in ${BENCHES:-reshape:40 logprobs:150 importance:50 perturbation:150}; do
  name=${spec%%:*}
  [ "$name" = none ] && continue  # BENCHES=none: tests and training only
  timeout "${spec#*:}" "$py" -m pytest "bench/test_bench_$name.py" --benchmark-only --benchmark-max-time=0.5 \
    --benchmark-json "$out/bench_$name.json" 2>&1 | tee "$out/bench_$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || bench_rc=$rc
done
cat "$out"/bench_*.log > "$out/bench.log" 2>/dev/null

{
  echo "# oar-kernels GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- device: $("$py" -c 'import torch; print(torch.cuda.get_device_name())')"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- tests exit code: $tests_rc; GPU training run exit code: $train_rc; benchmarks exit code: $bench_rc"
  echo
  echo '```'
  cat "$out/info.txt"
  echo
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$out/tests.log" | tail -40
  echo
  tail -3 "$out/train.log"
  echo
  for log in "$out"/bench_*.log; do [ -f "$log" ] && sed -n '/oar-kernels ratios/,/^$/p' "$log"; done
  echo '```'
} > "$out/report.md"
cat "$out/report.md"
[ "$tests_rc" -eq 0 ] && [ "$train_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
