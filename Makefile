# The two commands (README): `make pipeline` runs the whole pipeline on the tiny CPU profile,
# `make test` runs the test suite. Both install what they need into .venv first (idempotent).
PY := .venv/bin/python
PRESET ?= tiny
# Test processes (pytest-xdist): 2 fits the 2-core machines; `make test TEST_WORKERS=0` runs in one process.
# TEST_ARGS: more pytest arguments, e.g. `make test TEST_ARGS=--junitxml=tests.xml` (per-test times).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

.PHONY: install pipeline repro test test-fast ui prefect-ui clean-outputs

install:
	@bash scripts/install.sh

# Write preset $(PRESET) to params.yaml (a params change DVC sees), then run every stage through
# the Prefect flow, which calls `dvc repro` stage by stage.
pipeline: install
	$(PY) -m flows.pipeline --preset $(PRESET)

# The same stages without Prefect (dvc runs each stage's `python -m ...` from PATH). params.yaml is
# checked first: dvc repro deletes a stage's outputs before running it (stages/check.py).
repro: install
	$(PY) -m stages.check
	PATH="$(CURDIR)/.venv/bin:$$PATH" .venv/bin/dvc repro

# The 30 slowest tests are listed at the end (what to look at when the suite gets slow).
test: install
	$(PYTEST) --durations=30 $(TEST_ARGS)

test-fast: install
	$(PYTEST) -m "not slow" $(TEST_ARGS)

# The UIs (flows/ui.py): each prints its URL and runs in the foreground; PORT=... picks another port.
ui: install
	$(PY) -m flows.ui mlflow $(if $(PORT),--port $(PORT))

prefect-ui: install
	$(PY) -m flows.ui prefect $(if $(PORT),--port $(PORT))

clean-outputs:
	rm -rf data/prepared models checkpoints reports metrics plots mlruns
