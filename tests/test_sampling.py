"""Sampling: processors against numpy / brute force, the decode loop against the plain model.

Compiles dominate the run time, so tests share shapes and SamplingConfigs (EOS / stop ids are
traced, so changing them does not recompile) and every reference forward pass goes through one
jitted function on a fixed [8 or 128, 24] shape.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers

from llm_jax import config
from llm_jax import model as model_lib
from llm_jax import sampling

EOS = 3
REF_LEN = 24  # reference forward passes run right-padded to this length (causal: no effect)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]  # padded to [3, 16]
GREEDY = sampling.SamplingConfig(max_new_tokens=10, do_sample=False, check_every=4)
PENALIZED = sampling.SamplingConfig(max_new_tokens=10, do_sample=False, repetition_penalty=1.8,
                                    min_length=4, check_every=3)
SAMPLED = sampling.SamplingConfig(max_new_tokens=16, do_sample=True, temperature=1.3, top_k=20,
                                  top_p=0.95, min_length=4, check_every=4)
# chi2.ppf(0.999, df) for df = 1..20 (scipy.stats), so the test needs no scipy.
CHI2_999 = [10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588,
            31.264, 32.909, 34.528, 36.123, 37.697, 39.252, 40.790, 42.312, 43.820, 45.315]


def _model(vocab_size=50, vocab_multiple=8, seed=0):
  """Tiny untied model with random weights large enough that greedy outputs vary (GPT-2's init
  makes every row repeat one token). Filled in numpy: no init compile."""
  cfg = config.load("configs/base.py", vocab_size=vocab_size, vocab_multiple=vocab_multiple,
                    d_model=32, n_heads=4, n_layers=2, max_seq_len=64, tie_embeddings=False)
  mcfg = model_lib.ModelConfig.from_config(cfg, backend="cpu")
  shapes = jax.eval_shape(functools.partial(model_lib.init_params, mcfg), jax.random.key(0))
  std = lambda name, shape: 1.0 if "embedding" in name else 2.0 / np.sqrt(shape[0])
  return mcfg, helpers.random_params(shapes, seed, std)


@pytest.fixture(scope="module")
def tiny():
  return _model()


@functools.partial(jax.jit, static_argnums=0)
def _ref_forward(mcfg, params, tokens_BT):
  return model_lib.Transformer(mcfg).apply({"params": params}, tokens_BT)[..., :mcfg.vocab_size]


def _ref_logits(mcfg, params, seqs):
  """Reference logits [len(seqs), REF_LEN, V]: plain forward passes of unpadded sequences
  (right padding after a causal model's last real token changes nothing before it)."""
  rows = -(-len(seqs) // 8) * 8 if len(seqs) <= 8 else -(-len(seqs) // 128) * 128
  buf = np.zeros((rows, REF_LEN), np.int32)
  for i, s in enumerate(seqs):
    buf[i, :len(s)] = s
  return np.asarray(_ref_forward(mcfg, params, buf), np.float64)[:len(seqs)]


def _ref_logp(mcfg, params, seqs):
  logits = _ref_logits(mcfg, params, seqs)
  return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)


def _decode(mcfg, params, prompts, scfg, rng=0, eos=EOS, stop=None, pad_multiple=16):
  prompt, valid = sampling.pad_prompts(prompts, mcfg, scfg, pad_multiple)
  out = sampling.decode(params, prompt, valid, jax.random.key(rng), model_cfg=mcfg, scfg=scfg,
                        eos_id=eos, stop_id=stop)
  tokens, lengths, logps = (np.asarray(x) for x in out)
  return [t[:n].tolist() for t, n in zip(tokens, lengths)], logps


# --- processors ---------------------------------------------------------------------------------


def test_repetition_penalty_hits_exactly_the_seen_tokens():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 30)).astype(np.float32) * 3
  seen = rng.random((4, 30)) < 0.3
  for penalty in (1.3, 0.7):
    got = np.asarray(sampling.apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen),
                                                       penalty))
    want = logits.copy()
    for b, v in zip(*np.nonzero(seen)):
      want[b, v] = logits[b, v] / penalty if logits[b, v] > 0 else logits[b, v] * penalty
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(got[~seen], logits[~seen])
    if penalty > 1:  # a penalty > 1 lowers every seen logit, whatever its sign
      assert np.all(got[seen] < logits[seen])
  # Ids in the prompt padding do not count as seen.
  prompt = jnp.asarray([[7, 7, 1, 2], [0, 4, 5, 6]])
  valid = jnp.asarray([[False, False, True, True], [True, True, True, True]])
  seen = np.asarray(sampling.seen_from_prompt(prompt, valid, 10))
  assert [set(np.nonzero(r)[0]) for r in seen] == [{1, 2}, {0, 4, 5, 6}]


