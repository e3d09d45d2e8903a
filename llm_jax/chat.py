"""Conversations: chat templates rendered as transformers renders them, assistant-only loss masks,
and the packed batches of supervised fine-tuning (`objective='sft'`).

Templates. A model imported from Hugging Face brings its own `chat_template` (its
tokenizer_config.json, kept in `tokenizer.hf_config`); a model trained here uses CHATML, whose
markers <|im_start|> and <|im_end|> are real tokens: sentencepiece user-defined symbols from
tokenizer training on (tokenizer.CHAT_MARKERS), or added to an older model's vocabulary when it
is fine-tuned on conversations (`add_markers`; loader.fit_vocab gives the new rows the mean of the
old ones). `--config.chat_template` overrides either: `chatml`, a .jinja file, a
tokenizer_config.json, or the template text itself. Rendering follows transformers'
`_compile_jinja_template` (utils/chat_template_utils.py): jinja2's immutable sandbox (a template
is code from a model's files), trim_blocks and lstrip_blocks, the loopcontrols extension,
`raise_exception` and `strftime_now` globals, a `tojson` that keeps non-ASCII text, and the
special tokens (bos_token, eos_token, ...) as strings. Rendered text is tokenized without adding
BOS: templates write their own. tests/test_chat.py proves text and ids equal transformers' on
Llama-3-, ChatML- and Mistral-style fixtures (tests/fixtures/make_chat_fixtures.py).

Masks. The assistant turns' characters are found by rendering the conversation's prefixes:
assistant turn i is what render(messages[:i + 1]) adds to render(messages[:i],
add_generation_prompt=True). The whole text is tokenized once (so the ids are transformers'),
and a token is the assistant's when it starts inside such a span. The assistant's tokens up to
and including its end-of-turn token are trained (weight 1); what the template writes after that
(ChatML's newline) and every system and user token are not, unless `train_on_prompt`.

Batches. A conversation of n tokens is one example of n - 1 (input, target) pairs; examples are
packed into rows of block_size with segment ids (attention stays inside a conversation) and
positions restarting at 0. A conversation longer than block_size + 1 tokens keeps its last
block_size + 1 (its history is cut from the left), counted in one warning. Rows are read in the
train order of data.py (a permutation per epoch, disjoint shares per process) through grain, so
the iterator checkpoints and resumes exactly as text data does.
"""

import dataclasses
import datetime
import functools
import glob
import json
import logging
import os
import sys
from typing import Optional

import grain
import jinja2
import numpy as np
from jinja2 import ext, sandbox

from llm_jax import data as data_lib
from llm_jax import records
from llm_jax import tokenizer as tokenizer_lib
from llm_jax.corpus import DataError

ROLES = ("system", "user", "assistant")
MARKERS = tokenizer_lib.CHAT_MARKERS  # ("<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Tokens that end an assistant turn in the templates people use (ChatML, Llama 3, Phi, Gemma);
# the tokenizer's EOS ids end one too (Mistral's </s>).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class ChatError(DataError):
  """A conversation or a template cannot be used; names the file and line, and the fix."""


class TemplateError(ChatError):
  """The template raised or failed to render (the serving route answers 400 with it)."""


# ------------------------------------------------------------------------------------ Templates


def _raise(message):
  raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[ext.loopcontrols])
  env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
      sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                  separators=separators, sort_keys=sort_keys)
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.TemplateSyntaxError as e:
    raise TemplateError(f"the chat template is not valid jinja (line {e.lineno}: {e.message})"
                        ) from None


def special_strings(tokenizer) -> dict:
  """bos_token, eos_token, pad_token, unk_token as a template sees them: tokenizer_config.json's
  strings (an AddedToken dict gives its content), else the pieces of the tokenizer's ids."""
  hf_config = getattr(tokenizer, "hf_config", None) or {}
  out = {}
  for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
    value = hf_config.get(name)
    if isinstance(value, dict):
      value = value.get("content")
    if value is None:
      i = getattr(tokenizer, name.replace("_token", "_id"), None)
      value = tokenizer.id_to_piece(i) if i is not None and i >= 0 else None
    out[name] = value
  return out


def render(template: str, messages: list[dict], tokenizer, add_generation_prompt: bool = True
           ) -> str:
  """The text of `messages` ([{"role", "content"}]), as apply_chat_template(tokenize=False)."""
  try:
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **special_strings(tokenizer))
  except TemplateError:
    raise
  except jinja2.TemplateError as e:
    raise TemplateError(f"the chat template failed: {e}") from None


