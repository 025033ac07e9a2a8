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

# -e, not -d: in a git worktree (or a submodule) .git is a file, and git init would re-initialise.
repo-init: $(STAMP)
	@test -e .git || (git init -q && echo "initialised a git repository (DVC needs one)")
	@test -d .dvc || ($(VENV)/bin/dvc init -q && echo "initialised DVC")

pipeline: setup repo-init ## run the whole pipeline and build the bento; SET="k=v ..." for this run only, KEEP=1 keeps them
	$(PY) -m flows.pipeline $(if $(SET),$(foreach s,$(SET),--set $(s)),) $(if $(filter 1 yes true,$(KEEP)),--keep-params,)

repro: setup ## the same stages with plain `dvc repro` (no Prefect)
	$(VENV)/bin/dvc repro

# `dvc exp show` with every run's name, its headline metrics (metrics/headline/*.json, kept even
# where they are equal) and the params that differ between the runs shown; code, data and model
# hashes left out. The plain `dvc exp show` has a column for each of params.yaml's keys and each
# file dependency (over 200): at 160 characters DVC collapses them all into `…`.
HISTORY_METRICS := best_epoch|accuracy|macro_f1|r2|rmse|mae|served_accuracy|served_r2|served_kib|served_ms
history: setup ## every run: its name, headline metrics and the params that differ (SORT=accuracy: best first)
	@$(VENV)/bin/dvc exp show --no-pager --only-changed \
	  --keep '^(Experiment|Created|$(HISTORY_METRICS))$$' --drop '.*/' --drop '[^.]*$$' \
	  $(if $(SORT),--sort-by $(SORT) --sort-order $(or $(ORDER),desc),) $(ARGS)

# Test files in TEST_WORKERS processes (pytest-xdist; a module's tests stay together, so
# its fixtures are built once). 3 on the 2-core CI machine: the end-to-end tests spend part of
# their time waiting on servers and stage processes, and a third process fills those waits
# (measured on one commit: 6 min 56 s at 3, 7 min 19 s at 2, the same CPU time).
TEST_WORKERS ?= 3
test: setup browser ## run the test suite (fast tests and the end-to-end tests), TEST_WORKERS=3 at once
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# `make test` soaks the served bento for 10 s; this is the 60 s the hardening issue asks for.
SOAK_SECONDS ?= 60
soak: setup ## 8 clients, good and hostile requests, against a served bento for SOAK_SECONDS=60
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest -n 0 -s tests/test_service_hardening.py -k soak

# The report test renders reports/report.html in a real headless Chromium: Debian's, since no
# test tool may download its own browser here. Installed when missing and we are root; the
# test skips (and says why) when no Chromium can be had at all.
browser: ## Chromium for the report's browser test (apt-get, when missing and root)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report's browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	      || echo "could not install chromium: the browser test will skip"; \
	  else echo "no chromium and not root: the report's browser test will skip"; fi

deps: setup ## make each dvc.yaml stage's code deps the modules it imports (tests/test_structure.py checks)
	$(PY) -m tools.code_deps --write

lint: setup ## ruff lint and format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Servers bind the loopback interface only; PORT=... picks another port (make serve PORT=8080).
serve: PORT ?= 3000
serve: setup ## serve the champion's bento on http://127.0.0.1:3000 (PORT=8080: another port)
	@tag="$$($(PY) -m components.promote tag)" && \
	  echo "serving the champion $$tag on http://127.0.0.1:$(PORT)" && \
	  $(VENV)/bin/bentoml serve "$$tag" --host 127.0.0.1 --port $(PORT)

champion: setup ## show the champion, its lineage and every packaged run
	@$(PY) -m components.promote show

promote: setup ## make a packaged run the champion: make promote RUN=<version, tag or prefix>
	@test -n "$(RUN)" || (echo "usage: make promote RUN=<run> (see: make champion)" && exit 2)
	@$(PY) -m components.promote promote "$(RUN)"

rollback: setup ## give the champion title back to the previous champion
	@$(PY) -m components.promote rollback

bench: setup ## benchmarks on the last pipeline run: int8 vs fp32; compression goals; Lightning vs a plain loop
	$(PY) -m bench.onnx_variants
	$(PY) -m bench.compression
	$(PY) -m bench.train_vs_loop

# BUDGET=10m (or 90s, 1h, 1h30m, plain seconds): that much wall time of trials, as many as fit
# (N_TRIALS=20 caps the count too); the final run with the best params comes after it.
tune: setup repo-init ## run (or resume) the tuning study in params.yaml's tune section; BUDGET=10m: 10 minutes of trials; WORKERS=2: two at once
	$(PY) -m flows.tune $(if $(BUDGET),--budget '$(BUDGET)',) $(if $(N_TRIALS),--n-trials '$(N_TRIALS)',) $(if $(WORKERS),--workers $(WORKERS),) $(if $(SET),$(foreach s,$(SET),--set $(s)),)

bench-tune: setup ## tuned vs default params, 1 vs 2 workers, ensemble vs best single model (~10 min)
	$(PY) -m bench.tune

bench-scale: setup ## sharded vs in-memory splits at 10k, 100k, 1M images and table rows: memory, time, throughput (~15 min)
	$(PY) -m bench.scale

bench-series: setup ## a time series' splits stored as rows (windows as views) vs windows copied, 100k to 3M steps: file size, memory, throughput; its ingest in batches vs whole, to 10M (~5 min)
	$(PY) -m bench.series

bench-defaults: setup ## default params vs classical baselines on 10 data sets that packages ship (~4 min)
	$(PY) -m bench.defaults

bench-serve: setup ## the served bento vs a hand-written FastAPI server vs ONNX Runtime in-process (~2 min)
	$(PY) -m bench.serve

serve-edge: PORT ?= 3001
serve-edge: setup ## serve the newest edge bento on :3001, PORT=... another (CLOUD_URL=http://host:3000 forwards unsure images)
	@test -f artefacts/bento.json || (echo "no bento yet: run 'make pipeline' first" && exit 1)
	$(VENV)/bin/bentoml serve "$$($(PY) -c 'import json;print(json.load(open("artefacts/bento.json"))["edge"]["tag"])')" --host 127.0.0.1 --port $(PORT)

# Schedules and the Prefect UI (docs/orchestration.md).
PREFECT_PORT ?= 4200

# The UI asks its API at PREFECT_UI_API_URL, which Prefect 3 derives from PREFECT_API_URL or
# PREFECT_SERVER_API_HOST/PORT, not from --port: name them all, so any port works.
prefect-server: setup ## the Prefect server and its UI on http://127.0.0.1:4200 (PREFECT_PORT=4300: another; SQLite in .prefect/)
	PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=$(PREFECT_PORT) \
	  PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api \
	  $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

schedule: setup repo-init ## serve the nightly + by-hand deployments (make prefect-server first; SCHEDULE_POOL=gpu: a work pool)
	PREFECT_API_URL="$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_PORT)/api}" \
	  $(PY) -m flows.deploy $(if $(SCHEDULE_POOL),--pool $(SCHEDULE_POOL),)

.PHONY: prefect-server schedule

clean: ## remove tool state and build scratch (keeps data, models and the DVC cache)
	rm -rf build .pytest_cache .ruff_cache

.PHONY: help setup repo-init pipeline repro history test soak browser deps lint serve champion promote rollback bench bench-serve serve-edge clean tune bench-tune bench-scale bench-series bench-defaults
