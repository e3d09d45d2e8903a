"""Sharded == unsharded, on 8 CPU devices; run by test_sharding.py as a subprocess.

The device count is fixed when jax starts, and the pytest process has already started jax on
one device, so these checks run here and print one JSON object that the tests assert on:

- "steps": per mesh shape, one train step's loss, the max |difference| of the gradients and of
  the init params from the (1, 1, 1) run's, and the leaves of params / optimizer state that some
  device holds whole (with their logical axes);
- "ce": per mesh, the vocab-parallel cross-entropy's four sums and gradient against the plain
  one, and whether its compiled program all-gathers anything;
- "optimizers": per optimizer and fsdp mesh, the optimizer-state leaves held whole and the
  copies of a param not sharded like it, from the shardings the init and the train step write
  the state in (nothing compiled: `check_steps(meshes, optimizer=...)` runs a real step).

    python tests/sharding_check.py   # prints the JSON
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import helpers  # noqa: E402

# Compile time dominates on CPU; LLVM's heavy optimisation buys nothing for these tiny programs
# (about 3x faster compiles). The comparisons are all within this one process.
helpers.use_fast_compile()

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from llm_jax import config  # noqa: E402
from llm_jax import sharding  # noqa: E402
from llm_jax import train  # noqa: E402

BASE_CONFIG = os.path.join(ROOT, "configs", "base.py")
# n_kv_heads=2 does not divide tensor=4: those leaves must fall back to replicated over tensor.
# vocab 200 pads to 256 (multiple 64): the last tensor shard of 4 holds padded ids.
TINY = dict(vocab_size=200, vocab_multiple=64, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
            max_seq_len=16, micro_batch_size=8, z_loss=1e-3, warmup_steps=0,
            lr_decay="constant", sample_every_eval=False)
MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
FSDP_MESHES = [(1, 8, 1), (1, 2, 4)]
# Adafactor factors every kernel with two axes of >= 16 here; qk_norm adds [head_dim] scales.
OPTIMIZER_FIELDS = dict(adafactor_min_dim_size_to_factor=16, qk_norm=True)
CE_MESHES = [(1, 1, 8), (2, 1, 4), (2, 2, 2)]


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _logical_axes(trainer):
  """keystr(param path) -> logical axis names, from the boxed abstract params."""
  dummy = jnp.zeros((1, trainer.cfg.block_size), jnp.int32)
  boxed = jax.eval_shape(lambda k: trainer.model.init(k, dummy), jax.random.key(0))["params"]
  specs = nn.get_partition_spec(boxed)
  flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
  return {jax.tree_util.keystr(p): tuple(s) for p, s in flat}


def _whole_leaves(tree, axes_of, shapes_of):
  """Leaves some device holds whole: (path, shape, logical axes of the param it follows, and
  whether it has that param's shape: Adafactor's factored moments drop one of its axes)."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if leaf.sharding.shard_shape(leaf.shape) == leaf.shape:
      key = jax.tree_util.keystr(path)
      param = next((k for k in axes_of if key.endswith(k)), None)
      out.append({"path": key, "shape": list(leaf.shape),
                  "logical": axes_of[param] if param else None,
                  "param_shape": list(shapes_of[param]) if param else None})
  return out


def _param_shapes(trainer):
  flat = jax.tree_util.tree_flatten_with_path(trainer.abstract_params)[0]
  return {jax.tree_util.keystr(p): tuple(s.shape) for p, s in flat}


def check_optimizer_shardings():
  """Per optimizer and fsdp mesh, the optimizer-state leaves some device holds whole, from the
  shardings the init and the train step write the state in (nothing compiled)."""
  out = {}
  for name in config.OPTIMIZERS:
    for shape in FSDP_MESHES:
      cfg = config.load(BASE_CONFIG, **TINY, **OPTIMIZER_FIELDS, mesh_shape=shape, optimizer=name)
      trainer = train.Trainer(cfg, total_steps=10, mesh=sharding.make_mesh(
          cfg, jax.devices()[:int(np.prod(shape))]))
      opt_state = trainer.abstract_state().opt_state
      shapes_of = _param_shapes(trainer)
      shardings_of = {jax.tree_util.keystr(p): sh for p, sh in
                      jax.tree_util.tree_flatten_with_path(trainer.param_shardings)[0]}
      unlike, n_factored, leaves = [], 0, jax.tree_util.tree_flatten_with_path(opt_state)[0]
      for path, leaf in leaves:
        key = jax.tree_util.keystr(path)
        param = next((k for k in shapes_of if key.endswith(k)), None)
        if param and leaf.shape == shapes_of[param]:  # a copy of the param: sharded like it
          if not leaf.sharding.is_equivalent_to(shardings_of[param], leaf.ndim):
            unlike.append(key)
        elif param and 1 < leaf.ndim + 1 == len(shapes_of[param]):
          n_factored += 1
      out[f"{name} {'x'.join(map(str, shape))}"] = {
          "whole": _whole_leaves(opt_state, _logical_axes(trainer), shapes_of),
          "unlike_params": unlike, "n_leaves": len(leaves), "n_factored": n_factored}
  return out


