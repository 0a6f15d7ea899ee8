# Two commands on a fresh machine:  `make run` (the pipeline on the default params)  and
# `make test` (the test suite). Both first install everything into the project virtualenv .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test server clean-results

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt pytest==9.2.0 pytest-randomly==5.1.0 \
		selenium==4.51.0
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

# The main job: every DVC stage on params.yaml (cached stages are skipped).
run: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

# The team tracking server (PostgreSQL + MLflow, state in .server/) until Ctrl-C; pipelines use
# it with MLFLOW_TRACKING_URI=http://127.0.0.1:5000.
server: install
	$(BIN)/reduce-ops server

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q
