"""--mode=chat: talk to a trained model with its chat template (chat.py), through the one loader
and the one sampler.

Interactive (stdin): each line is a user turn; the reply is printed as its tokens arrive and
ends at the template's end-of-turn token (or EOS, stop_token, max_new_tokens). Commands:
`/system TEXT` sets the system message (`/system` alone clears it), `/reset` forgets the turns,
`/exit` (or end of input) quits. A conversation that no longer fits the context loses its oldest
turns (the system message stays), with a note on stderr.

Non-interactive (`--conversation=conv.json`): a JSON object with `messages` (the messages format
of chat.py), or a list of messages; the model's reply to it is printed alone on stdout, every
note going to stderr, so scripts and tests can read it.

Every decoding field of the config applies (do_sample, temperature, top_k, top_p,
repetition_penalty, num_beams, length_penalty, max_new_tokens, min_length, stop_token, seed).
"""

import dataclasses
import json
import os
import sys

from llm_jax import chat
from llm_jax import errors

HELP = "# /system TEXT sets the system message, /reset forgets the conversation, /exit quits"


class Session:
  """One conversation with a loaded model: its messages, and replies generated for them."""

  def __init__(self, loaded, cfg, stop_id=None):
    import jax  # pylint: disable=import-outside-toplevel
    from llm_jax import sampling  # pylint: disable=import-outside-toplevel
    self.loaded, self.tok, self.cfg = loaded, loaded.tokenizer, cfg
    self.template = chat.template_of_run(loaded, cfg.chat_template)
    self.end_ids = chat.end_of_turn_ids(self.tok, self.template)
    self.stop_id = stop_id
    self.scfg = sampling.SamplingConfig.from_config(cfg)
    if self.scfg.num_return_sequences != 1:
      raise errors.UserError(f"num_return_sequences={self.scfg.num_return_sequences}: a chat "
                             f"reply is one message; set --config.num_return_sequences=1")
    self.rng = jax.random.key(cfg.seed)
    self.system, self.turns = None, []

  def messages(self, turns=None) -> list[dict]:
    system = [{"role": "system", "content": self.system}] if self.system else []
    return system + list(self.turns if turns is None else turns)

  def prompt_ids(self, messages) -> list[int]:
    """The prompt of `messages` with the generation prompt, fitted into the context by dropping
    the oldest turns (not the system message)."""
    from llm_jax import sampling  # pylint: disable=import-outside-toplevel
    limit = sampling.max_new_tokens_for(0, self.loaded.model_cfg, self.loaded.cfg.max_seq_len)
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    dropped = 0
    while True:
      ids = self.tok.encode(chat.render(self.template, system + turns, self.tok))
      if len(ids) + self.scfg.max_new_tokens <= limit or len(turns) <= 1:
        break
      turns, dropped = turns[1:], dropped + 1
    if dropped:
      print(f"# the conversation is longer than the model's context ({limit} tokens with "
            f"max_new_tokens={self.scfg.max_new_tokens}): its {dropped} oldest turn(s) are left "
            f"out", file=sys.stderr, flush=True)
    if len(ids) >= limit:
      raise errors.UserError(f"the last turn alone is {len(ids)} tokens, the model's context "
                             f"{limit}: shorten it")
    return ids

  def reply(self, messages, out=None) -> str:
    """The model's reply to `messages`, written to `out` as its tokens arrive (if given)."""
    import jax  # pylint: disable=import-outside-toplevel
    from llm_jax import sampling  # pylint: disable=import-outside-toplevel
    ids = self.prompt_ids(messages)
    scfg = self.scfg
    room = sampling.max_new_tokens_for(len(ids), self.loaded.model_cfg,
                                       self.loaded.cfg.max_seq_len)
    if room < scfg.max_new_tokens:  # the reply is cut to the context, not refused
      print(f"# {len(ids)} prompt tokens leave room for {room} of max_new_tokens="
            f"{scfg.max_new_tokens} in the context", file=sys.stderr, flush=True)
      scfg = dataclasses.replace(scfg, max_new_tokens=room)
    self.rng, key = jax.random.split(self.rng)
    ends = set(self.end_ids) | ({self.stop_id} if self.stop_id is not None else set())
    new, shown = [], ""
    for chunk in sampling.generate_stream(self.loaded.params, self.loaded.model_cfg, [ids],
                                          scfg, key, eos_id=self.end_ids,
                                          stop_id=self.stop_id):
      new += [t for t in chunk[0] if t not in ends]
      text = self.tok.decode(new)  # the whole text: a chunk may end inside a character
      if out is not None:
        out.write(text[len(shown):])
        out.flush()
      shown = text
    return shown

  def say(self, line: str, out) -> None:
    self.turns.append({"role": "user", "content": line})
    text = self.reply(self.messages(), out)
    out.write("\n")
    self.turns.append({"role": "assistant", "content": text})


def read_conversation(path: str) -> list[dict]:
  """The messages of a --conversation file; UserError naming the file otherwise."""
  if not os.path.isfile(path):
    raise errors.UserError(f"--conversation={path}: no such file; give a JSON file with "
                           f"{{\"messages\": [{{\"role\": \"user\", \"content\": ...}}]}}")
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise errors.UserError(f"--conversation={path}: not valid JSON ({e})") from None
  record = {"messages": value} if isinstance(value, list) else value
  if not isinstance(record, dict):
    raise errors.UserError(f"--conversation={path}: a JSON {type(value).__name__}; give an "
                           f"object with `messages`, or a list of messages")
  messages = chat.conversation(record, path)
  if not messages or messages[-1]["role"] == "assistant":
    raise errors.UserError(f"--conversation={path}: the last message is the assistant's, so "
                           f"there is nothing to reply to; end it with a user message")
  return messages


def run(cfg, workdir: str, conversation: str | None, stop_id_of, overrides=None) -> int:
  """--mode=chat (see the module docstring). stop_id_of(cfg, tokenizer): main.py's stop_token."""
  from llm_jax import loader  # pylint: disable=import-outside-toplevel
  messages = read_conversation(conversation) if conversation else None
  loaded = loader.load(workdir, cfg, step=cfg.checkpoint_step, asked=overrides or {})
  session = Session(loaded, cfg, stop_id_of(cfg, loaded.tokenizer))
  note = sys.stderr if messages is not None else sys.stdout
  if loaded.quantization:
    print(f"# {loaded.quantization}", file=note, flush=True)
  print(f"# chat with checkpoint {loaded.step} of {workdir}; do_sample={cfg.do_sample} "
        f"temperature={cfg.temperature} top_k={cfg.top_k} top_p={cfg.top_p} num_beams="
        f"{cfg.num_beams} max_new_tokens={cfg.max_new_tokens}", file=note, flush=True)
  if messages is not None:
    sys.stdout.write(session.reply(messages) + "\n")
    sys.stdout.flush()
    return errors.OK
  print(HELP, flush=True)
  for line in sys.stdin:
    line = line.rstrip("\n")
    if line.strip() == "/exit":
      break
    if line.strip() == "/reset":
      session.turns = []
      print("# the conversation is forgotten", flush=True)
    elif line.startswith("/system"):
      session.system = line[len("/system"):].strip() or None
      print(f"# system message: {session.system!r}", flush=True)
    elif line.startswith("/"):
      print(f"# unknown command {line.split()[0]!r}\n{HELP}", flush=True)
    elif line.strip():
      try:
        session.say(line.replace("\\n", "\n"), sys.stdout)
      except (errors.UserError, chat.ChatError) as e:  # a turn too long, a template refusal
        session.turns = session.turns[:-1]
        errors.report(str(e))
  return errors.OK
