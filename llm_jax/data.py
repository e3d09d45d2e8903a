"""Data for training and evaluation: tokenizer, tokenized-corpus cache, packing, grain pipeline.

`build(cfg, workdir)` gets the corpus (see corpus.py), gets or trains the tokenizer, tokenizes
each split once into a cache keyed by corpus and tokenizer, and returns a `Data`.

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
checkpoints through orbax (grain.checkpoint.CheckpointSave/Restore) and resumes exactly.
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
from llm_jax.corpus import DataError  # noqa: F401  (re-exported: data.DataError)

_TOKEN_CACHE_VERSION = 1
# Characters sampled from the train split to train the tokenizer: enough for a stable vocabulary,
# few enough that unigram training takes seconds (~3 s of CPU at vocab 2048 on 500k chars).
_TOKENIZER_MIN_CHARS = 500_000
_TOKENIZER_CHARS_PER_PIECE = 256  # (recipe 2: the chat markers are user-defined symbols)


def load_corpus(cfg, root: str) -> corpus_lib.Corpus:
  ds = cfg.dataset
  if ds == "shakespeare":
    return corpus_lib.shakespeare_corpus(root)
  if ds.startswith("text:"):
    return corpus_lib.text_corpus(
        root, ds[len("text:"):], validation=cfg.validation, fraction=cfg.validation_fraction,
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


def _train_tokenizer(cfg, corpus) -> tokenizer_lib.Tokenizer:
  budget = max(_TOKENIZER_MIN_CHARS, _TOKENIZER_CHARS_PER_PIECE * cfg.vocab_size)
  sample = tokenizer_sample(corpus.train, budget)
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


def _write_stream(source: corpus_lib.TextSource, tok, path: str, dtype) -> tuple[int, int, int]:
  """Writes source's documents, each followed by EOS, to `path`. Returns (tokens, docs, chars)."""
  n_tokens = n_docs = n_chars = 0
  with open(path, "wb") as f:
    for texts in source.chunks(1024):
      ids = tok.encode(texts, add_bos=tok.add_bos, num_threads=os.cpu_count() or 1)
      lengths = np.fromiter((len(x) + 1 for x in ids), np.int64, len(ids))
      flat = np.full(int(lengths.sum()), tok.eos_id, dtype)
      ends = np.cumsum(lengths)  # EOS stays at each document's last slot
      for x, end in zip(ids, ends):
        flat[end - 1 - len(x):end - 1] = x
      f.write(flat.data)  # not tofile: a full disk raises OSError(ENOSPC) from a file write
      n_tokens += flat.size
      n_docs += len(texts)
      n_chars += sum(map(len, texts))
  return n_tokens, n_docs, n_chars


def tokenize_corpus(corpus, tok, root: str) -> tuple[dict, str]:
  """Tokenized splits, built once into `<root>/tokens/<hash>` (corpus + tokenizer model)."""
  key = hashlib.sha256(f"{_TOKEN_CACHE_VERSION}:{corpus.key}:".encode()
                       + hashlib.sha256(tok.fingerprint).digest()).hexdigest()[:16]
  out = os.path.join(root, "tokens", key)
  if not os.path.exists(os.path.join(out, "meta.json")):
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    meta = {"dtype": np.dtype(dtype).name, "corpus": corpus.name}
    # Built whole or not at all (llm_jax/files.py): a signal, a kill or a full disk leaves no
    # cache a later run would trust; another process finishing the same cache first wins.
    with files.building_dir(out, "the token cache", keep_existing=True) as tmp:
      for split in ("train", "validation"):
        n_tokens, n_docs, n_chars = _write_stream(getattr(corpus, split), tok,
                                                  os.path.join(tmp, f"{split}.bin"), dtype)
        meta[split] = {"tokens": n_tokens, "documents": n_docs, "chars": n_chars}
      with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
  with open(os.path.join(out, "meta.json")) as f:
    return json.load(f), out


