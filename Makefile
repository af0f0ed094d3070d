# Two commands do everything on a fresh machine with Python 3.12 or 3.13: `make demo` and `make test`.
# PYTHON: the first Python >= 3.12 (jax 0.12's floor) on PATH or under pyenv; override with `make PYTHON=...`.
find_python = $(firstword $(shell for p in $(1) $(wildcard $(HOME)/.pyenv/versions/$(2)*/bin/python3); do \
	$$p -c 'import sys; sys.exit(sys.version_info[:2] != ($(subst .,$(comma),$(2))))' 2>/dev/null && echo $$p; done))
comma := ,
PYTHON ?= $(or $(call find_python,python3.12,3.12),$(call find_python,python3.13,3.13))
DEMO_PYTHON ?= $(or $(call find_python,python3.13,3.13),$(PYTHON))  # `make test` also runs the demo on it
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint sandbox demo-check

$(VENV)/.core: requirements.txt pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: mct needs Python 3.12 or 3.13 (python3.12 on PATH, or make PYTHON=...)"; exit 2; }
	$(PYTHON) -m venv --clear $(VENV)  # a fresh venv: an older one may hold another Python
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.core
	$(PY) -m mct.train --config experiments/configs/tiny_cpu.py --config.workdir /tmp/mct-tiny $(DEMO_FLAGS)

lint: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# the python_tests reward runs candidate code under bubblewrap: on a Debian machine as root (CI) install it when missing
sandbox:
	@command -v bwrap >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; }

# the demo on a second Python in its own core-only venv: a clean install, 20 steps, one checkpoint
demo-check:
	rm -rf .venv-demo /tmp/mct-demo-check
	$(MAKE) demo PYTHON=$(DEMO_PYTHON) VENV=.venv-demo \
		DEMO_FLAGS="--config.workdir=/tmp/mct-demo-check --config.train.steps=20 --config.checkpoint.every_steps=20"

test: lint sandbox
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15  # two workers (CI has 2 cores); a file stays on one
	$(MAKE) demo-check
