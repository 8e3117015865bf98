# Set-up and the main jobs. `make demo` and `make test` work on a fresh machine with python3 (3.11 or 3.12).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first and pinned with its torchvision (timm needs it): a bare `torch` requirement pulls whatever build is
# newest. These CUDA 13 builds also run on the CPU; see the guide, "Install for a GPU", for other CUDA versions.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint docs bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

DEMO_OUT ?= omx_demo

demo: install
	$(VENV)/bin/omx demo --out $(DEMO_OUT)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

docs: install
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

bench: install
	$(PY) benchmarks/her2st.py
	$(PY) benchmarks/patches.py

clean:
	rm -rf $(VENV) docs/_build docs/generated omx_demo
