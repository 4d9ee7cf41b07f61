#!/usr/bin/env bash
# One GPU session in four back-to-back calls (scripts/GPU_RUNBOOK.md): work that needs no quiet GPU (the build,
# the CUDA tests, self-distillation and head training) runs in the background while the calls go on;
# timing runs (bench_decode, bench_step, bench_ops) run alone, in the foreground.
#
#   A  carry .model_a .whl .data : stash GGUF half 1, copy the tree to /tmp/w (build) and /tmp/wt (training,
#                                  no extension), start the CUDA build in the background
#   B  carry .model_b            : assemble + convert SmolLM2, start data + training in the background, wait for
#                                  the build, run the CUDA op tests and the tiny-model CUDA equality
#   C  (no carry)                : wait for training, return the heads, bench_decode (all methods, compiled too)
#   D  (no carry)                : bench_step (7B/8B shapes), bench_ops; returns every result file
#
# Background jobs are started with setsid, so they outlive the call that started them (not the machine).
set -uo pipefail
STAGE=${1:?usage: $0 A|B|C|D}
OUT=${OUT:-/tmp/out}
W=/tmp/w WT=/tmp/wt L=/tmp/logs M=/tmp/hfcache/SmolLM2-135M-Instruct H=/tmp/heads R=/tmp/results
mkdir -p "$OUT" "$L" "$R" /tmp/scratch
export PYTHONUNBUFFERED=1 HYDRA_FAST_CACHE=/tmp/hfcache
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
sync_tree() {  # the call's working tree -> $1 (code only; build outputs there are kept)
  mkdir -p "$1"
  tar --exclude=./.model_a --exclude=./.model_b --exclude=./.whl --exclude=./.git --exclude=./out -cf - . | tar -xf - -C "$1"
}
start_build() {  # the CUDA build of $W in the background; writes $L/build.done when it ends
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv,noheader \
    | tee "$L/gpu.txt"
  # The image's default CXX (/opt/gcc/bin/g++) built an _C.so whose integer formatting crashed (2026-11-28).
  local cxx=""; [ -x /usr/bin/g++ ] && cxx="CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++"
  (cd "$W" && setsid nohup env $cxx HYDRA_FAST_CUDA=1 MAX_JOBS=12 HYDRA_FAST_BUILD_DIR=/tmp/hfbuild \
     bash -c 's=$(date +%s); python3 setup.py -q build_ext --inplace; rc=$?; echo "rc=$rc seconds=$(( $(date +%s) - s ))" > /tmp/logs/build.done' \
     > "$L/build.log" 2>&1 < /dev/null &)
  say "build started in the background"
}
wait_for() {  # wait_for FILE SECONDS
  local i=0; while [ ! -e "$1" ] && [ $i -lt "$2" ]; do sleep 2; i=$((i + 2)); done; [ -e "$1" ]
}

case "$STAGE" in
A)
  cp .model_a/smolpart00 /tmp/scratch/ && say "stashed GGUF part 1"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  sync_tree "$W"; sync_tree "$WT"
  start_build
  ;;
