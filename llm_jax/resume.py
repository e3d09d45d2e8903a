"""Resuming a run: what a saved step holds and what to do with it, judged before any array is
read, then the reading itself.

checkpoint.Checkpointer.restore_or_init walks the steps newest first and asks `plan` about each:
restore everything, restore all but the optimizer state (its tree changed: max_grad_norm 1 -> 0,
grad_accum, ...), refuse (the config changes the model), or skip (damaged). The verdict comes from
the step's saved config and the tree metadata of its items, so a model of another shape is never
mistaken for a damaged checkpoint, and on several processes process 0's verdict is everyone's
(`agreed`). `read_state` then reads through the item handlers; `fresh_opt_state`,
`position_at` and `warn_changes` finish a resume that changed something.
"""

import dataclasses
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from llm_jax import errors
from llm_jax import optimizer as optimizer_lib
from llm_jax import sharding as sharding_lib

# Fields that change the shapes or meaning of saved arrays: a resumed run may not change them.
MODEL_FIELDS = ("vocab_size", "vocab_multiple", "d_model", "n_heads", "n_kv_heads", "n_layers",
                "d_ff", "d_k", "d_v", "position_embedding", "max_position_embeddings",
                "activation", "use_rms_norm", "use_bias", "qkv_bias", "tie_embeddings",
                "scan_layers", "lora_r", "lora_targets", "lora_train_embeddings",
                "lora_trainable_tokens", "qk_norm")
# Fields that decide which tokens land in which batch: when changed, the data order restarts.
DATA_FIELDS = ("dataset", "validation", "validation_fraction", "text_key", "block_size",
               "micro_batch_size", "gradient_accumulation_steps", "pack_segments", "seed",
               "tokenizer_type", "byte_fallback")



def config_changes(saved: dict, cfg) -> tuple[list, list, list]:
  """(incompatible model fields, changed data fields, other changed fields), each a list of
  (field, saved value, value now)."""
  model, data, other = [], [], []
  for k, v in sorted(cfg.to_dict().items()):
    if k not in saved or saved[k] == v or (isinstance(v, tuple) and list(v) == saved[k]):
      continue
    if k == "dataset" and _only_weights_changed(saved[k], v):
      other.append((k, saved[k], v))  # the batch of each step follows from the step: it resumes
      continue
    (model if k in MODEL_FIELDS else data if k in DATA_FIELDS else other).append((k, saved[k], v))
  return model, data, other


def _only_weights_changed(was, now) -> bool:
  """Both mixtures of the same sources in the same order (dataset='mix:...'), weights aside."""
  from llm_jax import sources  # pylint: disable=g-import-not-at-top
  if not (isinstance(was, str) and was.startswith("mix:") and now.startswith("mix:")):
    return False
  try:
    return [d for _, d in sources.parse_mixture(was)] == [d for _, d in sources.parse_mixture(now)]
  except errors.UserError:
    return False


def lines(changes) -> list[str]:
  return [f"{k}: {was!r} -> {now!r}" for k, was, now in changes]


def targets(trainer):
  """Abstract targets (shapes, dtypes, the current mesh's shardings) of the saved arrays."""
  a = trainer.abstract_state()
  rng = sharding_lib.with_shardings(jax.eval_shape(jax.random.key_data, a.rng),
                                    trainer.state_shardings.rng)
  train = {"step": a.step, "opt_state": a.opt_state, "rng": rng}
  if optimizer_lib.averages_params(trainer.cfg):  # see Checkpointer.save
    train["params"] = a.params
  return a.params, train


def _model_change_message(model: list[str], workdir: str) -> str:
  return ("the config changes the model's shape relative to the checkpoint in "
          f"{os.path.abspath(os.path.join(workdir, "checkpoints"))}:\n  " + "\n  ".join(lines(model)) + "\nUse the checkpoint's "
          "values for these fields, or start in a new --workdir.")


# --- resuming: what a step holds, judged before any array is read ------------------------------

RESTORE, FRESH_OPTIMIZER, DAMAGED, MODEL_CHANGED = range(4)  # what to do with a step
DATA_RESTORE, DATA_RESTART, DATA_FROM_STEP = range(3)  # where the data iterator resumes


