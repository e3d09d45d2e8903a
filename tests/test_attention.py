"""attention.py against independent numpy references: attention with masks and GQA, RoPE,
the sinusoidal table, mask builders and the cache write."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import attention


def reference_attention(q, k, v, mask):
  """Plain numpy MHA: kv heads repeated to the query heads, softmax over allowed keys."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  n, kv = q.shape[2], k.shape[2]
  k, v = np.repeat(k, n // kv, axis=2), np.repeat(v, n // kv, axis=2)
  scores = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])
  scores = np.where(np.broadcast_to(mask, scores.shape), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", probs, v)


def qkv(b=2, t=6, s=6, n=4, kv=2, h=8, hv=8, seed=0):
  r = np.random.default_rng(seed)
  return (r.normal(size=(b, t, n, h)).astype(np.float32),
          r.normal(size=(b, s, kv, h)).astype(np.float32),
          r.normal(size=(b, s, kv, hv)).astype(np.float32))


@pytest.mark.parametrize("kv,hv", [(4, 8), (2, 8), (1, 6)])
def test_causal_attention_matches_reference(kv, hv):
  q, k, v = qkv(kv=kv, hv=hv)
  causal = np.tril(np.ones((6, 6), bool))[None, None]
  out = attention.attention(q, k, v, impl="xla", is_causal=True)
  np.testing.assert_allclose(out, reference_attention(q, k, v, causal), atol=1e-5)


def test_random_mask_and_segments_match_reference():
  q, k, v = qkv(t=5, s=7)
  r = np.random.default_rng(1)
  mask = r.random((2, 1, 5, 7)) < 0.6
  mask[..., 0] = True  # every query sees at least one key (the reference has no answer otherwise)
  out = attention.attention(q, k, v, mask, impl="xla")
  np.testing.assert_allclose(out, reference_attention(q, k, v, mask), atol=1e-5)

  q, k, v = qkv(t=6, s=6)
  seg = np.array([[1, 1, 2, 2, 2, 3], [1, 1, 1, 1, 1, 1]])
  full = (seg[:, :, None] == seg[:, None, :]) & np.tril(np.ones((6, 6), bool))
  out = attention.attention(q, k, v, impl="xla", is_causal=True, segment_ids_BT=seg)
  np.testing.assert_allclose(out, reference_attention(q, k, v, full[:, None]), atol=1e-5)


def test_returned_probabilities_are_those_behind_the_output():
  q, k, v = qkv(kv=2)
  out, probs = attention.attention(q, k, v, impl="pallas", is_causal=True, return_probs=True)
  np.testing.assert_array_equal(out, attention.attention(q, k, v, impl="xla", is_causal=True))
  # numpy: softmax(q k^T / sqrt(d_k)) over the causal keys, query head n reading kv head n // 2.
  k_rep = np.repeat(np.asarray(k, np.float64), 2, axis=2)
  scores = np.einsum("btnh,bsnh->bnts", q, k_rep) / math.sqrt(q.shape[-1])
  scores = np.where(np.tril(np.ones((6, 6), bool)), scores, -np.inf)
  want = np.exp(scores - scores.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  assert probs.shape == (2, 4, 6, 6) and probs.dtype == jnp.float32
  np.testing.assert_allclose(probs, want, atol=1e-6)
  np.testing.assert_allclose(np.einsum("bnts,bsnh->btnh", probs, np.repeat(v, 2, axis=2)), out,
                             atol=1e-5)


def test_gqa_equals_mha_on_repeated_heads_and_pallas_falls_back_on_cpu():
  q, k, v = qkv(kv=2)
  gqa = attention.attention(q, k, v, impl="xla", is_causal=True)
  mha = attention.attention(q, np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2), impl="xla",
                            is_causal=True)
  np.testing.assert_allclose(gqa, mha, atol=1e-6)
  # T=6 is not a multiple of the TPU kernel's block, so "pallas" must take the XLA path.
  np.testing.assert_allclose(attention.attention(q, k, v, impl="pallas", is_causal=True), gqa,
                             atol=1e-6)


def test_fully_masked_row_stays_finite():
  q, k, v = qkv()
  mask = np.ones((2, 1, 6, 6), bool)
  mask[0, 0, 2] = False
  assert np.isfinite(np.asarray(attention.attention(q, k, v, mask))).all()


def test_attention_dropout_is_unbiased_and_random():
  q, k, v = qkv(b=1, t=4, s=4)
  plain = attention.xla_attention(q, k, v)
  f = jax.vmap(lambda key: attention.xla_attention(q, k, v, dropout_rate=0.3, dropout_rng=key))
  outs = np.asarray(f(jax.random.split(jax.random.key(0), 1000)))
  assert not np.allclose(outs[0], outs[1])
  np.testing.assert_allclose(outs.mean(0), plain, atol=0.12)  # unscaled would be off by ~0.6


def rope_reference(x, pos, theta):
  """RoPE as complex rotation of pairs (j, j + H/2), numpy float64."""
  h = x.shape[-1]
  z = x[..., : h // 2] + 1j * x[..., h // 2:]
  freq = theta ** (-np.arange(0, h, 2) / h)
  z = z * np.exp(1j * pos[..., None, None] * freq)
  return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_matches_complex_rotation():
  r = np.random.default_rng(0)
  x = r.normal(size=(2, 5, 3, 8))
  pos = r.integers(0, 500, size=(2, 5))
  out = attention.rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), 10000.0)
  np.testing.assert_allclose(out, rope_reference(x, pos, 10000.0), atol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
  r = np.random.default_rng(0)
  q = jnp.asarray(r.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(r.normal(size=(1, 1, 1, 16)), jnp.float32)

  def score(m, n):
    qm = attention.rope(q, jnp.array([[m]]), 10000.0)
    kn = attention.rope(k, jnp.array([[n]]), 10000.0)
    return float(jnp.sum(qm * kn))

  scores = set()
  for m, n in [(3, 1), (7, 7), (2, 9)]:
    base = score(m, n)
    scores.add(round(base, 3))
    for c in (1, 17, 250):
      assert score(m + c, n + c) == pytest.approx(base, abs=2e-4)
  assert len(scores) == 3  # different offsets give different scores: the test can fail


def test_sinusoidal_table_matches_cheat_sheet_formula():
  for n_pos, d in [(12, 16), (7, 9)]:
    ref = np.zeros((n_pos, d))
    for pos in range(n_pos):
      for i in range((d + 1) // 2):
        ref[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / d))
        if 2 * i + 1 < d:
          ref[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / d))
    np.testing.assert_allclose(attention.sinusoidal_table(n_pos, d), ref, atol=1e-5)


def test_masks_and_cache_update_match_loops():
  slots = np.array([3, 4])
  kv_valid = np.array([[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], bool)
  causal = np.asarray(attention.causal_mask(jnp.asarray(slots), 6))
  valid = np.asarray(attention.valid_mask(jnp.asarray(kv_valid), jnp.asarray(slots)))
  for t, slot in enumerate(slots):
    for s in range(6):
      assert causal[0, 0, t, s] == (s <= slot)
      for b in range(2):
        assert valid[b, 0, t, s] == (kv_valid[b, s] or s == slot)
  cache = np.zeros((3, 2, 6, 1, 4), np.float32)  # [L, B, S, K, H]
  new = np.random.default_rng(0).normal(size=(2, 2, 1, 4)).astype(np.float32)
  out, layer_view = attention.update_cache(jnp.asarray(cache), jnp.asarray(new), 1, 3)
  expect = cache.copy()
  expect[1, :, 3:5] = new
  np.testing.assert_array_equal(out, expect)
  np.testing.assert_array_equal(layer_view, expect[1])
