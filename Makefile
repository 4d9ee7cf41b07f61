PY ?= python3
JOBS ?= 2

.PHONY: install demo test test-fast bench-cpu

install:
	$(PY) -m pip install -q -r requirements.txt
	MAX_JOBS=$(JOBS) $(PY) -m pip install -q --no-build-isolation -e .

demo: install
	$(PY) -m hydra_fast.cli generate --max-new-tokens 64 "Write a haiku about fast inference."

test: install
	$(PY) -m pytest -q -ra

test-fast:
	$(PY) -m pytest -q -ra -m "not slow"

bench-cpu:
	$(PY) bench/bench_ops.py --device cpu --quick
