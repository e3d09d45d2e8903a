"""Preference tuning: preference pairs, the DPO / IPO losses, and their reference log-probs.

`--config.objective=dpo` makes the one Trainer's step (train.py) minimise a preference loss over
pairs of completions of one prompt, against the frozen model the run starts from (init_from).

Data. `dataset=text:<file, folder or glob>` names preference records in TRL's formats, read by
records.py (.jsonl, .json, .parquet, .arrow, `datasets` save_to_disk folders):
  standard        {"prompt": str, "chosen": str, "rejected": str}
  conversational  {"prompt": [{"role", "content"}, ...], "chosen": [...], "rejected": [...]}
                  (or, without "prompt", chosen and rejected as whole conversations: their common
                  leading messages are the prompt, as TRL's extract_prompt does)
Held-out pairs: the `validation` file, else `validation_fraction` of the pairs (a fixed
permutation). A pair is one row [2, T] of the batch, (chosen, rejected): prompt tokens then
completion tokens then EOS, padded; the loss weights cover the completion (its EOS included).

Loss (Rafailov et al. 2023, eq. 7; TRL's `sigmoid` and `ipo`). With pi and ref the summed
log-probs of a completion's tokens under the policy and the reference, and
h = (pi_c - ref_c) - (pi_r - ref_r):
  sigmoid  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)     e = dpo_label_smoothing
           (e > 0 is conservative DPO, cDPO: labels flipped with probability e; TRL 0.x's
           `sigmoid` with label_smoothing, which TRL 1.x moved to its other losses)
  ipo      (h' - 1 / (2 beta))^2 with h' the same difference of log-ratios averaged per
           completion token (Azar et al. 2023, eq. 17, normalised as TRL does)
Metrics, TRL's names: rewards/chosen = beta (pi_c - ref_c), rewards/rejected, rewards/margins
(their difference), rewards/accuracies (chosen reward > rejected reward), logps/chosen,
logps/rejected (summed log-probs), each a mean over pairs.

Reference. With LoRA the reference is the same base with the adapters off: the step applies the
model built without adapters to the frozen base it already holds (no second copy of anything).
With full fine-tuning the trained params replace the starting ones, so the reference
log-probs of every pair (train and held-out) are computed once, before the first step, from the
starting params, and cached in <workdir>/dpo_reference.npz keyed by the pair's index: the
batches carry them. A cache costs 8 bytes per pair and one forward pass over the data, where a
frozen copy would cost a second set of params in device memory and a forward pass per step; a
resumed run reads the cache (its starting params are no longer loaded).
"""

import dataclasses
import hashlib
import io
import os
import sys
import warnings

import grain
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import corpus as corpus_lib
from llm_jax import data as data_lib
from llm_jax import errors
from llm_jax import files
from llm_jax import lora
from llm_jax import model as model_lib
from llm_jax import records
from llm_jax import tokenizer as tokenizer_lib

REFERENCE_FILE = "dpo_reference.npz"
_FIELDS = ("prompt", "chosen", "rejected")
_FORMAT = ("TRL's preference format: fields 'prompt', 'chosen', 'rejected' as strings, or as "
           "lists of {role, content} messages")


@dataclasses.dataclass
class Pair:
  where: str  # file:line or file:row N
  prompt: str | list
  chosen: str | list
  rejected: str | list


# ------------------------------------------------------------------------------------- Reading


def _messages(value, where: str, name: str) -> list:
  for i, m in enumerate(value):
    if not (isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)):
      raise corpus_lib.DataError(f"{where}: {name}[{i}] is not a {{role, content}} message of "
                                 f"strings ({m!r:.80}); {_FORMAT}")
  return list(value)


