# Two commands do all the set-up on a fresh machine (Python 3.11 and the package registries):
#   make run    create .venv, install nad-guard, and run the main job
#   make test   create .venv, install nad-guard with its test extra, and run the test suite
#   (make test-avx2 runs it again as on a CPU without AVX-512; .ci/run runs both)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nad-guard-installed

.PHONY: install run test test-avx2 clean

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

# The suite again with every CPU kernel library restricted to AVX2 (torch's own kernels, oneDNN, MKL, NumPy), as
# on an x86-64 CPU without AVX-512: what the tests claim must hold on every CPU, not only on the one that ran
# them (docs/reproducibility.md). tests/test_isa.py checks that the restriction took effect.
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	NPY_DISABLE_CPU_FEATURES=X86_V4,AVX512_ICL,AVX512_SPR NAD_GUARD_EXPECT_ISA=avx2
test-avx2: install
	$(AVX2_ONLY) BENTOML_DO_NOT_TRACK=True $(PY) -m pytest -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info
