"""Fine-tuning properties: LoRA, quantized weights (int8 / int4 / nf4), QLoRA, the loader.

- LoRA at initialisation gives exactly its base's logits; merged and unmerged adapters give the
  same logits (unrolled and scanned layers, over a full-precision and an nf4 base); lora_dropout
  changes training, never evaluation.
- The optimizer state of LoRA r=8 on configs/small.py's shape is 0.24% of a full run's (counted by
  jax.eval_shape against a hand count).
- Quantized weights stay within the rounding bound of their scheme (computed by hand from each
  channel's or group's absmax), and XLA's memory analysis of the compiled forward pass finds
  4-bit kernels at 4.5 bits per weight (codes + one float32 scale per 64): about an eighth.
- QLoRA trains: the loss falls over an nf4 base and only adapter leaves change; one step on 8
  devices (tests/finetune_mesh_check.py, mesh (2,2,2), scanned layers) equals one device's, the
  codes sharded as their kernels.
- Quantized weights exported through orbax (nf4 via uint8) load back bit for bit.
- End to end through `train.run` (in this process): a LoRA fine-tune from a base checkpoint logs
  its step-0 evaluation, keeps the base's tokenizer and model fields (another shape on the
  command line is refused), checkpoints its adapters alone; eval and sample read the LoRA
  workdir; an export (adapters merged) samples the same greedy text; a changed base is refused.
- Model fields are read back from the checkpoint (issue 10, item 5).

On a trained default checkpoint (configs/default.py, 850 steps, the held-out plays) the eval loss
was 3.9665 in float32, 3.9666 with int8 (+0.003%), 3.9685 with nf4 (+0.05%) and 3.9707 with
int4 (+0.11%): `test_quantized_eval_loss_on_a_trained_default_run` re-measures it (int8 within
1%, nf4 within 5%) when LLM_JAX_TRAINED_DEFAULT names such a workdir.
"""

import dataclasses
import functools
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
import run_once  # tests/run_once.py

from llm_jax import checkpoint
from llm_jax import config
from llm_jax import data as data_lib
from llm_jax import loader
from llm_jax import lora
from llm_jax import model as model_lib
from llm_jax import quantize
from llm_jax import sharding
from llm_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "configs", "base.py")
# GQA, SwiGLU, untied head: every projection kind exists. d_v = 16 < the group of 32, so the
# attention output takes one group per head_dim.
MODEL = model_lib.ModelConfig(vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, n_layers=2,
                              d_ff=64, d_k=16, d_v=16, vocab_multiple=64, activation="swiglu",
                              use_rms_norm=True, use_bias=False, tie_embeddings=False)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
# NormalFloat-4 levels, QLoRA paper (Dettmers et al. 2023), appendix E.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])


def _cfg(mc, **changes):
  return dataclasses.replace(mc, **changes)


# LoRA on every projection, with dropout: deterministic applies (evaluation) never drop.
LORA = _cfg(MODEL, lora_r=4, lora_alpha=8.0, lora_targets="all", lora_dropout=0.5)
MESH = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), sharding.MESH_AXES)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # qwix's, about nnx


def _abstract(mc):
  boxed = jax.eval_shape(model_lib.build(mc).init, jax.random.key(0), TOKENS)["params"]
  return nn.meta.unbox(boxed)


def _plain_params(mc, seed=0):
  return helpers.random_params(_abstract(_cfg(mc, lora_r=0, quant="")), seed)


def _quantized(params, mc):
  return loader.quantized(params, mc, MESH, sharding.RULES)


def _random_adapters(mc, seed=1):
  _, adapters = lora.split(_abstract(mc))
  return helpers.random_params(adapters, seed, std=0.2)


@functools.lru_cache(maxsize=None)
def _apply_fn(mc, deterministic=True):
  """One compiled forward pass per (model, deterministic): tests share them."""
  def apply(params, key):
    return model_lib.build(mc).apply({"params": params}, TOKENS, deterministic=deterministic,
                                     rngs={"dropout": key})
  return jax.jit(apply)


