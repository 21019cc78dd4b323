# Two entry points for a fresh Linux machine with only python3:
#   make demo   set up .venv, then train and evaluate on the embedded synthetic corpus
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch (or a package that pulls it) downloads gigabytes of CUDA.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev,plot,hf]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) train.py --softmax full --preset tiny --out runs/demo-full --max-steps 600
	$(PY) evaluate.py runs/demo-full/best.pt --split test --json runs/demo-full/eval-test.json

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
