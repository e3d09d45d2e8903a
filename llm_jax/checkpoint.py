"""Orbax checkpoints of a run: saving, resuming, preemption, and loading params for eval/sample.

A checkpoint (<workdir>/checkpoints/<step>/) holds separate items so that eval and sampling can
read the params alone: `params` (the ones to evaluate: schedule-free's average), `train` (step,
optimizer state, rng; schedule-free's trained params too), `data` (the grain iterator's
position, per process), `config` (JSON), `tokenizer` (tokenizer.py's item), `meta` (step,
epoch, tokens seen, wall time) and, for a LoRA run, `base` (its base model's reference: loader.py).
`save_params` writes params alone (an import or an export: no `train` or `data`). Orbax writes
each step to a temporary directory and renames it when complete, so a run killed at any moment never leaves a checkpoint that looks complete but
is not (a killed run's leftover temporary directories are removed when the next run starts).
A checkpoint that fails to restore is skipped with a warning for the one before it, and a training
run moves it aside to <workdir>/damaged_checkpoints/ so that its step is written again. A healthy
checkpoint that does not fit the config is told apart before any array is read, from its saved
config and tree metadata: a changed model is refused, a changed optimizer state restarts fresh
(see `Checkpointer.restore_or_init`); neither is ever moved. Arrays are restored into the
shardings of the current mesh, whatever mesh saved them.
"""

import dataclasses
import logging
import os
import pathlib
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from llm_jax import errors
from llm_jax import optimizer as optimizer_lib
from llm_jax import preemption
from llm_jax import sharding as sharding_lib
from llm_jax import tokenizer as tokenizer_lib

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


class CheckpointError(errors.UserError):
  """The checkpoint cannot be used with this config; the message names the fields."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def saved_steps(workdir: str) -> list[int]:
  """The steps whose write completed: orbax renames a step's tmp directory once it is whole, so
  what a killed write leaves (<step>.orbax-checkpoint-tmp-*) is not a checkpoint."""
  d = checkpoint_dir(workdir)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _latest_item(workdir: str, name: str) -> dict | None:
  """A JSON item of the newest readable checkpoint (None when there is none, or no such item)."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  try:
    return load_json(workdir, (name,))[1][name]
  except CheckpointError:
    return None


def saved_config(workdir: str) -> dict | None:
  """The flat config (a dict) saved with the latest checkpoint, or None."""
  return _latest_item(workdir, "config")


def param_count(workdir: str, step: int) -> int:
  """How many numbers the params item of checkpoint `step` holds (a LoRA run's: its adapters),
  from the tree metadata alone."""
  leaves = _saved_leaves(pathlib.Path(checkpoint_dir(workdir)) / str(step) / "params")
  if leaves is None:
    raise CheckpointError(f"{checkpoint_dir(workdir)}/{step}: the params' metadata cannot be read")
  return int(sum(np.prod(shape, dtype=np.int64) for shape, _ in leaves.values()))


def imported_from(workdir: str) -> str | None:
  """The Hugging Face directory the workdir's checkpoint was imported from, or None."""
  meta = _latest_item(workdir, "meta")
  return None if meta is None else meta.get("imported_from")


class _QuietMissingMetrics(logging.Filter):
  """Drops orbax's warnings about what we do by design: most saves have no eval loss."""

  # Also orbax's notes that a read-only manager (eval/sample) will not save: that is the intent.
  _EXPECTED = ("did not provide metrics", "read_only=True", "Given directory is read only")

  def filter(self, record):
    return not any(s in str(record.msg) for s in self._EXPECTED)


def _eval_loss(metrics):
  return metrics["eval_loss"]


