"""Tokenized corpora on disk: shards built in parallel and resumably, read back as one stream.

A cache directory `<data_dir>/tokens/<key>` (key: the corpus and the tokenizer) holds, for work
unit i of the corpus (sources.py):

  train-0000i.bin, validation-0000i.bin     the unit's documents of that split, each followed by
                                            EOS (uint16 when the vocabulary fits, else uint32)
  train-0000i.docs, validation-0000i.docs   int64: where each document ends (exclusive) in it
  meta.json                                 dtype, counts, the shards of each split in order

A split is the concatenation of its shards in unit order: `TokenStream` reads it by a global token
index, so the packed rows (data.py) run over shard boundaries as over one file.

Building. Units go to `tokenize_workers` processes (spawned: the parent may hold jax's threads),
each reading its unit a record batch at a time and writing its two shards as it goes: a worker
holds about sources.BATCH_CHARS of text and its tokens, whatever the corpus size. Every file is
written under a temporary name and renamed when whole (files.py), and `unit-0000i.json` last, so a
unit is finished exactly when that file exists. The shards collect in `<key>.partial/`; when every
unit is finished meta.json is written and the directory renamed to `<key>`. An interrupted build
(a signal, a kill, a full disk, a bad file) keeps the finished units, and the same command
continues from them. One process builds a cache at a time (files.build_lock): others sharing the
directory, on this host or another one over shared storage, wait and then read what it built.
Small corpora (under POOL_MIN_BYTES) are tokenized in this process, as are tfds corpora.
"""

import concurrent.futures
import contextlib
import glob
import json
import multiprocessing
import os
import time
import warnings

import numpy as np

from llm_jax import files
from llm_jax import sources
from llm_jax import tokenizer as tokenizer_lib

VERSION = 2
SPLITS = ("train", "validation")
POOL_MIN_BYTES = 32 << 20  # below this a corpus is tokenized in this process (no start-up cost)


def dtype_for(tok) -> np.dtype:
  return np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)


# ------------------------------------------------------------------------------------- Jobs


class UnitJob:
  """Tokenizes work unit `index` of a file corpus (picklable: runs in a worker process)."""

  def __init__(self, index, unit, text_split, text_key, fraction):
    self.index, self.unit = index, unit
    self.text_split, self.text_key, self.fraction = text_split, text_key, fraction

  @property
  def size(self) -> int:
    return self.unit.size

  def batches(self, stats):
    """(train docs, validation docs) a batch at a time."""
    first = 0
    for docs in sources.unit_docs(self.unit, self.text_split, self.text_key, stats):
      yield sources.split_docs(self.index, self.unit, first, docs, self.fraction)
      first += len(docs)


class SourceJob:
  """Tokenizes a whole split of a tfds corpus (corpus.TextSource), in this process."""

  size = 0

  def __init__(self, index, split, source):
    self.index, self.split, self.source = index, split, source

  def batches(self, stats):
    del stats
    for texts in self.source.chunks(1024):
      yield (texts, []) if self.split == "train" else ([], texts)


# ---------------------------------------------------------------------------------- Writing


def _name(split: str, index: int, ext: str) -> str:
  return f"{split}-{index:05d}.{ext}"


def run_job(job, tok, out_dir: str, dtype, threads: int) -> dict:
  """Writes job's shards into out_dir (each whole or not at all), then its unit-*.json."""
  stats = sources.ReadStats()
  counts = {s: {"tokens": 0, "documents": 0, "chars": 0} for s in SPLITS}
  with contextlib.ExitStack() as stack:
    out = {}
    for s in SPLITS:
      out[s] = tuple(stack.enter_context(files.writing(
          os.path.join(out_dir, _name(s, job.index, ext)), what="the token cache", sync=False))
                     for ext in ("bin", "docs"))
    for pair in job.batches(stats):
      for s, texts in zip(SPLITS, pair):
        if not texts:
          continue
        ids = tok.encode(texts, add_bos=tok.add_bos, num_threads=threads)
        lengths = np.fromiter((len(x) + 1 for x in ids), np.int64, len(ids))
        flat = np.full(int(lengths.sum()), tok.eos_id, dtype)
        ends = np.cumsum(lengths)  # EOS stays at each document's last slot
        for x, end in zip(ids, ends):
          flat[end - 1 - len(x):end - 1] = x
        c = counts[s]
        out[s][0].write(flat.data)  # not tofile: a full disk raises OSError from a file write
        out[s][1].write((ends + c["tokens"]).data)
        c["tokens"] += flat.size
        c["documents"] += len(texts)
        c["chars"] += sum(map(len, texts))
  result = {"index": job.index, "invalid_utf8": stats.invalid_utf8, **counts,
            "path": job.unit.parts[0].path if hasattr(job, "unit") else None}
  files.write_text(os.path.join(out_dir, f"unit-{job.index:05d}.json"), json.dumps(result),
                   what="the token cache")
  return result


