#!/usr/bin/env bash
# Build, test and benchmark hydra_fast on a CUDA machine, from a checkout of the repository.
#
#   bash scripts/gpu_bench.sh [--model DIR] [--heads DIR]... [--prompts FILE] [--stages LIST] OUT
#
#   --model DIR    HF folder of the base model (default: SmolLM2-135M-Instruct through hydra_fast.hub, which
#                  downloads it on first use)
#   --heads DIR    a heads collection (medusa/ hydra/ hydra_pp/ inside; default: the shipped heads);
#                  repeat it to benchmark several collections, one bench_decode run each
#   --prompts FILE prompts jsonl: {"turns": [...]} (MT-Bench) or {"category": ..., "prompt": ...}
#                  (default: ../shared/data/mt_bench.jsonl when present, else bench_decode's built-in prompts)
#   --stages LIST  comma list of build,test,slowtest,decode,step,ops,profile (default: all but slowtest and
#                  profile, in that order; slowtest: the CUDA tests marked slow, e.g. SmolLM2 fp32 on all 80
#                  MT-Bench first turns; profile: kernel time per step by kernel name of plain decoding and of
#                  Hydra++ with an 8-token context chain, bench/profile_decode.py, 8 prompts, HYDRA_FAST_PDL=0)
#   OUT            output folder: one log per stage, the benchmarks' JSON/Markdown, machine.txt, stages.txt
#
# Environment: MAX_JOBS (build jobs, default 16), HYDRA_FAST_CUDA_ARCHS (default 90), CXX / CUDAHOSTCXX
# (compilers), HYDRA_FAST_COMMIT (the commit to record where the checkout has no .git), NUM_PROMPTS (default
# 80), HF_PROMPTS (prompts the HF baselines run, default NUM_PROMPTS), METHODS (bench_decode's --methods; default
# all, each of ours also compiled), MAX_NEW_TOKENS (default 128), DECODE_S /
# STEP_S / OPS_S (each benchmark's deadline in seconds: 900 / 400 / 600), TAU_JSON (a bench_decode JSON whose
# measured tau bench_step projects with; default: this OUT's bench_decode.json when the decode stage ran).
# Switches such as HYDRA_FAST_PDL=0, HYDRA_FAST_ATTN_CLUSTER=0 or HYDRA_FAST_TOPK_ROWS=0 apply to every stage: run
# the script once with and once without one (two OUT folders) for an A/B on the same machine.
# Copy bandwidth and matmul rate are measured in the same run by bench_step and bench_ops (their JSON "meta").
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

MODEL="" PROMPTS="" STAGES="build,test,decode,step,ops" HEADS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --heads) HEADS+=("$2"); shift 2 ;;
    --prompts) PROMPTS=$2; shift 2 ;;
    --stages) STAGES=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done
[ -n "${OUT:-}" ] || { echo "usage: $0 [--model DIR] [--heads DIR]... [--prompts FILE] [--stages LIST] OUT" >&2; exit 2; }
for s in ${STAGES//,/ }; do
  case "$s" in build|test|slowtest|decode|step|ops|profile) ;;
    *) echo "unknown stage $s: choose from build,test,slowtest,decode,step,ops,profile" >&2; exit 2 ;; esac
done
[ -z "$MODEL" ] || [ -f "$MODEL/config.json" ] || { echo "--model $MODEL: no config.json there (an HF model folder)" >&2; exit 2; }
for h in "${HEADS[@]}"; do [ -d "$h" ] || { echo "--heads $h is not a folder" >&2; exit 2; }; done
if [ -z "$PROMPTS" ] && [ -f "$REPO/../shared/data/mt_bench.jsonl" ]; then PROMPTS=$REPO/../shared/data/mt_bench.jsonl; fi
[ -z "$PROMPTS" ] || [ -f "$PROMPTS" ] || { echo "--prompts $PROMPTS not found" >&2; exit 2; }

mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$REPO/python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -z "$MODEL" ] || export HYDRA_FAST_TEST_MODEL=$MODEL
[ -z "$PROMPTS" ] || export HYDRA_FAST_TEST_PROMPTS=$PROMPTS
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/stages.txt"; }
stage() {  # stage NAME COMMAND...: run, log to OUT/NAME.log, record rc and seconds
  local name=$1 s rc; shift
  s=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1; rc=$?
  say "$name rc=$rc seconds=$(( $(date +%s) - s ))"
  return $rc
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo "${HYDRA_FAST_COMMIT:-unknown}")"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>&1
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)" 2>&1
  echo "model: ${MODEL:-default (hydra_fast.hub)}; heads: ${HEADS[*]:-shipped}; prompts: ${PROMPTS:-built-in}"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

