"""Records from the files datasets ship as, streamed: one reader for corpora, task files and chats.

    for where, record in records.iter_records("/data/hellaswag.parquet"):
        ...   # where: "/data/hellaswag.parquet:row 17" (or "file.jsonl:18"), record: a dict

Formats, told by the name:
  .jsonl / .ndjson (also .gz, .zst)  one JSON object per line (blank lines skipped)
  .json (also .gz, .zst)             a JSON array of objects, an object holding one such array
                                     (`{"data": [...]}`), or JSON lines (what `Dataset.to_json`
                                     writes, whatever the extension)
  .parquet                           read record batch by record batch (pyarrow)
  .arrow                             an Arrow IPC stream or file (what `save_to_disk` writes)
  a directory                        `datasets`' save_to_disk of a Dataset (state.json and its
                                     data-*.arrow files), or of a DatasetDict (dataset_dict.json,
                                     one folder per split: `split` names one)

Nothing is read whole unless the format needs it (a .json array): JSON lines stream line by line
through the decompressor, Parquet and Arrow by record batch, so memory is bounded by one batch.
`iter_texts` is the fast path for a corpus: one column's strings, a batch at a time, never built
into dicts. Every problem raises RecordsError (a UserError) naming the file, the line or row, and
the fix: a missing field lists the fields there are, a corrupt or truncated compressed file names
the byte offset where reading stopped.
"""

import gzip
import io
import json
import os
from typing import Iterator

from llm_jax import errors

BATCH_ROWS = 1024  # rows per record batch read from Parquet / Arrow, lines per JSON-lines batch
_COMPRESSED = (".gz", ".zst")


class RecordsError(errors.UserError):
  """A records file cannot be read as asked; the message names the file, the place and the fix."""


def _strip_compression(path: str) -> tuple[str, str | None]:
  for ext in _COMPRESSED:
    if path.endswith(ext):
      return path[:-len(ext)], ext
  return path, None


def kind(path: str) -> str | None:
  """'jsonl', 'json', 'parquet', 'arrow', 'hf_dir' or None (not a records file: plain text)."""
  if os.path.isdir(path):
    if any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
      return "hf_dir"
    return None
  name, _ = _strip_compression(path.lower())
  for ext, k in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"),
                 (".parquet", "parquet"), (".arrow", "arrow")):
    if name.endswith(ext):
      return k
  return None


def _open_text(path: str):
  """A text stream of the file, decompressed on the fly; returns (stream, raw file object)."""
  raw = open(path, "rb")  # pylint: disable=consider-using-with  (closed by the caller)
  _, comp = _strip_compression(path.lower())
  if comp == ".gz":
    stream = gzip.GzipFile(fileobj=raw)
  elif comp == ".zst":
    stream = io.BufferedReader(_ZstdReader(raw), buffer_size=1 << 16)
  else:
    stream = raw
  return io.TextIOWrapper(stream, encoding="utf-8", errors="strict"), raw


class _ZstdReader(io.RawIOBase):
  """A .zst file's bytes, frame after frame; raw EOF inside a frame is an EOFError (zstandard's
  stream_reader ends quietly there, which would pass a truncated file off as a shorter one)."""

  def __init__(self, raw):
    import zstandard  # pylint: disable=import-outside-toplevel  (only for .zst)
    self._zstd, self._raw, self._obj, self._out, self._pos = zstandard, raw, None, b"", 0

  def readable(self):
    return True

  def readinto(self, buffer):
    while self._pos == len(self._out):
      if self._obj is not None and self._obj.eof:
        rest, self._obj = self._obj.unused_data, None
      else:
        rest = b""
      chunk = rest or self._raw.read(1 << 16)
      if not chunk:
        if self._obj is not None:
          raise EOFError("the file ends inside a zstd frame")
        return 0
      if self._obj is None:
        self._obj = self._zstd.ZstdDecompressor().decompressobj()
      self._out, self._pos = self._obj.decompress(chunk), 0
    n = min(len(buffer), len(self._out) - self._pos)
    buffer[:n] = self._out[self._pos:self._pos + n]
    self._pos += n
    return n


def _read_failed(path: str, raw, e: Exception) -> RecordsError:
  at = ""
  try:
    at = f" at byte {raw.tell():,} of {os.path.getsize(path):,}"
  except (OSError, ValueError):
    pass
  if isinstance(e, UnicodeDecodeError):
    return RecordsError(f"{path}: not UTF-8 text{at} ({e.reason}); re-encode it as UTF-8")
  return RecordsError(f"{path}: the file is corrupt or truncated{at} ({type(e).__name__}: "
                      f"{str(e) or 'unexpected end of data'}); download or write it again")


