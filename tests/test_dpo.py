"""Preference tuning (llm_jax/dpo.py) as an objective of the one Trainer.

- The loss and its gradient (w.r.t. the summed log-probs) equal the DPO paper's formula written
  here in numpy, with its derivative by hand, on a fixed batch: sigmoid (Rafailov et al. 2023,
  eq. 7), conservative DPO (label smoothing), IPO (Azar et al. 2023, eq. 17, per-token averaged);
  and equal TRL's own DPOTrainer loss, gradient and metrics (tests/fixtures/trl_dpo_loss.json,
  made by tests/fixtures/make_trl_dpo_fixture.py with TRL 1.16; CI needs no TRL).
- A pair's summed log-probs are numpy's log-softmax of the model's logits over the completion
  tokens alone (its EOS included, the prompt and padding left out).
- With LoRA the reference is the base with its adapters off: bitwise the base model's log-probs
  while the adapters are not zero.
- A short DPO run (LoRA) raises reward accuracy on its training pairs from 0 (every reward is 0
  at the start) to 1; a full fine-tune caches its reference log-probs, which equal the base's,
  resumes to bitwise the uninterrupted run's params, and without the cache is refused.
- TRL's formats: standard, conversational, implicit prompt; jsonl and Parquet.
"""

import dataclasses
import json
import os
import re
import shutil
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers

from llm_jax import checkpoint
from llm_jax import config
from llm_jax import data as data_lib
from llm_jax import dpo
from llm_jax import errors
from llm_jax import lora
from llm_jax import model as model_lib
from llm_jax import sharding
from llm_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "configs", "base.py")
TRL = os.path.join(ROOT, "tests", "fixtures", "trl_dpo_loss.json")
TINY = dict(vocab_size=128, vocab_multiple=64, byte_fallback=False, d_model=32, n_heads=2,
            n_layers=2, max_seq_len=24, micro_batch_size=4)
WORDS = ["kalo", "mine", "ruvi", "sato", "bade", "fogu"]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# --- The loss against the paper, by hand ---------------------------------------------------


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _numpy_dpo(pc, pr, rc, rr, nc, nr, beta, eps, loss_type):
  """(mean loss, d loss / d pc, d loss / d pr) over P pairs: the papers' formulas and their
  derivatives written out by hand."""
  P = len(pc)
  if loss_type == "ipo":
    h = (pc - rc) / nc - (pr - rr) / nr
    u = h - 1.0 / (2.0 * beta)
    return np.mean(u ** 2), 2 * u / nc / P, -2 * u / nr / P
  z = beta * ((pc - rc) - (pr - rr))
  loss = -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
  dz = -(1 - eps) * _sigmoid(-z) + eps * _sigmoid(z)  # d loss / d z
  return np.mean(loss), beta * dz / P, -beta * dz / P


def _jax_dpo(pc, pr, rc, rr, nc, nr, beta, eps, loss_type):
  ref, n = jnp.stack([rc, rr], 1), jnp.stack([nc, nr], 1)

  def mean_loss(logps):
    loss, metrics = dpo.preference_loss(logps, ref, n, beta, eps, loss_type)
    return jnp.mean(loss), metrics
  (loss, metrics), grad = jax.value_and_grad(mean_loss, has_aux=True)(jnp.stack([pc, pr], 1))
  return float(loss), np.asarray(grad), {k: float(jnp.mean(v)) for k, v in metrics.items()}


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0),
                                                ("sigmoid", 0.3, 0.2), ("ipo", 0.1, 0.0),
                                                ("ipo", 0.7, 0.0)])
def test_loss_and_gradient_equal_the_papers_formula_in_numpy(loss_type, beta, eps):
  rng = np.random.default_rng(3)
  pc, pr, rc, rr = (-rng.uniform(2, 40, 6) for _ in range(4))
  nc, nr = rng.integers(1, 9, 6).astype(np.float64), rng.integers(1, 9, 6).astype(np.float64)
  want_loss, want_gc, want_gr = _numpy_dpo(pc, pr, rc, rr, nc, nr, beta, eps, loss_type)
  with jax.enable_x64(True):
    args = [jnp.asarray(a, jnp.float64) for a in (pc, pr, rc, rr, nc, nr)]
    loss, grad, metrics = _jax_dpo(*args, beta, eps, loss_type)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
  np.testing.assert_allclose(grad[:, 0], want_gc, rtol=1e-10, atol=1e-15)
  np.testing.assert_allclose(grad[:, 1], want_gr, rtol=1e-10, atol=1e-15)
  np.testing.assert_allclose(metrics["rewards/margins"],
                             np.mean(beta * ((pc - rc) - (pr - rr))), rtol=1e-12)
  assert metrics["rewards/accuracies"] == pytest.approx(np.mean(pc - rc > pr - rr), abs=1e-12)


