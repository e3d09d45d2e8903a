"""Training properties: a tiny task is memorized, gradient accumulation (scan and MultiSteps)
equals one large batch, the loss against a numpy reference, optimizer-step counting, padded
evaluation, the divergence guard, and the files a short `train.run` leaves behind.

Compiles dominate this module's time, so params are drawn with numpy from the abstract shapes
(no compiled init) and trainers are shared between tests through `_trainer`'s cache.
"""

import functools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers

from llm_jax import checkpoint
from llm_jax import config
from llm_jax import data
from llm_jax import errors
from llm_jax import metrics
from llm_jax import sharding
from llm_jax import train

BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "base.py")
VOCAB, T = 50, 16
TINY = dict(vocab_size=VOCAB, vocab_multiple=64, d_model=32, n_heads=4, n_layers=2,
            max_seq_len=T, warmup_steps=0, lr_decay="constant", sample_every_eval=False)


def _cfg(**overrides):
  return config.load(BASE_CONFIG, **{**TINY, **overrides})


@functools.lru_cache(maxsize=None)
def _trainer(total_steps=10, **overrides):
  """A Trainer on one device (whatever the process has), so rows of 2 always divide the mesh."""
  cfg = _cfg(**overrides)
  return train.Trainer(cfg, total_steps, mesh=sharding.make_mesh(cfg, jax.devices()[:1]))


def _params(trainer, seed=0, std=0.05):
  """Fresh random params of the model's shapes (new buffers each call: steps donate them)."""
  return helpers.random_params(trainer.abstract_params, seed, std)


def _state(trainer, seed=0):
  """A fresh TrainState placed as the step's output is, so the step compiles only once."""
  params = _params(trainer, seed)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=trainer.tx.init(params), rng=jax.random.key(seed))
  return jax.device_put(state, trainer.state_shardings)


def _rows(rng, n, t=T, vocab=VOCAB):
  seq = rng.integers(4, vocab, size=(n, t + 1)).astype(np.int32)
  return seq[:, :-1], seq[:, 1:]


def _np(tree):
  return jax.tree.map(lambda x: np.array(x, np.float64), jax.device_get(tree))


def _log_softmax(logits):
  """float64 log-softmax by hand, and the log-partition function."""
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  lse = m + np.log(np.exp(logits - m).sum(-1, keepdims=True))
  return logits - lse, lse[..., 0]


def _token_nll(logits, targets):
  logp, _ = _log_softmax(logits)
  return -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


# --- loss -------------------------------------------------------------------------------------


def test_cross_entropy_matches_numpy_reference_with_weights_and_z_loss():
  r = np.random.default_rng(0)
  v = 11
  logits = (3 * r.normal(size=(3, 5, v))).astype(np.float32)
  targets = r.integers(0, v, size=(3, 5)).astype(np.int32)
  weights = r.choice([0.0, 0.5, 1.0], size=(3, 5)).astype(np.float32)
  z_loss = 1e-2
  _, lse = _log_softmax(logits)
  want_nll = (_token_nll(logits, targets) * weights).sum()
  want_z = (z_loss * lse ** 2 * weights).sum()
  want_correct = ((logits.argmax(-1) == targets) * weights).sum()

  nll, z, correct, n = train.cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                           jnp.asarray(weights), z_loss)
  np.testing.assert_allclose(float(nll), want_nll, rtol=1e-5)
  np.testing.assert_allclose(float(z), want_z, rtol=1e-5)
  np.testing.assert_allclose(float(correct), want_correct, rtol=1e-6)
  np.testing.assert_allclose(float(n), weights.sum(), rtol=1e-6)
  assert want_z > 0.01 * want_nll  # the z term is large enough to be seen


