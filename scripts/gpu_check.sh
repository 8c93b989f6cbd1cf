#!/usr/bin/env bash
# Every GPU check and measurement the open issues ask for, in one batch, for a CUDA machine (a lent device has
# 10 minutes per command: run the steps in two or three calls, e.g. `scripts/gpu_check.sh tests local_filter`).
#
#   OUT=gpu_out PY=.venv/bin/python scripts/gpu_check.sh [STEP ...]
#
# STEP: tests local_filter deform dcnv warp mixture (default: all). One file per step in $OUT, ending "rc=N".
set -u
OUT=${OUT:-gpu_out}
PY=${PY:-python}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests local_filter deform dcnv warp mixture)
common=(--device cuda --dtypes float32,bfloat16)
for step in "${steps[@]}"; do
  case "$step" in
    tests) cmd=("$PY" -m pytest -q -rs -m "cuda or slow" tests) ;;
    local_filter) cmd=("$PY" -m dynconv bench local_filter "${common[@]}" --backends torch,triton --compile) ;;
    deform) cmd=("$PY" -m dynconv bench deform "${common[@]}" --backends torch,triton) ;;
    dcnv) cmd=("$PY" -m dynconv bench dcnv "${common[@]}" --backends torch,triton) ;;
    warp) cmd=("$PY" -m dynconv bench warp "${common[@]}" --backends torch,triton --deterministic) ;;
    mixture) cmd=("$PY" -m dynconv bench mixture --device cuda --sizes 32,224 --batches 1,64) ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
  echo "== $step: ${cmd[*]}"
  { nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null; date -u; } > "$OUT/$step.txt"
  "${cmd[@]}" >> "$OUT/$step.txt" 2>&1
  echo "rc=$?" >> "$OUT/$step.txt"
  tail -n 4 "$OUT/$step.txt"
done
