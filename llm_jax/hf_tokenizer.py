"""Hugging Face tokenizer files of an export: tokenizer.json, tokenizer_config.json and
tokenizer.model. (Reading a model directory's tokenizer is tokenizer.from_hf_dir: loading any
tokenizer is one concept of tokenizer.py, and this module only builds on it.)

A sentencepiece model (ours, or a Llama 2 style `tokenizer.model`) is converted to an
equivalent `tokenizer.json` by hand (normalizer, Unigram or BPE model with byte fallback,
decoder), because transformers' own conversion of a bare tokenizer.model assumes Llama's settings
(a dummy prefix, and none of ours) and, in transformers 5, differs from sentencepiece on a
leading space. Encodings equal sentencepiece's except on text that spells a control token
literally ("<s>"), which the `tokenizers` library always treats as that token.
"""

import json
import os

from llm_jax import errors
from llm_jax import tokenizer as tokenizer_lib

from_hf_dir = tokenizer_lib.from_hf_dir  # (where hf.py and the tests have called it)

# sentencepiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"


# ------------------------------------------------------------------------------------ Writing


def sentencepiece_to_tokenizer_json(proto: bytes, bos_id: int | None = None) -> str:
  """A `tokenizers` tokenizer.json that encodes and decodes as the sentencepiece model does
  (and, with bos_id, adds that BOS when asked for special tokens, as LlamaTokenizer does)."""
  # Late imports: protobuf and tokenizers are only needed to export.
  from sentencepiece import sentencepiece_model_pb2
  import tokenizers
  from tokenizers import decoders, models, normalizers, processors
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(proto)
  ns = m.normalizer_spec
  if ns.remove_extra_whitespaces:
    raise errors.UserError("the sentencepiece model collapses repeated whitespace "
                           "(remove_extra_whitespaces), which tokenizer.json cannot express "
                           "exactly")
  pieces = [(p.piece, p.score, p.type) for p in m.pieces]
  unk = next((i for i, (_, _, t) in enumerate(pieces) if t == _UNKNOWN), None)
  byte_fallback = bool(m.trainer_spec.byte_fallback)
  if m.trainer_spec.model_type == 1:  # unigram
    # Only normal and user-defined pieces are matched against text in sentencepiece; the others
    # get a score no segmentation would choose while another exists.
    floor = min(s for _, s, t in pieces if t == _NORMAL) - 1e4
    vocab = [(p, s if t in (_NORMAL, _USER_DEFINED) else floor) for p, s, t in pieces]
    model = models.Unigram(vocab, unk, byte_fallback)
  elif m.trainer_spec.model_type == 2:  # bpe: merge the pair whose merged piece scores highest
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    merges = []
    for i, (p, score, t) in enumerate(pieces):
      if t != _NORMAL or len(p) < 2:
        continue
      for cut in range(1, len(p)):
        left, right = p[:cut], p[cut:]
        if left in vocab and right in vocab:
          merges.append((-score, i, vocab[left], vocab[right], left, right))
    merges.sort()
    model = models.BPE(vocab, [(a, b) for *_, a, b in merges],
                       unk_token=None if unk is None else pieces[unk][0], fuse_unk=True,
                       byte_fallback=byte_fallback)
  else:
    raise errors.UserError(
        f"sentencepiece model_type {m.trainer_spec.model_type} is not unigram or "
        f"bpe: it cannot be exported")
  tk = tokenizers.Tokenizer(model)
  norm = []
  if ns.precompiled_charsmap:
    norm.append(normalizers.Precompiled(ns.precompiled_charsmap))
  if ns.add_dummy_prefix:
    norm.append(normalizers.Prepend(_SPACE))
  norm.append(normalizers.Replace(" ", _SPACE))
  tk.normalizer = normalizers.Sequence(norm)
  dec = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  if ns.add_dummy_prefix:
    dec.append(decoders.Strip(" ", 1, 0))
  tk.decoder = decoders.Sequence(dec)
  # User-defined pieces (the chat markers) are always one token in sentencepiece: added tokens
  # here, special so that decoding with skip_special_tokens drops them as it drops EOS.
  tk.add_special_tokens([tokenizers.AddedToken(p, special=True, normalized=False)
                         for p, _, t in pieces if t in (_CONTROL, _UNKNOWN, _USER_DEFINED)])
  if bos_id is not None:
    bos = pieces[bos_id][0]
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
  return tk.to_str()


def _token(tok, i):
  return None if i is None else tok.id_to_piece(i)


def write_hf_files(tok, out_dir: str, model_max_length: int | None = None,
                   chat_template: str | None = None) -> list[str]:
  """Writes the tokenizer files of `tok` into `out_dir` (with `chat_template` in
  tokenizer_config.json, so apply_chat_template renders as chat.py does); returns their names."""
  if tok.kind == "tokenizers":
    tokenizer_json = tok.tokenizer_json
  else:
    tokenizer_json = sentencepiece_to_tokenizer_json(tok.model_proto,
                                                     tok.bos_id if tok.add_bos else None)
    tokenizer_lib.save_bytes(os.path.join(out_dir, "tokenizer.model"), tok.model_proto)
  tokenizer_lib.save_bytes(os.path.join(out_dir, "tokenizer.json"), tokenizer_json.encode())
  tcfg = dict(tok.hf_config or {})
  if not tcfg or (tok.kind == "sentencepiece" and tcfg.get("tokenizer_class") != "LlamaTokenizer"):
    # Our own model (or an unknown class): the generic fast tokenizer reads tokenizer.json as is.
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
  tcfg.update({f"{name}_token": _token(tok, i) for name, i in (
      ("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id), ("unk", tok.unk_id))})
  tcfg["add_bos_token"] = tok.add_bos
  if chat_template:
    tcfg["chat_template"] = chat_template
  if model_max_length:
    tcfg["model_max_length"] = model_max_length
  tokenizer_lib.save_bytes(os.path.join(out_dir, "tokenizer_config.json"),
                           json.dumps(tcfg, indent=2, ensure_ascii=False).encode())
  return ["tokenizer.json", "tokenizer_config.json"] + (
      ["tokenizer.model"] if tok.kind == "sentencepiece" else [])
