"""Context parallelism: a sequence sharded over the mesh's context axis trains as the unsharded one.

On 8 CPU devices (tests/context_parallel_check.py in a subprocess): the loss and every gradient
with context parallelism 2, 4 and 8 ways, all-gather and ring, with and without packed
segments, with and without load balancing, beside fsdp, tensor and data parallelism, equal the
(1, 1, 1, 1) run's to float32 round-off; the ring's compiled step passes K/V round with
collective-permute and the all-gather's gathers; a run saved on context 4 resumes on context 2
(orbax restores into the new mesh's shardings) and ends where the uninterrupted run does; XLA's
per-device temporary memory of a train step falls as ~1/C.
In this process: the load-balanced layout, and the mesh's -1 resolving to a context degree that
the sequence cannot take.
"""

import os

import jax
import ml_collections
import numpy as np
import pytest

from llm_jax import context_parallel
from llm_jax import sharding

import helpers  # tests/helpers.py
import run_once  # tests/run_once.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
  out = run_once.once(tmp_path_factory, "context_parallel_check",
                      lambda: helpers.run_check_script("context_parallel_check.py", timeout=1200))
  assert out["devices"] == 8
  return out


# --- 8 devices --------------------------------------------------------------------------------


def test_loss_and_every_gradient_equal_the_unsharded_runs(checked):
  grads = checked["grads"]
  for degree in (2, 4, 8):  # the cases cover each degree, implementation and packing
    for impl in ("all_gather", "ring"):
      for packed in (False, True):
        assert f"{impl} 1x1x1x{degree} packed={packed} balanced=True" in grads
  assert any("balanced=False" in k for k in grads) and any("x4x2 " in k for k in grads)
  assert sum(k.endswith("window=5") for k in grads) == 2  # a sliding window on both paths
  for case, r in grads.items():
    assert r["n_leaves"] >= 10, case
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=2e-6), case
    assert r["grad_diff"] <= 2e-5 * r["grad_scale"], (case, r)


def test_the_ring_passes_blocks_round_and_the_all_gather_gathers(checked):
  for case, r in checked["grads"].items():
    if case.startswith("ring"):
      assert r["collective_permute"], case
    else:
      assert r["all_gather"], case


def test_a_run_resumes_across_a_change_of_the_context_degree(checked):
  r = checked["resume"]
  assert r["resumed_at"] == 2
  assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1, "context": 2}
  np.testing.assert_allclose(r["got"], r["want"], rtol=1e-5)
  assert r["param_diff"] <= 1e-5
  assert any("fsdp" in s for s in r["param_specs"])  # restored into the new mesh's shardings


def test_activation_memory_per_device_falls_as_one_over_the_context_degree(checked):
  mem = checked["memory"]
  for impl in ("all_gather", "ring"):
    temp = {c: mem[f"{impl} {c}"]["temp"] for c in (1, 2, 4, 8)}
    for c in (2, 4, 8):
      # ~1/C of the unsharded step's: the weights' gradients and update do not shrink, the
      # ring's scores shrink faster (T/C x S/C per step where all-gather keeps T/C x S).
      assert temp[c] <= 1.5 * temp[1] / c, (impl, temp)
      assert temp[c] <= 0.65 * temp[c // 2], (impl, temp)
    assert len({mem[f"{impl} {c}"]["args"] for c in (1, 2, 4, 8)}) == 1  # weights replicated


# --- this process -----------------------------------------------------------------------------


@pytest.mark.parametrize("t, degree", [(8, 2), (32, 4), (32, 8), (48, 3)])
def test_load_balanced_layout_gives_each_device_a_front_and_a_back_chunk(t, degree):
  order = context_parallel.load_balanced_order_T(t, degree)
  assert sorted(order) == list(range(t))  # a permutation
  c = t // (2 * degree)
  for i, shard in enumerate(order.reshape(degree, 2 * c)):
    assert list(shard[:c]) == list(range(i * c, (i + 1) * c))
    back = 2 * degree - 1 - i
    assert list(shard[c:]) == list(range(back * c, (back + 1) * c))
    # Causal work is even: every shard's queries see the same number of (query, key) pairs.
    assert sum(shard + 1) == sum(order.reshape(degree, 2 * c)[0] + 1)


def test_layout_applies_only_under_a_context_mesh():
  assert context_parallel.layout(16, True) is None  # no mesh in context
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.AbstractMesh((1, 1, 1, 4), sharding.MESH_AXES)
  with nn.logical_axis_rules(sharding.RULES), jax.sharding.use_abstract_mesh(mesh):
    order, inverse = context_parallel.layout(16, True)
    assert list(order[inverse]) == list(range(16))
    assert list(context_parallel.layout(16, False)[0]) == list(range(16))
    assert context_parallel.layout(12, True) is None  # 8 chunks do not split 12 tokens
  with nn.logical_axis_rules(sharding.logical_rules(ml_collections.ConfigDict(
      {"logical_axis_rules": "length:none"}))), jax.sharding.use_abstract_mesh(mesh):
    assert context_parallel.layout(16, True) is None  # the rules keep the sequence whole


def test_a_minus_one_resolving_to_a_context_the_sequence_cannot_take_is_refused(monkeypatch):
  from llm_jax import config  # pylint: disable=g-import-not-at-top
  cfg = config.load(os.path.join(ROOT, "configs", "base.py"), mesh_shape=(1, 1, 1, -1),
                    block_size=20, micro_batch_size=1)
  monkeypatch.setattr(sharding, "_shapes", lambda c, n: ((1, 1, 1, 4), (1, 1, 1, 1)))
  with pytest.raises(ValueError, match="block_size=20 does not split over context parallelism 4"):
    sharding.make_mesh(cfg, jax.devices()[:1])
