"""Test set-up: CPU only, whatever accelerator the machine has."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
