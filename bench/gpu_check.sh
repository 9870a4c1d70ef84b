#!/usr/bin/env bash
# One short GPU call that proves the kernels and measures recovery speed.
#
#   bash bench/gpu_check.sh [--budget SECONDS] [--steps LIST]   # on a CUDA machine (H100/H200)
#   bash bench/gpu_check.sh --dry-run                             # the same steps, tiny sizes, CPU (CI)
#
# Steps, in order of importance (LIST: comma-separated names, default all):
#   install   pip install -e . without the extension (pure Python, cannot fail on a compiler),
#             then build the C++/CUDA extension for sm_90 through the JIT loader
#             (TORCH_CUDA_ARCH_LIST=9.0, ninja, cached): a build error is printed in full
#   env       versions, the GPU, which backend of each op loaded (and why not)
#   kernels   srel_fast/bench/kernel_check.py: float64 checks at ResNet-50 shapes (both layouts, fp32/bf16,
#             one > 2^31-element tensor), then each kernel's time against a copy of the same bytes
#   tests     the GPU tests (pytest -m gpu)
#   convnet   bench recover-step convnet4-64 (srel-fast vs DM and MTT at IPC 1 and IPC 10), srel-fast profiled
#   cli       a short `srel-fast recover --arch resnet18 ...` on the fast path, images per second
#   r18       bench recover-step resnet18-224 (reference, reference-compiled, srel-fast, ablations,
#             floor), with a torch.profiler table of srel-fast
#   r50       bench recover-step resnet50-224
# (r18 and r50 last: two earlier H200 runs measured them; the checks and the never-run steps first.)
#
# Every step runs under its own timeout, cut to what is left of --budget (default 480 s), and
# writes into a work folder that is packed into $OUT/results.tgz after each step, with
# $OUT/summary.txt: a run cut off still leaves what finished. $OUT defaults to
# bench/results/gpu_check_<date> (a temporary folder with --dry-run).
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=0
BUDGET=480
STEPS=install,env,kernels,tests,convnet,cli,r18,r50
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET="$2"; shift ;;
    --steps) STEPS="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ "$DRY" = 1 ]; then
  OUT="${OUT:-$(mktemp -d)}"
  export TRITON_INTERPRET=1 SREL_FAST_DEVICE_ARGS="--device cpu"
else
  OUT="${OUT:-bench/results/gpu_check_$(date +%Y%m%d_%H%M%S)}"
  export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-16}"