def pair_of(record: dict, where: str) -> Pair:
  """One record as a Pair, or DataError naming `where` (missing fields, mixed forms, no
  difference between chosen and rejected)."""
  missing = [f for f in ("chosen", "rejected") if f not in record]
  if missing:
    have = ", ".join(map(repr, record)) or "none"
    raise corpus_lib.DataError(
        f"{where}: objective=dpo needs preference pairs, but this record has no "
        f"{' or '.join(map(repr, missing))} (has: {have}); {_FORMAT}")
  chosen, rejected = record["chosen"], record["rejected"]
  prompt = record.get("prompt")
  if isinstance(chosen, list) and isinstance(rejected, list):
    chosen, rejected = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
    if prompt is None:  # implicit prompt: the leading messages the two share
      k = 0
      while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
      prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    elif isinstance(prompt, list):
      prompt = _messages(prompt, where, "prompt")
    else:
      raise corpus_lib.DataError(f"{where}: 'prompt' is a {type(prompt).__name__} but 'chosen' "
                                 f"and 'rejected' are messages; give all three in one form")
  elif isinstance(chosen, str) and isinstance(rejected, str):
    if not isinstance(prompt, str):
      what = "no 'prompt'" if prompt is None else f"a {type(prompt).__name__} 'prompt'"
      raise corpus_lib.DataError(f"{where}: {what} beside string 'chosen' and 'rejected'; the "
                                 f"standard form needs the prompt as a string")
  else:
    raise corpus_lib.DataError(f"{where}: 'chosen' is a {type(chosen).__name__} and 'rejected' a "
                               f"{type(rejected).__name__}; {_FORMAT}")
  if chosen == rejected:
    raise corpus_lib.DataError(f"{where}: 'chosen' is identical to 'rejected', so the pair "
                               f"prefers nothing; drop the record or fix one of them")
  return Pair(where, prompt, chosen, rejected)


def read_pairs(path: str, split: str | None = None) -> list[Pair]:
  """Every preference pair of one records file or save_to_disk folder."""
  pairs = [pair_of(record, where) for where, record in records.iter_records(path, split=split)]
  if not pairs:
    raise corpus_lib.DataError(f"{path}: no preference records in it; {_FORMAT}")
  return pairs


def _record_files(pattern: str, what: str) -> list[str]:
  if records.kind(os.path.expanduser(pattern)) is not None:
    return [os.path.expanduser(pattern)]
  found = corpus_lib.resolve_files(pattern, what)
  plain = [f for f in found if records.kind(f) is None]
  if plain:
    raise corpus_lib.DataError(
        f"{plain[0]}: plain text, no preference fields; objective=dpo reads records with "
        f"{_FORMAT} (.jsonl, .json, .parquet, .arrow or a save_to_disk folder)")
  return found


def load_pairs(cfg) -> tuple[list[Pair], list[Pair]]:
  """(train, held-out) pairs of cfg.dataset / cfg.validation (see the module docstring)."""
  if not cfg.dataset.startswith("text:"):
    raise corpus_lib.DataError(
        f"objective=dpo on dataset={cfg.dataset!r}: it holds plain text, no preference fields; "
        f"give preference records as --config.dataset=text:<file> ({_FORMAT})")
  pattern = cfg.dataset[len("text:"):]
  train = [p for f in _record_files(pattern, f"dataset={cfg.dataset!r}") for p in read_pairs(f)]
  if cfg.validation:
    val = [p for f in _record_files(cfg.validation, f"validation={cfg.validation!r}")
           for p in read_pairs(f)]
  else:
    if len(train) < 2:
      raise corpus_lib.DataError(f"dataset={cfg.dataset!r} has {len(train)} pair: too few to "
                                 f"hold some out; add pairs or give --config.validation")
    n_val = min(len(train) - 1, max(1, round(cfg.validation_fraction * len(train))))
    held = set(np.random.default_rng(0).permutation(len(train))[:n_val].tolist())
    val = [p for i, p in enumerate(train) if i in held]
    train = [p for i, p in enumerate(train) if i not in held]
  return train, val


# ---------------------------------------------------------------------------------- Tokenizing


def _plain_text(turns: list) -> str:
  return "".join(m["content"] + "\n" for m in turns)


def in_messages(pairs) -> bool:
  """Whether any pair is in the messages form (a conversation: the chat template renders it)."""
  return any(isinstance(p.prompt, list) for p in pairs)