def _open_stream(directory: str, split: str, meta: dict) -> np.ndarray:
  if meta[split]["tokens"] == 0:
    return np.zeros(0, meta["dtype"])
  return np.memmap(os.path.join(directory, f"{split}.bin"), dtype=meta["dtype"], mode="r")


# ------------------------------------------------------------------------------------ Packing


def gather_rows(stream, rows, block_size: int, pad_id: int = tokenizer_lib.PAD_ID):
  """Rows of T+1 tokens starting at rows*T, padded past the stream's end.

  stream: [N] token ids; rows: [R] row numbers. Returns (tokens [R, T+1] int32,
  valid [R, T+1] bool) where valid marks positions inside the stream.
  """
  idx_RT = np.asarray(rows, np.int64)[:, None] * block_size + np.arange(block_size + 1)
  valid_RT = idx_RT < len(stream)
  if len(stream) == 0:
    return np.full(idx_RT.shape, pad_id, np.int32), valid_RT
  tokens_RT = np.asarray(stream[np.minimum(idx_RT, len(stream) - 1).ravel()], np.int32)
  return np.where(valid_RT, tokens_RT.reshape(idx_RT.shape), pad_id).astype(np.int32), valid_RT


def segments(inputs_BT, eos_id: int = tokenizer_lib.EOS_ID):
  """(segment_ids_BT, positions_BT) for packed rows: an EOS opens a new segment (ids from 1);
  positions count from 0 at every segment start and at the row start."""
  is_start_BT = inputs_BT == eos_id
  segment_ids_BT = 1 + np.cumsum(is_start_BT, axis=-1) - is_start_BT[..., :1]
  t_T = np.arange(inputs_BT.shape[-1])
  is_start_BT = is_start_BT | (t_T == 0)
  last_start_BT = np.maximum.accumulate(np.where(is_start_BT, t_T, 0), axis=-1)
  return segment_ids_BT.astype(np.int32), (t_T - last_start_BT).astype(np.int32)


class _TrainBatches:
  """Step number -> this process's batch of that step. Picklable for grain worker processes."""

  def __init__(self, path, dtype, n_tokens, block_size, n_rows, steps_per_epoch, accum, per_proc,
               process_index, process_count, seed, pack_segments, eos_id=tokenizer_lib.EOS_ID,
               pad_id=tokenizer_lib.PAD_ID):
    self.path, self.dtype, self.n_tokens = path, dtype, n_tokens
    self.T, self.n_rows, self.spe = block_size, n_rows, steps_per_epoch
    self.A, self.b, self.p, self.P = accum, per_proc, process_index, process_count
    self.seed, self.pack = seed, pack_segments
    self.eos_id, self.pad_id = eos_id, pad_id
    self._stream, self._perm = None, (None, None)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_stream", "_perm")}

  def __setstate__(self, state):
    self.__dict__.update(state, _stream=None, _perm=(None, None))

  def rows(self, step: int) -> np.ndarray:
    """Global row numbers of this process's share of optimizer step `step`, shaped [A*b]."""
    epoch, step_in_epoch = divmod(int(step), self.spe)
    if self._perm[0] != epoch:
      self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_rows))
    first = step_in_epoch * self.A * self.b * self.P
    return self._perm[1][first + np.arange(self.A * self.b) * self.P + self.p]

  def __call__(self, step: int) -> dict:
    if self._stream is None:
      self._stream = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
    tokens, _ = gather_rows(self._stream, self.rows(step), self.T, self.pad_id)
    tokens = tokens.reshape(self.A, self.b, self.T + 1)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}
    if self.pack:
      batch["segment_ids"], batch["positions"] = segments(batch["inputs"], self.eos_id)
    return batch


