"""The model as lm-eval sees it: token log-likelihoods and generations, batched.

`Scorer` wraps a loader.Loaded model. Three request kinds, as lm-eval's LM API has them:
  loglikelihood(pairs)          (context, continuation) strings -> (sum log p, is greedy)
  loglikelihood_rolling(texts)  whole documents -> sum log p over lm-eval's rolling windows
  generate_until(contexts, ...) greedy (or sampled) text, cut at the stop sequences

Rows are sorted by length, longest first (lm-eval's order), and batched into fixed shapes:
`batch_size` rows of a bucket length (the next power of two >= 16, capped at the context), a
short last batch padded with empty rows, so a run compiles at most one program per bucket
(`compiles` counts the shapes run). Rows are right-padded: under the causal mask the padding
after a row's tokens changes none of its logits. Batches are sharded over the mesh's data axes.

Shared contexts (`share_context`, on by default): the choices of a multiple-choice item have the
same context ids (lm-eval encodes the context alone, then each joined string), so loglikelihood
runs each distinct context once and its continuations on its KV cache. One program per
(groups, context bucket, continuations, continuation bucket) shape: a batch of G contexts,
left-padded to their bucket (kv_valid masks the padding, positions count real tokens), fills the
cache; the last context position's logits score every continuation's first token; the R = G * J
continuation rows (their tokens less the last, right-padded) then run at cache slot `bucket` on
their own context's cache, gathered per row, and score the rest. The tokens computed per
HellaSwag item fall from 4 x (context + ending) to context + 4 x ending. Groups are formed by
identical context ids, J choices each (grouped by J); requests whose context is cut from the left
(each choice then keeps a different part of it) and contexts with one continuation take the
plain rows above. Shared buckets step by about 1.5x (16, 24, 32, 48, 64, 96, ...).

Generation runs through sampling.generate (the one decoder: its logits processors, its KV-cache
loop), to max_new_tokens, the text then cut at the first stop sequence (lm-eval's
postprocess_generated_text); the tokenizer's EOS ends a row early.
"""

import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from llm_jax import errors
from llm_jax import model as model_lib
from llm_jax import sampling
from llm_jax import sharding as sharding_lib
from llm_jax.evals import scoring

MIN_BUCKET = 16


def _shared_fn(model, model_cfg):
  def score(params, ctx_GC, ctx_valid_GC, group_R, first_R, inputs_RT, targets_RT, mask_RT):
    g, c = ctx_GC.shape
    t = inputs_RT.shape[1]
    kv_valid_GS = jnp.concatenate([ctx_valid_GC, jnp.ones((g, t), bool)], axis=1)
    n_ctx_G = jnp.sum(ctx_valid_GC, axis=1)
    positions_GC = jnp.maximum(jnp.cumsum(ctx_valid_GC, axis=1) - 1, 0)
    cache = model_lib.init_cache(model_cfg, g, c + t)
    logits_GCV, cache = model.apply({"params": params}, ctx_GC, positions_BT=positions_GC,
                                    cache=cache, cache_index=0, kv_valid_BS=kv_valid_GS)
    last_GV = logits_GCV[:, -1].astype(jnp.float32)  # left padding: the last slot is real
    last_logp_GV = jax.nn.log_softmax(last_GV, axis=-1)
    first_lp_R = jnp.take_along_axis(last_logp_GV[group_R], first_R[:, None], axis=-1)[:, 0]
    first_greedy_R = jnp.argmax(last_GV, axis=-1)[group_R] == first_R
    cache_R = jax.tree.map(lambda x: jnp.take(x, group_R, axis=1), cache)
    positions_RT = n_ctx_G[group_R][:, None] + jnp.arange(t)[None, :]
    logits_RTV, _ = model.apply({"params": params}, inputs_RT, positions_BT=positions_RT,
                                cache=cache_R, cache_index=c, kv_valid_BS=kv_valid_GS[group_R])
    logits_RTV = logits_RTV.astype(jnp.float32)
    logp_RTV = jax.nn.log_softmax(logits_RTV, axis=-1)
    lp_RT = jnp.take_along_axis(logp_RTV, targets_RT[..., None], axis=-1)[..., 0]
    greedy_RT = jnp.argmax(logits_RTV, axis=-1) == targets_RT
    ll_R = first_lp_R + jnp.sum(jnp.where(mask_RT, lp_RT, 0.0), axis=-1)
    all_greedy_R = first_greedy_R & jnp.all(greedy_RT | ~mask_RT, axis=-1)
    return ll_R, all_greedy_R
  return score