def _lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number, line) of a (compressed) text file; corruption is a RecordsError."""
  import zlib  # pylint: disable=import-outside-toplevel
  errors_ = [EOFError, OSError, zlib.error, UnicodeDecodeError]
  if path.lower().endswith(".zst"):
    import zstandard  # pylint: disable=import-outside-toplevel
    errors_.append(zstandard.ZstdError)
  try:
    text, raw = _open_text(path)
  except OSError as e:
    raise RecordsError(f"{path}: cannot be read ({e.strerror or e})") from None
  with raw, text:
    lineno = 0
    while True:
      try:
        line = text.readline()
      except tuple(errors_) as e:
        raise _read_failed(path, raw, e) from None
      if not line:
        return
      lineno += 1
      yield lineno, line


def _parse_line(path: str, lineno: int, line: str) -> dict:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise RecordsError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line of a JSON-lines "
                       f"file must be one JSON object") from None
  if not isinstance(record, dict):
    raise RecordsError(f"{path}:{lineno}: a JSON {type(record).__name__}, not an object; each "
                       f"line must be one JSON object with named fields")
  return record


def _json_records(path: str) -> Iterator[tuple[str, dict]]:
  lines = _lines(path)
  first = next(((n, line) for n, line in lines if line.strip()), None)
  if first is None:
    return
  n, line = first
  if not line.lstrip().startswith("["):
    try:  # JSON lines under a .json name (Dataset.to_json's default)
      record = json.loads(line)
    except json.JSONDecodeError:
      record = None
    if isinstance(record, dict):
      yield f"{path}:{n}", record
      for n, line in lines:
        if line.strip():
          yield f"{path}:{n}", _parse_line(path, n, line)
      return
  text = line + "".join(rest for _, rest in lines)  # one JSON value: read whole
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise RecordsError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); give a JSON array "
                       f"of objects, or JSON lines") from None
  if isinstance(value, dict):
    lists = [k for k, v in value.items() if isinstance(v, list)]
    if len(lists) != 1:
      raise RecordsError(f"{path}: a JSON object with {len(lists)} list fields "
                         f"({', '.join(map(repr, lists)) or 'none'}); give a JSON array of "
                         f"records, or an object with exactly one list of them")
    value = value[lists[0]]
  if not isinstance(value, list):
    raise RecordsError(f"{path}: a JSON {type(value).__name__}; give a JSON array of objects")
  for i, record in enumerate(value):
    if not isinstance(record, dict):
      raise RecordsError(f"{path}: item {i} is a JSON {type(record).__name__}, not an object")
    yield f"{path}:item {i}", record


def _arrow_files(path: str, split: str | None) -> list[str]:
  """The data-*.arrow files of a save_to_disk directory, in order (a DatasetDict's split)."""
  if os.path.exists(os.path.join(path, "dataset_dict.json")):
    with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as f:
      splits = json.load(f).get("splits", [])
    if split is None and len(splits) == 1:
      split = splits[0]
    if split not in splits:
      raise RecordsError(f"{path}: a DatasetDict with splits {', '.join(splits)}; name one "
                         f"(e.g. {path}/{splits[0] if splits else 'train'})"
                         + (f" (there is no split {split!r})" if split else ""))
    path = os.path.join(path, split)
  state = os.path.join(path, "state.json")
  try:
    with open(state, encoding="utf-8") as f:
      names = [d["filename"] for d in json.load(f)["_data_files"]]
  except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
    raise RecordsError(f"{state}: not a datasets save_to_disk state file ({type(e).__name__}); "
                       f"save the dataset again with Dataset.save_to_disk") from None
  return [os.path.join(path, n) for n in names]


def _arrow_batches(path: str, columns):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  try:
    source = pa.memory_map(path)
    try:
      reader = pa.ipc.open_stream(source)
      batches = iter(reader)
    except pa.ArrowInvalid:
      reader = pa.ipc.open_file(pa.memory_map(path))
      batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    names = reader.schema.names
    _check_columns(path, names, columns)
    for batch in batches:
      yield batch.select(columns) if columns else batch
  except (pa.ArrowInvalid, OSError) as e:
    raise RecordsError(f"{path}: not a readable Arrow file ({str(e).splitlines()[0]}); save the "
                       f"dataset again with Dataset.save_to_disk") from None


def _parquet_batches(path: str, columns, row_groups=None):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    pf = pq.ParquetFile(path)
    _check_columns(path, pf.schema_arrow.names, columns)
    yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=columns, row_groups=row_groups)
  except (pa.ArrowInvalid, OSError) as e:
    raise RecordsError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}); "
                       f"download or write it again") from None


