# The README's two commands: `make run` (set-up + the whole pipeline) and `make test` (set-up + the tests).
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PYTHON ?= python3
export PATH := $(BIN):$(PATH)
# no network beyond package registries: keep the tools' usage telemetry off
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# every stage is a new interpreter: where the environment forbids writing bytecode, each would compile all its
# imports again (the test suite took twice as long); written once, it is read even where writing is forbidden
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup repo run test test-ui test-cluster fuzz chaos lint flow sweep recipe serve ui services services-stop clean

setup: $(VENV)/.installed

# torch first, by pip, from the local CPU wheel: anything else pulling torch would fetch a multi-GB CUDA build.
# Then uv installs the rest (the same versions under the same constraints, torch kept), downloading in parallel.
# Neither byte-compiles: the interpreter compiles what is imported, once (see PYTHONDONTWRITEBYTECODE above).
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile torch==2.13.0 uv==0.13.9
	$(BIN)/uv pip install -q --python $(BIN)/python -c requirements.lock -e '.[dev]'
	touch $@

repo: setup
	@git rev-parse --git-dir >/dev/null 2>&1 || { echo "not a git repository: running git init"; git init -q; }
	@[ -f .dvc/config ] || dvc init -q

run: repo
	dvc repro
	@echo; head -n 8 $$(python -c "from stages.config import load_params; print(load_params().paths.reports)")/evaluate.md

test: setup
	python -m pytest

# the MLflow UI test in headless Chromium (Debian's chromium, driven by playwright); its screenshots go to docs/
test-ui: setup
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }
	uv pip install -q --python $(BIN)/python -c requirements.lock -e '.[ui]'
	UI_SCREENSHOTS=$(CURDIR)/docs python -m pytest -m ui tests/test_integration.py

# curate on a one-node Slurm cluster (Debian's slurm-wlm; slurmd needs root); the Ray tests run in `make test`
test-cluster: setup
	@command -v slurmctld >/dev/null || { [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q slurm-wlm; }
	python -m pytest -m cluster tests/test_cluster.py

# ingest's readers fuzzed at length: 5,000 new cases per reader and kind of damage (make test runs 200, fixed)
fuzz: setup
	FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py

# every stage SIGKILLed at each of its kill points, then `dvc repro` (make test runs one of the 30 cases)
chaos: setup
	CHAOS_MATRIX=full python -m pytest tests/test_chaos.py

lint: setup
	ruff check . && ruff format --check .

flow: repo
	python -m flows.pipeline

sweep: repo
	python -m flows.sweep

recipe: repo  # make recipe NAME=normformer
	@[ -n "$(NAME)" ] || { echo "usage: make recipe NAME=<a file in recipes/, without .yaml>"; exit 2; }
	python -m flows.recipe $(NAME)

serve: repo
	python -m flows.deploy

ui: setup
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

# a local trial of the team set-up: PostgreSQL, an S3 server, the MLflow and Prefect servers on 127.0.0.1
services: setup
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q postgresql; }
	@PATH="$$PATH:$$(ls -d /usr/lib/postgresql/*/bin | tail -n 1)" python -m flows.services start

services-stop: setup
	@PATH="$$PATH:$$(ls -d /usr/lib/postgresql/*/bin | tail -n 1)" python -m flows.services stop

clean:
	rm -rf $(VENV)
