"""The continuous-batching engine: a fixed set of decode slots over one KV cache.

Owns the serving loop between requests (token ids and knobs) and streamed tokens:
- `serve_slots` slots, each with its own rows of the cache [L, slots, S, K, H] (S = the context
  the model holds) and its own request knobs (temperature, top_k, top_p, repetition penalty,
  min tokens), random stream and seen-token set;
- `_prefill`: one request's prompt, right-padded to a bucket length (powers of two up to S: one
  compile per bucket), run through the model into a fresh cache that is copied into a free
  slot's rows, and its first token chosen; the other slots wait for that one call only;
- `_decode`: one jitted step that feeds every slot its last token at its own position (the model
  vmapped over slots, so each slot writes its own cache index) and chooses every slot's next
  token with the sampler's own processors (sampling.process_logits_rows /
  select_tokens_rows, Hugging Face's order and meaning);
- the host loop (one thread): admit waiting sequences into free slots (one per decode step
  while others decode), step, hand each slot's token to its sequence (detokenize, stop
  strings, EOS, max_tokens), free finished, stopped or cancelled slots at once.

Right padding makes the slot layout simple: a prompt of length p fills cache slots [0, p) and
its padding [p, bucket) is overwritten by the first decode writes; the causal mask hides every
cache slot past the one being written, so no validity mask is needed.

Random streams are the sampler's: a sequence with seed s and sample index i draws token j with
fold_in(fold_in(fold_in(key(s), 0), i), j), exactly `sampling.generate(..., rng=key(s))` for
that prompt alone, so a seeded request gives the same tokens whatever else is being served.
Log-probs reported are the model's own distribution (log_softmax of the raw logits, vLLM's
default), not the processed one.

Nothing compiles after `warmup`: the shapes are fixed (slots, S, buckets) and every knob, seed,
slot index and length is a traced value. `compiles` counts jit traces in this process (a jax
monitoring event) so tests and /metrics can show it.
"""

import collections
import dataclasses
import logging
import secrets
import threading
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from llm_jax import model as model_lib
from llm_jax import sampling

TOP_LOGPROBS = 20  # the most alternatives a request may ask for (OpenAI's limit for chat)
KNOBS = ("temperature", "top_k", "top_p", "repetition_penalty", "min_tokens")
_KNOB_DTYPES = {"top_k": np.int32, "min_tokens": np.int32}

_traces = [0]


def _count(event, *_args, **_kw):
  if event == "/jax/core/compile/jaxpr_trace_duration":
    _traces[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count)


def compiles() -> int:
  """Jit traces (each one a compile, or a load from the persistent cache) in this process."""
  return _traces[0]


class QueueFull(Exception):
  """The waiting queue is at serve_max_queue: answer 429."""


@dataclasses.dataclass
class Params:
  """One sequence's decoding request (already validated by the API layer)."""
  max_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  repetition_penalty: float = 1.0
  min_tokens: int = 0
  stop: tuple = ()
  seed: Optional[int] = None
  sample_index: int = 0
  logprobs: Optional[int] = None  # alternatives per token (0 = only the chosen one's)
  end_ids: tuple = ()  # more ids that end it, besides EOS (a chat reply's end-of-turn token)


@dataclasses.dataclass
class Sequence:
  """One choice of a request: its prompt, knobs and output so far. `emit(event)` is called from
  the engine thread with ("delta", text, token_ids, logprob entries) and finally ("done",
  finish_reason) or ("error", message)."""
  prompt: list
  params: Params
  emit: Callable
  tokens: list = dataclasses.field(default_factory=list)
  entries: list = dataclasses.field(default_factory=list)  # (token, logprob, top) when asked
  text: str = ""
  sent: int = 0  # characters of text already emitted
  cancelled: bool = False
  finish_reason: Optional[str] = None
  enqueued: float = dataclasses.field(default_factory=time.monotonic)
  first_token_at: Optional[float] = None
  last_token_at: Optional[float] = None


