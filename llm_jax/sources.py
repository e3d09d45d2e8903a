"""Local corpora read as streams: files and globs, their formats, work units, the validation rule.

`text:<dir, file or glob>` names the files; each file's format is told by its name (records.py):
  .txt and any other name    plain text; cfg.text_split: a `file` is one document (read whole),
                             a blank-line separated `paragraph` or a `line` (both streamed)
  .jsonl/.ndjson[.gz|.zst]   one JSON object per line, the document under cfg.text_key
  .json[.gz|.zst]            a JSON array of objects (read whole) or JSON lines
  .parquet                   the string column cfg.text_key, record batch by record batch
  .arrow, a save_to_disk dir the same column of `datasets`' Arrow files
A directory stands for its files of those formats (recursively), or for itself when it is a
`save_to_disk` directory.

Work units. The files are cut into units of about UNIT_BYTES (by byte range for uncompressed
JSON lines and line-split text, by row groups for Parquet; other files are one unit each). The
cut depends only on the files, never on the number of workers, so which document is where, and
which is held out, is the same however many processes tokenize them (tokens.py).

Validation. With cfg.validation naming files, those are the validation split. Else document j of
unit k is held out when frac(f/2 + (k + j) * f) < f (f = validation_fraction): evenly spaced,
exactly f of each unit's documents up to one, decided from the two numbers alone (nothing needs
the whole corpus in memory), and document 0 of unit 0 is always held out. A corpus of one plain
text file read as one document (text_split=file) is cut instead: its last f, at a line break.

No module here imports tensorflow_datasets or jax: tokenizing worker processes import this one.
"""

import codecs
import dataclasses
import glob
import json
import os
import pathlib
import re
from typing import Iterator

import numpy as np

from llm_jax import errors
from llm_jax import records

UNIT_BYTES = 16 << 20
BATCH_CHARS = 4 << 20  # text a reader hands on at once (a worker's memory is a few of these)
BATCH_DOCS = 1024
SNIFF_BYTES = 1 << 16  # read of every plain text file before the build, to refuse binary files
# A file with NUL bytes, or with more than this share of its bytes invalid UTF-8 (and more than
# MAX_INVALID_UTF8_BYTES of them), is refused as not text; a few bad bytes become U+FFFD with
# one warning.
MAX_INVALID_UTF8_SHARE = 0.01
MAX_INVALID_UTF8_BYTES = 16
TEXT_SPLITS = ("file", "paragraph", "line")
_GLOB_CHARS = re.compile(r"[*?\[]")
_LISTED = (".txt", ".jsonl", ".ndjson", ".jsonl.gz", ".jsonl.zst", ".ndjson.gz", ".ndjson.zst",
           ".parquet", ".arrow")


class DataError(errors.UserError):
  """The dataset or tokenizer input cannot be used; the message names the file/field and fix."""


class _Utf8Errors:
  """A codecs error handler that replaces invalid UTF-8 by U+FFFD and counts the bad bytes."""

  def __init__(self):
    self.count = 0

  def __call__(self, err):
    self.count += err.end - err.start
    return "\ufffd", err.end


UTF8_ERRORS = _Utf8Errors()
codecs.register_error("llm_jax_count", UTF8_ERRORS)


# ------------------------------------------------------------------------------------- Files


def resolve_files(pattern: str, what: str) -> list[str]:
  """Files (and save_to_disk directories) named by a directory, a file or a glob; DataError
  starting with `what` when there are none."""
  if _GLOB_CHARS.search(pattern):
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(f) or records.kind(f) == "hf_dir")
    if not files:
      raise DataError(f"{what}: the glob matches no files; fix the pattern (quote "
                      f"it in the shell so it reaches llm_jax unexpanded)")
    return files
  path = os.path.expanduser(pattern)
  if os.path.isdir(path):
    if records.kind(path) == "hf_dir":
      return [path]
    files = sorted(str(p) for p in pathlib.Path(path).rglob("*")
                   if p.is_file() and p.name.lower().endswith(_LISTED))
    if not files:
      raise DataError(f"{what}: the directory has no {', '.join(_LISTED)} files; put the "
                      f"text there or give a glob such as '{path}/**/*.md'")
    return files
  if os.path.isfile(path):
    return [path]
  raise DataError(f"{what}: no such file or directory; give an existing directory, "
                  f"file or glob")


def file_kind(path: str) -> str:
  """'text' for plain text, else records.kind: 'jsonl', 'json', 'parquet', 'arrow', 'hf_dir'."""
  return records.kind(path) or "text"


def stamp(files) -> list:
  """What identifies the files' content for the caches: path, size and mtime of each."""
  out = []
  for f in files:
    for g in records.data_files(f) if file_kind(f) == "hf_dir" else [f]:
      st = os.stat(g)
      out.append((os.path.realpath(g), st.st_size, st.st_mtime_ns))
  return out


