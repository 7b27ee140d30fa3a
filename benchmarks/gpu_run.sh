#!/usr/bin/env bash
# What the CPU cannot measure, on one lent GPU (one H200), in at most 9 minutes; at most 8 files in
# OUTDIR, written part by part (benchmarks/gpu_run.py says what each part does and its time).
#
#   bash benchmarks/gpu_run.sh OUTDIR            # the GPU run (docs/performance.md: set-up, carry, command)
#   bash benchmarks/gpu_run.sh --smoke OUTDIR    # the same script end to end on a CPU at tiny sizes
#
# It runs the project from this source tree with the machine's own python3 (PYTHON=... for
# another) and installs nothing: part 0 lists the versions it finds and says what is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_run.sh [--smoke] OUTDIR" >&2
    exit 2
fi
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the driver keeps its own 9-minute budget; this is the backstop if the driver itself hangs
exec timeout --kill-after=5 "${GPU_RUN_HARD_LIMIT_S:-570}" "$PY" -m benchmarks.gpu_run --python "$PY" "$@"
