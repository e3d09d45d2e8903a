"""Data for training and evaluation: tokenizer, tokenized-corpus cache, packing, grain pipeline.

`build(cfg, workdir)` gets the corpus (see corpus.py), gets or trains the tokenizer, tokenizes
each split once into a cache keyed by corpus and tokenizer (tokens.py: shards built in parallel
and resumably, read back as one stream), and returns a `Data`.

Packing. A split is one token stream: every document followed by EOS. Row r is the T + 1 tokens
stream[r*T : r*T + T + 1] (inputs = row[:-1], targets = row[1:]), so consecutive rows share one
token and every token after the first is a target exactly once. With pack_segments, each EOS
starts a new segment (the EOS acts as the next document's BOS): attention stays inside a segment
and `positions` restart at every segment start and at the row start.

Train order. Optimizer step s reads global rows s*G .. s*G + G - 1 (G = A * micro_batch_size) of
epoch e = s // steps_per_epoch, where epoch e is a permutation of all rows seeded by (seed, e)
(the rows left over past steps_per_epoch * G differ every epoch). Process p of P takes every P-th
of those rows, so the processes' shards of a step are disjoint and their union is the step.
The pipeline is a grain MapDataset over step numbers: its iterator state is a step counter, which
checkpoints through orbax (grain.checkpoint.CheckpointSave/Restore) and resumes exactly. A split
of many shards is one stream to all of this: row r is the same T + 1 tokens of the concatenation.

Mixtures (dataset='mix:...'). Each source has its own rows and epochs; a step's G rows are split
among the sources by weight, seeded by the step (`_TrainBatches.slots`), so the batch of a step is
still a pure function of (seed, step, weights), and the processes still take every P-th row.

Evaluation reads `eval_rows`: the whole validation split, or, when it holds more than
cfg.eval_tokens, a fixed evenly spaced sample of its rows (the same at every evaluation).
"""

import dataclasses
import hashlib
import json
import math
import os
import sys

import grain
import numpy as np

from llm_jax import config as config_lib
from llm_jax import corpus as corpus_lib
from llm_jax import files
from llm_jax import tokenizer as tokenizer_lib
from llm_jax import tokens as tokens_lib
from llm_jax.corpus import DataError  # noqa: F401  (re-exported: data.DataError)

_TOKEN_CACHE_VERSION = 2
# Characters sampled from the train split to train the tokenizer: enough for a stable vocabulary,
# few enough that unigram training takes seconds (~3 s of CPU at vocab 2048 on 500k chars).
_TOKENIZER_MIN_CHARS = 500_000
_TOKENIZER_CHARS_PER_PIECE = 256  # (recipe 2: the chat markers are user-defined symbols)


def load_corpus(cfg, root: str, ds: str | None = None):
  """The corpus of `ds` (default cfg.dataset; a mixture's source): a Corpus or a FileCorpus."""
  ds = cfg.dataset if ds is None else ds
  if ds == "shakespeare":
    return corpus_lib.shakespeare_corpus(root)
  if ds.startswith("text:"):
    return corpus_lib.text_corpus(
        ds[len("text:"):], validation=cfg.validation, fraction=cfg.validation_fraction,
        text_split=cfg.text_split, text_key=cfg.text_key)
  if ds.startswith("tfds:"):
    return corpus_lib.tfds_corpus(ds[len("tfds:"):], validation=cfg.validation,
                                  fraction=cfg.validation_fraction, text_key=cfg.text_key,
                                  tfds_data_dir=cfg.tfds_data_dir)
  raise DataError(f"dataset={ds!r} is not shakespeare, text:<dir or glob> or tfds:<name>")


# -------------------------------------------------------------------------------------- Tokenizer


