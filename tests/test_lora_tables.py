"""LoRA with trainable embeddings and head (issue 28): lora_train_embeddings, lora_trainable_tokens.

- At the start the deltas are zero and the model computes exactly its base's logits; with any
  deltas, the merged plain params compute what base + adapters + deltas compute (tied and untied
  heads, whole tables and rows, unrolled and scanned layers), and a merge leaves every row that
  is not named bitwise as it was.
- One AdamW step trains the named rows exactly as Adam's first step on those rows of the plain
  model would (the reference: the gradient of an independent cross-entropy with respect to the
  whole table, its rows taken, then -lr * g / (|g| + eps)), the optimizer holds state only for
  the rows, and the frozen base is bitwise unchanged. Over an nf4 base (QLoRA) the loss falls.
- End to end through `train.run`: token strings resolve to ids, a checkpoint stores the adapters
  and the rows alone, the run resumes with the same strings, and the merged export evaluates
  exactly like the run with every other row of the base bitwise unchanged.
Under a mesh (8 devices): tests/finetune_mesh_check.py, asserted in test_finetune.py.
"""

import dataclasses
import functools
import json
import os
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
from flax import traverse_util

import helpers
from test_finetune import base_run  # noqa: F401  (the module-scoped base checkpoint fixture)
from test_finetune import _ft_cfg, _metrics

from llm_jax import checkpoint
from llm_jax import config
from llm_jax import loader
from llm_jax import lora
from llm_jax import model as model_lib
from llm_jax import quantize
from llm_jax import sharding
from llm_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "configs", "base.py")
MODEL = model_lib.ModelConfig(vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, n_layers=2,
                              d_ff=64, d_k=16, d_v=16, vocab_multiple=64, activation="swiglu",
                              use_rms_norm=True, use_bias=False, tie_embeddings=False,
                              lora_r=4, lora_alpha=8.0, lora_targets="q,v")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
IDS = (3, 7, 9)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # qwix's, about nnx


def _plain(mc):
  return dataclasses.replace(mc, lora_r=0, lora_train_embeddings=False, lora_trainable_tokens="")


def _abstract(mc):
  boxed = jax.eval_shape(model_lib.build(mc).init, jax.random.key(0), TOKENS)["params"]
  return nn.meta.unbox(boxed)


@functools.lru_cache(maxsize=None)
def _apply_fn(mc):
  return jax.jit(lambda params: model_lib.build(mc).apply({"params": params}, TOKENS))