def encode_example(tok, prompt, completion, template=None) -> tuple[list[int], list[int]]:
  """(prompt ids, completion ids) of one side of a pair: the one place a pair becomes tokens.

  Plain strings: the prompt starts with BOS when the tokenizer's documents do, else with EOS (how
  this project's documents start in the packed stream, and what sampling starts from); the
  completion ends with EOS; the two are tokenized separately, as TRL does, so the boundary is
  exact. Messages (with the run's chat `template`, chat.py): the prompt is the conversation so
  far rendered with the generation prompt, the completion the rest of the whole conversation's
  rendering (its end-of-turn marker included), as TRL applies a conversational dataset's
  template; one tokenization of the whole text, split at the first token of the completion.
  Without a template, messages are their contents one per line.
  """
  if isinstance(prompt, list) and template is not None:
    from llm_jax import chat  # pylint: disable=import-outside-toplevel  (only conversations)
    head = chat.render(template, prompt, tok, add_generation_prompt=True)
    full = chat.render(template, prompt + completion, tok, add_generation_prompt=False)
    if not full.startswith(head):
      raise corpus_lib.DataError(
          "the chat template does not render the prompt as the start of the whole "
          "conversation, so the completion cannot be told apart; use another template "
          "(--config.chat_template)")
    ids, starts = tok.encode_offsets(full)
    k = next((i for i, st in enumerate(starts) if st >= len(head)), len(ids))
    return list(ids[:k]) or [tok.eos_id], list(ids[k:])
  if isinstance(prompt, list):
    prompt, completion = _plain_text(prompt), _plain_text(completion).rstrip("\n")
  start = tok.bos_id if tok.add_bos else tok.eos_id
  prompt_ids = [start] + (list(tok.encode(prompt)) if prompt else [])
  return prompt_ids, list(tok.encode(completion)) + [tok.eos_id]


def tokenize_pairs(pairs: list[Pair], tok, block_size: int, what: str, template=None):
  """(tokens [N, 2, T + 1] int32, weights [N, 2, T] float32) of (chosen, rejected) per pair.

  weights[n, k, t] = 1 where target t (token t + 1) is a completion token. A side longer than
  T + 1 tokens loses prompt tokens from its left first (the completion is what is scored), then
  completion tokens from its right; one warning counts the pairs cut.
  """
  T = block_size
  tokens = np.full((len(pairs), 2, T + 1), tok.pad_id, np.int32)
  weights = np.zeros((len(pairs), 2, T), np.float32)
  cut = 0
  for n, pair in enumerate(pairs):
    cut_here = False
    for k, completion in enumerate((pair.chosen, pair.rejected)):
      try:
        p, c = encode_example(tok, pair.prompt, completion, template)
      except corpus_lib.DataError as e:
        raise corpus_lib.DataError(f"{pair.where}: {e}") from None
      if len(p) + len(c) > T + 1:
        cut_here = True
        p = p[:1] + p[1:][max(0, len(p) + len(c) - (T + 1)):]  # keep the start token
        c = c[:T + 1 - len(p)]
      seq = p + c
      tokens[n, k, :len(seq)] = seq
      weights[n, k, len(p) - 1:len(seq) - 1] = 1.0
    cut += cut_here
  if cut:
    warnings.warn(f"{cut} of {len(pairs)} {what} pair(s) are longer than block_size + 1 = {T + 1} "
                  f"tokens and were cut (prompt from the left, then completion from the right); "
                  f"raise --config.block_size to keep them whole", stacklevel=2)
  return tokens, weights


# ------------------------------------------------------------------------------------- Batches


class _PairBatches(data_lib._TrainBatches):  # pylint: disable=protected-access
  """Step number -> this process's pairs of that step, in the text batches' order (data.py)."""

  def __init__(self, tokens, weights, ref, steps_per_epoch, accum, per_proc, process_index,
               process_count, seed):
    # One "stream" of exactly len(tokens) rows: the text batches' row order over the pairs.
    t = tokens.shape[-1] - 1
    super().__init__([range(len(tokens) * t + 1)], [1.0], t, steps_per_epoch, accum, per_proc,
                     process_index, process_count, seed, False)
    self.tokens, self.weights, self.ref = tokens, weights, ref

  def __call__(self, step: int) -> dict:
    rows = self.rows(step)
    return reshape(batch_of(self.tokens, self.weights, self.ref, rows), (self.A, self.b))


def batch_of(tokens, weights, ref, rows, valid=None) -> dict:
  """The pairs at `rows` as a batch: inputs, targets int32 and weights float32 [R, 2, T],
  ref_logps [R, 2] when the reference is cached, pair_weights [R, 2] when `valid` is given."""
  t = tokens[rows]
  out = {"inputs": t[..., :-1], "targets": t[..., 1:], "weights": weights[rows]}
  if ref is not None:
    out["ref_logps"] = ref[rows]
  if valid is not None:
    out["pair_weights"] = np.repeat(valid.astype(np.float32)[:, None], 2, 1)
  return out


