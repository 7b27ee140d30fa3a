#!/usr/bin/env bash
# Step cost on a lent GPU machine: ViT-B/16 and ViT-L/16 at 224 px, bf16, every job of
# benchmarks/step_cost.py (E2E, meta model, each hybrid, each hybrid with the official semantics,
# data wait). Under 8 minutes on one H100/H200; tables and JSON go to $OUT (default
# benchmarks/results/gpu).
#
#   bash benchmarks/gpu_check.sh                        # uses the machine's torch/timm
#   (device tool) carry [".whl"], command: bash benchmarks/gpu_check.sh
#
# Packages: the machine's python3 must hold a CUDA torch (its image does). Anything else missing
# (or to pin timm to the version tested here) travels as wheels in .whl/ (git-ignored), fetched here
# with: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux2014_x86_64 -d .whl timm==1.0.31
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$PY" - <<'PYEOF'
import sys
missing = []
for name in ("torch", "timm", "yaml", "safetensors", "numpy", "PIL"):
    try:
        __import__(name)
    except ImportError:
        missing.append(name)
if missing:
    sys.exit(f"gpu_check: missing Python packages {missing}; carry their wheels in .whl/ (see this script's header)")
import torch, timm
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device; run this on the lent GPU machine")
print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.cuda.get_device_name()}")
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true

status=0
for preset in vit_b16 vit_l16; do
    # each preset gets a hard limit so the whole check stays under 8 minutes
    timeout 210 "$PY" benchmarks/step_cost.py --preset "$preset" --amp bf16 --steps 20 --warmup 3 \
        --out "$OUT/step_cost_${preset}_bf16" 2>&1 | tee "$OUT/${preset}.log" || status=1
done
cat "$OUT"/step_cost_*_bf16.md > "$OUT/gpu_check.md" 2>/dev/null || true
echo "gpu_check: done in $((SECONDS - START)) s; tables in $OUT/gpu_check.md"
exit $status