def _manager(workdir: str, max_to_keep: int = 3, read_only: bool = False):
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _QuietMissingMetrics) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietMissingMetrics())
  cm = ocp.checkpoint_managers
  # preservation_policy, not best_fn + max_to_keep: the latter keeps the N best and can delete the
  # latest checkpoint, the one a resume needs. Checkpoints without an eval loss count only as
  # recent ones. best_fn is still set, without max_to_keep, because orbax writes a step's metrics
  # to disk only when it is: without them a resumed run forgets which checkpoint was best and
  # deletes it.
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(n=max_to_keep),
      cm.BestN(get_metric_fn=_eval_loss, reverse=True, n=1,
               keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=not read_only, preservation_policy=policy, read_only=read_only,
      create=not read_only, best_fn=_eval_loss, best_mode="min",
      cleanup_tmp_directories=not read_only)
  for attempt in range(5):
    try:
      return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)
    except FileNotFoundError:
      # A reader lists the steps while a live run deletes an old one (max_to_keep): list again.
      if not read_only or attempt == 4:
        raise
      time.sleep(0.1)


def _config_changes(saved: dict, cfg) -> tuple[list, list, list]:
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


def _lines(changes) -> list[str]:
  return [f"{k}: {was!r} -> {now!r}" for k, was, now in changes]


def _restore_first_good(mngr, steps, make_args):
  """Restores the newest readable step among `steps`; warns about each damaged one it skips."""
  skipped = []
  for step in sorted(steps, reverse=True):
    try:
      restored = mngr.restore(step, args=make_args(step))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("checkpoint %s is damaged or incomplete (%s: %s); trying the previous one",
                      os.path.join(mngr.directory, str(step)), type(e).__name__,
                      str(e).splitlines()[0][:200] if str(e) else "")
      skipped.append(step)
      continue
    if skipped:
      logging.warning("using checkpoint %s instead of the damaged %s",
                      os.path.join(mngr.directory, str(step)),
                      ", ".join(os.path.join(mngr.directory, str(s)) for s in skipped))
    return step, restored
  return None, None


def _set_aside(mngr, workdir: str, steps) -> None:
  """Moves damaged step directories to <workdir>/damaged_checkpoints/ (kept, not deleted).

  Left in place, a damaged step would still count as the latest, and the resumed run would skip
  saving that step again when it gets there.
  """
  if steps and jax.process_index() == 0:
    dest_root = os.path.join(os.path.abspath(workdir), "damaged_checkpoints")
    os.makedirs(dest_root, exist_ok=True)
    for step in steps:
      src = os.path.join(checkpoint_dir(workdir), str(step))
      dest = os.path.join(dest_root, str(step))
      if os.path.exists(dest):
        dest = f"{dest}-{int(time.time())}"
      os.rename(src, dest)
      logging.warning("moved the damaged checkpoint %s to %s", src, dest)
  if steps and jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("llm_jax_checkpoint_set_aside")
  if steps:
    mngr.reload()


def _restore_targets(trainer):
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
          f"{checkpoint_dir(workdir)}:\n  " + "\n  ".join(_lines(model)) + "\nUse the checkpoint's "
          "values for these fields, or start in a new --workdir.")


def _refuse_model_changes(saved_config: dict, cfg, workdir: str) -> tuple[list, list]:
  """Raises CheckpointError when `cfg` changes the model's shape; else (data, other) changes."""
  model, data, other = _config_changes(saved_config, cfg)
  if model:
    raise CheckpointError(_model_change_message(model, workdir))
  return data, other


# --- resuming: what a step holds, judged before any array is read ------------------------------

_RESTORE, _FRESH_OPTIMIZER, _DAMAGED, _MODEL_CHANGED = range(4)  # what to do with a step
_DATA_RESTORE, _DATA_RESTART, _DATA_FROM_STEP = range(3)  # where the data iterator resumes


@dataclasses.dataclass(frozen=True)
class _Plan:
  kind: int
  data: int = _DATA_RESTORE
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


def _saved_leaves(item_dir):
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


