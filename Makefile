# ssn_exp: `make run` trains + certifies the default experiment, `make test` runs the tests.
# Both set up the virtual environment (.venv) first. `make help` lists every target.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
# make test runs the tests in this many processes (pytest-xdist); 2 fits CI's 2 cores
TEST_WORKERS ?= 2

.PHONY: help install run test test-fast test-slurm lint mutation bench sweep-smoke sweep-paper-cifar10 sweep-paper-imagenet sweep-dssn-seeds sweep-denoisers report clean

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-22s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "installing ssn_exp and its dependencies into $(VENV) (the first time: PyTorch's wheels, several GB; see README)"
	$(PY) -m pip install --progress-bar off -c constraints.txt -e '.[dev]' | grep -E '^(Collecting|Successfully installed)' || true
	$(PY) -c "import ssn_exp, torch"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install ssn_exp with its dependencies (editable)

run: $(STAMP)  ## train + certify the default experiment (digits, DSSN); extra Hydra overrides via ARGS="..."
	$(PY) -m ssn_exp $(ARGS)

test: $(STAMP)  ## run the whole test suite (slow tests included) except the jobs on a real Slurm cluster (make test-slurm)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slurm" $(ARGS)

test-slurm: $(STAMP)  ## the tests that run jobs on a real Slurm cluster (sudo scripts/slurm_local.sh start first; .ci/run does)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m slurm $(ARGS)

test-fast: $(STAMP)  ## run the tests without the slow end-to-end ones
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow" $(ARGS)

lint: $(STAMP)  ## ruff check + format check
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

mutation: $(STAMP)  ## mutation testing of the certificate, trust and result-file code with mutmut (hours on 2 cores; stopped, it resumes; survivors: mutmut results)
	$(PY) -m pip install --quiet 'mutmut>=3.8'
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run || true
	$(VENV)/bin/mutmut results

bench: $(STAMP)  ## throughput of certification vs plain forward passes and a baseline (ARGS="--json FILE --models ...")
	$(PY) -m ssn_exp.bench $(ARGS)

sweep-smoke: $(STAMP)  ## digits, 4 methods x 3 sigma (uniform/ssn/dssn: 85 s on a 2-core CPU), then the report
	$(PY) -m ssn_exp.sweep smoke $(ARGS)

sweep-paper-cifar10: $(STAMP)  ## CIFAR-10: 3 methods x 15 sigma x standard/stability (GPUs; ARGS="--launcher slurm")
	$(PY) -m ssn_exp.sweep paper_cifar10 $(ARGS)

sweep-paper-imagenet: $(STAMP)  ## ImageNet: 3 methods x sigma 0.5/2.0/3.5 x standard/stability (GPUs)
	$(PY) -m ssn_exp.sweep paper_imagenet $(ARGS)

sweep-dssn-seeds: $(STAMP)  ## CIFAR-10 DSSN, 15 sigma x seeds 0/1/2 (appendix Table 3)
	$(PY) -m ssn_exp.sweep dssn_seeds $(ARGS)

sweep-denoisers: $(STAMP)  ## CIFAR-10: denoiser variants x 3 methods x sigma 0.5/2.0/3.5 (appendix D)
	$(PY) -m ssn_exp.sweep denoisers $(ARGS)

report: $(STAMP)  ## report over the published arrays shipped with ssn_exp (ARGS="outputs/sweeps/smoke ..." adds runs)
	$(PY) -m ssn_exp.report --published levine2021 $(ARGS)

clean:  ## remove caches and run outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache .hypothesis src/*.egg-info multirun build
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	find . -name __pycache__ -prune -exec rm -rf {} +
