"""Text generation: logits processors, the jitted KV-cache decode loop and beam search.

Owns everything between trained params and new token ids:
- logits processors, pure functions on [B, V] logits, with the order and meaning of Hugging Face
  `generate`: repetition penalty, then min-length EOS suppression, then (sampling only)
  temperature, top-k, top-p. `do_sample=False` is greedy; `num_beams > 1` is beam search;
- `decode`: prefill plus the whole decode loop in ONE jit over the model's explicit KV cache
  (preallocated for prompt + max_new_tokens slots), left-padded batches, per-row EOS / stop token,
  an early exit once every row is done; `use_cache=False` recomputes the full forward pass over the
  fixed-size buffer each step (slow, for checking);
- `generate` (lists of ids in and out) and `generate_stream` (yields tokens every few steps).

Random streams. Each row draws from its own stream, fold_in(fold_in(rng, prompt index), sample
index), advanced per new token with fold_in(stream, step). So a row's text is a function of the
rng, its prompt, its prompt's index and its sample index only: prompt 0 of any batch gives what
it gives alone, adding or removing other prompts (with the left padding they bring) changes no
row, and `num_return_sequences` = n gives each prompt n rows (samples 0 .. n-1, n distinct
streams; the first n' of them are the same for any n >= n').

Hand-written rather than borrowed: the JAX decoders that exist (HF's Flax `generate`, t5x) keep a
mutable Linen cache or a different model interface, not this model's explicit cache pytree.

Beam search (HF `BeamSearchScorer` semantics): per prompt K beams ranked by their sum of
processed log-probs; each step ranks the best 3K candidates (a beam has at most 2 terminal ids,
so K non-terminal ones always remain and become the next beams); a terminal candidate (EOS or
stop) ranked among the first K becomes a finished hypothesis scored
sum_logprobs / length ** length_penalty, where `length` counts the NEW tokens including the
terminal one (HF's generated_len; the prompt is excluded); the best K finished hypotheses are
kept. Rows that reach max_new_tokens are finalized with length = max_new_tokens. The returned
tokens include the terminal id, as in greedy / sampling. Stopping is exact rather than
HF's default heuristic (HF's early_stopping="never"): a prompt is done once K hypotheses are
finished and no running beam can still beat the worst of them (log-probs only decrease, so the
bound is best_running_sum / max_new_tokens ** lp for lp > 0, / current_length ** lp otherwise).
Stopping therefore never changes the result: it equals running every beam to max_new_tokens.
As in HF, beam search applies the processors to log-probs (log_softmax first).
"""

