"""Device mesh, logical axis rules and the shardings of params, optimizer state and batches.

The model names every parameter axis logically ("embed", "mlp", ...); the rules below map those
names onto mesh axes (data, fsdp, tensor). Changing a parallelism strategy is changing a rule.
"""

import math

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every data-parallel axis

# Logical axis -> mesh axis. "embed" over fsdp gives ZeRO-3 style sharding of params and optimizer
# state; "mlp", "heads", "kv_heads" and "vocab" over tensor give Megatron-style tensor parallelism.
RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
)


def mesh_shape(cfg, n_devices: int) -> tuple[int, ...]:
  """Resolves cfg.mesh_shape's -1 against the device count, with an error naming the fix."""
  shape = [int(s) for s in cfg.mesh_shape]
  dcn = [int(s) for s in cfg.dcn_mesh_shape]
  shape = [s * d if s != -1 else -1 for s, d in zip(shape, dcn)]
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % known:
      raise ValueError(f"mesh_shape={tuple(cfg.mesh_shape)} x dcn_mesh_shape={tuple(dcn)}: "
                       f"{n_devices} devices are not divisible by {known}; change mesh_shape")
    shape[shape.index(-1)] = n_devices // known
  if math.prod(shape) != n_devices:
    raise ValueError(f"mesh_shape={tuple(cfg.mesh_shape)} x dcn_mesh_shape={tuple(dcn)} uses "
                     f"{math.prod(shape)} devices but {n_devices} are present; use -1 for one axis")
  return tuple(shape)


def make_mesh(cfg, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  # Auto axes: Linen's logical constraints are assertions under Explicit axes (jax >= 0.11 default).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def data_parallel_size(mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def param_shardings(abstract_boxed_params, mesh):
  """NamedShardings for params given the boxed (LogicallyPartitioned) abstract params."""
  specs = nn.get_partition_spec(abstract_boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def opt_state_shardings(tx, abstract_params, params_shardings, mesh):
  """Optimizer-state shardings that follow the params (zeros don't inherit input sharding)."""
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), params_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def batch_sharding(mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  spec = [None] * ndim
  spec[batch_axis] = BATCH_AXES
  return NamedSharding(mesh, P(*spec))


def global_batch(local: dict, mesh, batch_axis: int = 0) -> dict:
  """Each process's numpy batch shard -> global jax.Arrays sharded over the data axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, batch_axis),
                                                    np.asarray(v))
          for k, v in local.items()}
