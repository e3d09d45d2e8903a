"""A run's workdir: the checks that it can be one, and the lock that keeps it to one training run.

Two training runs writing one workdir destroy each other's checkpoints (each one's cleanup
deletes the other's steps) and interleave their metrics. So `--mode=train` holds an exclusive
`fcntl.flock` on `<workdir>/.llm_jax.lock` for its whole life, and a second run is refused at
once, naming the holder (host, pid, start time, command), which the holder writes into the file.
The OS drops the lock when the holding process ends, however it ends (SIGKILL and crashes
included), so no stale lock is ever left to clean up; the file itself stays, harmless. On
several processes, process 0 takes the lock and tells the others, so they all stop together.
`--mode=eval` and `--mode=sample` only read, and run beside a training run without the lock.

flock is honoured across hosts on NFS (Linux emulates it with POSIX locks there) and on local
disks; object-store mounts without locking (gcsfuse) protect only against runs on the same host.
"""

import datetime
import fcntl
import json
import os
import socket
import sys

from llm_jax import errors

LOCK_NAME = ".llm_jax.lock"


class WorkdirError(errors.UserError):
  """The workdir cannot be used (a file, not writable, or held by another run)."""


def check_readable(workdir: str) -> None:
  """For eval / sample: `workdir` must be an existing directory."""
  if not os.path.exists(workdir):
    raise WorkdirError(f"--workdir={workdir} does not exist: give the workdir of a trained run "
                       f"(train one with --mode=train --workdir={workdir})")
  if not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory: give the directory a "
                       f"training run wrote")


def _holder(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      h = json.load(f)
    command = h["command"] if len(h["command"]) <= 200 else h["command"][:200] + " ..."
    return f"pid {h['pid']} on host {h['host']}, started {h['started']}, command: {command}"
  except (OSError, ValueError, KeyError, TypeError):
    return "holder not recorded yet"  # it is between taking the lock and writing its name


class Lock:
  """The held lock of one workdir; `release()` (or the end of the process) frees it."""

  def __init__(self, fd: int | None, path: str):
    self._fd, self.path = fd, path

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the only descriptor of the open file drops the flock
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def _take(workdir: str) -> Lock:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory: give a directory "
                       f"(it is created if missing)")
  path = os.path.join(workdir, LOCK_NAME)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} is not writable ({e.strerror}): training writes "
                       f"checkpoints there; give a writable directory (--mode=eval and "
                       f"--mode=sample only read a workdir)") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise WorkdirError(
        f"--workdir={workdir} is in use by another training run ({_holder(path)}); two runs in "
        f"one workdir delete each other's checkpoints. Wait for it to end or stop it, or train "
        f"in another --workdir (--mode=eval and --mode=sample may run beside it)") from None
  holder = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
  return Lock(fd, path)


def lock(workdir: str) -> Lock:
  """Takes the training lock of `workdir` (creating it); WorkdirError names the holder if held.

  On several processes every one calls this: process 0 takes the lock, the others learn whether
  it did, so either all go on or all raise.
  """
  import jax  # pylint: disable=g-import-not-at-top  (late: the checks above need no jax)
  if jax.process_count() == 1:
    return _take(workdir)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  held, problem = Lock(None, os.path.join(workdir, LOCK_NAME)), ""
  if jax.process_index() == 0:
    try:
      held = _take(workdir)
    except WorkdirError as e:
      problem = str(e)
  ok = multihost_utils.broadcast_one_to_all(np.int32(problem == ""))
  if not int(ok):
    raise WorkdirError(problem or f"--workdir={workdir} cannot be used by this run: process 0 "
                       f"reported why")
  return held
