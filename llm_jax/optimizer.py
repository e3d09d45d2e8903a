"""The optax chain: learning-rate schedule, weight-decay mask, clipping, the optimizer, accumulation.

Owns everything that turns gradients into parameter updates, for every `cfg.optimizer` (adamw,
lion, adafactor, sgd, muon, schedule_free_adamw), and which parameters a run evaluates and saves
(`eval_params`: schedule-free's averaged ones).

Step counting. Optimizer step s (s = 1, 2, ..., total_steps) is the s-th update of the
parameters, after any gradient accumulation: with `grad_accum="multisteps"` optax.MultiSteps
advances the inner count only on real updates, and with `grad_accum="scan"` the train step
averages micro-batch gradients itself before calling the optimizer once. `lr_schedule(cfg,
total)(s)` is the learning rate step s uses, the value train.py logs at step s; optax counts
updates from 0, so the chain is given `schedule(count + 1)`. Step 1 gets warmup's first non-zero
value and step total_steps the floor: no update is wasted at rate 0, none goes past the floor.

    tx = make_optimizer(cfg, total_steps)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params_to_evaluate = eval_params(opt_state, params)
"""

import logging

import jax
import optax

from llm_jax import metrics

# Parameter leaf names that are never decayed: decaying biases and norm scales only pulls the
# network toward a worse function (a zero scale kills the layer); it does not regularize.
_NEVER_DECAYED = ("bias", "scale")


def lr_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Learning rate of optimizer step s (1-based): linear warmup, then `cfg.lr_decay`.

  Warmup: step s <= W = cfg.warmup_steps gets lr * s / W, so step 1 gets lr / W and step W the
  peak lr = cfg.learning_rate. The peak is at step P = max(W, 1); after it, with t = s - P,
  D = total_steps - P and min = cfg.min_learning_rate:
    cosine:      min + (lr - min) * (1 + cos(pi * t / D)) / 2
    linear:      lr + (min - lr) * t / D
    exponential: lr * (min / lr) ** (t / D)
    constant:    lr
    wsd:         lr until the last n = round(decay_fraction * total_steps) steps (at most D),
                 then linearly to min: lr + (min - lr) * (t - (D - n)) / n over them
  so the last step, s = total_steps, gets `min` (constant: lr), and the value holds after it.
  When warmup_steps >= total_steps the run ends inside the warmup (the ramp keeps its slope, so
  lowering total_steps never raises the lr a given step sees) and stays at the peak afterwards.

  Args:
    cfg: finalized config (learning_rate, min_learning_rate, warmup_steps, lr_decay,
      decay_fraction).
    total_steps: optimizer steps in the whole run.

  Returns:
    a schedule: step s (int scalar, may be traced; 1-based) -> float32 learning rate.
  """
  peak = float(cfg.learning_rate)
  floor = float(cfg.min_learning_rate)
  warmup = int(cfg.warmup_steps)
  total = int(total_steps)
  decay_steps = total - max(warmup, 1)
  if warmup >= total and warmup > 0:
    logging.warning(
        "warmup_steps=%d >= total optimizer steps %d: the learning rate never decays (and "
        "reaches its peak %g only if they are equal); lower warmup_steps (a few %% of the run "
        "is usual) or train longer", warmup, total, peak)
  if decay_steps <= 0 or cfg.lr_decay == "constant":
    decay = optax.constant_schedule(peak)
  elif cfg.lr_decay == "cosine":
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
  elif cfg.lr_decay == "wsd":
    n = min(decay_steps, max(1, round(float(cfg.decay_fraction) * total)))
    decay = optax.linear_schedule(init_value=peak, end_value=floor, transition_steps=n,
                                  transition_begin=decay_steps - n)
  else:
    raise ValueError(f"lr_decay={cfg.lr_decay!r} is not one of cosine, linear, exponential, "
                     f"constant, wsd")
  if warmup == 0:
    return lambda step: decay(step - 1)
  ramp = optax.linear_schedule(init_value=0.0, end_value=peak, transition_steps=warmup)
  return optax.join_schedules([ramp, decay], [warmup])


def _per_update(schedule):
  """A 1-based step schedule as optax calls it: with the count of updates already made."""
  return lambda count: schedule(count + 1)


def weight_decay_mask(params, cfg):
  """Which parameters weight decay shrinks (every optimizer): bools with the structure of `params`.

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


