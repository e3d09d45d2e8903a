"""Writing files whole, and a full disk as bad input.

`writing(path)` (and `write_bytes` / `write_text` over it) sends the data to a temporary name
beside `path` (the same directory, so the same filesystem and an atomic rename), flushes and
fsyncs it, then renames it over `path`: a reader, or a run after a kill -9 at any moment, sees the
old file or the complete new one, never half of one; what a failure or a kill leaves is at worst
a `.tmp-*` name that nothing reads. Directories are built the same way (a temporary directory,
renamed when complete: data.tokenize_corpus, orbax's checkpoints, hf.export).

A write that finds the disk full (ENOSPC, or EDQUOT over a quota) ends as `DiskFull`, a UserError
naming the path, the space needed (when the writer knows it) and the space free, after removing
what it had written: nothing the user had is touched, and a rerun once space is freed continues.
"""

import contextlib
import errno
import os
import shutil
import tempfile

from llm_jax import errors

_FULL = (errno.ENOSPC, errno.EDQUOT)
TMP_PREFIX = ".tmp-"


class DiskFull(errors.UserError):
  """A write found no space left: the message names the path and the space needed and free."""


def _mib(n: int) -> str:
  return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def free_bytes(path: str) -> int | None:
  """Free space on the filesystem of `path` (or of its nearest existing parent)."""
  p = os.path.abspath(path)
  while not os.path.exists(p):
    parent = os.path.dirname(p)
    if parent == p:
      return None
    p = parent
  try:
    return shutil.disk_usage(p).free
  except OSError:
    return None


def tree_bytes(path: str) -> int:
  """The bytes of the files under `path`."""
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def disk_full(path: str, what: str, needed: int | None = None) -> DiskFull:
  """The error for a full disk while writing `what` to `path`."""
  free = free_bytes(path)
  need = f"; it needs about {_mib(needed)}" if needed else ""
  have = f", {_mib(free)} are free there" if free is not None else ""
  return DiskFull(f"no space left on the disk writing {what} to {path}{need}{have}. Nothing "
                  f"earlier was touched and nothing half-written was kept: free space (or point "
                  f"the path at a larger disk) and run the same command again")


_FULL_TEXT = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))  # "No space left on device"


def is_full(e: BaseException) -> bool:
  """ENOSPC / EDQUOT, also from writers in native code that raise their own exception type with
  the OS's message (safetensors: "No space left on device (os error 28)"; tensorstore, orbax)."""
  if isinstance(e, OSError) and e.errno is not None:
    return e.errno in _FULL
  return any(t in str(e) for t in _FULL_TEXT)


def check_space(path: str, what: str, needed: int) -> None:
  """DiskFull before anything is written when the disk of `path` plainly lacks `needed` bytes."""
  free = free_bytes(path)
  if free is not None and needed > free:
    raise disk_full(path, what, needed)


@contextlib.contextmanager
def writing(path: str, mode: str = "wb", what: str = "a file", needed: int | None = None,
            encoding: str | None = None, sync: bool = True):
  """A file object whose content lands at `path` whole, or not at all (see the module doc).
  sync=False skips the fsync (many small files whose directory is synced once, at its end)."""
  directory = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX)
  except OSError as e:
    if is_full(e):
      raise disk_full(path, what, needed) from None
    raise
  try:
    with os.fdopen(fd, mode, encoding=encoding) as f:
      yield f
      f.flush()
      if sync:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    if is_full(e):
      raise disk_full(path, what, needed) from None
    raise


def write_bytes(path: str, data: bytes, what: str = "a file") -> None:
  with writing(path, "wb", what, len(data)) as f:
    f.write(data)


def write_text(path: str, text: str, what: str = "a file") -> None:
  write_bytes(path, text.encode("utf-8"), what)


@contextlib.contextmanager
def building_dir(path: str, what: str, needed: int | None = None, keep_existing: bool = False):
  """A temporary directory beside `path`, renamed to `path` when the block completes; removed
  (and a full disk reported as DiskFull) when it does not. Yields the temporary directory.

  keep_existing: when `path` appeared meanwhile (another process built the same thing), the
  temporary directory is removed and `path` kept."""
  parent = os.path.dirname(os.path.abspath(path))
  if needed:
    check_space(path, what, needed)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=TMP_PREFIX)
  except OSError as e:
    if is_full(e):
      raise disk_full(path, what, needed) from None
    raise
  try:
    yield tmp
    try:
      os.rename(tmp, path)  # onto nothing or an empty directory: atomic
    except OSError as e:
      if not (keep_existing and e.errno in (errno.EEXIST, errno.ENOTEMPTY)):
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if is_full(e):
      raise disk_full(path, what, needed) from None
    raise


@contextlib.contextmanager
def build_lock(directory: str, name: str = ".llm_jax-build.lock"):
  """Serialises building one thing in `directory` among the processes that share it (a sweep's
  runs, two runs started together, the hosts of a pod over shared storage): the first builds it,
  the others wait and then find it built. The OS releases the lock when its holder dies, so a
  killed build never blocks the next one."""
  import fcntl  # pylint: disable=import-outside-toplevel  (POSIX only)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, name), "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"waiting for another process building in {directory} ...", flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
