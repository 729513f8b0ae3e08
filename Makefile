# One-command setup, tests and demo. Everything runs inside .venv.
PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
TORCH      ?= torch==2.13.0
STAMP      := $(VENV)/.installed

.PHONY: setup test demo clean-demo

setup: $(STAMP)

# Re-run the install only when requirements.txt or the torch pin change.
$(STAMP): requirements.txt Makefile
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -r requirements.txt
	$(PY) -c "import torch, monai, h5py, SimpleITK, pydicom, skimage, medpy, skan, networkx, vtk, highdicom; print('setup ok: torch', torch.__version__)"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

demo: setup
	bash scripts/demo.sh

clean-demo:
	rm -rf data/demo checkpoint/phantom data/raw/phantom
