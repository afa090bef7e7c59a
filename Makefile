# bso: binary spiking networks trained online with BSO / T-BSO.  `make help` lists the targets.
PYTHON ?= python3
PIP_FLAGS ?= --quiet --disable-pip-version-check
ARGS ?=
# The exact versions every install takes (pip constraints): the environment the suite passed on.
# `make test-latest` tests the newest versions pyproject.toml allows; `make lock` re-records them.
LOCK ?= requirements.lock
LATEST_VENV ?= .venv-latest

.DEFAULT_GOAL := help
.PHONY: help install install-dev wheel train eval env test-fast test test-slow test-latest latest-venv lock lint clean fig4 bench-lean bench-throughput bench-methods bench-models bench-data bench-roofline bench-profile bench-memopt bench bench-gpu reproduce-mini report check-nir mutate

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-17s %s\n", $$1, $$2}'

.make-install.stamp: pyproject.toml $(LOCK)
	$(PYTHON) -m pip install $(PIP_FLAGS) -c $(LOCK) -e .
	@touch $@

.make-dev.stamp: pyproject.toml $(LOCK) .make-install.stamp
	$(PYTHON) -m pip install $(PIP_FLAGS) -c $(LOCK) -e ".[dev]"
	@touch $@

install: .make-install.stamp  ## install the package and its dependencies at the versions of requirements.lock (once; again when it or pyproject.toml changes)

install-dev: .make-dev.stamp  ## install with the dev extras (pytest, ruff), at the lock's versions

env: install  ## what this machine can do with bso: versions, devices, compiler, lock match (python -m bso.env)
	$(PYTHON) -m bso.env

wheel:  ## build the wheel (the configs inside, as bso/configs) into dist/
	$(PYTHON) -m pip wheel $(PIP_FLAGS) --no-deps -w dist .

train: install  ## train T-BSO on the embedded digits dataset (CPU, no download); extra Hydra overrides in ARGS="..."
	$(PYTHON) train.py $(ARGS)

eval: install  ## evaluate a saved model on its test set: make eval CKPT=outputs/runs/<run>/best.pt [ARGS="..."]
	@test -n "$(CKPT)" || { echo "make eval: give the checkpoint, e.g. make eval CKPT=outputs/runs/<run>/best.pt" >&2; exit 1; }
	$(PYTHON) eval.py checkpoint=$(CKPT) $(ARGS)

# The tests run with OpenMP threads that sleep when idle instead of spinning: on a busy machine (a
# shared CI runner) spinning threads fight for the cores and the suite runs several times slower.
# Results do not depend on it. OMP_WAIT_POLICY=ACTIVE make test restores OpenMP's default.
test-fast test test-slow test-latest: export OMP_WAIT_POLICY ?= PASSIVE

