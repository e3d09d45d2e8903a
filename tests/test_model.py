"""Transformer properties: causality for every architecture combination, cached == uncached
decoding (left padding, scan), packing, GQA/MHA and scan/unrolled parameter mappings, dropout,
bf16, remat, padded vocab and logical axis names."""

import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import config, layers, model

BASE = model.ModelConfig(vocab_size=97, vocab_multiple=64, d_model=32, n_heads=4, n_kv_heads=4,
                         n_layers=2, d_ff=64, d_k=8, d_v=8, max_position_embeddings=32)
AXIS_NAMES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", None}


def cfg_of(**kw):
  return dataclasses.replace(BASE, **kw)


def random_params(cfg, seed=0, std=0.3):
  """Random params of the model's shapes, larger than the init so every path matters."""
  shapes = jax.eval_shape(lambda key: model.init_params(cfg, key), jax.random.key(0))
  r = np.random.default_rng(seed)

  def fill(path, s):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.asarray(1 + 0.1 * r.normal(size=s.shape), s.dtype)
    return jnp.asarray(std * r.normal(size=s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# Eager calls all use one token shape, so their per-op compiles (the bulk of eager cost on CPU)
# are cached across the 36 causality architectures and the tests after them.
B, T = 9, 8


def random_tokens(seed):
  return np.random.default_rng(seed).integers(0, 97, (B, T))


def apply(cfg, params, tokens, **kw):
  """Eager forward: cheap when the shapes were seen before."""
  return model.Transformer(cfg).apply({"params": params}, jnp.asarray(tokens), **kw)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("deterministic",))
def jit_apply(cfg, params, tokens, **kw):
  """Jitted forward: one compile, far cheaper than eager for shapes seen for the first time."""
  return model.Transformer(cfg).apply({"params": params}, tokens, **kw)


def to_scanned(params, n_layers):
  """Unrolled params (blocks_i) -> scan params (layers, stacked on axis 0)."""
  out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[params[f"blocks_{i}"] for i in range(n_layers)])
  return out


COMBOS = list(itertools.product(["rope", "sinusoidal", "learned"], [False, True],
                                ["relu", "gelu", "swiglu"], [4, 2]))


@pytest.mark.parametrize("pos,rms,act,kv", COMBOS)
def test_changing_a_token_never_changes_earlier_logits(pos, rms, act, kv):
  cfg = cfg_of(position_embedding=pos, use_rms_norm=rms, activation=act, n_kv_heads=kv,
               n_layers=1)
  base = random_tokens(0)[0]
  tokens = np.tile(base, (T + 1, 1))
  for j in range(T):
    tokens[j + 1, j] = (base[j] + 1 + j) % 97  # row j+1 differs from row 0 only at position j
  logits = np.asarray(apply(cfg, random_params(cfg), tokens))
  for j in range(T):
    np.testing.assert_allclose(logits[j + 1, :j], logits[0, :j], atol=1e-5)
    assert np.abs(logits[j + 1, j] - logits[0, j]).max() > 1e-3  # and the change is visible


def test_padded_vocab_is_unreachable():
  for tie in (True, False):
    cfg = cfg_of(tie_embeddings=tie)
    assert cfg.padded_vocab == 128
    logits = apply(cfg, random_params(cfg, std=1.0), random_tokens(1))
    assert logits.shape == (B, T, 128) and logits.dtype == jnp.float32
    assert (np.asarray(logits[..., 97:]) == model.PADDED_LOGIT).all()
    assert (np.asarray(logits.argmax(-1)) < 97).all()
    assert float(jax.nn.softmax(logits)[..., 97:].sum()) == 0.0