def tokenizer_sample(source: corpus_lib.TextSource, budget_chars: int) -> list[str]:
  """Paragraphs drawn at random (fixed seed) from `source`, about `budget_chars` in all."""
  rng = np.random.default_rng(0)
  n = len(source)
  order = rng.permutation(n) if n <= 4_000_000 else rng.integers(0, n, 4_000_000)
  paragraphs, total = [], 0
  for start in range(0, len(order), 256):  # read ~4x the budget, then sample paragraphs
    for doc in source.get(order[start:start + 256].tolist()):
      for p in doc.split("\n\n"):
        if p.strip():
          paragraphs.append(p)
          total += len(p)
    if total >= 4 * budget_chars:
      break
  sample, total = [], 0
  for i in rng.permutation(len(paragraphs)):
    sample.append(paragraphs[i])
    total += len(paragraphs[i])
    if total >= budget_chars:
      break
  return sample


def _corpus_sample(corpus, budget: int) -> list[str]:
  if isinstance(corpus, corpus_lib.FileCorpus):
    return corpus.sample(budget)  # streamed: the first documents of units spread over it
  return tokenizer_sample(corpus.train, budget)


def _train_tokenizer(cfg, corpus) -> tokenizer_lib.Tokenizer:
  budget = max(_TOKENIZER_MIN_CHARS, _TOKENIZER_CHARS_PER_PIECE * cfg.vocab_size)
  if isinstance(corpus, Mixture):  # each source by its weight within the same budget
    sample = [p for w, c in zip(corpus.weights, corpus.corpora) if w > 0
              for p in _corpus_sample(c, max(1, int(budget * w)))]
  else:
    sample = _corpus_sample(corpus, budget)
  if not sample:
    raise DataError(f"dataset={cfg.dataset!r}: the train split has no text to train the "
                    f"tokenizer on; add documents")
  try:
    return tokenizer_lib.train_tokenizer(sample, vocab_size=cfg.vocab_size,
                                         model_type=cfg.tokenizer_type,
                                         byte_fallback=cfg.byte_fallback)
  except ValueError as e:
    raise DataError(f"dataset={cfg.dataset!r}: cannot train a tokenizer: {e} "
                    f"(config fields: --config.vocab_size, --config.byte_fallback)") from e


def check_vocab(tok, cfg, where: str) -> None:
  """Our own tokenizers fill vocab_size exactly; a Hugging Face model's embedding may be larger
  than its tokenizer (Qwen2 pads it), never smaller."""
  if tok.vocab_size > cfg.vocab_size or (tok.is_own and tok.vocab_size != cfg.vocab_size):
    raise DataError(f"tokenizer {where} has {tok.vocab_size} pieces but vocab_size="
                    f"{cfg.vocab_size}: set --config.vocab_size={tok.vocab_size} to keep it, or "
                    f"delete it (or set --config.tokenizer_path elsewhere) to train a new one")


def get_tokenizer(cfg, corpus, root: str, workdir: str | None) -> tokenizer_lib.Tokenizer:
  """Loads the tokenizer at its path, else trains one (cached per corpus and recipe) and saves it.

  The cache under `<data_dir>/tokenizers` lets a new workdir reuse a tokenizer (and so the
  tokenized corpus) instead of training it again.
  """
  path = cfg.tokenizer_path or (os.path.join(workdir, "tokenizer.model") if workdir
                                       else None)
  if path is None:
    raise DataError("no tokenizer path: pass a workdir or set --config.tokenizer_path")
  if os.path.exists(path):
    try:
      tok = tokenizer_lib.load(path)
    except (OSError, RuntimeError, ValueError) as e:
      raise DataError(f"tokenizer_path={path!r} is not a usable tokenizer ({e}); delete it to "
                      f"train a new one") from None
    check_vocab(tok, cfg, path)
    return tok
  recipe = json.dumps([corpus.key, cfg.vocab_size, cfg.tokenizer_type, cfg.byte_fallback,
                       _TOKENIZER_MIN_CHARS, _TOKENIZER_CHARS_PER_PIECE, 2])
  cached = os.path.join(root, "tokenizers",
                        hashlib.sha256(recipe.encode()).hexdigest()[:16] + ".model")
  if os.path.exists(cached):
    tok = tokenizer_lib.load(cached)
  else:
    tok = _train_tokenizer(cfg, corpus)
    tok.save(cached)
  tok.save(path)
  return tok


# -------------------------------------------------------------------------------- Token cache