import dataclasses
import functools
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from llm_jax import errors
from llm_jax import model as model_lib
from llm_jax import ring_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Decoding knobs (configs/base.py documents each); hashable, so a static jit argument."""
  max_new_tokens: int = 200
  min_length: int = 0
  do_sample: bool = True
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  num_beams: int = 1
  length_penalty: float = 1.0
  num_return_sequences: int = 1  # rows per prompt: samples (distinct streams), or the best beams
  use_cache: bool = True
  # Decode steps per all-rows-done check. Each check is a device->host sync of the while
  # loop's predicate on GPU; the steps in between run in a fixed-trip-count inner loop.
  check_every: int = 8

  def __post_init__(self):
    if (self.max_new_tokens < 1 or self.num_beams < 1 or self.check_every < 1
        or self.num_return_sequences < 1):
      raise errors.UserError(
          f"max_new_tokens, num_beams, num_return_sequences and check_every must "
          f"be >= 1: {self}")
    if self.num_beams > 1 and self.do_sample:
      raise errors.UserError("num_beams > 1 is deterministic beam search: set do_sample=False")
    if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
      raise errors.UserError(f"num_return_sequences={self.num_return_sequences} > num_beams="
                             f"{self.num_beams}: beam search returns at most num_beams hypotheses")

  @classmethod
  def from_config(cls, cfg, **overrides):
    """The decoding fields of a finalized flat config, with optional overrides."""
    names = {f.name for f in dataclasses.fields(cls)} - {"check_every"}
    kw = {n: cfg[n] for n in names}
    kw.update(overrides)
    return cls(**kw)


# ----------------------------------------------------------------------------------------------
# Logits processors: pure functions of [B, V] float logits. Filtered entries become -inf, as in
# HF; every processor keeps at least one finite entry per row. Each knob is a Python number (one
# value for the batch, static: "off" skips the work) or a [B, 1] array (one value per row,
# traced: the serving engine's slots each carry their own request's knobs).


def _is(knob, off) -> bool:
  """A static knob at its "off" value (an array knob is never skipped)."""
  return isinstance(knob, (int, float)) and knob == off


def apply_repetition_penalty(logits_BV, seen_BV, penalty: float):
  """HF RepetitionPenaltyLogitsProcessor: for ids already present (seen_BV True) a positive logit
  is divided by `penalty`, a negative one multiplied: penalty > 1 always makes them less likely."""
  if _is(penalty, 1.0):
    return logits_BV
  penalized_BV = jnp.where(logits_BV < 0, logits_BV * penalty, logits_BV / penalty)
  return jnp.where(seen_BV, penalized_BV, logits_BV)


def apply_min_length(logits_BV, n_generated, min_length: int, terminal_ids):
  """HF MinNewTokensLengthLogitsProcessor: terminal ids (EOS, stop) get -inf while
  n_generated < min_length."""
  if isinstance(min_length, (int, float)) and min_length <= 0:
    return logits_BV
  blocked_V = _terminal(jnp.arange(logits_BV.shape[-1]), terminal_ids) & (n_generated < min_length)
  return jnp.where(blocked_V, -jnp.inf, logits_BV)


def apply_temperature(logits_BV, temperature: float):
  """HF TemperatureLogitsWarper: logits / temperature."""
  return logits_BV if _is(temperature, 1.0) else logits_BV / temperature


def apply_top_k(logits_BV, k: int):
  """HF TopKLogitsWarper: keep the k largest logits per row (ties with the k-th are kept too)."""
  if not isinstance(k, (int, np.integer)):  # per row, traced: the k-th of the sorted row (0 = off)
    k_B1 = jnp.asarray(k, jnp.int32).reshape(-1, 1)

    def filtered(logits_BV):
      sorted_BV = -jnp.sort(-logits_BV, axis=-1)
      kth_B1 = jnp.take_along_axis(sorted_BV, jnp.clip(k_B1, 1, logits_BV.shape[-1]) - 1, axis=-1)
      return jnp.where((k_B1 > 0) & (logits_BV < kth_B1), -jnp.inf, logits_BV)
    # The sort costs more than the whole model step on a CPU: only when some row asks for it.
    return lax.cond(jnp.any(k_B1 > 0), filtered, lambda x: x, logits_BV)
  if k <= 0 or k >= logits_BV.shape[-1]:
    return logits_BV
  kth_B1 = lax.top_k(logits_BV, k)[0][:, -1:]
  return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def apply_top_p(logits_BV, p: float):
  """HF TopPLogitsWarper: keep the smallest set of most likely ids whose probability reaches p.

  An id is kept iff the mass of the ids strictly more likely than it is < p, so the most likely
  id always survives. Implemented as a logit threshold (no scatter), so ids tied with the last
  kept one are kept too.
  """
  if isinstance(p, (int, float)):
    return logits_BV if p >= 1.0 else _top_p(logits_BV, p)
  # Per row, traced: rows at p >= 1 stay untouched (rounding in the cumulative sum could drop
  # their far tail), and the sort runs only when some row asks for it.
  p_B1 = jnp.asarray(p, jnp.float32).reshape(-1, 1)
  return lax.cond(jnp.any(p_B1 < 1.0),
                  lambda x: jnp.where(p_B1 < 1.0, _top_p(x, p_B1), x), lambda x: x, logits_BV)


def _top_p(logits_BV, p):
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  n_keep_B1 = jnp.sum(mass_before_BV < p, axis=-1, keepdims=True)
  threshold_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
  return jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)


def process_logits(logits_BV, seen_BV, n_generated, scfg: SamplingConfig, terminal_ids):
  """All processors in HF order: repetition penalty, min length, then the sampling warpers
  (temperature, top-k, top-p) when do_sample. Greedy needs no warpers: they keep the argmax."""
  logits_BV = logits_BV.astype(jnp.float32)
  logits_BV = apply_repetition_penalty(logits_BV, seen_BV, scfg.repetition_penalty)
  logits_BV = apply_min_length(logits_BV, n_generated, scfg.min_length, terminal_ids)
  if scfg.do_sample:
    logits_BV = apply_temperature(logits_BV, scfg.temperature)
    logits_BV = apply_top_k(logits_BV, scfg.top_k)
    logits_BV = apply_top_p(logits_BV, scfg.top_p)
  return logits_BV


def select_tokens(processed_BV, rng, do_sample: bool):
  """[B] int32: a draw from softmax(processed) per row, or its argmax.

  rng: one key for the whole batch, or [B] keys, one per row (each row's draw then depends on
  its own key and logits only).
  """
  if not do_sample:
    return jnp.argmax(processed_BV, axis=-1).astype(jnp.int32)
  if rng.ndim == 1:
    return jax.vmap(jax.random.categorical)(rng, processed_BV).astype(jnp.int32)
  return jax.random.categorical(rng, processed_BV, axis=-1).astype(jnp.int32)


def process_logits_rows(logits_BV, seen_BV, n_generated_B, knobs, terminal_ids):
  """`process_logits` with a request's own knobs in each row: knobs holds [B] arrays
  "temperature" (0 = greedy: no warpers, as do_sample=False), "top_k" (0 = off), "top_p",
  "repetition_penalty" and "min_tokens"; n_generated_B: new tokens so far per row.
  Returns (warped_BV for sampled rows, unwarped_BV for greedy rows)."""
  col = lambda name: knobs[name][:, None]
  logits_BV = logits_BV.astype(jnp.float32)
  logits_BV = apply_repetition_penalty(logits_BV, seen_BV, col("repetition_penalty"))
  logits_BV = apply_min_length(logits_BV, n_generated_B[:, None], col("min_tokens"), terminal_ids)
  greedy_B1 = col("temperature") <= 0
  warped_BV = apply_temperature(logits_BV, jnp.where(greedy_B1, 1.0, col("temperature")))
  warped_BV = apply_top_k(warped_BV, knobs["top_k"])
  warped_BV = apply_top_p(warped_BV, col("top_p"))
  return warped_BV, logits_BV


def select_tokens_rows(warped_BV, unwarped_BV, keys_B, temperature_B):
  """[B] int32: per row, a draw from softmax(warped) with its own key, or (temperature 0) the
  argmax of the unwarped logits: `select_tokens` with do_sample chosen per row."""
  drawn_B = select_tokens(warped_BV, keys_B, True)
  return jnp.where(temperature_B > 0, drawn_B, select_tokens(unwarped_BV, None, False))


def row_keys(rng, rows_B2):
  """[B] keys: row b's stream fold_in(fold_in(rng, prompt index), sample index), rows_B2 [B, 2]."""
  return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(rng, r[0]), r[1]))(rows_B2)


