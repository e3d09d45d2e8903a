"""Device mesh, logical axis rules, the shardings of params, optimizer state and batches, the
vocab-parallel cross-entropy (shard_map) and multi-host start-up.

The model names every parameter and activation axis logically ("embed", "mlp", "vocab", ...);
`logical_rules(cfg)` maps those names onto the mesh axes (data, fsdp, tensor, context). Changing
a parallelism strategy is changing a rule (`--config.logical_axis_rules`), never the model.

Mesh. `mesh_shape` is the devices along (data, fsdp, tensor, context) inside one slice or host
(ICI/NVLink), `dcn_mesh_shape` the slices or hosts along the same axes (the slow data-centre
network); the mesh is their product. Put only data (or fsdp) across the DCN: tensor parallelism
needs fast links. Three entries (data, fsdp, tensor) are accepted and mean context 1. The context
axis splits the activations' sequence ("length"); attention over it is context_parallel.py's.

Cross-entropy. When the vocab axis is sharded (tensor > 1 under the default rules), XLA's
partitioner would all-gather the [B, T, V] logits to take the logsumexp; the shard_map version
combines per-shard maxima, sums of exponentials and target logits with pmax/psum instead, so the
logits never exist whole anywhere (V is the biggest axis of a small model's activations).
"""

import logging
import math
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from llm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor", "context")
CONTEXT_AXIS = "context"
BATCH_AXES = ("data", "fsdp")  # the batch is split over every data-parallel axis

# Logical axis -> mesh axis (None: replicated). "embed" over fsdp gives ZeRO-3 style sharding of
# params and optimizer state (each device keeps 1/fsdp of every matrix, gathered just in time);
# "mlp", "heads", "kv_heads" and "vocab" over tensor give Megatron-style tensor parallelism.
# Activations use "batch", "length" and "embed"/"vocab": an axis already used by an earlier
# name in the same array (fsdp by "batch") is skipped, so activations are not split over embed.
# "length" over context shards the activations over the sequence (context parallelism); no
# parameter has a length axis, so the context axis holds the weights replicated.
RULES = (
    ("batch", BATCH_AXES),
    ("length", CONTEXT_AXIS),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
)
LOGICAL_AXES = tuple(name for name, _ in RULES)


def _parse_rules(value) -> list[tuple[str, object]]:
  """`logical_axis_rules` -> [(logical, mesh axes)]. A string "vocab:none,embed:fsdp+tensor" or
  a sequence of (logical, mesh) pairs; mesh is an axis, axes joined by '+', or none/'' (replicated).
  """
  if isinstance(value, str):
    pairs = []
    for item in filter(None, (s.strip() for s in value.split(","))):
      name, sep, target = item.partition(":")
      if not sep:
        raise UserError(f"logical_axis_rules={value!r}: entry {item!r} is not logical:mesh "
                         f"(e.g. 'vocab:none,embed:fsdp+tensor')")
      target = target.strip()
      pairs.append((name.strip(), None if target.lower() in ("", "none") else
                    tuple(target.split("+")) if "+" in target else target))
  else:
    pairs = [tuple(p) for p in value]
  for pair in pairs:
    if len(pair) != 2 or pair[0] not in LOGICAL_AXES:
      raise UserError(f"logical_axis_rules: {pair!r} must be (logical, mesh) with logical one of "
                       f"{', '.join(LOGICAL_AXES)}")
    target = pair[1]
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    if any(a not in MESH_AXES for a in axes):
      raise UserError(f"logical_axis_rules: {pair!r} maps to {target!r}; mesh axes are "
                       f"{', '.join(MESH_AXES)} (join several with '+', or none)")
  return pairs


def logical_rules(cfg=None) -> tuple:
  """RULES with `cfg.logical_axis_rules` (if the config has the field) replacing the named
  entries, e.g. "vocab:none" to keep the logits whole, "embed:fsdp+tensor" for 2-D weight sharding.
  """
  override = cfg.get("logical_axis_rules") if cfg is not None else None
  if not override:
    return RULES
  merged = dict(RULES)
  for name, target in _parse_rules(override):
    merged[name] = target
  return tuple(merged.items())