def template_of(tokenizer) -> Optional[str]:
  """The tokenizer's own template: tokenizer_config.json's chat_template (a list of named ones
  picks "default"), CHATML for a model trained here; None for an imported one without."""
  hf_config = getattr(tokenizer, "hf_config", None)
  if hf_config is None:
    return CHATML
  template = hf_config.get("chat_template")
  if isinstance(template, list):  # [{"name": ..., "template": ...}]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return template if isinstance(template, str) and template.strip() else None


def resolve_template(tokenizer, spec: str = "", where: str = "the model") -> str:
  """The template `--config.chat_template=spec` names ("" = the tokenizer's own); ChatError when
  there is none, saying how to give one."""
  if not spec:
    template = template_of(tokenizer)
    if template is None:
      raise ChatError(f"{where}'s tokenizer (imported from Hugging Face) has no chat template "
                      f"in its tokenizer_config.json: set --config.chat_template=chatml (adds "
                      f"the <|im_start|>/<|im_end|> tokens) or to a .jinja file")
    return template
  if spec == "chatml":
    return CHATML
  if "{%" in spec or "{{" in spec:
    return spec
  path = os.path.expanduser(spec)
  if not os.path.isfile(path):
    raise ChatError(f"chat_template={spec!r} is not chatml, a template, or a file")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".json"):
    try:
      template = json.loads(text).get("chat_template")
    except (ValueError, AttributeError):
      template = None
    if not isinstance(template, str):
      raise ChatError(f"chat_template={spec!r}: the JSON file has no chat_template string")
    return template
  return text


def template_of_run(loaded, spec: str = "", required: bool = True) -> Optional[str]:
  """The template a loaded model (loader.Loaded) talks with: `spec` (--config.chat_template),
  else the one its run trained with (its saved config), else its tokenizer's own. None when it
  has none and not `required` (serving then answers plain completions only)."""
  spec = spec or loaded.saved_config.get("chat_template") or ""
  try:
    return resolve_template(loaded.tokenizer, spec, os.path.dirname(os.path.dirname(
        loaded.path)))
  except ChatError:
    if required or spec:
      raise
    return None


def missing_markers(template: str, tokenizer) -> list[str]:
  """ChatML's markers that `template` writes but the tokenizer splits into pieces."""
  return [m for m in MARKERS if m in template and len(tokenizer.encode(m)) != 1]


def add_markers(tokenizer, markers):
  """`tokenizer` with `markers` appended as special tokens (ids vocab_size, vocab_size + 1, ...):
  sentencepiece user-defined pieces, or added tokens of a tokenizer.json."""
  if tokenizer.kind == "tokenizers":
    import tokenizers  # pylint: disable=import-outside-toplevel
    tk = tokenizers.Tokenizer.from_str(tokenizer.tokenizer_json)
    tk.add_special_tokens([tokenizers.AddedToken(m, special=True, normalized=False)
                           for m in markers])
    return tokenizer_lib.HFTokenizer(tk.to_str(), tokenizer._special, tokenizer.add_bos,  # pylint: disable=protected-access
                                     tokenizer.hf_config)
  proto = tokenizer_lib.with_user_symbols(tokenizer.model_proto, markers)
  special = None if tokenizer.is_own else tokenizer._special  # pylint: disable=protected-access
  return tokenizer_lib.Tokenizer(proto, special, tokenizer.add_bos, tokenizer.hf_config)


def end_of_turn_ids(tokenizer, template: str) -> list[int]:
  """Ids that end an assistant turn: the END_OF_TURN tokens the template writes, and EOS."""
  ids = []
  for piece in END_OF_TURN:
    if piece in template:
      enc = tokenizer.encode(piece)
      if len(enc) == 1:
        ids.append(enc[0])
  return ids + [i for i in tokenizer.eos_ids if i not in ids]


# -------------------------------------------------------------------------------- Conversations


def _text(content, where: str, i: int) -> str:
  if content is None:
    return ""
  if isinstance(content, str):
    return content
  if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
    texts = [p.get("text") for p in content if isinstance(p, dict)]
    if all(isinstance(t, str) for t in texts) and len(texts) == len(content):
      return "".join(texts)
  raise ChatError(f"{where}: message {i}'s content is a {type(content).__name__}, not text")


def _messages(value, where: str, field: str) -> list[dict]:
  if isinstance(value, str):
    return [{"role": "user" if field == "prompt" else "assistant", "content": value}]
  if not isinstance(value, list) or not value:
    raise ChatError(f"{where}: field {field!r} is not a list of messages "
                    f"([{{\"role\": ..., \"content\": ...}}])")
  out = []
  for i, m in enumerate(value):
    if not isinstance(m, dict) or "role" not in m:
      raise ChatError(f"{where}: message {i} of {field!r} is not an object with a role")
    if m["role"] not in ROLES:
      raise ChatError(f"{where}: message {i} has role {m['role']!r}, not one of "
                      f"{', '.join(ROLES)}; rename it or drop the message")
    out.append({"role": m["role"], "content": _text(m.get("content"), where, i)})
  return out


