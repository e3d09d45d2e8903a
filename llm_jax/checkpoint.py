"""Orbax checkpoints of a run: saving, resuming, preemption, and loading params for eval/sample.

A checkpoint (<workdir>/checkpoints/<step>/) holds separate items so that eval and sampling can
read the params alone: `params` (the ones to evaluate: schedule-free's average), `train` (step,
optimizer state, rng; schedule-free's trained params too), `data` (the grain iterator's
position, per process), `config` (JSON), `tokenizer` (the sentencepiece model) and `meta` (step,
epoch, tokens seen, wall time). Orbax writes each step to a temporary directory and renames it
when complete, so a run killed at any moment never leaves a checkpoint that looks complete but
is not (a killed run's leftover temporary directories are removed when the next run starts).
A checkpoint that fails to restore is skipped with a warning for the one before it, and a training
run moves it aside to <workdir>/damaged_checkpoints/ so that its step is written again. Arrays are
restored into the shardings of the current mesh, whatever mesh saved them.
"""

import base64
import logging
import os
import signal
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from llm_jax import optimizer as optimizer_lib
from llm_jax import sharding as sharding_lib

# Fields that change the shapes or meaning of saved arrays: a resumed run may not change them.
MODEL_FIELDS = ("vocab_size", "vocab_multiple", "d_model", "n_heads", "n_kv_heads", "n_layers",
                "d_ff", "d_k", "d_v", "position_embedding", "max_position_embeddings",
                "activation", "use_rms_norm", "use_bias", "tie_embeddings", "scan_layers",
                "qk_norm")
# Fields that decide which tokens land in which batch: when changed, the data order restarts.
DATA_FIELDS = ("dataset", "validation", "validation_fraction", "text_key", "block_size",
               "micro_batch_size", "gradient_accumulation_steps", "pack_segments", "seed",
               "tokenizer_type", "byte_fallback")


class CheckpointError(RuntimeError):
  """The checkpoint cannot be used with this config; the message names the fields."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


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
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def _config_changes(saved: dict, cfg) -> tuple[list[str], list[str], list[str]]:
  """(incompatible model fields, changed data fields, other changed fields) as readable lines."""
  model, data, other = [], [], []
  for k, v in sorted(cfg.to_dict().items()):
    if k not in saved or saved[k] == v or (isinstance(v, tuple) and list(v) == saved[k]):
      continue
    line = f"{k}: {saved[k]!r} -> {v!r}"
    (model if k in MODEL_FIELDS else data if k in DATA_FIELDS else other).append(line)
  return model, data, other


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


def _refuse_model_changes(saved_config: dict, cfg, workdir: str) -> tuple[list, list]:
  """Raises CheckpointError when `cfg` changes the model's shape; else (data, other) changes."""
  model, data, other = _config_changes(saved_config, cfg)
  if model:
    raise CheckpointError(
        "the config changes the model's shape relative to the checkpoint in "
        f"{checkpoint_dir(workdir)}:\n  " + "\n  ".join(model) + "\nUse the checkpoint's "
        "values for these fields, or start in a new --workdir.")
  return data, other