def _check_columns(path: str, names, columns) -> None:
  missing = [c for c in columns or () if c not in names]
  if missing:
    raise RecordsError(f"{path}: no column {missing[0]!r} (its columns: {', '.join(names)}); name "
                       f"the column that holds it")


def _table_batches(path: str, columns, split, row_groups=None):
  """(file, record batch) of a Parquet file (its `row_groups`: all when None), an Arrow file or
  a save_to_disk directory."""
  k = kind(path)
  files = _arrow_files(path, split) if k == "hf_dir" else [path]
  for f in files:
    for batch in (_parquet_batches(f, columns, row_groups) if k == "parquet"
                  else _arrow_batches(f, columns)):
      yield f, batch


def data_files(path: str, split: str | None = None) -> list[str]:
  """The files holding `path`'s records: its data-*.arrow files for a save_to_disk directory,
  else [path]."""
  return _arrow_files(path, split) if kind(path) == "hf_dir" else [path]


def iter_records(path: str, columns=None, split: str | None = None
                 ) -> Iterator[tuple[str, dict]]:
  """(where, record) for every record of `path`, in order. `columns`: the fields needed (Parquet
  and Arrow read only those, and a missing one is an error naming the columns there are); JSON
  records are yielded whole and their fields checked by the caller. `split`: of a DatasetDict."""
  k = kind(path)
  if k is None:
    raise RecordsError(f"{path}: not a records file (.jsonl, .json, .parquet, .arrow, optionally "
                       f".gz/.zst, or a datasets save_to_disk directory)")
  if k == "jsonl":
    for n, line in _lines(path):
      if line.strip():
        yield f"{path}:{n}", _parse_line(path, n, line)
  elif k == "json":
    yield from _json_records(path)
  else:
    row = 0
    for f, batch in _table_batches(path, columns, split):
      for record in batch.to_pylist():
        yield f"{f}:row {row}", record
        row += 1


def read_records(path: str, columns=None, split: str | None = None) -> list[tuple[str, dict]]:
  """iter_records as a list: for files that are small by nature (task files, conversations)."""
  return list(iter_records(path, columns, split))


def iter_texts(path: str, key: str, split: str | None = None,
               batch_rows: int = BATCH_ROWS, row_groups=None) -> Iterator[list[str]]:
  """Lists of the strings under `key`, batch by batch (a corpus: never held whole). A record
  without the field, or whose value is not a string, is a RecordsError naming it. row_groups:
  of a Parquet file, those only (a share of one file for one worker)."""
  k = kind(path)
  if k in ("jsonl", "json"):
    batch = []
    for where, record in iter_records(path):
      batch.append(field(record, key, where, str, "set --config.text_key to the field that "
                         "holds the text"))
      if len(batch) == batch_rows:
        yield batch
        batch = []
    if batch:
      yield batch
    return
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  for f, b in _table_batches(path, [key], split, row_groups):
    column = b.column(0)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
      raise RecordsError(f"{f}: column {key!r} holds {column.type}, not strings; set "
                         f"--config.text_key to the column that holds the text")
    texts = column.to_pylist()
    if None in texts:
      raise RecordsError(f"{f}: column {key!r} has a null at row {texts.index(None)}; drop or "
                         f"fill the empty rows")
    yield texts


def field(record: dict, key: str, where: str, kind_=None, fix: str = ""):
  """record[key], or a RecordsError at `where` naming the fields the record has (and `fix`).
  `kind_`: the type (or tuple of types) the value must have."""
  if key not in record:
    have = ", ".join(map(repr, record)) or "none"
    raise RecordsError(f"{where}: no field {key!r} (has: {have})" + (f"; {fix}" if fix else ""))
  value = record[key]
  if kind_ is not None and not isinstance(value, kind_):
    want = "/".join(t.__name__ for t in (kind_ if isinstance(kind_, tuple) else (kind_,)))
    raise RecordsError(f"{where}: field {key!r} is a {type(value).__name__}, not a {want}"
                       + (f"; {fix}" if fix else ""))
  return value