def seen_from_prompt(prompt_BT, valid_BT, vocab: int):
  """[B, V] bool: which ids occur in each row's (unpadded) prompt."""
  rows_B1 = jnp.arange(prompt_BT.shape[0])[:, None]
  return jnp.zeros((prompt_BT.shape[0], vocab), bool).at[rows_B1, prompt_BT].max(valid_BT)


# ----------------------------------------------------------------------------------------------
# The decode loop. State is a dict of arrays; R = rows the model sees (B, or B * num_beams).


def _terminal(tokens, terminal_ids):
  """tokens == any of terminal_ids (a sequence or int array of EOS / stop ids)."""
  return jnp.any(tokens[..., None] == jnp.asarray(terminal_ids, jnp.int32), axis=-1)


def _low_precision_params(params, model_cfg):
  """Matrices cast to the compute dtype once, before the loop: the model's einsums would cast them
  anyway (same values), but every step would re-read the float32 copy."""
  dtype = model_cfg.compute_dtype
  return jax.tree.map(
      lambda p: p.astype(dtype) if p.ndim >= 2 and jnp.issubdtype(p.dtype, jnp.floating) else p,
      params)


def _forward_step(params, model_cfg, st):
  """Logits [R, V] for the token at index st["step"], from the token at step - 1."""
  step, t = st["step"], st["prompt"].shape[1]
  model = model_lib.build(model_cfg)
  if st["cache"] is not None:
    positions_R1 = (st["prompt_len"] + step - 1)[:, None]
    logits_R1V, cache = model.apply(
        {"params": params}, st["last"][:, None], positions_BT=positions_R1, cache=st["cache"],
        cache_index=t + step - 1, kv_valid_BS=st["kv_valid"])
    return logits_R1V[:, 0], cache
  # Uncached: the whole fixed-size buffer (prompt, generated, filler); the causal mask hides
  # the slots after the one read. Their positions stop at the one read, so a call's largest
  # position (dynamic NTK's length) is the current one's, as with a cache.
  buf_RS = jnp.concatenate([st["prompt"], st["tokens"]], axis=1)
  positions_RS = jnp.clip(jnp.cumsum(st["kv_valid"], axis=1) - 1, 0,
                          (st["prompt_len"] + step - 1)[:, None])
  logits_RSV = model.apply({"params": params}, buf_RS, positions_BT=positions_RS,
                           kv_valid_BS=st["kv_valid"])
  return lax.dynamic_index_in_dim(logits_RSV, t + step - 1, axis=1, keepdims=False), None


def _write(buf_RN, values_R, step, active):
  """buf[:, step] = values where active (a no-op past the end, where step == N)."""
  idx = jnp.minimum(step, buf_RN.shape[1] - 1)
  old_R = lax.dynamic_index_in_dim(buf_RN, idx, axis=1, keepdims=False)
  return lax.dynamic_update_index_in_dim(buf_RN, jnp.where(active, values_R, old_R), idx, axis=1)