_WORKER_TOK = None


def _init_worker(item):
  global _WORKER_TOK  # pylint: disable=global-statement
  _WORKER_TOK = tokenizer_lib.from_item(item)


def _worker(job, out_dir, dtype_name):
  return run_job(job, _WORKER_TOK, out_dir, np.dtype(dtype_name), 1)


def _run_pool(jobs, tok, out_dir, dtype, workers):
  ctx = multiprocessing.get_context("spawn")
  pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                initargs=(tok.to_item(),))
  ok = False
  try:
    futures = [pool.submit(_worker, j, out_dir, dtype.name) for j in jobs]
    for f in concurrent.futures.as_completed(futures):
      f.result()  # a worker's error (a bad file, a full disk) stops the build here
    ok = True
  finally:
    if not ok:  # stop the others now, and remove what they were writing
      for p in list(getattr(pool, "_processes", {}).values()):
        p.terminate()
    pool.shutdown(wait=True, cancel_futures=True)
    if not ok:
      for stale in glob.glob(os.path.join(out_dir, files.TMP_PREFIX + "*")):
        with contextlib.suppress(OSError):
          os.unlink(stale)


def build(out: str, jobs: list, tok, *, workers: int, name: str) -> dict:
  """The cache at `out` (meta.json), built from `jobs` when not there yet (see the module doc)."""
  meta_path = os.path.join(out, "meta.json")
  if not os.path.exists(meta_path):
    parent, key = os.path.split(os.path.abspath(out))
    with files.build_lock(parent, f".{key}.lock"):
      if not os.path.exists(meta_path):
        _build(out, jobs, tok, workers, name)
  with open(meta_path, encoding="utf-8") as f:
    return json.load(f)


def _build(out, jobs, tok, workers, name):
  partial = out + ".partial"
  os.makedirs(partial, exist_ok=True)
  for stale in glob.glob(os.path.join(partial, files.TMP_PREFIX + "*")):
    os.unlink(stale)  # a killed worker's unfinished file
  done = {}
  for p in glob.glob(os.path.join(partial, "unit-*.json")):
    with open(p, encoding="utf-8") as f:
      r = json.load(f)
    done[r["index"]] = r
  todo = [j for j in jobs if j.index not in done]
  dtype = dtype_for(tok)
  total = sum(j.size for j in todo)
  pool = workers > 1 and len(todo) > 1 and total >= POOL_MIN_BYTES
  resumed = f", resuming: {len(done)} of {len(jobs)} units already done" if done else ""
  print(f"tokenizing {name} (once) into {out}: {len(jobs)} unit(s), "
        f"{workers if pool else 1} process(es){resumed} ...", flush=True)
  t0 = time.perf_counter()
  if pool:
    _run_pool(todo, tok, partial, dtype, min(workers, len(todo)))
  else:
    for j in todo:
      run_job(j, tok, partial, dtype, max(1, workers))
  results = {}
  for j in jobs:
    with open(os.path.join(partial, f"unit-{j.index:05d}.json"), encoding="utf-8") as f:
      results[j.index] = json.load(f)
  meta = {"version": VERSION, "dtype": dtype.name, "corpus": name, "units": len(jobs),
          "tokenizer": tok_digest(tok)}
  for s in SPLITS:
    shards = [{"file": _name(s, i, "bin"), "tokens": r[s]["tokens"],
               "documents": r[s]["documents"]}
              for i, r in sorted(results.items()) if r[s]["tokens"]]
    meta[s] = {k: sum(r[s][k] for r in results.values()) for k in ("tokens", "documents", "chars")}
    meta[s]["shards"] = shards
  bad = [r for r in results.values() if r["invalid_utf8"]]
  if bad:
    warnings.warn(f"{sum(r['invalid_utf8'] for r in bad)} invalid UTF-8 byte(s) in {len(bad)} "
                  f"file(s) (first: {bad[0]['path']}) were replaced by U+FFFD; re-encode them as "
                  f"UTF-8 to keep those characters", UnicodeWarning, stacklevel=4)
  os.sync()  # the shards were written without fsync each: all of them reach the disk here
  files.write_text(os.path.join(partial, "meta.json"), json.dumps(meta), what="the token cache")
  os.rename(partial, out)
  dt = time.perf_counter() - t0
  print(f"tokenized {name}: {meta['train']['tokens'] + meta['validation']['tokens']:,} tokens "
        f"in {dt:.1f} s", flush=True)