def _muon_dims(path, leaf):
  """The matrix Muon orthogonalises for one parameter leaf, or None for the AdamW ones."""
  del leaf
  names = metrics.path_names(path)
  if len(names) < 3 or names[-1] != "kernel":
    return None
  lead = 1 if "layers" in names else 0  # nn.scan stacks the blocks on a leading axis: a batch axis
  module, block = names[-2], names[-3]
  dims = optax.contrib.MuonDimensionNumbers
  if block == "attn" and module in ("query", "key", "value"):  # [L?, D, N, H] -> [D, N*H]
    return dims(reduction_axis=lead, output_axis=(lead + 1, lead + 2))
  if block == "attn" and module == "out":  # [L?, N, H, D] -> [N*H, D]
    return dims(reduction_axis=(lead, lead + 1), output_axis=lead + 2)
  if block == "mlp":  # wi, wi_gate, wi_up [L?, D, F]; wo [L?, F, D]
    return dims(reduction_axis=lead, output_axis=lead + 1)
  return None


def muon_dimension_numbers(params):
  """Muon's leaves and their (d_in, d_out) matrices: a tree of MuonDimensionNumbers or None.

  The attention and MLP projection kernels get Muon, each as the matrix of its own map: q/k/v
  [D, N, H] as one [D, N*H] matrix, out [N, H, D] as [N*H, D], the MLP kernels as they are; the
  `layers` axis of scanned blocks is a batch axis (one matrix per layer). Everything else is
  None, for AdamW: the token and position embeddings, the untied output head, norm scales and
  biases. optax's own default (every 2-D leaf) would orthogonalise the embedding and, under
  scan_layers, the [L, D] norm scales, while leaving the 3-D attention kernels to AdamW.
  """
  return jax.tree_util.tree_map_with_path(_muon_dims, params)


def _muon_labels(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: "adamw" if _muon_dims(path, leaf) is None else "muon", params)


def _optimizer(cfg, schedule) -> optax.GradientTransformation:
  """cfg.optimizer with its knobs, following `schedule` and decaying what the mask says."""
  lr = _per_update(schedule)
  wd = float(cfg.weight_decay)
  mask = lambda p: weight_decay_mask(p, cfg)  # pylint: disable=unnecessary-lambda-assignment
  name = cfg.optimizer
  if name == "adamw":
    return optax.adamw(lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.epsilon, weight_decay=wd,
                       mask=mask)
  if name == "lion":
    return optax.lion(lr, b1=cfg.beta1, b2=cfg.beta2, weight_decay=wd, mask=mask)
  if name == "sgd":
    # Weight decay as in PyTorch's SGD: added to the gradient, so it goes through the momentum.
    momentum = float(cfg.momentum) or None
    return optax.chain(optax.add_decayed_weights(wd, mask),
                       optax.sgd(lr, momentum=momentum, nesterov=bool(cfg.nesterov)))
  if name == "adafactor":
    # optax adds weight_decay_rate * param unscaled by the learning rate; a schedule of
    # lr * weight_decay makes it the decoupled decay the other optimizers apply.
    clip = float(cfg.adafactor_clipping_threshold)
    return optax.adafactor(
        lr, min_dim_size_to_factor=cfg.adafactor_min_dim_size_to_factor,
        decay_rate=cfg.adafactor_decay_rate,
        multiply_by_parameter_scale=cfg.adafactor_multiply_by_parameter_scale,
        clipping_threshold=clip or None, momentum=cfg.adafactor_momentum,
        factored=cfg.adafactor_factored,
        weight_decay_rate=(lambda count: wd * lr(count)) if wd else None,
        weight_decay_mask=mask)
  if name == "muon":
    # contrib.muon gets only the projection kernels: its own AdamW branch would decay every leaf
    # it holds (adam_weight_decay has no mask), so the rest goes to a masked AdamW beside it.
    # Both follow the run's schedule, Muon's scaled to peak at muon_learning_rate.
    ratio = float(cfg.muon_learning_rate) / float(cfg.learning_rate)
    muon = optax.contrib.muon(
        lambda count: ratio * lr(count), ns_steps=cfg.muon_ns_steps, beta=cfg.muon_momentum,
        weight_decay=wd, weight_decay_mask=mask, nesterov=bool(cfg.nesterov),
        adam_learning_rate=lr, muon_weight_dimension_numbers=muon_dimension_numbers,
        consistent_rms=cfg.muon_consistent_rms)
    adamw = optax.adamw(lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.epsilon, weight_decay=wd,
                        mask=mask)
    return optax.partition({"muon": muon, "adamw": adamw}, _muon_labels)
  if name == "schedule_free_adamw":
    # optax.contrib.schedule_free_adamw without its unmasked weight decay. The wrapper calls
    # its learning rate with its own 1-based step count, the base optimizer with optax's count.
    base = optax.chain(
        optax.scale_by_rms(decay=cfg.beta2, eps=cfg.epsilon, eps_in_sqrt=False,
                           bias_correction=True),
        optax.add_decayed_weights(wd, mask),
        optax.scale_by_learning_rate(lr))
    return optax.contrib.schedule_free(base, learning_rate=schedule, b1=cfg.beta1,
                                       weight_lr_power=cfg.weight_lr_power)
  raise ValueError(f"optimizer={name!r} is not one of adamw, lion, adafactor, sgd, muon, "
                   f"schedule_free_adamw")


