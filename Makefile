# One entry point for developers and CI. Every target sets itself up first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean image image-test bundle

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(VENV)/bin/appliance demo $(DEMO_ARGS)

# Development mode (warnings, resource checks) for the tests only: pip and the demo stay quiet.
test: setup
	PYTHONDEVMODE=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check appliance central linerec_contract tests bench os-image
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

# The OS image (os-image/README.md). Needs root; host tools come from os-image/image-bootstrap.sh.
IMAGE_ARCH ?= amd64
IMAGE_DIR := build/image-$(IMAGE_ARCH)

image: setup
	@ARCH=$(IMAGE_ARCH) bash os-image/image-bootstrap.sh
	ARCH=$(IMAGE_ARCH) OUT=$(IMAGE_DIR) bash os-image/build.sh

bundle: setup
	@ARCH=$(IMAGE_ARCH) bash os-image/image-bootstrap.sh
	@test -f $(IMAGE_DIR)/rootfs.ext4 || $(MAKE) image
	bash os-image/bundle.sh $(IMAGE_DIR) build/line-recorder-$(IMAGE_ARCH).raucb

image-test: image
	bash os-image/image-test.sh $(IMAGE_DIR)