def check_steps(meshes=MESHES, **overrides):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, TINY["vocab_size"], size=(1, TINY["micro_batch_size"], 17))
  batch = {"inputs": tokens[..., :-1].astype(np.int32), "targets": tokens[..., 1:].astype(np.int32)}
  results, ref = {}, None
  for shape in meshes:
    cfg = config.load(BASE_CONFIG, **{**TINY, **overrides}, mesh_shape=shape)
    devices = jax.devices()[:int(np.prod(shape))]  # (1, 1, 1): one of the 8 devices
    trainer = train.Trainer(cfg, total_steps=10, mesh=sharding.make_mesh(cfg, devices))
    assert tuple(trainer.mesh.shape.values()) == sharding.full_shape(shape), trainer.mesh
    state = trainer.init_state(0)
    params0 = jax.device_get(state.params)
    axes_of = _logical_axes(trainer)
    shapes_of = _param_shapes(trainer)
    whole = {"params": _whole_leaves(state.params, axes_of, shapes_of),
             "opt_state": _whole_leaves(state.opt_state, axes_of, shapes_of)}
    grad_fn = trainer._in_context(jax.jit(lambda p, b, t=trainer: jax.value_and_grad(
        train.loss_fn, has_aux=True)(p, t.model, b, None, t.cfg.z_loss, True)), base=False)
    micro = sharding.global_batch({k: v[0] for k, v in batch.items()}, trainer.mesh)
    (_, ce), grads = grad_fn(state.params, micro)
    grads = jax.device_get(grads)
    state, out = trainer.train_step(state, batch)
    params1 = jax.device_get(state.params)
    r = {"loss": float(out["loss"]), "grad_ce": float(ce), "grad_norm": float(out["grad_norm"]),
         "whole": whole,
         "n_leaves": {"params": len(jax.tree.leaves(params0)),
                      "opt_state": len(jax.tree.leaves(state.opt_state))},
         "n_params": sum(int(np.size(x)) for x in jax.tree.leaves(params0))}
    if ref is None:
      ref = dict(params0=params0, grads=grads, params1=params1)
      r.update(init_diff=0.0, grad_diff=0.0, update_diff=0.0)
    else:
      r.update(init_diff=_max_diff(params0, ref["params0"]),
               grad_diff=_max_diff(grads, ref["grads"]),
               update_diff=_max_diff(params1, ref["params1"]))
    r["grad_scale"] = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref["grads"]))
    results["x".join(map(str, shape))] = r
  return results


def check_ce():
  rng = np.random.default_rng(1)
  B, T, V, real = 8, 6, 64, 40  # the last 24 ids are padding: 3 of 8 vocab shards hold no real id
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
  logits[..., real:] = -1e9
  logits[0, 0, [5, 33]] = 50.0  # a tie across shards: argmax takes the first index, 5
  logits[1, 2, [20, 21]] = 40.0  # a tie inside one shard
  targets = rng.integers(0, real, size=(B, T)).astype(np.int32)
  hit = rng.random((B, T)) < 0.5  # about half the targets are the argmax: "correct" counts them
  targets[hit] = np.argmax(logits, axis=-1)[hit]
  targets[0, 0], targets[1, 2], targets[0, 1] = 5, 21, real - 1  # first tie wins; second loses
  weights = (rng.random((B, T)) > 0.2).astype(np.float32)
  weights[0, 0] = weights[1, 2] = 1.0
  z_loss = 1e-2

  def mean_loss(ce_fn):
    def f(lg):
      nll, z, _, n = ce_fn(lg, targets, weights, z_loss)
      return (nll + z) / n
    return f

  plain = jax.jit(lambda lg: train.cross_entropy(lg, targets, weights, z_loss))
  want = [float(x) for x in plain(logits)]
  want_grad = np.asarray(jax.jit(jax.grad(mean_loss(train.cross_entropy)))(logits))
  out = {}
  for shape in CE_MESHES:
    mesh = jax.make_mesh(sharding.full_shape(shape), sharding.MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    sh = NamedSharding(mesh, P(sharding.BATCH_AXES, None, "tensor"))
    with nn.logical_axis_rules(sharding.RULES), jax.set_mesh(mesh):
      assert sharding.vocab_is_sharded(logits.shape)
      fn = jax.jit(lambda lg: sharding.vocab_parallel_cross_entropy(lg, targets, weights, z_loss),
                   in_shardings=sh)
      got = [float(x) for x in fn(jax.device_put(logits, sh))]
      hlo = fn.lower(jax.device_put(logits, sh)).compile().as_text()
      grad = np.asarray(jax.jit(jax.grad(mean_loss(sharding.vocab_parallel_cross_entropy)),
                                in_shardings=sh)(jax.device_put(logits, sh)))
      # The dispatch inside train.cross_entropy takes the same path under this context.
      via_train = [float(x) for x in jax.jit(
          lambda lg: train.cross_entropy(lg, targets, weights, z_loss), in_shardings=sh)(
              jax.device_put(logits, sh))]
    out["x".join(map(str, shape))] = {
        "want": want, "got": got, "via_train": via_train,
        "grad_diff": float(np.max(np.abs(grad - want_grad))),
        "grad_scale": float(np.max(np.abs(want_grad))),
        "all_gather": "all-gather" in hlo, "collectives": sorted(
            {op for op in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")
             if op in hlo})}
  return out


if __name__ == "__main__":
  print(json.dumps({
      "devices": jax.device_count(), "steps": check_steps(), "ce": check_ce(),
      "optimizers": check_optimizer_shardings()}))