def make_optimizer(cfg, total_steps: int, schedule=None) -> optax.GradientTransformation:
  """clip_by_global_norm -> cfg.optimizer(lr_schedule, weight_decay_mask), maybe in MultiSteps.

  Every optimizer follows the same schedule (muon's projection kernels scaled to peak at
  muon_learning_rate) and decays exactly the leaves `weight_decay_mask` selects, by
  learning rate x weight_decay per step (decoupled; SGD adds it to the gradient, as PyTorch).

  With grad_accum="multisteps" and gradient_accumulation_steps = k > 1, each `update` call
  takes one micro-batch gradient; the parameters change (and the schedule advances) on every
  k-th call, with the mean of the k gradients. The whole chain sits inside MultiSteps so that
  clipping sees the averaged gradient, as a single large batch would. Before the k-th call the
  returned updates are zeros. Whether a call updated: `opt_state.mini_step == 0`.

  Args:
    cfg: finalized config (optimizer and its knobs, learning rate and schedule fields,
      weight_decay, decay_embeddings, max_grad_norm, grad_accum, gradient_accumulation_steps).
    total_steps: optimizer steps in the run (parameter updates, not micro-batches).
    schedule: the run's `lr_schedule(cfg, total_steps)` if the caller already built it.

  Returns:
    an optax GradientTransformation whose update needs `params` (for weight decay).
  """
  schedule = lr_schedule(cfg, total_steps) if schedule is None else schedule
  tx = _optimizer(cfg, schedule)
  if cfg.max_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)
  k = int(cfg.gradient_accumulation_steps)
  if cfg.grad_accum == "multisteps" and k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
  return tx


def averages_params(cfg) -> bool:
  """Whether the optimizer evaluates other parameters than it trains (schedule-free's average)."""
  return cfg.optimizer == "schedule_free_adamw"


def eval_params(opt_state, params):
  """The parameters to evaluate, sample from and save: schedule-free's average x, else params.

  Schedule-free trains at y, an interpolation between its average x and its iterate z (in the
  optimizer state); x is the model it promises, recovered by optax's
  `schedule_free_eval_params`. Works on the whole chain's state (clipping, MultiSteps) and
  under jit.
  """
  is_sf = lambda x: isinstance(x, optax.contrib.ScheduleFreeState)  # pylint: disable=unnecessary-lambda-assignment
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_sf) if is_sf(s)]
  if not found:
    return params
  return optax.contrib.schedule_free_eval_params(found[0], params)