def _logits(mc, params, deterministic=True, key=0):
  return np.asarray(_apply_fn(mc, deterministic)(params, jax.random.key(key)))


# --- LoRA -------------------------------------------------------------------------------------


# Scanned layers here (the interceptor inside nn.scan, adapters with a layer axis); unrolled ones
# in the QLoRA and end-to-end tests below.
SCANNED, SCANNED_LORA = _cfg(MODEL, scan_layers=True), _cfg(LORA, scan_layers=True)


def test_lora_starts_at_the_base_and_merges_to_the_same_logits():
  mc, lc, scan = SCANNED, SCANNED_LORA, True
  base = _plain_params(mc)
  want = _logits(mc, base)

  init = jax.jit(model_lib.build(lc).init)(jax.random.key(3), TOKENS)["params"]
  _, adapters = lora.split(nn.meta.unbox(init))
  assert all(lora.is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0])
  # Every projection of both layers has one: 7 per layer (q, k, v, o, gate, up, wo) x (a, b).
  assert len(jax.tree.leaves(adapters)) == 14 * (1 if scan else 2)
  np.testing.assert_array_equal(_logits(lc, lora.combine(base, adapters)), want)  # B == 0

  params = lora.combine(base, _random_adapters(lc))
  got = _logits(lc, params)
  assert np.abs(got - want).max() > 0.05  # the adapters matter
  merged = lora.merge(params, lc)
  assert not any(lora.is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(merged)[0])
  np.testing.assert_allclose(_logits(mc, merged), got, atol=2e-5)


def test_lora_merge_over_an_nf4_base_keeps_the_quantized_function():
  mc = _cfg(MODEL, quant="nf4", quant_group_size=32)
  lc = _cfg(LORA, quant="nf4", quant_group_size=32)
  params = lora.combine(_quantized(_plain_params(mc), mc), _random_adapters(lc))
  got = _logits(lc, params)
  np.testing.assert_allclose(_logits(MODEL, lora.merge(params, lc)), got, atol=2e-5)


def test_lora_dropout_changes_training_but_not_evaluation():
  params = lora.combine(_plain_params(SCANNED), _random_adapters(SCANNED_LORA))
  merged = _logits(SCANNED, lora.merge(params, SCANNED_LORA))  # no dropout anywhere
  for key in (1, 2):  # evaluation and sampling: deterministic whatever the key
    np.testing.assert_allclose(_logits(SCANNED_LORA, params, key=key), merged, atol=2e-5)
  train1, train2 = (_logits(SCANNED_LORA, params, deterministic=False, key=k) for k in (1, 2))
  assert np.abs(train1 - merged).max() > 1e-2 and np.abs(train1 - train2).max() > 1e-2
  # The train step turns it on with the model's own dropouts at 0: test_qlora_loss_falls_...


def test_lora_optimizer_state_is_a_small_fraction_of_full_finetuning():
  """configs/small.py (124M), r=8 on q,v: 589,824 state scalars against 248,951,808 (0.24%)."""
  small = os.path.join(ROOT, "configs", "small.py")
  sizes = {}
  for r in (0, 8):  # scan_layers: the same params, one layer to trace
    cfg = config.load(small, lora_r=r, init_from="unused", use_flash_attention=False,
                      scan_layers=True)
    trainer = train.Trainer(cfg, 10, mesh=sharding.make_mesh(cfg, jax.devices()[:1]))
    state = jax.eval_shape(trainer.tx.init, trainer.abstract_params)  # nothing allocated
    sizes[r] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state) if x.ndim)
  d, n, h, layers, r = 768, 12, 64, 12, 8
  adapters = layers * 2 * (d * r + r * n * h)  # q and v: A [d, r], B [r, n, h]
  assert sizes[8] == 2 * adapters  # AdamW: two moments per adapter scalar
  assert sizes[0] == 2 * 124_475_904
  assert sizes[8] / sizes[0] < 0.003


