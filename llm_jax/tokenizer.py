"""Tokenizers: llm_jax's own SentencePiece models (train, save, load) and the tokenizers of
Hugging Face models (a `tokenizer.json` through the `tokenizers` library, or a sentencepiece
`tokenizer.model`), behind one interface.

Every tokenizer has `kind`, `vocab_size`, `pad_id` / `unk_id` / `bos_id` / `eos_id` (`eos_ids`:
every id that ends a generation), `add_bos` (documents start with BOS), `encode` / `decode` (single or
batched; decode drops control ids), `to_item()` (the checkpoint's JSON `tokenizer` item) and
`fingerprint` (bytes that identify it, for caches). `from_item` / `load` / `save` handle any kind.

Our own models have fixed special ids (pad 0, unk 1, bos 2, eos 3) so every model and data cache
agrees on them. Training uses identity normalization, keeps every space, tab and newline and adds
no dummy prefix, so with byte_fallback `decode(encode(text)) == text` for any text, including
characters never seen in training (they become UTF-8 byte pieces). A Hugging Face model's special
ids come from its generation_config.json, config.json and tokenizer_config.json.
"""

import base64
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from llm_jax import errors

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# The chat template's markers (chat.CHATML): user-defined symbols of every tokenizer trained here,
# so they are single tokens that text never splits differently (ids 4 and 5).
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>")
MODEL_TYPES = ("unigram", "bpe")
N_BYTE_PIECES = 256
# Sentences longer than this (bytes) are cut before training: sentencepiece skips longer ones.
MAX_SENTENCE_BYTES = 1 << 14


