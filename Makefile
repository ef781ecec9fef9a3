# One entry point for developers and CI. Every target sets itself up first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(VENV)/bin/appliance demo $(DEMO_ARGS)

# Development mode (warnings, resource checks) for the tests only: pip and the demo stay quiet.
test: setup
	PYTHONDEVMODE=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check appliance central linerec_contract tests bench
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/pipeline.py
	$(PY) bench/ring.py
	$(PY) bench/seal.py
	$(PY) bench/capture.py
	$(PY) bench/uplink.py
	$(PY) bench/intake.py
	$(PY) bench/dtmf.py
	$(PY) bench/central_intake.py
	$(PY) bench/realtime.py --lines 16

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