def _sample_update(st, logits_BV, scfg, terminal_ids):
  """Greedy / sampling: choose token `step` for every row and record it."""
  step = st["step"]
  active = step < scfg.max_new_tokens
  processed_BV = process_logits(logits_BV, st["seen"], step, scfg, terminal_ids)
  keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(st["rng"], step)  # per-row streams
  tok_B = select_tokens(processed_BV, keys_B, scfg.do_sample)
  tok_B = jnp.where(st["done"], terminal_ids[0], tok_B)  # finished rows idle on EOS
  logp_B = jnp.take_along_axis(jax.nn.log_softmax(processed_BV), tok_B[:, None], axis=1)[:, 0]
  seen = st["seen"]
  if seen is not None:
    seen = seen.at[jnp.arange(tok_B.shape[0]), tok_B].set(True)
  return {**st, "step": step + active.astype(jnp.int32), "last": tok_B, "seen": seen,
          "tokens": _write(st["tokens"], tok_B, step, active),
          "logps": _write(st["logps"], jnp.where(st["done"], 0.0, logp_B), step, active),
          "done": st["done"] | (active & _terminal(tok_B, terminal_ids))}


def _gather_rows(x_BK, src_BK):
  """x[b, src[b, k]] along axis 1 for [B, K, ...] arrays."""
  src = src_BK.reshape(src_BK.shape + (1,) * (x_BK.ndim - 2))
  return jnp.take_along_axis(x_BK, src, axis=1)


def _write_beams(buf_BXN, values_BX, step):
  """buf[:, :, step] = values for [B, X, N] token / log-prob buffers (clamped past the end; the
  beam step discards those results)."""
  idx = jnp.minimum(step, buf_BXN.shape[-1] - 1)
  return lax.dynamic_update_index_in_dim(buf_BXN, values_BX.astype(buf_BXN.dtype), idx, axis=2)


def _beam_update(st, logits_RV, scfg, terminal_ids):
  """One beam search step for R = B * K rows (see the module docstring for the rules)."""
  step, k, n = st["step"], scfg.num_beams, scfg.max_new_tokens
  active = step < n
  r, v = logits_RV.shape
  b = r // k
  logp_RV = jax.nn.log_softmax(logits_RV.astype(jnp.float32), axis=-1)
  logp_RV = apply_repetition_penalty(logp_RV, st["seen"], scfg.repetition_penalty)
  logp_RV = apply_min_length(logp_RV, step, scfg.min_length, terminal_ids)
  cand_BKV = st["beam_scores"][:, :, None] + logp_RV.reshape(b, k, v)
  c = min(3 * k, k * v)  # <= 2 terminal ids per beam, so always >= K non-terminal candidates
  top_BC, idx_BC = lax.top_k(cand_BKV.reshape(b, k * v), c)
  src_BC, tok_BC = idx_BC // v, (idx_BC % v).astype(jnp.int32)
  tok_logp_BC = jnp.take_along_axis(logp_RV.reshape(b, k * v), idx_BC, axis=1)
  term_BC = _terminal(tok_BC, terminal_ids)
  length = step + 1
  tokens_BKN, logps_BKN = st["tokens"].reshape(b, k, n), st["logps"].reshape(b, k, n)

  # Finished hypotheses: terminal candidates ranked among the first K, merged into the pool.
  fin_ok_BC = (term_BC & (jnp.arange(c) < k) & (top_BC > -jnp.inf) & ~st["done"][:, None]
               & active)
  lp = st["length_penalty"]  # traced: a new length_penalty does not recompile
  fin_score_BC = jnp.where(fin_ok_BC, top_BC / length.astype(jnp.float32) ** lp, -jnp.inf)
  fin_tok_BCN = _write_beams(_gather_rows(tokens_BKN, src_BC), tok_BC, step)
  fin_logp_BCN = _write_beams(_gather_rows(logps_BKN, src_BC), tok_logp_BC, step)
  all_scores = jnp.concatenate([st["pool_scores"], fin_score_BC], axis=1)
  pool_scores_BK, sel_BK = lax.top_k(all_scores, k)  # ties keep the older hypothesis, as HF
  pool = {"pool_scores": pool_scores_BK,
          "pool_tokens": _gather_rows(jnp.concatenate([st["pool_tokens"], fin_tok_BCN], 1), sel_BK),
          "pool_logps": _gather_rows(jnp.concatenate([st["pool_logps"], fin_logp_BCN], 1), sel_BK),
          "pool_len": _gather_rows(jnp.concatenate(
              [st["pool_len"], jnp.broadcast_to(length, (b, c))], 1), sel_BK)}

  # Running beams: the best K non-terminal candidates (stable sort keeps their rank order).
  keep_BK = jnp.argsort(term_BC, axis=1, stable=True)[:, :k]
  beam_scores_BK = jnp.take_along_axis(top_BC, keep_BK, axis=1)
  src_BK = jnp.take_along_axis(src_BC, keep_BK, axis=1)
  tok_BK = jnp.take_along_axis(tok_BC, keep_BK, axis=1)
  tok_logp_BK = jnp.take_along_axis(tok_logp_BC, keep_BK, axis=1)
  new_tokens = _write_beams(_gather_rows(tokens_BKN, src_BK), tok_BK, step).reshape(r, n)
  new_logps = _write_beams(_gather_rows(logps_BKN, src_BK), tok_logp_BK, step).reshape(r, n)
  rows_R = jnp.where(active, (jnp.arange(b)[:, None] * k + src_BK).reshape(r), jnp.arange(r))
  cache = st["cache"]
  if cache is not None:  # reorder the cache rows to follow their beams
    cache = jax.tree.map(lambda x: jnp.take(x, rows_R, axis=1), cache)
  seen = st["seen"]
  if seen is not None:
    seen = seen[rows_R].at[jnp.arange(r), tok_BK.reshape(r)].set(True)

  # Done: K finished and no running beam can beat the worst of them, now or later.
  denom = jnp.where(lp > 0, n, length).astype(jnp.float32) ** lp
  worst_B = pool_scores_BK[:, -1]
  done_B = st["done"] | ((worst_B > -jnp.inf) & (beam_scores_BK[:, 0] / denom <= worst_B))

  new = {"tokens": new_tokens, "logps": new_logps, "beam_scores": beam_scores_BK,
         "last": tok_BK.reshape(r), "done": done_B, **pool}
  new = jax.tree.map(lambda a, o: jnp.where(active, a, o), new, {key: st[key] for key in new})
  return {**st, **new, "step": step + active.astype(jnp.int32), "cache": cache, "seen": seen}