def _score_fn(model):
  def score(params, inputs_BT, targets_BT, mask_BT):
    logits_BTV = model.apply({"params": params}, inputs_BT).astype(jnp.float32)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    lp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    ll_B = jnp.sum(jnp.where(mask_BT, lp_BT, 0.0), axis=-1)
    all_greedy_B = jnp.all(greedy_BT | ~mask_BT, axis=-1)
    return ll_B, all_greedy_B
  return score


class Scorer:
  """Log-likelihoods and generations of one model (see the module docstring).

  loaded: a loader.Loaded, or anything with its params, model_cfg, tokenizer, mesh and cfg
  (training passes its own; `params` may be replaced between calls: the compiled programs stay).
  """

  def __init__(self, loaded, batch_size: int = 32, progress: bool = True,
               share_context: bool = True):
    self.params, self.model_cfg, self.tok = loaded.params, loaded.model_cfg, loaded.tokenizer
    self.mesh = loaded.mesh
    self.rules = sharding_lib.logical_rules(loaded.cfg)
    dp = sharding_lib.data_parallel_size(self.mesh)
    self.batch_size = -(-max(1, batch_size) // dp) * dp
    self.max_length = loaded.cfg.max_seq_len
    if self.model_cfg.position_embedding == "learned":
      self.max_length = min(self.max_length, self.model_cfg.max_position_embeddings)
    self.eos_ids = list(self.tok.eos_ids)
    # scoring.py's module docstring: EOS starts documents in our own training data
    own = getattr(self.tok, "is_own", False)
    self.prefix_id = self.tok.eos_id if own or self.tok.bos_id is None else self.tok.bos_id
    self.progress = progress
    self.share_context = share_context
    self.shapes = set()  # (rows, length) of every scoring batch run: one compile each
    self.shared_shapes = set()  # (groups, context length, rows, continuation length)
    self.gen_shapes = set()
    self.truncated = 0  # requests cut from the left to fit the context
    self.seconds = 0.0
    model = model_lib.build(self.model_cfg)
    self._score = jax.jit(_score_fn(model))
    self._shared = jax.jit(_shared_fn(model, self.model_cfg))
    self.dp = dp

  @property
  def compiles(self) -> int:
    return len(self.shapes) + len(self.shared_shapes) + len(self.gen_shapes)

  # -- tokens ---------------------------------------------------------------------------------

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_bos=self.tok.add_bos)

  def encode_pair(self, context: str, continuation: str, move_space: bool = True):
    return scoring.encode_pair(self.encode, context, continuation, self.prefix_id,
                               lambda text: self.tok.encode(text), move_space)

  def bucket(self, n: int) -> int:
    t = MIN_BUCKET
    while t < n:
      t *= 2
    return min(t, max(self.max_length, n))

  @staticmethod
  def shared_bucket(n: int) -> int:
    """The shared path's lengths: 16, 24, 32, 48, 64, 96, ... (at most a third is padding)."""
    t = MIN_BUCKET
    while True:
      if t >= n:
        return t
      if t * 3 // 2 >= n:
        return t * 3 // 2
      t *= 2

  # -- scoring ----------------------------------------------------------------------------------

  def score_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], desc="score"
                   ) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), greedy) of (context ids, continuation ids) pairs."""
    rows = []
    for ctx, cont in pairs:
      inputs, targets, n, cut = scoring.model_row(ctx, cont, self.max_length)
      self.truncated += cut
      rows.append((inputs, targets, n))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [None] * len(rows)
    start = time.perf_counter()
    bar = tqdm.tqdm(total=len(rows), desc=desc, disable=not self.progress, leave=False)
    i = 0
    while i < len(order):
      t = self.bucket(len(rows[order[i]][0]))
      # the rows of this batch: up to batch_size, all fitting bucket t (they are shorter)
      chunk = order[i:i + self.batch_size]
      b = self.batch_size
      inputs_BT = np.zeros((b, t), np.int32)
      targets_BT = np.zeros((b, t), np.int32)
      mask_BT = np.zeros((b, t), bool)
      for r, idx in enumerate(chunk):
        inputs, targets, n = rows[idx]
        inputs_BT[r, :len(inputs)] = inputs
        targets_BT[r, :len(targets)] = targets
        mask_BT[r, len(targets) - n:len(targets)] = True
      ll_B, greedy_B = self._run(inputs_BT, targets_BT, mask_BT)
      for r, idx in enumerate(chunk):
        out[idx] = (float(ll_B[r]), bool(greedy_B[r]))
      i += len(chunk)
      bar.update(len(chunk))
    bar.close()
    self.seconds += time.perf_counter() - start
    return out

  def _run(self, inputs_BT, targets_BT, mask_BT):
    self.shapes.add(inputs_BT.shape)
    put = lambda x: jax.device_put(x, sharding_lib.batch_sharding(self.mesh, x.ndim))
    with nn.logical_axis_rules(self.rules), jax.set_mesh(self.mesh):
      ll_B, greedy_B = self._score(self.params, put(inputs_BT), put(targets_BT), put(mask_BT))
    return jax.device_get((ll_B, greedy_B))

  def loglikelihood(self, pairs: Sequence[tuple[str, str]], desc="loglikelihood",
                    move_space: bool = True) -> list[tuple[float, bool]]:
    encoded = [self.encode_pair(c, x, move_space) for c, x in pairs]
    if self.share_context:
      return self.score_shared(encoded, desc)
    return self.score_tokens(encoded, desc)

  def score_shared(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], desc="score"
                   ) -> list[tuple[float, bool]]:
    """score_tokens' results, each distinct context run once for all its continuations (the
    module docstring); what cannot share goes through score_tokens."""
    groups = {}
    for i, (ctx, cont) in enumerate(pairs):
      # empty or too long: score_tokens raises as lm-eval asserts; cut from the left: plain rows
      fits = bool(ctx) and bool(cont) and len(ctx) + len(cont) <= self.max_length + 1
      groups.setdefault((tuple(ctx), fits), []).append(i)
    out = [None] * len(pairs)
    plain = [i for (_, fits), ids in groups.items() if not fits or len(ids) < 2 for i in ids]
    for i, r in zip(plain, self.score_tokens([pairs[i] for i in plain], desc)):
      out[i] = r
    by_j = {}
    for (ctx, fits), ids in groups.items():
      if fits and len(ids) >= 2:
        by_j.setdefault(len(ids), []).append((ctx, ids))
    total = sum(len(ids) for v in by_j.values() for _, ids in v)
    start = time.perf_counter()
    bar = tqdm.tqdm(total=total, desc=desc, disable=not self.progress or not total, leave=False)
    for j, todo in sorted(by_j.items()):
      g = -(-max(1, self.batch_size // j) // self.dp) * self.dp  # contexts per batch
      todo.sort(key=lambda x: -len(x[0]))
      for k in range(0, len(todo), g):
        chunk = todo[k:k + g]
        c = self.shared_bucket(len(chunk[0][0]))
        t = self.shared_bucket(max(1, max(len(pairs[i][1]) - 1 for _, ids in chunk
                                          for i in ids)))
        ctx_GC = np.zeros((g, c), np.int32)
        valid_GC = np.zeros((g, c), bool)
        group_R = np.zeros(g * j, np.int32)
        first_R = np.zeros(g * j, np.int32)
        inputs_RT = np.zeros((g * j, t), np.int32)
        targets_RT = np.zeros((g * j, t), np.int32)
        mask_RT = np.zeros((g * j, t), bool)
        for q, (ctx, ids) in enumerate(chunk):
          ctx_GC[q, c - len(ctx):] = ctx
          valid_GC[q, c - len(ctx):] = True
          for m, i in enumerate(ids):
            r, cont = q * j + m, pairs[i][1]
            group_R[r], first_R[r] = q, cont[0]
            inputs_RT[r, :len(cont) - 1] = cont[:-1]
            targets_RT[r, :len(cont) - 1] = cont[1:]
            mask_RT[r, :len(cont) - 1] = True
        for q in range(len(chunk), g):  # padding contexts: one valid token, never read
          valid_GC[q, -1] = True
        self.shared_shapes.add((g, c, g * j, t))
        put = lambda x: jax.device_put(x, sharding_lib.batch_sharding(self.mesh, x.ndim))
        with nn.logical_axis_rules(self.rules), jax.set_mesh(self.mesh):
          res = self._shared(self.params, put(ctx_GC), put(valid_GC), put(group_R),
                             put(first_R), put(inputs_RT), put(targets_RT), put(mask_RT))
        ll_R, greedy_R = jax.device_get(res)
        for q, (_, ids) in enumerate(chunk):
          for m, i in enumerate(ids):
            out[i] = (float(ll_R[q * j + m]), bool(greedy_R[q * j + m]))
        bar.update(sum(len(ids) for _, ids in chunk))
    bar.close()
    self.seconds += time.perf_counter() - start
    return out

  def loglikelihood_rolling(self, texts: Sequence[str], desc="rolling") -> list[float]:
    windows, owner = [], []
    for k, text in enumerate(texts):
      for w in scoring.rolling_windows(self.encode(text), self.prefix_id, self.max_length):
        windows.append(w)
        owner.append(k)
    lls = [0.0] * len(texts)
    for k, (ll, _) in zip(owner, self.score_tokens(windows, desc)):
      lls[k] += ll
    return lls

  # -- generation -------------------------------------------------------------------------------

  def check_generation(self, until: Sequence[str], max_new_tokens: int, what: str) -> None:
    """UserError when generation cannot stop or cannot fit (before anything compiles)."""
    if not self.eos_ids and not [u for u in until if u]:
      raise errors.UserError(f"{what}: generation needs a way to stop, but the tokenizer has no "
                             f"EOS and the task gives no stop sequence: give the task an "
                             f"'until' list of stop strings")
    if max_new_tokens >= self.max_length:
      raise errors.UserError(f"{what}: max_new_tokens={max_new_tokens} leaves no room for the "
                             f"prompt in the model's context of {self.max_length} tokens: set "
                             f"--config.max_new_tokens below {self.max_length}")

  def generate_until(self, contexts: Sequence[str], until: Sequence[str], scfg, rng,
                     desc="generate") -> list[str]:
    """Each context's continuation, cut at the first stop string of `until` (plus EOS's text)."""
    eos_text = self.tok.decode([self.eos_ids[0]]) if self.eos_ids else ""
    stops = list(until) + ([eos_text] if eos_text and eos_text not in until else [])
    room = self.max_length - scfg.max_new_tokens
    prompts = []
    for c in contexts:
      ids = self.encode(c) or [self.prefix_id]
      self.truncated += len(ids) > room
      prompts.append(ids[-room:])  # lm-eval: left_truncate_len = max_length - max_gen_toks
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    start = time.perf_counter()
    bar = tqdm.tqdm(total=len(prompts), desc=desc, disable=not self.progress, leave=False)
    eos = self.eos_ids if self.eos_ids else -1
    for i in range(0, len(order), self.batch_size):
      chunk = order[i:i + self.batch_size]
      batch = [prompts[j] for j in chunk]
      batch += [batch[-1]] * (self.batch_size - len(batch))  # a fixed shape per bucket
      self.gen_shapes.add((self.batch_size, -(-max(map(len, batch)) // MIN_BUCKET) * MIN_BUCKET))
      with nn.logical_axis_rules(self.rules), jax.set_mesh(self.mesh):
        new = sampling.generate(self.params, self.model_cfg, batch, scfg, rng, eos_id=eos,
                                pad_multiple=MIN_BUCKET)
      for j, ids in zip(chunk, new):
        ids = [t for t in ids if t not in self.eos_ids]
        out[j] = scoring.cut_at_stops(self.tok.decode(ids), stops)
      bar.update(len(chunk))
    bar.close()
    self.seconds += time.perf_counter() - start
    return out
