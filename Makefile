# Two entry points, each doing all of its own set-up on a fresh machine:
#   make demo   runs the digits smoke sweep on an embedded local Ray and prints the table
#   make test   runs the test suite (what .ci/run runs)
# torch is installed first and on its own so that a CPU-only machine never pulls a
# multi-GB CUDA build; override TORCH_SPEC / TORCH_INDEX for another build, e.g.
#   make test TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu
VENV        ?= .venv
PYTHON      ?= python3
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PY          := $(VENV)/bin/python

.PHONY: demo test install clean-runs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/progprune sweep ray_jobs/digits_smoke.yaml

test: install
	$(PY) -m pytest -q -p no:cacheprovider

clean-runs:
	rm -rf runs/
