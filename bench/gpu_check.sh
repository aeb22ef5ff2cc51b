#!/usr/bin/env bash
# The project's GPU check: on a machine with CUDA, install the package (offline), run the whole
# test suite with Triton compiled for real, run the benchmarks, and write a report.
#
#   bash bench/gpu_check.sh OUTDIR        # e.g. "$OUT" on the device machine
#
# Leaves in OUTDIR: report.md (device, versions, test summary, ratio tables), info.txt,
# tests.log + tests.xml, bench_<name>.log + bench_<name>.json, install.log. Budget (seconds,
# overridable): TEST_BUDGET=150 of tests, then per benchmark file reshape 40, logprobs 150,
# importance 50, perturbation 150; the first H200 run took about 4 minutes.
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
"$py" -c "import xdist" 2>/dev/null && plugins+=(-n 6)
"$py" -c "import pytest_timeout" 2>/dev/null && plugins+=(--timeout 90)
timeout "${TEST_BUDGET:-150}" "$py" -m pytest tests -q -rs "${plugins[@]}" \
  --junitxml "$out/tests.xml" 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
# One run per benchmark file, each with its own budget and JSON, so a slow one cannot take
# the others' results with it.
bench_rc=0
for spec in reshape:40 logprobs:150 importance:50 perturbation:150; do
  name=${spec%%:*}
  timeout "${spec#*:}" "$py" -m pytest "bench/test_bench_$name.py" --benchmark-only --benchmark-max-time=0.5 \
    --benchmark-json "$out/bench_$name.json" 2>&1 | tee "$out/bench_$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || bench_rc=$rc
done
cat "$out"/bench_*.log > "$out/bench.log"

{
  echo "# oar-kernels GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- device: $("$py" -c 'import torch; print(torch.cuda.get_device_name())')"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- tests exit code: $tests_rc; benchmarks exit code: $bench_rc"
  echo
  echo '```'
  cat "$out/info.txt"
  echo
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$out/tests.log" | tail -40
  echo
  for log in "$out"/bench_*.log; do sed -n '/oar-kernels ratios/,/^$/p' "$log"; done
  echo '```'
} > "$out/report.md"
cat "$out/report.md"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