# --- quantization -----------------------------------------------------------------------------


def _absmax(w, axis, group=None):
  """|w|'s max over `axis` (in groups of `group` along it), broadcast back to w's shape."""
  w = np.abs(np.asarray(w, np.float64))
  if group is None:
    return np.broadcast_to(w.max(axis, keepdims=True), w.shape)
  split = w.reshape(w.shape[:axis] + (w.shape[axis] // group, group) + w.shape[axis + 1:])
  m = split.max(axis + 1, keepdims=True)
  return np.broadcast_to(m, split.shape).reshape(w.shape)


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_quantized_weights_stay_within_their_rounding_bound(scheme):
  """Per weight, |w - dequantized| <= absmax * (int8: 1/255, int4: 1/15, nf4: half the widest
  gap between NF4 levels), absmax taken per output channel (int8) or group of 32 (4-bit); the
  contracted axis of query [D, N, H] and mlp/wo [F, D] is their first."""
  mc = _cfg(MODEL, quant=scheme, quant_group_size=32)
  base = _plain_params(mc)
  q = _quantized(base, mc)
  half_step = {"int8": 1 / 255, "int4": 1 / 15, "nf4": np.diff(NF4).max() / 2}[scheme]
  group = None if scheme == "int8" else 32
  for name in ("attn", "mlp"):
    path = ("query" if name == "attn" else "wo", "kernel")
    w = np.asarray(base["blocks_0"][name][path[0]]["kernel"], np.float64)
    leaf = q["blocks_0"][name][path[0]]["kernel"]
    assert quantize.is_quantized(leaf)
    err = np.abs(np.asarray(quantize.dequantize(leaf), np.float64) - w)
    bound = _absmax(w, 0, group) * half_step
    # float32 arithmetic in the scales: a few ulps of absmax on top.
    assert (err <= bound + 1e-6 * _absmax(w, 0, group)).all(), (name, (err / bound).max())
    assert err.max() > 0.3 * bound.max()  # a real rounding, not a copy
  # Embeddings and the untied head stay unquantized; logits move by little.
  assert not quantize.is_quantized(q["lm_head"]["kernel"])
  err = np.abs(_logits(mc, q) - _logits(MODEL, base)).max()
  assert err < {"int8": 0.02, "int4": 0.2, "nf4": 0.2}[scheme]


def test_4bit_kernels_take_an_eighth_of_float32_in_xla_memory_analysis():
  """Counted by XLA from the compiled forward pass's arguments (jax's nbytes counts a 4-bit code
  as a byte): with groups of 64, 4 bits + 32 / 64 bits of scale per weight = 4.5 / 32 = 0.14."""
  # Every kernel contracts 64 = d_model = d_ff = n_heads * d_v: one scale per 64 weights in
  # both schemes (int8: per output channel; 4-bit: per group of 64).
  mc = _cfg(MODEL, d_model=64, n_heads=1, n_kv_heads=1, d_k=64, d_v=64, d_ff=64)

  def arg_bytes(m, params):
    f = jax.jit(lambda p, x: model_lib.build(m).apply({"params": p}, x), keep_unused=True)
    return f.lower(params, TOKENS).compile().memory_analysis().argument_size_in_bytes

  base = _plain_params(mc)
  kernels = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(base)[0]
                if "blocks" in jax.tree_util.keystr(p) and x.ndim >= 2)
  fp32 = arg_bytes(mc, base)
  for scheme, bits in (("nf4", 4 + 32 / 64), ("int8", 8 + 32 / 64)):
    qc = _cfg(mc, quant=scheme, quant_group_size=64)
    q = _quantized(base, qc)
    saved = fp32 - arg_bytes(qc, q)
    ratio = 1 - saved / (4 * kernels)  # quantized kernels' bytes / their float32 bytes
    assert ratio == pytest.approx(bits / 32, abs=0.002), (scheme, ratio)
  assert quantize.param_bytes(q) < fp32


def test_quantization_settings_are_checked_with_the_field_named():
  with pytest.raises(ValueError, match=r"quant_group_size=64 does not divide d_model.* = 96"):
    quantize.check(_cfg(MODEL, quant="nf4", d_model=96, d_ff=192))
  quantize.check(_cfg(MODEL, quant="nf4", d_model=128, d_ff=256))  # 64 divides both
  with pytest.raises(ValueError, match="quantize_embeddings=True.*ties"):
    quantize.check(_cfg(MODEL, quant="int8", quantize_embeddings=True, tie_embeddings=True))
  for fields, message in (({"quant_type": "fp4"}, "quant_type='fp4'"),
                          ({"lora_r": 4, "lora_targets": "q,x"}, "lora_targets='q,x'"),
                          ({"quant_group_size": 0}, "quant_group_size=0")):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
      config.load(BASE_CONFIG, **fields)
  with pytest.raises(ValueError, match="no wi"):
    lora.target_paths("wi", "swiglu")
  for fields, message in (({"lora_r": 4}, "needs init_from"),
                          ({"load_in_4bit": True, "init_from": "x"}, "quantized weights are not"),
                          ({"init_from": "x", "tokenizer_path": "t"}, "keeps its base's token"),
                          ({"lora_r": 4, "init_from": "x", "optimizer": "muon"},
                           "optimizer='muon' with lora_r=4")):
    with pytest.raises(ValueError, match=message):
      loader.check_train(config.load(BASE_CONFIG, **fields))


# --- QLoRA training ---------------------------------------------------------------------------


def test_qlora_loss_falls_and_only_adapters_change():
  cfg = config.load(BASE_CONFIG, vocab_size=60, vocab_multiple=64, d_model=32, n_heads=2,
                    n_layers=2, max_seq_len=16, micro_batch_size=4, init_from="unused",
                    lora_r=4, lora_targets="q,v,wo", load_in_4bit=True, quant_group_size=32,
                    learning_rate=1e-2, warmup_steps=0, lr_decay="constant", lora_dropout=0.1)
  assert cfg.dropout == cfg.attention_dropout == cfg.hidden_dropout == 0.0
  mesh = sharding.make_mesh(cfg, jax.devices()[:1])
  mc = model_lib.ModelConfig.from_config(cfg)
  base = loader.quantized(_plain_params(mc), mc, mesh, sharding.logical_rules(cfg))
  before = jax.device_get(base)
  trainer = train.Trainer(cfg, 20, mesh=mesh, base=types.SimpleNamespace(params=base))
  state = trainer.init_state(0)
  assert all(lora.is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0])
  seq = np.random.default_rng(0).integers(4, 60, size=(1, 4, 17)).astype(np.int32)
  batch = {"inputs": seq[..., :-1], "targets": seq[..., 1:]}
  # The step donates its state: a copy with the same placement (so nothing recompiles).
  copy = lambda s: jax.tree.map(lambda x: jax.device_put(jnp.copy(x), x.sharding), s)

  # lora_dropout is on in training: two dropout streams, two different updates.
  other = copy(state)
  other, _ = trainer.train_step(other.replace(rng=jax.device_put(jax.random.key(9),
                                                                 other.rng.sharding)), batch)
  losses = []
  for _ in range(12):
    state, out = trainer.train_step(state, batch)
    losses.append(float(out["loss"]))
    if len(losses) == 1:
      assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                          jax.tree.leaves(other.params)))
  assert losses[-1] < losses[0] - 0.3, losses
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(trainer.base))):
    np.testing.assert_array_equal(a, b)  # the frozen base: bit for bit
  full = trainer.full_params(state.params)
  assert quantize.is_quantized(full["blocks_1"]["attn"]["query"]["kernel"])
  assert np.abs(np.asarray(full["blocks_1"]["attn"]["query"]["lora"]["b"])).max() > 0


