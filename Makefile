# Two commands for a fresh machine: `make run` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run bundles test lint docs format setup tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

bundles: $(STAMP)
	$(BIN)/fpet weights fetch dinov2_vits14
	$(BIN)/fpet export --default

run: bundles
	@echo
	@echo "Once the service says 'Application startup complete', in another terminal:"
	@echo "  curl -s -X POST -H 'Content-Type: image/png' --data-binary @samples/ankle_boot.png 'http://127.0.0.1:8000/classify?top_k=5'"
	@echo
	$(BIN)/fpet serve --host 127.0.0.1 --port 8000

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# The documentation site (mkdocs.yml): --strict fails on a broken link or a page left out of the navigation.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# NVIDIA's perf_analyzer for the Triton-compatibility tests (needs Debian's libb64-0d; no GPU).
tools: $(STAMP)
	PIP=$(BIN)/pip ./bench/perf_analyzer.sh >/dev/null

test: lint docs tools
	$(BIN)/pytest

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache *.egg-info build
