# The README's commands. Everything installs into .venv; system packages only when root.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean-venv system-packages

setup: system-packages $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

system-packages:
	@bash tools/install_system_packages.sh

demo: setup
	cd egs/mini && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./run.sh

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q test

bench: setup
	$(PIP) install --quiet -e '.[bench]'
	$(PY) bench/run_all.py

clean-venv:
	rm -rf $(VENV)