def conversation(record: dict, where: str) -> list[dict]:
  """The messages of one record: OpenAI `messages`, `prompt`/`completion` (strings or messages,
  as TRL's formats), or Alpaca's `instruction`/`input`/`output` (an optional `system`)."""
  if "messages" in record:
    return _messages(record["messages"], where, "messages")
  if "prompt" in record and "completion" in record:
    return (_messages(record["prompt"], where, "prompt")
            + _messages(record["completion"], where, "completion"))
  if "instruction" in record and "output" in record:
    user = str(record["instruction"])
    if record.get("input"):
      user += "\n\n" + str(record["input"])
    system = [{"role": "system", "content": str(record["system"])}] if record.get("system") else []
    return system + [{"role": "user", "content": user},
                     {"role": "assistant", "content": str(record["output"])}]
  have = ", ".join(map(repr, record)) or "none"
  raise ChatError(f"{where}: not a conversation (has: {have}); give `messages`, "
                  f"`prompt` + `completion`, or Alpaca's `instruction` + `output`")


def encode(messages: list[dict], template: str, tokenizer, *, train_on_prompt: bool = False,
           eot_ids=(), where: str = "conversation") -> tuple[list[int], list[int]]:
  """(ids, mask): the rendered conversation's tokens and 1 on those the loss trains (see the
  module docstring)."""
  spans = []
  try:
    full = render(template, messages, tokenizer, add_generation_prompt=False)
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      start = len(render(template, messages[:i], tokenizer, add_generation_prompt=True))
      end = len(render(template, messages[:i + 1], tokenizer, add_generation_prompt=False))
      if not (spans[-1][1] if spans else 0) <= start <= end <= len(full):
        raise ChatError(f"{where}: the chat template does not render this conversation's "
                        f"prefixes as prefixes of it, so its assistant turns cannot be found; "
                        f"use another template (--config.chat_template)")
      spans.append((start, end))
  except TemplateError as e:
    raise TemplateError(f"{where}: {e}") from None
  ids, starts = tokenizer.encode_offsets(full)
  if train_on_prompt:
    return ids, [1] * len(ids)
  eot = set(int(i) for i in eot_ids)
  starts_ = np.asarray(starts)
  mask = np.zeros(len(ids), np.int32)
  for start, end in spans:
    inside = np.flatnonzero((starts_ >= start) & (starts_ < end))
    if not len(inside):
      continue
    ends = [k for k in inside if ids[k] in eot]
    mask[inside[0]:(ends[-1] if ends else inside[-1]) + 1] = 1  # up to its end-of-turn token
  return ids, mask.tolist()


def files_of(spec: str) -> list[str]:
  """The conversation files a dataset / validation field names: a file, a save_to_disk
  directory, a directory of records files, or a glob (a `text:` prefix, as text datasets write
  it, is allowed)."""
  path = os.path.expanduser(spec[len("text:"):] if spec.startswith("text:") else spec)
  if any(c in spec for c in "*?["):
    found = sorted(f for f in glob.glob(path, recursive=True) if records.kind(f))
  elif os.path.isdir(path) and records.kind(path) is None:
    found = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if records.kind(os.path.join(path, f)))
  else:
    found = [path] if os.path.exists(path) else []
  if not found:
    raise ChatError(f"dataset={spec!r}: no conversation files there (.jsonl, .json, .parquet, "
                    f".arrow, or a datasets save_to_disk directory)")
  return found


def read(spec: str) -> list[tuple[str, list[dict]]]:
  """(where, messages) of every conversation in the files `spec` names."""
  return [(where, conversation(r, where)) for f in files_of(spec)
          for where, r in records.iter_records(f)]


# -------------------------------------------------------------------------------------- Packing


