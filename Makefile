# The two set-up commands of the README. Each creates .venv and installs the project on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CHECKED := src tests bench migrations

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# No byte-compiling of every installed file (half of the install's time): Python compiles what it imports.
	$(BIN)/pip install --quiet --no-compile -e '.[dev]'
	touch $@

demo: $(VENV)/.installed  ## simulate a town into sqlite:///action_metrics.db and print the dashboard
	$(BIN)/action-metrics demo
	@echo
	@echo "See it as a page: $(BIN)/action-metrics serve --insecure, then open http://127.0.0.1:8000/"

lint: $(VENV)/.installed
	$(BIN)/ruff check $(CHECKED)
	$(BIN)/ruff format --check $(CHECKED)
	$(BIN)/mypy

test: lint  ## ruff, mypy (strict on src/), then pytest on SQLite and PostgreSQL
	$(BIN)/python -m pytest -n auto --dist worksteal

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
