#!/usr/bin/env bash
# The prepared GPU run in one command (docs/benchmarks.md, "GPU run"): install the carried wheels
# (.whl/), run tests/platform/test_gpu.py, measure, and write results.json, records.jsonl, summary.md and
# log.txt to $OUT (default ./bench-gpu-out). Arguments go to bench/gpu/run.py (--dry-run: the CPU
# rehearsal at tiny shapes; --budget SECONDS, default 450).
#
#     bash bench/gpu/run.sh               # on the lent GPU
#     bash bench/gpu/run.sh --dry-run     # here, on a CPU (tests/bench/test_gpu_bench.py)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
out=${OUT:-./bench-gpu-out}
mkdir -p "$out"
python=${PYTHON:-python3}
PYTHONUNBUFFERED=1 "$python" bench/gpu/run.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
