"""How a run ends: main.py's exit codes and the one exception class every bad input raises.

    0  OK          done
    1  DIVERGED    training stopped on a NaN/Inf or exploding loss (no bad state was saved)
    2  BAD_INPUT   a bad config, flag, file or workdir (also: the workdir is held by another
                   run); reported before anything compiles or is written
    3  OOM         out of memory (XLA RESOURCE_EXHAUSTED), with what to change
    4  INTERNAL    an unexpected error: a bug in llm_jax; the traceback is printed to report it

Modules raise `UserError` (or a subclass: config.ConfigError, corpus.DataError,
checkpoint.CheckpointError, workdir.WorkdirError) with a message naming the field or file, the
value and what to do; main.py prints it as one `error: ...` line and exits BAD_INPUT.
"""

import difflib
import sys

OK = 0
DIVERGED = 1
BAD_INPUT = 2
OOM = 3
INTERNAL = 4


class UserError(ValueError):
  """Bad config or input; the message names the field or file, the value and the fix."""


def report(message: str) -> None:
  """Prints `error: message` to stderr, where every failure of main.py is reported."""
  print(f"error: {message}", file=sys.stderr, flush=True)


def closest(name: str, candidates) -> str | None:
  """The candidate most like `name` (a misspelt field or flag), or None when none is close."""
  match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
  return match[0] if match else None
