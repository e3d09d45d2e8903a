"""Train state, the pure train and eval steps, and the training loop with its guards.

`train_step(state, batch)` is a pure function of the state and one optimizer step's batch
[A, b, T] (A = gradient_accumulation_steps): with grad_accum="scan" the A micro-batches are
scanned inside the jitted step and their mean gradient updates the params once; with
"multisteps" the loop calls the step once per micro-batch and optax.MultiSteps accumulates.
Mixed precision: params stay in param_dtype, the model computes in `dtype`, logits, softmax and
the loss are float32.

Fine-tuning (init_from, see loader.py) starts from a trained model's params. With LoRA
(lora_r > 0) the state's params are the adapters alone, so gradients, optimizer state and
checkpoints are the adapters'; the frozen base (quantized for QLoRA) is a separate, non-donated
argument of the jitted steps, sharded like the kernels.

Objectives (cfg.objective): "lm", the next-token cross-entropy; "dpo", a preference loss over
pairs (dpo.py: its batches [A, b, 2, T], its reference, its metrics). The step, the loop, the
checkpoints and the metrics writers are the same for both.
"""

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_jax import errors
from llm_jax import files
from llm_jax import lora as lora_lib
from llm_jax import metrics as metrics_lib
from llm_jax import model as model_lib
from llm_jax import optimizer as optimizer_lib
from llm_jax import preemption
from llm_jax import sharding as sharding_lib
from llm_jax import workdir as workdir_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array  # base key; each step folds in its step number, so resuming replays it exactly


class TrainingDiverged(RuntimeError):
  """The loss became NaN/Inf or exploded; the state of that step is never saved."""


def cross_entropy(logits_BTV, targets_BT, weights_BT, z_loss: float = 0.0):
  """Sums over tokens of the cross-entropy, z-loss, correct predictions and weights (float32).

  The model already gives padded vocab entries a large negative logit, so they take no
  probability mass here. z-loss is z_loss * log(Z)^2 per token (PaLM), pulling log Z to 0.
  Under a mesh whose rules shard the vocab axis (the Trainer's steps with tensor > 1), the same
  sums come from sharding.vocab_parallel_cross_entropy, which never gathers the logits.
  """
  if sharding_lib.vocab_is_sharded(logits_BTV.shape):
    return sharding_lib.vocab_parallel_cross_entropy(logits_BTV, targets_BT, weights_BT, z_loss)
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll = jnp.sum((lse_BT - target_BT) * weights_BT)
  z = jnp.sum(z_loss * jnp.square(lse_BT) * weights_BT)
  correct = jnp.sum((jnp.argmax(logits_BTV, -1) == targets_BT) * weights_BT)
  return nll, z, correct, jnp.sum(weights_BT)


def _weights(batch):
  if "weights" in batch:
    return batch["weights"].astype(jnp.float32)
  return jnp.ones(batch["targets"].shape, jnp.float32)


def _apply(model, params, batch, *, deterministic, rng=None):
  return model.apply({"params": params}, batch["inputs"], positions_BT=batch.get("positions"),
                     segment_ids_BT=batch.get("segment_ids"), deterministic=deterministic,
                     rngs=None if deterministic else {"dropout": rng})


def loss_fn(params, model, batch, rng, z_loss: float, deterministic: bool = False):
  """Mean (cross-entropy + z-loss) per token of one micro-batch, and the plain mean CE."""
  logits = _apply(model, params, batch, deterministic=deterministic, rng=rng)
  nll, z, _, n = cross_entropy(logits, batch["targets"], _weights(batch), z_loss)
  n = jnp.maximum(n, 1.0)
  return (nll + z) / n, nll / n


def _means(sums, n_micro):
  """The step's metrics from their sums over micro-batches: per pair for a preference loss
  (its sums count them under "pairs"), else per micro-batch."""
  if "pairs" in sums:
    n = jnp.maximum(sums["pairs"], 1.0)
    return {k: v / n for k, v in sums.items() if k != "pairs"}
  return {k: v / n_micro for k, v in sums.items()}