def buckets(context: int, smallest: int = 16) -> list[int]:
  """Prompt lengths compiled for: powers of two from `smallest`, and the context itself."""
  out, b = [], smallest
  while b < context:
    out.append(b)
    b *= 2
  return out + [context]


# ----------------------------------------------------------------------------------------------
# Device side: pure functions of the slot state, jitted once per shape.


def init_state(model_cfg, slots: int, context: int):
  z = lambda dtype: jnp.zeros((slots,), dtype)
  return {"cache": model_lib.init_cache(model_cfg, slots, context),
          "last": z(jnp.int32), "index": z(jnp.int32), "step": z(jnp.int32),
          "keys": jax.random.split(jax.random.key(0), slots),
          "seen": jnp.zeros((slots, model_cfg.padded_vocab), bool),
          "temperature": jnp.ones((slots,)), "top_k": z(jnp.int32), "top_p": jnp.ones((slots,)),
          "repetition_penalty": jnp.ones((slots,)), "min_tokens": z(jnp.int32)}


def _choose(logits_BV, seen_BV, step_B, knobs, keys_B, terminal_ids):
  """The sampler's choice for each row with its own knobs and stream (token j of a stream uses
  fold_in(stream, j), as sampling._sample_update). Returns (token [B], its log-prob [B], the
  TOP_LOGPROBS best log-probs and ids [B, TOP_LOGPROBS], the updated seen set)."""
  warped_BV, unwarped_BV = sampling.process_logits_rows(logits_BV, seen_BV, step_B, knobs,
                                                        terminal_ids)
  step_keys_B = jax.vmap(jax.random.fold_in)(keys_B, step_B)
  tok_B = sampling.select_tokens_rows(warped_BV, unwarped_BV, step_keys_B, knobs["temperature"])
  logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
  top_lp_BK, top_id_BK = lax.top_k(logp_BV, TOP_LOGPROBS)
  tok_lp_B = jnp.take_along_axis(logp_BV, tok_B[:, None], axis=1)[:, 0]
  seen_BV = seen_BV.at[jnp.arange(tok_B.shape[0]), tok_B].set(True)
  return tok_B, tok_lp_B, top_lp_BK, top_id_BK, seen_BV


def _prefill(params, st, prompt_1T, length, slot, knobs, seed, sample_index, terminal_ids, *,
             model_cfg):
  """Runs one right-padded prompt (its first `length` entries real) into slot `slot` and
  chooses its first token. Returns (state, (token, log-prob, top log-probs, top ids))."""
  params = sampling._low_precision_params(params, model_cfg)  # pylint: disable=protected-access
  t = prompt_1T.shape[1]
  cache = model_lib.init_cache(model_cfg, 1, t)
  logits_1TV, cache = model_lib.build(model_cfg).apply(
      {"params": params}, prompt_1T, positions_BT=jnp.arange(t)[None], cache=cache,
      cache_index=0)
  logits_1V = lax.dynamic_index_in_dim(logits_1TV, length - 1, axis=1, keepdims=False)
  big = jax.tree.map(
      lambda whole, row: lax.dynamic_update_slice(whole, row.astype(whole.dtype),
                                                  (0, slot, 0, 0, 0)), st["cache"], cache)
  seen_1V = sampling.seen_from_prompt(prompt_1T, (jnp.arange(t) < length)[None],
                                      model_cfg.padded_vocab)
  key_1 = sampling.row_keys(jax.random.key(seed), jnp.stack([0, sample_index])[None])
  knobs_1 = {k: jnp.asarray(v)[None] for k, v in knobs.items()}
  tok, lp, top_lp, top_id, seen_1V = _choose(logits_1V, seen_1V, jnp.zeros((1,), jnp.int32),
                                             knobs_1, key_1, terminal_ids)
  put = lambda name, value: st[name].at[slot].set(value)
  new = {"cache": big, "last": put("last", tok[0]), "index": put("index", length),
         "step": put("step", 1), "keys": put("keys", key_1[0]), "seen": put("seen", seen_1V[0]),
         **{k: put(k, knobs_1[k][0]) for k in KNOBS}}
  return new, (tok, lp, top_lp, top_id)