# ------------------------------------------------------------------------------------- Mesh


def full_shape(shape) -> tuple[int, ...]:
  """A mesh_shape / dcn_mesh_shape as one entry per MESH_AXES: (data, fsdp, tensor) -> context 1."""
  shape = tuple(int(s) for s in shape)
  return shape + (1,) * (len(MESH_AXES) - len(shape)) if len(shape) == 3 else shape


def context_degree(cfg) -> int | None:
  """Devices along the context axis (ici x dcn), or None while mesh_shape's -1 sits there."""
  ici, dcn = full_shape(cfg.mesh_shape), full_shape(cfg.dcn_mesh_shape)
  i = MESH_AXES.index(CONTEXT_AXIS)
  return None if -1 in (ici[i], dcn[i]) else ici[i] * dcn[i]


def _shapes(cfg, n_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ici shape per slice/host, dcn shape) with mesh_shape's -1 resolved against n_devices."""
  ici = list(full_shape(cfg.mesh_shape))
  dcn = list(full_shape(cfg.dcn_mesh_shape))
  n_dcn = math.prod(dcn)
  where = (f"mesh_shape={tuple(cfg.mesh_shape)} x dcn_mesh_shape={tuple(dcn)}")
  if n_devices % n_dcn:
    raise UserError(f"{where}: {n_devices} devices do not split into {n_dcn} slices/hosts; fix "
                     f"dcn_mesh_shape (its product is the number of slices or hosts)")
  per_slice = n_devices // n_dcn
  known = math.prod(s for s in ici if s != -1)
  if -1 in ici:
    if per_slice % known:
      raise UserError(f"{where}: {per_slice} devices per slice/host are not divisible by "
                       f"{known}; change mesh_shape")
    ici[ici.index(-1)] = per_slice // known
  if math.prod(ici) != per_slice:
    raise UserError(f"{where} uses {math.prod(ici) * n_dcn} devices but {n_devices} are "
                     f"present; use -1 for one axis of mesh_shape")
  return tuple(ici), tuple(dcn)


def mesh_shape(cfg, n_devices: int) -> tuple[int, ...]:
  """The global mesh shape (mesh_shape x dcn_mesh_shape, -1 resolved), with an error naming the fix."""
  ici, dcn = _shapes(cfg, n_devices)
  return tuple(i * d for i, d in zip(ici, dcn))


def _hybrid_devices(ici, dcn, devices):
  """Device array for a multi-slice / multi-host mesh: ICI axes inside each granule (a TPU slice,
  else a process), DCN axes across granules."""
  n_dcn = math.prod(dcn)
  slices = {getattr(d, "slice_index", None) for d in devices}
  by_slice = None not in slices and len(slices) == n_dcn
  if not by_slice and len({d.process_index for d in devices}) != n_dcn:
    raise UserError(f"dcn_mesh_shape={dcn} asks for {n_dcn} slices/hosts but the devices come from "
                     f"{len(slices)} slice(s) and {len({d.process_index for d in devices})} "
                     f"process(es); set dcn_mesh_shape to match (or (1, 1, 1) on one host)")
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice,
                                              allow_split_physical_axes=True)