def make_train_step(cfg, model, tx, ref_model=None):
  """The pure train step for `cfg.grad_accum` and `cfg.objective`; see the module docstring.
  `ref_model`: a DPO run's reference (LoRA: the model without adapters)."""
  deterministic = (cfg.dropout == cfg.attention_dropout == cfg.hidden_dropout == 0.0
                   and (cfg.lora_r == 0 or cfg.lora_dropout == 0.0))
  if cfg.objective == "dpo":
    from llm_jax import dpo  # pylint: disable=import-outside-toplevel
    preference = dpo.make_loss_fn(cfg, model, ref_model)

    def loss_of_trained(params, base, batch, rng):  # differentiated w.r.t. params only
      return preference(lora_lib.combine(base, params), base, batch, rng, deterministic)
    sum_keys = dpo.SUM_KEYS
  else:
    sum_keys = ("loss",)

    def loss_of_trained(params, base, batch, rng):
      total, ce = loss_fn(lora_lib.combine(base, params), model, batch, rng, cfg.z_loss,
                          deterministic)
      return total, {"loss": ce}

  grad_fn = jax.value_and_grad(loss_of_trained, has_aux=True)

  def micro_grads(params, base, batch, rng):
    (_, sums), grads = grad_fn(params, base, batch, rng)
    return sums, grads

  def finish(state, grads, means, opt_step):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {**means, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
    return state.replace(step=opt_step, params=params, opt_state=opt_state), out

  if cfg.grad_accum == "scan" or cfg.gradient_accumulation_steps == 1:
    def train_step(state, base, batch):
      rng = jax.random.fold_in(state.rng, state.step)
      n_micro = batch["inputs"].shape[0]

      def body(carry, xs):
        acc, sums = carry
        micro, i = xs
        micro_sums, grads = micro_grads(state.params, base, micro, jax.random.fold_in(rng, i))
        acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
        return (acc, jax.tree.map(jnp.add, sums, micro_sums)), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      no_sums = {k: jnp.zeros((), jnp.float32) for k in sum_keys}
      (acc, sums), _ = jax.lax.scan(body, (zeros, no_sums), (batch, jnp.arange(n_micro)))
      grads = jax.tree.map(lambda a, p: (a / n_micro).astype(p.dtype), acc, state.params)
      state, out = finish(state, grads, _means(sums, n_micro), state.step + 1)
      return state, {**out, "tokens": jnp.sum(_weights(batch))}  # the tokens the loss trained
  else:
    # optax.MultiSteps: one call per micro-batch [b, T]; step counts optimizer steps, so it
    # advances when MultiSteps applied an update.
    def train_step(state, base, batch):
      micro_step = state.opt_state.mini_step
      rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), micro_step)
      sums, grads = micro_grads(state.params, base, batch, rng)
      updated = micro_step == cfg.gradient_accumulation_steps - 1
      state, out = finish(state, grads, _means(sums, 1),
                          state.step + updated.astype(state.step.dtype))
      return state, {**out, "tokens": jnp.sum(_weights(batch))}

  return train_step


def make_eval_step(model):
  def eval_step(params, batch):
    logits = _apply(model, params, batch, deterministic=True)
    nll, _, correct, n = cross_entropy(logits, batch["targets"], _weights(batch))
    return {"nll": nll, "correct": correct, "tokens": n}
  return eval_step