@dataclasses.dataclass
class Mixture:
  """Several corpora drawn from by weight (dataset='mix:...'), tokenized by one tokenizer."""

  key: str
  name: str
  weights: list  # normalised to sum 1
  names: list  # each source's dataset string
  corpora: list


def tokenize_corpus(corpus, tok, root: str, workers: int | None = None) -> tuple[dict, str]:
  """Tokenized splits, built once into `<root>/tokens/<hash>` (corpus + tokenizer model): in
  parallel over the units of a FileCorpus, resumably (tokens.py)."""
  key = hashlib.sha256(f"{_TOKEN_CACHE_VERSION}:{corpus.key}:".encode()
                       + hashlib.sha256(tok.fingerprint).digest()).hexdigest()[:16]
  out = os.path.join(root, "tokens", key)
  if isinstance(corpus, corpus_lib.FileCorpus):
    jobs = corpus.jobs()
  else:
    jobs = [tokens_lib.SourceJob(0, "train", corpus.train),
            tokens_lib.SourceJob(1, "validation", corpus.validation)]
  meta = tokens_lib.build(out, jobs, tok, workers=workers or os.cpu_count() or 1,
                          name=corpus.name)
  if meta.get("tokenizer") != tokens_lib.tok_digest(tok):
    raise DataError(f"the token cache {out} of dataset {corpus.name!r} was tokenized with "
                    f"another tokenizer than this run's; delete {out} to tokenize it again")
  return meta, out


# ------------------------------------------------------------------------------------ Packing


def gather_rows(stream, rows, block_size: int, pad_id: int = tokenizer_lib.PAD_ID):
  """Rows of T+1 tokens starting at rows*T, padded past the stream's end.

  stream: [N] token ids (an array or a tokens.TokenStream over shards); rows: [R] row numbers.
  Returns (tokens [R, T+1] int32, valid [R, T+1] bool) where valid marks positions inside the
  stream.
  """
  rows = np.asarray(rows, np.int64)
  if len(rows) and len(stream) and int(rows.max()) * block_size + block_size < len(stream):
    return read_rows(stream, rows * block_size, block_size + 1), np.ones(
        (len(rows), block_size + 1), bool)  # every row inside the stream: slices, no indices
  idx_RT = rows[:, None] * block_size + np.arange(block_size + 1)
  valid_RT = idx_RT < len(stream)
  if len(stream) == 0:
    return np.full(idx_RT.shape, pad_id, np.int32), valid_RT
  clipped_RT = np.minimum(idx_RT, len(stream) - 1)
  if isinstance(stream, tokens_lib.TokenStream):
    tokens_RT = stream.take(clipped_RT).astype(np.int32)
  else:
    tokens_RT = np.asarray(stream[clipped_RT.ravel()], np.int32).reshape(idx_RT.shape)
  return np.where(valid_RT, tokens_RT, pad_id).astype(np.int32), valid_RT


def read_rows(stream, starts_R, length: int) -> np.ndarray:
  """int32 [R, length]: stream[start : start + length] for each start (all inside the stream)."""
  out_RL = np.empty((len(starts_R), length), np.int32)
  if isinstance(stream, tokens_lib.TokenStream):
    return stream.read_rows(out_RL, starts_R)
  for r, a in enumerate(np.asarray(starts_R).tolist()):
    out_RL[r] = stream[a:a + length]
  return out_RL


def segments(inputs_BT, eos_id: int = tokenizer_lib.EOS_ID):
  """(segment_ids_BT, positions_BT) for packed rows: an EOS opens a new segment (ids from 1);
  positions count from 0 at every segment start and at the row start."""
  is_start_BT = inputs_BT == eos_id
  segment_ids_BT = np.cumsum(is_start_BT, axis=-1, dtype=np.int32)
  segment_ids_BT += 1 - is_start_BT[..., :1]
  t_T = np.arange(inputs_BT.shape[-1], dtype=np.int32)
  is_start_BT[..., 0] = True
  last_start_BT = np.maximum.accumulate(np.where(is_start_BT, t_T, np.int32(0)), axis=-1)
  return segment_ids_BT, t_T - last_start_BT