fi
mkdir -p "$OUT"
WORK="$(mktemp -d)/gpu_check"
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 SREL_FAST_VERBOSE_BUILD=0
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
pack() { tar -czf "$OUT/results.tgz.tmp" -C "$(dirname "$WORK")" gpu_check 2>/dev/null && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"; }
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# run NAME LIMIT CMD...: the step under min(LIMIT, budget left - 10 s), output in $WORK/NAME.log
run() {
  local name="$1" limit="$2"; shift 2
  want "$name" || return 0
  local left=$(( BUDGET - ($(date +%s) - START) - 10 ))
  if [ "$left" -lt 15 ]; then note "[$name] skipped: budget spent"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  echo "=== [$name] (limit ${limit}s) $*" >&2
  # (shell functions run through `bash -c`: timeout runs programs, not functions)
  if [ "$(type -t "$1")" = function ]; then set -- bash -c "$*"; fi
  timeout --kill-after=5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then note "[$name] ok in ${dt}s"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note "[$name] TIMED OUT after ${dt}s (limit ${limit}s)"
  else note "[$name] FAILED (exit $rc) in ${dt}s"; fi
  tail -n 25 "$WORK/$name.log" >&2
  pack
  return 0
}

PY=python3
command -v "$PY" >/dev/null || PY=python
# Provider lists can be replaced from the environment (R18=..., CONV=..., R50=...) for a rerun.
if [ "$DRY" = 1 ]; then
  # tiny and uncompiled: the dry run tests the plumbing, not inductor on 2 CPU cores
  SMALL="--small --device cpu --warmup 1 --repeats 1 --image-size 16 --batch 2"
  R18="${R18:-reference,srel-fast-no-compile,floor-eager}"
  CONV="${CONV:-reference,srel-fast-no-compile,dm-ipc1,mtt-ipc1}"
  R50="${R50:-reference,srel-fast-no-compile}"
  PROFILE=srel-fast-no-compile
  CLI_ARGS="--arch convnet3 --num-classes 4 --image-size 16 --ipc 1 --iterations 3 --batch-size 4 --device cpu"
else
  SMALL="--warmup 3 --repeats 10"
  R18="${R18:-reference,reference-compiled,srel-fast,srel-fast-custom-ops,srel-fast-hooks,floor}"
  CONV="${CONV:-reference,srel-fast,dm-ipc1,mtt-ipc1,dm,mtt}"
  R50="${R50:-reference,srel-fast,floor}"
  PROFILE="${PROFILE:-srel-fast}"
  CLI_ARGS="--arch resnet18 --num-classes 200 --ipc 1 --iterations 200 --batch-size 100 --amp bf16 --channels-last --compile --cuda-graphs"
fi
export PY DRY WORK CLI_ARGS

install_step() {
  if [ "$DRY" = 1 ]; then
    "$PY" -c "import srel_fast, srel_fast.kernels; print('srel_fast importable')"
  else
    # Pure Python first: a compiler error must not leave the package uninstalled.
    SREL_FAST_BUILD_EXT=0 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . || return 1
  fi
  # The extension through the JIT loader (cached for the later steps); raises the build log.
  "$PY" - <<'EOF'
import time
t = time.time()
from srel_fast.kernels import _ext
ok = _ext.ensure_loaded()
print(f"extension loaded: {ok}, CUDA kernels: {_ext._state['cuda']}, {time.time() - t:.0f} s")
print("error:", _ext.load_error())
_ext.require_cuda_extension()
EOF
}

env_step() {
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import json, os, torch
from srel_fast.kernels import _ext
from srel_fast.kernels._backend import resolve_backend, triton_available
from srel_fast.bench.environment import device_environment
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
env = device_environment(dev)
env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
env["backends"] = {op: {b: _ext.has_op(op, b) for b in ("cpu", "cuda")} | {"triton": triton_available(),
                   "auto": resolve_backend("auto", dev, op)} for op in ("bn_stat_loss", "multicrop_resize")}
env["cuda_error"] = _ext.cuda_error()
if dev.type == "cuda":
    p = torch.cuda.get_device_properties(dev)
    env["gpu"] = {"name": p.name, "sms": p.multi_processor_count, "memory_gb": p.total_memory / 2**30,
                  "capability": f"{p.major}.{p.minor}"}
print(json.dumps(env, indent=1, default=str))
EOF
}

cli_step() {
  rm -rf "$WORK/cli_out"
  "$PY" -m srel_fast.cli recover $CLI_ARGS --weights random --backend auto --out "$WORK/cli_out" --no-progress || return 1
  # The manifest alone travels back: the images (30 MB at 224 px) would push results.tgz over the
  # device tool's 16 MiB per file, and then nothing of the run comes back (seen in H200 run 3).
  cp "$WORK/cli_out/manifest.json" "$WORK/cli_manifest.json" && rm -rf "$WORK/cli_out"
  "$PY" - "$WORK/cli_manifest.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
ms = m["ms_per_image_iteration"]
print(f"CLI recovery: {m['completed_batches']} batches, {ms:.4g} ms per image-iteration, "
      f"{1000 / ms:.4g} image-iterations/s; wall {m['seconds_total']:.1f} s (compile included)")
# the first batch carries the compilation; the later ones are the warm rate a long run sees
warm = m["batches"][1:]
if warm:
    work = sum(len(b["classes"]) for b in warm) * m["config"]["iterations"]
    ms_warm = 1000 * sum(b["seconds"] for b in warm) / work
    print(f"CLI recovery, batches after the first: {ms_warm:.4g} ms per image-iteration, "
          f"{1000 / ms_warm:.4g} image-iterations/s")
EOF
}

export -f install_step env_step cli_step
note "gpu_check: dry_run=$DRY budget=${BUDGET}s steps=$STEPS out=$OUT $(date -u +%FT%TZ)"
run install 300 install_step
if ! "$PY" -c "import srel_fast.kernels" 2>/dev/null; then
  # pip could not install the package: import it from the tree (the installed layout)
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  note "[install] package imported from $PWD (pip install failed)"
fi
run env 60 env_step
run kernels 180 "$PY" -m srel_fast.bench.kernel_check --out "$WORK/kernels" $([ "$DRY" = 1 ] && echo --dry-run)
run tests 180 "$PY" -m pytest -q -p no:cacheprovider -o addopts= -m gpu tests
run convnet 180 "$PY" -m srel_fast.cli bench recover-step --config convnet4-64 $SMALL --providers "$CONV" --profile "$PROFILE" --out-dir "$WORK/bench"
run cli 150 cli_step
run r18 240 "$PY" -m srel_fast.cli bench recover-step --config resnet18-224 $SMALL --providers "$R18" --profile "$PROFILE" --out-dir "$WORK/bench"
run r50 180 "$PY" -m srel_fast.cli bench recover-step --config resnet50-224 $SMALL --providers "$R50" --profile "$PROFILE" --out-dir "$WORK/bench"
note "gpu_check: done in $(( $(date +%s) - START ))s"
pack
# the tables, last, so they end up in the caller's output tail
for f in "$WORK"/kernels/*.json; do [ -f "$f" ] && grep -h '"ok": false' "$f" | head -5; done
grep -h "kernel check:" "$WORK/kernels.log" 2>/dev/null | cut -c1-600
[ -f "$WORK/kernels/kernel_time.json" ] && "$PY" - "$WORK/kernels/kernel_time.json" <<'EOF'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    if "ms" in r or r["op"] == "copy":
        print(f"{r['op']:24s} {r['backend']:6s} {str(r.get('shape', '')):20s} {r.get('layout', ''):13s} "
              f"{r.get('ms', 0):8.4f} ms {r['GBps']:7.1f} GB/s {100 * r['fraction']:5.1f}%")
EOF
for f in "$WORK"/bench/*.md; do [ -f "$f" ] && echo "## $(basename "$f")" && sed -n '/^| provider/,/^$/p' "$f" | cut -c1-220 && grep -h "^Profile of" "$f" | cut -c1-300; done
grep -h "CLI recovery" "$WORK/cli.log" 2>/dev/null
cat "$SUMMARY"
if grep -q "FAILED\|TIMED OUT" "$SUMMARY"; then exit 1; fi
exit 0