def _update(st, logits, scfg, beam):
  if beam:
    return _beam_update(st, logits, scfg, st["terminal"])
  return _sample_update(st, logits, scfg, st["terminal"])


def _start(params, prompt_BT, valid_BT, rng, terminal_ids, length_penalty=None, *, model_cfg,
           scfg, beam):
  """Prefill: the decode state after choosing the first new token. terminal_ids: int32 [E+1]
  (EOS ids, stop) and length_penalty (None = scfg's) are traced, so new values do not recompile."""
  params = _low_precision_params(params, model_cfg)
  n_ret = scfg.num_return_sequences
  rows_B2 = jnp.stack([jnp.arange(prompt_BT.shape[0]), jnp.zeros(prompt_BT.shape[0], int)], 1)
  if not beam and n_ret > 1:  # prompt i becomes rows (i, 0) .. (i, n_ret - 1): own streams
    prompt_BT, valid_BT = (jnp.repeat(x, n_ret, axis=0) for x in (prompt_BT, valid_BT))
    rows_B2 = jnp.stack([jnp.repeat(rows_B2[:, 0], n_ret), jnp.tile(jnp.arange(n_ret),
                                                                    rows_B2.shape[0])], 1)
  b, t = prompt_BT.shape
  k, n = scfg.num_beams, scfg.max_new_tokens
  r = b * k
  valid_BT = valid_BT.astype(bool)
  kv_valid_BS = jnp.concatenate([valid_BT, jnp.ones((b, n), bool)], axis=1)
  prompt_len_B = jnp.sum(valid_BT, axis=1).astype(jnp.int32)
  seen = None
  if scfg.repetition_penalty != 1.0:
    seen = seen_from_prompt(prompt_BT, valid_BT, model_cfg.padded_vocab)
  rep = (lambda x: jnp.repeat(x, k, axis=0)) if k > 1 else (lambda x: x)
  terminal_ids = jnp.asarray(terminal_ids, jnp.int32)
  st = {"step": jnp.int32(0), "rng": row_keys(rng, rows_B2), "terminal": terminal_ids,
        "prompt": rep(prompt_BT.astype(jnp.int32)), "kv_valid": rep(kv_valid_BS),
        "prompt_len": rep(prompt_len_B),
        "last": jnp.zeros((r,), jnp.int32), "tokens": jnp.full((r, n), terminal_ids[0], jnp.int32),
        "logps": jnp.zeros((r, n), jnp.float32), "done": jnp.zeros((b,), bool),
        "seen": None if seen is None else rep(seen), "cache": None}
  if beam:
    st.update(length_penalty=jnp.float32(scfg.length_penalty) if length_penalty is None
              else jnp.asarray(length_penalty, jnp.float32),
              beam_scores=jnp.full((b, k), -jnp.inf).at[:, 0].set(0.0),
              pool_scores=jnp.full((b, k), -jnp.inf), pool_len=jnp.zeros((b, k), jnp.int32),
              pool_tokens=jnp.full((b, k, n), terminal_ids[0], jnp.int32),
              pool_logps=jnp.zeros((b, k, n), jnp.float32))
  if scfg.use_cache:
    # A sliding window's cache is a ring of its size: memory bounded however long (ring_cache).
    cache = model_lib.init_cache(model_cfg, b, ring_cache.length(model_cfg.sliding_window, t + n))
    positions_BT = jnp.maximum(jnp.cumsum(valid_BT, axis=1) - 1, 0)
    logits_BTV, cache = model_lib.build(model_cfg).apply(
        {"params": params}, prompt_BT, positions_BT=positions_BT, cache=cache, cache_index=0,
        kv_valid_BS=kv_valid_BS)
    logits_RV = rep(logits_BTV[:, -1])  # left padding: the last slot is every row's last token
    # Beams share their prompt's prefill: repeat the cache rows (its batch axis is 1).
    st["cache"] = jax.tree.map(lambda x: jnp.repeat(x, k, axis=1), cache) if k > 1 else cache
  else:
    logits_RV, _ = _forward_step(params, model_cfg, st)
  return _update(st, logits_RV, scfg, beam)


