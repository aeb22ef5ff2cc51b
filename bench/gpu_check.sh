#!/usr/bin/env bash
# The project's GPU check: on a machine with CUDA, install the package (offline), run the whole
# test suite with Triton compiled for real, run the benchmarks, and write a report.
#
#   bash bench/gpu_check.sh OUTDIR        # e.g. "$OUT" on the device machine
#
# Leaves in OUTDIR: report.md (device, versions, test summary, ratio table), info.txt,
# tests.log + tests.xml, bench.log + bench.json, install.log. Fits in 10 minutes.
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

timeout 300 "$py" -m pytest tests -q -rs --junitxml "$out/tests.xml" 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 240 "$py" -m pytest bench --benchmark-only --benchmark-json "$out/bench.json" 2>&1 \
  | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}

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
  sed -n '/oar-kernels ratios/,/^$/p' "$out/bench.log"
  echo '```'
} > "$out/report.md"
cat "$out/report.md"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