def _plan(mngr, step: int, cfg, params_target, train_target) -> _Plan:
  """What resuming from `step` should do, from its config and tree metadata (no array read)."""
  step_dir = mngr.directory / str(step)
  handler = ocp.JsonCheckpointHandler()
  try:
    saved = handler.restore(step_dir / "config", args=ocp.args.JsonRestore())
  except Exception as e:  # pylint: disable=broad-except
    return _Plan(_DAMAGED, why=f"its config cannot be read ({_first_line(e)})")
  finally:
    handler.close()
  if not isinstance(saved, dict):
    return _Plan(_DAMAGED, why="its config is not a JSON object")
  model, data_changed, changed = _config_changes(saved, cfg)
  if model:
    return _Plan(_MODEL_CHANGED, why=_model_change_message(model, os.path.dirname(mngr.directory)))
  saved_params = _saved_leaves(step_dir / "params")
  saved_train = _saved_leaves(step_dir / "train")
  if saved_params is None or saved_train is None:
    return _Plan(_DAMAGED, why="its tree metadata cannot be read")
  want_params, want_train = _leaves(params_target), _leaves(train_target)
  if saved_params != want_params:
    return _Plan(_MODEL_CHANGED, why=(
        f"the params saved in {step_dir} do not match this config's model "
        f"({_describe_difference(saved_params, want_params)}): they were written by another "
        f"version of llm_jax or another model config. Resume with the version and config that "
        f"wrote them, or start in a new --workdir"))
  kind = _RESTORE
  if saved_train != want_train:
    # step, rng (schedule-free's trained params are read when saved, whichever the optimizer now)
    fixed = {k: v for k, v in want_train.items() if k[0] not in ("opt_state", "params")}
    if any(saved_train.get(k) != v for k, v in fixed.items()):
      return _Plan(_MODEL_CHANGED, why=(
          f"the train state saved in {step_dir} does not match this version of llm_jax "
          f"({_describe_difference(saved_train, want_train)}); resume with the version that "
          f"wrote it, or start in a new --workdir"))
    kind = _FRESH_OPTIMIZER
  if data_changed:
    data = _DATA_RESTART
  elif _data_saved_for(step_dir / "data", jax.process_count()):
    data = _DATA_RESTORE
  else:
    data = _DATA_FROM_STEP  # saved by another number of processes
  return _Plan(kind, data, changed=tuple(changed), data_changed=tuple(data_changed),
               train_params=any(k[0] == "params" for k in saved_train))


def _agreed(plan: _Plan) -> _Plan:
  """Process 0's decision, on every process (each judged the step; process 0's judgement wins)."""
  if jax.process_count() == 1:
    return plan
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  kind, data = (int(x) for x in multihost_utils.broadcast_one_to_all(
      np.asarray([plan.kind, plan.data], np.int32)))
  why = plan.why or ("process 0 could not read it" if kind == _DAMAGED else
                     "process 0 found that this config does not match the checkpoint")
  return dataclasses.replace(plan, kind=kind, data=data, why=why)


def _failed_anywhere(why: str | None) -> str | None:
  """Why reading failed on this process or another; None when every process read its part."""
  if jax.process_count() == 1:
    return why
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  failed = np.asarray(multihost_utils.process_allgather(np.int32(why is not None))).reshape(-1)
  if not failed.any():
    return None
  return why or f"process(es) {np.nonzero(failed)[0].tolist()} could not read their part"


def _read_state(step_dir, plan: _Plan, params_target, train_target, data_iter):
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
    if plan.kind == _RESTORE:
      r["train"] = handler(ocp.StandardCheckpointHandler).restore(
          step_dir / "train", args=ocp.args.StandardRestore(train_target))
    else:  # the optimizer state's tree changed: read only the step and the rng
      small = {"step": train_target["step"], "rng": train_target["rng"],
               **({"params": params_target} if plan.train_params else {})}
      r["train"] = handler(ocp.PyTreeCheckpointHandler).restore(
          step_dir / "train", args=ocp.args.PyTreeRestore(
              item=small, restore_args=ocp.checkpoint_utils.construct_restore_args(small),
              partial_restore=True))
    if plan.data == _DATA_RESTORE:
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