def _advance(params, st, limit, *, model_cfg, scfg, beam):
  """Decode until every row is done, step reaches `limit`, or max_new_tokens, checking every
  scfg.check_every steps (steps past max_new_tokens are masked no-ops)."""
  params = _low_precision_params(params, model_cfg)

  def one_step(_, st):
    logits_RV, cache = _forward_step(params, model_cfg, st)
    return _update({**st, "cache": cache}, logits_RV, scfg, beam)

  def cond(st):
    return (st["step"] < jnp.minimum(limit, scfg.max_new_tokens)) & ~jnp.all(st["done"])

  return lax.while_loop(cond, lambda st: lax.fori_loop(0, scfg.check_every, one_step, st), st)


def _finish(st, *, scfg, beam):
  """(tokens [B, N], lengths [B], logps [B, N]); positions >= length hold EOS and logp 0."""
  n, terminal_ids = scfg.max_new_tokens, st["terminal"]
  if beam:
    b, k = st["beam_scores"].shape
    steps = st["step"]  # prompts not done by now ran all the way: finalize their beams
    run_ok_BK = ~st["done"][:, None] & (st["beam_scores"] > -jnp.inf)
    run_score_BK = jnp.where(run_ok_BK, st["beam_scores"] / steps.astype(jnp.float32)
                             ** st["length_penalty"], -jnp.inf)
    # The best num_return_sequences (= m) of the finished and the still-running hypotheses;
    # top_k keeps the earlier (finished) one on ties, as argmax did for m = 1.
    m = scfg.num_return_sequences
    best_BM = lax.top_k(jnp.concatenate([st["pool_scores"], run_score_BK], 1), m)[1]
    tokens_BN = _gather_rows(jnp.concatenate(
        [st["pool_tokens"], st["tokens"].reshape(b, k, n)], 1), best_BM).reshape(b * m, n)
    logps_BN = _gather_rows(jnp.concatenate(
        [st["pool_logps"], st["logps"].reshape(b, k, n)], 1), best_BM).reshape(b * m, n)
    lengths_B = jnp.take_along_axis(jnp.concatenate(
        [st["pool_len"], jnp.broadcast_to(steps, (b, k))], 1), best_BM, axis=1).reshape(b * m)
  else:
    tokens_BN, logps_BN = st["tokens"], st["logps"]
    term_BN = _terminal(tokens_BN, terminal_ids)
    lengths_B = jnp.where(term_BN.any(1), jnp.argmax(term_BN, axis=1) + 1, st["step"])
  keep_BN = jnp.arange(n)[None] < lengths_B[:, None]
  return (jnp.where(keep_BN, tokens_BN, terminal_ids[0]), lengths_B.astype(jnp.int32),
          jnp.where(keep_BN, logps_BN, 0.0))


_STATIC = ("model_cfg", "scfg", "beam")
_start_jit = jax.jit(_start, static_argnames=_STATIC)
_advance_jit = jax.jit(_advance, static_argnames=_STATIC, donate_argnames=("st",))


def _terminal_ids(eos_id, stop_id):
  """[EOS ids..., stop]: eos_id may be a list (a Hugging Face model's generation EOS ids)."""
  eos = [int(i) for i in np.atleast_1d(eos_id)]
  return np.asarray(eos + [eos[0] if stop_id is None else stop_id], np.int32)