def make_mesh(cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor, context) mesh of cfg over `devices` (default: every device of every
  process).

  Also checks that micro_batch_size splits over the data-parallel axes, so a bad combination is
  one message before anything compiles.
  """
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = _shapes(cfg, len(devices))
  shape = tuple(i * d for i, d in zip(ici, dcn))
  mb = cfg.get("micro_batch_size") if hasattr(cfg, "get") else None
  dp = shape[0] * shape[1]
  if mb is not None and mb % dp:
    raise UserError(f"micro_batch_size={mb} is not divisible by the data-parallel size "
                     f"data x fsdp = {dp} of mesh {dict(zip(MESH_AXES, shape))}: set "
                     f"--config.micro_batch_size to a multiple of {dp} or change mesh_shape")
  context = shape[MESH_AXES.index(CONTEXT_AXIS)]
  if context > 1 and all(hasattr(cfg, "get") and cfg.get(f) is not None for f in (
      "block_size", "context_load_balance", "use_flash_attention", "context_parallel_impl")):
    from llm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    problems = config_lib.context_problems(cfg, context)
    if problems:  # the -1 of mesh_shape resolved to this context degree
      raise UserError(f"mesh {dict(zip(MESH_AXES, shape))}: {problems[0]}")
  # Auto axes: Linen's logical constraints are assertions under Explicit axes (jax >= 0.11 default).
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn) > 1:
    return jax.sharding.Mesh(_hybrid_devices(ici, dcn, devices), MESH_AXES, axis_types=axis_types)
  return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def data_parallel_size(mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


# ------------------------------------------------------------------------------- Shardings


def _fit(spec: P, shape, mesh) -> P:
  """spec with the mesh axes that do not divide their dimension dropped (that part replicated).

  E.g. 2 kv heads on tensor=4 stay whole over tensor instead of failing to compile.
  """
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def param_shardings(abstract_boxed_params, mesh, rules=RULES):
  """NamedShardings for params given the boxed (LogicallyPartitioned) abstract params."""
  specs = nn.get_partition_spec(abstract_boxed_params)
  shapes = nn.meta.unbox(abstract_boxed_params)
  mesh_specs = jax.tree.map(lambda s: nn.logical_to_mesh_axes(tuple(s), rules), specs,
                            is_leaf=lambda x: isinstance(x, P))
  dropped = []

  def shard(spec, leaf):
    fitted = _fit(spec, leaf.shape, mesh)
    if fitted != spec:
      dropped.append(f"{leaf.shape} {spec} -> {fitted}")
    return NamedSharding(mesh, fitted)

  out = jax.tree.map(shard, mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))
  if dropped:
    logging.info("replicated where the mesh does not divide the dimension: %s", "; ".join(dropped))
  return out


def opt_state_shardings(tx, abstract_params, params_shardings, mesh):
  """Optimizer-state shardings that follow the params (zeros don't inherit input sharding).

  A state leaf that mirrors a param (its key path ends with the param's: Adam's moments, Muon's
  and SGD's momentum, schedule-free's z, MultiSteps' accumulator) takes the param's sharding.
  Adafactor's factored moments are the param with one axis averaged away: they keep the mesh
  axes of the others. Everything else (step counts, placeholders) is replicated. Matching paths
  rather than optax.tree_map_params, which needs an init that accepts a placeholder for the
  params (optax.partition's labels, as Muon uses, do not).
  """
  replicated = NamedSharding(mesh, P())
  flat = jax.tree_util.tree_flatten_with_path(params_shardings)[0]
  shapes = jax.tree.leaves(abstract_params)
  params = {jax.tree_util.keystr(path): (tuple(s.shape), tuple(sh.spec) + (None,) * (
      len(s.shape) - len(sh.spec))) for (path, sh), s in zip(flat, shapes)}

  def shard(path, leaf):
    key = jax.tree_util.keystr(path)
    match = max((k for k in params if key.endswith(k)), key=len, default=None)
    if match is None:
      return replicated
    shape, spec = params[match]
    if leaf.shape == shape:
      return NamedSharding(mesh, P(*spec))
    for i in range(len(shape)):
      if shape[:i] + shape[i + 1:] == leaf.shape:
        return NamedSharding(mesh, _fit(P(*(spec[:i] + spec[i + 1:])), leaf.shape, mesh))
    return replicated

  return jax.tree_util.tree_map_with_path(shard, jax.eval_shape(tx.init, abstract_params))


def with_shardings(shapes, shardings):
  """Abstract arrays (shape, dtype) carrying `shardings`: jit/orbax targets, nothing allocated."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def batch_sharding(mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  spec = [None] * ndim
  spec[batch_axis] = BATCH_AXES
  return NamedSharding(mesh, P(*spec))


def global_batch(local: dict, mesh, batch_axis: int = 0) -> dict:
  """Each process's numpy batch shard -> global jax.Arrays sharded over the data axes.

  Process p's rows become rows [p * b, (p + 1) * b) of the global batch: the data pipeline gives
  each process a disjoint share of every step (data.py), in process order.
  """
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, batch_axis),
                                                    np.asarray(v))
          for k, v in local.items()}