model_args=(); [ -z "$MODEL" ] || model_args=(--model "$MODEL")
prompt_args=(); [ -z "$PROMPTS" ] || prompt_args=(--prompts "$PROMPTS")
failed=0
for s in ${STAGES//,/ }; do
  case "$s" in
  build)
    stage build env HYDRA_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} HYDRA_FAST_BUILD_DIR=${HYDRA_FAST_BUILD_DIR:-$REPO/build} \
      python3 setup.py -q build_ext --inplace || { failed=1; say "build failed: later stages would use another build"; break; }
    python3 -c "import hydra_fast; print(hydra_fast.build_info())" | tee -a "$OUT/build.log"
    ;;
  test)
    # two processes: a crash in the bad-input tests must not hide the other results
    stage test python3 -m pytest -q -rfE -p no:cacheprovider -m "cuda and not slow" tests/ \
      -k "not bad_inputs and not device_mismatch" --junitxml "$OUT/test.xml" || failed=1
    stage test_bad_inputs python3 -m pytest -q -rfE -p no:cacheprovider -m cuda tests/test_ops.py \
      -k "bad_inputs or device_mismatch" --junitxml "$OUT/test_bad_inputs.xml" || failed=1
    tail -n 3 "$OUT/test.log" "$OUT/test_bad_inputs.log"
    ;;
  slowtest)
    stage slowtest python3 -m pytest -q -rfE -p no:cacheprovider -m "cuda and slow" tests/ \
      --junitxml "$OUT/slowtest.xml" || failed=1
    tail -n 3 "$OUT/slowtest.log"
    ;;
  decode)
    if [ ${#HEADS[@]} -eq 0 ]; then runs=(""); else runs=("${HEADS[@]}"); fi
    i=0
    for h in "${runs[@]}"; do
      name=bench_decode; [ ${#runs[@]} -gt 1 ] && name=bench_decode_$i
      heads_args=(); [ -z "$h" ] || heads_args=(--heads-dir "$h")
      stage "$name" python3 bench/bench_decode.py "${model_args[@]}" "${heads_args[@]}" "${prompt_args[@]}" \
        --num-prompts "${NUM_PROMPTS:-80}" --hf-prompts "${HF_PROMPTS:-${NUM_PROMPTS:-80}}" --max-new-tokens "${MAX_NEW_TOKENS:-128}" \
        ${METHODS:+--methods "$METHODS"} --compile --compile-methods plain,medusa,hydra,hydra++ --json "$OUT/$name.json" \
        --deadline-s "${DECODE_S:-900}" || failed=1
      i=$((i + 1))
    done
    ;;
  step)
    tau=${TAU_JSON:-}; [ -z "$tau" ] && [ -f "$OUT/bench_decode.json" ] && tau=$OUT/bench_decode.json
    stage bench_step python3 bench/bench_step.py --compile --json "$OUT/bench_step.json" \
      ${tau:+--tau-json "$tau"} --deadline-s "${STEP_S:-400}" || failed=1
    ;;
  profile)
    for kind in plain hydra++; do
      ctx=0; [ "$kind" = plain ] || ctx=8
      stage "profile_${kind//+/p}" env HYDRA_FAST_PDL=0 python3 bench/profile_decode.py "${model_args[@]}" \
        "${prompt_args[@]}" ${HEADS[0]:+--heads-dir "${HEADS[0]}"} --kind "$kind" --tree auto --context-draft "$ctx" \
        --num-prompts 8 \
        --max-new-tokens "${MAX_NEW_TOKENS:-128}" --json "$OUT/profile_${kind//+/p}.json" || failed=1
    done
    ;;
  ops)
    stage bench_ops python3 bench/bench_ops.py --device cuda --json "$OUT/bench_ops.json" --md "$OUT/bench_ops.md" \
      --deadline-s "${OPS_S:-600}" || failed=1
    ;;
  esac
done
say "done (failed=$failed); results in $OUT"
exit $failed