def _static(scfg):
  """The jit key: length_penalty travels as a traced value instead."""
  return dataclasses.replace(scfg, length_penalty=1.0)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _decode_jit(params, prompt_BT, valid_BT, rng, terminal_ids, length_penalty, *, model_cfg, scfg,
                beam):
  st = _start(params, prompt_BT, valid_BT, rng, terminal_ids, length_penalty, model_cfg=model_cfg,
              scfg=scfg, beam=beam)
  st = _advance(params, st, scfg.max_new_tokens, model_cfg=model_cfg, scfg=scfg, beam=beam)
  return _finish(st, scfg=scfg, beam=beam)


def decode(params, prompt_BT, valid_BT, rng, *, model_cfg, scfg: SamplingConfig, eos_id: int,
           stop_id: Optional[int] = None):
  """Generates for a left-padded batch in one jitted call: beam search when num_beams > 1,
  else greedy (do_sample=False) or sampling.

  prompt_BT: int [B, T] left-padded prompts (every row ends with a real token); valid_BT: bool
  [B, T], False on padding; rng: a PRNG key (same key, same output; each row draws from its
  own stream: see the module docstring). model_cfg and scfg are static (a new value compiles
  again); eos_id / stop_id are not. eos_id: an id or a list of ids (each ends a row; the first
  fills the rows' tails).
  Returns device arrays over R = B * scfg.num_return_sequences rows (prompt-major: prompt b's
  rows are b * n .. b * n + n - 1): tokens [R, N] int32, lengths [R] (new tokens per row, EOS /
  stop included) and logps [R, N] float32 (log-prob of each chosen token under the processed
  distribution); entries at positions >= length are EOS and 0. For beam search: the best
  num_return_sequences hypotheses of each prompt, best first.
  """
  return _decode_jit(params, prompt_BT, valid_BT, rng, _terminal_ids(eos_id, stop_id),
                     np.float32(scfg.length_penalty), model_cfg=model_cfg, scfg=_static(scfg),
                     beam=scfg.num_beams > 1)


def beam_search(params, prompt_BT, valid_BT, *, model_cfg, scfg: SamplingConfig, eos_id: int,
                stop_id: Optional[int] = None):
  """`decode`'s beam search for any num_beams >= 1 (decode runs greedy for num_beams == 1)."""
  return _decode_jit(params, prompt_BT, valid_BT, jax.random.key(0),
                     _terminal_ids(eos_id, stop_id), np.float32(scfg.length_penalty),
                     model_cfg=model_cfg, scfg=_static(scfg), beam=True)


# ----------------------------------------------------------------------------------------------
# Python-list entry points.