def sniff_text(files) -> None:
  """DataError naming the worst plain text files that are not UTF-8 text (NUL bytes, or too many
  invalid bytes in their first SNIFF_BYTES), before anything is tokenized."""
  not_text = []
  for path in files:
    if file_kind(path) != "text":
      continue
    try:
      with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    except OSError as e:
      raise DataError(f"{path}: cannot be read ({e.strerror or e}); fix its permissions or "
                      f"leave it out of the dataset glob") from None
    invalid = _invalid_bytes(head)
    if b"\x00" in head or _too_invalid(invalid, len(head)):
      not_text.append((invalid / max(len(head), 1), b"\x00" in head, path))
  if not_text:
    raise not_text_error(not_text)


def _invalid_bytes(data: bytes) -> int:
  before = UTF8_ERRORS.count
  codecs.getincrementaldecoder("utf-8")(errors="llm_jax_count").decode(data, final=False)
  return UTF8_ERRORS.count - before


def _too_invalid(invalid: int, size: int) -> bool:
  return invalid > max(MAX_INVALID_UTF8_SHARE * size, MAX_INVALID_UTF8_BYTES)


def not_text_error(not_text) -> DataError:
  """not_text: (share invalid, has NUL, path) of each file found not to be text."""
  not_text = sorted(not_text, reverse=True)
  worst = ", ".join(f"{p} ({share:.0%} invalid UTF-8{', NUL bytes' if nul else ''})"
                    for share, nul, p in not_text[:3])
  more = f" and {len(not_text) - 3} more" if len(not_text) > 3 else ""
  return DataError(
      f"{len(not_text)} file(s) are not UTF-8 text (NUL bytes, or more than "
      f"{MAX_INVALID_UTF8_SHARE:.0%} of their bytes invalid UTF-8): {worst}{more}. Leave binary "
      f"files out of the dataset (a narrower glob, e.g. '*.txt'), and re-encode text in "
      f"another encoding as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


# ------------------------------------------------------------------------------------- Units


@dataclasses.dataclass(frozen=True)
class Part:
  """A file or a share of one: bytes [start, stop) of a JSON-lines or line-split text file (a
  record belongs to the part its first byte is in), row groups [start, stop) of a Parquet file,
  or the whole file (stop = -1). size: its bytes (about, for row groups)."""

  path: str
  kind: str
  start: int = 0
  stop: int = -1
  size: int = 0


@dataclasses.dataclass(frozen=True)
class Unit:
  """What one worker tokenizes at once: consecutive parts, about UNIT_BYTES in all.

  role: 'train' or 'validation' (every document), 'rule' (the validation rule), 'cut' (a single
  document: its last `fraction` is validation)."""

  parts: tuple
  role: str

  @property
  def size(self) -> int:
    return sum(p.size for p in self.parts)


def _compressed(path: str) -> bool:
  return path.lower().endswith((".gz", ".zst"))


def plan_units(files, val_files, text_split: str) -> list[Unit]:
  """The work units of a corpus, in order (see the module doc)."""
  cut = (len(files) == 1 and not val_files and text_split == "file"
         and file_kind(files[0]) == "text")
  units = []
  for paths, role in ((files, "cut" if cut else "train" if val_files else "rule"),
                      (val_files, "validation")):
    group = []
    for part in (p for path in paths for p in _parts(path, text_split)):
      if group and sum(g.size for g in group) + part.size > UNIT_BYTES:
        units.append(Unit(tuple(group), role))
        group = []
      group.append(part)
    if group:
      units.append(Unit(tuple(group), role))
  return units


def _parts(path: str, text_split: str) -> list[Part]:
  k = file_kind(path)
  if k == "hf_dir":
    return [Part(f, "arrow", size=_size(f)) for f in records.data_files(path)]
  if k == "parquet":
    return _parquet_parts(path)
  size = _size(path)
  if (k == "jsonl" or (k == "text" and text_split == "line")) and not _compressed(path):
    n = -(-size // UNIT_BYTES)
    if n > 1:
      return [Part(path, k, i * UNIT_BYTES, min(size, (i + 1) * UNIT_BYTES),
                   min(size, (i + 1) * UNIT_BYTES) - i * UNIT_BYTES) for i in range(n)]
  return [Part(path, k, size=size)]


def _size(path: str) -> int:
  try:
    return os.path.getsize(path)
  except OSError as e:
    raise DataError(f"{path}: cannot be read ({e.strerror or e}); fix its permissions or leave "
                    f"it out of the dataset glob") from None


def _parquet_parts(path: str) -> list[Part]:
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    meta = pq.ParquetFile(path).metadata
  except (pa.ArrowInvalid, OSError) as e:
    raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}); "
                    f"download or write it again") from None
  parts, first, size = [], 0, 0
  for g in range(meta.num_row_groups):
    size += meta.row_group(g).total_byte_size
    if size >= UNIT_BYTES or g == meta.num_row_groups - 1:
      parts.append(Part(path, "parquet", first, g + 1, size))
      first, size = g + 1, 0
  if len(parts) <= 1:
    return [Part(path, "parquet", size=_size(path))]
  return parts


