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

import logging
import os
import pathlib
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from llm_jax import errors
from llm_jax import preemption
from llm_jax import resume
from llm_jax import sharding as sharding_lib
from llm_jax import tokenizer as tokenizer_lib

# Fields a resumed run may not change, and those that restart the data order (resume.py).
MODEL_FIELDS, DATA_FIELDS = resume.MODEL_FIELDS, resume.DATA_FIELDS


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
  leaves = resume.saved_leaves(pathlib.Path(checkpoint_dir(workdir)) / str(step) / "params")
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
    params_target, train_target = resume.targets(trainer)
    damaged = []  # (step, why)
    for step in steps:
      plan = resume.agreed(resume.plan(self.mngr, step, self.cfg, params_target, train_target))
      if plan.kind == resume.DAMAGED:
        damaged.append((step, plan.why))
        continue
      if plan.kind == resume.MODEL_CHANGED:
        raise CheckpointError(plan.why)
      r, why = resume.read_state(self.mngr.directory / str(step), plan, params_target,
                                 train_target, data_iter)
      failed = resume.failed_anywhere(why)
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
    resume.warn_changes(plan, step, trainer)
    params = r["train"].get("params", r["params"])  # schedule-free: the trained, not the average
    if plan.kind == resume.FRESH_OPTIMIZER:
      opt_state = resume.fresh_opt_state(trainer, params, step)
    else:
      opt_state = r["train"]["opt_state"]
    if plan.data == resume.DATA_FROM_STEP:
      resume.position_at(data_iter, step)
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