def test_loss_fn_on_model_ignores_padded_vocab_and_matches_reference():
  trainer = _trainer()
  assert trainer.model_cfg.padded_vocab == 64 > VOCAB
  params = _params(trainer, std=0.3)  # large weights: logits far from uniform
  x, y = _rows(np.random.default_rng(1), 3)
  batch = {"inputs": jnp.asarray(x), "targets": jnp.asarray(y)}
  z_loss = 1e-3

  @jax.jit
  def forward(params, batch):
    logits = trainer.model.apply({"params": params}, batch["inputs"])
    return (logits, jax.nn.softmax(logits, axis=-1),
            train.loss_fn(params, trainer.model, batch, None, z_loss, deterministic=True))

  logits, probs, (total, ce) = jax.device_get(forward(params, batch))
  assert logits.shape == (3, T, 64)
  # Padded ids carry no probability and are never the argmax.
  assert np.all(probs[..., VOCAB:] == 0.0)
  assert np.all(logits.argmax(-1) < VOCAB)
  # Reference: a softmax over the real vocabulary only.
  _, lse = _log_softmax(logits[..., :VOCAB])
  want_ce = _token_nll(logits[..., :VOCAB], y).mean()
  assert want_ce > math.log(VOCAB) + 0.5  # far from uniform, so a wrong target would show
  np.testing.assert_allclose(float(ce), want_ce, rtol=1e-5)
  np.testing.assert_allclose(float(total), want_ce + z_loss * (lse ** 2).mean(), rtol=1e-5)


# --- training ---------------------------------------------------------------------------------


# Linear decay over 4 steps, so the two steps compared use different learning rates (a schedule
# advanced per micro-batch would show). epsilon is near the gradients' size and the clipping
# threshold lies between the full-batch gradient norm (~1.4) and the micro-batches' (~2.5): Adam
# is then sensitive to the gradient's scale, so summing instead of averaging, or clipping each
# micro-batch, would show as well.
ACCUM = dict(learning_rate=3e-3, lr_decay="linear", min_learning_rate=1e-3, epsilon=1e-3,
             max_grad_norm=2.0, weight_decay=0.1)


def _accum_trainer(accum, grad_accum):
  return _trainer(4, micro_batch_size=8 // accum, gradient_accumulation_steps=accum,
                  grad_accum=grad_accum, **ACCUM)


def test_tiny_memorization_task_loss_falls():
  # The accumulation tests' trainer (shared compile): after its 4-step decay the rate is 1e-3.
  trainer = _accum_trainer(1, "scan")
  x, y = _rows(np.random.default_rng(2), 8)
  batch = {"inputs": x[None], "targets": y[None]}  # [A=1, b=8, T], the same rows every step
  state = _state(trainer)
  losses = []
  for _ in range(200):
    state, out = trainer.train_step(state, batch)
    losses.append(float(out["loss"]))
  assert int(state.step) == 200
  assert abs(losses[0] - math.log(VOCAB)) < 0.3, losses[0]  # starts near uniform
  assert losses[-1] < 0.35 and losses[-1] < 0.1 * losses[0], losses[::20]


@pytest.mark.parametrize("grad_accum", ["scan", "multisteps"])
def test_gradient_accumulation_equals_one_big_batch(grad_accum):
  r = np.random.default_rng(3)
  batches = [_rows(r, 8) for _ in range(2)]

  def run_steps(accum, mode):
    trainer = _accum_trainer(accum, mode)
    state = _state(trainer)
    params, losses = [_np(state.params)], []
    for x, y in batches:
      shape = (accum, 8 // accum, T)
      state, out = trainer.train_step(state, {"inputs": x.reshape(shape),
                                              "targets": y.reshape(shape)})
      params.append(_np(state.params))
      losses.append(float(out["loss"]))
    return params, losses, int(state.step)

  ref_params, ref_losses, ref_step = run_steps(1, "scan")
  got_params, got_losses, got_step = run_steps(4, grad_accum)
  assert ref_step == got_step == 2
  for i in (1, 2):
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), ref_params[i], ref_params[i - 1])
    assert max(jax.tree.leaves(moved)) > 1e-3  # each step did move the params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 got_params[i], ref_params[i])
  if grad_accum == "scan":  # the mean of equal-sized micro-batch means is the batch mean
    np.testing.assert_allclose(got_losses, ref_losses, rtol=1e-5)