def test_loss_gradient_and_metrics_equal_trls_dpo_trainer():
  with open(TRL, encoding="utf-8") as f:
    fx = json.load(f)
  with jax.enable_x64(True):
    args = [jnp.asarray(fx[k], jnp.float64) for k in ("chosen", "rejected", "ref_chosen",
                                                       "ref_rejected", "n_chosen", "n_rejected")]
    for case in fx["cases"]:
      loss, grad, metrics = _jax_dpo(*args, case["beta"], 0.0, case["loss_type"])
      np.testing.assert_allclose(loss, case["loss"], rtol=1e-12)
      np.testing.assert_allclose(grad[:, 0], case["grad_chosen"], rtol=1e-10, atol=1e-15)
      np.testing.assert_allclose(grad[:, 1], case["grad_rejected"], rtol=1e-10, atol=1e-15)
      for k, v in case["metrics"].items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-12, atol=1e-15, err_msg=k)


# --- Pairs, tokens and log-probs on a model ---------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A base checkpoint (random params) with its tokenizer, and preference pairs: the chosen
  completion is always " kalo kalo", the rejected two other words."""
  root = tmp_path_factory.mktemp("dpo")
  helpers.write_corpus(str(root / "text"))
  cfg = config.load(BASE_CONFIG, **TINY, dataset=f"text:{root}/text/train",
                    data_dir=str(root / "data"), tokenizer_path=str(root / "tok.model"))
  tok = data_lib.build(cfg, None, 0, 1).tokenizer
  mc = model_lib.ModelConfig.from_config(cfg)
  params = helpers.random_params(nn.meta.unbox(jax.eval_shape(
      lambda k: model_lib.init_params(mc, k), jax.random.key(0))), std=0.1)
  checkpoint.save_params(str(root / "base"), 7, params, cfg.to_dict(), tok)
  rng = np.random.default_rng(0)
  with open(root / "prefs.jsonl", "w", encoding="utf-8") as f:
    for _ in range(16):
      f.write(json.dumps({"prompt": " ".join(rng.choice(WORDS, 3)), "chosen": " kalo kalo",
                          "rejected": " " + " ".join(rng.choice(WORDS[1:], 2))}) + "\n")
  return types.SimpleNamespace(root=root, workdir=str(root / "base"), tokenizer=tok, mc=mc,
                               params=jax.device_get(params), prefs=str(root / "prefs.jsonl"))


def _dpo_cfg(base_run, **changes):
  fields = dict(dataset=f"text:{base_run.prefs}", validation=base_run.prefs,
                data_dir=str(base_run.root / "data"), init_from=base_run.workdir,
                objective="dpo", learning_rate=1e-2, warmup_steps=1, num_train_steps=8,
                eval_steps=8, save_steps=4, log_every=1, micro_batch_size=4,
                sample_every_eval=False, lora_dropout=0.0, lr_decay="constant")
  return config.load(BASE_CONFIG, **{**fields, **changes})


def _logits(mc, params, inputs):
  return np.asarray(model_lib.build(mc).apply({"params": params}, inputs), np.float64)


def test_pair_logps_sum_the_completion_tokens_alone(base_run):
  pairs = dpo.read_pairs(base_run.prefs)[:3]
  tokens, weights = dpo.tokenize_pairs(pairs, base_run.tokenizer, 24, "test")
  tok = base_run.tokenizer
  for n, pair in enumerate(pairs):  # weights mark the completion's tokens, its EOS included
    for k, completion in enumerate((pair.chosen, pair.rejected)):
      ids = tok.encode(completion) + [tok.eos_id]
      row = tokens[n, k, 1:][weights[n, k] == 1]
      assert row.tolist() == ids
      assert tokens[n, k, 0] == tok.eos_id  # the start token: this tokenizer adds no BOS
  batch = dpo.batch_of(tokens, weights, None, np.arange(3))
  got = np.asarray(dpo.pair_logps(model_lib.build(base_run.mc), base_run.params,
                                  jax.tree.map(jnp.asarray, batch)))
  logits = _logits(base_run.mc, base_run.params, batch["inputs"].reshape(6, -1))
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                         ) - logits.max(-1, keepdims=True)
  picked = np.take_along_axis(logp, batch["targets"].reshape(6, -1)[..., None], -1)[..., 0]
  want = (picked * batch["weights"].reshape(6, -1)).sum(-1).reshape(3, 2)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.1), ("ipo", 0.0)])
def test_parameter_gradient_is_the_papers_weights_on_each_pairs_logps(base_run, loss_type, eps):
  """d loss / d params = sum over pairs and sides of (the numpy formula's d loss / d logp) times
  d logp / d params: the whole gradient through the model, not only the last step."""
  cfg = _dpo_cfg(base_run, lora_r=0, dpo_loss_type=loss_type, dpo_label_smoothing=eps,
                 dpo_beta=0.5, **TINY)
  model = model_lib.build(base_run.mc)
  pairs = dpo.read_pairs(base_run.prefs)[:4]
  batch = jax.tree.map(jnp.asarray, dpo.batch_of(
      *dpo.tokenize_pairs(pairs, base_run.tokenizer, 24, "test"), None, np.arange(4)))
  logps = np.asarray(dpo.pair_logps(model, base_run.params, batch), np.float64)
  ref = (logps + np.random.default_rng(5).normal(0, 2, logps.shape)).astype(np.float32)
  n = np.asarray(batch["weights"].sum(-1), np.float64)
  _, wc, wr = _numpy_dpo(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], n[:, 0], n[:, 1],
                         0.5, eps, loss_type)
  w = jnp.asarray(np.stack([wc, wr], 1), jnp.float32)
  loss = dpo.make_loss_fn(cfg, model, None)
  got = jax.jit(jax.grad(lambda p: loss(p, {}, {**batch, "ref_logps": ref}, None, True)[0]))(
      base_run.params)
  want = jax.jit(jax.grad(lambda p: jnp.sum(w * dpo.pair_logps(model, p, batch))))(
      base_run.params)
  for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, h, rtol=2e-4, atol=1e-7)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(got)) > 1e-4


def test_lora_reference_is_the_base_with_adapters_off_bitwise(base_run):
  cfg = _dpo_cfg(base_run, lora_r=4, lora_targets="all", **TINY)
  mesh = sharding.make_mesh(cfg, jax.devices()[:1])
  trainer = train.Trainer(cfg, 1, mesh=mesh,
                          base=types.SimpleNamespace(params=jax.device_put(base_run.params)))
  adapters = helpers.random_params(trainer.abstract_params, seed=1, std=0.3)  # b != 0
  pairs = dpo.read_pairs(base_run.prefs)[:4]
  batch = jax.tree.map(jnp.asarray, dpo.batch_of(
      *dpo.tokenize_pairs(pairs, base_run.tokenizer, 24, "test"), None, np.arange(4)))
  plain = model_lib.build(dataclasses.replace(trainer.model_cfg, lora_r=0))
  ref = jax.jit(lambda p: dpo.pair_logps(trainer.ref_model, p, batch))(trainer.base)
  base = jax.jit(lambda p: dpo.pair_logps(plain, p, batch))(base_run.params)
  helpers.assert_bitwise_equal(ref, base)
  policy = dpo.pair_logps(trainer.model, lora.combine(trainer.base, adapters), batch)
  assert np.abs(np.asarray(policy) - np.asarray(base)).max() > 1e-3  # the adapters do change it
  # Inside the loss: rewards are beta (policy - that reference).
  _, sums = dpo.make_loss_fn(cfg, trainer.model, trainer.ref_model)(
      lora.combine(trainer.base, adapters), trainer.base, batch, None, True)
  np.testing.assert_allclose(sums["rewards/chosen"] / 4,
                             np.mean(cfg.dpo_beta * (policy - base)[:, 0]), rtol=1e-5)


def test_dpo_steps_under_a_mesh_and_accumulated_equal_one_device():
  """tests/dpo_mesh_check.py on 8 devices: LoRA on (2,2,2) equals (1,1,1) (its first loss is
  log 2: the policy is its reference); full fine-tuning with 2 scanned or MultiSteps
  micro-batches on (2,2,2) equals one micro-batch of all 8 pairs on one device (SGD: the
  params' change is the gradient)."""
  out = helpers.run_check_script("dpo_mesh_check.py", timeout=900)
  assert out["devices"] == 8
  steps = out["steps"]
  for name, r in steps.items():
    group = name.split("_")[0]
    assert r["loss"] == pytest.approx(steps[f"{group}_1x1x1"]["loss"], rel=1e-5), name
    assert r["param_diff"] < 1e-3 * r["moved"], name
    assert r["accuracy"] == steps[f"{group}_1x1x1"]["accuracy"], name
  assert steps["lora_1x1x1"]["loss"] == pytest.approx(np.log(2), abs=1e-6)


def _metrics(workdir, key):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def test_short_lora_dpo_run_raises_reward_accuracy_on_its_pairs(base_run, capsys):
  workdir = str(base_run.root / "lora")
  assert train.run(_dpo_cfg(base_run, lora_r=4), workdir, overrides={}) == 0
  acc, loss = _metrics(workdir, "eval/rewards/accuracies"), _metrics(workdir, "eval/loss")
  assert acc[0] == 0.0 and loss[0] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference
  assert acc[8] == 1.0 and loss[8] < 0.6
  assert _metrics(workdir, "train/rewards/margins")[8] > 0
  for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
    assert 8 in _metrics(workdir, f"train/{k}") and 8 in _metrics(workdir, f"eval/{k}")
  assert not os.path.exists(os.path.join(workdir, dpo.REFERENCE_FILE))  # LoRA needs no cache
  _eval_equals_the_runs_last(base_run, workdir, 8, capsys)


def _eval_equals_the_runs_last(base_run, workdir, step, capsys, **changes):
  """--mode=eval of the workdir reports the run's own last evaluation."""
  capsys.readouterr()
  assert train.evaluate_workdir(_dpo_cfg(base_run, **changes), workdir) == 0
  out = capsys.readouterr().out
  assert f"eval of checkpoint {step}" in out
  for key in ("loss", "rewards/accuracies", "rewards/margins"):
    got = float(re.search(rf"[ ,]{re.escape(key)} (-?[0-9.]+)", out).group(1))
    assert got == pytest.approx(_metrics(workdir, f"eval/{key}")[step], abs=2e-4), key


def _params(workdir, step):
  return ocp.StandardCheckpointer().restore(
      os.path.join(checkpoint.checkpoint_dir(workdir), str(step), "params"))


def test_full_finetune_caches_the_reference_and_resumes_exactly(base_run, capsys):
  cfg = _dpo_cfg(base_run, num_train_steps=6, save_steps=3, eval_steps=6, learning_rate=3e-3)
  whole = str(base_run.root / "full")
  assert train.run(cfg, whole, overrides={}) == 0
  with np.load(os.path.join(whole, dpo.REFERENCE_FILE)) as z:
    ref = z["train"]
  data = dpo.build(cfg, whole)
  assert ref.shape == (len(data.train_tokens), 2)
  batch = jax.tree.map(jnp.asarray, dpo.batch_of(data.train_tokens, data.train_weights, None,
                                                 np.arange(len(ref))))
  base = dpo.pair_logps(model_lib.build(base_run.mc), base_run.params, batch)
  np.testing.assert_allclose(ref, np.asarray(base), rtol=1e-5)  # the starting model's
  _eval_equals_the_runs_last(base_run, whole, 6, capsys)  # from the cached reference

  cut = str(base_run.root / "cut")
  shutil.copytree(whole, cut)
  shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(cut), "6"))  # interrupted after step 3
  assert train.run(cfg, cut, overrides={}) == 0
  helpers.assert_bitwise_equal(_params(cut, 6), _params(whole, 6))

  os.remove(os.path.join(cut, dpo.REFERENCE_FILE))
  shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(cut), "6"))
  with pytest.raises(errors.UserError, match="cannot compute the DPO reference"):
    train.run(cfg, cut, overrides={})


