#!/usr/bin/env bash
# GPU machine, call 2 of 2: rebuild nothing (call 1 left hydra_fast/_C*.so in place), assemble SmolLM2, run the
# op benchmarks and the end-to-end checks. Carry: .model_b .whl .data (.data/mt_bench.jsonl: ../shared does not
# travel to the GPU machine).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/python:/tmp/site PYTHONUNBUFFERED=1 HYDRA_FAST_CACHE=/tmp/hfcache
G=/tmp/scratch/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/scratch/smolpart00 .model_b/smolpart01 > "$G"
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G" | sha256sum -c - || exit 1
python3 -c "import hydra_fast; print(hydra_fast.build_info())" || exit 1
python3 -c "from hydra_fast import hub; print(hub.default_model_path(gguf='$G'))" 2>&1 | tail -1
M=/tmp/hfcache/SmolLM2-135M-Instruct
if [ "${SKIP_BENCH_OPS:-0}" != 1 ]; then
  timeout 330 python3 bench/bench_ops.py --device cuda --json "$OUT/bench_ops.json" --md "$OUT/bench_ops.md" \
    --deadline-s 300 > "$OUT/bench_ops.log" 2>&1; echo "bench_ops rc=$?"; tail -c 6000 "$OUT/bench_ops.md"
fi
timeout 240 python3 scripts/gpu_e2e.py --model "$M" --skip-tiny --mt-bench .data/mt_bench.jsonl --out "$OUT/e2e.json" \
  ${E2E_ARGS:-} 2>&1 | tail -60