# ------------------------------------------------------------ Vocab-parallel cross-entropy


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _vocab_plan(shape_BTV, mesh=None, rules=None):
  """(logits spec, vocab mesh axes, other mesh axes) when the vocab-parallel CE applies, else None.

  It applies when the mesh in context (jax.set_mesh) and the rules (nn.logical_axis_rules, or
  `rules`) shard "vocab" over axes of total size > 1 that divide V, and the batch axes divide B.
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh is None or mesh.empty:
    return None
  rules = nn.get_logical_axis_rules() if rules is None else rules
  if not rules:
    return None
  spec = nn.logical_to_mesh_axes(("batch", "length", "vocab"), rules)
  b_axes, t_axes, v_axes = (_axes(e) for e in spec)
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  if (size(v_axes) <= 1 or shape_BTV[-1] % size(v_axes) or shape_BTV[0] % size(b_axes)
      or shape_BTV[1] % size(t_axes)):
    return None
  return spec, v_axes, b_axes + t_axes


def context_spec(logical_axes, shape) -> P | None:
  """The mesh PartitionSpec of an activation with these logical axes under the mesh and rules in
  context (jax.set_mesh + nn.logical_axis_rules), axes that do not divide dropped; None outside a
  multi-device mesh. For shard_map around kernels XLA cannot partition (Pallas attention)."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh is None or mesh.empty or mesh.size == 1 or not rules:
    return None
  return _fit(P(*nn.logical_to_mesh_axes(tuple(logical_axes), rules)), shape, mesh)


def vocab_is_sharded(shape_BTV, mesh=None, rules=None) -> bool:
  """Whether `vocab_parallel_cross_entropy` applies to logits of this shape in this context."""
  return _vocab_plan(shape_BTV, mesh, rules) is not None


def vocab_parallel_cross_entropy(logits_BTV, targets_BT, weights_BT, z_loss: float = 0.0,
                                 mesh=None, rules=None):
  """train.cross_entropy's (nll_sum, z_sum, correct_sum, weight_sum) over vocab-sharded logits.

  Each device holds logits [b, t, V/n]; only [b, t] statistics cross the network: the global max
  (pmax), the sum of exp(logit - max) (psum), the target's logit (psum; zero on the shards that
  do not hold it) and the first index attaining the global max (pmin), as jnp.argmax picks it.
  Padded vocab entries (logit -1e9) contribute exp(-1e9 - max) = 0 here as in the plain version.
  Call under jax.set_mesh + nn.logical_axis_rules (or pass mesh and rules).
  """
  plan = _vocab_plan(logits_BTV.shape, mesh, rules)
  if plan is None:
    raise ValueError(f"vocab_parallel_cross_entropy: logits {logits_BTV.shape} are not "
                     f"vocab-sharded by the mesh and rules in context")
  spec, v_axes, other_axes = plan
  v_name = v_axes[0] if len(v_axes) == 1 else v_axes

  def local(logits, targets, weights):
    logits = logits.astype(jnp.float32)
    v_local = logits.shape[-1]
    offset = jax.lax.axis_index(v_name) * v_local
    # The max only shifts the exponent; its gradient cancels, so it is taken without one.
    m_loc = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    m = jax.lax.pmax(m_loc, v_name)
    lse = m + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1), v_name))
    t_local = targets - offset
    mine = (t_local >= 0) & (t_local < v_local)
    t_logit = jnp.take_along_axis(logits, jnp.clip(t_local, 0, v_local - 1)[..., None],
                                  axis=-1)[..., 0]
    t_logit = jax.lax.psum(jnp.where(mine, t_logit, 0.0), v_name)
    first = jnp.where(m_loc == m, jnp.argmax(logits, axis=-1) + offset,
                      jnp.iinfo(jnp.int32).max).astype(jnp.int32)
    predicted = jax.lax.pmin(first, v_name)
    sums = (jnp.sum((lse - t_logit) * weights), jnp.sum(z_loss * jnp.square(lse) * weights),
            jnp.sum((predicted == targets) * weights), jnp.sum(weights))
    return jax.lax.psum(sums, other_axes) if other_axes else sums

  row_spec = P(spec[0], spec[1])
  kw = {} if mesh is None else {"mesh": mesh}
  return jax.shard_map(local, in_specs=(spec, row_spec, row_spec), out_specs=(P(),) * 4, **kw)(
      logits_BTV, targets_BT.astype(jnp.int32), weights_BT.astype(jnp.float32))