class Trainer:
  """Everything a run needs built once: mesh, model, optimizer, jitted and sharded steps."""

  def __init__(self, cfg, total_steps: int, mesh=None, backend=None, base=None):
    """`mesh` defaults to cfg's mesh over every device; `backend` ('cpu', 'gpu', 'tpu', which
    picks the attention kernel) to the platform of the mesh's devices, so a mesh of compile-only
    TPU devices (sizing.compile_report) gets the step a TPU run would, Pallas attention included.
    `base`: the loaded model a fine-tune starts from (loader.start_finetune), if any: with LoRA
    its params are the frozen base, else the initial params.
    """
    self.cfg = cfg
    self.total_steps = total_steps
    self.mesh = sharding_lib.make_mesh(cfg) if mesh is None else mesh
    backend = backend or self.mesh.devices.flat[0].platform
    self.model_cfg = model_lib.ModelConfig.from_config(cfg, backend=backend)
    self.model = model_lib.build(self.model_cfg)
    self.schedule = optimizer_lib.lr_schedule(cfg, total_steps)
    self.tx = optimizer_lib.make_optimizer(cfg, total_steps, self.schedule)
    dummy = jnp.zeros((1, cfg.block_size), jnp.int32)
    boxed = jax.eval_shape(lambda k: self.model.init(k, dummy), jax.random.key(0))["params"]
    boxed_base, boxed = lora_lib.split(boxed) if cfg.lora_r else ({}, boxed)
    self.abstract_params = nn.meta.unbox(boxed)
    self.rules = sharding_lib.logical_rules(cfg)
    self.param_shardings = sharding_lib.param_shardings(boxed, self.mesh, self.rules)
    base_shardings = (sharding_lib.param_shardings(boxed_base, self.mesh, self.rules)
                      if boxed_base else {})
    self.abstract_base = sharding_lib.with_shardings(nn.meta.unbox(boxed_base), base_shardings)
    self.base = base.params if base is not None and cfg.lora_r else {}
    self._initial_params = base.params if base is not None and not cfg.lora_r else None
    opt_sh = sharding_lib.opt_state_shardings(self.tx, self.abstract_params,
                                              self.param_shardings, self.mesh)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.state_shardings = TrainState(step=replicated, params=self.param_shardings,
                                      opt_state=opt_sh, rng=replicated)
    # DPO over LoRA: the reference is the frozen base applied without adapters (dpo.py).
    self.ref_model = (model_lib.build(dataclasses.replace(self.model_cfg, lora_r=0))
                      if cfg.objective == "dpo" and cfg.lora_r else None)
    step = make_train_step(cfg, self.model, self.tx, self.ref_model)
    # A step's batch: [A, b, T] under "scan", one micro-batch [b, T] under "multisteps".
    step_batch = (sharding_lib.batch_sharding(self.mesh, 3, 1) if self._scan
                  else sharding_lib.batch_sharding(self.mesh, 2))
    self._train_step = self._in_context(jax.jit(
        step, in_shardings=(self.state_shardings, base_shardings, step_batch),
        out_shardings=(self.state_shardings, None), donate_argnums=0))
    if cfg.objective == "dpo":
      from llm_jax import dpo  # pylint: disable=import-outside-toplevel
      preference = dpo.make_loss_fn(cfg, self.model, self.ref_model)

      def eval_fn(params, base, batch):  # sums over the pairs (dpo.summarize makes them means)
        return preference(lora_lib.combine(base, params), base, batch, None, True)[1]
      replicated_out = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      self._pair_logps = self._in_context(jax.jit(
          lambda params, batch: dpo.pair_logps(self.model, params, batch),
          in_shardings=(self.param_shardings, sharding_lib.batch_sharding(self.mesh, 2)),
          out_shardings=replicated_out), base=False)
    else:
      eval_step = make_eval_step(self.model)

      def eval_fn(params, base, batch):
        return eval_step(lora_lib.combine(base, params), batch)
    self._eval_step = self._in_context(jax.jit(
        eval_fn, in_shardings=(self.param_shardings, base_shardings,
                               sharding_lib.batch_sharding(self.mesh, 2))))
    # A full fine-tune's initial params are donated to the state they become.
    self._init_jit = self._in_context(jax.jit(self._init, out_shardings=self.state_shardings,
                                              donate_argnums=1), base=False)
    self._eval_params = jax.jit(lambda s: optimizer_lib.eval_params(s.opt_state, s.params),
                                out_shardings=self.param_shardings)

  @property
  def _scan(self):
    return self.cfg.grad_accum == "scan" or self.cfg.gradient_accumulation_steps == 1

  def _in_context(self, jitted, base=True):
    """`jitted` under the rules and the mesh (logical constraints need them while tracing);
    with `base`, the frozen base is passed as its second argument (abstract when lowering)."""
    def with_base(args, frozen):
      return (args[0], frozen, *args[1:]) if base else args

    def call(*args):
      with nn.logical_axis_rules(self.rules), jax.set_mesh(self.mesh):
        return jitted(*with_base(args, self.base))

    def lower(*args):
      with nn.logical_axis_rules(self.rules), jax.set_mesh(self.mesh):
        return jitted.lower(*with_base(args, self.abstract_base))
    call.lower = lower
    return call

  def _init(self, key, params=None) -> TrainState:
    if params is None:
      dummy = jnp.zeros((1, self.cfg.block_size), jnp.int32)
      # A LoRA run initialises its adapters alone: the base's part of init is dead code, and
      # needs no quantizing (adapters have the same shapes over a quantized base).
      model = model_lib.build(dataclasses.replace(self.model_cfg, quant=""))
      params = nn.meta.unbox(model.init(key, dummy)["params"])
      if self.cfg.lora_r:
        _, params = lora_lib.split(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), rng=jax.random.fold_in(key, 1))

  def init_state(self, seed: int) -> TrainState:
    """Params and optimizer state created directly in their shardings (never whole on a device);
    a full fine-tune's params are the base's."""
    params, self._initial_params = self._initial_params, None
    return self._init_jit(jax.random.key(seed), params)

  def abstract_state(self) -> TrainState:
    """The state's shapes and dtypes with their shardings, nothing allocated (restore targets)."""
    return sharding_lib.with_shardings(jax.eval_shape(self._init, jax.random.key(0)),
                                       self.state_shardings)

  def initial_params(self):
    """A new full fine-tune's starting params until its first state takes them, else None."""
    return self._initial_params

  def pair_logps(self, params, local_batch) -> np.ndarray:
    """DPO: summed completion log-probs [mb, 2] of `params` (a full fine-tune's whole model) on
    one micro-batch of pairs (each process's share), every process getting all of them."""
    return np.asarray(jax.device_get(self._pair_logps(
        params, sharding_lib.global_batch(local_batch, self.mesh))))

  def full_params(self, params):
    """Everything the model applies: a LoRA run's frozen base with `params` (its adapters)."""
    return lora_lib.combine(self.base, params)

  def eval_params(self, state):
    """The params evaluation, sampling and checkpoints use: `optimizer.eval_params` (schedule-
    free's average; for the other optimizers `state.params` itself, not a copy)."""
    if not optimizer_lib.averages_params(self.cfg):
      return state.params
    return self._eval_params(state)

  def train_step(self, state, local_batch):
    """One optimizer step on this process's share of the batch ([A, b, T] numpy arrays)."""
    if self._scan:
      batch = sharding_lib.global_batch(local_batch, self.mesh, batch_axis=1)
      return self._train_step(state, batch)
    outs = []
    for i in range(self.cfg.gradient_accumulation_steps):
      micro = sharding_lib.global_batch({k: v[i] for k, v in local_batch.items()}, self.mesh)
      state, out = self._train_step(state, micro)
      outs.append(out)
    # The step's loss (and a preference loss's metrics) is the mean over its micro-batches, as
    # with "scan", its tokens their sum; grad_norm is the last micro-batch's (MultiSteps keeps
    # the accumulated gradient inside its state).
    return state, {**out, **{k: sum(o[k] for o in outs) / len(outs) for k in out
                             if k not in ("grad_norm", "param_norm", "tokens")},
                   "tokens": sum(o["tokens"] for o in outs)}

  def loss_of(self, params, local_batch) -> float:
    """The objective's mean loss of `params` on the first micro-batch of a step's batch (no
    dropout): cross-entropy per token, or a preference loss per pair.

    Runs the eval step (same shapes as evaluation batches, so no extra compile).
    """
    first = {k: v[0] for k, v in local_batch.items()}
    if self.cfg.objective == "dpo":  # the pairs' own weights mask their prompts and padding
      first["pair_weights"] = np.ones(first["targets"].shape[:2], np.float32)
      out = jax.device_get(self._eval_step(params, sharding_lib.global_batch(first, self.mesh)))
      return float(out["loss"] / max(out["pairs"], 1.0))
    if "weights" not in first:  # (an SFT batch's weights are its prompt mask)
      first["weights"] = np.ones(first["targets"].shape, np.float32)
    out = jax.device_get(self._eval_step(params, sharding_lib.global_batch(first, self.mesh)))
    return float(out["nll"] / max(out["tokens"], 1.0))

  def evaluate(self, params, batches, max_batches=None, chars_per_token=None) -> dict:
    """Loss, accuracy, perplexity and bits per character over `batches` (the eval iterator)."""
    return evaluate(self._eval_step, params, batches, self.mesh, max_batches, chars_per_token)

  def lower_train_step(self):
    """The train step lowered for abstract inputs of this config (for memory analysis)."""
    state = self.abstract_state()
    a, b, t = (self.cfg.gradient_accumulation_steps, self.cfg.micro_batch_size,
               self.cfg.block_size)
    lead, axis = ((a, b), 1) if self._scan else ((b,), 0)

    def spec(shape, dtype):
      return jax.ShapeDtypeStruct(lead + shape, dtype, sharding=sharding_lib.batch_sharding(
          self.mesh, len(lead + shape), axis))
    if self.cfg.objective == "dpo":  # pairs [.., 2, T] (dpo.py); a full fine-tune's reference
      batch = {"inputs": spec((2, t), jnp.int32), "targets": spec((2, t), jnp.int32),
               "weights": spec((2, t), jnp.float32)}
      if not self.cfg.lora_r:
        batch["ref_logps"] = spec((2,), jnp.float32)
    else:
      batch = {k: spec((t,), jnp.int32) for k in ("inputs", "targets")}
    return self._train_step.lower(state, batch)


