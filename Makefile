# `make train` and `make test` create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install train test lint benchmark clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(INSTALLED)

# Extra Hydra overrides: make train ARGS="optimizer=adam trainer.max_steps=100"
train: $(INSTALLED)
	$(PY) train.py $(ARGS)

test: $(INSTALLED)
	$(PY) -m pytest -x -q $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/hadolint Dockerfile

benchmark: $(INSTALLED)
	$(PY) benchmarks/optimizer_step.py $(ARGS)

clean:
	rm -rf logs .pytest_cache .hypothesis