# ---------------------------------------------------------------------------------- Reading


def is_validation(unit_index: int, doc_indices, fraction: float) -> np.ndarray:
  """The validation rule (module doc) for documents `doc_indices` of unit `unit_index`."""
  j = np.asarray(doc_indices, np.float64)
  return np.modf(fraction / 2 + (unit_index + j) * fraction)[0] < fraction


def cut_single(doc: str, fraction: float) -> tuple[str, str]:
  """Splits one document at the line break nearest the (1 - fraction) point."""
  target = int(len(doc) * (1 - fraction))
  before, after = doc.rfind("\n", 0, target), doc.find("\n", target)
  cands = [c for c in (before, after) if 0 < c < len(doc) - 1]
  cut = min(cands, key=lambda c: abs(c - target)) if cands else target
  return doc[:cut].strip(), doc[cut:].strip()


@dataclasses.dataclass
class ReadStats:
  invalid_utf8: int = 0  # bytes replaced by U+FFFD
  size: int = 0  # bytes read


def unit_docs(unit: Unit, text_split: str, text_key: str,
              stats: ReadStats | None = None) -> Iterator[list[str]]:
  """The documents of `unit`, in order, a batch (about BATCH_CHARS) at a time. Documents of
  only whitespace are dropped; a whole file without any is an error. stats: gets the invalid
  UTF-8 bytes replaced (plain text)."""
  stats = stats if stats is not None else ReadStats()
  batch, chars = [], 0
  for part in unit.parts:
    if part.kind == "text":
      docs = _text_docs(part, text_split, stats)
    elif part.kind == "jsonl" and part.stop >= 0:
      docs = _jsonl_range(part, text_key)
    else:
      docs = (t for b in _record_texts(part, text_key) for t in b)
    n = 0
    for d in docs:
      if not d.strip():
        continue
      n += 1
      batch.append(d)
      chars += len(d)
      if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
        yield batch
        batch, chars = [], 0
    if n == 0 and part.stop < 0:
      raise DataError(f"{part.path} is empty (no text in it); delete it or leave it out of the "
                      f"dataset glob")
  if batch:
    yield batch


def _record_texts(unit: Part, text_key: str):
  rows = None
  if unit.kind == "parquet" and unit.stop >= 0:
    rows = range(unit.start, unit.stop)
  try:
    yield from records.iter_texts(unit.path, text_key, row_groups=rows)
  except records.RecordsError as e:
    raise DataError(str(e).replace("name the column that holds it",
                                   "set --config.text_key to the column that holds the text")
                    .replace(f"no field {text_key!r}", f"no field text_key={text_key!r}")
                    .replace(f"no column {text_key!r}", f"no column text_key={text_key!r}")
                    ) from None


def _open(path: str):
  try:
    return open(path, "rb")  # pylint: disable=consider-using-with
  except OSError as e:
    raise DataError(f"{path}: cannot be read ({e.strerror or e}); fix its permissions or leave "
                    f"it out of the dataset glob") from None


def _byte_lines(f, start: int, stop: int) -> Iterator[bytes]:
  """The lines whose first byte is in [start, stop) of the binary file `f`."""
  if start > 0:
    f.seek(start - 1)
    f.readline()  # the rest of the line that began before `start` belongs to the unit before
  pos = f.tell()
  while pos < stop:
    line = f.readline()
    if not line:
      return
    pos += len(line)
    yield line


def _check_text(path: str, invalid: int, size: int, nul: bool) -> None:
  if nul or _too_invalid(invalid, size):
    raise not_text_error([(invalid / max(size, 1), nul, path)])


def _text_docs(unit: Part, text_split: str, stats: ReadStats) -> Iterator[str]:
  decoder = codecs.getincrementaldecoder("utf-8")(errors="llm_jax_count")
  before = UTF8_ERRORS.count
  with _open(unit.path) as f:
    if text_split == "file":
      data = f.read()
      text = decoder.decode(data, final=True).removeprefix("\ufeff").replace("\r\n", "\n")
      stats.invalid_utf8 += UTF8_ERRORS.count - before
      stats.size += len(data)
      _check_text(unit.path, UTF8_ERRORS.count - before, len(data), "\x00" in text)
      yield text.strip()  # a "cut" unit's one document is cut by split_docs
      return
    stop = unit.stop if unit.stop >= 0 else float("inf")
    para, size, nul = [], 0, False
    for raw in _byte_lines(f, unit.start, stop):
      size += len(raw)
      line = decoder.decode(raw)
      if size == len(raw) and unit.start == 0:
        line = line.removeprefix("\ufeff")
      nul = nul or "\x00" in line
      line = line.rstrip("\n").removesuffix("\r")
      if text_split == "line":
        if line.strip():
          yield line.rstrip()
      elif line.strip(" \t"):
        para.append(line)
      elif para:
        yield "\n".join(para).strip()
        para = []
    if para:
      yield "\n".join(para).strip()
    line = decoder.decode(b"", final=True)
    stats.invalid_utf8 += UTF8_ERRORS.count - before
    stats.size += size
    _check_text(unit.path, UTF8_ERRORS.count - before, size, nul)


