"""A full disk (llm_jax/files.py): a clear error, nothing earlier touched, a rerun continues.

On a real 5 MiB tmpfs where this process may mount one (root; skipped with the reason where it
cannot): a training run whose next checkpoint does not fit ends with exit 2 and one `error:`
line naming the workdir and the space needed, its earlier checkpoints byte for byte as they were,
and the same command resumes once space is freed; a Hugging Face export likewise, leaving no
partial directory, and an import. The writers' own contract (whole or nothing, ENOSPC as DiskFull) by injecting
the error.
"""

import errno
import hashlib
import os
import subprocess
import sys

import pytest

import helpers  # tests/helpers.py

from configs import base
from llm_jax import checkpoint
from llm_jax import files
from llm_jax import hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import main  # pylint: disable=g-import-not-at-top,wrong-import-position

BASE_CONFIG = os.path.join(ROOT, "configs", "base.py")
GPT2 = os.path.join(ROOT, "tests", "fixtures", "hf", "gpt2")
TINY = dict(vocab_size=128, vocab_multiple=64, byte_fallback=False, d_model=32, n_heads=2,
            n_layers=1, max_seq_len=16, micro_batch_size=4, eval_steps=0,
            sample_every_eval=False, save_steps=2, max_to_keep=2)
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


@pytest.fixture
def small_disk(tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(disk)],
                     capture_output=True, text=True, check=False)
  if p.returncode:
    pytest.skip(f"cannot mount a small tmpfs here (needs root): {p.stderr.strip()}")
  try:
    yield disk
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk, leave: int):
  """Fills `disk` but for `leave` bytes; returns the filler's path (remove it to free space)."""
  path = disk / "filler"
  with open(path, "wb") as f:
    f.write(b"\0" * max(0, files.free_bytes(str(disk)) - leave))
  return path


def _digest(directory) -> dict:
  out = {}
  for r, _, fs in os.walk(directory):
    for f in fs:
      with open(os.path.join(r, f), "rb") as fh:
        out[os.path.relpath(os.path.join(r, f), directory)] = hashlib.sha256(fh.read()).digest()
  return out


def _cli(capsys, args):
  code = main.cli(["main.py", *args])
  err = capsys.readouterr().err
  return code, [l for l in err.splitlines() if l.startswith("error:")], err


def test_training_on_a_full_disk_keeps_its_checkpoints_and_resumes(small_disk, tmp_path, capsys):
  helpers.write_corpus(str(tmp_path / "text"))
  workdir = str(small_disk / "run")
  fields = {**TINY, "dataset": f"text:{tmp_path}/text/train",
            "validation": f"{tmp_path}/text/val/*.txt", "data_dir": str(tmp_path / "data")}
  args = ([f"--config={BASE_CONFIG}", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in fields.items()])
  assert _cli(capsys, args + ["--config.num_train_steps=4"])[0] == 0
  before = {s: _digest(os.path.join(checkpoint.checkpoint_dir(workdir), str(s)))
            for s in checkpoint.saved_steps(workdir)}
  assert list(before) == [2, 4]
  filler = _fill(small_disk, 64 * 1024)  # a checkpoint of this model is about 250 KiB

  code, lines, err = _cli(capsys, args + ["--config.num_train_steps=8"])
  assert code == 2 and len(lines) == 1, err[-3000:]
  assert workdir in lines[0] and "no space left" in lines[0] and "needs about" in lines[0]
  assert "internal error" not in err and "out of memory" not in err
  assert {s: _digest(os.path.join(checkpoint.checkpoint_dir(workdir), str(s)))
          for s in checkpoint.saved_steps(workdir)} == before

  os.remove(filler)  # the same command, once space is freed
  code, _, err = _cli(capsys, args + ["--config.num_train_steps=8"])
  assert code == 0, err[-3000:]
  assert checkpoint.saved_steps(workdir)[-1] == 8


def test_export_to_a_full_disk_leaves_nothing_and_reruns(small_disk, tmp_path, capsys):
  workdir = str(tmp_path / "imported")
  hf.import_to_workdir(base.get_config(), GPT2, workdir)
  out = small_disk / "hf"
  args = [f"--workdir={workdir}", "--mode=export", f"--config.hf_export_dir={out}"]
  filler = _fill(small_disk, 100 * 1024)  # the weights alone are 145 KiB
  code, lines, err = _cli(capsys, args)
  assert code == 2 and len(lines) == 1 and str(out) in lines[0], err[-3000:]
  assert os.listdir(small_disk) == ["filler"]  # no partial export, no temporary directory
  os.remove(filler)
  assert _cli(capsys, args)[0] == 0
  assert "model.safetensors" in os.listdir(out)


def test_import_to_a_full_disk_is_bad_input_and_reruns(small_disk, capsys):
  workdir = small_disk / "imported"
  args = [f"--workdir={workdir}", "--mode=import", f"--config.hf_path={GPT2}"]
  filler = _fill(small_disk, 64 * 1024)  # the checkpoint is about 150 KiB
  code, lines, err = _cli(capsys, args)
  assert code == 2 and len(lines) == 1, err[-3000:]
  assert "no space left" in lines[0] and str(workdir) in lines[0] and "needs about" in lines[0]
  assert not checkpoint.saved_steps(str(workdir))
  os.remove(filler)
  assert _cli(capsys, args)[0] == 0  # what the cut-short write left does not block it
  assert checkpoint.saved_steps(str(workdir)) == [0]


def test_writers_cut_by_enospc_raise_diskfull_and_keep_what_was_there(tmp_path):
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  path = tmp_path / "kept.json"
  path.write_text("old")
  with pytest.raises(files.DiskFull, match=str(path)):
    with files.writing(str(path), "w", "a test file", encoding="utf-8") as f:
      f.write("new, half")
      raise full
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["kept.json"]

  built = tmp_path / "cache"
  with pytest.raises(files.DiskFull, match="the token cache"):
    with files.building_dir(str(built), "the token cache") as tmp:
      with open(os.path.join(tmp, "train.bin"), "wb") as f:
        f.write(b"\1" * 1000)
      raise full
  assert not built.exists() and os.listdir(tmp_path) == ["kept.json"]
  # A writer in native code raises its own type with the OS's message (safetensors, orbax).
  assert files.is_full(RuntimeError("I/O error: No space left on device (os error 28)"))