class Checkpointer:
  """Saves a run's checkpoints on schedule and restores the latest one when a run starts.

  SIGTERM and SIGINT (TPU VM preemption, Ctrl-C) set `stop_requested`; the loop then saves the
  current step, waits for the write and exits cleanly.
  """

  def __init__(self, workdir: str, cfg, steps_per_epoch: int, tokenizer=None):
    """`tokenizer` (saved in every checkpoint): a Tokenizer, its model bytes, or a model path."""
    self.workdir, self.cfg, self.steps_per_epoch = workdir, cfg, max(1, steps_per_epoch)
    self._tokenizer = tokenizer
    self.mngr = _manager(workdir, cfg.max_to_keep)
    self.stop_requested = False
    self._eval_loss = {}
    self._start_time = time.time()
    self._restore_data = True
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._on_signal)
      except ValueError:  # not the main thread (e.g. under a test runner's worker thread)
        pass

  def _on_signal(self, signum, _frame):
    if self.stop_requested:  # a second Ctrl-C: stop now
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      raise KeyboardInterrupt
    logging.warning("received %s: saving a checkpoint at the current step, then exiting",
                    signal.Signals(signum).name)
    self.stop_requested = True

  def _tokenizer_proto(self) -> bytes | None:
    tok = self._tokenizer
    if isinstance(tok, (bytes, bytearray)):
      return bytes(tok)
    if isinstance(tok, (str, os.PathLike)):
      if not os.path.exists(tok):
        return None
      with open(tok, "rb") as f:
        return f.read()
    return getattr(tok, "model_proto", None)

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
    self.stop_requested = bool(np.any(flags))
    return self.stop_requested

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
    }
    proto = self._tokenizer_proto()
    if proto:
      items["tokenizer"] = ocp.args.JsonSave({"model": base64.b64encode(proto).decode()})
    metrics = {"eval_loss": self._eval_loss[step]} if step in self._eval_loss else None
    self.mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    logging.info("checkpoint %d: writing to %s", step, checkpoint_dir(self.workdir))

  def restore_or_init(self, trainer, data_iter, overrides=None):
    """The latest good checkpoint's state (resharded onto trainer's mesh), or a fresh state."""
    steps = self.mngr.all_steps()
    if not steps:
      return trainer.init_state(self.cfg.seed)
    step, saved = _restore_first_good(
        self.mngr, steps, lambda s: ocp.args.Composite(config=ocp.args.JsonRestore()))
    if saved is None:
      raise CheckpointError(f"no readable checkpoint in {checkpoint_dir(self.workdir)}; move the "
                            f"directory away to start afresh")
    data, other = _refuse_model_changes(saved["config"], self.cfg, self.workdir)
    for line in other:
      logging.warning("resuming with a changed field: %s", line)
    if data:
      logging.warning("resuming with changed data fields (%s): the data order restarts from the "
                      "beginning of the training split", "; ".join(data))
    params_target, train_target = _restore_targets(trainer)

    def args(_):
      items = {"params": ocp.args.StandardRestore(params_target),
               "train": ocp.args.StandardRestore(train_target)}
      if not data:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      return ocp.args.Composite(**items)

    step, r = _restore_first_good(self.mngr, [s for s in steps if s <= step], args)
    if r is None:
      raise CheckpointError(f"no readable checkpoint in {checkpoint_dir(self.workdir)}; move the "
                            f"directory away to start afresh")
    _set_aside(self.mngr, self.workdir, [s for s in steps if s > step])
    logging.info("resumed from checkpoint %d in %s", step, checkpoint_dir(self.workdir))
    # state_shardings is a TrainState: replacing every field gives the restored TrainState.
    return trainer.state_shardings.replace(
        step=r["train"]["step"], params=r["train"].get("params", r["params"]),
        opt_state=r["train"]["opt_state"],
        rng=jax.random.wrap_key_data(r["train"]["rng"]))

  def wait(self) -> None:
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def load_params(workdir: str, abstract_params, shardings, step: int | None = None, cfg=None):
  """(params, step, saved config dict, tokenizer model bytes or None) from a run's checkpoint.

  With `cfg`, a config that changes the model's shape is refused with the fields named, before
  any array is read (a shape mismatch would otherwise look like a damaged checkpoint).
  """
  mngr = _manager(workdir, read_only=True)
  try:
    steps = mngr.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}: train first with "
                            f"--mode=train --workdir={workdir}")
    if step is not None and step not in steps:
      raise CheckpointError(f"checkpoint_step={step} is not in {checkpoint_dir(workdir)}; "
                            f"available: {sorted(steps)}")

    candidates = [step] if step is not None else steps
    if cfg is not None:
      _, saved = _restore_first_good(
          mngr, candidates, lambda s: ocp.args.Composite(config=ocp.args.JsonRestore()))
      if saved is not None:
        _refuse_model_changes(saved["config"], cfg, workdir)

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
      tok = base64.b64decode(t["tokenizer"]["model"])
    except Exception:  # pylint: disable=broad-except  (a checkpoint without its tokenizer item)
      pass
    return r["params"], got, r["config"], tok
  finally:
    mngr.close()
