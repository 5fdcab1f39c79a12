# Two commands do all the set-up on a fresh machine (Python 3.11 and the package registries):
#   make run    create .venv, install nad-guard, and run the main job
#   make test   create .venv, install nad-guard with its test extra, and run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nad-guard-installed

.PHONY: install run test clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/nad-guard quickstart

test: install
	BENTOML_DO_NOT_TRACK=True $(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
