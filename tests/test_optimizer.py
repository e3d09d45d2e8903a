"""Tests for llm_jax.optimizer: schedules and their two ends, the weight-decay mask, Muon's
partition, clipping, MultiSteps; and, per optimizer on a tiny model, that it learns a fixed
batch, resumes bitwise from a checkpoint and (schedule-free) saves its averaged parameters.
"""

import dataclasses
import functools
import math

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

import helpers

from llm_jax import checkpoint
from llm_jax import config
from llm_jax import model
from llm_jax import optimizer
from llm_jax import sharding
from llm_jax import train

LR, MIN_LR, WARMUP, TOTAL = 1e-3, 1e-4, 10, 110
OPTIMIZERS = config.OPTIMIZERS


def _cfg(**overrides):
  return config.load("configs/base.py", **overrides)


def _expected_lr(decay, step, lr=LR, min_lr=MIN_LR, warmup=WARMUP, total=TOTAL, fraction=0.2):
  """Closed-form reference schedule of 1-based step `step`, written independently of optax."""
  if step < warmup:
    return lr * step / warmup
  top = max(warmup, 1)  # the step that gets the peak
  t, d = min(step - top, total - top), total - top
  if decay == "cosine":
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t / d))
  if decay == "linear":
    return lr + (min_lr - lr) * t / d
  if decay == "exponential":
    return lr * (min_lr / lr) ** (t / d)
  if decay == "wsd":
    n = round(fraction * total)
    return lr if t <= d - n else lr + (min_lr - lr) * (t - (d - n)) / n
  return lr


DECAYS = ["cosine", "linear", "exponential", "constant", "wsd"]


