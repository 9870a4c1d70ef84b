#!/usr/bin/env bash
# ConvNet-3 students trained 200 epochs (instead of 40) on every synthetic set: the table's convnet3 column.
# Usage, from the repository root, after run_xarch.sh and run_bnvit10.sh: bash scripts/run_long.sh [W [W2]]
# (default runs/res runs/res2)
set -euo pipefail
W=${1:-runs/res}
W2=${2:-runs/res2}
export OMP_NUM_THREADS=1
S="--batch-size 50 --optimizer adamw --lr 0.01 --weight-decay 0.01 --min-scale 0.5 --width 32 --val fashion-mnist --device cpu --no-progress"
for pair in "$W convnet3" "$W bn-vit-tiny-small" "$W resnet18-small" "$W2 bn-vit-tiny-small"; do
  set -- $pair; D=$1; T=$2
  [ -f "$D/syn-$T/manifest.json" ] || { echo "run_long.sh: $D/syn-$T is not recovered yet; run run_xarch.sh / run_bnvit10.sh first" >&2; exit 1; }
  out="$D/long/train-$T-convnet3"; [ "$T" = convnet3 ] && out="$W/long/train-convnet3-convnet3-e200"
  [ -f "$out/train_results.json" ] && continue
  s=$(date +%s)
  SREL_FAST_FASHION_MNIST="$W/fmnist6k-test2k" srel-fast train --syn "$D/syn-$T" --teacher "$D/$T.pt" --arch convnet3 --epochs 200 $S --out "$out"
  echo "TIME $(( $(date +%s) - s ))s: train $D/syn-$T -> convnet3, 200 epochs" >> "$D/times.txt"
done