@dataclasses.dataclass
class Data:
  """A tokenized corpus and its batch iterators for one process. See `build`."""

  tokenizer: tokenizer_lib.Tokenizer
  train_tokens: np.ndarray  # [N_train] documents joined with EOS
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
  _train_path: str = ""

  @property
  def per_process_batch(self) -> int:
    return self.micro_batch_size // self.process_count

  @property
  def num_eval_batches(self) -> int:
    n_rows = math.ceil((len(self.validation_tokens) - 1) / self.block_size)
    return math.ceil(n_rows / self.micro_batch_size)

  def _batches(self) -> _TrainBatches:
    n_rows = (len(self.train_tokens) - 1) // self.block_size
    return _TrainBatches(self._train_path, self.train_tokens.dtype.name, len(self.train_tokens),
                         self.block_size, n_rows, self.steps_per_epoch, self.accum,
                         self.per_process_batch, self.process_index, self.process_count,
                         self.seed, self.pack_segments, self.tokenizer.eos_id,
                         self.tokenizer.pad_id)

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
    """Global row numbers this process reads at optimizer `step` (for tests and debugging)."""
    return self._batches().rows(step)

  def eval_batches(self, max_batches: int | None = None):
    """This process's share of the whole validation split, once, in order.

    Yields {inputs, targets[, segment_ids, positions]} int32 [b, T] and weights float32 [b, T]
    (0 on padding past the split's end). Every process yields the same number of batches.
    """
    T, b = self.block_size, self.per_process_batch
    n = self.num_eval_batches if max_batches is None else min(max_batches, self.num_eval_batches)
    for k in range(n):
      rows = k * self.micro_batch_size + self.process_index * b + np.arange(b)
      tokens, valid = gather_rows(self.validation_tokens, rows, T, self.tokenizer.pad_id)
      batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
               "weights": valid[:, 1:].astype(np.float32)}
      if self.pack_segments:
        seg, pos = segments(batch["inputs"], self.tokenizer.eos_id)
        batch["segment_ids"] = np.where(valid[:, :-1], seg, 0).astype(np.int32)
        batch["positions"] = np.where(valid[:, :-1], pos, 0).astype(np.int32)
      yield batch

  def encode(self, text):
    return self.tokenizer.encode(text)

  def decode(self, ids):
    return self.tokenizer.decode(ids)


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
  corpus = load_corpus(cfg, root)
  for split in ("train", "validation"):
    if len(getattr(corpus, split)) == 0:
      raise DataError(f"dataset={cfg.dataset!r}: the {split} split has no documents")
  if tokenizer is not None:
    check_vocab(tokenizer, cfg, "from the checkpoint")
  tok = tokenizer or get_tokenizer(cfg, corpus, root, workdir)
  meta, directory = tokenize_corpus(corpus, tok, root)
  meta["cache_dir"] = directory
  train = _open_stream(directory, "train", meta)
  val = _open_stream(directory, "validation", meta)
  n_rows = max(0, (len(train) - 1) // T)
  steps_per_epoch = n_rows // (mb * accum)
  if steps_per_epoch == 0:
    raise DataError(
        f"dataset={cfg.dataset!r} is too small for one optimizer step: its train split has "
        f"{len(train)} tokens = {n_rows} rows of block_size+1={T + 1}, but a step needs "
        f"micro_batch_size x gradient_accumulation_steps = {mb * accum} rows; lower "
        f"--config.micro_batch_size, --config.gradient_accumulation_steps or "
        f"--config.block_size, or add text")
  if len(val) < 2:
    raise DataError(f"dataset={cfg.dataset!r}: the validation split has {len(val)} token(s), too "
                    f"few to evaluate; add validation text (--config.validation or "
                    f"--config.validation_fraction)")
  return Data(tokenizer=tok, train_tokens=train, validation_tokens=val, block_size=T,
              micro_batch_size=mb, accum=accum, process_index=process_index,
              process_count=process_count, seed=cfg.seed, pack_segments=cfg.pack_segments,
              prefetch=cfg.prefetch, workers=cfg.data_workers, steps_per_epoch=steps_per_epoch,
              chars_per_token=meta["validation"]["chars"] / (len(val) - 1), meta=meta,
              _train_path=os.path.join(directory, "train.bin"))
