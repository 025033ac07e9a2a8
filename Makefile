# The habits a newcomer types. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# No telemetry; tool state stays inside the project (git-ignored), not in $HOME.
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export BENTOML_DO_NOT_TRACK := True
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := False
export BENTOML_HOME := $(CURDIR)/.bentoml
export PREFECT_HOME := $(CURDIR)/.prefect
# dvc.yaml's commands say `python`: make that the project's interpreter.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install the pinned dependencies (requirements.lock)

repo-init: $(STAMP)
	@test -d .git || (git init -q && echo "initialised a git repository (DVC needs one)")
	@test -d .dvc || ($(VENV)/bin/dvc init -q && echo "initialised DVC")

pipeline: setup repo-init ## run the whole pipeline (Prefect flow over the DVC stages) and build the bento
	$(PY) -m flows.pipeline $(if $(SET),$(foreach s,$(SET),--set $(s)),)

repro: setup ## the same stages with plain `dvc repro` (no Prefect)
	$(VENV)/bin/dvc repro

test: setup ## run the test suite (fast tests and the end-to-end test)
	$(PY) -m pytest

lint: setup ## ruff lint and format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

serve: setup ## serve the newest bento on http://127.0.0.1:3000
	@test -f artefacts/bento.json || (echo "no bento yet: run 'make pipeline' first" && exit 1)
	$(VENV)/bin/bentoml serve "$$($(PY) -c 'import json;print(json.load(open("artefacts/bento.json"))["tag"])')" --host 127.0.0.1 --port 3000

bench: setup ## benchmarks on the last pipeline run (int8 vs fp32: size, latency, accuracy)
	$(PY) -m bench.onnx_variants

clean: ## remove tool state and build scratch (keeps data, models and the DVC cache)
	rm -rf build .pytest_cache .ruff_cache

.PHONY: help setup repo-init pipeline repro test lint serve bench clean