def evaluate(eval_step, params, batches, mesh, max_batches=None, chars_per_token=None) -> dict:
  """Loss, accuracy, perplexity and bits per character of `eval_step(params, batch)` summed over
  `batches` (each process's share, placed on `mesh`)."""
  totals = None
  for i, local in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    if jax.process_count() == 1:  # (on several processes the loop's agreed stop decides)
      preemption.check()  # a signal during training's evaluation: stop it, the loop saves
    out = eval_step(params, sharding_lib.global_batch(local, mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if totals is None:
    raise errors.UserError("the validation split produced no batch: it is smaller than one row of "
                           "block_size + 1 tokens; lower block_size or add validation text")
  totals = jax.device_get(totals)
  if "pairs" in totals:  # a preference loss (dpo.py): its loss and TRL's metrics per pair
    from llm_jax import dpo  # pylint: disable=import-outside-toplevel
    return dpo.summarize(totals)
  loss = float(totals["nll"] / max(totals["tokens"], 1.0))
  result = {"loss": loss, "accuracy": float(totals["correct"] / max(totals["tokens"], 1.0)),
            "perplexity": metrics_lib.perplexity(loss), "tokens": int(totals["tokens"])}
  if chars_per_token:
    result["bits_per_char"] = metrics_lib.bits_per_char(loss, chars_per_token)
  return result


def total_steps(cfg, steps_per_epoch: int) -> int:
  if cfg.num_train_steps is not None:
    return int(cfg.num_train_steps)
  return max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))


