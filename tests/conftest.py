"""Test set-up: CPU only, whatever accelerator the machine has; the opt-in `hf` marker."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tiny models compile for much longer than they run: LLVM's cheap passes (helpers.FAST_COMPILE).
import helpers  # tests/helpers.py  pylint: disable=g-import-not-at-top,wrong-import-position

helpers.use_fast_compile()


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "hf: live check against the installed transformers + torch (opt in: pytest -m "
      "hf; see tests/fixtures/make_hf_fixtures.py)")
  config.addinivalue_line(
      "markers", "cuda_compile: compiles for NVIDIA GPU targets through JAX's CUDA plugin "
      "(make test-cuda-compile; skipped where the plugin is not installed)")


def pytest_collection_modifyitems(config, items):
  if "hf" in (config.option.markexpr or ""):
    return
  skip = pytest.mark.skip(reason="live Hugging Face test: run with pytest -m hf")
  for item in items:
    if item.get_closest_marker("hf") is not None:
      item.add_marker(skip)