def _check_on_8_devices():
  return helpers.run_check_script("finetune_mesh_check.py", timeout=900)


def test_qlora_step_under_a_mesh_equals_one_device(tmp_path_factory):
  """nf4 base with scanned layers on meshes (1,1,1) and (2,2,2) of 8 devices: the same loss and
  updated adapters, and every quantized kernel's codes sharded as its kernel."""
  out = run_once.once(tmp_path_factory, "finetune_mesh_check", _check_on_8_devices)
  assert out["devices"] == 8 and set(out["steps"]) == {"1x1x1", "2x2x2"}
  ref = out["steps"]["1x1x1"]
  for mesh, r in out["steps"].items():
    assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5), mesh
    assert r["adapter_diff"] < 1e-5, mesh
    assert r["n_quantized"] == 7 and r["codes_sharded_as_kernels"], mesh  # q,k,v,o,gate,up,wo
    assert r["all_adapters"] and r["adapter_leaves"] == 14 + 2, mesh  # + embed, head rows
    assert r["rows_sharded_as_tables"] == [True, True] and r["rows_moved"] > 0, mesh


# --- end to end: fine-tune, eval, sample, export, changed base ---------------------------------


def _write_text(root, syllables, seed):
  rng = np.random.default_rng(seed)
  words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(300)]
  os.makedirs(root)
  for i in range(8):
    with open(os.path.join(root, f"{i}.txt"), "w", encoding="utf-8") as f:
      f.write("\n".join(" ".join(rng.choice(words, size=rng.integers(3, 9))).capitalize() + "."
                        for _ in range(50)) + "\n")


