"""SentencePiece tokenizer: train from text, save, load, encode and decode (single or batched).

Fixed special ids (pad 0, unk 1, bos 2, eos 3) so every model and data cache agrees on them.
Training uses identity normalization, keeps every space, tab and newline and adds no dummy
prefix, so with byte_fallback `decode(encode(text)) == text` for any text, including characters
never seen in training (they become UTF-8 byte pieces).
"""

import io
import os
import re
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe")
N_BYTE_PIECES = 256
# Sentences longer than this (bytes) are cut before training: sentencepiece skips longer ones.
MAX_SENTENCE_BYTES = 1 << 14


class Tokenizer:
  """A loaded SentencePiece model with the project's fixed special ids."""

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
    if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
      raise ValueError(f"tokenizer has special ids pad/unk/bos/eos={ids}, expected "
                       f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}: retrain it with llm_jax "
                       f"(delete the .model file and run again)")

  @property
  def model_proto(self) -> bytes:
    return self._proto

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  pad_id = property(lambda self: PAD_ID)
  unk_id = property(lambda self: UNK_ID)
  bos_id = property(lambda self: BOS_ID)
  eos_id = property(lambda self: EOS_ID)

  @property
  def byte_fallback(self) -> bool:
    return self._sp.piece_to_id("<0x00>") != UNK_ID

  def encode(self, text: str | Sequence[str], *, add_bos: bool = False, add_eos: bool = False,
             num_threads: int = -1) -> list[int] | list[list[int]]:
    """Token ids of one string, or a list of id lists for a list of strings (threaded)."""
    return self._sp.encode(text if isinstance(text, str) else list(text), add_bos=add_bos,
                           add_eos=add_eos, num_threads=num_threads)

  def decode(self, ids) -> str | list[str]:
    """Text of one id sequence, or a list of texts for a batch ([B, T] array or list of lists).

    Control ids (pad, bos, eos) decode to nothing; ids outside the vocabulary raise ValueError.
    """
    if isinstance(ids, (list, tuple)) and ids and np.ndim(ids[0]) == 1:  # ragged batch
      return [self.decode(row) for row in ids]
    arr = np.asarray(ids)
    if arr.ndim == 2:
      return [self.decode(row) for row in arr]
    if arr.ndim != 1:
      raise ValueError(f"decode takes ids shaped [T] or [B, T], not {arr.shape}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= self.vocab_size)
    if bad.any():
      raise ValueError(f"id {int(arr[bad][0])} is outside the tokenizer's vocabulary "
                       f"[0, {self.vocab_size})")
    return self._sp.decode(arr.tolist())

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)

  def save(self, path: str) -> None:
    """Writes the model atomically (a concurrent reader never sees half a file)."""
    save_bytes(path, self._proto)


def save_bytes(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def load(path: str) -> Tokenizer:
  with open(path, "rb") as f:
    return Tokenizer(f.read())


def _cut(sentence: str) -> Iterable[str]:
  """Pieces of `sentence` of at most MAX_SENTENCE_BYTES bytes (4 bytes per char worst case)."""
  step = MAX_SENTENCE_BYTES // 4
  if len(sentence.encode("utf-8")) <= MAX_SENTENCE_BYTES:
    yield sentence
  else:
    for i in range(0, len(sentence), step):
      yield sentence[i:i + step]


def train_tokenizer(sentences: Iterable[str], *, vocab_size: int, model_type: str = "unigram",
                    byte_fallback: bool = True, num_threads: int | None = None) -> Tokenizer:
  """Trains a SentencePiece model on `sentences` (already sampled: all of them are used).

  Raises ValueError naming vocab_size when the text cannot fill `vocab_size` pieces, or when
  byte_fallback's 256 byte pieces plus the characters do not fit in it.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f"tokenizer_type={model_type!r} is not one of {', '.join(MODEL_TYPES)}")
  sents = [p for s in sentences if s for p in _cut(s)]
  if not sents:
    raise ValueError("no text to train the tokenizer on")
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
        num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    msg = str(e)
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", msg)
    required = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if too_high:
      raise ValueError(
          f"vocab_size={vocab_size} is more than this text supports: sentencepiece can make at "
          f"most {too_high.group(2)} pieces from it; set vocab_size <= {too_high.group(2)} or "
          f"train on more text") from e
    if required:
      need = int(required.group(2))
      hint = " or set byte_fallback=False" if byte_fallback else ""
      raise ValueError(
          f"vocab_size={vocab_size} is too small: the 4 special ids"
          f"{f', {N_BYTE_PIECES} byte pieces (byte_fallback)' if byte_fallback else ''} and "
          f"the text's characters need {need}; raise vocab_size to at least {need}{hint}") from e
    raise
  return Tokenizer(buf.getvalue())
