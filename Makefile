# One Makefile for humans and CI. `make demo` and `make test` work on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export MLOPS_HOME ?= $(CURDIR)/.mlops
AIRFLOW_SERVER_ENV = AIRFLOW_HOME=$(MLOPS_HOME)/airflow \
	AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__PLUGINS_FOLDER=$(CURDIR)/plugins \
	AIRFLOW__CORE__LOAD_EXAMPLES=False \
	AIRFLOW__API__HOST=127.0.0.1 \
	PATH=$(CURDIR)/$(BIN):$$PATH

# Two pytest processes, a module per process (a module's ports, homes and fixtures stay
# together), the heaviest modules first (tests/conftest.py: HEAVY_FIRST) so the long ones
# start at once and the short ones fill in. docs/testing.md has the measurements.
XDIST = -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: install demo test test-fast lint airflow ui-check lock clean

# pip byte-compiles what it installs; keep it so (no --no-compile): these machines set
# PYTHONDONTWRITEBYTECODE=1, so nothing is compiled later, and the suite ran 1.6x slower.
$(STAMP): requirements.txt setup.cfg pyproject.toml
	@date +%s > $(VENV).install-began
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	@echo "install: $$(( $$(date +%s) - $$(cat $(VENV).install-began) )) s"; rm -f $(VENV).install-began
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## the main job end to end on embedded defaults, with a summary
	$(BIN)/mlops demo --reset

test: $(STAMP)  ## lint, type-check and the whole test suite (prints each step's wall time)
	@t=$$(date +%s); $(BIN)/ruff check . && echo "ruff: $$(( $$(date +%s) - t )) s"
	@t=$$(date +%s); $(BIN)/mypy && echo "mypy: $$(( $$(date +%s) - t )) s"
	@t=$$(date +%s); $(BIN)/python -m pytest $(XDIST) && echo "pytest (2 processes): $$(( $$(date +%s) - t )) s"

test-fast: $(STAMP)  ## the inner loop: everything not marked slow (unit, DAG integrity, infra, fast integration), under 2 min
	$(BIN)/python -m pytest -m "not slow" $(XDIST)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

airflow: $(STAMP)  ## airflow standalone with this project's DAGs on http://127.0.0.1:8080, on a PostgreSQL it starts
	$(AIRFLOW_SERVER_ENV) $(BIN)/mlops airflow

ui-check: $(STAMP)  ## after `make demo`: the blocked day's task log and the trigger form (submitted untouched), in headless Chromium
	@command -v chromium >/dev/null || { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq chromium; }
	$(BIN)/python -m tests.ui_check --home $(MLOPS_HOME)

lock:  ## re-pin requirements.txt from the current venv
	{ head -n 2 requirements.txt; $(BIN)/python -m pip freeze --exclude-editable \
	  | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements.lock && mv requirements.lock requirements.txt

clean:
	rm -rf $(MLOPS_HOME) .pytest_cache .mypy_cache .ruff_cache