def _fresh_opt_state(trainer, params, step: int):
  init = jax.jit(lambda p: _schedule_at(trainer.tx.init(p), step),
                 out_shardings=trainer.state_shardings.opt_state)
  return init(params)


def _position_at(data_iter, step: int) -> None:
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


def _warn_changes(plan: _Plan, step: int, trainer) -> None:
  for line in _lines(plan.changed):
    logging.warning("resuming with a changed field: %s", line)
  for k, was, now in plan.changed:
    if k == "dataset":
      logging.warning("the mixture's weights changed: from step %d each step draws its rows by "
                      "the new weights (the data position is kept)", step)
  if plan.data_changed:
    logging.warning("resuming with changed data fields (%s): the data order restarts from the "
                    "beginning of the training split", "; ".join(_lines(plan.data_changed)))
  if plan.kind == _FRESH_OPTIMIZER:
    fields = _optimizer_fields(plan.changed + plan.data_changed, trainer)
    back = " ".join(f"--config.{k}={was!r}" for k, was, _ in fields)
    logging.warning(
        "resuming from step %d with a NEW optimizer state: the checkpoint's optimizer state "
        "does not fit this config's optimizer (changed: %s). Restored: params, step, rng, data "
        "position; re-initialised: the optimizer state (Adam moments restart from zero, the "
        "learning-rate schedule continues at step %d). The checkpoint itself is unchanged%s.",
        step, "; ".join(_lines(fields)) or "by another version of llm_jax", step,
        f": to resume with its optimizer state, run with the saved values ({back})"
        if back else "")


