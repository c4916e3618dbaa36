# Two commands do all the set-up on a fresh machine:
#   make demo   # the whole BAM method on tiny models, on CPU (under 30 minutes on 2 cores)
#   make test   # the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist: one worker per core (at most 4, tests/conftest.py), each taking whole test files, in the
# order tests/conftest.py sorts them (longest first)
PYTEST_PARALLEL ?= -n auto --dist loadfile --no-loadscope-reorder

.PHONY: demo reproduce test test-quick lint bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: here it resolves to the CPU build; unpinned, pip pulls GBs of CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(STAMP)
	$(PY) examples/bam_demo/run.py

reproduce: $(STAMP)  # the paper's comparisons with seeds and error bars -> examples/reproduce/REPORT.md
	$(PY) examples/reproduce/run.py --report-dir examples/reproduce

test: $(STAMP) lint
	@bash tools/ci/install_slurm.sh  # Slurm + MUNGE for tests/e2e/test_slurm.py, where it can
	@bash tools/ci/install_docker.sh  # docker.io + debootstrap for tests/e2e/test_docker.py, where it can
	BAM_TESTS_STRICT=1 $(PY) -m pytest tests $(PYTEST_PARALLEL) --durations=30

test-quick: $(STAMP) lint  # while developing: everything but the long end-to-end tests (@pytest.mark.e2e)
	$(PY) -m pytest tests $(PYTEST_PARALLEL) -m "not e2e" --megatron-core-tier=changed

lint: $(STAMP)  # one style, configured in ruff.toml: `ruff format .` fixes what this reports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	for script in bench/*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info