@dataclasses.dataclass(frozen=True)
class Plan:
  kind: int
  data: int = DATA_RESTORE
  why: str = ""  # damaged: what could not be read; model changed: the refusal
  changed: tuple = ()  # (field, saved, now) of the changed fields outside the model and data
  data_changed: tuple = ()
  train_params: bool = False  # the train item holds the trained params (schedule-free saved it)


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _key_name(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaves(tree) -> dict:
  """{path: (shape, dtype)} of a tree's arrays; paths as tuples of names, whatever the containers
  (orbax's metadata turns namedtuples into dicts and tuples into lists)."""
  return {tuple(_key_name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def saved_leaves(item_dir):
  """`_leaves` of a saved item from its tree metadata alone (no array read); None if unreadable."""
  handler = ocp.StandardCheckpointHandler()
  try:
    return _leaves(handler.metadata(item_dir))
  except Exception:  # pylint: disable=broad-except  (missing or corrupt metadata: damaged)
    return None
  finally:
    handler.close()


def _describe_difference(saved: dict, want: dict, limit: int = 3) -> str:
  lines = []
  for path in sorted(set(saved) | set(want)):
    if saved.get(path) != want.get(path):
      name = "/".join(path)
      have = "absent" if path not in saved else f"{list(saved[path][0])} {saved[path][1]}"
      need = "absent" if path not in want else f"{list(want[path][0])} {want[path][1]}"
      lines.append(f"{name}: saved {have}, this config {need}")
  more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
  return "; ".join(lines[:limit]) + more


def _data_saved_for(item_dir, process_count: int) -> bool:
  """Whether grain saved an iterator position for each of `process_count` processes."""
  return all((item_dir / f"process_{i}-of-{process_count}.json").exists()
             for i in range(process_count))


def plan(mngr, step: int, cfg, params_target, train_target) -> Plan:
  """What resuming from `step` should do, from its config and tree metadata (no array read)."""
  step_dir = mngr.directory / str(step)
  handler = ocp.JsonCheckpointHandler()
  try:
    saved = handler.restore(step_dir / "config", args=ocp.args.JsonRestore())
  except Exception as e:  # pylint: disable=broad-except
    return Plan(DAMAGED, why=f"its config cannot be read ({_first_line(e)})")
  finally:
    handler.close()
  if not isinstance(saved, dict):
    return Plan(DAMAGED, why="its config is not a JSON object")
  model, data_changed, changed = config_changes(saved, cfg)
  if model:
    return Plan(MODEL_CHANGED, why=_model_change_message(model, os.path.dirname(mngr.directory)))
  saved_params = saved_leaves(step_dir / "params")
  saved_train = saved_leaves(step_dir / "train")
  if saved_params is None or saved_train is None:
    return Plan(DAMAGED, why="its tree metadata cannot be read")
  want_params, want_train = _leaves(params_target), _leaves(train_target)
  if saved_params != want_params:
    return Plan(MODEL_CHANGED, why=(
        f"the params saved in {step_dir} do not match this config's model "
        f"({_describe_difference(saved_params, want_params)}): they were written by another "
        f"version of llm_jax or another model config. Resume with the version and config that "
        f"wrote them, or start in a new --workdir"))
  kind = RESTORE
  if saved_train != want_train:
    # step, rng (schedule-free's trained params are read when saved, whichever the optimizer now)
    fixed = {k: v for k, v in want_train.items() if k[0] not in ("opt_state", "params")}
    if any(saved_train.get(k) != v for k, v in fixed.items()):
      return Plan(MODEL_CHANGED, why=(
          f"the train state saved in {step_dir} does not match this version of llm_jax "
          f"({_describe_difference(saved_train, want_train)}); resume with the version that "
          f"wrote it, or start in a new --workdir"))
    kind = FRESH_OPTIMIZER
  if data_changed:
    data = DATA_RESTART
  elif _data_saved_for(step_dir / "data", jax.process_count()):
    data = DATA_RESTORE
  else:
    data = DATA_FROM_STEP  # saved by another number of processes
  return Plan(kind, data, changed=tuple(changed), data_changed=tuple(data_changed),
               train_params=any(k[0] == "params" for k in saved_train))


def agreed(plan: Plan) -> Plan:
  """Process 0's decision, on every process (each judged the step; process 0's judgement wins)."""
  if jax.process_count() == 1:
    return plan
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  kind, data = (int(x) for x in multihost_utils.broadcast_one_to_all(
      np.asarray([plan.kind, plan.data], np.int32)))
  why = plan.why or ("process 0 could not read it" if kind == DAMAGED else
                     "process 0 found that this config does not match the checkpoint")
  return dataclasses.replace(plan, kind=kind, data=data, why=why)


def failed_anywhere(why: str | None) -> str | None:
  """Why reading failed on this process or another; None when every process read its part."""
  if jax.process_count() == 1:
    return why
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  failed = np.asarray(multihost_utils.process_allgather(np.int32(why is not None))).reshape(-1)
  if not failed.any():
    return None
  return why or f"process(es) {np.nonzero(failed)[0].tolist()} could not read their part"


def read_state(step_dir, plan: Plan, params_target, train_target, data_iter):
  """(restored {"params", "train"}, None), or (None, why) when an array or file cannot be read.

  Reads through the item handlers, not the manager: the manager's restore ends in a barrier
  that a process whose read failed would never reach; the caller agrees on the outcome instead.
  """
  handlers = []

  def handler(cls):
    handlers.append(cls())
    return handlers[-1]

  try:
    r = {"params": handler(ocp.StandardCheckpointHandler).restore(
        step_dir / "params", args=ocp.args.StandardRestore(params_target))}
    if plan.kind == RESTORE:
      r["train"] = handler(ocp.StandardCheckpointHandler).restore(
          step_dir / "train", args=ocp.args.StandardRestore(train_target))
    else:  # the optimizer state's tree changed: read only the step and the rng
      small = {"step": train_target["step"], "rng": train_target["rng"],
               **({"params": params_target} if plan.train_params else {})}
      r["train"] = handler(ocp.PyTreeCheckpointHandler).restore(
          step_dir / "train", args=ocp.args.PyTreeRestore(
              item=small, restore_args=ocp.checkpoint_utils.construct_restore_args(small),
              partial_restore=True))
    if plan.data == DATA_RESTORE:
      handler(grain.checkpoint.CheckpointHandler).restore(
          step_dir / "data", args=grain.checkpoint.CheckpointRestore(data_iter))
    return r, None
  except Exception as e:  # pylint: disable=broad-except  (truncated or corrupt files)
    return None, _first_line(e)
  finally:
    for h in handlers:
      getattr(h, "close", lambda: None)()


def _schedule_at(opt_state, step):
  """A fresh optimizer state whose schedule counters read `step` (its moments stay at zero)."""
  counted = (optax.ScaleByScheduleState, optax.InjectHyperparamsState,
             optax.InjectStatefulHyperparamsState)

  def at(node):
    if isinstance(node, optax.MultiStepsState):
      return node._replace(gradient_step=jnp.full_like(node.gradient_step, step),
                           inner_opt_state=_schedule_at(node.inner_opt_state, step))
    if isinstance(node, counted):
      return node._replace(count=jnp.full_like(node.count, step))
    return node

  return jax.tree_util.tree_map(
      at, opt_state, is_leaf=lambda x: isinstance(x, (optax.MultiStepsState,) + counted))


def fresh_opt_state(trainer, params, step: int):
  init = jax.jit(lambda p: _schedule_at(trainer.tx.init(p), step),
                 out_shardings=trainer.state_shardings.opt_state)
  return init(params)


def position_at(data_iter, step: int) -> None:
  """Moves a step-indexed iterator (state {"next_index"}) to `step`'s batch; else restarts it."""
  state = data_iter.get_state()
  if isinstance(state, dict) and set(state) == {"next_index"}:
    data_iter.set_state({"next_index": step})
    logging.warning("the checkpoint's data position was saved by another number of processes; "
                    "resuming at the batch of step %d (the batch of a step does not depend on "
                    "the process count)", step)
  else:
    logging.warning("the checkpoint's data position was saved by another number of processes; "
                    "the data order restarts from the beginning of the training split")


def _optimizer_fields(changes, trainer) -> list:
  """Of the changed (field, saved, now), those that alone change the optimizer state's tree:
  with the saved value put back, this config's optimizer state would have another shape."""
  from llm_jax import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  now = _leaves(jax.eval_shape(trainer.tx.init, trainer.abstract_params))
  out = []
  for k, was, new in changes:
    c = trainer.cfg.copy_and_resolve_references()
    try:
      with c.unlocked():
        c[k] = tuple(was) if isinstance(new, tuple) and isinstance(was, list) else was
      tx = optimizer_lib.make_optimizer(c, trainer.total_steps)
      if _leaves(jax.eval_shape(tx.init, trainer.abstract_params)) != now:
        out.append((k, was, new))
    except Exception:  # pylint: disable=broad-except  (a value this version cannot build)
      continue
  return out


def warn_changes(plan: Plan, step: int, trainer) -> None:
  for line in lines(plan.changed):
    logging.warning("resuming with a changed field: %s", line)
  for k, was, now in plan.changed:
    if k == "dataset":
      logging.warning("the mixture's weights changed: from step %d each step draws its rows by "
                      "the new weights (the data position is kept)", step)
  if plan.data_changed:
    logging.warning("resuming with changed data fields (%s): the data order restarts from the "
                    "beginning of the training split", "; ".join(lines(plan.data_changed)))
  if plan.kind == FRESH_OPTIMIZER:
    fields = _optimizer_fields(plan.changed + plan.data_changed, trainer)
    back = " ".join(f"--config.{k}={was!r}" for k, was, _ in fields)
    logging.warning(
        "resuming from step %d with a NEW optimizer state: the checkpoint's optimizer state "
        "does not fit this config's optimizer (changed: %s). Restored: params, step, rng, data "
        "position; re-initialised: the optimizer state (Adam moments restart from zero, the "
        "learning-rate schedule continues at step %d). The checkpoint itself is unchanged%s.",
        step, "; ".join(lines(fields)) or "by another version of llm_jax", step,
        f": to resume with its optimizer state, run with the saved values ({back})"
        if back else "")