def pad_prompts(prompt_ids: Sequence[Sequence[int]], model_cfg, scfg: SamplingConfig,
                pad_multiple: int = 1):
  """Left-pads prompts to a common length (rounded up to pad_multiple, so fewer compiles).

  Returns numpy (prompt_BT int32, valid_BT bool). Raises ValueError on an empty prompt, an id
  outside the vocabulary, or a length a learned position table cannot reach (RoPE and
  sinusoidal positions have no table, so longer generations run, past the trained context).
  """
  if not prompt_ids:
    raise errors.UserError("prompt_ids is empty: pass at least one prompt (a list of token ids)")
  lens = [len(p) for p in prompt_ids]
  if min(lens) == 0:
    raise errors.UserError(
        "an empty prompt has no last token to condition on: start each prompt with "
        "at least one id (e.g. the tokenizer's bos_id)")
  bad = [i for p in prompt_ids for i in p if not 0 <= i < model_cfg.vocab_size]
  if bad:
    raise errors.UserError(
        f"prompt id {bad[0]} is outside the vocabulary [0, {model_cfg.vocab_size})")
  need = max(lens) + scfg.max_new_tokens
  if model_cfg.position_embedding == "learned" and need > model_cfg.max_position_embeddings:
    raise errors.UserError(
        f"prompt of {max(lens)} tokens + max_new_tokens={scfg.max_new_tokens} = {need} positions "
        f"exceeds max_position_embeddings={model_cfg.max_position_embeddings} (learned "
        f"positions): shorten the prompt or lower max_new_tokens")
  t = -(-max(lens) // pad_multiple) * pad_multiple
  prompt_BT = np.zeros((len(prompt_ids), t), np.int32)
  valid_BT = np.zeros((len(prompt_ids), t), bool)
  for row, p in enumerate(prompt_ids):
    prompt_BT[row, t - len(p):] = p
    valid_BT[row, t - len(p):] = True
  return prompt_BT, valid_BT


def max_new_tokens_for(prompt_len: int, model_cfg, trained_len: int) -> int:
  """The most new tokens after a `prompt_len`-token prompt that the model holds: up to its
  learned position table (max_position_embeddings), or for rope / sinusoidal positions up to
  `trained_len` (max_seq_len: the context it was trained on). At least 1."""
  limit = (model_cfg.max_position_embeddings if model_cfg.position_embedding == "learned"
           else trained_len)
  return max(1, limit - prompt_len)


def context_problem(prompt_len: int, model_cfg, scfg: SamplingConfig,
                    trained_len: int) -> tuple[str | None, str | None]:
  """(error, warning) for generating scfg.max_new_tokens after a `prompt_len`-token prompt.

  An error when a learned position table cannot reach the last position; a warning when rope /
  sinusoidal positions go past `trained_len`, the context the model was trained on (they work
  there, but the model never saw such positions).
  """
  need = prompt_len + scfg.max_new_tokens
  if model_cfg.position_embedding == "learned":
    if need > model_cfg.max_position_embeddings:
      return (f"a prompt of {prompt_len} tokens + max_new_tokens={scfg.max_new_tokens} = {need} "
              f"positions exceeds the learned position table (max_position_embeddings="
              f"{model_cfg.max_position_embeddings}): shorten the prompt or set "
              f"--config.max_new_tokens<="
              f"{max(1, model_cfg.max_position_embeddings - prompt_len)}"), None
    return None, None
  if need > trained_len:
    return None, (f"a prompt of {prompt_len} tokens + max_new_tokens={scfg.max_new_tokens} = "
                  f"{need} positions goes past max_seq_len={trained_len}, the context the model "
                  f"was trained on: expect the text to degrade past that point")
  return None, None


def _scfg(cfg, overrides):
  if isinstance(cfg, SamplingConfig):
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
  return SamplingConfig.from_config(cfg, **overrides)


def generate(params, model_cfg, prompt_ids: Sequence[Sequence[int]], cfg, rng, eos_id: int,
             stop_id: Optional[int] = None, *, pad_multiple: int = 16,
             **overrides) -> list[list[int]]:
  """New token ids per row, ending with (and including) EOS / stop_id if one was produced.

  One row per prompt, or num_return_sequences consecutive rows per prompt (see `decode`).
  cfg: the flat config (its decoding fields) or a SamplingConfig; overrides replace its fields
  (e.g. max_new_tokens=50). rng: a PRNG key. Equal keys give equal outputs.
  """
  scfg = _scfg(cfg, overrides)
  prompt_BT, valid_BT = pad_prompts(prompt_ids, model_cfg, scfg, pad_multiple)
  tokens_BN, lengths_B, _ = jax.device_get(decode(
      params, prompt_BT, valid_BT, rng, model_cfg=model_cfg, scfg=scfg, eos_id=eos_id,
      stop_id=stop_id))
  return [row[:n].tolist() for row, n in zip(tokens_BN, lengths_B)]


def generate_stream(params, model_cfg, prompt_ids: Sequence[Sequence[int]], cfg, rng,
                    eos_id: int, stop_id: Optional[int] = None, *, every: int = 16,
                    pad_multiple: int = 16, **overrides) -> Iterator[list[list[int]]]:
  """Like `generate`, but yields each prompt's newly produced ids about every `every` steps.

  Each yield is a list (one per row, as `generate`) of the ids produced since the previous
  yield ([] once a row has finished); concatenated, they equal `generate`'s output for the
  same rng. The cache stays on the device (donated between chunks); the host syncs once per
  chunk, not per token.
  Beam search yields once, at the end, because beams reorder until then.
  """
  scfg = _scfg(cfg, overrides)
  prompt_BT, valid_BT = pad_prompts(prompt_ids, model_cfg, scfg, pad_multiple)
  terminal_ids = _terminal_ids(eos_id, stop_id)
  if scfg.num_beams > 1:
    tokens, lengths, _ = jax.device_get(decode(
        params, prompt_BT, valid_BT, rng, model_cfg=model_cfg, scfg=scfg, eos_id=eos_id,
        stop_id=stop_id))
    yield [row[:n].tolist() for row, n in zip(tokens, lengths)]
    return
  kw = dict(model_cfg=model_cfg, scfg=_static(scfg), beam=False)
  st = _start_jit(params, prompt_BT, valid_BT, rng, terminal_ids, **kw)
  rows = len(prompt_ids) * scfg.num_return_sequences
  step, emitted, ended = 1, [0] * rows, [False] * rows
  while True:
    if step < scfg.max_new_tokens and not all(ended):
      st = _advance_jit(params, st, step + every, **kw)
    tokens_BN, step, done_B = jax.device_get((st["tokens"], st["step"], st["done"]))
    chunk = []
    for row, toks in enumerate(tokens_BN):
      new = [] if ended[row] else toks[emitted[row]:step].tolist()
      for i, tok in enumerate(new):
        if tok in terminal_ids:
          new, ended[row] = new[:i + 1], True
          break
      emitted[row] += len(new)
      chunk.append(new)
    yield chunk
    if step >= scfg.max_new_tokens or all(ended) or done_B.all():
      return
