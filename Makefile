# slak_mm: every target sets up the project-local environment first (tools/setup_env.sh; a no-op when up to date).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean-demo
setup:
	@bash tools/setup_env.sh

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: setup
	$(PY) tools/demo.py

bench: setup
	$(PY) tools/benchmark_dwconv.py --quick
	$(PY) tools/benchmark.py --quick

clean-demo:
	rm -rf data/demo work_dirs/demo