class Tokenizer:
  """A loaded SentencePiece model: llm_jax's own (fixed special ids) or a Hugging Face model's.

  special: None for our own models; else {"bos", "eos" (a list), "pad", "unk"} ids (None where
  the model has none) from the Hugging Face model's files, and `add_bos` whether it starts
  documents with BOS. hf_config: the model's tokenizer_config.json, written back on export.
  """

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes, special: dict | None = None, add_bos: bool = False,
               hf_config: dict | None = None):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self._special, self.add_bos, self.hf_config = special, bool(add_bos), hf_config
    if special is None:
      ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
      if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
        raise errors.UserError(f"tokenizer has special ids pad/unk/bos/eos={ids}, expected "
                               f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}: retrain it with llm_jax "
                               f"(delete the .model file and run again)")
      self._special = {"bos": BOS_ID, "eos": [EOS_ID], "pad": PAD_ID, "unk": UNK_ID}
    _check_special(self._special, self.vocab_size)

  @property
  def is_own(self) -> bool:
    """Trained by llm_jax (fixed special ids), not a Hugging Face model's."""
    return self.hf_config is None and self._special == {"bos": BOS_ID, "eos": [EOS_ID],
                                                        "pad": PAD_ID, "unk": UNK_ID}

  @property
  def model_proto(self) -> bytes:
    return self._proto

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  pad_id = property(lambda self: self._special["pad"])
  unk_id = property(lambda self: self._special["unk"])
  bos_id = property(lambda self: self._special["bos"])
  eos_id = property(lambda self: self._special["eos"][0])
  eos_ids = property(lambda self: list(self._special["eos"]))

  @property
  def byte_fallback(self) -> bool:
    return self._sp.piece_to_id("<0x00>") != self._sp.unk_id()

  @property
  def fingerprint(self) -> bytes:
    return self._proto if self.is_own else _item_bytes(self.to_item())

  def encode(self, text: str | Sequence[str], *, add_bos: bool = False, add_eos: bool = False,
             num_threads: int = -1) -> list[int] | list[list[int]]:
    """Token ids of one string, or a list of id lists for a list of strings (threaded)."""
    ids = self._sp.encode(text if isinstance(text, str) else list(text), num_threads=num_threads)
    return _add_specials(ids, isinstance(text, str), self.bos_id if add_bos else None,
                         self.eos_id if add_eos else None)

  def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """(ids, starts): encode(text) and the character offset in `text` where each token starts
    (a byte piece of a multi-byte character starts where the character does)."""
    pieces = self._sp.encode(text, return_type="proto").pieces
    char_at = np.zeros(len(text.encode("utf-8")) + 1, np.int64)  # byte offset -> char index
    pos = 0
    for i, ch in enumerate(text):
      n = len(ch.encode("utf-8"))
      char_at[pos:pos + n] = i
      pos += n
    char_at[pos] = len(text)
    return [p.id for p in pieces], [int(char_at[min(p.begin, pos)]) for p in pieces]

  def decode(self, ids) -> str | list[str]:
    """Text of one id sequence, or a list of texts for a batch ([B, T] array or list of lists).

    Control ids (pad, bos, eos) decode to nothing; ids outside the vocabulary raise ValueError.
    """
    return _decode(ids, self.vocab_size, lambda row: self._sp.decode(row))

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)

  def to_item(self) -> dict:
    item = {"kind": self.kind, "model": base64.b64encode(self._proto).decode()}
    if not self.is_own:
      item.update(special=self._special, add_bos=self.add_bos, hf_config=self.hf_config)
    return item

  def save(self, path: str) -> None:
    """Writes the model atomically: our own as a .model file, a Hugging Face one as its item."""
    save_bytes(path, self._proto if self.is_own else _item_bytes(self.to_item()))


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (GPT-2's byte-level BPE, Llama 3's and Qwen2's tiktoken-style
  BPE, ...) through the `tokenizers` library. `special` and `add_bos` as for `Tokenizer`."""

  kind = "tokenizers"

  def __init__(self, tokenizer_json: str, special: dict, add_bos: bool = False,
               hf_config: dict | None = None):
    import tokenizers  # late: only Hugging Face models need it
    self._json = tokenizer_json
    self._tk = tokenizers.Tokenizer.from_str(tokenizer_json)
    self._special, self.add_bos, self.hf_config = dict(special), bool(add_bos), hf_config
    self._vocab_size = max(self._tk.get_vocab(with_added_tokens=True).values()) + 1
    _check_special(self._special, self.vocab_size)

  is_own = False
  vocab_size = property(lambda self: self._vocab_size)
  pad_id = property(lambda self: self._special["pad"])
  unk_id = property(lambda self: self._special["unk"])
  bos_id = property(lambda self: self._special["bos"])
  eos_id = property(lambda self: self._special["eos"][0])
  eos_ids = property(lambda self: list(self._special["eos"]))
  byte_fallback = True  # byte-level BPE (or its byte_fallback) covers any text
  tokenizer_json = property(lambda self: self._json)

  @property
  def fingerprint(self) -> bytes:
    return _item_bytes(self.to_item())

  def encode(self, text: str | Sequence[str], *, add_bos: bool = False, add_eos: bool = False,
             num_threads: int = -1) -> list[int] | list[list[int]]:
    """Token ids without the tokenizer's own special tokens; add_bos / add_eos add ours."""
    del num_threads  # the tokenizers library parallelises batches itself
    if isinstance(text, str):
      ids = self._tk.encode(text, add_special_tokens=False).ids
    else:
      ids = [e.ids for e in self._tk.encode_batch(list(text), add_special_tokens=False)]
    return _add_specials(ids, isinstance(text, str), self.bos_id if add_bos else None,
                         self.eos_id if add_eos else None)

  def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """As `Tokenizer.encode_offsets`."""
    enc = self._tk.encode(text, add_special_tokens=False)
    return list(enc.ids), [int(a) for a, _ in enc.offsets]

  def decode(self, ids) -> str | list[str]:
    """As `Tokenizer.decode`: special tokens decode to nothing."""
    return _decode(ids, self.vocab_size,
                   lambda row: self._tk.decode(row, skip_special_tokens=True))

  def id_to_piece(self, i: int) -> str:
    return self._tk.id_to_token(int(i))

  def piece_to_id(self, piece: str) -> int:
    return self._tk.token_to_id(piece)

  def to_item(self) -> dict:
    return {"kind": self.kind, "tokenizer_json": self._json, "special": self._special,
            "add_bos": self.add_bos, "hf_config": self.hf_config}

  def save(self, path: str) -> None:
    save_bytes(path, _item_bytes(self.to_item()))


def _check_special(special: dict, vocab_size: int) -> None:
  for name in ("bos", "pad", "unk"):
    special.setdefault(name, None)
  ids = [special[n] for n in ("bos", "pad", "unk") if special[n] is not None] + special["eos"]
  if not special["eos"]:
    raise errors.UserError(
        "the tokenizer has no EOS id: set eos_token_id in generation_config.json")
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise errors.UserError(f"special token id {bad[0]} is outside the tokenizer's vocabulary "
                           f"[0, {vocab_size}): check bos/eos/pad_token_id in the model's files")


def _add_specials(ids, single: bool, bos, eos):
  if bos is None and eos is None:
    return ids
  wrap = lambda row: ([bos] if bos is not None else []) + list(row) + (
      [eos] if eos is not None else [])
  return wrap(ids) if single else [wrap(row) for row in ids]


