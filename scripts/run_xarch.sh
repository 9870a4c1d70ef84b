#!/usr/bin/env bash
# Cross-architecture + continual runs on Fashion-MNIST, CPU-sized (docs/results/README.md).
# Usage, from the repository root: bash scripts/run_xarch.sh [WORKDIR [A|B|all]]   (default runs/res all)
# A: ConvNet-3 teacher, its students and the continual run; B: BN-ViT and ResNet-18 teachers.
# Both chains were run side by side, one thread each (OMP_NUM_THREADS=1).
set -euo pipefail
W=${1:-runs/res}
CHAIN=${2:-all}
export OMP_NUM_THREADS=1
mkdir -p "$W"
# Squeeze data: 6,000 train images (600/class), full 10k test split.
[ -d "$W/fmnist6k" ] || python scripts/make_subset.py "$W/fmnist6k" 600 0
# Student / continual data: the same 6,000 train images, 2,000 test images (200/class).
[ -d "$W/fmnist6k-test2k" ] || python scripts/make_subset.py "$W/fmnist6k-test2k" 600 0 200
C="--device cpu --no-progress"
t() { local s=$(date +%s); "$@"; echo "TIME $(( $(date +%s) - s ))s: $*" >> "$W/times.txt"; }
sq() { SREL_FAST_FASHION_MNIST="$W/$1" t srel-fast squeeze --data fashion-mnist "${@:2}" $C; }
ev() { SREL_FAST_FASHION_MNIST="$W/fmnist6k-test2k" t srel-fast "$@" $C; }
S="--batch-size 50 --optimizer adamw --lr 0.01 --weight-decay 0.01 --min-scale 0.5 --width 32 --val fashion-mnist"
student() {  # teacher student epochs
  [ -f "$W/train-$1-$2/train_results.json" ] || ev train --syn "$W/syn-$1" --teacher "$W/$1.pt" --arch $2 --epochs $3 $S --out "$W/train-$1-$2"
}
rec() { [ -f "$W/syn-$1/manifest.json" ] || t srel-fast recover --weights "$W/$1.pt" --ipc 10 --iterations $2 --min-scale 0.5 --backend auto --out "$W/syn-$1" $C; }

if [ "$CHAIN" = A ] || [ "$CHAIN" = all ]; then
  # ConvNet-3 (width 32) teacher
  [ -f "$W/convnet3.pt" ] || sq fmnist6k --arch convnet3 --width 32 --epochs 5 --batch-size 128 --lr 0.05 --min-scale 0.5 --out "$W/convnet3.pt"
  rec convnet3 300
  # Continual learning (5 steps of 2 classes): ConvNet-3 synthetic memory vs random real memory, IPC 10
  [ -f "$W/continual/continual.md" ] || ev continual --syn "$W/syn-convnet3" --teacher "$W/convnet3.pt" --steps 5 --ipc 10 --arch convnet3 --width 32 --epochs 50 --out "$W/continual"
  student convnet3 convnet3 40
  student convnet3 bn-vit-tiny-small 40
  student convnet3 resnet18-small 20
fi
if [ "$CHAIN" = B ] || [ "$CHAIN" = all ]; then
  # BN-ViT-Tiny-small teacher
  [ -f "$W/bn-vit-tiny-small.pt" ] || sq fmnist6k --arch bn-vit-tiny-small --epochs 3 --batch-size 128 --optimizer adamw --lr 2e-3 --weight-decay 0.05 --min-scale 0.5 --out "$W/bn-vit-tiny-small.pt"
  rec bn-vit-tiny-small 100
  student bn-vit-tiny-small convnet3 40
  student bn-vit-tiny-small bn-vit-tiny-small 40
  # ResNet-18-small teacher (1 epoch; tested on the 2k test subset)
  [ -f "$W/resnet18-small.pt" ] || sq fmnist6k-test2k --arch resnet18-small --epochs 1 --batch-size 128 --lr 0.05 --min-scale 0.5 --out "$W/resnet18-small.pt"
  rec resnet18-small 60
  student resnet18-small convnet3 40
  student resnet18-small bn-vit-tiny-small 40
  student bn-vit-tiny-small resnet18-small 20
  student resnet18-small resnet18-small 20
fi
