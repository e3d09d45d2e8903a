"""The optax chain: learning-rate schedule, weight-decay mask, clipping, AdamW, accumulation.

Owns everything that turns gradients into parameter updates. Schedules count optimizer steps
(one step = one update of the parameters, after any gradient accumulation): with
`grad_accum="multisteps"` optax.MultiSteps advances the inner count only on real updates, and
with `grad_accum="scan"` the train step averages micro-batch gradients itself before calling
the optimizer once, so in both cases `total_steps` is the number of parameter updates.

    tx = make_optimizer(cfg, total_steps)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
"""

import logging

import jax
import optax

from llm_jax import metrics

# Parameter leaf names that are never decayed: decaying biases and norm scales only pulls the
# network toward a worse function (a zero scale kills the layer); it does not regularize.
_NEVER_DECAYED = ("bias", "scale")


def lr_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Learning rate per optimizer step: linear warmup from 0, then `cfg.lr_decay`.

  Warmup rises linearly over `cfg.warmup_steps` from 0 to `cfg.learning_rate`. After it:
    cosine:      min + (lr - min) * (1 + cos(pi * t / D)) / 2
    linear:      lr + (min - lr) * t / D
    exponential: lr * (min / lr) ** (t / D)
    constant:    lr
  with t = step - warmup_steps, D = total_steps - warmup_steps and min = cfg.min_learning_rate;
  the value holds at `min` after `total_steps`. When warmup_steps >= total_steps the run ends
  inside the warmup (the ramp keeps its slope, so lowering total_steps never raises the lr a
  given step sees) and the schedule stays at the peak afterwards.

  Args:
    cfg: finalized config (learning_rate, min_learning_rate, warmup_steps, lr_decay).
    total_steps: optimizer steps in the whole run.

  Returns:
    an optax schedule: step (int scalar, may be traced) -> float32 learning rate.
  """
  peak = float(cfg.learning_rate)
  floor = float(cfg.min_learning_rate)
  warmup = int(cfg.warmup_steps)
  total = int(total_steps)
  decay_steps = total - warmup
  if decay_steps <= 0:
    if warmup > 0:
      logging.warning(
          "warmup_steps=%d >= total optimizer steps %d: the learning rate never reaches its "
          "peak %g nor decays; lower warmup_steps (a few %% of the run is usual) or train longer",
          warmup, total, peak)
    decay = optax.constant_schedule(peak)
  elif cfg.lr_decay == "cosine":
    if warmup > 0:
      # decay_steps of this builder counts the warmup too.
      return optax.warmup_cosine_decay_schedule(
          init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total,
          end_value=floor)
    decay = optax.cosine_decay_schedule(
        init_value=peak, decay_steps=decay_steps, alpha=floor / peak)
  elif cfg.lr_decay == "linear":
    decay = optax.linear_schedule(
        init_value=peak, end_value=floor, transition_steps=decay_steps)
  elif cfg.lr_decay == "exponential":
    # config.py guarantees floor > 0 here; end_value stops the decay exactly at the floor.
    decay = optax.exponential_decay(
        init_value=peak, transition_steps=decay_steps, decay_rate=floor / peak,
        end_value=floor)
  elif cfg.lr_decay == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"lr_decay={cfg.lr_decay!r} is not one of cosine, linear, exponential, "
                     f"constant")
  if warmup == 0:
    return decay
  ramp = optax.linear_schedule(init_value=0.0, end_value=peak, transition_steps=warmup)
  return optax.join_schedules([ramp, decay], [warmup])


def weight_decay_mask(params, cfg):
  """Which parameters AdamW decays: a tree of bools with the structure of `params`.

  True for matrices and higher-rank kernels (ndim >= 2; scanned layers add a leading axis, so
  names, not only ranks, decide): the attention and MLP kernels and an untied output head
  params["lm_head"]["kernel"]. Embeddings (any path component containing "embed":
  params["embed"]["embedding"], params["pos_embed"]["embedding"]) only when
  cfg.decay_embeddings. Leaves named "bias" or "scale" never.

  Works on plain nested dicts and FrozenDicts of arrays, tracers or ShapeDtypeStructs.
  """
  decay_embeddings = bool(cfg.decay_embeddings)

  def decide(path, leaf):
    names = metrics.path_names(path)
    if names and names[-1] in _NEVER_DECAYED:
      return False
    if len(leaf.shape) < 2:
      return False
    if any("embed" in name for name in names):
      return decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg, total_steps: int, schedule=None) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(lr_schedule, weight_decay_mask), maybe inside MultiSteps.

  With grad_accum="multisteps" and gradient_accumulation_steps = k > 1, each `update` call
  takes one micro-batch gradient; the parameters change (and the schedule advances) on every
  k-th call, with the mean of the k gradients. The whole chain sits inside MultiSteps so that
  clipping sees the averaged gradient, as a single large batch would. Before the k-th call the
  returned updates are zeros. Whether a call updated: `opt_state.mini_step == 0`.

  Args:
    cfg: finalized config (learning rate and schedule fields, beta1, beta2, epsilon,
      weight_decay, decay_embeddings, max_grad_norm, grad_accum, gradient_accumulation_steps).
    total_steps: optimizer steps in the run (parameter updates, not micro-batches).
    schedule: the run's `lr_schedule(cfg, total_steps)` if the caller already built it.

  Returns:
    an optax GradientTransformation whose update needs `params` (for weight decay).
  """
  schedule = lr_schedule(cfg, total_steps) if schedule is None else schedule
  adamw = optax.adamw(
      schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.epsilon, weight_decay=cfg.weight_decay,
      mask=lambda p: weight_decay_mask(p, cfg))
  if cfg.max_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
  else:
    tx = adamw
  k = int(cfg.gradient_accumulation_steps)
  if cfg.grad_accum == "multisteps" and k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
  return tx