def test_multisteps_state_step_counts_optimizer_steps():
  accum = 4
  trainer = _accum_trainer(accum, "multisteps")  # shared with the test above: no new compile
  state = _state(trainer)
  r = np.random.default_rng(4)
  seen = []
  for _ in range(2):  # two optimizer steps of `accum` micro-batches each
    before = _np(state.params)
    for i in range(accum):
      x, y = _rows(r, 2)
      # The per-micro-batch step that Trainer.train_step loops over, with the same inputs.
      micro = sharding.global_batch({"inputs": x, "targets": y}, trainer.mesh)
      state, _ = trainer._train_step(state, micro)  # pylint: disable=protected-access
      seen.append(int(state.step))
      moved = any(not np.array_equal(a, b)
                  for a, b in zip(jax.tree.leaves(_np(state.params)), jax.tree.leaves(before)))
      assert moved == (i == accum - 1), (i, moved)
  assert seen == [0, 0, 0, 1, 1, 1, 1, 2]
  assert int(state.opt_state.gradient_step) == 2


# --- evaluation -------------------------------------------------------------------------------


def test_eval_padding_rows_do_not_change_the_loss():
  trainer = _trainer()
  params = _params(trainer, std=0.3)
  r = np.random.default_rng(5)
  x, y = _rows(r, 6)  # rows 4 and 5 are junk standing in for padding
  w = np.ones((6, T), np.float32)
  w[3, 9:] = 0.0  # a partly padded row
  w[4:] = 0.0
  padded = {"inputs": x, "targets": y, "weights": w}
  got = trainer.evaluate(params, [padded])
  assert got["tokens"] == 4 * T - 7

  # Reference: the real rows alone (no padding rows in the forward pass), masked by hand.
  logits = jax.device_get(jax.jit(trainer.model.apply)({"params": params}, x[:4]))[..., :VOCAB]
  nll, w4 = _token_nll(logits, y[:4]), w[:4]
  want = (nll * w4).sum() / w4.sum()
  assert abs(want - _token_nll(logits, y[:4]).mean()) > 1e-3  # the partial row's mask matters
  np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
  np.testing.assert_allclose(got["accuracy"],
                             ((logits.argmax(-1) == y[:4]) * w4).sum() / w4.sum(), rtol=1e-6)

  # Over several batches the loss is a mean per token, not a mean of the batches' means.
  w_one = np.zeros((6, T), np.float32)
  w_one[0] = 1.0
  both = trainer.evaluate(params, [padded, {"inputs": x, "targets": y, "weights": w_one}],
                          chars_per_token=3.0)
  want = ((nll * w4).sum() + nll[0].sum()) / (w4.sum() + T)
  assert abs(want - 0.5 * (got["loss"] + nll[0].mean())) > 1e-3
  np.testing.assert_allclose(both["loss"], want, rtol=1e-5)
  np.testing.assert_allclose(both["perplexity"], math.exp(want), rtol=1e-5)
  np.testing.assert_allclose(both["bits_per_char"], want / math.log(2) / 3.0, rtol=1e-5)
  assert trainer.evaluate(params, [padded, padded], max_batches=1)["tokens"] == 4 * T - 7


# --- divergence guard -------------------------------------------------------------------------