def test_temperature_top_k_min_length():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 40)).astype(np.float32)
  np.testing.assert_allclose(sampling.apply_temperature(jnp.asarray(logits), 0.6), logits / 0.6,
                             rtol=1e-6)
  for k in (1, 7, 39):
    got = np.asarray(sampling.apply_top_k(jnp.asarray(logits), k))
    for row, out in zip(logits, got):
      kept = sorted(np.nonzero(np.isfinite(out))[0])
      assert kept == sorted(np.argsort(-row)[:k])
      np.testing.assert_array_equal(out[kept], row[kept])
  np.testing.assert_array_equal(sampling.apply_top_k(jnp.asarray(logits), 0), logits)
  others = np.delete(np.arange(40), [EOS, 9])
  for n, blocked in ((0, True), (2, True), (3, False)):
    got = np.asarray(sampling.apply_min_length(jnp.asarray(logits), jnp.int32(n), 3, (EOS, 9)))
    assert np.all(np.isneginf(got[:, [EOS, 9]]) == blocked)
    np.testing.assert_array_equal(got[:, others], logits[:, others])


def test_top_p_keeps_the_minimal_set_reaching_p():
  rng = np.random.default_rng(2)
  v = 10
  for p in (0.05, 0.3, 0.5, 0.8, 0.95, 0.999):
    logits = rng.normal(size=(6, v)) * 1.5
    got = np.asarray(sampling.apply_top_p(jnp.asarray(logits, jnp.float32), p))
    for row, out in zip(logits, got):
      probs = np.exp(row - row.max())
      probs /= probs.sum()
      # Brute force: of all subsets whose mass reaches p, the smallest (then heaviest) one.
      best = min((s for m in range(1, v + 1) for s in itertools.combinations(range(v), m)
                  if probs[list(s)].sum() >= p), key=lambda s: (len(s), -probs[list(s)].sum()))
      assert set(np.nonzero(np.isfinite(out))[0]) == set(best), p
      np.testing.assert_allclose(out[list(best)], row[list(best)], rtol=1e-6)


def test_sampled_frequencies_match_the_processed_distribution():
  scfg = sampling.SamplingConfig(do_sample=True, temperature=1.5, top_k=12, top_p=0.9,
                                 repetition_penalty=1.4)
  rng = np.random.default_rng(3)
  v, n = 20, 40000
  logits = rng.normal(size=v)
  seen = rng.random(v) < 0.3
  # numpy reference, float64, in HF order: penalty, temperature, top-k, top-p.
  ref = np.where(seen, np.where(logits < 0, logits * 1.4, logits / 1.4), logits) / 1.5
  ref = np.where(ref >= np.sort(ref)[-12], ref, -np.inf)
  probs = np.exp(ref - ref.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  keep = order[(np.cumsum(probs[order]) - probs[order]) < 0.9]
  probs = np.where(np.isin(np.arange(v), keep), probs, 0.0)
  probs /= probs.sum()

  @jax.jit
  def draw(key):
    tiled = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, v))
    processed = sampling.process_logits(tiled, jnp.broadcast_to(jnp.asarray(seen), (n, v)),
                                        jnp.int32(5), scfg, (EOS, EOS))
    return sampling.select_tokens(processed, key, True)

  counts = np.bincount(np.asarray(draw(jax.random.key(0))), minlength=v)
  assert set(np.nonzero(counts)[0]) <= set(keep) and 2 <= len(keep) < 12  # top-p cut too
  expected = probs[keep] * n
  assert expected.min() > 5
  stat = float(np.sum((counts[keep] - expected) ** 2 / expected))
  assert stat < CHI2_999[len(keep) - 2], (stat, len(keep) - 1)


# --- the decode loop ----------------------------------------------------------------------------


def test_greedy_cached_equals_uncached_and_the_plain_model(tiny):
  mcfg, params = tiny
  cached, logps = _decode(mcfg, params, PROMPTS, GREEDY)
  uncached, logps_nc = _decode(mcfg, params, PROMPTS,
                               sampling.SamplingConfig(max_new_tokens=10, do_sample=False,
                                                       use_cache=False, check_every=4))
  assert cached == uncached
  np.testing.assert_allclose(logps, logps_nc, atol=1e-4)
  assert len({tuple(r) for r in cached}) == 3 and len(set(cached[0])) > 3  # not degenerate
  ref = _ref_logp(mcfg, params, [p + c for p, c in zip(PROMPTS, cached)])
  for row, (prompt, new) in enumerate(zip(PROMPTS, cached)):
    step_logp = ref[row, len(prompt) - 1:len(prompt) - 1 + len(new)]
    # Each new token is the argmax of the unpadded plain model, with that log-prob.
    assert new == step_logp.argmax(-1).tolist()
    np.testing.assert_allclose(logps[row, :len(new)], step_logp.max(-1), atol=1e-4)