def pack(examples, block_size: int, pad_id: int, window: int = 16) -> dict:
  """Rows [R, T] of inputs, targets, weights (float32), segment_ids and positions from examples
  (ids, mask) of at most T + 1 tokens: each goes into the first of the last `window` open rows
  with room, else a new row; segment ids count 1, 2, ... in a row, 0 on padding."""
  T = block_size
  rows, fill = [], []
  for ids, mask in examples:
    n = len(ids) - 1
    slot = next((r for r in range(max(0, len(rows) - window), len(rows)) if fill[r] + n <= T),
                None)
    if slot is None:
      rows.append([])
      fill.append(0)
      slot = len(rows) - 1
    rows[slot].append((ids, mask))
    fill[slot] += n
  R = len(rows)
  out = {"inputs": np.full((R, T), pad_id, np.int32), "targets": np.full((R, T), pad_id, np.int32),
         "weights": np.zeros((R, T), np.float32), "segment_ids": np.zeros((R, T), np.int32),
         "positions": np.zeros((R, T), np.int32)}
  for r, row in enumerate(rows):
    t = 0
    for s, (ids, mask) in enumerate(row, 1):
      n = len(ids) - 1
      out["inputs"][r, t:t + n] = ids[:-1]
      out["targets"][r, t:t + n] = ids[1:]
      out["weights"][r, t:t + n] = mask[1:]
      out["segment_ids"][r, t:t + n] = s
      out["positions"][r, t:t + n] = np.arange(n)
      t += n
  return out


def examples(conversations, template: str, tokenizer, block_size: int, train_on_prompt: bool,
             what: str):
  """(examples, counts): each conversation encoded and cut to block_size + 1 tokens; those with
  nothing to train are skipped (all of them: ChatError). One warning counts the cut and skipped."""
  eot = end_of_turn_ids(tokenizer, template)
  out, cut, empty = [], 0, []
  for where, messages in conversations:
    ids, mask = encode(messages, template, tokenizer, train_on_prompt=train_on_prompt,
                       eot_ids=eot, where=where)
    if len(ids) > block_size + 1:
      ids, mask = ids[-(block_size + 1):], mask[-(block_size + 1):]
      cut += 1
    if len(ids) < 2 or not any(mask[1:]):
      empty.append(where)
      continue
    out.append((ids, mask))
  if not out:
    first = f" (first: {empty[0]})" if empty else ""
    raise ChatError(f"{what}: no conversation has an assistant turn to train on{first}; each "
                    f"needs at least one message with role 'assistant'")
  if cut or empty:
    logging.warning("%s: %d conversation(s) longer than block_size + 1 = %d tokens kept their "
                    "last %d tokens (history cut from the left); %d without an assistant turn "
                    "were skipped%s", what, cut, block_size + 1, block_size + 1, len(empty),
                    f" (first: {empty[0]})" if empty else "")
  return out, {"conversations": len(out), "truncated": cut, "skipped": len(empty)}


class _Rows(data_lib._TrainBatches):  # pylint: disable=protected-access
  """Step -> this process's [A, b, T] batch of packed rows, in data.py's train order."""

  def __init__(self, rows: dict, steps_per_epoch, accum, per_proc, process_index, process_count,
               seed):
    # One "stream" of exactly as many rows as there are packed rows: data.py's row order.
    n, t = rows["inputs"].shape
    super().__init__([range(n * t + 1)], [1.0], t, steps_per_epoch, accum, per_proc,
                     process_index, process_count, seed, False)
    self.arrays = rows

  def __call__(self, step: int) -> dict:
    rows = self.rows(step)
    return {k: v[rows].reshape(self.A, self.b, self.T) for k, v in self.arrays.items()}