def test_check_loss_nan_inf_and_explosion():
  assert train._check_loss(1, 5.0, math.inf, 10.0) == 5.0
  assert train._check_loss(2, 3.0, 5.0, 10.0) == 3.0
  assert train._check_loss(3, 29.0, 3.0, 10.0) == 3.0  # below 10 x the running minimum
  with pytest.raises(train.TrainingDiverged, match=r"step 4\b.*learning_rate"):
    train._check_loss(4, 31.0, 3.0, 10.0)
  for bad in (math.nan, math.inf, -math.inf):
    with pytest.raises(train.TrainingDiverged, match=r"step 7\b.*learning_rate"):
      train._check_loss(7, bad, 3.0, 10.0)
  assert train._check_loss(5, 1e6, 3.0, 0.0) == 3.0  # factor 0 turns the explosion check off
  with pytest.raises(train.TrainingDiverged):
    train._check_loss(6, math.nan, 3.0, 0.0)  # but never the NaN check


# --- train.run on a text dataset --------------------------------------------------------------

WORDS = ("thou art the king of all that moves and breathes upon this earth where sorrow walks "
         "beside the merry fool who laughs at night and sleeps by day").split()


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("text")
  r = np.random.default_rng(0)
  for split, n_docs in (("train", 24), ("val", 3)):
    (tmp / split).mkdir()
    for i in range(n_docs):
      lines = [" ".join(r.choice(WORDS, r.integers(4, 10))).capitalize() + "."
               for _ in range(8)]
      (tmp / split / f"doc{i:03d}.txt").write_text("KING:\n" + "\n".join(lines) + "\n")
  return tmp


def _run_cfg(text_dir, tmp_path, **overrides):
  fields = dict(TINY, vocab_size=320, micro_batch_size=max(4, jax.device_count()),
                dataset=f"text:{text_dir}/train", validation=f"{text_dir}/val/*.txt",
                data_dir=str(tmp_path / "cache"), tokenizer_path=str(tmp_path / "tok.model"),
                prefetch=1)
  fields.update(overrides)
  return config.load(BASE_CONFIG, **fields)


def _saved_steps(workdir):
  ckpt_dir = checkpoint.checkpoint_dir(str(workdir))
  return sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []


def test_run_stops_on_divergence_before_saving(text_dir, tmp_path, capsys):
  cfg = _run_cfg(text_dir, tmp_path, learning_rate=1e9, max_grad_norm=0.0, num_train_steps=20,
                 log_every=1, save_steps=1, eval_steps=0)
  workdir = tmp_path / "run"
  assert train.run(cfg, str(workdir)) == errors.DIVERGED
  captured = capsys.readouterr()
  out = captured.out + captured.err
  # Step 1's logged loss is of the initial params, but the state a save at step 1 would write is
  # after the lr=1e9 update: the guard checks that state before saving it.
  match = re.search(r"training stopped: .*at step (\d+)\b.*learning_rate", out)
  assert match, out
  assert int(match.group(1)) == 1
  assert _saved_steps(workdir) == []