def _decode(params, st, terminal_ids, *, model_cfg):
  """One step of every slot: feed its last token at its own index, choose the next one."""
  params = sampling._low_precision_params(params, model_cfg)  # pylint: disable=protected-access
  model = model_lib.build(model_cfg)
  # Free slots keep stepping (fixed shapes); their index is clamped inside the cache.
  index_B = jnp.minimum(st["index"], st["cache"]["k"].shape[2] - 1)

  def one(tok, index, cache_row):  # one slot: batch 1, its own cache index
    cache_1 = jax.tree.map(lambda x: x[:, None], cache_row)
    logits_11V, cache_1 = model.apply({"params": params}, tok[None, None],
                                      positions_BT=index[None, None], cache=cache_1,
                                      cache_index=index)
    return logits_11V[0, 0], jax.tree.map(lambda x: x[:, 0], cache_1)

  logits_BV, cache = jax.vmap(one, in_axes=(0, 0, 1), out_axes=(0, 1))(
      st["last"], index_B, st["cache"])
  knobs = {k: st[k] for k in KNOBS}
  tok, lp, top_lp, top_id, seen = _choose(logits_BV, st["seen"], st["step"], knobs, st["keys"],
                                          terminal_ids)
  new = {**st, "cache": cache, "last": tok, "index": st["index"] + 1, "step": st["step"] + 1,
         "seen": seen}
  return new, (tok, lp, top_lp, top_id)


_prefill_jit = jax.jit(_prefill, static_argnames=("model_cfg",), donate_argnames=("st",))
_decode_jit = jax.jit(_decode, static_argnames=("model_cfg",), donate_argnames=("st",))


# ----------------------------------------------------------------------------------------------
# Host side.


def token_text(tokenizer, token_id: int) -> str:
  """A token's own text, as OpenAI's logprobs show it (SentencePiece's word marker as a space)."""
  if tokenizer.kind == "sentencepiece":
    return tokenizer.id_to_piece(int(token_id)).replace("\u2581", " ")
  return tokenizer.decode([int(token_id)])