B)
  G=/tmp/scratch/SmolLM2-135M-Instruct.Q4_1.gguf
  cat /tmp/scratch/smolpart00 .model_b/smolpart01 > "$G"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G" | sha256sum -c - || exit 1
  sync_tree "$WT"
  (cd "$WT" && PYTHONPATH=$WT/python:/tmp/site python3 -c \
     "from hydra_fast import hub; print(hub.default_model_path(gguf='$G'))" 2>&1 | tail -1)
  say "model converted"
  # training: self-distilled data (the prompt file made by scripts/make_train_prompts.py) then the three kinds
  (cd "$WT" && setsid nohup bash -c "PYTHONPATH=$WT/python:/tmp/site bash scripts/train_default_heads.sh $M $H \
      ${PROMPTS:-7764} 256 ${TRAIN_BUDGET:-480} --pack-dir /tmp/pack --mt-bench .data/mt_bench.jsonl --quiet \
      --source jsonl:7764@.data/train_prompts.jsonl.gz --data-fraction ${DATA_FRACTION:-0.35}; echo rc=\$? > $L/train.done" \
      > "$L/train.log" 2>&1 < /dev/null &)
  say "training started in the background"
  wait_for "$L/build.done" 400 || { say "build not finished"; tail -30 "$L/build.log"; exit 1; }
  cat "$L/build.done"; grep -E "error" "$L/build.log" | head -20; cp "$L/build.log" "$OUT/"
  cd "$W" && export PYTHONPATH=$W/python:/tmp/site
  python3 -c "import hydra_fast; print(hydra_fast.build_info())" || exit 1
  timeout 300 python3 -m pytest tests/test_ops.py -q -m cuda -p no:cacheprovider -rfE \
    -k "not bad_inputs and not device_mismatch" > "$OUT/test_cuda.log" 2>&1; say "cuda op tests rc=$?"
  grep -E "passed|failed|FAILED|ERROR" "$OUT/test_cuda.log" | tail -15
  timeout 150 python3 -m pytest tests/test_ops.py -q -m cuda -p no:cacheprovider -rfE \
    -k "bad_inputs or device_mismatch" > "$OUT/test_cuda_bad.log" 2>&1; say "cuda bad-input tests rc=$?"
  grep -E "passed|failed|FAILED|ERROR|Fatal" "$OUT/test_cuda_bad.log" | tail -8
  timeout 150 python3 scripts/gpu_e2e.py --tiny-only --out "$OUT/e2e_tiny.json" 2>&1 | tail -6
  cp "$L/gpu.txt" "$OUT/"; tail -5 "$L/train.log"
  ;;
C)
  sync_tree "$W"
  wait_for "$L/train.done" "${TRAIN_WAIT:-300}" || say "training still running"
  cat "$L/train.done" 2>/dev/null; tail -12 "$L/train.log"; cp "$L/train.log" "$OUT/"
  cp /tmp/pack/heads.tar.* /tmp/pack/summary.json "$OUT/" 2>/dev/null
  cd "$W" && export PYTHONPATH=$W/python:/tmp/site
  left=$(( 560 - ($(date +%s) - t0) ))
  timeout $left python3 bench/bench_decode.py --model "$M" --heads-dir "$H" --prompts .data/mt_bench.jsonl \
    --num-prompts 80 --hf-prompts 3 --max-new-tokens 128 --compile --json "$R/bench_decode.json" \
    --deadline-s $(( left - 25 )) > "$L/bench_decode.log" 2>&1; say "bench_decode rc=$?"
  tail -c 5000 "$L/bench_decode.log"
  ;;
E)  # the timing chain in the background, one run after another: bench_decode, bench_step, bench_ops
  sync_tree "$W"
  (cd "$W" && setsid nohup env PYTHONPATH=$W/python:/tmp/site bash -c "
    timeout 400 python3 bench/bench_decode.py --model $M --heads-dir $H --prompts .data/mt_bench.jsonl \
      --num-prompts 80 --hf-prompts 3 --max-new-tokens 128 --compile --json $R/bench_decode.json \
      --deadline-s ${DECODE_S:-330} > $L/bench_decode.log 2>&1; echo decode rc=\$? >> $L/chain.txt
    timeout 230 python3 bench/bench_step.py --deadline-s ${STEP_S:-190} --json $R/bench_step.json \
      > $L/bench_step.log 2>&1; echo step rc=\$? >> $L/chain.txt
    timeout 260 python3 bench/bench_ops.py --device cuda --json $R/bench_ops.json --md $R/bench_ops.md \
      --deadline-s ${OPS_S:-200} > $L/bench_ops.log 2>&1; echo ops rc=\$? >> $L/chain.txt
    touch $L/chain.done" > /dev/null 2>&1 < /dev/null &)
  say "timing chain started"
  ;;
F)  # wait for the chain, return its results
  wait_for "$L/chain.done" "${CHAIN_WAIT:-560}" || say "chain still running"
  cat "$L/chain.txt"; tail -c 2500 "$R/bench_decode.md" 2>/dev/null; tail -c 1500 "$R/bench_step.md" 2>/dev/null
  tail -c 20000 "$L/bench_decode.log" > "$R/bench_decode.log"; tail -c 20000 "$L/bench_step.log" > "$R/bench_step.log"
  tail -c 20000 "$L/bench_ops.log" > "$R/bench_ops.log"
  cp "$R"/bench_decode.json "$R"/bench_decode.md "$R"/bench_decode.png "$R"/bench_step.json "$R"/bench_step.md \
     "$R"/bench_ops.json "$R"/bench_ops.md "$OUT/" 2>/dev/null
  tar -czf "$OUT/logs.tgz" -C / tmp/logs tmp/results/bench_decode.log tmp/results/bench_step.log \
     tmp/results/bench_ops.log 2>/dev/null
  ls -la "$OUT"
  ;;