class _TrainBatches:
  """Step number -> this process's batch of that step. Picklable for grain worker processes.

  streams: one tokens.TokenStream per source (one unless a mixture), weights: theirs."""

  def __init__(self, streams, weights, block_size, steps_per_epoch, accum, per_proc,
               process_index, process_count, seed, pack_segments, eos_id=tokenizer_lib.EOS_ID,
               pad_id=tokenizer_lib.PAD_ID):
    self.streams, self.weights = list(streams), np.asarray(weights, np.float64)
    self.T, self.spe = block_size, steps_per_epoch
    self.n_rows_S = [max(0, (len(s) - 1) // block_size) for s in self.streams]
    self.n_rows = self.n_rows_S[0]
    self.A, self.b, self.p, self.P = accum, per_proc, process_index, process_count
    self.seed, self.pack = seed, pack_segments
    self.eos_id, self.pad_id = eos_id, pad_id
    self._perm = {}

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_perm"}

  def __setstate__(self, state):
    self.__dict__.update(state, _perm={})

  def _permutation(self, source: int, epoch: int) -> np.ndarray:
    key = (source, epoch)
    if key not in self._perm:
      if len(self._perm) > 4:
        self._perm.clear()
      seed = [self.seed, epoch] if len(self.streams) == 1 else [self.seed, source, epoch]
      self._perm[key] = np.random.default_rng(seed).permutation(self.n_rows_S[source])
    return self._perm[key]

  def rows(self, step: int) -> np.ndarray:
    """Global row numbers of this process's share of optimizer step `step`, shaped [A*b]
    (of one source; see `slots` for a mixture)."""
    epoch, step_in_epoch = divmod(int(step), self.spe)
    first = step_in_epoch * self.A * self.b * self.P
    return self._permutation(0, epoch)[first + np.arange(self.A * self.b) * self.P + self.p]

  def counts(self, step: int) -> np.ndarray:
    """Rows of each source in the whole step (all processes): G * weight, rounded up or down
    at random (seeded by the step) so that each source's expected share is its weight."""
    G = self.A * self.b * self.P
    quota = G * self.weights
    n = np.floor(quota).astype(np.int64)
    rem = int(G - n.sum())
    if rem:
      frac = quota - n
      extra = np.random.default_rng([self.seed, int(step), 1]).choice(
          len(n), rem, replace=False, p=frac / frac.sum())
      n[extra] += 1
    return n

  def slots(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(source [A*b], row [A*b]) of this process's share of step `step`. One source: rows(step).
    A mixture: the step's G slots go to the sources by `counts`, in an order shuffled by the
    step; source i reads positions step*ceil(G*w_i) + 0, 1, ... of its own sequence of epochs
    (each a permutation of its rows), so a step's rows follow from the step number alone."""
    if len(self.streams) == 1:
      return np.zeros(self.A * self.b, np.int64), self.rows(step)
    G = self.A * self.b * self.P
    n_S = self.counts(step)
    src_G = np.random.default_rng([self.seed, int(step), 2]).permutation(
        np.repeat(np.arange(len(n_S)), n_S))
    row_G = np.empty(G, np.int64)
    for i, n in enumerate(n_S):
      if n == 0:
        continue
      pos = int(step) * math.ceil(G * self.weights[i]) + np.arange(n)
      epoch, at = np.divmod(pos, self.n_rows_S[i])
      row_G[src_G == i] = np.concatenate(
          [self._permutation(i, int(e))[at[epoch == e]] for e in np.unique(epoch)])
    mine = np.arange(self.A * self.b) * self.P + self.p
    return src_G[mine], row_G[mine]

  def __call__(self, step: int) -> dict:
    src, rows = self.slots(step)
    if len(self.streams) == 1:
      tokens, _ = gather_rows(self.streams[0], rows, self.T, self.pad_id)
    else:
      tokens = np.empty((len(rows), self.T + 1), np.int32)
      for i in np.unique(src):
        tokens[src == i] = gather_rows(self.streams[i], rows[src == i], self.T, self.pad_id)[0]
    tokens = tokens.reshape(self.A, self.b, self.T + 1)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}
    if self.pack:
      batch["segment_ids"], batch["positions"] = segments(batch["inputs"], self.eos_id)
    return batch


def eval_rows(n_tokens: int, block_size: int, micro_batch_size: int, cap_tokens: int):
  """The validation rows every evaluation reads: all of them, or, when the split holds more than
  cap_tokens, about cap_tokens / block_size of them (a multiple of micro_batch_size) evenly
  spaced over it, the same every time."""
  n_rows = math.ceil(max(0, n_tokens - 1) / block_size)
  if not cap_tokens or n_rows * block_size <= cap_tokens:
    return np.arange(n_rows)
  k = max(micro_batch_size, cap_tokens // block_size // micro_batch_size * micro_batch_size)
  return np.unique(np.linspace(0, n_rows - 1, min(k, n_rows)).round().astype(np.int64))


@dataclasses.dataclass
class Data:
  """A tokenized corpus and its batch iterators for one process. See `build`."""

  tokenizer: tokenizer_lib.Tokenizer
  train_tokens: np.ndarray  # [N_train] documents joined with EOS (a TokenStream over shards)
  validation_tokens: np.ndarray  # [N_val]
  block_size: int
  micro_batch_size: int  # global, summed over processes
  accum: int
  process_index: int
  process_count: int
  seed: int
  pack_segments: bool
  prefetch: int
  workers: int
  steps_per_epoch: int  # optimizer steps in one pass over the train split
  chars_per_token: float  # validation characters / validation target tokens
  meta: dict  # token/document/char counts per split, and the cache directory
  train_streams: list = dataclasses.field(default_factory=list)  # one per source
  weights: list = dataclasses.field(default_factory=lambda: [1.0])
  source_names: list = dataclasses.field(default_factory=list)
  eval_row_ids: np.ndarray | None = None  # the validation rows evaluations read (None = all)

  @property
  def per_process_batch(self) -> int:
    return self.micro_batch_size // self.process_count

  @property
  def _eval_rows(self) -> np.ndarray:
    if self.eval_row_ids is not None:
      return self.eval_row_ids
    return np.arange(math.ceil((len(self.validation_tokens) - 1) / self.block_size))

  @property
  def num_eval_batches(self) -> int:
    return math.ceil(len(self._eval_rows) / self.micro_batch_size)

  def _batches(self) -> _TrainBatches:
    streams = self.train_streams or [self.train_tokens]
    return _TrainBatches(streams, self.weights, self.block_size, self.steps_per_epoch,
                         self.accum, self.per_process_batch, self.process_index,
                         self.process_count, self.seed, self.pack_segments,
                         self.tokenizer.eos_id, self.tokenizer.pad_id)

  def train_dataset(self) -> grain.IterDataset:
    """Endless optimizer steps, each {inputs, targets[, segment_ids, positions]}: int32 [A, b, T]."""
    ds = grain.MapDataset.range(sys.maxsize).map(self._batches())
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=min(2, self.prefetch),
                                              prefetch_buffer_size=self.prefetch))
    if self.workers > 0:
      from absl import flags  # grain's workers read absl flags: fine outside an absl app too
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.workers, per_worker_buffer_size=max(1, self.prefetch)))
    return ds

  def train_iter(self) -> grain.DatasetIterator:
    """A checkpointable iterator from step 0 (get_state/set_state, grain.checkpoint args)."""
    return iter(self.train_dataset())

  def train_rows(self, step: int) -> np.ndarray:
    """Global row numbers this process reads at optimizer `step` (for tests and debugging); of
    a mixture, (source, row) pairs [A*b, 2]."""
    b = self._batches()
    if len(b.streams) == 1:
      return b.rows(step)
    return np.stack(b.slots(step), axis=1)

  def source_shares(self, step: int) -> dict:
    """A mixture's share of each source in optimizer step `step` (all processes); {} for one."""
    if len(self.weights) < 2:
      return {}
    n = self._batches().counts(step)
    return {name: float(k / n.sum()) for name, k in zip(self.source_names, n)}

  def eval_batches(self, max_batches: int | None = None):
    """This process's share of the evaluation rows (the whole validation split, or its fixed
    sample: eval_tokens), once, in order.

    Yields {inputs, targets[, segment_ids, positions]} int32 [b, T] and weights float32 [b, T]
    (0 on padding past the split's end). Every process yields the same number of batches.
    """
    T, b = self.block_size, self.per_process_batch
    ids = self._eval_rows
    past = math.ceil(len(self.validation_tokens) / T) + 1  # a row number wholly past the end
    n = self.num_eval_batches if max_batches is None else min(max_batches, self.num_eval_batches)
    for k in range(n):
      pos = k * self.micro_batch_size + self.process_index * b + np.arange(b)
      rows = np.where(pos < len(ids), ids[np.minimum(pos, len(ids) - 1)], past)
      tokens, valid = gather_rows(self.validation_tokens, rows, T, self.tokenizer.pad_id)
      batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
               "weights": valid[:, 1:].astype(np.float32)}
      if self.pack_segments:
        seg, pos = segments(batch["inputs"], self.tokenizer.eos_id)
        batch["segment_ids"] = np.where(valid[:, :-1], seg, 0).astype(np.int32)
        batch["positions"] = np.where(valid[:, :-1], pos, 0).astype(np.int32)
      yield batch

  def eval_note(self) -> str:
    """What evaluations read, for the log."""
    n_all = math.ceil((len(self.validation_tokens) - 1) / self.block_size)
    n = len(self._eval_rows)
    if n == n_all:
      return f"evaluation: the whole validation split ({n:,} rows of {self.block_size} tokens)"
    return (f"evaluation: a fixed sample of {n:,} of the validation split's {n_all:,} rows "
            f"({n * self.block_size:,} of {len(self.validation_tokens):,} tokens, evenly spaced, "
            f"the same at every evaluation; eval_tokens sets the cap, 0 = whole split)")

  def encode(self, text):
    return self.tokenizer.encode(text)

  def decode(self, ids):
    return self.tokenizer.decode(ids)