# pytest with a marker expression, one worker per core (a test file stays in one worker: its
# module fixtures are built once); collecting no test fails (pytest's exit status 5)
TEST_WORKERS ?= auto
PYTEST = rc=0; $(1) -m pytest -m "$(2)" -n $(TEST_WORKERS) --dist loadfile $(ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make $@: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: install-dev  ## unit and golden tests, the inner loop (about a minute on 2 cores; not `integration`, not `slow`; TEST_WORKERS=1: one process)
	@$(call PYTEST,$(PYTHON),not slow and not integration)

test: install-dev  ## unit, golden and integration tests on the lock's versions, what CI runs (about 9 min on 2 cores; not `slow`)
	@$(call PYTEST,$(PYTHON),not slow)

latest-venv:  # a fresh venv with the newest versions pyproject.toml allows
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install $(PIP_FLAGS) --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install $(PIP_FLAGS) -e ".[dev]"

test-latest: latest-venv  ## the same tests on the newest versions pyproject.toml allows, in a fresh venv (.venv-latest)
	$(LATEST_VENV)/bin/python -m bso.env
	@$(call PYTEST,$(LATEST_VENV)/bin/python,not slow)

lock: latest-venv  ## re-record requirements.lock: the exact versions a fresh `pip install -e ".[dev]"` gets (then run make test)
	@{ echo "# The exact versions of a fresh \`pip install -e \".[dev]\"\` (Python $$($(LATEST_VENV)/bin/python -c 'import platform; print(platform.python_version(), platform.system(), platform.machine())')),"; \
	  echo "# which make install / make test use as pip constraints. Written by \`make lock\`; do not edit."; \
	  $(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip=='; } > $(LOCK)
	@echo "wrote $(LOCK) ($$(grep -c '==' $(LOCK)) packages)"

test-slow: install-dev  ## run only the slow checks
	$(PYTHON) -m pytest -m slow $(ARGS)

fig4: install  ## memory vs T for BPTT-latent / BSO / T-BSO (paper Fig. 4) -> benchmarks/results/memory_vs_T.*
	$(PYTHON) scripts/bench/memory_vs_T.py $(ARGS)

bench-lean: install  ## lean vs plain mode: bytes per binary weight, activation peak, ms per step -> benchmarks/results/lean.*
	$(PYTHON) scripts/bench/lean.py $(ARGS)

bench-throughput: install  ## samples/s, ms per time step, flip-rule cost -> benchmarks/results/throughput.*
	$(PYTHON) scripts/bench/throughput.py $(ARGS)

bench-methods: install  ## every Table 2 method on the digits at T=2 and 8 -> benchmarks/results/methods_digits.*
	$(PYTHON) scripts/bench/methods_digits.py $(ARGS)

bench-models: install  ## forward+backward ms per time step and size of every model -> benchmarks/results/models.*
	$(PYTHON) scripts/bench/models.py $(ARGS)

bench-data: install  ## data-loading samples/s (CIFAR-10, DVS-CIFAR10 synthetic files) -> benchmarks/results/data_loading.*
	$(PYTHON) scripts/bench/data_loading.py $(ARGS)

bench-roofline: install  ## iteration time vs its convolutions alone (lean/plain, eager/fused; VGG-11, batch 16, T=4/6) -> benchmarks/results/roofline.*
	$(PYTHON) scripts/bench/roofline.py $(ARGS)

bench-profile: install  ## where an iteration's time goes: operators' self time by category (every mode) -> benchmarks/results/profile.*
	$(PYTHON) scripts/bench/profile_step.py $(ARGS)

bench-memopt: install  ## lean mode vs spikingjelly memopt: tensor memory peak and time -> benchmarks/results/memopt.*
	$(PYTHON) scripts/bench/memopt.py $(ARGS)

bench-gpu: install  ## CUDA only: throughput, loader, roofline, Figure 4 memory, flips of every mode vs plain -> benchmarks/results/gpu.*
	$(PYTHON) scripts/bench/gpu.py $(ARGS)

.PHONY: gpu-check
gpu-check: install  ## CUDA: the GPU path checked and measured in 8 min, most important first; a rerun continues -> benchmarks/results/gpu_check.{jsonl,md}
	$(PYTHON) scripts/bench/gpu_check.py $(ARGS)

bench: fig4 bench-throughput bench-methods bench-models bench-data  ## every benchmark (CPU: about 40 min)

check-nir: install-dev  ## NIR exports in snnTorch, Norse, spikingjelly and Sinabs (own venv .venv-sinabs): trains two digits models -> benchmarks/results/nir_interop.*
	$(PYTHON) scripts/check_nir.py --install $(ARGS)

reproduce-mini: install  ## the paper's Tables 2-4 and Figures 4-5, small, on the digits (CPU, minutes) -> benchmarks/results/mini/
	$(PYTHON) scripts/reproduce_mini.py $(ARGS)

report: install  ## every paper artefact from the runs under outputs/ beside the paper's numbers -> outputs/reports/
	@mkdir -p outputs/reports
	@for a in table2 table3 table4 table5 fig5 energy; do \
	  fig=; case $$a in table3|table4|fig5|energy) fig="--figure outputs/reports/$$a.png";; esac; \
	  $(PYTHON) scripts/report.py $$a outputs/ --out outputs/reports/$$a.md --csv outputs/reports/$$a.csv $$fig > /dev/null || exit 1; \
	done; echo "wrote outputs/reports/{table2,table3,table4,table5,fig5,energy}.{md,csv} and the figures"

LINT_PATHS := bso tests scripts examples train.py eval.py setup.py

lint: install-dev  ## ruff check and ruff format --check (what CI runs before the tests); `ruff format` fixes the format
	$(PYTHON) -m ruff check $(LINT_PATHS)
	$(PYTHON) -m ruff format --check $(LINT_PATHS)

clean:  ## remove install stamps, caches and the latest-versions venv (keeps outputs/)
	rm -rf .make-*.stamp .pytest_cache .ruff_cache bso.egg-info build dist $(LATEST_VENV)

.PHONY: bench-memory-shd
bench-memory-shd: install  ## memory vs T at long T on the SHD shape (BPTT-latent / BSO / T-BSO, T=25..200, batch 32) -> benchmarks/results/memory_vs_T_shd.*
	$(PYTHON) scripts/bench/memory_vs_T.py --dataset shd $(ARGS)

mutate: export OMP_WAIT_POLICY ?= PASSIVE
mutate: install-dev  ## mutation score of the core: a seeded sample of mutants vs the fast and golden tests (15-30 min on 2 cores) -> benchmarks/results/mutation.*
	$(PYTHON) scripts/mutate.py $(ARGS)