D)
  cd "$W" && export PYTHONPATH=$W/python:/tmp/site
  timeout 230 python3 bench/bench_step.py --deadline-s 200 --json "$R/bench_step.json" > "$L/bench_step.log" 2>&1
  say "bench_step rc=$?"; tail -c 2500 "$R/bench_step.md" 2>/dev/null || tail -20 "$L/bench_step.log"
  left=$(( 540 - ($(date +%s) - t0) ))
  timeout $left python3 bench/bench_ops.py --device cuda --json "$R/bench_ops.json" --md "$R/bench_ops.md" \
    --deadline-s $(( left - 30 )) > "$L/bench_ops.log" 2>&1; say "bench_ops rc=$?"
  tail -c 3000 "$R/bench_ops.md"
  tail -c 20000 "$L/bench_decode.log" > "$R/bench_decode.log"
  tail -c 20000 "$L/bench_step.log" > "$R/bench_step.log"
  cp "$R"/bench_decode.json "$R"/bench_decode.md "$R"/bench_decode.png "$R"/bench_step.json "$R"/bench_step.md \
     "$R"/bench_ops.json "$R"/bench_ops.md "$OUT/" 2>/dev/null
  tar -czf "$OUT/logs.tgz" -C / tmp/logs tmp/results/bench_decode.log tmp/results/bench_step.log 2>/dev/null
  ls -la "$OUT"
  ;;
S)  # stash the carried bundle part(s) (.gp1 .gp2 .gp3: GGUF + heads tar, split in three); the first call also
    # installs the wheels and starts the build
  for d in .gp1 .gp2 .gp3; do [ -d "$d" ] && cp "$d"/bundle.* /tmp/scratch/ && say "stashed $(ls $d)"; done
  if [ ! -e "$L/build.started" ]; then
    touch "$L/build.started"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gp1/*.whl
    sync_tree "$W"
    start_build
  fi
  ;;
G)  # after S on all three parts: unpack the GGUF and the heads, convert, wait for the build, time (bench_decode)
  cat /tmp/scratch/bundle.0* > /tmp/scratch/bundle
  echo "${BUNDLE_SHA:?} /tmp/scratch/bundle" | sha256sum -c - || exit 1
  G=/tmp/scratch/SmolLM2-135M-Instruct.Q4_1.gguf
  head -c 98362432 /tmp/scratch/bundle > "$G"; mkdir -p "$H"; tail -c +98362433 /tmp/scratch/bundle | tar -x -C "$H"
  sync_tree "$W"; ls "$H"
  (cd "$W" && PYTHONPATH=$W/python:/tmp/site python3 -c \
     "from hydra_fast import hub; print(hub.default_model_path(gguf='$G'))" 2>&1 | tail -1)
  wait_for "$L/build.done" 300 || { say "build not finished"; tail -30 "$L/build.log"; exit 1; }
  cat "$L/build.done"; cd "$W" && export PYTHONPATH=$W/python:/tmp/site
  python3 -c "import hydra_fast; print(hydra_fast.build_info())" || exit 1
  left=$(( ${G_BUDGET:-560} - ($(date +%s) - t0) ))
  timeout $left python3 bench/bench_decode.py --model "$M" --heads-dir "$H" --prompts .data/mt_bench.jsonl \
    --methods ${METHODS:-hf,hf_static_compile,plain,medusa,hydra++} --compile \
    --compile-methods ${COMPILE_METHODS:-plain,medusa,hydra++} --num-prompts ${NUM_PROMPTS:-40} --hf-prompts 3 \
    --max-new-tokens 128 --json "$OUT/bench_decode.json" --deadline-s $(( left - 20 )) > "$OUT/bench_decode.log" 2>&1
  say "bench_decode rc=$?"; cat "$OUT/bench_decode.md" 2>/dev/null | head -30; grep -E "warm-up|FAIL" "$OUT/bench_decode.log"
  ;;
*) echo "unknown stage $STAGE"; exit 2 ;;
esac