class Checkpointer:
  """Saves a run's checkpoints on schedule and restores the latest one when a run starts.

  SIGTERM and SIGINT (TPU VM preemption, Ctrl-C: llm_jax/preemption.py) set `stop_requested`;
  the loop then saves the current step, waits for the write and exits cleanly.
  """

  def __init__(self, workdir: str, cfg, steps_per_epoch: int, tokenizer=None, extra=None):
    """`tokenizer` (saved in every checkpoint): a tokenizer, sentencepiece model bytes, or a path
    `tokenizer.load` reads. `extra`: more JSON items saved in every checkpoint, {name: value}
    (a LoRA run's base)."""
    self.workdir, self.cfg, self.steps_per_epoch = workdir, cfg, max(1, steps_per_epoch)
    self._tokenizer = tokenizer
    self._extra = dict(extra or {})
    self.mngr = _manager(workdir, cfg.max_to_keep)
    self._stop_agreed = False  # another process received the signal (should_stop)
    self._eval_loss = {}
    self._start_time = time.time()
    self._restore_data = True

  @property
  def stop_requested(self) -> bool:
    return self._stop_agreed or preemption.requested()

  def _tokenizer_item(self) -> dict | None:
    tok = self._tokenizer
    if isinstance(tok, (bytes, bytearray)):
      tok = tokenizer_lib.Tokenizer(bytes(tok))
    elif isinstance(tok, (str, os.PathLike)):
      if not os.path.exists(tok):
        return None
      tok = tokenizer_lib.load(os.fspath(tok))
    return None if tok is None else tok.to_item()

  def should_stop(self, step: int, every: int) -> bool:
    """Whether the run stops (after saving) at `step` because a signal arrived.

    On several processes a signal may reach only some of them, and a save is a step every
    process must join: they agree, every `every` steps, by gathering each one's flag.
    """
    if jax.process_count() == 1:
      return self.stop_requested
    if step % every:
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(self.stop_requested, np.int32))
    self._stop_agreed = bool(np.any(flags))
    return self._stop_agreed

  def should_save(self, step: int) -> bool:
    cfg = self.cfg
    if cfg.save_steps and step % cfg.save_steps == 0:
      return True
    return bool(cfg.save_every_epochs
                and step % (cfg.save_every_epochs * self.steps_per_epoch) == 0)

  def record_eval(self, step: int, eval_loss: float) -> None:
    self._eval_loss[step] = float(eval_loss)

  def save(self, step: int, state, data_iter, force: bool = False, params=None) -> None:
    """Starts an asynchronous save of `state` at `step` (training continues meanwhile).

    `params`: what eval, sample and fine-tuning load (Trainer.eval_params(state)). When they are
    not state.params (schedule-free's average), the trained params go in the `train` item too,
    so that a resume continues from exactly them.
    """
    if step in self.mngr.all_steps():
      return
    params = state.params if params is None else params
    train = {"step": state.step, "opt_state": state.opt_state,
             "rng": jax.random.key_data(state.rng)}
    if params is not state.params:
      train["params"] = state.params
    meta = {"step": step, "epoch": step / self.steps_per_epoch,
            "tokens_seen": step * self.cfg.batch_size * self.cfg.block_size,
            "wall_time_s": time.time() - self._start_time, "saved_at": time.time()}
    items = {
        "params": ocp.args.StandardSave(params),
        "train": ocp.args.StandardSave(train),
        "data": grain.checkpoint.CheckpointSave(data_iter),
        "config": ocp.args.JsonSave(self.cfg.to_dict()),
        "meta": ocp.args.JsonSave(meta),
        **{k: ocp.args.JsonSave(v) for k, v in self._extra.items()},
    }
    tok_item = self._tokenizer_item()
    if tok_item:
      items["tokenizer"] = ocp.args.JsonSave(tok_item)
    metrics = {"eval_loss": self._eval_loss[step]} if step in self._eval_loss else None
    self.mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    logging.info("checkpoint %d: writing to %s", step, checkpoint_dir(self.workdir))

  def restore_or_init(self, trainer, data_iter):
    """The latest good checkpoint's state (resharded onto trainer's mesh), or a fresh state.

    Each step, newest first, is judged from its config and tree metadata before any array is
    read (on several processes process 0 judges and the others follow, so they never part):
    - its config changes the model (shape fields, or a params tree that differs): refused with
      CheckpointError naming the fields, nothing moved;
    - it cannot be read (config or metadata unreadable, or reading its arrays fails on any
      process): damaged; the next older step is tried, and once one restores, the damaged newer
      ones are moved to <workdir>/damaged_checkpoints/;
    - its optimizer state's tree differs from this config's (max_grad_norm 1 -> 0, grad_accum,
      ...): healthy but changed; params, step, rng and data position are restored, the optimizer
      state starts afresh (its schedule at the restored step), with a warning naming the fields;
    - otherwise everything is restored.
    """
    steps = sorted(self.mngr.all_steps(), reverse=True)
    if not steps:
      return trainer.init_state(self.cfg.seed)
    params_target, train_target = _restore_targets(trainer)
    damaged = []  # (step, why)
    for step in steps:
      plan = _agreed(_plan(self.mngr, step, self.cfg, params_target, train_target))
      if plan.kind == _DAMAGED:
        damaged.append((step, plan.why))
        continue
      if plan.kind == _MODEL_CHANGED:
        raise CheckpointError(plan.why)
      r, why = _read_state(self.mngr.directory / str(step), plan, params_target, train_target,
                           data_iter)
      failed = _failed_anywhere(why)
      if failed:
        damaged.append((step, failed))
        continue
      break
    else:
      raise CheckpointError(
          f"no checkpoint in {checkpoint_dir(self.workdir)} can be read: "
          + "; ".join(f"step {s}: {why}" for s, why in damaged)
          + ". Nothing was moved or deleted. If the storage had a passing fault, run the same "
          "command again; to train afresh, use a new --workdir")
    for s, why in damaged:
      logging.warning("checkpoint %s is damaged (%s); resuming from step %d instead",
                      os.path.join(checkpoint_dir(self.workdir), str(s)), why, step)
    _set_aside(self.mngr, self.workdir, [s for s, _ in damaged])
    _warn_changes(plan, step, trainer)
    params = r["train"].get("params", r["params"])  # schedule-free: the trained, not the average
    if plan.kind == _FRESH_OPTIMIZER:
      opt_state = _fresh_opt_state(trainer, params, step)
    else:
      opt_state = r["train"]["opt_state"]
    if plan.data == _DATA_FROM_STEP:
      _position_at(data_iter, step)
    logging.info("resumed from checkpoint %d in %s", step, checkpoint_dir(self.workdir))
    # state_shardings is a TrainState: replacing every field gives the restored TrainState.
    return trainer.state_shardings.replace(
        step=r["train"]["step"], params=params, opt_state=opt_state,
        rng=jax.random.wrap_key_data(r["train"]["rng"]))

  def wait(self) -> None:
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()