def test_model_config_from_config_and_param_names():
  cfg = config.load("configs/base.py", d_model=48, n_heads=4, vocab_size=300, vocab_multiple=128,
                    use_flash_attention=True, tie_embeddings=False,
                    position_embedding="learned")
  mc = model.ModelConfig.from_config(cfg, backend="cpu")
  assert (mc.padded_vocab, mc.d_k, mc.d_ff, mc.attention_impl) == (384, 12, 192, "xla")
  assert hash(mc) == hash(model.ModelConfig.from_config(cfg, backend="cpu"))
  shapes = jax.eval_shape(lambda key: model.init_params(mc, key), jax.random.key(0))
  assert shapes["embed"]["embedding"].shape == (384, 48)
  assert shapes["pos_embed"]["embedding"].shape == (256, 48)
  assert shapes["lm_head"]["kernel"].shape == (48, 384)
  with pytest.raises(ValueError, match="even d_k"):
    cfg_of(d_k=7)


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_axes(scan):
  cfg = cfg_of(scan_layers=scan, use_rms_norm=scan, activation="swiglu",
               position_embedding="learned", tie_embeddings=False)
  shapes = jax.eval_shape(lambda key: model.init_params(cfg, key), jax.random.key(0))
  specs = model.param_logical_axes(cfg)
  flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
  flat_specs = jax.tree_util.tree_leaves(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(flat_shapes) == len(flat_specs)
  for (path, s), spec in zip(flat_shapes, flat_specs):
    assert len(spec) == len(s.shape), jax.tree_util.keystr(path)
    assert set(spec) <= AXIS_NAMES and spec != (None,) * len(s.shape)
    assert scan == ("layers" in spec) or "blocks_" not in jax.tree_util.keystr(path)


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa = cfg_of(n_kv_heads=2)
  params = random_params(gqa)
  mha_params = jax.tree.map(lambda x: x, params)
  for i in range(gqa.n_layers):
    attn = mha_params[f"blocks_{i}"]["attn"]
    for name in ("key", "value"):  # q head n reads kv head n // 2: repeat each kv head twice
      attn[name] = {"kernel": jnp.repeat(attn[name]["kernel"], 2, axis=1),
                    "bias": jnp.repeat(attn[name]["bias"], 2, axis=0)}
  tokens = random_tokens(2)
  np.testing.assert_allclose(apply(gqa, params, tokens), apply(BASE, mha_params, tokens),
                             atol=1e-5)


@pytest.mark.parametrize("which", ["dropout", "attention_dropout", "hidden_dropout"])
def test_dropout_only_when_not_deterministic(which):
  cfg = cfg_of(**{which: 0.3})
  params = random_params(cfg)
  tokens = random_tokens(3)
  det = apply(cfg, params, tokens)
  np.testing.assert_array_equal(det, apply(cfg, params, tokens, deterministic=True))
  np.testing.assert_allclose(det, apply(BASE, params, tokens), atol=1e-6)
  train = lambda seed: apply(cfg, params, tokens, deterministic=False,
                             rngs={"dropout": jax.random.key(seed)})
  a = train(0)
  assert np.abs(np.asarray(a - det)).max() > 1e-3
  np.testing.assert_array_equal(a, train(0))
  assert np.abs(np.asarray(a - train(1))).max() > 1e-3


def test_bf16_logits_match_fp32():
  params = random_params(BASE)
  tokens = random_tokens(4)
  f32 = np.asarray(apply(BASE, params, tokens))[..., :97]
  bf16 = jit_apply(cfg_of(dtype="bfloat16"), params, tokens)  # one compile, not ~100 op ones
  assert bf16.dtype == jnp.float32
  bf16 = np.asarray(bf16)[..., :97]
  assert np.abs(bf16 - f32).max() < 0.05 * np.abs(f32).max()
  assert np.corrcoef(bf16.ravel(), f32.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("scan,pos,kv", [(False, "rope", 4), (True, "learned", 2)])
def test_cached_decode_matches_full_forward(scan, pos, kv):
  cfg = cfg_of(position_embedding=pos, n_kv_heads=kv, scan_layers=scan)
  params = random_params(cfg)
  r = np.random.default_rng(5)
  prompt_lens, prompt_max, new = np.array([5, 3, 1]), 5, 4
  rows = [r.integers(4, 97, n + new) for n in prompt_lens]
  pad = prompt_max - prompt_lens
  tokens = np.stack([np.pad(x, (p, 0)) for x, p in zip(rows, pad)])  # left-padded, [3, 9]
  slots = np.arange(tokens.shape[1])
  positions = np.maximum(slots[None] - pad[:, None], 0)
  max_len = 12  # more slots than used: the never-written ones must stay invisible
  kv_valid = np.pad(slots[None] >= pad[:, None], ((0, 0), (0, max_len - len(slots))))

  # Reference: each row alone from position 0 (right padding cannot change earlier logits).
  # The same compile also runs the left-padded batch uncached, as use_cache=False decoding does.
  ref = np.asarray(jit_apply(cfg, params, np.stack([np.pad(x, (0, 9 - len(x))) for x in rows]),
                             positions_BT=np.tile(slots, (3, 1)),
                             kv_valid_BS=np.ones((3, 9), bool)))
  uncached = np.asarray(jit_apply(cfg, params, tokens, positions_BT=positions,
                                  kv_valid_BS=kv_valid[:, :9]))

  step = jax.jit(lambda tok, pos, cache, i: model.Transformer(cfg).apply(
      {"params": params}, tok, positions_BT=pos, cache=cache, cache_index=i,
      kv_valid_BS=kv_valid))
  cache = model.init_cache(cfg, 3, max_len, jnp.float32)
  logits, cache = step(tokens[:, :prompt_max], positions[:, :prompt_max], cache, 0)  # prefill
  outs = [np.asarray(logits)]
  for i in range(prompt_max, tokens.shape[1]):
    logits, cache = step(tokens[:, i:i + 1], positions[:, i:i + 1], cache, i)
    outs.append(np.asarray(logits))
  cached = np.concatenate(outs, axis=1)
  assert cache["k"].shape == (cfg.n_layers, 3, max_len, kv, cfg.d_k)
  for b in range(3):
    np.testing.assert_allclose(cached[b, pad[b]:], ref[b, :len(rows[b])], atol=1e-5)
    np.testing.assert_allclose(uncached[b, pad[b]:], ref[b, :len(rows[b])], atol=1e-5)


def test_packed_documents_do_not_see_each_other():
  params = random_params(BASE)
  r = np.random.default_rng(6)
  doc_a, doc_b = r.integers(0, 97, 5), r.integers(0, 97, 7)
  # Row 0 packs both documents; rows 1 and 2 hold each alone (right padding is invisible to
  # causal attention), so one compile covers all three.
  tokens = np.stack([np.concatenate([doc_a, doc_b]), np.pad(doc_a, (0, 7)), np.pad(doc_b, (0, 5))])
  positions = np.stack([np.r_[np.arange(5), np.arange(7)], np.arange(12), np.arange(12)])
  segments = np.array([[1] * 5 + [2] * 7, [1] * 5 + [0] * 7, [1] * 7 + [0] * 5])
  logits = np.asarray(jit_apply(BASE, params, tokens, positions_BT=positions,
                                segment_ids_BT=segments))
  np.testing.assert_allclose(logits[0, :5], logits[1, :5], atol=1e-5)
  np.testing.assert_allclose(logits[0, 5:], logits[2, :7], atol=1e-5)
  unpacked = np.asarray(jit_apply(BASE, params, tokens, positions_BT=positions,
                                  segment_ids_BT=np.ones_like(segments)))
  assert np.abs(unpacked[0, 5:] - logits[2, :7]).max() > 1e-3  # without segment ids it leaks


def test_remat_and_scan_give_same_loss_and_grads():
  params = random_params(BASE)
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, 97, (2, 9)))

  def loss_and_grads(policy, scan=False):
    cfg = cfg_of(remat_policy=policy, scan_layers=scan)

    def loss(p):
      logits = model.Transformer(cfg).apply({"params": p}, tokens[:, :-1])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    return jax.jit(jax.value_and_grad(loss))(to_scanned(params, 2) if scan else params)

  ref_loss, ref_grads = loss_and_grads("none")
  for policy, scan in (("dots", False), ("full", True)):
    l, g = loss_and_grads(policy, scan)
    np.testing.assert_allclose(l, ref_loss, rtol=1e-6)
    expect = to_scanned(ref_grads, 2) if scan else ref_grads
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g, expect)