def _line_number(path: str, offset: int) -> int:
  """The 1-based number of the line at byte `offset` (only to name a bad record)."""
  n = 1
  with open(path, "rb") as f:
    while offset > 0:
      chunk = f.read(min(offset, 1 << 20))
      if not chunk:
        break
      n += chunk.count(b"\n")
      offset -= len(chunk)
  return n


def _jsonl_range(unit: Part, text_key: str) -> Iterator[str]:
  fix = "set --config.text_key to the field that holds the text"
  with _open(unit.path) as f:
    pos = None
    for raw in _byte_lines(f, unit.start, unit.stop):
      if pos is None:
        pos = f.tell() - len(raw)
      at = pos
      pos += len(raw)
      if not raw.strip():
        continue
      try:
        record = json.loads(raw)
      except UnicodeDecodeError as e:
        raise DataError(f"{unit.path}:{_line_number(unit.path, at)}: not UTF-8 text "
                        f"({e.reason}); re-encode it as UTF-8") from None
      except json.JSONDecodeError as e:
        raise DataError(f"{unit.path}:{_line_number(unit.path, at)}: not valid JSON ({e.msg}); "
                        f"each line of a JSON-lines file must be one JSON object") from None
      if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
        where = f"{unit.path}:{_line_number(unit.path, at)}"
        if not isinstance(record, dict):
          raise DataError(f"{where}: a JSON {type(record).__name__}, not an object; each line "
                          f"must be one JSON object with named fields")
        try:
          records.field(record, text_key, where, str, fix)
        except records.RecordsError as e:
          msg = str(e).replace(f"no field {text_key!r}", f"no field text_key={text_key!r}")
          raise DataError(msg) from None
      yield record[text_key]


def split_docs(unit_index: int, unit: Unit, first_doc: int, docs: list[str], fraction: float):
  """(train docs, validation docs) of a batch of `unit`'s documents first_doc, first_doc+1, ..."""
  if unit.role == "train":
    return docs, []
  if unit.role == "validation":
    return [], docs
  if unit.role == "cut":
    train, val = cut_single(docs[0], fraction)
    if not train or not val:
      raise DataError(f"{unit.parts[0].path} is one document too short to hold out validation_fraction="
                      f"{fraction}; add text or set --config.validation to a glob of files")
    return [train], [val]
  val = is_validation(unit_index, np.arange(first_doc, first_doc + len(docs)), fraction)
  return ([d for d, v in zip(docs, val) if not v], [d for d, v in zip(docs, val) if v])


# --------------------------------------------------------------------------------- Mixtures

_MIX_ITEM = re.compile(r"\s*([^*,\s]+)\s*\*\s*")


def parse_mixture(spec: str) -> list[tuple[float, str]]:
  """`mix:W1*DATASET1,W2*DATASET2,...` -> [(weight normalised to sum 1, dataset)]. A comma
  starts a new item only where a weight and `*` follow it, so globs may hold commas."""
  out = []
  for item in re.split(r",(?=\s*[0-9.eE+-]+\s*\*)", spec[len("mix:"):]):
    m = _MIX_ITEM.match(item)
    if not m or not item[m.end():].strip():
      raise DataError(f"dataset={spec!r}: {item.strip()!r} is not WEIGHT*DATASET; write "
                      f"mix:0.7*text:/data/web/*.parquet,0.3*shakespeare")
    try:
      w = float(m.group(1))
    except ValueError:
      w = float("nan")
    if not np.isfinite(w) or w < 0:
      raise DataError(f"dataset={spec!r}: weight {m.group(1)!r} of {item[m.end():].strip()!r} "
                      f"is not a number >= 0")
    ds = item[m.end():].strip()
    if ds.startswith("mix:"):
      raise DataError(f"dataset={spec!r}: a mixture inside a mixture; list its sources at the "
                      f"top level")
    out.append((w, ds))
  total = sum(w for w, _ in out)
  if total <= 0:
    raise DataError(f"dataset={spec!r}: the weights sum to {total:g}; give at least one "
                    f"source a weight > 0")
  return [(w / total, ds) for w, ds in out]
