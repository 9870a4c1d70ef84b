#!/usr/bin/env bash
# Adds the 10-step split (1 class per step) to the continual run of run_xarch.sh (the 5-step results are kept).
# Usage, from the repository root: bash scripts/run_continual10.sh [WORKDIR]   (default runs/res)
set -euo pipefail
W=${1:-runs/res}
export OMP_NUM_THREADS=1
s=$(date +%s)
SREL_FAST_FASHION_MNIST="$W/fmnist6k-test2k" srel-fast continual --syn "$W/syn-convnet3" --teacher "$W/convnet3.pt" --steps 5,10 --ipc 10 --arch convnet3 --width 32 --epochs 50 --out "$W/continual" --device cpu --no-progress
echo "TIME $(( $(date +%s) - s ))s: continual --steps 5,10" >> "$W/times.txt"