def test_attention_probabilities_are_sown_only_when_asked():
  cfg = cfg_of(n_kv_heads=2)
  params = random_params(cfg)
  tokens = random_tokens(0)
  logits, state = apply(cfg, params, tokens, mutable=["intermediates"])
  np.testing.assert_allclose(logits, apply(cfg, params, tokens), atol=1e-6)  # nothing changes
  probs = np.stack([state["intermediates"][f"blocks_{i}"]["attn"]["attention_probs"][0]
                    for i in range(2)])
  assert probs.shape == (2, B, 4, T, T)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  assert np.all(np.triu(probs, 1) == 0)
  # Under nn.scan they come stacked over layers: the same probabilities.
  _, state = apply(cfg_of(n_kv_heads=2, scan_layers=True), to_scanned(params, 2), tokens,
                   mutable=["intermediates"])
  np.testing.assert_allclose(state["intermediates"]["layers"]["attn"]["attention_probs"][0],
                             probs, atol=1e-5)


def test_init_params_are_unboxed_and_gpt2_scaled():
  cfg = cfg_of(n_layers=1)  # one layer: this jitted init is the module's costliest compile
  params = model.init_params(cfg, jax.random.key(0))
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  assert all(isinstance(x, jax.Array) for x in leaves)
  assert abs(float(params["embed"]["embedding"].std()) - 0.02) < 0.002
  residual_std = 0.02 / np.sqrt(2 * cfg.n_layers)
  assert abs(float(params["blocks_0"]["mlp"]["wo"]["kernel"].std()) - residual_std) < 0.001
  assert (np.asarray(params["final_norm"]["scale"]) == 1).all()


