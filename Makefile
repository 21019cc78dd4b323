# Two entry points for a fresh Linux machine with only python3:
#   make demo   set up .venv, then train the full and the Hebbian softmax on the embedded corpus and
#               print one table of bucketed test perplexity, each plain and + cache + MbPA (and a chart)
#   make test   set up .venv, then check the import layers and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: setup demo test compile-check bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch (or a package that pulls it) downloads gigabytes of CUDA.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev,plot,tensorboard,hf,knn]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m lmmem.experiments.demo --out runs/demo

test: setup
	$(VENV)/bin/lint-imports  # the import layers of docs/architecture.md (pyproject.toml)
	$(PY) -m pytest -q

# every shipped Triton kernel compiled for sm_80 / sm_90a (no GPU needed), under the pinned triton
# and triton 3.6.0 (cached in .venv-triton36); see benchmarks/compile_check.sh
compile-check: setup
	PYTHON=$(PY) bash benchmarks/compile_check.sh

clean:
	rm -rf $(VENV) .venv-triton36 runs
