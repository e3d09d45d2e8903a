"""The chat prompt of /v1/chat/completions: a model's own chat template, rendered as transformers'
`apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` renders it.

The template is the tokenizer's: `chat_template` in the tokenizer_config.json an imported model
came with (tokenizer.hf_config; a list of named templates picks "default"). A model without one
serves plain completions only: the chat route answers 400 saying so, rather than inventing a
format the model never saw.

Rendering follows transformers' `_compile_jinja_template`: jinja2's immutable sandbox (a
template is code from a model's files), trim_blocks and lstrip_blocks, the loopcontrols
extension, `raise_exception` and `strftime_now` globals, a `tojson` filter that keeps non-ASCII
text, and the special tokens (bos_token, eos_token, ...) as strings. The rendered text is
tokenized without adding BOS: templates write their own.
"""

import datetime
import functools
import json
from typing import Optional

import jinja2
from jinja2 import ext, sandbox


class TemplateError(Exception):
  """The template raised or failed to render: a bad request (the messages it refused)."""


def template_of(tokenizer) -> Optional[str]:
  """The tokenizer's chat template, or None."""
  hf_config = getattr(tokenizer, "hf_config", None) or {}
  template = hf_config.get("chat_template")
  if isinstance(template, list):  # [{"name": ..., "template": ...}]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return template if isinstance(template, str) and template.strip() else None


def _special_strings(tokenizer) -> dict:
  """bos_token, eos_token, ... as the template sees them: tokenizer_config.json's strings (an
  AddedToken dict gives its content), else the pieces of the tokenizer's own ids."""
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


def _raise(message):
  raise TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[ext.loopcontrols])
  env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
      x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


def render(template: str, messages: list[dict], tokenizer) -> str:
  """The prompt text for `messages` ([{"role", "content"}]) ending with the generation prompt."""
  try:
    return _compile(template).render(messages=messages, add_generation_prompt=True,
                                     **_special_strings(tokenizer))
  except TemplateError:
    raise
  except jinja2.TemplateError as e:
    raise TemplateError(f"the model's chat template failed: {e}") from None
