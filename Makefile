# The commands a newcomer needs: `make install`, then `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTEST  := $(BIN)/python -m pytest

.PHONY: install test test-fast bench fidelity lint demo clean

install: $(BIN)/python
	# Go's own text/template renders the Ollama chat template in tests (tests/go/render.go): Debian's golang-go
	@if ! command -v go >/dev/null 2>&1; then \
	  if [ "$$(id -u)" -eq 0 ]; then apt-get update && apt-get install -y golang-go; \
	  else echo "go not found and not root: install Debian's golang-go for tests/test_modelfile.py"; fi; \
	fi
	$(BIN)/pip install --upgrade pip
	# torch==2.13.0 first: it is the CPU wheel that lies on this machine (any other spec pulls CUDA builds)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test,ray]'

$(BIN)/python:
	$(PY) -m venv $(VENV)

# a worker per core; --dist loadfile keeps each file on one worker, so its module fixtures are built once
test:
	$(PYTEST) -q -n auto --dist loadfile

test-fast:
	$(PYTEST) -q -n auto --dist loadfile -m "not slow"

bench:
	$(BIN)/python -m bench.kernels
	$(BIN)/python -m bench.convert_bench
	# first-call cost, one read for four mixes vs four runs vs llama.cpp, read/quantize overlap
	$(BIN)/python -m bench.throughput_bench
	# the error report's cost, and ppl against llama-perplexity (same GGUF and text, same run)
	$(BIN)/python -m bench.report_overhead
	$(BIN)/python -m bench.eval_bench

# Trains the nano Qwen3.5-MoE once (~15 min on 2 cores, cached in .cache/nano), then measures every mix
fidelity:
	$(BIN)/python -m bench.fidelity

lint:
	$(BIN)/ruff check rioquant tests bench

demo:
	$(BIN)/python -m bench.demo

clean:
	rm -rf build dist *.egg-info .pytest_cache