VARIANTS = {
    "untied_rows": dict(lora_trainable_tokens=",".join(map(str, IDS))),
    "untied_whole": dict(lora_train_embeddings=True),
    "tied_rows": dict(tie_embeddings=True, lora_trainable_tokens=",".join(map(str, IDS))),
    "tied_whole_scanned": dict(tie_embeddings=True, lora_train_embeddings=True, scan_layers=True),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_deltas_start_at_the_base_and_merge_to_the_same_logits(name):
  mc = dataclasses.replace(MODEL, **VARIANTS[name])
  plain_mc = _plain(mc)
  base = helpers.random_params(_abstract(plain_mc), 0, std=0.2)
  init = nn.meta.unbox(model_lib.build(mc).init(jax.random.key(1), TOKENS)["params"])
  _, fresh = lora.split(init)
  deltas = {p: v for p, v in traverse_util.flatten_dict(fresh).items() if p[-1] == lora.DELTA}
  want = {("embed", "lora", "delta")} | (set() if mc.tie_embeddings else
                                         {("lm_head", "lora", "delta")})
  assert set(deltas) == want and all(not np.asarray(v).any() for v in deltas.values())
  n = len(IDS) if mc.lora_trainable_tokens else mc.padded_vocab
  assert deltas[("embed", "lora", "delta")].shape == (n, mc.d_model)
  np.testing.assert_array_equal(_apply_fn(mc)(lora.combine(base, fresh)),
                                _apply_fn(plain_mc)(base))  # b = 0 and delta = 0: the base

  adapters = helpers.random_params(fresh, 2, std=0.2)
  merged = lora.merge(lora.combine(base, adapters), mc)
  np.testing.assert_allclose(_apply_fn(plain_mc)(merged), _apply_fn(mc)(lora.combine(base,
                                                                                     adapters)),
                             atol=2e-5, rtol=1e-5)
  old, new = np.asarray(base["embed"]["embedding"]), np.asarray(merged["embed"]["embedding"])
  named = list(IDS) if mc.lora_trainable_tokens else list(range(mc.padded_vocab))
  others = np.setdiff1d(np.arange(mc.padded_vocab), named)
  np.testing.assert_array_equal(new[others], old[others])
  assert np.abs(new[named] - old[named]).min() > 0


def _trainer(mc_fields, **fields):
  cfg = config.load(BASE_CONFIG, vocab_size=64, vocab_multiple=64, d_model=32, n_heads=2,
                    n_kv_heads=1, n_layers=2, d_ff=64, activation="swiglu", use_rms_norm=True,
                    use_bias=False, max_seq_len=16, micro_batch_size=4, init_from="unused",
                    lora_r=4, lora_targets="q,v", lora_dropout=0.0, learning_rate=1e-2,
                    warmup_steps=0, lr_decay="constant", max_grad_norm=0.0, weight_decay=0.0,
                    **mc_fields, **fields)
  mesh = sharding.make_mesh(cfg, jax.devices()[:1])
  mc = model_lib.ModelConfig.from_config(cfg)
  return cfg, mesh, mc


SEQ = np.random.default_rng(3).integers(0, 64, size=(1, 4, 17)).astype(np.int32)
BATCH = {"inputs": SEQ[..., :-1], "targets": SEQ[..., 1:]}


def test_one_step_trains_the_named_rows_as_adam_and_nothing_else():
  present = sorted(set(SEQ[0, :, :-1].ravel().tolist()))[:2]
  absent = next(i for i in range(64) if i not in SEQ[0, :, :-1])  # no embedding gradient
  ids = present + [absent]
  cfg, mesh, mc = _trainer(dict(tie_embeddings=False),
                           lora_trainable_tokens=",".join(map(str, ids)))
  base = jax.device_put(helpers.random_params(_abstract(_plain(mc)), 0, std=0.1))
  before = jax.device_get(base)
  trainer = train.Trainer(cfg, 10, mesh=mesh, base=types.SimpleNamespace(params=base))
  state = trainer.init_state(0)
  # Optimizer state exists only for what trains: no leaf has the vocabulary's size.
  moment_shapes = {x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim}
  assert (3, 32) in moment_shapes and (32, 3) in moment_shapes
  assert not any(64 in s for s in moment_shapes), moment_shapes
  state, _ = trainer.train_step(state, BATCH)

  def ce(embedding, kernel):  # an independent cross-entropy of the plain model
    params = {**before, "embed": {"embedding": embedding}, "lm_head": {"kernel": kernel}}
    logits = model_lib.build(_plain(mc)).apply({"params": params}, BATCH["inputs"][0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, BATCH["targets"][0]).mean()

  g_embed, g_head = jax.grad(ce, argnums=(0, 1))(before["embed"]["embedding"],
                                                 before["lm_head"]["kernel"])
  adam = lambda g: -1e-2 * g / (np.abs(g) + cfg.epsilon)  # AdamW's first step, no decay
  trained = jax.device_get(state.params)
  np.testing.assert_allclose(trained["embed"]["lora"]["delta"], adam(np.asarray(g_embed)[ids]),
                             atol=1e-6)
  np.testing.assert_allclose(trained["lm_head"]["lora"]["delta"],
                             adam(np.asarray(g_head)[:, ids]), atol=1e-6)
  assert not np.asarray(trained["embed"]["lora"]["delta"])[2].any()  # absent: no gradient
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(trainer.base))):
    np.testing.assert_array_equal(a, b)  # the frozen base, bit for bit
  applied = lora.fold(trainer.full_params(state.params), mc)
  others = np.setdiff1d(np.arange(64), ids)
  np.testing.assert_array_equal(np.asarray(applied["embed"]["embedding"])[others],
                                before["embed"]["embedding"][others])
  np.testing.assert_array_equal(np.asarray(applied["lm_head"]["kernel"])[:, others],
                                before["lm_head"]["kernel"][:, others])


def test_qlora_with_the_whole_tables_learns_and_keeps_the_base():
  cfg, mesh, mc = _trainer(dict(tie_embeddings=False, scan_layers=True),
                           lora_train_embeddings=True, load_in_4bit=True, quant_group_size=32)
  base = loader.quantized(helpers.random_params(_abstract(_plain(dataclasses.replace(
      mc, quant=""))), 0, std=0.1), mc, mesh, sharding.logical_rules(cfg))
  before = jax.device_get(base)
  trainer = train.Trainer(cfg, 20, mesh=mesh, base=types.SimpleNamespace(params=base))
  state = trainer.init_state(0)
  assert state.params["embed"]["lora"]["delta"].dtype == jnp.float32
  losses = []
  for _ in range(8):
    state, out = trainer.train_step(state, BATCH)
    losses.append(float(out["loss"]))
  assert losses[-1] < losses[0] - 0.3, losses
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(trainer.base))):
    np.testing.assert_array_equal(a, b)
  full = trainer.full_params(state.params)
  assert quantize.is_quantized(full["layers"]["attn"]["query"]["kernel"])


