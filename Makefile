# vllm-fleet: every entry point a person or CI uses. Each step is cached and idempotent.
#   make demo   bring the product up on this machine (real vLLM CPU containers) and show it serving
#   make test   lint, install everything the tests need, then run every tier (a skipped tier fails)
#   make unit   the fast tiers only (unit + gateway), no Docker
#   make lint   ruff and mypy (strict on gateway/ and fleet/; settings in pyproject.toml)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := REQUIRE_ALL_TIERS=1 $(PY) -m pytest

.PHONY: demo demo-down test unit lint venv docker images node-image vllm-image models browser

$(VENV)/.installed: pyproject.toml
	@echo "== python env: $(VENV) (project + test dependencies)" >&2
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

docker:
	@bash scripts/install-docker.sh

images: docker venv
	@bash scripts/build-images.sh all

node-image: images
	@bash scripts/build-node-image.sh

vllm-image: images
	@bash scripts/build-vllm-image.sh

models: vllm-image
	@$(PY) scripts/make_tiny_models.py

browser:
	@bash scripts/install-browser.sh

lint: venv
	$(PY) -m ruff check .
	$(PY) -m mypy

test: venv lint docker images node-image vllm-image models browser
	$(PYTEST)

unit: venv
	$(PY) -m pytest -m "unit or gateway"

demo: venv docker images vllm-image models
	@bash scripts/demo.sh

demo-down:
	@bash scripts/demo-down.sh