def _check_loss(step: int, loss: float, running_min: float, factor: float,
                floor: float = 0.0) -> float:
  """Raises TrainingDiverged on a NaN/Inf or exploding loss; returns the new running minimum.

  `floor`: the explosion is measured against max(running minimum, floor). A preference loss
  falls toward 0 as its margins grow, where ordinary noise is many times the minimum: its floor
  is its value at the start (dpo.initial_loss).
  """
  advice = ("Lower --config.learning_rate (e.g. by 3-10x), lengthen --config.warmup_steps, or "
            "clip harder with --config.max_grad_norm=1.0. No checkpoint of this state was written.")
  if not math.isfinite(loss):
    raise TrainingDiverged(f"loss is {loss} at step {step}. {advice}")
  if factor and math.isfinite(running_min) and loss > factor * max(running_min, floor):
    what = "its running minimum" if running_min >= floor else "its value at the start"
    raise TrainingDiverged(f"loss exploded to {loss:.4g} at step {step}, more than "
                           f"loss_explosion_factor={factor:g} x {what} "
                           f"{max(running_min, floor):.4g}. {advice}")
  return min(running_min, loss)


OOM_FIXES = (
    "a smaller --config.micro_batch_size with more --config.gradient_accumulation_steps (same "
    "batch_size), --config.remat_policy=full, --config.dtype=bfloat16, or sharding over more "
    "devices (--config.mesh_shape; its 4th entry, context, splits each sequence when one row per "
    "device is still too long)")
OOM_ADVICE = (f"out of memory (XLA RESOURCE_EXHAUSTED). Try: {OOM_FIXES}. Check what fits first "
              f"with --mode=compile.")


def is_oom(e: BaseException) -> bool:
  if files.is_full(e):  # XLA's RESOURCE_EXHAUSTED also names a full disk (tensorstore, orbax)
    return False
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def sample_lines(trainer, params, tokenizer, cfg, n_tokens=64, n_rows=2) -> list[str]:
  """A few sampled continuations of a fresh document, to eyeball progress at each evaluation.

  At most `n_tokens`, capped to what the model holds: a learned position table has
  max_position_embeddings slots (one is the EOS the rows start from), and rope / sinusoidal
  models stay within max_seq_len, the context they were trained on.
  """
  from llm_jax import sampling  # late: sampling is optional to training
  n_tokens = min(n_tokens, sampling.max_new_tokens_for(1, trainer.model_cfg, cfg.max_seq_len))
  with cfg.unlocked():
    scfg = cfg.copy_and_resolve_references()
  with scfg.unlocked():
    scfg.max_new_tokens = n_tokens
    scfg.min_length = 0
    scfg.num_return_sequences = 1
  rows = sampling.generate(trainer.full_params(params), trainer.model_cfg,
                           [[tokenizer.eos_id]] * n_rows, scfg,
                           jax.random.key(cfg.seed), eos_id=tokenizer.eos_id)
  return [tokenizer.decode(r) for r in rows]


def build_data(cfg, workdir: str, tokenizer=None):
  """data.build (objective=sft: chat.build, conversations masked and packed), by process 0 first
  on a multi-host run: the others then load its tokenizer and caches instead of racing to write
  the same files (and perhaps train different tokenizers)."""
  from jax.experimental import multihost_utils
  if cfg.objective == "sft":
    from llm_jax.chat import build
  else:
    from llm_jax.data import build
  if jax.process_count() == 1:
    return build(cfg, workdir, tokenizer=tokenizer)
  data = build(cfg, workdir, tokenizer=tokenizer) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("llm_jax: data built by process 0")
  return data if data is not None else build(cfg, workdir, tokenizer=tokenizer)


def run(cfg, workdir: str, overrides=None) -> int:
  """Trains `cfg` in `workdir`, resuming from its latest checkpoint. Returns an exit code.

  Holds the workdir's lock (workdir.lock) for the whole run: a second training run there is
  refused with WorkdirError. Bad input (errors.UserError: the workdir, the dataset, a checkpoint
  that does not fit) is raised for main.py to report, after removing the workdir if this call
  created it.
  """
  created = not os.path.exists(workdir)
  try:
    with workdir_lib.lock(workdir):
      return _run_locked(cfg, workdir, overrides)
  except errors.UserError:
    if created and jax.process_index() == 0:  # bad input leaves no new, half-made workdir
      shutil.rmtree(workdir, ignore_errors=True)
    raise
  except Exception as e:  # pylint: disable=broad-except
    if not files.is_full(e):
      raise
    # A checkpoint (orbax writes it under a tmp name, renamed when whole: the earlier ones are
    # intact, the cut-short one is removed when the run restarts) or the metrics; the workdir is
    # kept whatever made it, since it holds this run's earlier checkpoints.
    from llm_jax import checkpoint as ckpt_lib
    steps = ckpt_lib.saved_steps(workdir)
    needed = files.tree_bytes(os.path.join(ckpt_lib.checkpoint_dir(workdir), str(steps[-1]))
                              ) if steps else None
    raise files.disk_full(workdir, "the run's checkpoints and metrics", needed) from None


