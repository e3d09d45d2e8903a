"""SIGTERM and SIGINT in every phase of a run: one handler for the whole process.

A TPU or spot VM is killed about 30 s after its preemption notice (SIGTERM); Ctrl-C is SIGINT.
`install()` (main.py and the studies call it once, first) takes both signals for the process:

- By default the handler raises `Preempted` in the main thread at once, wherever it is: a dataset
  or tokenizer build, an evaluation, sampling, an import or an export stops there, its `finally`
  blocks run, and main.py reports one line. Every writer writes to a temporary name and renames
  it when complete (checkpoints, the token cache, tokenizers, exports), so nothing half-written
  is left that a later run would trust.
- Inside `deferred()` (the training loop, which has state worth saving) the signal is a request:
  `requested()` turns true and the loop saves the current step and returns; loops nested in it
  (an evaluation) call `check()`, which raises Preempted there so that they end early.

Python runs a signal handler only when the main thread is back in Python, so one blocked in native
code (an XLA compile, a jitted decode loop, sentencepiece training) would not notice for minutes.
A watcher thread, woken through `signal.set_wakeup_fd` the moment the signal arrives, ends the
process with os._exit after GRACE_S seconds if it is still running outside `deferred()` (the
same state a kill -9 leaves, which every writer survives). A second signal ends it at once.

Exit codes: a training run (and a study of experiments/) exits 0 when a signal stops it, in any
of its phases, since the same command continues it (`stop_exit_code`); any other mode exits
128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process ended by
that signal.
"""

import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time

GRACE_S = 5.0  # how long a phase outside deferred() may take to notice before the process ends
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_lock = threading.RLock()  # re-entrant: the handler runs in the main thread, maybe inside it
_state = {"signal": None, "deferred": 0, "installed": False, "exit_code": None,
          "stop_code": None}


class Preempted(BaseException):
  """A signal asked the run to stop. A BaseException, as KeyboardInterrupt is, so that the
  `except Exception` of a phase that tolerates failures (sampling at an evaluation) lets it by."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name

  @property
  def exit_code(self) -> int:
    return _stop_code(self.signum)


def _stop_code(signum: int) -> int:
  code = _state["stop_code"]
  return 128 + signum if code is None else code


def install() -> None:
  """Takes SIGTERM and SIGINT for this process (main thread only; a second call does nothing)."""
  if _state["installed"] or threading.current_thread() is not threading.main_thread():
    return
  r, w = os.pipe()
  os.set_blocking(w, False)  # the C-level handler must never block
  signal.set_wakeup_fd(w, warn_on_full_buffer=False)
  for sig in SIGNALS:
    signal.signal(sig, _on_signal)
  threading.Thread(target=_watch, args=(r,), daemon=True, name="llm_jax-preemption").start()
  _state["installed"] = True


def requested() -> bool:
  """Whether a signal asked the run to stop."""
  return _state["signal"] is not None


def signal_name() -> str | None:
  s = _state["signal"]
  return None if s is None else signal.Signals(s).name


def check() -> None:
  """Raises Preempted if a signal arrived: the call for a long loop inside `deferred()`."""
  if _state["signal"] is not None:
    raise Preempted(_state["signal"])


@contextlib.contextmanager
def deferred():
  """Inside: a signal only sets `requested()` (the caller saves and stops at its next step), and
  the watcher waits for it however long the save takes."""
  with _lock:
    _state["deferred"] += 1
  try:
    yield
  finally:
    with _lock:
      _state["deferred"] -= 1


def stop_exit_code(code: int) -> None:
  """The exit code of this process when a signal stops it (0 for training: a rerun continues)."""
  _state["stop_code"] = code


def exiting(code: int) -> None:
  """The exit code the process is about to end with: the watcher uses it if the end (the
  interpreter's shutdown) outlasts the grace period."""
  _state["exit_code"] = code


def _note(signum: int) -> None:
  with _lock:
    if _state["signal"] is None:
      _state["signal"] = signum


def _on_signal(signum, _frame):
  _note(signum)
  if not _state["deferred"]:
    raise Preempted(signum)


def _message(text: str) -> None:
  print(f"llm_jax: {text}", file=sys.stderr, flush=True)


def _watch(fd: int) -> None:
  """The watcher thread: counts signals from the wakeup fd; ends a process that does not stop."""
  first, deadline = None, None
  while True:
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    ready, _, _ = select.select([fd], [], [], timeout)
    if ready:
      for signum in os.read(fd, 64):
        if signum not in SIGNALS:
          continue
        if first is not None:
          _message(f"second {signal.Signals(signum).name}: stopping now")
          os._exit(_stop_code(first))
        first = signum
        _note(signum)
        what = ("saving a checkpoint at the current step, then exiting" if _state["deferred"]
                else "stopping")
        _message(f"received {signal.Signals(signum).name}: {what}")
        deadline = time.monotonic() + GRACE_S
    elif deadline is not None and time.monotonic() >= deadline:
      if _state["deferred"]:  # a checkpoint is being saved: wait for it (a second signal ends it)
        deadline = time.monotonic() + GRACE_S
        continue
      code = _state["exit_code"]
      if code is None:
        code = _stop_code(first)
        _message(f"still busy {GRACE_S:.0f} s after {signal.Signals(first).name} (in native "
                 f"code: a compile or a device computation): exiting now; nothing half-written "
                 f"is kept")
      os._exit(code)