def _decode(ids, vocab_size: int, decode_row):
  if isinstance(ids, (list, tuple)) and ids and np.ndim(ids[0]) == 1:  # ragged batch
    return [_decode(row, vocab_size, decode_row) for row in ids]
  arr = np.asarray(ids)
  if arr.ndim == 2:
    return [_decode(row, vocab_size, decode_row) for row in arr]
  if arr.ndim != 1:
    raise ValueError(f"decode takes ids shaped [T] or [B, T], not {arr.shape}")
  arr = arr.astype(np.int64)
  if (arr < 0).any():
    raise ValueError(f"id {int(arr[arr < 0][0])} is negative: token ids are >= 0")
  # Ids past the tokenizer's vocabulary name no piece: a model whose embedding is larger than its
  # tokenizer (Qwen2 pads it; the sampler masks only past the embedding) can generate them, and
  # they decode to nothing, as the tokenizers library (and so transformers) decodes them.
  return decode_row(arr[arr < vocab_size].tolist())


def _item_bytes(item: dict) -> bytes:
  return json.dumps(item, sort_keys=True).encode()


def from_item(item: dict):
  """The tokenizer a checkpoint's `tokenizer` item describes (items without "kind" are our own
  sentencepiece models, as checkpoints before Hugging Face support wrote them)."""
  kind = item.get("kind", "sentencepiece")
  if kind == "sentencepiece":
    return Tokenizer(base64.b64decode(item["model"]), item.get("special"),
                     item.get("add_bos", False), item.get("hf_config"))
  if kind == "tokenizers":
    return HFTokenizer(item["tokenizer_json"], item["special"], item.get("add_bos", False),
                       item.get("hf_config"))
  raise errors.UserError(f"unknown tokenizer kind {kind!r} (sentencepiece or tokenizers)")


def save_bytes(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


# --------------------------------------------------------------- A Hugging Face model's tokenizer
#
# tokenizer.json (through the `tokenizers` library) wins over a sentencepiece tokenizer.model, as
# in transformers. Special ids: generation_config.json first (what `generate` stops on; its
# eos_token_id may be a list), then config.json, then the token strings of tokenizer_config.json /
# special_tokens_map.json. pad falls back to the first EOS id. Whether documents start with BOS:
# tokenizer_config.json's add_bos_token, else what the tokenizer's own post-processor adds (Llama 3
# adds <|begin_of_text|>, GPT-2 and Qwen2 add nothing).


def _read_json(directory: str, name: str) -> dict:
  path = os.path.join(directory, name)
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{path} is not valid JSON ({e}): restore the file from the model's "
                           f"source") from None


def _first(*values):
  return next((v for v in values if v is not None), None)


def special_ids(directory: str, piece_to_id) -> dict:
  """{"bos", "eos" (list), "pad", "unk"} ids of the model in `directory` (see module docstring)."""
  gen = _read_json(directory, "generation_config.json")
  cfg = _read_json(directory, "config.json")
  tcfg = _read_json(directory, "tokenizer_config.json")
  stm = _read_json(directory, "special_tokens_map.json")

  def by_name(name):
    value = _first(tcfg.get(f"{name}_token"), stm.get(f"{name}_token"))
    if isinstance(value, dict):
      value = value.get("content")
    if not isinstance(value, str):
      return None
    i = piece_to_id(value)
    return None if i is None or i < 0 else i

  def by_id(name):
    return _first(gen.get(f"{name}_token_id"), cfg.get(f"{name}_token_id"), by_name(name))

  eos = by_id("eos")
  eos = [] if eos is None else [int(i) for i in eos] if isinstance(eos, list) else [int(eos)]
  if not eos:
    raise errors.UserError(
        f"{directory}: no EOS token: none of generation_config.json, config.json "
        f"(eos_token_id) or tokenizer_config.json (eos_token) names one; add "
        f"eos_token_id to generation_config.json")
  pad = by_id("pad")
  return {"bos": by_id("bos"), "eos": eos, "pad": eos[0] if pad is None else int(pad),
          "unk": by_name("unk")}


