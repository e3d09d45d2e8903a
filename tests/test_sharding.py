"""Sharding properties: sharded == unsharded.

On 8 CPU devices (tests/sharding_check.py in a subprocess: the device count is fixed when jax
starts, and this pytest process runs on one device): one train step gives the same loss,
gradients and updated params on meshes (1,1,1), (8,1,1), (1,8,1), (2,2,2), (1,2,4); with
fsdp > 1, no param or optimizer-state leaf (of every optimizer) is whole on any device except
those the rules leave replicated by design, and each optimizer's copies of a param are sharded
as the param is; the shard_map cross-entropy over vocab-sharded logits equals the plain one in
value and gradient, ties and padded vocab included, and never all-gathers.
In this process: mesh shapes and their errors, the rules override, cluster detection.
"""

import os

import jax
import ml_collections
import numpy as np
import pytest

from llm_jax import config
from llm_jax import sharding

import helpers  # tests/helpers.py
import run_once  # tests/run_once.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "configs", "base.py")
# Logical axes a leaf may be whole with when fsdp > 1: they map to tensor (size 1 on a pure
# fsdp mesh) or do not divide it (n_kv_heads=2 on tensor=4). "embed" (fsdp) is on every
# matrix, embedding and norm/out-projection vector, so none of those may be whole.
TENSOR_ONLY = {"heads", "kv_heads", "head_dim", "mlp"}
D_MODEL = 32  # sharding_check.TINY's: the only axis of this length is "embed"


def _check_on_8_devices():
  return helpers.run_check_script("sharding_check.py", timeout=600)


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
  out = run_once.once(tmp_path_factory, "sharding_check", _check_on_8_devices)
  assert out["devices"] == 8
  return out


# --- 8 devices --------------------------------------------------------------------------------


def test_one_train_step_is_the_same_on_every_mesh(checked):
  steps = checked["steps"]
  assert set(steps) == {"1x1x1", "8x1x1", "1x8x1", "2x2x2", "1x2x4"}
  ref = steps["1x1x1"]
  for mesh, r in steps.items():
    assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5), mesh
    assert r["grad_ce"] == pytest.approx(ref["loss"], rel=1e-5), mesh
    assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), mesh
    assert r["init_diff"] == 0.0, mesh  # init is created sharded, and identical
    assert r["grad_diff"] <= 1e-5 * r["grad_scale"], mesh
    assert r["update_diff"] <= 1e-5, mesh


def _assert_may_be_whole(leaf):
  if leaf["logical"] is None:  # not a param's mirror: step counts, Muon's 3 NS coefficients
    assert int(np.prod(leaf["shape"])) <= 3, leaf
  elif leaf["shape"] == leaf["param_shape"]:
    # Biases over tensor-parallel axes only; never a matrix or anything over "embed".
    assert set(leaf["logical"]) <= TENSOR_ONLY and len(leaf["shape"]) <= 2, leaf
  else:  # Adafactor's factored moments or its [1] placeholders: no d_model axis (fsdp splits it)
    assert D_MODEL not in leaf["shape"], leaf


@pytest.mark.parametrize("mesh", ["1x8x1", "2x2x2", "1x2x4"])
def test_fsdp_leaves_are_never_whole_on_a_device(checked, mesh):
  r = checked["steps"][mesh]
  for kind in ("params", "opt_state"):
    for leaf in r["whole"][kind]:
      _assert_may_be_whole(leaf)
  if mesh == "2x2x2":  # tensor=2 divides every tensor axis: every param leaf is split
    assert r["whole"]["params"] == []
  whole = sum(int(np.prod(leaf["shape"])) for leaf in r["whole"]["params"])
  assert whole < 0.02 * r["n_params"], r["whole"]["params"]  # a few bias vectors at most
  # The unsharded mesh is the control: everything is whole there.
  ref = checked["steps"]["1x1x1"]
  assert len(ref["whole"]["params"]) == ref["n_leaves"]["params"]


@pytest.mark.parametrize("name", config.OPTIMIZERS)
def test_every_optimizers_state_shards_like_the_params(checked, name):
  for mesh in ("1x8x1", "1x2x4"):
    r = checked["optimizers"][f"{name} {mesh}"]
    for leaf in r["whole"]:
      _assert_may_be_whole(leaf)
    assert r["unlike_params"] == []  # every copy of a param is sharded as the param is
    real = [leaf for leaf in r["whole"] if int(np.prod(leaf["shape"])) > 1]  # not placeholders
    assert len(real) < r["n_leaves"] / 2, r  # the mesh does split the state
    if name == "adafactor":  # factored moments were there to check
      assert r["n_factored"] >= 10, r


