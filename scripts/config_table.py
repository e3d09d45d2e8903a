"""Prints the README's table of config fields from configs/base.py (default, meaning, source).

    .venv/bin/python scripts/config_table.py > /tmp/table.md
"""

import os
import re
import sys

SOURCES = {"P": "parameter reference", "C": "cheat sheet", "+": "llm_jax", "P/C": "both sheets"}


def rows(path):
  pattern = re.compile(r"^\s*c\.(\w+) = (.+?)  # ([^:]+): (.*)$")
  for line in open(path, encoding="utf-8"):
    m = pattern.match(line)
    if m:
      name, default, source, meaning = m.groups()
      default = re.sub(r"placeholder\((\w+)\)", r"None", default)
      yield name, default, source.strip(), meaning.strip()


def table(path):
  out = ["| field | default | meaning | from |", "|---|---|---|---|"]
  for name, default, source, meaning in rows(path):
    out.append(f"| `{name}` | `{default}` | {meaning.replace('|', '/')} | {source} |")
  return "\n".join(out)


if __name__ == "__main__":
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.stdout.write(table(os.path.join(root, "configs", "base.py")) + "\n")