# --- TRL's formats ---------------------------------------------------------------------------


def test_trl_formats_standard_conversational_implicit_prompt_parquet_save_to_disk(tmp_path,
                                                                                   base_run):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  user = {"role": "user", "content": "Who comes?"}
  chosen = [{"role": "assistant", "content": "A friend."}]
  rejected = [{"role": "assistant", "content": "Nobody."}]
  pair = dpo.pair_of({"prompt": [user], "chosen": chosen, "rejected": rejected}, "x:1")
  implicit = dpo.pair_of({"chosen": [user] + chosen, "rejected": [user] + rejected}, "x:2")
  assert (implicit.prompt, implicit.chosen, implicit.rejected) == ([user], chosen, rejected)
  assert (pair.prompt, pair.chosen) == ([user], chosen)
  rows = [{"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "d", "chosen": " e",
                                                              "rejected": " f"}]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
  got = dpo.read_pairs(str(tmp_path / "p.parquet"))
  assert [(p.prompt, p.chosen, p.rejected) for p in got] == [("a", " b", " c"), ("d", " e", " f")]
  assert got[1].where.endswith("p.parquet:row 1")
  import datasets  # pylint: disable=import-outside-toplevel
  datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
  assert [p.chosen for p in dpo.read_pairs(str(tmp_path / "saved"))] == [" b", " e"]
  tok = base_run.tokenizer  # messages: their contents one per line, until chat templates
  assert dpo.encode_example(tok, [user], chosen) == (
      [tok.eos_id] + tok.encode("Who comes?\n"), tok.encode("A friend.") + [tok.eos_id])
  with pytest.raises(errors.UserError, match="x:3: 'chosen' is identical to 'rejected'"):
    dpo.pair_of({"prompt": "a", "chosen": "b", "rejected": "b"}, "x:3")
  with pytest.raises(errors.UserError, match="x:4: objective=dpo needs preference pairs.*'text'"):
    dpo.pair_of({"text": "plain"}, "x:4")


TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def test_dpo_on_an_imported_hugging_face_llama_in_messages_form(tmp_path):
  """The Llama fixture (tests/fixtures/hf/llama: sentencepiece with BOS), imported, tuned with
  LoRA on conversational pairs rendered by a chat template: the completion tokens (the weighted
  targets) are exactly the assistant's part of the rendering, and 4 steps order the pairs."""
  from configs import base  # pylint: disable=import-outside-toplevel
  from llm_jax import hf  # pylint: disable=import-outside-toplevel
  imported = str(tmp_path / "llama")
  hf.import_to_workdir(base.get_config(), os.path.join(ROOT, "tests", "fixtures", "hf", "llama"),
                       imported)
  with open(tmp_path / "prefs.jsonl", "w", encoding="utf-8") as f:
    for i in range(8):
      f.write(json.dumps({"prompt": [{"role": "user", "content": f"Say yes {i}"}],
                          "chosen": [{"role": "assistant", "content": "Yes."}],
                          "rejected": [{"role": "assistant", "content": "No, never."}]}) + "\n")
  cfg = config.load(BASE_CONFIG, dataset=f"text:{tmp_path}/prefs.jsonl",
                    validation=str(tmp_path / "prefs.jsonl"), init_from=imported,
                    objective="dpo", lora_r=4, learning_rate=1e-2, warmup_steps=1,
                    num_train_steps=4, eval_steps=4, save_steps=4, micro_batch_size=4,
                    block_size=96, sample_every_eval=False, lora_dropout=0.0,
                    chat_template=TEMPLATE)
  workdir = str(tmp_path / "dpo")
  assert train.run(cfg, workdir, overrides={"block_size": 96}) == 0
  data = dpo.build(cfg, workdir)
  tok = data.tokenizer
  for n in range(len(data.train_tokens)):
    for k, reply in enumerate((" Yes.\n", " No, never.\n")):
      targets = data.train_tokens[n, k, 1:][data.train_weights[n, k] > 0]
      assert tok.decode(targets.tolist()).strip() == reply.strip()  # (a leading space: sp's)
      prompt = data.train_tokens[n, k, :int(np.argmax(data.train_weights[n, k] > 0)) + 1]
      assert tok.decode(prompt.tolist()).startswith("user: Say yes ")
      assert tok.decode(prompt.tolist()).rstrip().endswith("\nassistant:")
  assert _metrics(workdir, "eval/rewards/accuracies") == {0: 0.0, 4: 1.0}


def test_a_falling_preference_loss_is_not_an_explosion():
  """DPO's loss nears 0 as margins grow, where noise is many times the minimum: explosions are
  measured from its starting value (log 2; IPO's (1 / (2 beta))^2) instead."""
  cfg = types.SimpleNamespace(dpo_loss_type="sigmoid", dpo_beta=0.1)
  floor = dpo.initial_loss(cfg)
  assert floor == pytest.approx(np.log(2))
  assert train._check_loss(9, 0.2, 0.01, 10.0, floor) == 0.01  # pylint: disable=protected-access
  with pytest.raises(train.TrainingDiverged, match="its value at the start 0.6931"):
    train._check_loss(9, 7.0, 0.01, 10.0, floor)  # pylint: disable=protected-access
  assert dpo.initial_loss(types.SimpleNamespace(dpo_loss_type="ipo", dpo_beta=0.1)) == (
      pytest.approx(25.0))