def test_vocab_parallel_cross_entropy_equals_the_plain_one(checked):
  assert set(checked["ce"]) == {"1x1x8", "2x1x4", "2x2x2"}
  for mesh, r in checked["ce"].items():
    nll, z, correct, n = r["want"]
    assert correct >= 10 and n > 30  # the data exercise the argmax count and the weights
    np.testing.assert_allclose(r["got"], r["want"], rtol=2e-6, err_msg=mesh)
    assert r["got"][2] == correct and r["got"][3] == n, mesh  # counts are exact
    assert r["via_train"] == r["got"], mesh  # train.cross_entropy dispatches to it
    assert r["grad_diff"] <= 1e-6 * r["grad_scale"], mesh
    assert not r["all_gather"], (mesh, r["collectives"])


# --- this process -----------------------------------------------------------------------------


def _cfg(**kw):
  return ml_collections.ConfigDict({"mesh_shape": (-1, 1, 1), "dcn_mesh_shape": (1, 1, 1),
                                    "micro_batch_size": 8, **kw})


def test_mesh_shape_resolves_minus_one_and_dcn():
  # Three entries are (data, fsdp, tensor) with context 1.
  assert sharding.mesh_shape(_cfg(), 8) == (8, 1, 1, 1)
  assert sharding.mesh_shape(_cfg(mesh_shape=(1, -1, 2)), 8) == (1, 4, 2, 1)
  assert sharding.mesh_shape(_cfg(mesh_shape=(1, 2, 4)), 8) == (1, 2, 4, 1)
  assert sharding.mesh_shape(_cfg(mesh_shape=(1, 2, 1, -1)), 8) == (1, 2, 1, 4)
  # 4 hosts of 8 devices, data parallel across hosts, fsdp x tensor inside each.
  assert sharding.mesh_shape(_cfg(mesh_shape=(1, -1, 2), dcn_mesh_shape=(4, 1, 1)), 32) == (
      4, 4, 2, 1)
  assert sharding._shapes(_cfg(mesh_shape=(1, -1, 2), dcn_mesh_shape=(4, 1, 1)), 32) == (
      (1, 4, 2, 1), (4, 1, 1, 1))
  assert sharding.context_degree(_cfg(mesh_shape=(1, 2, 1, 4), dcn_mesh_shape=(1, 1, 1, 2))) == 8
  assert sharding.context_degree(_cfg(mesh_shape=(1, 2, 1, -1))) is None