# ------------------------------------------------------------------------------ Multi-host


def _int_env(name: str, default: int = 0) -> int:
  try:
    return int(os.environ.get(name, default))
  except ValueError:
    return default


def detect_cluster() -> str | None:
  """The multi-process environment this process runs in, if it needs jax.distributed: 'slurm',
  'tpu', 'mpi', or None (one process; nothing to initialise)."""
  env = os.environ
  # srun sets these per task; only a step of more than one task is a multi-process job.
  if (all(v in env for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID",
                             "SLURM_LOCALID")) and _int_env("SLURM_NTASKS", 1) > 1):
    return "slurm"
  hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
  if (len([h for h in hosts.split(",") if h.strip()]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env
      or _int_env("MEGASCALE_NUM_SLICES", 1) > 1):
    return "tpu"
  if _int_env("OMPI_COMM_WORLD_SIZE", 1) > 1:
    return "mpi"
  return None


def _slurm_local_devices() -> list[int] | None:
  """All of a node's GPUs when srun runs one task per node (jax would otherwise give each task
  only the GPU numbered by its local rank, for one task per GPU)."""
  if "JAX_LOCAL_DEVICE_IDS" in os.environ:
    return None  # jax reads it itself
  nodes = _int_env("SLURM_STEP_NUM_NODES", _int_env("SLURM_NNODES", 1))
  gpus = _int_env("SLURM_GPUS_ON_NODE", 0)
  if nodes and _int_env("SLURM_NTASKS", 1) == nodes and gpus > 1:
    return list(range(gpus))
  return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           mode: str = "auto", timeout_s: int = 300) -> bool:
  """Starts JAX's multi-controller runtime when this run spans several processes.

  Explicit coordinator_address/num_processes/process_id (the --flags of main.py) are used as
  given. Otherwise mode "auto" initialises only inside a detected multi-process environment
  (`detect_cluster`: SLURM srun steps of > 1 task, multi-host TPU VMs, Open MPI), letting jax
  auto-detect the rest; "on" always initialises (jax's own detection, e.g. the TPU VM metadata
  server: what launch.sh tpu passes); "off" never does. Must run before anything touches a jax
  device. Returns whether it initialised.
  """
  explicit = coordinator_address is not None or num_processes is not None or process_id is not None
  if mode == "off" and not explicit:
    return False
  if explicit:
    if num_processes == 1:
      return False
    missing = [n for n, v in (("--coordinator_address", coordinator_address),
                              ("--num_processes", num_processes), ("--process_id", process_id))
               if v is None]
    if missing:
      raise UserError(f"multi-host flags: {', '.join(missing)} missing; give all three "
                       f"(or none, where SLURM or a TPU VM pod is detected automatically)")
    if not 0 <= process_id < num_processes:
      raise UserError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes})")
    kind = "flags"
  else:
    kind = detect_cluster()
    if kind is None and mode != "on":
      return False
  kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id, initialization_timeout=timeout_s)
  if kind == "slurm":
    kwargs["local_device_ids"] = _slurm_local_devices()
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", kind,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
