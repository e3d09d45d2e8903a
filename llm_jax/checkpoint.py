"""Orbax checkpoints of a run: saving, resuming, preemption, and loading params for eval/sample.

A checkpoint (<workdir>/checkpoints/<step>/) holds separate items so that eval and sampling can
read the params alone: `params`, `train` (step, optimizer state, rng), `data` (the grain iterator's
position, per process), `config` (JSON), `tokenizer` (the sentencepiece model) and `meta` (step,
epoch, tokens seen, wall time). Orbax writes each step to a temporary directory and renames it
when complete, so a run killed at any moment never leaves a checkpoint that looks complete but
is not. Arrays are restored into the shardings of the current mesh, whatever mesh saved them.
"""

import base64
import logging
import os
import signal
import time

import grain
import jax
import orbax.checkpoint as ocp

# Fields that change the shapes or meaning of saved arrays: a resumed run may not change them.
MODEL_FIELDS = ("vocab_size", "vocab_multiple", "d_model", "n_heads", "n_kv_heads", "n_layers",
                "d_ff", "d_k", "d_v", "position_embedding", "max_position_embeddings",
                "activation", "use_rms_norm", "use_bias", "tie_embeddings", "scan_layers")
# Fields that decide which tokens land in which batch: when changed, the data order restarts.
DATA_FIELDS = ("dataset", "validation", "validation_fraction", "text_key", "block_size",
               "micro_batch_size", "gradient_accumulation_steps", "pack_segments", "seed",
               "tokenizer_type", "byte_fallback")


class CheckpointError(RuntimeError):
  """The checkpoint cannot be used with this config; the message names the fields."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def _manager(workdir: str, max_to_keep: int = 3, read_only: bool = False):
  cm = ocp.checkpoint_managers
  # preservation_policy, not best_fn + max_to_keep: the latter keeps the N best and can delete the
  # latest checkpoint, the one a resume needs. Checkpoints without an eval loss count only as
  # recent ones.
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(n=max_to_keep),
      cm.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
               keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=not read_only, preservation_policy=policy, read_only=read_only,
      create=not read_only)
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
  for step in sorted(steps, reverse=True):
    try:
      return step, mngr.restore(step, args=make_args(step))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("checkpoint %s is damaged or incomplete (%s: %s); trying the previous one",
                      os.path.join(mngr.directory, str(step)), type(e).__name__,
                      str(e).splitlines()[0][:200] if str(e) else "")
  return None, None


def _abstract(tree, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      tree, shardings)


class Checkpointer:
  """Saves a run's checkpoints on schedule and restores the latest one when a run starts.

  SIGTERM and SIGINT (TPU VM preemption, Ctrl-C) set `stop_requested`; the loop then saves the
  current step, waits for the write and exits cleanly.
  """

  def __init__(self, workdir: str, cfg, steps_per_epoch: int, tokenizer_path: str | None = None):
    self.workdir, self.cfg, self.steps_per_epoch = workdir, cfg, max(1, steps_per_epoch)
    self.tokenizer_path = tokenizer_path
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

  def should_save(self, step: int) -> bool:
    cfg = self.cfg
    if cfg.save_steps and step % cfg.save_steps == 0:
      return True
    return bool(cfg.save_every_epochs
                and step % (cfg.save_every_epochs * self.steps_per_epoch) == 0)

  def record_eval(self, step: int, eval_loss: float) -> None:
    self._eval_loss[step] = float(eval_loss)

  def save(self, step: int, state, data_iter, force: bool = False) -> None:
    """Starts an asynchronous save of `state` at `step` (training continues meanwhile)."""
    if step in self.mngr.all_steps():
      return
    meta = {"step": step, "epoch": step / self.steps_per_epoch,
            "tokens_seen": step * self.cfg.batch_size * self.cfg.block_size,
            "wall_time_s": time.time() - self._start_time, "saved_at": time.time()}
    items = {
        "params": ocp.args.StandardSave(state.params),
        "train": ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state,
                                        "rng": jax.random.key_data(state.rng)}),
        "data": grain.checkpoint.CheckpointSave(data_iter),
        "config": ocp.args.JsonSave(self.cfg.to_dict()),
        "meta": ocp.args.JsonSave(meta),
    }
    if self.tokenizer_path and os.path.exists(self.tokenizer_path):
      with open(self.tokenizer_path, "rb") as f:
        items["tokenizer"] = ocp.args.JsonSave({"model": base64.b64encode(f.read()).decode()})
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
    model, data, other = _config_changes(saved["config"], self.cfg)
    if model:
      raise CheckpointError(
          "the config changes the model's shape relative to the checkpoint in "
          f"{checkpoint_dir(self.workdir)}:\n  " + "\n  ".join(model) + "\nUse the checkpoint's "
          "values for these fields, or start in a new --workdir.")
    for line in other:
      logging.info("resuming with a changed field: %s", line)
    if data:
      logging.warning("resuming with changed data fields (%s): the data order restarts from the "
                      "beginning of the training split", "; ".join(data))
    abstract = jax.eval_shape(trainer.init_state, 0)
    sh = trainer.state_shardings
    train_target = {"step": _abstract(abstract.step, sh.step),
                    "opt_state": _abstract(abstract.opt_state, sh.opt_state),
                    "rng": _abstract(jax.eval_shape(jax.random.key_data, abstract.rng), sh.rng)}

    def args(_):
      items = {"params": ocp.args.StandardRestore(_abstract(abstract.params, sh.params)),
               "train": ocp.args.StandardRestore(train_target)}
      if not data:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      return ocp.args.Composite(**items)

    step, r = _restore_first_good(self.mngr, [s for s in steps if s <= step], args)
    if r is None:
      raise CheckpointError(f"no readable checkpoint in {checkpoint_dir(self.workdir)}")
    logging.info("resumed from checkpoint %d in %s", step, checkpoint_dir(self.workdir))
    return abstract.replace(step=r["train"]["step"], params=r["params"],
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


def load_params(workdir: str, abstract_params, shardings, step: int | None = None):
  """(params, step, saved config dict, tokenizer model bytes or None) from a run's checkpoint."""
  mngr = _manager(workdir, read_only=True)
  try:
    steps = mngr.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}: train first with "
                            f"--mode=train --workdir={workdir}")
    if step is not None and step not in steps:
      raise CheckpointError(f"checkpoint_step={step} is not in {checkpoint_dir(workdir)}; "
                            f"available: {sorted(steps)}")

    def args(_):
      return ocp.args.Composite(
          params=ocp.args.StandardRestore(_abstract(abstract_params, shardings)),
          config=ocp.args.JsonRestore())
    got, r = _restore_first_good(mngr, [step] if step is not None else steps, args)
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