@dataclasses.dataclass
class ChatData:
  """Packed conversations with data.Data's interface (train_iter, eval_batches, ...)."""

  tokenizer: object
  template: str
  train_rows: dict
  validation_rows: dict
  block_size: int
  micro_batch_size: int
  accum: int
  process_index: int
  process_count: int
  seed: int
  prefetch: int
  steps_per_epoch: int
  chars_per_token: float  # characters per trained token of the validation conversations
  meta: dict

  @property
  def per_process_batch(self) -> int:
    return self.micro_batch_size // self.process_count

  @property
  def num_eval_batches(self) -> int:
    return -(-len(self.validation_rows["inputs"]) // self.micro_batch_size)

  def train_dataset(self) -> grain.IterDataset:
    rows = _Rows(self.train_rows, self.steps_per_epoch, self.accum, self.per_process_batch,
                 self.process_index, self.process_count, self.seed)
    return grain.MapDataset.range(sys.maxsize).map(rows).to_iter_dataset(
        grain.ReadOptions(num_threads=min(2, self.prefetch), prefetch_buffer_size=self.prefetch))

  def train_iter(self):
    return iter(self.train_dataset())

  def eval_batches(self, max_batches: int | None = None):
    """This process's share of the validation rows, once, in order; rows past the end are
    padding (weight 0)."""
    b, v = self.per_process_batch, self.validation_rows
    n = self.num_eval_batches if max_batches is None else min(max_batches, self.num_eval_batches)
    for k in range(n):
      rows = k * self.micro_batch_size + self.process_index * b + np.arange(b)
      valid = rows < len(v["inputs"])
      rows = np.minimum(rows, len(v["inputs"]) - 1)
      batch = {key: a[rows] for key, a in v.items()}
      batch["weights"] = np.where(valid[:, None], batch["weights"], 0.0).astype(np.float32)
      yield batch


def _split(conversations, cfg):
  if cfg.validation:
    return conversations, read(cfg.validation)
  n = len(conversations)
  if n < 2:
    raise ChatError(f"dataset={cfg.dataset!r} has {n} conversation(s): too few to hold out "
                    f"validation; add conversations or set --config.validation")
  n_val = min(n - 1, max(1, round(cfg.validation_fraction * n)))
  held = set(np.random.default_rng(0).permutation(n)[:n_val].tolist())
  return ([c for i, c in enumerate(conversations) if i not in held],
          [c for i, c in enumerate(conversations) if i in held])


def _tokenizer(cfg, workdir, train):
  """A from-scratch SFT run's tokenizer: the one at its path, else trained on the rendered
  conversations (the markers are its user-defined symbols)."""
  path = cfg.tokenizer_path or os.path.join(workdir, "tokenizer.model")
  if os.path.exists(path):
    return tokenizer_lib.load(path)
  texts = [m["content"] for _, msgs in train for m in msgs]
  try:
    tok = tokenizer_lib.train_tokenizer(texts, vocab_size=cfg.vocab_size,
                                        model_type=cfg.tokenizer_type,
                                        byte_fallback=cfg.byte_fallback)
  except ValueError as e:
    raise ChatError(f"dataset={cfg.dataset!r}: cannot train a tokenizer: {e}") from None
  tok.save(path)
  return tok


def build(cfg, workdir: str | None, process_index: int | None = None,
          process_count: int | None = None, tokenizer=None) -> ChatData:
  """Conversation files -> encoded, masked, packed rows. Raises ChatError before any training."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index, process_count = jax.process_index(), jax.process_count()
  mb, accum, T = cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.block_size
  if mb % process_count:
    raise ChatError(f"micro_batch_size={mb} is not divisible by the {process_count} processes")
  train, val = _split(read(cfg.dataset), cfg)
  tok = tokenizer or _tokenizer(cfg, workdir, train)
  data_lib.check_vocab(tok, cfg, "of the run")
  template = resolve_template(tok, cfg.chat_template, f"dataset={cfg.dataset!r}")
  if missing_markers(template, tok):
    raise ChatError(f"the tokenizer has no {' / '.join(missing_markers(template, tok))} "
                    f"token(s) the chat template writes: fine-tune with --config.init_from "
                    f"(which adds them), or retrain the tokenizer")
  train_ex, train_counts = examples(train, template, tok, T, cfg.train_on_prompt,
                                    f"dataset={cfg.dataset!r}")
  val_ex, val_counts = examples(val, template, tok, T, cfg.train_on_prompt,
                                f"validation of dataset={cfg.dataset!r}")
  train_rows = pack(train_ex, T, tok.pad_id)
  val_rows = pack(val_ex, T, tok.pad_id)
  steps_per_epoch = len(train_rows["inputs"]) // (mb * accum)
  if steps_per_epoch == 0:
    raise ChatError(f"dataset={cfg.dataset!r} packs into {len(train_rows['inputs'])} rows of "
                    f"block_size={T}, fewer than one step's micro_batch_size x "
                    f"gradient_accumulation_steps = {mb * accum}; add conversations or lower them")
  trained = [np.asarray(ids)[1:][np.asarray(m[1:], bool)] for ids, m in val_ex]
  n_chars = sum(len(tok.decode(t.tolist())) for t in trained)
  n_tok = sum(len(t) for t in trained)
  meta = {"train": {**train_counts, "rows": len(train_rows["inputs"]),
                    "trained_tokens": int(train_rows["weights"].sum())},
          "validation": {**val_counts, "rows": len(val_rows["inputs"]),
                         "trained_tokens": int(val_rows["weights"].sum())}}
  return ChatData(tokenizer=tok, template=template, train_rows=train_rows,
                  validation_rows=val_rows, block_size=T, micro_batch_size=mb, accum=accum,
                  process_index=process_index, process_count=process_count, seed=cfg.seed,
                  prefetch=cfg.prefetch, steps_per_epoch=steps_per_epoch,
                  chars_per_token=max(n_chars, 1) / max(n_tok, 1), meta=meta)