def _stream(directory: str, meta: dict, split: str):
  """A split as a TokenStream; a single shard as its np.memmap (train_tokens of one file)."""
  return tokens_lib.TokenStream.of_split(directory, meta, split)


def _plain(stream):
  """What Data.train_tokens / validation_tokens hold: one shard's memmap, or the TokenStream."""
  if len(stream.paths) == 1:
    return stream.maps[0]
  return stream if len(stream.paths) else np.zeros(0, stream.dtype)


def _tokenized(cfg, corpus, tok, root, what: str):
  meta, directory = tokenize_corpus(corpus, tok, root, cfg.tokenize_workers)
  for split in ("train", "validation"):
    if meta[split]["documents"] == 0:
      raise DataError(f"{what}: the {split} split has no documents" + (
          "; add documents, or set --config.validation / --config.validation_fraction"
          if split == "validation" else "; add documents"))
  meta["cache_dir"] = directory
  return meta, directory


def build(cfg, workdir: str | None, process_index: int | None = None,
          process_count: int | None = None, tokenizer=None) -> Data:
  """Corpus -> tokenizer -> tokenized cache -> Data. Raises DataError before any training.

  tokenizer: use this one (e.g. an imported model's, from its checkpoint) instead of loading or
  training the one at tokenizer_path / <workdir>/tokenizer.model.
  """
  if process_index is None or process_count is None:
    import jax  # only when the caller leaves the sharding to the runtime
    process_index, process_count = jax.process_index(), jax.process_count()
  mb, accum, T = cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.block_size
  if mb % process_count:
    raise DataError(f"micro_batch_size={mb} is not divisible by the {process_count} processes: "
                    f"set --config.micro_batch_size to a multiple of {process_count}")
  root = config_lib.cache_dir(cfg)
  if cfg.dataset.startswith("mix:"):
    from llm_jax import sources  # pylint: disable=import-outside-toplevel
    mix = sources.parse_mixture(cfg.dataset)
    parts = [load_corpus(cfg, root, ds) for _, ds in mix]
    corpus = Mixture(key="mix:" + ",".join(f"{w!r}*{c.key}" for (w, _), c in zip(mix, parts)),
                     name=cfg.dataset, weights=[w for w, _ in mix], names=[d for _, d in mix],
                     corpora=parts)
  else:
    corpus = load_corpus(cfg, root)
  for c in corpus.corpora if isinstance(corpus, Mixture) else [corpus]:
    if isinstance(c, corpus_lib.Corpus):
      for split in ("train", "validation"):
        if len(getattr(c, split)) == 0:
          raise DataError(f"dataset={c.name!r}: the {split} split has no documents")
  if tokenizer is not None:
    check_vocab(tokenizer, cfg, "from the checkpoint")
  tok = tokenizer or get_tokenizer(cfg, corpus, root, workdir)
  if isinstance(corpus, Mixture):
    metas = [_tokenized(cfg, c, tok, root, f"dataset={cfg.dataset!r}: source {n!r}")
             for c, n in zip(corpus.corpora, corpus.names)]
    weights, names = corpus.weights, corpus.names
  else:
    metas = [_tokenized(cfg, corpus, tok, root, f"dataset={cfg.dataset!r}")]
    weights, names = [1.0], [cfg.dataset]
  trains = [_stream(d, m, "train") for m, d in metas]
  val = tokens_lib.TokenStream(
      [p for m, d in metas for p in _stream(d, m, "validation").paths],
      [s["tokens"] for m, _ in metas for s in m["validation"]["shards"]], metas[0][0]["dtype"])
  meta = metas[0][0] if len(metas) == 1 else {
      "sources": [m for m, _ in metas], "dtype": metas[0][0]["dtype"],
      **{s: {k: sum(m[s][k] for m, _ in metas) for k in ("tokens", "documents", "chars")}
         for s in ("train", "validation")}}
  n_rows_S = [max(0, (len(t) - 1) // T) for t in trains]
  G = mb * accum
  if len(trains) == 1:
    steps_per_epoch = n_rows_S[0] // G
  else:
    for n, w, name in zip(n_rows_S, weights, names):
      if w > 0 and n == 0:
        raise DataError(f"dataset={cfg.dataset!r}: source {name!r} has no rows of "
                        f"block_size+1={T + 1} tokens (it is empty or too small); give it "
                        f"text, or weight 0, or leave it out")
    steps_per_epoch = sum(n for n, w in zip(n_rows_S, weights) if w > 0) // G
  if steps_per_epoch == 0:
    raise DataError(
        f"dataset={cfg.dataset!r} is too small for one optimizer step: its train split has "
        f"{sum(map(len, trains))} tokens = {sum(n_rows_S)} rows of block_size+1={T + 1}, but a "
        f"step needs micro_batch_size x gradient_accumulation_steps = {G} rows; lower "
        f"--config.micro_batch_size, --config.gradient_accumulation_steps or "
        f"--config.block_size, or add text")
  if len(val) < 2:
    raise DataError(f"dataset={cfg.dataset!r}: the validation split has {len(val)} token(s), too "
                    f"few to evaluate; add validation text (--config.validation or "
                    f"--config.validation_fraction)")
  ids = eval_rows(len(val), T, mb, cfg.eval_tokens)
  every_train = tokens_lib.TokenStream([p for t in trains for p in t.paths],
                                       [n for t in trains for n in np.diff(t.offsets)],
                                       metas[0][0]["dtype"])
  d = Data(tokenizer=tok, train_tokens=_plain(every_train),
           validation_tokens=_plain(val), block_size=T,
           micro_batch_size=mb, accum=accum, process_index=process_index,
           process_count=process_count, seed=cfg.seed, pack_segments=cfg.pack_segments,
           prefetch=cfg.prefetch, workers=cfg.data_workers, steps_per_epoch=steps_per_epoch,
           chars_per_token=meta["validation"]["chars"] / (len(val) - 1), meta=meta,
           train_streams=trains, weights=list(weights), source_names=list(names),
           eval_row_ids=ids)
  if process_index == 0 and len(ids) * T < len(val) - 1:
    print(d.eval_note(), flush=True)
  return d
