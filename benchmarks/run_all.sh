#!/usr/bin/env bash
# Run every benchmark, writing results under benchmarks/results/ (about 8 minutes on 2 shared CPU cores).
#
#   bash benchmarks/run_all.sh            # PYTHON=/path/to/python to use another interpreter
#
# planner_speed.json, cold_start.json and throughput.json land in benchmarks/results/, and this whole log in
# benchmarks/results/run_all.log. A failing benchmark does not stop the others; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi
export PATH="$(cd "$(dirname "$(command -v "$PY")")" && pwd):$PATH"  # the `peftplan` console script next to it
mkdir -p benchmarks/results
exec > >(tee benchmarks/results/run_all.log) 2>&1
failed=()

step() {
  local name=$1; shift
  echo; echo "== $name: $* =="
  local start=$SECONDS
  # bitsandbytes prints one line per process about an optional CPU kernel package; drop it
  if ! "$@" 2>&1 | grep --line-buffered -v "gemm_4bit_forward"; then
    failed+=("$name")
    echo "!! $name FAILED"
  fi
  echo "($name: $((SECONDS - start)) s)"
}

echo "peftplan benchmarks, $(date -u +%Y-%m-%dT%H:%M:%SZ), $("$PY" --version 2>&1), $(nproc) CPU(s), load average $(cut -d' ' -f1-3 /proc/loadavg)"
step planner_speed "$PY" benchmarks/planner_speed.py --repeat 15
step cold_start    "$PY" benchmarks/cold_start.py --repeat 15
step throughput    "$PY" benchmarks/throughput.py --repeat 5 --steps 24
echo
echo "results: $(ls benchmarks/results/*.json | tr '\n' ' ')"
if ((${#failed[@]})); then echo "failed: ${failed[*]}"; exit 1; fi