@pytest.mark.parametrize("kw, n, match", [
    (dict(mesh_shape=(3, -1, 1)), 8, "not divisible by 3"),
    (dict(mesh_shape=(2, 2, 1)), 8, "uses 4 devices but 8"),
    (dict(dcn_mesh_shape=(3, 1, 1)), 8, "do not split into 3"),
])
def test_mesh_shape_errors_name_the_fix(kw, n, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(_cfg(**kw), n)


def test_make_mesh_uses_auto_axes_and_checks_dcn_against_the_hosts():
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh(_cfg(), devices)
  assert mesh.axis_names == sharding.MESH_AXES
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  # Two "slices" asked for, but every device is on one host and slice.
  with pytest.raises(ValueError, match="dcn_mesh_shape=\\(2, 1, 1\\) asks for 2"):
    sharding._hybrid_devices((1, 1, 1, 1), (2, 1, 1), devices * 2)


def test_micro_batch_must_split_over_data_and_fsdp(monkeypatch):
  monkeypatch.setattr(sharding, "_shapes", lambda cfg, n: ((2, 2, 1, 1), (1, 1, 1, 1)))
  with pytest.raises(ValueError, match="micro_batch_size=6 is not divisible by the data-parallel "
                                       "size data x fsdp = 4"):
    sharding.make_mesh(_cfg(micro_batch_size=6), jax.devices()[:1])


def test_logical_rules_override():
  assert sharding.logical_rules(_cfg()) == sharding.RULES
  cfg = config.load(BASE_CONFIG)
  assert sharding.logical_rules(cfg) == sharding.RULES  # no field yet, or an empty one
  rules = dict(sharding.logical_rules(_cfg(logical_axis_rules="vocab:none, embed:fsdp+tensor")))
  assert rules["vocab"] is None and rules["embed"] == ("fsdp", "tensor")
  assert rules["mlp"] == "tensor" and rules["batch"] == sharding.BATCH_AXES
  rules = dict(sharding.logical_rules(_cfg(logical_axis_rules=(("heads", None),))))
  assert rules["heads"] is None
  for bad, match in (("vocab", "not logical:mesh"), ("vocabulary:tensor", "logical one of"),
                     ("vocab:model", "mesh axes are")):
    with pytest.raises(ValueError, match=match):
      sharding.logical_rules(_cfg(logical_axis_rules=bad))


def test_vocab_parallel_applies_only_when_vocab_is_sharded():
  mesh = jax.sharding.AbstractMesh((2, 1, 4, 1), sharding.MESH_AXES)
  rules = sharding.RULES
  assert sharding.vocab_is_sharded((8, 16, 256), mesh, rules)
  assert not sharding.vocab_is_sharded((8, 16, 250), mesh, rules)  # 4 does not divide V
  assert not sharding.vocab_is_sharded((3, 16, 256), mesh, rules)  # nor 2 the batch
  assert not sharding.vocab_is_sharded((8, 16, 256), jax.sharding.AbstractMesh(
      (8, 1, 1, 1), sharding.MESH_AXES), rules)  # tensor = 1
  no_vocab = sharding.logical_rules(_cfg(logical_axis_rules="vocab:none"))
  assert not sharding.vocab_is_sharded((8, 16, 256), mesh, no_vocab)
  assert not sharding.vocab_is_sharded((8, 16, 256))  # no mesh in context


def test_fit_replicates_what_the_mesh_does_not_divide():
  mesh = jax.sharding.AbstractMesh((1, 2, 4, 1), sharding.MESH_AXES)
  P = jax.sharding.PartitionSpec
  assert sharding._fit(P("fsdp", "tensor", None), (32, 2, 8), mesh) == P("fsdp", None, None)
  assert sharding._fit(P(("fsdp", "tensor"),), (6,), mesh) == P("fsdp")
  assert sharding._fit(P(), (5,), mesh) == P(None)


SLURM = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="n[1-2]", SLURM_PROCID="0", SLURM_LOCALID="0")


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({**SLURM, "SLURM_NTASKS": "2"}, "slurm"),
    ({**SLURM, "SLURM_NTASKS": "1"}, None),  # one task: nothing to join
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, None),  # sbatch script body, not an srun step
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "mpi"),
])
def test_detect_cluster(monkeypatch, env, want):
  for k in list(os.environ):
    if k.startswith(("SLURM_", "TPU_", "MEGASCALE_", "OMPI_")):
      monkeypatch.delenv(k)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert sharding.detect_cluster() == want


def test_slurm_one_task_per_node_sees_all_its_gpus(monkeypatch):
  monkeypatch.delenv("JAX_LOCAL_DEVICE_IDS", raising=False)
  for k, v in dict(SLURM_NTASKS="2", SLURM_STEP_NUM_NODES="2", SLURM_GPUS_ON_NODE="4").items():
    monkeypatch.setenv(k, v)
  assert sharding._slurm_local_devices() == [0, 1, 2, 3]
  monkeypatch.setenv("SLURM_NTASKS", "8")  # one task per GPU: jax's own per-rank default
  assert sharding._slurm_local_devices() is None


def test_initialize_distributed_without_a_cluster_is_a_no_op(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(sharding, "detect_cluster", lambda: None)
  assert not sharding.initialize_distributed()
  assert not sharding.initialize_distributed(None, 1, 0)  # one process: nothing to join
  with pytest.raises(ValueError, match="--num_processes, --process_id missing"):
    sharding.initialize_distributed("127.0.0.1:1234")
  with pytest.raises(ValueError, match="--process_id=2 must be in"):
    sharding.initialize_distributed("127.0.0.1:1234", 2, 2)
  assert calls == []
  monkeypatch.setattr(sharding, "detect_cluster", lambda: "tpu")
  assert not sharding.initialize_distributed(mode="off")
  assert calls == []
  assert sharding.initialize_distributed()  # jax auto-detects the rest
  assert calls[-1]["coordinator_address"] is None and calls[-1]["num_processes"] is None
  assert sharding.initialize_distributed("10.0.0.1:8476", 4, 3)
  assert calls[-1]["coordinator_address"] == "10.0.0.1:8476" and calls[-1]["process_id"] == 3