def _run_locked(cfg, workdir: str, overrides=None) -> int:
  from tqdm import tqdm
  from llm_jax import checkpoint as ckpt_lib
  from llm_jax import loader

  is_main = jax.process_index() == 0
  loader.check_train(cfg)
  pairs = None
  if cfg.objective == "dpo":  # the reference and the pairs are checked before anything loads
    from llm_jax import dpo  # pylint: disable=import-outside-toplevel
    dpo.check(cfg)
    pairs = dpo.load_pairs(cfg)
  tasks = None
  if cfg.tasks_every:  # the task files are read and checked before anything trains
    from llm_jax.evals import harness  # late: evals are optional to training
    tasks = harness.DuringTraining(cfg)
  mesh, base, base_ref = None, None, None
  if cfg.init_from:  # fine-tuning: the model fields, tokenizer and params of a trained model
    mesh = sharding_lib.make_mesh(cfg)
    cfg, base, base_ref = loader.start_finetune(cfg, workdir, mesh, asked=overrides or {})
    if is_main and base is not None and base.quantization:
      print(f"llm_jax: frozen base {base.path}: {base.quantization}", flush=True)
  data = (dpo.build(cfg, workdir, pairs) if pairs is not None else build_data(cfg, workdir))
  steps = total_steps(cfg, data.steps_per_epoch)
  trainer = Trainer(cfg, steps, mesh=mesh, base=base)
  if pairs is not None and not cfg.lora_r:  # full fine-tuning: cached before the first state
    dpo.attach_reference(trainer, data, workdir, base.path if base is not None else None)
  del base  # a full fine-tune's initial params are donated to its first state
  if tasks is not None:
    tasks.start(trainer, data.tokenizer)
  train_iter = data.train_iter()
  ckpt = ckpt_lib.Checkpointer(workdir, cfg, data.steps_per_epoch,
                              cfg.tokenizer_path or os.path.join(workdir, "tokenizer.model"),
                              extra={"base": base_ref} if base_ref else None)
  writer, bar = None, None
  saving = contextlib.ExitStack()
  try:
    state = ckpt.restore_or_init(trainer, train_iter)
    # Only now: a checkpoint this config cannot use is refused before anything is written.
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, console=False)
    start = int(jax.device_get(state.step))
    # FLOPs count the whole model (a LoRA run's frozen base computes too); a trained table's
    # delta is added to its table, not multiplied.
    n_params = metrics_lib.count_params((trainer.abstract_base, lora_lib.split_deltas(
        trainer.abstract_params)[0]))
    fpt = metrics_lib.flops_per_token(cfg, n_params)
    peak = metrics_lib.device_peak_flops()
    n_trained = metrics_lib.count_params(trainer.abstract_params, False)
    if is_main:
      what = (f"{n_trained / 1e6:.2f}M params" if not cfg.lora_r else
              f"LoRA r={cfg.lora_r} on {cfg.lora_targets}{lora_lib.tables_note(trainer.model_cfg)}: "
              f"{n_trained / 1e6:.3f}M trained params over a frozen base of "
              f"{trainer.model_cfg.quant or cfg.param_dtype} weights")
      source = f" from {cfg.init_from}" if cfg.init_from else ""
      print(f"llm_jax: {what}{source}, {steps} steps of {cfg.batch_size} x {cfg.block_size} tokens "
            f"({data.steps_per_epoch} steps/epoch), mesh {dict(trainer.mesh.shape)}, "
            f"{jax.device_count()} x {jax.devices()[0].device_kind}, workdir {workdir}"
            + (f", resumed at step {start}" if start else ""), flush=True)
      if len(getattr(data, "weights", ())) > 1:  # a mixture (conversations and pairs are not)
        print("llm_jax: mixture: " + "; ".join(
            f"source {i} ({n}) weight {w:.3f}, its share of each step logged as data/share_{i}"
            for i, (n, w) in enumerate(zip(data.source_names, data.weights))), flush=True)
    running_min = math.inf
    loss_floor = dpo.initial_loss(cfg) if pairs is not None else 0.0
    bar = tqdm(total=steps, initial=start, disable=not is_main, dynamic_ncols=True,
               mininterval=1.0, desc="train")
    t0, steps_timed, last, trained = time.perf_counter(), 0, {}, 0.0

    def print_eval(step, ev, params):
      lines = _eval_samples(trainer, params, data.tokenizer, cfg, step)
      if is_main:
        what = (f"reward accuracy {ev['rewards/accuracies']:.3f}, reward margin "
                f"{ev['rewards/margins']:.3f} on {ev['pairs']} pairs" if pairs is not None else
                f"bits/char {ev['bits_per_char']:.3f}, accuracy {ev['accuracy']:.3f}")
        bar.write(f"step {step}: eval loss {ev['loss']:.4f}, {what}"
                  + (f", train loss {last['train/loss']:.4f}" if last else ""))
        for line in lines:
          bar.write("  | " + line.strip().replace("\n", "\n  | ")[:400])

    if cfg.init_from and start == 0:  # the base on the new data, before any update
      params = trainer.eval_params(state)
      ev = trainer.evaluate(params, data.eval_batches(), cfg.eval_batches, data.chars_per_token)
      writer.write(0, {f"eval/{k}": v for k, v in ev.items()})
      print_eval(0, ev, params)
      t0 = time.perf_counter()
    if start == steps and steps and _final_eval_missing(writer.jsonl_path, steps):
      # A signal cut the final evaluation short (the step was saved): it runs now, so the run
      # ends as an uninterrupted one does (its eval/loss at the last step, which studies read).
      params = trainer.eval_params(state)
      ev = trainer.evaluate(params, data.eval_batches(), None, data.chars_per_token)
      writer.write(steps, {f"eval/{k}": v for k, v in ev.items()})
      print_eval(steps, ev, params)
    saving.enter_context(preemption.deferred())  # from here a signal saves the step it reaches
    for step in range(start + 1, steps + 1):
      batch = next(train_iter)
      state, out = trainer.train_step(state, batch)
      trained = out["tokens"] + trained  # on the device: no sync per step
      steps_timed += 1
      do_eval = step == steps or (cfg.eval_steps and step % cfg.eval_steps == 0)
      do_save = ckpt.should_save(step) or step == steps
      if step % cfg.log_every == 0 or do_eval or do_save or step == start + 1:
        out = jax.device_get(out)
        running_min = _check_loss(step, float(out["loss"]), running_min,
                                  cfg.loss_explosion_factor, loss_floor)
        if not math.isfinite(float(out["param_norm"])):
          raise TrainingDiverged(f"parameters became NaN/Inf at step {step}. Lower "
                                 f"--config.learning_rate or clip with --config.max_grad_norm.")
        dt = time.perf_counter() - t0
        # (a preference batch holds two sequences, chosen and rejected, per pair)
        tps = steps_timed * cfg.batch_size * cfg.block_size * (1 + (pairs is not None)) / dt
        last = {"train/loss": float(out["loss"]),
                **({"train/perplexity": metrics_lib.perplexity(float(out["loss"])),
                    "train/bits_per_char": metrics_lib.bits_per_char(float(out["loss"]),
                                                                     data.chars_per_token)}
                   if data.chars_per_token else {}),
                # a preference loss's metrics, under TRL's names (dpo.py)
                **{f"train/{k}": float(v) for k, v in out.items() if "/" in k},
                "train/learning_rate": float(trainer.schedule(step)),
                "train/grad_norm": float(out["grad_norm"]),
                "train/param_norm": float(out["param_norm"]),
                "train/tokens_per_s": tps, "train/step_time_s": dt / steps_timed,
                "train/epoch": step / data.steps_per_epoch,
                # Tokens the loss trained (an SFT run's assistant tokens), since this process
                # started: with train/tokens_per_s, how much of the batch the prompt mask keeps.
                "train/trained_tokens": float(jax.device_get(trained))}
        m = metrics_lib.mfu(tps / jax.device_count(), fpt, peak)
        if m is not None:
          last["train/mfu"] = m
        # A mixture: each source's share of this step's rows (step s reads batch s - 1).
        shares = data.source_shares(step - 1) if hasattr(data, "source_shares") else {}
        for i, share in enumerate(shares.values()):
          last[f"data/share_{i}"] = share
        writer.write(step, last)
        bar.set_postfix(loss=f"{last['train/loss']:.3f}", lr=f"{last['train/learning_rate']:.2e}",
                        tok_s=f"{tps:,.0f}", **({"mfu": f"{m:.1%}"} if m is not None else {}),
                        refresh=False)
        t0, steps_timed = time.perf_counter(), 0
      stop = ckpt.should_stop(step, cfg.log_every)
      # What evaluation, sampling and checkpoints use: schedule-free's average, not what it trains.
      params = trainer.eval_params(state) if do_eval or do_save or stop else None
      if do_save or stop:
        # The logged loss is of the params before this step's update; the state about to be
        # saved is after it, so check that state itself: one forward pass on this step's batch.
        running_min = _check_loss(step, trainer.loss_of(params, batch), running_min,
                                  cfg.loss_explosion_factor, loss_floor)
      ev = None
      if do_eval:
        # The eval loss goes into the checkpoint (the best one is kept), so it comes first, but
        # the step is saved even when the evaluation fails; sampling comes after the save.
        try:
          # Periodic evaluations may be capped (eval_batches); the final one is whole.
          ev = trainer.evaluate(params, data.eval_batches(),
                                None if step == steps else cfg.eval_batches, data.chars_per_token)
        except preemption.Preempted:  # a signal cut the evaluation short: should_stop below
          pass
        except BaseException:
          if do_save or stop:
            ckpt.save(step, state, train_iter, params=params)
          raise
        if ev is not None:
          writer.write(step, {f"eval/{k}": v for k, v in ev.items()})
          ckpt.record_eval(step, ev["loss"])
        if not stop and ckpt.should_stop(step, cfg.log_every):
          # A signal during the evaluation (the final one too): save this step, not one more,
          # and stop there (a rerun runs the final evaluation it cut short).
          if not do_save:
            running_min = _check_loss(step, trainer.loss_of(params, batch), running_min,
                                      cfg.loss_explosion_factor, loss_floor)
          stop = True
      if do_save or stop:
        ckpt.save(step, state, train_iter, params=params)
      if ev is not None and not stop:  # no sampling after a signal: the save is what matters
        print_eval(step, ev, params)
      do_tasks = (tasks is not None and not stop  # after a signal only the save matters
                  and (step % cfg.tasks_every == 0 or step == steps))
      if do_tasks:
        scores, line = tasks(trainer.full_params(
            params if params is not None else trainer.eval_params(state)))
        writer.write(step, scores)
        if is_main:
          bar.write(f"step {step}: tasks {line}")
      if do_eval or do_save or stop or do_tasks:
        t0 = time.perf_counter()  # evaluation, tasks and saving time is not training throughput
      bar.update(1)
      if stop:
        bar.close()
        ckpt.wait()
        print(f"stopped by a signal at step {step}: checkpoint saved in {workdir}; run the same "
              f"command to resume", flush=True)
        return errors.OK
    bar.close()
  except TrainingDiverged as e:
    logging.error("training stopped: %s", e)
    errors.report(f"training stopped: {e}")
    return errors.DIVERGED
  except Exception as e:  # pylint: disable=broad-except
    if is_oom(e):
      errors.report(f"{OOM_ADVICE}\n({str(e).splitlines()[0][:300]})")
      return errors.OOM
    raise
  finally:
    # saving.close() after ckpt.close(): the last save's write is waited for inside deferred().
    # The bar first: an error line after it starts a line of its own.
    _close_all([c.close for c in (bar,) if c is not None] + [ckpt.close, saving.close]
               + [c.close for c in (writer,) if c is not None])
  if is_main:
    png = metrics_lib.plot_losses(writer.jsonl_path, os.path.join(workdir, "loss_curves.png"))
    print(f"done: {workdir} holds checkpoints, metrics.jsonl, tensorboard/ and {png}")
  return errors.OK


