# Two entry points, each doing all of its own set-up on a fresh machine:
#   make demo   runs the digits smoke sweep on an embedded local Ray and prints the table
#   make test   runs the test suite (what .ci/run runs)
# torch is installed first and on its own so that a CPU-only machine never pulls a
# multi-GB CUDA build; override TORCH_SPEC / TORCH_INDEX for another build, e.g.
#   make test TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu
# The torchvision/timm tests (-m realmodels) run in a second environment, .venv-tv: PyPI's
# torchvision does not load beside the CPU torch 2.13.0 wheel, and with torchvision installed
# `import torch_pruning` pulls torchvision -> torch._inductor into every test process (~8 s
# and ~850 MB each), so the main suite stays on the plain CPU torch.
VENV        ?= .venv
PYTHON      ?= python3
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PY          := $(VENV)/bin/python
VENV_TV     ?= .venv-tv
TV_SPEC     ?= torch==2.14.1 torchvision==0.29.1
PY_TV       := $(VENV_TV)/bin/python

.PHONY: demo test test-main test-realmodels install install-tv clean-runs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install-tv: $(VENV_TV)/.installed

# torch + torchvision (~2 min from local disk), then the project with its test and models
# extras: `make test` runs both in the background while the main suite runs. The second only
# rewrites progprune.egg-info in the working tree, which no test reads and which the image's
# build context (.dockerignore) and the runtime env's upload (excludes) leave out.
$(VENV_TV)/.torch:
	test -x $(PY_TV) || $(PYTHON) -m venv $(VENV_TV)
	$(PY_TV) -m pip install -q $(TORCH_INDEX) $(TV_SPEC)
	touch $@

$(VENV_TV)/.installed: pyproject.toml $(VENV_TV)/.torch
	$(PY_TV) -m pip install -q -e ".[test,models]"
	touch $@

demo: install
	$(VENV)/bin/progprune sweep ray_jobs/digits_smoke.yaml

# both suites run; the second one even when the first failed, and make fails if either did.
# The second environment installs in the background meanwhile (its log is shown if it fails;
# test-realmodels then retries it in the foreground).
TV_LOG := $(or $(TMPDIR),/tmp)/progprune-venv-tv-$(shell id -u).log
test: install
	{ $(MAKE) -s $(VENV_TV)/.installed > $(TV_LOG) 2>&1 || { echo "background install of $(VENV_TV) failed:"; cat $(TV_LOG); }; } & tv=$$!; \
	$(MAKE) test-main; a=$$?; wait $$tv; $(MAKE) test-realmodels; b=$$?; test $$a -eq 0 -a $$b -eq 0

# Two pytest-xdist workers: the Ray tests on the session cluster or an embedded Ray, those
# with Ray clusters of their own, and the docker tests (tests/conftest.py: markers ray,
# ray(own_cluster=True), docker) each run on one worker, one after another, while the rest
# spreads over both; much of the Ray tests' time is waiting. One torch thread per worker (OMP_NUM_THREADS, unless set): two
# workers on 2 cores. XDIST= runs it serially; PYTEST_ARGS adds arguments (e.g. --cov=progprune).
XDIST       ?= -n 2 --dist loadgroup
PYTEST_ARGS ?=
test-main: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -p no:cacheprovider -m "not realmodels" $(XDIST) $(PYTEST_ARGS)

# the torchvision/timm tests are CPU-bound model pruning, independent of each other: two
# workers, one torch thread each (XDIST_TV= runs them serially)
XDIST_TV    ?= -n 2
test-realmodels: install-tv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY_TV) -m pytest -q -p no:cacheprovider -m realmodels $(XDIST_TV) $(PYTEST_ARGS) tests/test_real_models.py

clean-runs:
	rm -rf runs/