TINY = dict(vocab_size=256, vocab_multiple=64, byte_fallback=False, d_model=32, n_heads=2,
            n_layers=2, max_seq_len=16, micro_batch_size=4)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A base model checkpoint (random params: the mechanics, not the quality) with its tokenizer,
  and a text corpus of another kind to fine-tune it on."""
  root = tmp_path_factory.mktemp("finetune")
  syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ba", "de", "fo", "gu", "ha", "ji",
               "pe", "qu", "ri", "so", "tu", "we"]
  _write_text(root / "base_text", syllables, 0)
  _write_text(root / "new_text", syllables[::3], 1)  # another vocabulary of words
  cfg = config.load(BASE_CONFIG, **TINY, dataset=f"text:{root}/base_text",
                    data_dir=str(root / "data"), tokenizer_path=str(root / "base_tok.model"))
  tok = data_lib.build(cfg, None).tokenizer
  mc = model_lib.ModelConfig.from_config(cfg)
  params = helpers.random_params(nn.meta.unbox(jax.eval_shape(
      lambda k: model_lib.init_params(mc, k), jax.random.key(0))), std=0.1)
  workdir = str(root / "base")
  checkpoint.save_params(workdir, 7, params, cfg.to_dict(), tok)
  return types.SimpleNamespace(root=root, workdir=workdir, params=jax.device_get(params),
                               tokenizer=tok, config=cfg.to_dict())


def _ft_cfg(base_run, **changes):
  fields = dict(dataset=f"text:{base_run.root}/new_text", data_dir=str(base_run.root / "data"),
                init_from=base_run.workdir, lora_r=4, lora_targets="q,v", learning_rate=1e-2,
                warmup_steps=1, num_train_steps=6, eval_steps=3, save_steps=3, log_every=1,
                micro_batch_size=4, sample_every_eval=False, max_new_tokens=8, do_sample=False)
  return config.load(BASE_CONFIG, **{**fields, **changes})


def _metrics(workdir, key):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


@pytest.fixture(scope="module")
def lora_run(base_run):
  workdir = str(base_run.root / "ft")
  assert train.run(_ft_cfg(base_run), workdir, overrides={}) == 0
  return workdir


def test_lora_finetune_logs_step_0_keeps_the_base_tokenizer_and_saves_adapters(base_run,
                                                                               lora_run):
  eval_loss = _metrics(lora_run, "eval/loss")
  assert sorted(eval_loss) == [0, 3, 6]  # the base before any update, then the fine-tune's
  with open(os.path.join(lora_run, "tokenizer.model"), "rb") as f:
    assert f.read() == base_run.tokenizer.model_proto  # copied, not trained on the new text
  ckpt = os.path.join(checkpoint.checkpoint_dir(lora_run), "6")
  saved = ocp.StandardCheckpointer().restore(os.path.join(ckpt, "params"))
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(saved)[0]]
  assert paths and all(lora.is_adapter(p) for p in paths)
  assert len(paths) == 2 * 2 * 2  # (a, b) x (q, v) x 2 layers
  _, items = checkpoint.load_json(lora_run, ("config", "base"))
  assert items["config"]["d_model"] == 32 and items["config"]["max_seq_len"] == 16  # the base's
  assert items["base"]["path"] == os.path.join(checkpoint.checkpoint_dir(base_run.workdir), "7")


def test_lora_workdir_evaluates_samples_and_exports_to_the_same_model(base_run, lora_run,
                                                                      capsys):
  import main  # pylint: disable=import-outside-toplevel
  cfg = _ft_cfg(base_run)
  assert train.evaluate_workdir(cfg, lora_run) == 0
  out = capsys.readouterr().out
  got = float(re.search(r"eval of checkpoint 6 .*?: loss ([0-9.]+)", out).group(1))
  assert got == pytest.approx(_metrics(lora_run, "eval/loss")[6], abs=1e-4)

  assert main.sample(cfg, lora_run, ["ka lo", "mi"]) == 0
  from_lora = capsys.readouterr().out.split("\n", 1)[1]
  merged = str(base_run.root / "merged")
  with cfg.unlocked():
    cfg.export_dir = merged
  assert main.export(cfg, lora_run) == 0
  assert "exported" in capsys.readouterr().out
  _, items = checkpoint.load_json(merged, ("config", "base"))
  assert items["config"]["lora_r"] == 0 and items["base"] is None  # a plain checkpoint
  assert main.sample(cfg, merged, ["ka lo", "mi"]) == 0
  assert capsys.readouterr().out.split("\n", 1)[1] == from_lora  # greedy: the same text


def test_model_shape_on_the_command_line_is_refused_with_init_from(base_run, tmp_path, capsys):
  cfg = _ft_cfg(base_run, d_model=48, rope_theta=500.0)
  with pytest.raises(checkpoint.CheckpointError,
                     match="d_model: the checkpoint has 32, the command line asks 48"):
    train.run(cfg, str(tmp_path / "ft"), overrides={"d_model": 48})
  assert not os.path.exists(tmp_path / "ft")  # bad input leaves no half-made workdir


def test_resuming_against_a_changed_base_is_refused(base_run, lora_run, capsys):
  ckpt = os.path.join(checkpoint.checkpoint_dir(base_run.workdir), "7")
  kept = ckpt + ".kept"
  os.rename(ckpt, kept)
  try:  # the same step, other params: as if the base had been trained again
    other = jax.tree.map(lambda x: x * 1.01, base_run.params)
    checkpoint.save_params(base_run.workdir, 7, other, base_run.config, base_run.tokenizer)
    with pytest.raises(checkpoint.CheckpointError, match=r"changed since .*fingerprint"):
      loader.load(lora_run, _ft_cfg(base_run))
    before = sorted(os.listdir(checkpoint.checkpoint_dir(lora_run)))
    with pytest.raises(checkpoint.CheckpointError, match=f"the base model {re.escape(ckpt)} changed"):
      train.run(_ft_cfg(base_run, num_train_steps=9), lora_run, overrides={})
    assert sorted(os.listdir(checkpoint.checkpoint_dir(lora_run))) == before
  finally:
    shutil.rmtree(ckpt, ignore_errors=True)
    os.rename(kept, ckpt)


@pytest.mark.parametrize("fields", [{"load_in_4bit": True, "quant_group_size": 16},
                                    {"load_in_4bit": True, "quant_type": "int4"}])
def test_quantized_export_restores_bit_for_bit(base_run, tmp_path, fields):
  """nf4 codes are uint4, which orbax's tensorstore cannot write: they go through uint8."""
  cfg = config.load(BASE_CONFIG, **TINY, **fields, export_dir=str(tmp_path / "q"),
                    data_dir=str(base_run.root / "data"))
  want = loader.load(base_run.workdir, cfg).params  # quantized at load
  loader.export(cfg, base_run.workdir)
  got = loader.load(str(tmp_path / "q"), config.load(BASE_CONFIG))  # a config without load_in_*
  assert got.model_cfg.quant == cfg.quant_type and "as stored" in got.quantization
  kernel = got.params["blocks_0"]["attn"]["query"]["kernel"]
  assert kernel.array.qvalue.dtype == {"nf4": jnp.uint4, "int4": jnp.int4}[cfg.quant_type]
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got.params)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="holds quantized weights, which are not trained"):
    loader.start_finetune(config.load(BASE_CONFIG, init_from=str(tmp_path / "q")),
                          str(tmp_path / "ft"), MESH)