def tok_digest(tok) -> str:
  import hashlib  # pylint: disable=import-outside-toplevel
  return hashlib.sha256(tok.fingerprint).hexdigest()[:16]


# ---------------------------------------------------------------------------------- Reading


class TokenStream:
  """The shards of one split as one token sequence: len, take(index array), np.asarray.
  Picklable (grain's worker processes): the memory maps open lazily in each process."""

  def __init__(self, paths, sizes, dtype):
    self.paths = list(paths)
    self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
    self.dtype = np.dtype(dtype)
    self._maps = None

  @classmethod
  def of_split(cls, directory: str, meta: dict, split: str) -> "TokenStream":
    shards = meta[split]["shards"]
    return cls([os.path.join(directory, s["file"]) for s in shards],
               [s["tokens"] for s in shards], meta["dtype"])

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_maps"}

  def __setstate__(self, state):
    self.__dict__.update(state, _maps=None)

  def __len__(self) -> int:
    return int(self.offsets[-1])

  @property
  def maps(self) -> list:
    if self._maps is None:
      self._maps = [np.memmap(p, dtype=self.dtype, mode="r", shape=(int(n),))
                    for p, n in zip(self.paths, np.diff(self.offsets))]
    return self._maps

  def take(self, idx_RL) -> np.ndarray:
    """Tokens at idx_RL ([R, L] int64, each row ascending, all in [0, len)): contiguous rows."""
    idx_RL = np.asarray(idx_RL, np.int64)
    maps = self.maps
    if len(maps) == 1:
      return maps[0][idx_RL.ravel()].reshape(idx_RL.shape)
    out = np.empty(idx_RL.shape, self.dtype)
    first = np.searchsorted(self.offsets, idx_RL[:, 0], "right") - 1
    last = np.searchsorted(self.offsets, idx_RL[:, -1], "right") - 1
    inside = first == last
    order = np.argsort(first, kind="stable")
    for s in np.unique(first[inside]):  # the rows inside one shard: one gather per shard
      sel = order[np.searchsorted(first[order], s, "left"):np.searchsorted(first[order], s, "right")]
      sel = sel[inside[sel]]
      out[sel] = maps[s][(idx_RL[sel] - self.offsets[s]).ravel()].reshape(len(sel), -1)
    for r in np.flatnonzero(~inside):  # across a boundary: at most one row per boundary
      sh = np.searchsorted(self.offsets, idx_RL[r], "right") - 1
      for s in np.unique(sh):
        m = sh == s
        out[r, m] = maps[s][idx_RL[r, m] - self.offsets[s]]
    return out

  def read_rows(self, out_RL: np.ndarray, starts_R) -> np.ndarray:
    """Fills out_RL[r] with tokens starts_R[r] .. starts_R[r] + L - 1 (all inside the stream),
    copying slices: the training loader's fast path (no index arrays)."""
    L = out_RL.shape[1]
    maps, offsets = self.maps, self.offsets
    starts = np.asarray(starts_R, np.int64)
    shard = np.searchsorted(offsets, starts, "right") - 1
    for r, (a, sh) in enumerate(zip(starts.tolist(), shard.tolist())):
      lo = a - int(offsets[sh])
      n = min(L, int(offsets[sh + 1]) - a)
      out_RL[r, :n] = maps[sh][lo:lo + n]
      while n < L:  # the row runs on into the next shard(s)
        sh += 1
        k = min(L - n, int(offsets[sh + 1] - offsets[sh]))
        out_RL[r, n:n + k] = maps[sh][:k]
        n += k
    return out_RL

  def __getitem__(self, key):
    if isinstance(key, slice):
      idx = np.arange(len(self))[key]
      return self.take(idx[None]).reshape(-1) if len(idx) else np.zeros(0, self.dtype)
    raise TypeError("TokenStream: index with a slice, or use take()")

  def __array__(self, dtype=None, copy=None):
    del copy
    arr = (np.concatenate([np.asarray(m) for m in self.maps]) if self.maps
           else np.zeros(0, self.dtype))
    return arr.astype(dtype) if dtype is not None else arr

  def document_ends(self) -> np.ndarray:
    """int64 global end offsets of every document, in order (from the shards' .docs files)."""
    parts = [np.fromfile(p[:-len(".bin")] + ".docs", np.int64) + off
             for p, off in zip(self.paths, self.offsets)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