def test_batched_prompts_equal_single_prompt_runs(tiny):
  mcfg, params = tiny
  batched, _ = _decode(mcfg, params, PROMPTS, GREEDY)
  # The shortest prompt (14 padding slots in the batch) alone, without any padding; the other
  # rows are checked against the unpadded plain model in the test above.
  assert _decode(mcfg, params, PROMPTS[1:2], GREEDY, pad_multiple=1)[0] == batched[1:2]


def test_stop_token_ends_a_row_and_is_kept(tiny):
  mcfg, params = tiny
  free, _ = _decode(mcfg, params, PROMPTS, GREEDY, eos=49)
  assert len(free[0]) == 10
  stop = free[0][4]
  unused = next(i for i in range(mcfg.vocab_size) if all(i not in f for f in free))
  for eos, stop_id in ((unused, stop), (stop, None)):
    out, _ = _decode(mcfg, params, PROMPTS, GREEDY, eos=eos, stop=stop_id)
    assert out == [f[:f.index(stop) + 1] if stop in f else f for f in free]


def test_repetition_penalty_and_min_length_match_a_host_loop(tiny):
  mcfg, params = tiny
  out, _ = _decode(mcfg, params, PROMPTS, PENALIZED)
  # Host reference: a plain forward pass per token, numpy processors.
  seqs, ended = [list(p) for p in PROMPTS], [False] * len(PROMPTS)
  for i in range(PENALIZED.max_new_tokens):
    last = _ref_logits(mcfg, params, seqs)
    for row, seq in enumerate(seqs):
      if ended[row]:
        continue
      logits = last[row, len(seq) - 1].copy()
      for tok in set(seq):
        logits[tok] = logits[tok] / 1.8 if logits[tok] > 0 else logits[tok] * 1.8
      if i < PENALIZED.min_length:
        logits[EOS] = -np.inf
      seq.append(int(np.argmax(logits)))
      ended[row] = seq[-1] == EOS
  assert out == [s[len(p):] for s, p in zip(seqs, PROMPTS)]


def _eos_loving(params, stop):
  """Final norm scale 0 and bias pointing at the EOS and stop columns of the head: every input
  maps to one vector for which EOS and stop are by far the most likely tokens."""
  head = params["lm_head"]["kernel"]
  u = head[:, EOS] / jnp.linalg.norm(head[:, EOS]) + head[:, stop] / jnp.linalg.norm(head[:, stop])

  def edit(path, x):
    name = jax.tree_util.keystr(path)
    if "final_norm" not in name:
      return x
    return jnp.zeros_like(x) if name.endswith("['scale']") else 4.0 * u

  return jax.tree_util.tree_map_with_path(edit, params)


def test_min_length_is_never_violated(tiny):
  mcfg, params = tiny
  stop = 17
  params = _eos_loving(params, stop)
  free, _ = _decode(mcfg, params, PROMPTS, GREEDY, stop=stop)
  assert all(len(f) == 1 for f in free)  # left alone, the model stops at once
  beam = sampling.SamplingConfig(max_new_tokens=10, do_sample=False, num_beams=3, min_length=4)
  for scfg, seeds in ((PENALIZED, [0]), (SAMPLED, [0, 1, 2]), (beam, [0])):
    for seed in seeds:
      outs, _ = _decode(mcfg, params, PROMPTS, scfg, rng=seed, stop=stop)
      for out in outs:
        assert not {EOS, stop} & set(out[:4]), (scfg, out)
        if not scfg.do_sample:
          assert len(out) == 5 and out[-1] in (EOS, stop), (scfg, out)


def test_sampling_is_seeded_and_streaming_matches(tiny):
  mcfg, params = tiny
  a, _ = _decode(mcfg, params, PROMPTS, SAMPLED, rng=7)
  b, _ = _decode(mcfg, params, PROMPTS, SAMPLED, rng=7)
  c, _ = _decode(mcfg, params, PROMPTS, SAMPLED, rng=8)
  assert a == b and a != c
  chunks = list(sampling.generate_stream(params, mcfg, PROMPTS, SAMPLED, jax.random.key(7), EOS,
                                         every=4))
  assert len(chunks) > 2
  assert [sum((ch[r] for ch in chunks), []) for r in range(len(PROMPTS))] == a
  assert sampling.generate(params, mcfg, PROMPTS, SAMPLED, jax.random.key(7), EOS) == a


