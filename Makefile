# Two commands do everything on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint sandbox

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) -m mct.train --config experiments/configs/tiny_cpu.py --config.workdir /tmp/mct-tiny

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# the python_tests reward runs candidate code under bubblewrap: on a Debian machine as root (CI) install it when missing
sandbox:
	@command -v bwrap >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; }

test: lint sandbox
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15  # two workers (CI has 2 cores); a file stays on one