@pytest.mark.parametrize("decay", DECAYS)
def test_schedule_matches_closed_form(decay):
  cfg = _cfg(learning_rate=LR, min_learning_rate=MIN_LR, warmup_steps=WARMUP, lr_decay=decay)
  sched = optimizer.lr_schedule(cfg, TOTAL)
  mid = WARMUP + (TOTAL - WARMUP) // 2
  for step in (1, WARMUP // 2, WARMUP, WARMUP + 1, mid, 95, TOTAL - 1, TOTAL, TOTAL + 50):
    np.testing.assert_allclose(float(sched(step)), _expected_lr(decay, step), rtol=1e-5,
                               atol=1e-9, err_msg=f"{decay} at step {step}")
  # Landmarks spelled out: the peak at the end of warmup, the floor at the last step.
  np.testing.assert_allclose(float(sched(WARMUP)), LR, rtol=1e-6)
  end = LR if decay == "constant" else MIN_LR
  np.testing.assert_allclose(float(sched(TOTAL)), end, rtol=1e-5)
  if decay in ("cosine", "linear"):  # halfway: the mean of peak and floor
    np.testing.assert_allclose(float(sched(mid)), (LR + MIN_LR) / 2, rtol=1e-5)
  if decay == "exponential":  # halfway: the geometric mean
    np.testing.assert_allclose(float(sched(mid)), math.sqrt(LR * MIN_LR), rtol=1e-5)


@pytest.mark.parametrize("decay", DECAYS)
def test_first_step_gets_warmups_first_value_and_last_step_the_floor(decay):
  """Hand-computed ends: with 10 warmup steps to 1e-3, step 1 gets 1e-4 (not 0, a wasted
  update), and step 110, the last, gets the floor 1e-4 (not the value before it)."""
  cfg = _cfg(learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10, lr_decay=decay)
  sched = optimizer.lr_schedule(cfg, 110)
  np.testing.assert_allclose(float(sched(1)), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(float(sched(2)), 2e-4, rtol=1e-6)
  np.testing.assert_allclose(float(sched(110)), 1e-3 if decay == "constant" else 1e-4,
                             rtol=1e-5)
  if decay != "constant":
    assert float(sched(109)) > 1.0001e-4  # the floor is reached at the last step, not before


def test_wsd_holds_the_peak_then_decays_over_the_last_fraction():
  # 110 steps, decay_fraction 0.25: the last round(27.5) = 28 steps, 83 to 110, decay.
  cfg = _cfg(learning_rate=1e-3, min_learning_rate=0.0, warmup_steps=10, lr_decay="wsd",
             decay_fraction=0.25)
  sched = optimizer.lr_schedule(cfg, 110)
  got = {s: float(sched(s)) for s in (5, 10, 11, 50, 82, 83, 96, 110)}
  want = {5: 5e-4, 10: 1e-3, 11: 1e-3, 50: 1e-3, 82: 1e-3, 83: 1e-3 * 27 / 28,
          96: 1e-3 * 14 / 28, 110: 0.0}
  for s in want:
    np.testing.assert_allclose(got[s], want[s], rtol=1e-5, atol=1e-10, err_msg=f"step {s}")
  # A fraction larger than the steps after warmup decays from the end of warmup.
  cfg = _cfg(learning_rate=1e-3, min_learning_rate=0.0, warmup_steps=10, lr_decay="wsd",
             decay_fraction=1.0)
  sched = optimizer.lr_schedule(cfg, 20)
  np.testing.assert_allclose([float(sched(s)) for s in (10, 15, 20)], [1e-3, 5e-4, 0.0],
                             atol=1e-9)


def test_schedule_without_warmup_and_with_warmup_past_the_end():
  cfg = _cfg(learning_rate=LR, min_learning_rate=MIN_LR, warmup_steps=0, lr_decay="linear")
  sched = optimizer.lr_schedule(cfg, 101)  # step 1 is the peak, step 101 the floor
  np.testing.assert_allclose([float(sched(s)) for s in (1, 51, 101, 150)],
                             [LR, (LR + MIN_LR) / 2, MIN_LR, MIN_LR], rtol=1e-5)
  cfg = _cfg(learning_rate=LR, warmup_steps=200, lr_decay="cosine")
  sched = optimizer.lr_schedule(cfg, 50)  # the run ends a quarter into the warmup
  np.testing.assert_allclose([float(sched(s)) for s in (1, 50, 100, 300)],
                             [LR / 200, LR / 4, LR / 2, LR], rtol=1e-5)


def test_updates_use_the_schedule_of_their_step():
  """The optax chain gets lr(1) on its first update and lr(total) on its last: plain SGD's
  update is -lr * gradient, so each update reads back the rate it used."""
  total = 30
  cfg = _cfg(optimizer="sgd", momentum=0.0, weight_decay=0.0, max_grad_norm=0.0,
             learning_rate=1e-2, min_learning_rate=1e-3, warmup_steps=4, lr_decay="cosine")
  tx = optimizer.make_optimizer(cfg, total)
  params = {"w": jnp.ones((3,))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  used = []
  for _ in range(total):
    updates, state = update({"w": jnp.ones((3,))}, state, params)
    used.append(-float(updates["w"][0]))
  want = [_expected_lr("cosine", s, 1e-2, 1e-3, 4, total) for s in range(1, total + 1)]
  np.testing.assert_allclose(used, want, rtol=1e-5)
  assert used[0] == pytest.approx(2.5e-3) and used[-1] == pytest.approx(1e-3)


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
  for _ in range(4):  # lr = lr/2, lr, lr, lr
    updates, state = update(zeros, state, params)
    params = optax.apply_updates(params, updates)
  shrunk = 2.0 * (1 - lr / 2 * wd) * (1 - lr * wd) ** 3
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
  # Two real steps (lr 1e-2 then 7.75e-3: the schedule advanced once per k calls, not per call).
  _, ref_first = _run(plain, params0, means[:1])
  _, ref_second = _run(plain, params0, means)
  check = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  jax.tree.map(check, after_first, ref_first)
  jax.tree.map(check, params, ref_second)
  assert not np.allclose(np.asarray(after_first["lm_head"]["kernel"]), 2.0)


# --- the model's parameters: which leaves decay, which get Muon ----------------------------------

# Every leaf of one block of the model below: (decayed, Muon's (reduction, output) axes or None).
# q/k/v [D, N, H] are one [D, N*H] matrix, out [N, H, D] one [N*H, D]; the rest goes to AdamW.
BLOCK_LEAVES = {
    "attn/query/kernel": (True, (0, (1, 2))), "attn/query/bias": (False, None),
    "attn/key/kernel": (True, (0, (1, 2))), "attn/key/bias": (False, None),
    "attn/value/kernel": (True, (0, (1, 2))), "attn/value/bias": (False, None),
    "attn/out/kernel": (True, ((0, 1), 2)), "attn/out/bias": (False, None),
    "attn/query_norm/scale": (False, None), "attn/key_norm/scale": (False, None),
    "attn_norm/scale": (False, None), "attn_norm/bias": (False, None),
    "mlp/wi_gate/kernel": (True, (0, 1)), "mlp/wi_gate/bias": (False, None),
    "mlp/wi_up/kernel": (True, (0, 1)), "mlp/wi_up/bias": (False, None),
    "mlp/wo/kernel": (True, (0, 1)), "mlp/wo/bias": (False, None),
    "mlp_norm/scale": (False, None), "mlp_norm/bias": (False, None),
}
TOP_LEAVES = {  # embeddings decay only with decay_embeddings (False here)
    "embed/embedding": (False, None), "pos_embed/embedding": (False, None),
    "final_norm/scale": (False, None), "final_norm/bias": (False, None),
    "lm_head/kernel": (True, None),
}
MODEL = model.ModelConfig(vocab_size=64, vocab_multiple=64, d_model=32, n_heads=4, n_kv_heads=2,
                          n_layers=2, d_ff=64, d_k=8, d_v=8, max_position_embeddings=16,
                          position_embedding="learned", activation="swiglu",
                          tie_embeddings=False, qk_norm=True)


def _expected_leaves(scan):
  """path -> (decayed, dims) for the whole model, unrolled or scanned (a leading layers axis)."""
  out = dict(TOP_LEAVES)
  shift = lambda a: tuple(x + 1 for x in a) if isinstance(a, tuple) else a + 1
  for path, (decayed, dims) in BLOCK_LEAVES.items():
    if scan:
      out[f"layers/{path}"] = (decayed, dims and (shift(dims[0]), shift(dims[1])))
    else:
      out.update({f"blocks_{i}/{path}": (decayed, dims) for i in range(MODEL.n_layers)})
  return out


def _model_shapes(scan):
  cfg = dataclasses.replace(MODEL, scan_layers=scan)
  return jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.key(0))


def _by_path(tree, is_leaf=None):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def _axes(a):
  return tuple(a) if isinstance(a, (tuple, list)) else a


@pytest.mark.parametrize("scan", [False, True])
def test_decay_mask_and_muon_partition_leaf_by_leaf(scan):
  shapes = _model_shapes(scan)
  want = _expected_leaves(scan)
  mask = _by_path(optimizer.weight_decay_mask(shapes, _cfg(decay_embeddings=False)))
  assert mask == {p: decayed for p, (decayed, _) in want.items()}
  is_dims = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)
  dims = _by_path(optimizer.muon_dimension_numbers(shapes), is_leaf=is_dims)
  got = {p: d and (_axes(d.reduction_axis), _axes(d.output_axis)) for p, d in dims.items()}
  assert got == {p: d for p, (_, d) in want.items()}
  # The built optimizer agrees: contrib.muon's momentum exists for exactly the Muon leaves, and
  # the AdamW beside it holds moments for exactly the others.
  state = jax.eval_shape(optimizer.make_optimizer(_cfg(optimizer="muon"), 10).init, shapes)
  muon_state = next(x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax.contrib.MuonState))
      if isinstance(x, optax.contrib.MuonState))
  adam_state = next(x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
      if isinstance(x, optax.ScaleByAdamState) and jax.tree.leaves(x.mu))
  assert set(_by_path(muon_state.mu)) == {p for p, (_, d) in want.items() if d}
  assert set(_by_path(adam_state.mu)) == {p for p, (_, d) in want.items() if not d}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_decay_moves_exactly_the_masked_leaves(name):
  """With zero gradients only weight decay acts: the first update is -rate * weight_decay *
  param on the masked leaves and nothing elsewhere. The rate is the learning rate, Muon's own on
  its matrices, and for Nesterov SGD (decay added to the gradient) 1.9 x the learning rate."""
  lr, muon_lr, wd = 1e-2, 5e-2, 0.1
  cfg = _cfg(optimizer=name, learning_rate=lr, muon_learning_rate=muon_lr, weight_decay=wd,
             warmup_steps=0, lr_decay="constant", max_grad_norm=0.0, momentum=0.9,
             nesterov=True)
  shapes = _model_shapes(False)
  params = helpers.random_params(shapes, seed=3)
  tx = optimizer.make_optimizer(cfg, 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  updates, params = _by_path(updates), _by_path(params)
  for path, (decayed, dims) in _expected_leaves(False).items():
    rate = muon_lr if name == "muon" and dims else 1.9 * lr if name == "sgd" else lr
    want = -rate * wd * np.asarray(params[path]) if decayed else 0.0
    # atol: schedule-free recomputes its average from y and z, a rounding of ~1e-8.
    np.testing.assert_allclose(np.asarray(updates[path]), want, rtol=1e-5, atol=1e-7,
                               err_msg=path)


def _newton_schulz(g, steps=5, coeffs=(3.4445, -4.7750, 2.0315)):
  """Muon's quintic Newton-Schulz orthogonalisation of one matrix, in float64 numpy."""
  x = np.asarray(g, np.float64)
  wide = x.shape[0] <= x.shape[1]
  x = x if wide else x.T
  x = x / (np.linalg.norm(x) + 1e-8)
  for _ in range(steps):
    a = x @ x.T
    x = coeffs[0] * x + (coeffs[1] * a + coeffs[2] * a @ a) @ x
  return x if wide else x.T


@pytest.mark.parametrize("scan", [False, True])
def test_muon_orthogonalises_each_projection_as_its_matrix(scan):
  """Muon's first update of q [D, N, H] is NS(G as [D, N*H]), of out [N, H, D] NS(G as
  [N*H, D]), of wo [F, D] NS(G), each scaled by sqrt(max(1, fan_out / fan_in)); per layer."""
  cfg = _cfg(optimizer="muon", learning_rate=1e-3, muon_learning_rate=0.02, warmup_steps=0,
             lr_decay="constant", weight_decay=0.0, max_grad_norm=0.0)
  shapes = _model_shapes(scan)
  params = helpers.random_params(shapes, seed=1)
  grads = helpers.random_params(shapes, seed=2, std=1.0)
  tx = optimizer.make_optimizer(cfg, 10)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  updates, grads = _by_path(updates), _by_path(grads)
  d, n, h, f = MODEL.d_model, MODEL.n_heads, MODEL.d_k, MODEL.d_ff
  for name, as_matrix in (("attn/query/kernel", (d, n * h)), ("attn/out/kernel", (n * h, d)),
                          ("mlp/wo/kernel", (f, d))):
    for layer in range(MODEL.n_layers):
      key = f"layers/{name}" if scan else f"blocks_{layer}/{name}"
      g = np.asarray(grads[key])[layer] if scan else np.asarray(grads[key])
      u = np.asarray(updates[key])[layer] if scan else np.asarray(updates[key])
      fan_in, fan_out = as_matrix
      want = -0.02 * math.sqrt(max(1.0, fan_out / fan_in)) * _newton_schulz(
          g.reshape(as_matrix))
      np.testing.assert_allclose(u.reshape(as_matrix), want, rtol=2e-3, atol=2e-5,
                                 err_msg=key)


# --- every optimizer on the tiny model: learns, resumes bitwise, saves what it evaluates --------

# Learning rates that move this tiny model in a few steps (Lion's sign updates want ~10x less;
# Adafactor's are relative to each parameter's scale; SGD's are raw gradient steps).
LEARNING_RATES = {"adamw": 1e-2, "lion": 3e-3, "adafactor": 1e-1, "sgd": 1.0, "muon": 1e-2,
                  "schedule_free_adamw": 1e-2}
# One block and no biases: compiling the step is this test's cost, and it grows with the leaves.
TINY = dict(vocab_size=64, vocab_multiple=64, d_model=32, n_heads=4, n_kv_heads=2, n_layers=1,
            max_seq_len=16, micro_batch_size=4, activation="swiglu", use_bias=False,
            tie_embeddings=False, qk_norm=True, warmup_steps=2, lr_decay="cosine",
            muon_learning_rate=0.05, adafactor_min_dim_size_to_factor=16,
            sample_every_eval=False)


@functools.lru_cache(maxsize=None)
def _trainer(name):
  cfg = _cfg(**TINY, optimizer=name, learning_rate=LEARNING_RATES[name])
  return train.Trainer(cfg, 12, mesh=sharding.make_mesh(cfg, jax.devices()[:1]))


def _fixed_batch():
  seq = np.random.default_rng(0).integers(0, 64, size=(1, 4, 17)).astype(np.int32)
  return {"inputs": seq[..., :-1], "targets": seq[..., 1:]}


def _data_iter():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _host(state):
  """Params and optimizer state as numpy (the step donates the device buffers)."""
  return jax.tree.map(np.asarray, jax.device_get((state.params, state.opt_state)))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_learns_a_fixed_batch_and_resumes_bitwise(name, tmp_path):
  """Six steps on one batch lower its loss; a run restored from its step-3 checkpoint ends in
  the same params and optimizer state to the bit; the checkpoint's `params` (what eval and
  sample load) are schedule-free's average x = (y - (1 - b1) z) / b1, computed here by hand."""
  trainer = _trainer(name)
  batch = _fixed_batch()
  state = jax.device_put(train.TrainState(
      step=jnp.zeros((), jnp.int32), params=helpers.random_params(trainer.abstract_params),
      opt_state=trainer.tx.init(helpers.random_params(trainer.abstract_params)),
      rng=jax.random.key(0)), trainer.state_shardings)
  workdir = str(tmp_path)
  ckpt = checkpoint.Checkpointer(workdir, trainer.cfg, steps_per_epoch=100)
  losses = []
  try:
    for step in range(1, 7):
      state, out = trainer.train_step(state, batch)
      losses.append(float(out["loss"]))
      if step == 3:
        at_3 = _host(state)
        ckpt.save(3, state, _data_iter(), params=trainer.eval_params(state))
        ckpt.wait()
    final = _host(state)
  finally:
    ckpt.close()
  assert losses[-1] < losses[0] - 0.5, losses

  ckpt = checkpoint.Checkpointer(workdir, trainer.cfg, steps_per_epoch=100)
  try:
    state = ckpt.restore_or_init(trainer, _data_iter())
  finally:
    ckpt.close()
  assert int(state.step) == 3
  for _ in range(3):
    state, _ = trainer.train_step(state, batch)
  resumed = _host(state)
  helpers.assert_bitwise_equal(resumed, final)

  saved, _, _, _ = checkpoint.load_params(workdir, trainer.abstract_params,
                                          trainer.param_shardings)
  saved = jax.tree.map(np.asarray, jax.device_get(saved))
  if name != "schedule_free_adamw":
    helpers.assert_bitwise_equal(saved, at_3[0])
    return
  params, sf = at_3[0], at_3[1][1]  # the ScheduleFreeState, after clipping in the chain
  b1 = trainer.cfg.beta1
  want = jax.tree.map(lambda y, z: (y - (1 - b1) * z) / b1, params, sf.z)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), saved, want)
  diff = max(float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(saved), jax.tree.leaves(params)))
  assert diff > 1e-4  # the average is not the trained params: the check above can fail
