"""Long context (issue 26): RoPE scaling and sliding-window attention.

Windowed attention against a masked numpy reference; the ring-buffer KV cache against uncached
decoding and a host loop of plain forward passes, past several window lengths; every RoPE
scaling and a Mistral with a sliding window against what transformers computed for them
(tests/fixtures/hf/variants/, made by tests/fixtures/make_hf_fixtures.py: no torch here).
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from test_attention import qkv, reference_attention
from test_hf import FIXTURES, check_export_roundtrip, check_logits_and_greedy

from llm_jax import attention
from llm_jax import config
from llm_jax import hf
from llm_jax import loader
from llm_jax import model as model_lib
from llm_jax import ring_cache
from llm_jax import sampling

WINDOW = 5


def _band(t, s, window):
  """Numpy: query i sees key j iff i - window < j <= i."""
  i, j = np.arange(t)[:, None], np.arange(s)[None]
  return (j <= i) & (j > i - window)


@pytest.mark.parametrize("window", [1, 3, 12])
def test_windowed_attention_equals_a_masked_reference(window):
  q, k, v = qkv(t=12, s=12)
  got = attention.attention(q, k, v, is_causal=True, window=window)
  np.testing.assert_allclose(got, reference_attention(q, k, v, _band(12, 12, window)[None, None]),
                             rtol=1e-5, atol=1e-5)
  # With packed segments: the window and the segments both apply.
  seg = np.repeat([[0, 1, 2]], 4, axis=1).repeat(2, axis=0)
  got = attention.attention(q, k, v, is_causal=True, window=window, segment_ids_BT=seg)
  same = seg[:, :, None] == seg[:, None, :]
  np.testing.assert_allclose(got, reference_attention(
      q, k, v, (_band(12, 12, window)[None] & same)[:, None]), rtol=1e-5, atol=1e-5)


def test_sliding_window_mask_takes_any_slots():
  """The mask is a function of slots, so a ring's or a shard's key slots work as they are."""
  q_slots, k_slots = np.array([7, 8, 9]), np.array([9, 3, 5, 6, 8, 4])
  got = np.asarray(attention.sliding_window(q_slots, k_slots, 3))[0, 0]
  np.testing.assert_array_equal(got, k_slots[None] > q_slots[:, None] - 3)
  assert attention.sliding_window(q_slots, k_slots, None) is None
  assert attention.sliding_window(np.ones((2, 3)), np.ones((2, 6)), 2).shape == (2, 1, 3, 6)


def _model(window=WINDOW, **kw):
  cfg = config.load("configs/base.py", vocab_size=50, vocab_multiple=8, d_model=32, n_heads=4,
                    n_layers=2, max_seq_len=64, tie_embeddings=False, sliding_window=window, **kw)
  mcfg = model_lib.ModelConfig.from_config(cfg, backend="cpu")
  shapes = jax.eval_shape(functools.partial(model_lib.init_params, mcfg), jax.random.key(0))
  std = lambda name, shape: 1.0 if "embedding" in name else 2.0 / np.sqrt(shape[0])
  return mcfg, helpers.random_params(shapes, 0, std)


@pytest.fixture(scope="module")
def windowed():
  return _model()


def test_a_token_reaches_only_n_layers_windows_ahead(windowed):
  """Training's forward: changing token 0 changes the logits at positions up to
  n_layers * (window - 1) and none after (each layer reaches window - 1 tokens back)."""
  mcfg, params = windowed
  toks = np.random.default_rng(0).integers(0, 50, (1, 20))
  other = toks.copy()
  other[0, 0] = (toks[0, 0] + 1) % 50
  fwd = jax.jit(model_lib.Transformer(mcfg).apply)
  diff = np.abs(np.asarray(fwd({"params": params}, toks) - fwd({"params": params}, other)))
  reach = mcfg.n_layers * (WINDOW - 1)
  assert diff[0, :reach + 1].max(-1).min() > 1e-6 and diff[0, reach + 1:].max() == 0.0


def test_ring_cache_generation_equals_uncached_past_several_windows(windowed):
  """Greedy decoding with the ring-buffer cache (W entries, prompts padded past W) == without a
  cache == a host loop of plain windowed forward passes, for 30 new tokens (6 windows)."""
  mcfg, params = windowed
  prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
  greedy = sampling.SamplingConfig(max_new_tokens=30, do_sample=False, check_every=8)
  cached = sampling.generate(params, mcfg, prompts, greedy, jax.random.key(0), eos_id=49)
  uncached = sampling.generate(params, mcfg, prompts, greedy, jax.random.key(0), eos_id=49,
                               use_cache=False)
  assert cached == uncached and min(map(len, cached)) > 3 * WINDOW
  fwd = jax.jit(model_lib.Transformer(mcfg).apply)
  seqs = [list(p) for p in prompts]
  for _ in range(30):  # one batch per step: rows right-padded (causal: no effect before)
    buf = np.zeros((3, 40), np.int32)
    for r, s in enumerate(seqs):
      buf[r, :len(s)] = s
    logits = np.asarray(fwd({"params": params}, buf))
    for r, s in enumerate(seqs):
      s.append(int(np.argmax(logits[r, len(s) - 1, :50])))
  for p, s, got in zip(prompts, seqs, cached):
    assert s[len(p):len(p) + len(got)] == got
  # The cache holds W entries however long the generation; without a window, all of it.
  state = jax.eval_shape(functools.partial(
      sampling._start, model_cfg=mcfg, scfg=sampling.SamplingConfig(max_new_tokens=500),  # pylint: disable=protected-access
      beam=False), params, jnp.zeros((3, 16), jnp.int32), jnp.ones((3, 16), bool),
      jax.random.key(0), jnp.array([49, 49]))
  assert state["cache"]["k"].shape == (2, 3, WINDOW, 4, 8)
  assert ring_cache.length(None, 516) == 516


def test_ring_key_slots_are_the_window():
  """Every layout key_slots gives holds exactly the slots the window needs (or unwritten ones)."""
  for index in range(0, 13):
    slots = np.asarray(ring_cache.key_slots(index, 1, WINDOW))
    assert sorted(s for s in slots if s >= 0) == list(range(max(0, index - WINDOW + 1), index + 1))
    slots = np.asarray(ring_cache.key_slots(index, 3, WINDOW))
    assert sorted(s for s in slots if s >= 0) == list(range(max(0, index - WINDOW), index + 3))


def test_rope_frequencies_of_each_scaling():
  base = attention.rope_frequencies(64, 1e4)
  dyn = lambda n: np.asarray(attention.dynamic_ntk_frequencies(64, 1e4, 4.0, 128, n))
  np.testing.assert_allclose(dyn(100), base, rtol=1e-6)  # up to the original length: unscaled
  grown = dyn(512)  # base * (4 * 512 / 128 - 3) ** (64 / 62)
  np.testing.assert_allclose(grown, (1e4 * 13 ** (64 / 62)) ** (-np.arange(0, 64, 2) / 64),
                             rtol=1e-5)
  yarn = attention.rope_frequencies(64, 1e4, "yarn", 4.0, original_max_len=128)
  # The fast dims (many turns in 128 tokens) keep their frequency, the slow ones are divided.
  assert yarn[0] == base[0] and np.isclose(yarn[-1], base[-1] / 4)
  assert np.all(np.diff(yarn / base) <= 1e-7)
  assert attention.rope_attention_factor("yarn", 4.0) == pytest.approx(0.1 * np.log(4) + 1)
  assert attention.rope_attention_factor("yarn", 4.0, attention_factor=0.5) == 0.5
  assert attention.rope_attention_factor("linear", 4.0) == 1.0


# ------------------------------------------------------------ against transformers (fixtures)


VARIANTS = ("linear", "dynamic", "yarn", "mistral")


def _variant_dir(name, tmp_path):
  """The llama fixture's weights and tokenizer with the variant's config.json and references."""
  out = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, "llama"), out)
  for f in os.listdir(os.path.join(FIXTURES, "variants", name)):
    shutil.copy(os.path.join(FIXTURES, "variants", name, f), out / f)
  return str(out)


@pytest.mark.parametrize("name", VARIANTS)
def test_imported_variant_logits_greedy_and_export_match_transformers(name, tmp_path):
  """Logits over 40 tokens == transformers' for every RoPE scaling (dynamic NTK's original
  length is 12, so it scales) and for a Mistral with an 8-token window; greedy continuations
  == its generate() with a cache (dynamic: each key keeps its step's rotation; Mistral: the ring
  buffer, 20 + 16 tokens); export then import gives the same model and config."""
  directory = _variant_dir(name, tmp_path)
  cfg, params, mc, tok = check_logits_and_greedy(directory)
  want = {"linear": ("linear", None), "dynamic": ("dynamic", None), "yarn": ("yarn", None),
          "mistral": ("none", 8)}[name]
  assert (mc.rope_scaling, mc.sliding_window) == want
  if name == "dynamic":
    assert (mc.rope_scaling_factor, mc.rope_original_max_len) == (4.0, 12)
  check_export_roundtrip(directory, params, mc, tok, str(tmp_path / "export"))
  with open(os.path.join(tmp_path / "export", "config.json"), encoding="utf-8") as f:
    exported = json.load(f)
  if name == "mistral":
    assert exported["model_type"] == "mistral" and exported["sliding_window"] == 8


def test_hf_rope_and_window_mapping():
  llama = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256,
           "max_position_embeddings": 256}
  yarn = hf.model_fields({**llama, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 64,
                                                    "truncate": False}})
  assert (yarn["rope_scaling"], yarn["rope_scaling_factor"], yarn["rope_original_max_len"],
          yarn["rope_truncate"], yarn["rope_beta_fast"]) == ("yarn", 4.0, 64, False, None)
  # transformers' defaults: YaRN's factor from the lengths, llama3's original length.
  assert hf.model_fields({**llama, "rope_scaling": {
      "rope_type": "yarn", "original_max_position_embeddings": 64}})["rope_scaling_factor"] == 4.0
  mistral = {**llama, "model_type": "mistral", "sliding_window": 128}
  assert hf.model_fields(mistral)["sliding_window"] == 128
  assert hf.model_fields(mistral, max_seq_len=128)["sliding_window"] is None  # the whole context
  qwen = {**llama, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64,
          "max_window_layers": 0}
  assert hf.model_fields(qwen)["sliding_window"] == 64


@pytest.mark.parametrize("change, needles", [
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4}}, ("rope_type='longrope'",)),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
     ("'low_freq_factor'", "rope_type='llama3'")),
    ({"rope_scaling": {"rope_type": "linear"}}, ("'factor'",)),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "fator": 3}}, ("'fator'",)),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64,
      "max_window_layers": 1}, ("layer_types mixes", "1 of 2")),
])
def test_hf_bad_rope_and_window_configs_are_refused(change, needles):
  llama = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256,
           "max_position_embeddings": 256}
  with pytest.raises(hf.HFError) as e:
    hf.model_fields({**llama, **change})
  for needle in needles:
    assert needle in str(e.value), str(e.value)


# ----------------------------------------------------------------------------------- loader


def test_context_fields_asked_win_over_the_checkpoints():
  """A checkpoint's max_seq_len, RoPE scaling and window are used unless asked for; asked, they
  win (context extension), the scaling's fields as a group. Older checkpoints' unread defaults
  (factor 1.0 with no scaling) are dropped."""
  cfg = config.load("configs/base.py", max_seq_len=512, rope_scaling="yarn",
                    rope_scaling_factor=4.0, rope_original_max_len=128)
  saved = dict(cfg.to_dict(), max_seq_len=128, rope_scaling="none", rope_scaling_factor=1.0,
               rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192)
  for f in ("rope_beta_fast", "sliding_window"):
    saved.pop(f)  # a checkpoint from before these fields
  got = loader.with_model_fields(cfg, saved)
  assert (got.max_seq_len, got.rope_scaling, got.rope_scaling_factor,
          got.rope_original_max_len, got.sliding_window) == (128, "none", None, None, None)
  got = loader.with_model_fields(cfg, saved, asked={"max_seq_len", "rope_scaling_factor"})
  assert (got.max_seq_len, got.rope_scaling, got.rope_scaling_factor,
          got.rope_original_max_len) == (512, "yarn", 4.0, 128)


def test_backends_without_a_window_say_so():
  """The Pallas flash kernel has no sliding window: refused before anything compiles (TPU)."""
  cfg = config.load("configs/base.py", sliding_window=64, use_flash_attention=True)
  with pytest.raises(config.ConfigError, match="use_flash_attention=False"):
    config.flash_attention_backend(cfg, "tpu")
  plain = config.load("configs/base.py", sliding_window=64)
  assert config.flash_attention_backend(plain, "tpu") == "xla"
  q, k, v = qkv(t=4, s=4)
  with pytest.raises(ValueError, match="Pallas"):
    attention.attention(q, k, v, impl="pallas", is_causal=True, window=2)


def test_serving_slots_apply_the_window(windowed):
  """The serving engine keeps its fixed-size cache of the serving context (32 > W) and applies the
  window as a mask: its greedy tokens equal the sampler's (the ring buffer's)."""
  from llm_jax.serve import engine  # pylint: disable=g-import-not-at-top
  mcfg, params = windowed
  prompt = [5, 6, 7, 8, 9, 10, 11]
  want = sampling.generate(params, mcfg, [prompt], sampling.SamplingConfig(
      max_new_tokens=12, do_sample=False), jax.random.key(0), eos_id=49)[0]
  knobs = {"temperature": np.float32(0.0), "top_k": np.int32(0), "top_p": np.float32(1.0),
           "repetition_penalty": np.float32(1.0), "min_tokens": np.int32(0)}
  terminal = np.asarray([49, 49], np.int32)
  st = engine.init_state(mcfg, 2, 32)
  buf = np.zeros((1, 16), np.int32)
  buf[0, :len(prompt)] = prompt
  st, (tok, *_) = engine._prefill_jit(params, st, buf, len(prompt), 1, knobs, 0, 0, terminal,  # pylint: disable=protected-access
                                      model_cfg=mcfg)
  got = [int(tok[0])]
  while len(got) < len(want):
    st, (tok, *_) = engine._decode_jit(params, st, terminal, model_cfg=mcfg)  # pylint: disable=protected-access
    got.append(int(tok[1]))
  assert got == want


def test_extension_study_configs():
  """The extension study's runs: the base at 128, each scaling at 512 with the base's tokens per
  step and the fields its type needs (a finalized config, so valid)."""
  from experiments import extension  # pylint: disable=g-import-not-at-top
  cfgs = extension.configs(config.load_unchecked("configs/default.py"), 128, 512, 60)
  assert cfgs["base"].max_seq_len == 128
  for kind in extension.SCALINGS:
    c = cfgs[kind]
    assert (c.max_seq_len, c.block_size, c.rope_scaling, c.micro_batch_size * 512) == (
        512, 512, kind, cfgs["base"].micro_batch_size * 128)
  assert (cfgs["yarn"].rope_scaling_factor, cfgs["yarn"].rope_original_max_len) == (4.0, 128)
  with pytest.raises(Exception, match="multiple"):
    extension.configs(config.load_unchecked("configs/default.py"), 128, 300, 60)


@pytest.mark.cuda_compile
@pytest.mark.skipif(__import__("llm_jax.gpu_targets").gpu_targets.installed_plugin() is None,
                    reason="JAX's CUDA plugin is not installed (make test-cuda-compile)")
def test_a_windowed_train_step_compiles_to_cudnn_attention_for_one_h100():
  """cuDNN takes the window itself (local_window_size): the compiled step keeps its fused
  attention, forward and backward."""
  from llm_jax import gpu_targets, sizing  # pylint: disable=g-import-not-at-top
  cfg = config.load("configs/base.py", compile_topology="h100", mesh_shape=(1, 1, 1),
                    vocab_size=256, d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
                    micro_batch_size=8, warmup_steps=0, dtype="bfloat16",
                    use_flash_attention=True, sliding_window=32)
  r, compiled = sizing.compile_report(cfg)
  assert r.attention_impl == "cudnn"
  calls = gpu_targets.cudnn_attention_calls(compiled.as_text())
  assert "__cudnn$fmhaSoftmax" in calls and "__cudnn$fmhaSoftmaxBackward" in calls