def _final_eval_missing(jsonl_path: str, steps: int) -> bool:
  """Whether metrics.jsonl lacks the evaluation of the last step (process 0 reads it and tells
  the others: the evaluation is a collective)."""
  missing = False
  if jax.process_index() == 0:
    records = metrics_lib.read_metrics(jsonl_path) if os.path.exists(jsonl_path) else []
    missing = not any(r.get("step") == steps and "eval/loss" in r for r in records)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    missing = bool(multihost_utils.broadcast_one_to_all(np.asarray(missing)))
  return missing


def _close_all(closers) -> None:
  """Calls each closer; while an error is on its way out, a closer's own failure (the same full
  disk, a failed async write) is logged instead of replacing it."""
  failing = sys.exc_info()[1] is not None
  for close in closers:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      if not failing:
        raise
      logging.warning("while stopping on an error, closing failed too: %s: %s",
                      type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")


def _eval_samples(trainer, params, tokenizer, cfg, step) -> list[str]:
  """sample_lines at an evaluation, if asked for; a failure there is a warning, not the run's end.

  Every process samples (the params are spread over all of them); process 0 prints.
  """
  if not cfg.sample_every_eval:
    return []
  try:
    return sample_lines(trainer, params, tokenizer, cfg)
  except Exception as e:  # pylint: disable=broad-except
    if is_oom(e):
      raise
    logging.warning("could not sample at step %d (training goes on; the step is saved): %s: %s",
                    step, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
    return []


def evaluate_workdir(cfg, workdir: str, overrides=None) -> int:
  """--mode=eval: loss, accuracy, perplexity and bits/char of a saved checkpoint (quantized when
  load_in_8bit / load_in_4bit ask; a LoRA run's with its base); with objective=dpo, the
  preference loss and reward accuracy on the held-out pairs."""
  from llm_jax import loader
  loaded = loader.load(workdir, cfg, step=cfg.checkpoint_step, asked=overrides or {})
  if cfg.objective == "dpo":
    from llm_jax import dpo  # pylint: disable=import-outside-toplevel
    data = dpo.build(loaded.cfg, workdir, tokenizer=loaded.tokenizer)
    step_fn, params = dpo.eval_step(loaded, workdir, data)
  else:
    data = build_data(loaded.cfg, workdir, tokenizer=loaded.tokenizer)
    step_fn, params = jax.jit(make_eval_step(model_lib.build(loaded.model_cfg))), loaded.params
  if loaded.quantization:
    print(f"# {loaded.quantization}", flush=True)
  rules = sharding_lib.logical_rules(loaded.cfg)

  def eval_step(params, batch):
    with nn.logical_axis_rules(rules), jax.set_mesh(loaded.mesh):
      return step_fn(params, batch)
  ev = evaluate(eval_step, params, data.eval_batches(), loaded.mesh, None,
                data.chars_per_token)  # the whole split
  print(f"eval of checkpoint {loaded.step} in {workdir}: " + ", ".join(
      f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items()), flush=True)
  return errors.OK
