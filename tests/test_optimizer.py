"""Tests for llm_jax.optimizer: schedules, weight-decay mask, clipping, MultiSteps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

from llm_jax import config
from llm_jax import optimizer

LR, MIN_LR, WARMUP, TOTAL = 1e-3, 1e-4, 10, 110


def _cfg(**overrides):
  return config.load("configs/base.py", **overrides)


def _expected_lr(decay, step, lr=LR, min_lr=MIN_LR, warmup=WARMUP, total=TOTAL):
  """Closed-form reference schedule, written independently of optax."""
  if step < warmup:
    return lr * step / warmup
  t, d = min(step - warmup, total - warmup), total - warmup
  if decay == "cosine":
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t / d))
  if decay == "linear":
    return lr + (min_lr - lr) * t / d
  if decay == "exponential":
    return lr * (min_lr / lr) ** (t / d)
  return lr


@pytest.mark.parametrize("decay", ["cosine", "linear", "exponential", "constant"])
def test_schedule_matches_closed_form(decay):
  cfg = _cfg(learning_rate=LR, min_learning_rate=MIN_LR, warmup_steps=WARMUP, lr_decay=decay)
  sched = optimizer.lr_schedule(cfg, TOTAL)
  mid = WARMUP + (TOTAL - WARMUP) // 2
  for step in (0, WARMUP // 2, WARMUP, mid, TOTAL - 1, TOTAL, TOTAL + 50):
    np.testing.assert_allclose(float(sched(step)), _expected_lr(decay, step), rtol=1e-5,
                               atol=1e-9, err_msg=f"{decay} at step {step}")
  # Landmarks spelled out: 0 at the start, the peak after warmup, the floor at the end.
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(WARMUP)), LR, rtol=1e-6)
  end = LR if decay == "constant" else MIN_LR
  np.testing.assert_allclose(float(sched(TOTAL)), end, rtol=1e-5)
  if decay in ("cosine", "linear"):  # halfway: the mean of peak and floor
    np.testing.assert_allclose(float(sched(mid)), (LR + MIN_LR) / 2, rtol=1e-5)
  if decay == "exponential":  # halfway: the geometric mean
    np.testing.assert_allclose(float(sched(mid)), math.sqrt(LR * MIN_LR), rtol=1e-5)


def test_schedule_without_warmup_and_with_warmup_past_the_end():
  cfg = _cfg(learning_rate=LR, min_learning_rate=MIN_LR, warmup_steps=0, lr_decay="linear")
  sched = optimizer.lr_schedule(cfg, 100)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 50, 100)],
                             [LR, (LR + MIN_LR) / 2, MIN_LR], rtol=1e-5)
  cfg = _cfg(learning_rate=LR, warmup_steps=200, lr_decay="cosine")
  sched = optimizer.lr_schedule(cfg, 50)  # the run ends a quarter into the warmup
  np.testing.assert_allclose([float(sched(s)) for s in (0, 50, 100, 300)],
                             [0.0, LR / 4, LR / 2, LR], rtol=1e-5)


def _params():
  return {
      "embed": {"embedding": jnp.ones((16, 4))},
      "pos_embed": {"embedding": jnp.ones((8, 4))},
      "block_0": {
          "attn": {"qkv": {"kernel": jnp.ones((4, 12)), "bias": jnp.ones((12,))}},
          "ln_1": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))},
      },
      # A scanned stack: per-layer vectors are 2-D here, yet never decayed.
      "layers": {"mlp": {"kernel": jnp.ones((2, 4, 8)), "bias": jnp.ones((2, 8))},
                 "norm": {"scale": jnp.ones((2, 4))}},
      "ln_f": {"scale": jnp.ones((4,))},
      "lm_head": {"kernel": jnp.ones((4, 16))},
  }


def _expected_mask(decay_embeddings):
  return {
      "embed": {"embedding": decay_embeddings},
      "pos_embed": {"embedding": decay_embeddings},
      "block_0": {"attn": {"qkv": {"kernel": True, "bias": False}},
                  "ln_1": {"scale": False, "bias": False}},
      "layers": {"mlp": {"kernel": True, "bias": False}, "norm": {"scale": False}},
      "ln_f": {"scale": False},
      "lm_head": {"kernel": True},
  }


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_mask(decay_embeddings):
  cfg = _cfg(decay_embeddings=decay_embeddings)
  assert optimizer.weight_decay_mask(_params(), cfg) == _expected_mask(decay_embeddings)
  frozen = optimizer.weight_decay_mask(FrozenDict(_params()), cfg)
  assert isinstance(frozen, FrozenDict)
  assert frozen.unfreeze() == _expected_mask(decay_embeddings)


def test_decay_shrinks_only_masked_params():
  wd, lr = 0.1, 1e-2
  cfg = _cfg(learning_rate=lr, warmup_steps=2, lr_decay="constant", weight_decay=wd,
             max_grad_norm=1.0)
  tx = optimizer.make_optimizer(cfg, 10)
  params = jax.tree.map(lambda x: 2.0 * x, _params())
  state = tx.init(params)
  update = jax.jit(tx.update)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(4):  # lr = 0, lr/2, lr, lr
    updates, state = update(zeros, state, params)
    params = optax.apply_updates(params, updates)
  shrunk = 2.0 * (1 - lr / 2 * wd) * (1 - lr * wd) ** 2
  mask = _expected_mask(False)
  for (path, p), decayed in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree.leaves(mask)):
    np.testing.assert_allclose(np.asarray(p), shrunk if decayed else 2.0, rtol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def _grads(scale, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32),
                      _params())


def _global_norm(tree):
  return math.sqrt(sum(float(jnp.sum(x * x)) for x in jax.tree.leaves(tree)))


def _run(tx, params, grads_seq):
  state = tx.init(params)
  update = jax.jit(tx.update)  # one compile instead of op-by-op dispatch per call
  out = []
  for g in grads_seq:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out, params


def test_clipping_makes_a_huge_gradient_act_like_one_of_max_norm():
  max_norm = 0.5
  kw = dict(learning_rate=1e-2, warmup_steps=0, lr_decay="constant", weight_decay=0.0)
  tx = optimizer.make_optimizer(_cfg(max_grad_norm=max_norm, **kw), 10)
  huge, nxt = _grads(1e4, 0), _grads(0.1, 1)
  scaled = jax.tree.map(lambda g: g * (max_norm / _global_norm(huge)), huge)
  # A second, small gradient makes Adam's moments remember the first one's magnitude.
  upd_huge, _ = _run(tx, _params(), [huge, nxt])
  upd_scaled, _ = _run(tx, _params(), [scaled, nxt])
  for a, b in zip(upd_huge, upd_scaled):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-9), a, b)
  # Without clipping the huge gradient does change the second update: the check above can fail.
  noclip = optimizer.make_optimizer(_cfg(max_grad_norm=0.0, **kw), 10)
  upd_noclip, _ = _run(noclip, _params(), [huge, nxt])
  diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in
             zip(jax.tree.leaves(upd_noclip[1]), jax.tree.leaves(upd_huge[1])))
  assert diff > 1e-4


def test_multisteps_equals_one_step_on_the_mean_gradient():
  k = 4
  common = dict(learning_rate=1e-2, min_learning_rate=1e-3, warmup_steps=0, lr_decay="linear",
                weight_decay=0.1, max_grad_norm=1.0)
  accum = optimizer.make_optimizer(
      _cfg(gradient_accumulation_steps=k, grad_accum="multisteps", **common), 5)
  plain = optimizer.make_optimizer(_cfg(**common), 5)
  # Micro-gradients of very different norms: clipping each one (the wrong order) would differ
  # from clipping their mean, which has norm > max_grad_norm too.
  micro = [_grads(s, i) for i, s in enumerate((0.05, 3.0, 0.2, 1.0, 0.5, 0.1, 2.0, 0.3))]
  means = [jax.tree.map(lambda *g: sum(g) / k, *micro[i:i + k]) for i in (0, k)]
  assert _global_norm(means[0]) > 1.0

  params0 = jax.tree.map(lambda x: 2.0 * x, _params())
  state = accum.init(params0)
  update = jax.jit(accum.update)
  params = params0
  for i, g in enumerate(micro):
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    if i == k - 2:
      jax.tree.map(np.testing.assert_array_equal, params, params0)  # unchanged on calls 1..3
    if i == k - 1:
      after_first = params
  # Two real steps (lr 1e-2 then 8.2e-3: the schedule advanced once per k calls, not per call).
  _, ref_first = _run(plain, params0, means[:1])
  _, ref_second = _run(plain, params0, means)
  check = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  jax.tree.map(check, after_first, ref_first)
  jax.tree.map(check, params, ref_second)
  assert not np.allclose(np.asarray(after_first["lm_head"]["kernel"]), 2.0)
