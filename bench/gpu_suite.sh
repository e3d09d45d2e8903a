#!/usr/bin/env bash
# The GPU suite: everything worth measuring when a GPU is lent, in one run with a hard timeout.
#
#   bench/gpu_suite.sh [--out DIR] [--wheels DIR] [--budget SECONDS]   # on the GPU machine
#   bench/gpu_suite.sh --tiny [--out DIR]                                # CPU smoke run (CI)
#   bench/gpu_suite.sh --fetch-wheels DIR                                # here: what it lacks
#
# The lent GPU machine is offline. It has Python 3.12 with jax + the CUDA plugin, flax, optax,
# torch, transformers, safetensors, tokenizers, sentencepiece (the device notes' package list);
# llm_jax needs two more: ml-collections and zstandard. `--fetch-wheels DIR` downloads their
# wheels on a machine with the package index; `--wheels DIR` there installs them into
# /tmp/llm_jax_site (no index, no deps) and puts it on PYTHONPATH.
#
# Steps, in order of value, each under what is left of the budget (default 470 s: the whole run
# inside 8 minutes), results as JSON and text under OUT, then OUT.tar.gz (one file to bring back):
#   env            nvidia-smi, versions, devices
#   step_hlo       the 124M train step's compiled HLO + a profile of 3 steps (bench/step_hlo.py),
#                  then the same step compiled deviceless for h100 when the plugin allows:
#                  the two HLO summaries side by side (custom calls, fusions, collectives)
#   train_small12  bench/train_throughput.py configs/small.py at micro batch 12
#   decode         bench/decode_throughput.py batch 1 and 32, cached and uncached
#   hf_generate    Hugging Face generate on the same (exported) weights (bench/hf_generate.py)
#   train_small32  micro batch 32;  train_medium, train_large: their configs' micro batches
# A step that fails or runs out of time is recorded as such in OUT/summary.txt; the rest run.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
TINY=0; OUT=""; WHEELS=""; BUDGET=470
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#*=}" ;;
    --wheels) WHEELS="$2"; shift ;;
    --wheels=*) WHEELS="${1#*=}" ;;
    --budget) BUDGET="$2"; shift ;;
    --budget=*) BUDGET="${1#*=}" ;;
    --fetch-wheels|--fetch-wheels=*)
      DIR="${1#--fetch-wheels}"; DIR="${DIR#=}"; [ -z "$DIR" ] && DIR="${2:?--fetch-wheels DIR}"
      exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$DIR" ml-collections==1.1.0 zstandard==0.25.0 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "error: gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -z "$OUT" ] && OUT="$ROOT/results/gpu_suite_$(date -u +%Y%m%d_%H%M%S)"
mkdir -p "$OUT"
cd "$ROOT"
if [ -n "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/llm_jax_site \
    "$WHEELS"/*.whl || { echo "error: could not install the wheels in $WHEELS" >&2; exit 2; }
  export PYTHONPATH="/tmp/llm_jax_site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import ml_collections, zstandard, flax, optax" 2>/dev/null || {
  echo "error: $PY lacks llm_jax's dependencies (ml-collections, zstandard, flax, optax): give" \
       "--wheels DIR (made with --fetch-wheels DIR) or pip install -e ." >&2; exit 2; }

START=$(date +%s)
SUMMARY="$OUT/summary.txt"
echo "gpu_suite $( [ $TINY = 1 ] && echo --tiny) on $(hostname), $(date -u), budget ${BUDGET}s" > "$SUMMARY"
if [ $TINY = 1 ]; then
  export JAX_PLATFORMS=cpu
  T="--tiny"
else
  T=""
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

step() {  # step NAME SECONDS COMMAND...: run under min(SECONDS, what is left), log to OUT/NAME.log
  local name=$1 want=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local limit=$(( want < left ? want : left ))
  if [ "$limit" -le 5 ]; then
    echo "$name: skipped (budget spent)" | tee -a "$SUMMARY"; return
  fi
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  case $rc in
    0) echo "$name: ok in ${dt}s" ;;
    124|137) echo "$name: TIMED OUT after ${limit}s" ;;
    *) echo "$name: FAILED (exit $rc) in ${dt}s: $(tail -n 1 "$OUT/$name.log")" ;;
  esac | tee -a "$SUMMARY"
}

{ command -v nvidia-smi >/dev/null && nvidia-smi; "$PY" -c "
import jax, sys; print(sys.version); print('jax', jax.__version__, jax.devices())
try:
  import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)
except ImportError as e: print('no', e.name)"; } > "$OUT/env.txt" 2>&1
echo "env: $(grep -m1 '^jax' "$OUT/env.txt")" | tee -a "$SUMMARY"

step step_hlo 90 "$PY" bench/step_hlo.py $T --out "$OUT/step"
if [ $TINY = 0 ]; then  # the same step deviceless, where the CUDA plugin's topology call works
  step step_hlo_deviceless 60 env JAX_PLATFORMS=cpu "$PY" bench/step_hlo.py --target=h100 \
    --out "$OUT/step"
fi
step train_small12 70 "$PY" bench/train_throughput.py $T --configs=small --micro_batch_size=12 \
  --out "$OUT/train_small12.json"
step decode 100 "$PY" bench/decode_throughput.py $T --batch_sizes=1,32 \
  --out "$OUT/decode.json"
step hf_generate 80 "$PY" bench/hf_generate.py $T --out "$OUT/hf_generate.json"
step train_small32 50 "$PY" bench/train_throughput.py $T --configs=small --micro_batch_size=32 \
  --out "$OUT/train_small32.json"
if [ $TINY = 0 ]; then
  step train_medium 90 "$PY" bench/train_throughput.py --configs=medium \
    --out "$OUT/train_medium.json"
  step train_large 120 "$PY" bench/train_throughput.py --configs=large \
    --out "$OUT/train_large.json"
fi
echo "total $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
tar -czf "$OUT.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "wrote $OUT.tar.gz"
! grep -q "FAILED" "$SUMMARY"
