#!/usr/bin/env bash
# GPU machine, call 1 of 2: stash the first half of the SmolLM2 GGUF, build the CUDA extension, run the CUDA
# op tests. Carry: .model_a .whl.  Call 2 (scripts/gpu_stage2.sh) must follow within 30 s.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/scratch
cp .model_a/smolpart00 /tmp/scratch/ && echo "stashed part 1"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
export HYDRA_FAST_CUDA=1 MAX_JOBS=16 HYDRA_FAST_BUILD_DIR=/tmp/hfbuild PYTHONUNBUFFERED=1
# The image's default CXX (/opt/gcc/bin/g++, a wrapper) built an _C.so in which formatting an integer in an
# error message crashed (a second libstdc++, 2026-11-28); prefer the system compiler where there is one.
echo "CXX=${CXX:-} CUDAHOSTCXX=${CUDAHOSTCXX:-}"
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi
"${CXX:-c++}" --version | head -1
start=$(date +%s)
if ! python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40; tail -20 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
export PYTHONPATH=$PWD/python:/tmp/site
python3 -c "import hydra_fast; print(hydra_fast.build_info())"
# Two processes: a crash in the bad-input tests must not hide the others' results.
timeout 240 python3 -m pytest tests/test_ops.py -q -m cuda -p no:cacheprovider -rfE \
  -k "not bad_inputs and not device_mismatch" > "$OUT/test_cuda.log" 2>&1; echo "cuda op tests rc=$?"
grep -E "passed|failed|FAILED|ERROR" "$OUT/test_cuda.log" | tail -20
timeout 120 python3 -m pytest tests/test_ops.py -q -m cuda -p no:cacheprovider -rfE -v \
  -k "bad_inputs or device_mismatch" > "$OUT/test_cuda_bad.log" 2>&1; echo "cuda bad-input tests rc=$?"
grep -E "passed|failed|FAILED|ERROR|Fatal" "$OUT/test_cuda_bad.log" | tail -8; tail -n 3 "$OUT/test_cuda_bad.log"
timeout 120 python3 scripts/gpu_e2e.py --tiny-only --out "$OUT/e2e_tiny.json" 2>&1 | tail -6
