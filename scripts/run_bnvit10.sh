#!/usr/bin/env bash
# A longer-trained BN-ViT teacher (10 squeeze epochs instead of 3), same recovery and students.
# Usage, from the repository root: bash scripts/run_bnvit10.sh [WORKDIR2 [WORKDIR]]   (default runs/res2 runs/res;
# WORKDIR holds the data subsets of run_xarch.sh)
set -euo pipefail
W=${1:-runs/res2}
D=${2:-runs/res}
export OMP_NUM_THREADS=1
mkdir -p "$W"
C="--device cpu --no-progress"
t() { local s=$(date +%s); "$@"; echo "TIME $(( $(date +%s) - s ))s: $*" >> "$W/times.txt"; }
ev() { SREL_FAST_FASHION_MNIST="$D/fmnist6k-test2k" t srel-fast "$@" $C; }
S="--batch-size 50 --optimizer adamw --lr 0.01 --weight-decay 0.01 --min-scale 0.5 --width 32 --val fashion-mnist"
student() { [ -f "$W/train-$1-$2/train_results.json" ] || ev train --syn "$W/syn-$1" --teacher "$W/$1.pt" --arch $2 --epochs $3 $S --out "$W/train-$1-$2"; }
[ -f "$W/bn-vit-tiny-small.pt" ] || SREL_FAST_FASHION_MNIST="$D/fmnist6k" t srel-fast squeeze --data fashion-mnist --arch bn-vit-tiny-small --epochs 10 --batch-size 128 --optimizer adamw --lr 2e-3 --weight-decay 0.05 --min-scale 0.5 --out "$W/bn-vit-tiny-small.pt" $C
[ -f "$W/syn-bn-vit-tiny-small/manifest.json" ] || t srel-fast recover --weights "$W/bn-vit-tiny-small.pt" --ipc 10 --iterations 100 --min-scale 0.5 --backend auto --out "$W/syn-bn-vit-tiny-small" $C
student bn-vit-tiny-small convnet3 40
student bn-vit-tiny-small resnet18-small 20
student bn-vit-tiny-small bn-vit-tiny-small 40
