#!/usr/bin/env bash
# The house rule's check: SHA-256 of every stage's weights from three fixed-seed runs (the ViT quick
# start, the LM quick start, a CIFAR ResNet-14 on digits), each at 1-2 epochs a stage.
# usage: benchmarks/stage_hashes.sh OUT [PYTHON]   (run from the tree to check; diff two OUTs' hashes.txt)
set -euo pipefail
OUT=$(realpath -m "$1"); PY=${2:-.venv/bin/python}
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
rm -rf "$OUT"; mkdir -p "$OUT"
short="--set incubate.epochs=1 --set finetune.epochs=1 --set e2e.epochs=1 --set train.tensorboard=false"
$PY -m incubate.cli run --recipe recipes/quickstart.yaml --out "$OUT/vit" --set meta.epochs=2 $short > "$OUT/vit.log" 2>&1
$PY -m incubate.cli run --recipe recipes/quickstart_lm.yaml --out "$OUT/lm" --set meta.epochs=1 --set e2e.epochs=1 \
    --set train.tensorboard=false > "$OUT/lm.log" 2>&1
$PY -m incubate.cli run --recipe recipes/quickstart.yaml --out "$OUT/resnet" --set model.family=resnet \
    --set model.name=cifar_resnet14 --set 'model.kwargs={}' --set 'model.division=[2,2,2]' \
    --set incubate.module_init=random --set meta.epochs=1 $short > "$OUT/resnet.log" 2>&1
(cd "$OUT" && find . -name model.safetensors | sort | xargs sha256sum) | tee "$OUT/hashes.txt"
