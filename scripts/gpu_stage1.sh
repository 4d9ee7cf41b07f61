#!/usr/bin/env bash
# GPU machine, call 1 of 2: stash the first half of the SmolLM2 GGUF, build the CUDA extension, run the CUDA
# op tests. Carry: .model_a .whl.  Call 2 (scripts/gpu_stage2.sh) must follow within 30 s.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/scratch
cp .model_a/smolpart00 /tmp/scratch/ && echo "stashed part 1"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
export HYDRA_FAST_CUDA=1 MAX_JOBS=16 HYDRA_FAST_BUILD_DIR=/tmp/hfbuild PYTHONUNBUFFERED=1
start=$(date +%s)
if ! python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40; tail -20 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
export PYTHONPATH=$PWD/python:/tmp/site
python3 -c "import hydra_fast; print(hydra_fast.build_info())"
timeout 420 python3 -m pytest tests/test_ops.py tests/test_heads.py -q -m cuda -p no:cacheprovider -rfE 2>&1 \
  | tee "$OUT/test_cuda.log" | grep -E "passed|failed|error|FAILED|ERROR" | tail -40