@jax.threefry_partitionable(False)
def test_each_row_samples_from_its_own_stream(tiny):
  """Row 0 of a batch is the prompt sampled alone; more prompts (and the left padding a longer
  one brings) change no row; num_return_sequences gives each prompt distinct samples whose
  first is the one-sample row. By construction (a key per row), not by how jax happens to lay
  out the random bits of one [B, V] draw: so with partitionable threefry off, too."""
  mcfg, params = tiny
  batch, _ = _decode(mcfg, params, PROMPTS, SAMPLED, rng=7)
  alone, _ = _decode(mcfg, params, PROMPTS[:1], SAMPLED, rng=7)
  assert alone[0] == batch[0]
  # Two more prompts, one of 18 tokens (the batch pads to 32, not 16), 3 samples each.
  longer = PROMPTS + [list(range(30, 48)), [25]]
  several = dataclasses.replace(SAMPLED, num_return_sequences=3)
  rows, _ = _decode(mcfg, params, longer, several, rng=7)
  assert len(rows) == 15 and rows[0::3][:3] == batch
  for i in range(5):
    assert len({tuple(r) for r in rows[3 * i:3 * i + 3]}) == 3  # distinct streams
  assert sampling.generate(params, mcfg, longer, several, jax.random.key(7), EOS) == rows


def test_generation_length_against_the_positions_the_model_holds():
  learned = model_lib.ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_kv_heads=4,
                                  n_layers=2, d_ff=64, d_k=8, d_v=8, max_position_embeddings=16,
                                  position_embedding="learned")
  rope = dataclasses.replace(learned, position_embedding="rope")
  scfg = sampling.SamplingConfig(max_new_tokens=10)
  assert sampling.context_problem(6, learned, scfg, 16) == (None, None)
  error, _ = sampling.context_problem(7, learned, scfg, 16)
  assert "17 positions" in error and "max_new_tokens<=9" in error
  assert sampling.context_problem(6, rope, scfg, 16) == (None, None)
  error, warning = sampling.context_problem(7, rope, scfg, 16)
  assert error is None and "max_seq_len=16" in warning
  assert sampling.max_new_tokens_for(1, learned, 64) == 15
  assert sampling.max_new_tokens_for(1, rope, 64) == 63


def test_one_beam_is_greedy(tiny):
  mcfg, params = tiny
  free, _ = _decode(mcfg, params, PROMPTS, GREEDY, eos=49)
  eos = free[0][4]  # an EOS that greedy decoding reaches mid-way
  want, _ = _decode(mcfg, params, PROMPTS, GREEDY, eos=eos)
  assert want[0][-1] == eos and len(want[0]) < 10
  # length_penalty 0: the one finished hypothesis is final as soon as it exists, as in greedy.
  beam = sampling.SamplingConfig(max_new_tokens=10, do_sample=False, num_beams=1,
                                 length_penalty=0.0, check_every=4)
  prompt, valid = sampling.pad_prompts(PROMPTS, mcfg, beam, 16)
  tokens, lengths, _ = sampling.beam_search(params, prompt, valid, model_cfg=mcfg, scfg=beam,
                                            eos_id=eos)
  assert [t[:n].tolist() for t, n in zip(np.asarray(tokens), np.asarray(lengths))] == want


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_search_finds_the_exhaustive_best(length_penalty):
  v, n = 5, 3
  mcfg, params = _model(vocab_size=v, vocab_multiple=1, seed=1)
  prompts = [[0, 1, 2], [4, 2]]
  # K = V * (V - 1) keeps every non-terminal prefix alive, so beam search must be exhaustive.
  scfg = sampling.SamplingConfig(max_new_tokens=n, do_sample=False, num_beams=v * (v - 1),
                                 length_penalty=length_penalty, check_every=2)
  # The best 3 hypotheses per prompt, best first (rows 3 * prompt + rank).
  scfg = dataclasses.replace(scfg, num_return_sequences=3)
  top3, logps = _decode(mcfg, params, prompts, scfg, pad_multiple=1)
  fulls = list(itertools.product(range(v), repeat=n))
  for row, prompt in enumerate(prompts):
    ref = _ref_logp(mcfg, params, [prompt + list(f) for f in fulls])[:, len(prompt) - 1:]
    scores = {}
    for full, logp in zip(fulls, ref):
      for length in range(1, n + 1):
        seq = full[:length]
        if EOS in seq[:-1] or (length < n and seq[-1] != EOS):
          continue  # only the last token may be EOS; shorter sequences must end with it
        scores[seq] = sum(logp[i, tok] for i, tok in enumerate(seq)) / length ** length_penalty
    ranked = sorted(scores, key=scores.get, reverse=True)
    assert top3[3 * row:3 * row + 3] == [list(r) for r in ranked[:3]], (length_penalty, row)
    best = ranked[0]
    np.testing.assert_allclose(logps[3 * row].sum() / len(best) ** length_penalty, scores[best],
                               atol=1e-4)
