"""`once(tmp_path_factory, name, fn)`: fn() run by one pytest-xdist worker, its JSON result shared.

Module fixtures run once per worker, and the workers split a module's tests between them, so an
expensive fixture (a subprocess on 8 devices, a 2-process training run) would run twice side by
side on a 2-core machine. The first worker to take the lock runs it; the others read its result.
"""

import fcntl
import json
import os


def once(tmp_path_factory, name: str, fn):
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # shared by every worker of this session
  path = root / f"{name}.json"
  with open(root / f"{name}.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if path.exists():
      return json.loads(path.read_text(encoding="utf-8"))
    result = fn()
    path.write_text(json.dumps(result), encoding="utf-8")
    return result
