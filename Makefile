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

# The service on http://HOST:PORT (loopback by default; HOST=0.0.0.0 to listen on every interface) (POST /predict_with_trust, /predict; /healthz, /readyz, /metrics)
# with the bundled default guard; NAD_GUARD_DIR=DIR or NAD_GUARD_MODEL_TAG=TAG serve another.
HOST ?= 127.0.0.1
PORT ?= 3000
run: install
	BENTOML_DO_NOT_TRACK=True $(VENV)/bin/bentoml serve service.service:NadGuard --host $(HOST) --port $(PORT)

test: install
	BENTOML_DO_NOT_TRACK=True $(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
