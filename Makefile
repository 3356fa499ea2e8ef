# CPU stack by default: `pip install torch==2.13.0` takes the CPU build from local disk,
# while a bare `torch` would pull a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
STACK ?= cpu
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(STACK)

.PHONY: install test serve system-deps clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@bash scripts/system_deps.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(STACK),test]"
	touch $@

test: install
	$(BIN)/python -m pytest tests

serve: install
	$(BIN)/qwenvl-pd serve --port 8000

clean:
	rm -rf $(VENV) .pytest_cache