class Engine:
  """Continuous batching over `slots` decode slots (see the module docstring).

  submit() queues sequences (thread-safe; QueueFull past max_queue); the loop thread started by
  start() admits, decodes and emits. stop() finishes the running and queued sequences and ends
  the thread.
  """

  def __init__(self, params, model_cfg, tokenizer, *, slots: int, context: int, max_queue: int,
               metrics=None):
    self.params, self.model_cfg, self.tok = params, model_cfg, tokenizer
    self.slots, self.context, self.max_queue = slots, context, max_queue
    self.buckets = buckets(context)
    self.terminal_ids = sampling._terminal_ids(tokenizer.eos_ids, None)  # pylint: disable=protected-access
    self.eos = set(int(i) for i in tokenizer.eos_ids)
    self.metrics = metrics
    self._state = self._fresh_state()
    self._running: list[Optional[Sequence]] = [None] * slots
    self._waiting: collections.deque = collections.deque()
    self._cv = threading.Condition()
    self._stopping = False
    self._thread = None
    self.compiles_after_warmup = None

  def _fresh_state(self):
    """Zeroed slots placed as the jitted steps return them (replicated over the params' mesh),
    so the first call after a reset does not compile for another placement."""
    state = init_state(self.model_cfg, self.slots, self.context)
    sharding = jax.tree.leaves(self.params)[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      state = jax.device_put(state, jax.sharding.NamedSharding(sharding.mesh,
                                                               jax.sharding.PartitionSpec()))
    return state

  # -- lifecycle

  def warmup(self) -> None:
    """Compiles the prefill of every bucket and the decode step, before serving."""
    knobs = self._knobs(Params(max_tokens=1))
    for t in self.buckets:
      self._state, _ = _prefill_jit(self.params, self._state, np.zeros((1, t), np.int32),
                                    np.int32(1), np.int32(0), knobs, np.int32(0), np.int32(0),
                                    self.terminal_ids, model_cfg=self.model_cfg)
    self._state, out = _decode_jit(self.params, self._state, self.terminal_ids,
                                   model_cfg=self.model_cfg)
    jax.block_until_ready(out)
    self.compiles_after_warmup = compiles()

  def start(self) -> None:
    self._thread = threading.Thread(target=self._loop, name="llm_jax-engine", daemon=True)
    self._thread.start()

  def stop(self, timeout: float | None = None) -> None:
    """Finishes every running and queued sequence, then ends the loop."""
    with self._cv:
      self._stopping = True
      self._cv.notify()
    if self._thread is not None:
      self._thread.join(timeout)

  # -- requests

  def submit(self, seqs: list[Sequence]) -> None:
    """Queues a request's sequences (all or none)."""
    with self._cv:
      if len(self._waiting) + len(seqs) > self.max_queue:
        raise QueueFull(f"{len(self._waiting)} sequences are waiting (serve_max_queue="
                        f"{self.max_queue})")
      self._waiting.extend(seqs)
      self._cv.notify()
    self._gauges()

  def cancel(self, seqs: list[Sequence]) -> None:
    """Marks sequences cancelled: the loop frees their slots at its next step."""
    for s in seqs:
      s.cancelled = True
    with self._cv:
      self._cv.notify()

  def queue_depth(self) -> int:
    return len(self._waiting)

  def running(self) -> int:
    return sum(s is not None for s in self._running)

  # -- the loop

  def _knobs(self, p: Params) -> dict:
    return {k: np.asarray(getattr(p, k), _KNOB_DTYPES.get(k, np.float32)) for k in KNOBS}

  def _gauges(self):
    if self.metrics is not None:
      self.metrics.queue_depth.set(len(self._waiting))
      self.metrics.running.set(self.running())

  def _loop(self):
    while True:
      with self._cv:
        while (not self._waiting and self.running() == 0) and not self._stopping:
          self._cv.wait()
        if self._stopping and not self._waiting and self.running() == 0:
          return
      try:
        self._iteration()
      except Exception:  # pylint: disable=broad-except
        # A bug fails the sequences it touched; the loop keeps serving the queue.
        logging.exception("serving engine step failed")
        for i, s in enumerate(self._running):
          if s is not None:
            self._running[i] = None
            s.emit(("error", "internal error while decoding (logged by the server)"))
        self._state = self._fresh_state()
      self._gauges()

  def _iteration(self):
    for i, s in enumerate(self._running):  # cancelled while running: free at once
      if s is not None and s.cancelled:
        self._running[i] = None
    # While slots are decoding, at most one prompt is prefilled between two decode steps: each
    # prefill stalls every running stream, and a burst of them is what makes the p99
    # inter-token latency (vLLM schedules prefills under a token budget for the same reason).
    # With nothing decoding, every free slot is filled at once.
    admit = 1 if self.running() else len(self._running)
    while None in self._running and admit > 0:
      with self._cv:
        seq = self._waiting.popleft() if self._waiting else None
      if seq is None:
        break
      if seq.cancelled:
        continue
      slot = self._running.index(None)
      try:
        out = self._insert(seq, slot)
      except Exception:  # pylint: disable=broad-except
        logging.exception("prefill failed")
        seq.emit(("error", "internal error while reading the prompt (logged by the server)"))
        continue
      self._running[slot] = seq
      admit -= 1
      self._take(slot, seq, *(x[0] for x in out))
    if self.running() == 0:
      return
    self._state, out = _decode_jit(self.params, self._state, self.terminal_ids,
                                   model_cfg=self.model_cfg)
    tok_B, lp_B, top_lp_BK, top_id_BK = jax.device_get(out)
    for slot, seq in enumerate(self._running):
      if seq is not None:
        self._take(slot, seq, tok_B[slot], lp_B[slot], top_lp_BK[slot], top_id_BK[slot])

  def _insert(self, seq: Sequence, slot: int):
    p = len(seq.prompt)
    t = next(b for b in self.buckets if b >= p)
    prompt_1T = np.zeros((1, t), np.int32)
    prompt_1T[0, :p] = seq.prompt
    seed = secrets.randbits(31) if seq.params.seed is None else seq.params.seed % 2**31
    self._state, out = _prefill_jit(
        self.params, self._state, prompt_1T, np.int32(p), np.int32(slot),
        self._knobs(seq.params), np.int32(seed), np.int32(seq.params.sample_index),
        self.terminal_ids, model_cfg=self.model_cfg)
    return jax.device_get(out)

  def _take(self, slot, seq: Sequence, tok, lp, top_lp_K, top_id_K):
    """Hands one new token to its sequence: text, stop strings, EOS, length; frees the slot."""
    now = time.monotonic()
    if self.metrics is not None:
      if seq.first_token_at is None:
        self.metrics.ttft.observe(now - seq.enqueued)
      else:
        self.metrics.itl.observe(now - seq.last_token_at)
      self.metrics.generation_tokens.inc()
    seq.first_token_at = seq.first_token_at or now
    seq.last_token_at = now
    tok = int(tok)
    seq.tokens.append(tok)
    entry = None
    if seq.params.logprobs is not None:
      k = seq.params.logprobs
      entry = (tok, float(lp), [(int(i), float(v)) for i, v in zip(top_id_K[:k], top_lp_K[:k])])
      seq.entries.append(entry)
    finish = None
    if tok in self.eos or tok in seq.params.end_ids:
      finish = "stop"
    else:
      seq.text = self._decode_text(seq)
      cut = _find_stop(seq.text, seq.params.stop, seq.sent)
      if cut is not None:
        seq.text, finish = seq.text[:cut], "stop"
    if finish is None and len(seq.tokens) >= seq.params.max_tokens:
      finish = "length"
    if seq.cancelled:
      finish = finish or "cancelled"
    upto = len(seq.text) if finish else _safe_end(seq.text, seq.params.stop, seq.sent)
    seq.emit(("delta", seq.text[seq.sent:upto], tok, entry))
    seq.sent = max(seq.sent, upto)
    if finish:
      seq.finish_reason = finish
      self._running[slot] = None
      seq.emit(("done", finish))

  def _decode_text(self, seq: Sequence) -> str:
    """The completion's text: decoded after the prompt's last few tokens, so a SentencePiece word
    marker at the start of the completion decodes as the space it is."""
    gen = [t for t in seq.tokens if t not in self.eos and t not in seq.params.end_ids]
    head = seq.prompt[-4:]
    before = self.tok.decode(head)
    full = self.tok.decode(head + gen)
    return full[len(before):] if full.startswith(before) else self.tok.decode(gen)


def _find_stop(text: str, stops, sent: int) -> Optional[int]:
  """Where the first stop string starts in text (searching from what may still change)."""
  best = None
  for s in stops:
    i = text.find(s, max(0, sent - len(s) + 1))
    if i >= 0 and (best is None or i < best):
      best = i
  return best


def _safe_end(text: str, stops, sent: int) -> int:
  """How much of text may be sent now: hold back a tail that could begin a stop string, and a
  trailing replacement character (a multi-byte character still being completed)."""
  end = len(text)
  while end > sent and text[end - 1] == "\ufffd":
    end -= 1
  hold = 0
  for s in stops:
    for n in range(min(len(s) - 1, end), 0, -1):
      if text[end - n:end] == s[:n]:
        hold = max(hold, n)
        break
  return max(end - hold, sent)