def _candidate_steps(mngr, workdir: str, step: int | None) -> list[int]:
  """The steps to try, newest first: `step` alone when given; CheckpointError when none is."""
  steps = mngr.all_steps()
  if not steps:
    raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}: train first with "
                          f"--mode=train --workdir={workdir}")
  if step is not None and step not in steps:
    raise CheckpointError(f"checkpoint_step={step} is not in {checkpoint_dir(workdir)}; "
                          f"available: {sorted(steps)}")
  return [step] if step is not None else steps


def load_params(workdir: str, abstract_params, shardings, step: int | None = None):
  """(params, step, saved config dict, tokenizer or None) from a run's checkpoint.

  loader.load builds `abstract_params` from the checkpoint's own config (read first, with
  load_json), so a model of another shape is never taken for a damaged checkpoint.
  """
  mngr = _manager(workdir, read_only=True)
  try:
    candidates = _candidate_steps(mngr, workdir, step)

    def args(_):
      return ocp.args.Composite(
          params=ocp.args.StandardRestore(sharding_lib.with_shardings(abstract_params, shardings)),
          config=ocp.args.JsonRestore())
    got, r = _restore_first_good(mngr, candidates, args)
    if r is None:
      raise CheckpointError(f"no readable checkpoint in {checkpoint_dir(workdir)}")
    tok = None
    try:
      t = mngr.restore(got, args=ocp.args.Composite(tokenizer=ocp.args.JsonRestore()))
      tok = tokenizer_lib.from_item(t["tokenizer"])
    except Exception:  # pylint: disable=broad-except  (a checkpoint without its tokenizer item)
      pass
    return r["params"], got, r["config"], tok
  finally:
    mngr.close()


def load_json(workdir: str, names, step: int | None = None) -> tuple[int, dict]:
  """(step, {name: value, or None when absent}) of JSON items (config, meta, base, ...) of the
  newest readable checkpoint of `workdir`, or of `step`. Reads no array."""
  mngr = _manager(workdir, read_only=True)
  try:
    got, r = _restore_first_good(mngr, _candidate_steps(mngr, workdir, step),
                                 lambda s: ocp.args.Composite(config=ocp.args.JsonRestore()))
    if r is None:
      raise CheckpointError(f"no readable checkpoint in {checkpoint_dir(workdir)}")
    items = {}
    for name in names:
      try:
        items[name] = (r if name == "config" else mngr.restore(
            got, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()})))[name]
      except Exception:  # pylint: disable=broad-except  (an item this checkpoint does not have)
        items[name] = None
    return got, items
  finally:
    mngr.close()


def save_params(workdir: str, step: int, params, config: dict, tokenizer=None,
                meta=None) -> str:
  """Writes a checkpoint of params, config, tokenizer and meta alone (no optimizer state, no data
  position) at `step` in `workdir`, as an import or an export makes: eval, sample and init_from
  read it like any other. Returns its directory."""
  mngr = _manager(workdir)
  try:
    items = {"params": ocp.args.StandardSave(params), "config": ocp.args.JsonSave(config),
             "meta": ocp.args.JsonSave({"step": step, "saved_at": time.time(), **(meta or {})})}
    if tokenizer is not None:
      items["tokenizer"] = ocp.args.JsonSave(tokenizer.to_item())
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return os.path.join(checkpoint_dir(workdir), str(step))
