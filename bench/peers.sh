#!/usr/bin/env bash
# The peers of the shoot-out (bench/test_bench_peers.py) as wheels, for a machine without
# network (the GPU machine: bench/gpu_check.sh installs them when bench/peers/ exists).
#
#   bash bench/peers.sh download [DIR]   # with network: the wheels into DIR (bench/peers/)
#   bash bench/peers.sh install [DIR]    # offline: pip install --no-deps --no-index DIR/*.whl
#   bash bench/peers.sh pins [DIR]       # each wheel's Requires-Dist (download prints them too)
#
# Always --no-deps: pip must never replace the machine's torch or triton. The peers' import
# graphs need nothing beyond torch, triton and transformers (checked with trl 1.16.0,
# liger-kernel 0.8.5, cut-cross-entropy 25.1.1): `import trl.kernels` loads transformers and
# none of trl's other requirements; liger_kernel and cut_cross_entropy load torch's and
# triton's own dependencies only. So three wheels, about 2 MB.
set -euo pipefail
cmd=${1:?usage: bash bench/peers.sh download|install|pins [DIR]}
dir=${2:-$(dirname "$0")/peers}
py=${PYTHON:-python3}

wheels() {
  shopt -s nullglob
  local found=("$dir"/*.whl)
  [ ${#found[@]} -gt 0 ] || { echo "no wheels in $dir (bash bench/peers.sh download)" >&2; exit 1; }
  printf '%s\n' "${found[@]}"
}

pins() {
  wheels | while read -r wheel; do
    echo "$(basename "$wheel")"
    "$py" - "$wheel" <<'EOF'
import sys, zipfile

with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    for line in wheel.read(meta).decode().splitlines():
        # The requirements an install without extras would pull (extras are opt-in).
        if line.startswith(("Requires-Dist:", "Requires-Python:")) and "extra ==" not in line:
            print("   ", line)
EOF
  done
}

case $cmd in
  download)
    mkdir -p "$dir"
    # TRL matches the installed one (the adapter's range otherwise, as pyproject's oar extra).
    trl=$("$py" -c "import importlib.metadata as m; print('trl==' + m.version('trl'))" \
      2>/dev/null || echo "trl>=1.16,<1.17")
    "$py" -m pip download --no-deps --only-binary :all: -d "$dir" \
      "$trl" liger-kernel cut-cross-entropy
    du -sh "$dir"
    pins
    ;;
  install)
    wheels | xargs -d "\n" "$py" -m pip install --no-deps --no-index
    pins
    ;;
  pins) pins ;;
  *) echo "usage: bash bench/peers.sh download|install|pins [DIR]" >&2; exit 2 ;;
esac