def reshape(batch: dict, lead: tuple) -> dict:
  return {k: v.reshape(lead + v.shape[1:]) for k, v in batch.items()}


@dataclasses.dataclass
class PreferenceData:
  """Tokenized preference pairs and their batch iterators for one process: what train.py asks
  of data.Data (tokenizer, steps_per_epoch, train_iter, eval_batches, chars_per_token)."""

  tokenizer: object
  train_tokens: np.ndarray  # [N, 2, T + 1]
  train_weights: np.ndarray  # [N, 2, T]
  validation_tokens: np.ndarray
  validation_weights: np.ndarray
  micro_batch_size: int
  accum: int
  process_index: int
  process_count: int
  seed: int
  prefetch: int
  steps_per_epoch: int
  key: str  # the pairs' tokens: what the cached reference belongs to
  train_ref: np.ndarray | None = None  # [N, 2] reference log-probs, when cached
  validation_ref: np.ndarray | None = None
  chars_per_token = None  # bits per character mean nothing for a preference loss

  @property
  def per_process_batch(self) -> int:
    return self.micro_batch_size // self.process_count

  def train_iter(self) -> grain.DatasetIterator:
    batches = _PairBatches(self.train_tokens, self.train_weights, self.train_ref,
                           self.steps_per_epoch, self.accum, self.per_process_batch,
                           self.process_index, self.process_count, self.seed)
    ds = grain.MapDataset.range(sys.maxsize).map(batches)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=min(2, self.prefetch),
                                                     prefetch_buffer_size=self.prefetch)))

  def _batches(self, tokens, weights, ref, max_batches=None):
    """This process's share of all pairs, once, in order; padding pairs weigh 0."""
    mb, b = self.micro_batch_size, self.per_process_batch
    n = -(-len(tokens) // mb)
    for k in range(n if max_batches is None else min(n, max_batches)):
      rows = k * mb + self.process_index * b + np.arange(b)
      valid = rows < len(tokens)
      yield batch_of(tokens, weights, ref, np.minimum(rows, len(tokens) - 1), valid)

  def eval_batches(self, max_batches: int | None = None):
    """Held-out pairs as batches [b, 2, T] with pair_weights [b, 2]."""
    return self._batches(self.validation_tokens, self.validation_weights, self.validation_ref,
                         max_batches)


def build(cfg, workdir: str, pairs=None, tokenizer=None) -> PreferenceData:
  """`pairs` (load_pairs(cfg) when None), tokenized with the run's tokenizer (its base's, copied
  into the workdir by the fine-tune's start). DataError for anything wrong, before any compile."""
  train, val = pairs if pairs is not None else load_pairs(cfg)
  if tokenizer is None:
    path = cfg.tokenizer_path or os.path.join(workdir, "tokenizer.model")
    tokenizer = tokenizer_lib.load(path)
  mb, accum = cfg.micro_batch_size, cfg.gradient_accumulation_steps
  template = None
  if in_messages(train + val):  # conversations: the run's chat template (loader added its markers)
    from llm_jax import chat  # pylint: disable=import-outside-toplevel
    template = chat.resolve_template(tokenizer, cfg.chat_template, f"workdir {workdir}")
  tokens, weights = tokenize_pairs(train, tokenizer, cfg.block_size, "train", template)
  vtokens, vweights = tokenize_pairs(val, tokenizer, cfg.block_size, "held-out", template)
  steps_per_epoch = len(train) // (mb * accum)
  if steps_per_epoch == 0:
    raise corpus_lib.DataError(
        f"dataset={cfg.dataset!r} has {len(train)} training pairs, fewer than one optimizer "
        f"step's micro_batch_size x gradient_accumulation_steps = {mb * accum}; lower "
        f"--config.micro_batch_size or add pairs")
  h = hashlib.sha256()
  for a in (tokens, weights, vtokens, vweights):
    h.update(np.ascontiguousarray(a).data)
  return PreferenceData(tokenizer, tokens, weights, vtokens, vweights, mb, accum,
                        jax.process_index(), jax.process_count(), cfg.seed, cfg.prefetch,
                        steps_per_epoch, h.hexdigest()[:16])


# -------------------------------------------------------------------------------------- Losses


def initial_loss(cfg) -> float:
  """The loss while the policy is its reference (every log-ratio 0): log 2 for the sigmoid loss
  (label smoothing or not), (1 / (2 beta))^2 for IPO."""
  if cfg.dpo_loss_type == "ipo":
    return (1.0 / (2.0 * cfg.dpo_beta)) ** 2
  return float(np.log(2.0))


def sequence_logps(logits_BTV, targets_BT, weights_BT):
  """Summed log-probabilities of the weighted targets of each row (float32): [B]."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.sum((target_BT - lse_BT) * weights_BT, axis=-1)


def preference_loss(logps_P2, ref_logps_P2, n_tokens_P2, beta: float, label_smoothing: float,
                    loss_type: str):
  """Per-pair loss [P] and TRL's metrics (each [P]) of (chosen, rejected) log-probs [P, 2]
  under the policy and the reference; n_tokens_P2: completion tokens (IPO's averaging)."""
  ratios_P2 = logps_P2 - ref_logps_P2
  if loss_type == "ipo":
    avg_P2 = ratios_P2 / jnp.maximum(n_tokens_P2, 1.0)
    loss_P = jnp.square(avg_P2[:, 0] - avg_P2[:, 1] - 1.0 / (2.0 * beta))
  else:
    h_P = beta * (ratios_P2[:, 0] - ratios_P2[:, 1])
    loss_P = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(h_P)
              - label_smoothing * jax.nn.log_sigmoid(-h_P))
  rewards_P2 = jax.lax.stop_gradient(beta * ratios_P2)
  metrics = {"rewards/chosen": rewards_P2[:, 0], "rewards/rejected": rewards_P2[:, 1],
             "rewards/accuracies": (rewards_P2[:, 0] > rewards_P2[:, 1]).astype(rewards_P2.dtype),
             "rewards/margins": rewards_P2[:, 0] - rewards_P2[:, 1],
             "logps/chosen": jax.lax.stop_gradient(logps_P2[:, 0]),
             "logps/rejected": jax.lax.stop_gradient(logps_P2[:, 1])}
  return loss_P, metrics


def pair_logps(model, params, batch, *, deterministic=True, rng=None):
  """Summed completion log-probs [P, 2] of a batch of pairs [P, 2, T] under `model`."""
  p, _, t = batch["inputs"].shape
  logits = model.apply({"params": params}, batch["inputs"].reshape(2 * p, t),
                       deterministic=deterministic,
                       rngs=None if deterministic else {"dropout": rng})
  return sequence_logps(logits, batch["targets"].reshape(2 * p, t),
                        batch["weights"].reshape(2 * p, t).astype(jnp.float32)).reshape(p, 2)


# What make_loss_fn's loss sums over pairs: the loss, the pair count, TRL's metrics.
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")
SUM_KEYS = ("loss", "pairs") + METRICS


def make_loss_fn(cfg, model, ref_model):
  """loss(full params, frozen base, micro-batch, rng, deterministic) -> (mean loss, sums):
  the DPO objective for train.make_train_step. sums: the loss and TRL's metrics summed over the
  (weighted) pairs, and their count "pairs" (means are taken after accumulation)."""
  def loss(params, base, batch, rng, deterministic):
    logps = pair_logps(model, params, batch, deterministic=deterministic, rng=rng)
    if "ref_logps" in batch:  # full fine-tuning: cached before training
      ref = batch["ref_logps"]
    else:  # LoRA: the frozen base without its adapters
      ref = jax.lax.stop_gradient(pair_logps(ref_model, base, batch))
    loss_P, metrics = preference_loss(logps, ref, batch["weights"].sum(-1), cfg.dpo_beta,
                                      cfg.dpo_label_smoothing, cfg.dpo_loss_type)
    w_P = batch["pair_weights"][:, 0] if "pair_weights" in batch else jnp.ones_like(loss_P)
    n = jnp.sum(w_P)
    sums = {"loss": jnp.sum(loss_P * w_P), "pairs": n,
            **{k: jnp.sum(v * w_P) for k, v in metrics.items()}}
    return sums["loss"] / jnp.maximum(n, 1.0), sums
  return loss


def summarize(sums: dict) -> dict:
  """Means per pair of make_loss_fn's sums (the loss under "loss"), and the pair count."""
  n = max(float(sums["pairs"]), 1.0)
  out = {k: float(v) / n for k, v in sums.items() if k != "pairs"}
  out["pairs"] = int(sums["pairs"])
  return out


# ------------------------------------------------------------------------------ The reference


def check(cfg) -> None:
  """UserError for a DPO run that has no reference to compute."""
  if cfg.objective == "dpo" and not cfg.init_from:
    raise errors.UserError(
        "objective=dpo cannot compute a reference: DPO keeps the model close to the one it "
        "starts from, and without --config.init_from it starts from random params. Set "
        "--config.init_from=<a trained workdir> (with --config.lora_r > 0 the reference is that "
        "base with the adapters off; with lora_r=0 its log-probs are computed once and cached "
        f"in the workdir's {REFERENCE_FILE}, 8 bytes per pair)")


def _cached(data: PreferenceData, workdir: str, base: str | None = None) -> bool:
  """Sets data's reference log-probs from <workdir>/REFERENCE_FILE if it holds this data's (and,
  when `base` is given, was computed from that starting model)."""
  path = os.path.join(workdir, REFERENCE_FILE)
  if os.path.exists(path):
    with np.load(path) as z:
      if str(z["key"]) == data.key and base in (None, str(z["base"])):
        data.train_ref, data.validation_ref = z["train"], z["validation"]
        return True
  return False


def _no_reference(path: str, why: str) -> errors.UserError:
  return errors.UserError(
      f"cannot compute the DPO reference: {path} is "
      + ("missing" if not os.path.exists(path) else "of other pairs (the dataset changed)")
      + f" and {why}. Train in a new --workdir (the reference is computed again from "
      f"init_from), or restore the file")


def eval_step(loaded, workdir: str, data: PreferenceData):
  """--mode=eval of a DPO run: (jitted step(params, batch) -> sums, the params it takes). The
  reference is a LoRA run's base without its adapters, else the run's cached log-probs."""
  policy, lora_run = model_lib.build(loaded.model_cfg), bool(loaded.model_cfg.lora_r)
  ref_model = (model_lib.build(dataclasses.replace(loaded.model_cfg, lora_r=0)) if lora_run
               else None)
  if not lora_run:
    if not _cached(data, workdir):
      raise _no_reference(os.path.join(workdir, REFERENCE_FILE),
                          "the run's checkpoints no longer hold the params it started from")
    data.train_ref = None  # evaluation reads the held-out pairs only
  loss = make_loss_fn(loaded.cfg, policy, ref_model)

  def step(params, batch):  # a LoRA run's params: its base and its adapters, one tree
    return loss(params, lora.split(params)[0] if lora_run else {}, batch, None, True)[1]
  return jax.jit(step), loaded.params


def attach_reference(trainer, data: PreferenceData, workdir: str, base: str | None) -> None:
  """Full fine-tuning: data's reference log-probs, from <workdir>/REFERENCE_FILE when it holds
  this data's (from the checkpoint `base`, when a new run loaded one), else computed from the
  starting params (held by `trainer` until its first state) and written there. UserError when
  neither is possible (a resumed run whose cache is gone)."""
  path = os.path.join(workdir, REFERENCE_FILE)
  params = trainer.initial_params()
  if _cached(data, workdir, base if params is not None else None):
    return
  if params is None:
    raise _no_reference(path, "this run resumes from its checkpoints, which no longer hold the "
                        "params it started from")
  print(f"llm_jax: DPO reference log-probs of {len(data.train_tokens)} + "
        f"{len(data.validation_tokens)} pairs, once, into {path}", flush=True)
  refs = []
  for tokens, weights in ((data.train_tokens, data.train_weights),
                          (data.validation_tokens, data.validation_weights)):
    # Each batch's global rows are pairs k * mb ... in order, on every process (data._batches).
    out = [trainer.pair_logps(params, {k: v for k, v in batch.items() if k != "pair_weights"})
           for batch in data._batches(tokens, weights, None)]  # pylint: disable=protected-access
    refs.append(np.concatenate(out)[:len(tokens)].astype(np.float32))
  data.train_ref, data.validation_ref = refs
  if jax.process_index() == 0:
    buf = io.BytesIO()
    np.savez(buf, key=np.asarray(data.key), base=np.asarray(base), train=refs[0],
             validation=refs[1])
    files.write_bytes(path, buf.getvalue(), "the DPO reference log-probs")