def test_run_writes_metrics_tensorboard_and_plot(text_dir, tmp_path):
  lr, min_lr, warmup, steps = 1e-3, 1e-4, 2, 6
  cfg = _run_cfg(text_dir, tmp_path, learning_rate=lr, min_learning_rate=min_lr,
                 warmup_steps=warmup, lr_decay="linear", num_train_steps=steps, log_every=2,
                 eval_steps=3, save_steps=3)
  workdir = tmp_path / "run"
  assert train.run(cfg, str(workdir)) == 0
  records = metrics.read_metrics(str(workdir / "metrics.jsonl"))
  train_recs = {r["step"]: r for r in records if "train/loss" in r}
  eval_recs = {r["step"]: r for r in records if "eval/loss" in r}
  assert {2, 4, 6} <= set(train_recs) and set(eval_recs) == {3, 6}

  cpt = data.build(cfg, str(workdir)).chars_per_token
  for step, r in train_recs.items():
    for k in ("train/learning_rate", "train/grad_norm", "train/param_norm",
              "train/tokens_per_s", "train/step_time_s", "train/perplexity",
              "train/bits_per_char"):
      assert k in r and math.isfinite(r[k]), (step, k)
    assert r["train/grad_norm"] > 0 and r["train/param_norm"] > 0
    assert r["train/tokens_per_s"] > 0 and r["train/step_time_s"] > 0
    np.testing.assert_allclose(r["train/perplexity"], math.exp(r["train/loss"]), rtol=1e-9)
    np.testing.assert_allclose(r["train/bits_per_char"],
                               r["train/loss"] / math.log(2) / cpt, rtol=1e-9)
    # The record at step s holds the rate of the s-th update: lr * s / warmup during the warmup,
    # then a linear decay that reaches min_lr at the last step.
    want = (lr * step / warmup if step < warmup
            else lr + (min_lr - lr) * (step - warmup) / (steps - warmup))
    np.testing.assert_allclose(r["train/learning_rate"], want, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(train_recs[steps]["train/learning_rate"], min_lr, rtol=1e-6)
  assert abs(train_recs[2]["train/loss"] - math.log(320)) < 1.0  # near uniform at the start

  for step, r in eval_recs.items():
    for k in ("eval/accuracy", "eval/perplexity", "eval/bits_per_char"):
      assert k in r, (step, k)
    assert 0.0 <= r["eval/accuracy"] <= 1.0
    np.testing.assert_allclose(r["eval/perplexity"], math.exp(r["eval/loss"]), rtol=1e-9)
    np.testing.assert_allclose(r["eval/bits_per_char"],
                               r["eval/loss"] / math.log(2) / cpt, rtol=1e-9)

  # The final eval loss is the saved final params' loss over the whole validation split.
  trainer = train.Trainer(cfg, steps)
  params, got_step, _, _ = checkpoint.load_params(str(workdir), trainer.abstract_params,
                                                  trainer.param_shardings)
  assert got_step == steps and _saved_steps(workdir) == ["3", "6"]
  apply = jax.jit(trainer.model.apply)
  nll = n = 0.0
  for b in data.build(cfg, str(workdir)).eval_batches():
    logits = jax.device_get(apply({"params": params}, b["inputs"]))[..., :cfg.vocab_size]
    nll += (_token_nll(logits, b["targets"]) * b["weights"]).sum()
    n += b["weights"].sum()
  np.testing.assert_allclose(eval_recs[6]["eval/loss"], nll / n, rtol=1e-5)

  events = os.listdir(workdir / "tensorboard")
  assert any(f.startswith("events.out.tfevents") for f in events), events
  with open(workdir / "loss_curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_evaluation_failures_never_cost_the_step_checkpoint(text_dir, tmp_path, monkeypatch,
                                                            caplog):
  # Learned positions over 16 slots: the eval sample (64 tokens asked) must be capped to fit.
  cfg = _run_cfg(text_dir, tmp_path, position_embedding="learned", num_train_steps=4,
                 eval_steps=2, save_steps=2, log_every=2, sample_every_eval=True)
  sampled, evaluations = [], []
  real_sample_lines, real_evaluate = train.sample_lines, train.Trainer.evaluate

  def sample_lines(*args, **kwargs):
    sampled.append(real_sample_lines(*args, **kwargs))
    raise RuntimeError("sampling broke")  # after a real sample: a failure here is a warning

  def evaluate(self, *args, **kwargs):
    evaluations.append(real_evaluate(self, *args, **kwargs))
    if len(evaluations) == 2:
      raise RuntimeError("evaluation broke")  # at step 4, due a save
    return evaluations[-1]

  monkeypatch.setattr(train, "sample_lines", sample_lines)
  monkeypatch.setattr(train.Trainer, "evaluate", evaluate)
  workdir = tmp_path / "run"
  with pytest.raises(RuntimeError, match="evaluation broke"):
    train.run(cfg, str(workdir))
  assert len(sampled) == 1 and len(sampled[0]) == 2
  assert "could not sample at step 2" in caplog.text and "sampling broke" in caplog.text
  assert _saved_steps(workdir) == ["2", "4"]  # step 4 saved although its evaluation failed
