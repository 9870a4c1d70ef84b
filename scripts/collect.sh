#!/usr/bin/env bash
# Copy the small result files of run_xarch.sh / run_bnvit10.sh / run_continual10.sh into docs/results,
# draw the pictures and write the report. Usage, from the repository root: bash scripts/collect.sh [W [W2]]
# (default runs/res runs/res2)
set -euo pipefail
W=${1:-runs/res}
W2=${2:-runs/res2}
R=docs/results
export OMP_NUM_THREADS=1
mkdir -p $R/train $R/teachers $R/recover $R/continual $R/pictures
# Table columns: convnet3 students of 200 epochs (long/), bn-vit-tiny-small students of 40, resnet18-small of 20.
inputs=()
for d in "$W"/long/train-* "$W2"/long/train-* "$W"/train-*-bn-vit-tiny-small "$W"/train-*-resnet18-small \
         "$W2"/train-*-bn-vit-tiny-small "$W2"/train-*-resnet18-small; do
  [ -f "$d/train_results.json" ] || continue
  name=$(basename "$d"); case "$d" in "$W2"/*) name="${name/bn-vit-tiny-small-/bn-vit-tiny-small-e10-}";; esac
  mkdir -p "$R/train/$name"; cp "$d/train_results.json" "$R/train/$name/"
  inputs+=("$d")
done
# 40-epoch convnet3 students (kept for reference, not in the table)
for d in "$W"/train-*-convnet3 "$W2"/train-*-convnet3; do
  [ -f "$d/train_results.json" ] || continue
  name=$(basename "$d")-e40; case "$d" in "$W2"/*) name="${name/bn-vit-tiny-small-/bn-vit-tiny-small-e10-}";; esac
  mkdir -p "$R/train-40ep/$name"; cp "$d/train_results.json" "$R/train-40ep/$name/"
done
for f in "$W"/*.pt.json; do cp "$f" "$R/teachers/"; done
[ -f "$W2/bn-vit-tiny-small.pt.json" ] && cp "$W2/bn-vit-tiny-small.pt.json" "$R/teachers/bn-vit-tiny-small-e10.pt.json"
for s in "$W"/syn-* "$W2"/syn-*; do
  [ -f "$s/manifest.json" ] || continue
  name=$(basename "$s"); [ "$(dirname "$s")" = "$W2" ] && name="$name-e10"
  cp "$s/manifest.json" "$R/recover/$name.manifest.json"
  SREL_FAST_FASHION_MNIST="$W/fmnist6k-test2k" srel-fast pictures --syn "$s" --classes 0,1,5,8 --out "$R/pictures/$name" > /dev/null
done
cp "$W/continual/continual_results.json" "$W/continual/continual.md" "$W/continual/continual.png" $R/continual/
cat "$W/times.txt" "$W2/times.txt" > $R/times.txt
IFS=,; srel-fast report --inputs "${inputs[*]},$W/continual" --out $R/results.md