def test_rows_by_token_string_checkpoint_small_resume_and_export_exactly(base_run, capsys):  # noqa: F811
  import main  # pylint: disable=import-outside-toplevel
  tok = base_run.tokenizer
  pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
  words = [p for p in pieces if p.startswith("\u2581") and len(p) > 2]
  text = next(w[1:] for w in words if len(tok.encode(w[1:])) == 1)  # text of one token
  spec = f"{words[0]},{text},5"  # a piece as the vocabulary spells it, text, an id
  ids = lora.resolve_tokens(spec, tok, base_run.config["vocab_size"])
  n = len(ids.split(","))
  workdir = str(base_run.root / "ft_rows")
  cfg = _ft_cfg(base_run, lora_trainable_tokens=spec, num_train_steps=4, save_steps=2)
  assert train.run(cfg, workdir, overrides={"lora_trainable_tokens": spec}) == 0
  _, items = checkpoint.load_json(workdir, ("config",))
  assert items["config"]["lora_trainable_tokens"] == ids
  saved = ocp.StandardCheckpointer().restore(
      os.path.join(checkpoint.checkpoint_dir(workdir), "4", "params"))
  flat = traverse_util.flatten_dict(saved)
  assert flat[("embed", "lora", "delta")].shape == (n, 32)  # rows alone, not the table
  assert sum(v.size for v in flat.values()) < 0.2 * sum(
      np.size(v) for v in jax.tree.leaves(base_run.params))

  cfg = _ft_cfg(base_run, lora_trainable_tokens=spec, num_train_steps=6, save_steps=2)
  assert train.run(cfg, workdir, overrides={"lora_trainable_tokens": spec}) == 0  # resumes
  assert "resumed at step 4" in capsys.readouterr().out

  assert train.evaluate_workdir(cfg, workdir) == 0
  run_loss = re.search(r"eval of checkpoint 6 .*?: loss ([0-9.]+)", capsys.readouterr().out)
  merged = str(base_run.root / "merged_rows")
  with cfg.unlocked():
    cfg.export_dir = merged
  assert main.export(cfg, workdir) == 0
  capsys.readouterr()
  assert train.evaluate_workdir(cfg, merged) == 0
  merged_loss = re.search(r"eval of checkpoint 6 .*?: loss ([0-9.]+)", capsys.readouterr().out)
  assert float(merged_loss.group(1)) == pytest.approx(float(run_loss.group(1)), abs=2e-5)
  assert float(run_loss.group(1)) == pytest.approx(_metrics(workdir, "eval/loss")[6], abs=1e-4)
  params = ocp.StandardCheckpointer().restore(
      os.path.join(checkpoint.checkpoint_dir(merged), "6", "params"))
  old, new = base_run.params["embed"]["embedding"], np.asarray(params["embed"]["embedding"])
  named = [int(i) for i in ids.split(",")]
  others = np.setdiff1d(np.arange(old.shape[0]), named)
  np.testing.assert_array_equal(new[others], old[others])
  assert np.abs(new[named] - old[named]).max() > 0
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    assert any("train/loss" in json.loads(line) for line in f)


def test_whole_untied_tables_export_to_hugging_face_merged(base_run):  # noqa: F811
  """A Llama-family base, its whole embedding and untied head trained beside the adapters: the
  Hugging Face export's embed_tokens and lm_head are the merged tables, which moved."""
  import main  # pylint: disable=import-outside-toplevel
  llama = dict(use_rms_norm=True, activation="swiglu", use_bias=False, tie_embeddings=False)
  cfg = config.load(BASE_CONFIG, **{**base_run.config, **llama})
  mc = model_lib.ModelConfig.from_config(cfg)
  params = helpers.random_params(nn.meta.unbox(jax.eval_shape(
      lambda k: model_lib.init_params(mc, k), jax.random.key(0))), std=0.1)
  base = str(base_run.root / "llama_base")
  checkpoint.save_params(base, 1, params, cfg.to_dict(), base_run.tokenizer)
  workdir = str(base_run.root / "ft_llama_tables")
  cfg = _ft_cfg(base_run, init_from=base, lora_train_embeddings=True, num_train_steps=2,
                save_steps=2, eval_steps=2)
  assert train.run(cfg, workdir) == 0
  hf_dir, merged = str(base_run.root / "hf_tables"), str(base_run.root / "merged_tables")
  with cfg.unlocked():
    cfg.export_dir, cfg.hf_export_dir = merged, hf_dir
  assert main.export(cfg, workdir) == 0
  plain = ocp.StandardCheckpointer().restore(
      os.path.join(checkpoint.checkpoint_dir(merged), "2", "params"))
  tensors = safetensors.numpy.load_file(os.path.join(hf_dir, "model.safetensors"))
  embed = np.asarray(plain["embed"]["embedding"])
  head = np.asarray(plain["lm_head"]["kernel"])
  np.testing.assert_array_equal(tensors["model.embed_tokens.weight"].astype(np.float32), embed)
  np.testing.assert_array_equal(tensors["lm_head.weight"].astype(np.float32).T, head)
  assert np.abs(embed - np.asarray(params["embed"]["embedding"])).max() > 0
  assert np.abs(head - np.asarray(params["lm_head"]["kernel"])).max() > 0
