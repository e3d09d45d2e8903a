"""Shared test helpers."""

import jax
import jax.numpy as jnp
import numpy as np


def random_params(shapes, seed=0, std=0.05):
  """Random params of the given abstract shapes, drawn in numpy (no init compile).

  Norm scales are ones and biases zeros; other leaves are normal with `std`, a number or a
  function (key-path string, shape) -> number. New buffers each call (train steps donate them).
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return jnp.ones(s.shape, s.dtype)
    if name.endswith("['bias']"):
      return jnp.zeros(s.shape, s.dtype)
    sd = std(name, s.shape) if callable(std) else std
    return jnp.asarray(sd * rng.normal(size=s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def assert_bitwise_equal(a, b):
  """Two trees of arrays have the same structure, dtypes and values, to the bit."""
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and np.array_equal(x, y)