def _numpy_params(module, cfg, x, seed, std=0.3):
  """A module's params drawn in numpy from its abstract shapes (norm scales around 1)."""
  shapes = jax.eval_shape(lambda k: nn.meta.unbox(module.init(k, *x)["params"]),
                          jax.random.key(0))
  r = np.random.default_rng(seed)

  def fill(path, s):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return jnp.asarray(base + std * r.normal(size=s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_relu2_mlp_matches_numpy():
  cfg = cfg_of(activation="relu2")
  x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32)
  mlp = layers.Mlp(cfg)
  p = _numpy_params(mlp, cfg, (x,), seed=1)
  got = mlp.apply({"params": p}, x)
  h = np.asarray(x, np.float64) @ np.asarray(p["wi"]["kernel"]) + np.asarray(p["wi"]["bias"])
  want = np.maximum(h, 0.0) ** 2 @ np.asarray(p["wo"]["kernel"]) + np.asarray(p["wo"]["bias"])
  assert (h < 0).any() and (h > 0).any()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_qk_norm_attention_matches_numpy():
  """q and k are RMS-normalised per head over head_dim, scaled by a [head_dim] vector shared by
  the heads, and only then rotated (RoPE); GQA and biases included."""
  from test_attention import reference_attention, rope_reference
  cfg = cfg_of(qk_norm=True, n_kv_heads=2, layer_norm_eps=1e-5)
  b, t = 2, 6
  x = np.random.default_rng(0).normal(size=(b, t, 32)).astype(np.float32)
  pos = np.broadcast_to(np.arange(t), (b, t))
  ctx = {"positions": jnp.asarray(pos), "mask": None, "segment_ids": None, "cache_index": None}
  attn = layers.SelfAttention(cfg)
  p = _numpy_params(attn, cfg, (x, None, 0, ctx), seed=2)
  assert p["query_norm"]["scale"].shape == p["key_norm"]["scale"].shape == (cfg.d_k,)
  got, _ = attn.apply({"params": p}, x, None, 0, ctx)

  w = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  proj = lambda name: np.einsum("btd,dnh->btnh", x, w[name]["kernel"]) + w[name]["bias"]
  rms = lambda a, scale: a / np.sqrt(np.mean(a * a, -1, keepdims=True) + 1e-5) * scale
  q = rope_reference(rms(proj("query"), w["query_norm"]["scale"]), pos, cfg.rope_theta)
  k = rope_reference(rms(proj("key"), w["key_norm"]["scale"]), pos, cfg.rope_theta)
  out = reference_attention(q, k, proj("value"), np.tril(np.ones((t, t), bool))[None, None])
  want = np.einsum("btnh,nhd->btd", out, w["out"]["kernel"]) + w["out"]["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Without the norm the same params give another function: the check above can fail.
  plain, _ = layers.SelfAttention(cfg_of(n_kv_heads=2)).apply(
      {"params": {k: v for k, v in p.items() if not k.endswith("_norm")}}, x, None, 0, ctx)
  assert np.abs(np.asarray(plain) - want).max() > 1e-2