# --- model fields read back (issue 10, item 5) ----------------------------------------------------


def test_model_fields_come_from_the_checkpoint(caplog):
  cfg = config.load(BASE_CONFIG, rope_theta=10000.0, layer_norm_eps=1e-5, d_model=64,
                    activation="gelu", max_seq_len=64)
  saved = dict(cfg.to_dict(), rope_theta=500000.0, layer_norm_eps=1e-6, activation="swiglu",
               d_model=32, d_k=4, d_v=4, d_ff=128, max_seq_len=32)
  got = loader.with_model_fields(cfg, saved, asked=())  # a config file's values: replaced
  assert (got.rope_theta, got.layer_norm_eps, got.activation, got.d_model, got.d_ff,
          got.max_seq_len, got.block_size) == (500000.0, 1e-6, "swiglu", 32, 128, 32, 32)
  with caplog.at_level("WARNING"):
    got = loader.with_model_fields(cfg, saved, asked={"rope_theta", "layer_norm_eps"})
  assert got.rope_theta == 500000.0 and got.layer_norm_eps == 1e-6
  assert "rope_theta=500000.0, not 10000.0" in caplog.text and "layer_norm_eps" in caplog.text
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"d_model: the checkpoint has 32, the command line asks 64"):
    loader.with_model_fields(cfg, saved, asked={"d_model", "rope_theta"})


@pytest.mark.skipif(not os.environ.get("LLM_JAX_TRAINED_DEFAULT"),
                    reason="set LLM_JAX_TRAINED_DEFAULT to a trained configs/default.py workdir")
def test_quantized_eval_loss_on_a_trained_default_run(capsys):
  """int8 within 1% and nf4 within 5% of the float32 eval loss (measured: +0.003%, +0.05%)."""
  workdir = os.environ["LLM_JAX_TRAINED_DEFAULT"]
  losses = {}
  for name, fields in (("fp32", {}), ("int8", {"load_in_8bit": True}),
                       ("nf4", {"load_in_4bit": True})):
    cfg = config.load(os.path.join(ROOT, "configs", "default.py"), **fields)
    assert train.evaluate_workdir(cfg, workdir) == 0
    losses[name] = float(re.search(r": loss ([0-9.]+)", capsys.readouterr().out).group(1))
  assert losses["int8"] <= 1.01 * losses["fp32"] and losses["nf4"] <= 1.05 * losses["fp32"]