def from_hf_dir(directory: str):
  """The tokenizer of the Hugging Face model in `directory` (tokenizer.json or tokenizer.model)."""
  tcfg = _read_json(directory, "tokenizer_config.json")
  tj_path = os.path.join(directory, "tokenizer.json")
  sp_path = os.path.join(directory, "tokenizer.model")
  if os.path.exists(tj_path):
    import tokenizers  # pylint: disable=g-import-not-at-top
    with open(tj_path, encoding="utf-8") as f:
      text = f.read()
    try:
      tk = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # pylint: disable=broad-except  (the library raises bare Exceptions)
      raise errors.UserError(
          f"{tj_path} is not a tokenizer the tokenizers library can read ({e})") \
          from None
    special = special_ids(directory, tk.token_to_id)
    add_bos = tcfg.get("add_bos_token")
    if add_bos is None:
      with_specials = tk.encode("a").ids
      add_bos = (special["bos"] is not None and len(with_specials) > len(tk.encode(
          "a", add_special_tokens=False).ids) and with_specials[0] == special["bos"])
    return HFTokenizer(text, special, add_bos, hf_config=tcfg)
  if os.path.exists(sp_path):
    with open(sp_path, "rb") as f:
      proto = f.read()
    try:
      sp = spm.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as e:
      raise errors.UserError(f"{sp_path} is not a sentencepiece model ({e})") from None
    special = special_ids(directory, lambda p: sp.piece_to_id(p) if sp.piece_to_id(p) != sp.unk_id()
                          or p == sp.id_to_piece(sp.unk_id()) else None)
    if special["unk"] is None and sp.unk_id() >= 0:
      special["unk"] = sp.unk_id()
    add_bos = tcfg.get("add_bos_token", special["bos"] is not None)  # LlamaTokenizer's default
    return Tokenizer(proto, special, add_bos, hf_config=tcfg)
  raise errors.UserError(f"{directory} has no tokenizer.json or tokenizer.model: copy the model's "
                         f"tokenizer files into it")


def load(path: str):
  """Any tokenizer from a path: our sentencepiece .model, a saved item (JSON with "kind"), a
  Hugging Face tokenizer.json (its directory's configs give the special ids) or model directory."""
  if os.path.isdir(path):
    return from_hf_dir(path)
  with open(path, "rb") as f:
    data = f.read()
  if data[:1] == b"{":
    d = json.loads(data)
    if "kind" in d:
      return from_item(d)
    return from_hf_dir(os.path.dirname(os.path.abspath(path)))
  return Tokenizer(data)


def save(tok, path: str) -> None:
  """Writes `tok` so that `load(path)` gives it back (atomically)."""
  tok.save(path)


def _cut(sentence: str) -> Iterable[str]:
  """Pieces of `sentence` of at most MAX_SENTENCE_BYTES bytes (4 bytes per char worst case)."""
  step = MAX_SENTENCE_BYTES // 4
  if len(sentence.encode("utf-8")) <= MAX_SENTENCE_BYTES:
    yield sentence
  else:
    for i in range(0, len(sentence), step):
      yield sentence[i:i + step]


def with_user_symbols(proto: bytes, symbols) -> bytes:
  """A sentencepiece model with `symbols` appended as user-defined pieces (always one token)."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(proto)
  for s in symbols:
    m.pieces.add(piece=s, score=0.0, type=4)  # ModelProto.SentencePiece.USER_DEFINED
  return m.SerializeToString()


def train_tokenizer(sentences: Iterable[str], *, vocab_size: int, model_type: str = "unigram",
                    byte_fallback: bool = True, num_threads: int | None = None,
                    user_defined_symbols: Sequence[str] = CHAT_MARKERS) -> Tokenizer:
  """Trains a SentencePiece model on `sentences` (already sampled: all of them are used).

  Raises ValueError naming vocab_size when the text cannot fill `vocab_size` pieces, or when
  byte_fallback's 256 byte pieces plus the characters do not fit in it.
  """
  if model_type not in MODEL_TYPES:
    raise errors.UserError(f"tokenizer_type={model_type!r} is not one of {', '.join(MODEL_TYPES)}")
  sents = [p for s in sentences if s for p in _cut(s)]
  if not sents:
    raise errors.UserError("no text to train the tokenizer on")
  buf = io.BytesIO()
  spm.set_random_generator_seed(0)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sents), model_writer=buf, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        byte_fallback=byte_fallback,
        # With byte fallback, the rarest characters may become bytes; without it, every
        # character seen must be a piece or it would decode as unk.
        character_coverage=0.9995 if byte_fallback else 1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, max_sentence_length=MAX_SENTENCE_BYTES,
        user_defined_symbols=list(user_defined_symbols),
        num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    msg = str(e)
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", msg)
    required = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if too_high:
      raise errors.UserError(
          f"vocab_size={vocab_size} is more than this text supports: sentencepiece can make at "
          f"most {too_high.group(2)} pieces from it; set vocab_size <= {too_high.group(2)} or "
          f"train on more text") from e
    if required:
      need = int(required.group(2))
      hint = " or set byte_fallback=False" if byte_fallback else ""
      raise errors.UserError(
          f"vocab_size={vocab_size} is too small: the 4 special ids, "
          f"{len(user_defined_symbols)} chat markers"
          f"{f', {N_BYTE_PIECES} byte pieces (byte_fallback)' if byte_fallback else ''} and "
          f"the text's characters need {need}; raise vocab_size to at least {need}{hint}") from e
    raise
  return Tokenizer(buf.getvalue())
