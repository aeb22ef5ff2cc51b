#!/usr/bin/env bash
# The project's GPU check: on a machine with CUDA, install the package (offline), run the whole
# test suite with Triton compiled for real, run the benchmarks, and write a report.
#
#   bash bench/gpu_check.sh OUTDIR        # e.g. "$OUT" on the device machine
#
# Leaves in OUTDIR: report.md (device, versions, test summary, ratio tables), info.txt,
# pip-list.txt, tests.log + tests.xml, bench_<name>.log + bench_<name>.json, install.log
# (+ peers-install.log). When bench/peers/ holds wheels (bash bench/peers.sh download, on a
# machine with network), they are installed --no-deps --no-index before the benchmarks, so
# the peer shoot-out (bench/test_bench_peers.py) runs in the same call.
# Budget (seconds, overridable): TOTAL_BUDGET=460 for the whole script, which cuts each
# step's own budget to what is left: TEST_BUDGET=150 of tests, TRAIN_BUDGET=60 of GPU
# training, then per benchmark file (BENCHES="name:seconds ...", in order) peers 200,
# logprobs 60, reshape 25, importance 25, perturbation 80; a step with under 20 s left is
# skipped and says so. Steps get SIGINT at their limit, so pytest still writes its tables.
# The H200 runs so far: tests about 2 minutes, logprobs 50 s, perturbation 80 s.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
deadline=$((SECONDS + ${TOTAL_BUDGET:-460}))

# limit SECONDS: the step's own budget, cut to what is left before the deadline (10 s kept
# for the report); fails when under 20 s are left.
limit() {
  local left=$((deadline - SECONDS - 10))
  [ "$left" -ge 20 ] || return 1
  echo $(($1 < left ? $1 : left))
}
# run_step SECONDS COMMAND...: COMMAND under that limit; SIGINT first, so pytest still
# prints its summary and writes its files, then SIGKILL 20 s later.
run_step() {
  local secs
  secs=$(limit "$1") || { echo "out of time (TOTAL_BUDGET): skipped ${*:2}"; return 124; }
  shift
  timeout -s INT -k 20 "$secs" "$@"
}

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
run_step "${TEST_BUDGET:-150}" "$py" -m pytest tests -q -rs "${plugins[@]}" \
  --junitxml "$out/tests.xml" 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
unset OMP_NUM_THREADS
# The reference GRPO loop on the GPU: warm start (CPU, cached), then OAR-G steps on CUDA.
run_step "${TRAIN_BUDGET:-60}" "$py" -m oar_kernels train --device cuda --method oar-g \
  --steps 10 --eval-every 5 --out-dir "$out/gpu-train" --no-progress 2>&1 | tee "$out/train.log"
train_rc=${PIPESTATUS[0]}
# The shoot-out's peers, carried as wheels (no network here), never their dependencies;
# installed after the tests, whose TRL adapter tests would otherwise meet a trl without
# accelerate/datasets.
if compgen -G "bench/peers/*.whl" > /dev/null; then
  bash bench/peers.sh install > "$out/peers-install.log" 2>&1 \
    || { echo "peer install failed, see peers-install.log"; tail -5 "$out/peers-install.log"; }
fi
"$py" -m pip list > "$out/pip-list.txt" 2>&1
# One run per benchmark file, each with its own budget and JSON, so a slow one cannot take
# the others' results with it; a hung row (a peer's JIT) fails alone.
bench_rc=0
bench_plugins=()
"$py" -c "import pytest_timeout" 2>/dev/null && bench_plugins+=(--timeout 120)
for spec in ${BENCHES:-peers:200 logprobs:60 reshape:25 importance:25 perturbation:80}; do
  name=${spec%%:*}
  [ "$name" = none ] && continue  # BENCHES=none: tests and training only
  run_step "${spec#*:}" "$py" -m pytest "bench/test_bench_$name.py" --benchmark-only \
    --benchmark-max-time=0.5 "${bench_plugins[@]}" --benchmark-json "$out/bench_$name.json" 2>&1 \
    | tee "$out/bench_$name.log"
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
  grep -iE "^(torch|triton|transformers|trl|liger|cut)[-_a-z]* " "$out/pip-list.txt"
  echo
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$out/tests.log" | tail -40
  echo
  tail -3 "$out/train.log"
  echo
  for log in "$out"/bench_*.log; do [ -f "$log" ] && sed -n '/oar-kernels ratios/,/^$/p' "$log"; done
  # The shoot-out's skipped rows (a peer missing or failing to import) and failures.
  [ -f "$out/bench_peers.log" ] && grep -E "^(FAILED|ERROR|SKIPPED)" "$out/bench_peers.log"
  [ -f "$out/peers-install.log" ] && grep -E "Successfully installed|ERROR" "$out/peers-install.log"
  echo '```'
} > "$out/report.md"
cat "$out/report.md"
[ "$tests_rc" -eq 0 ] && [ "$train_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
