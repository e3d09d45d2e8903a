"""Checkpoint properties, through real `main.py` runs where a real process boundary matters.

Killed with SIGKILL in the middle of a checkpoint write and restarted == uninterrupted (bitwise
params, identical loss per step), and the cut-short write is never taken for a checkpoint;
SIGTERM saves the current step and exits 0; a damaged latest checkpoint falls back to the one
before it; a checkpoint written on 8 devices restores on 4 and on 1 with the same eval loss;
the best and the latest checkpoints are kept; an incompatible config is refused; a config whose
optimizer state differs resumes a healthy checkpoint with a fresh optimizer state, never calling
it damaged (also when a newer step is damaged); a diverged run writes nothing of its bad state;
eval/sample load the chosen step.

Runs are subprocesses (a signal needs a process; the device count is fixed when jax starts). The
kill and SIGTERM runs go through `_SLOW_MAIN`, which is main.py with a sleep before each train
step, so that the signal lands mid-run whatever the machine's speed; nothing else differs.
The runs share one persistent compilation cache, so programs they have in common compile once.
"""

import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers  # tests/helpers.py

from llm_jax import checkpoint
from llm_jax import config
from llm_jax import data as data_lib
from llm_jax import resume
from llm_jax import sharding
from llm_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "configs", "base.py")
N = 16  # optimizer steps of the reference run
TINY = dict(vocab_size=256, vocab_multiple=64, byte_fallback=False, d_model=32, n_heads=2,
            n_layers=2, max_seq_len=16, micro_batch_size=4, learning_rate=3e-3, warmup_steps=2,
            num_train_steps=N, save_steps=4, max_to_keep=3, eval_steps=0,
            log_every=1, sample_every_eval=False)
_SLOW_MAIN = """
import os, runpy, sys, time
from llm_jax import train
_delay = float(os.environ["LLM_JAX_TEST_STEP_DELAY"])
_train_step = train.Trainer.train_step
def _slow_train_step(self, state, batch):
  time.sleep(_delay)
  return _train_step(self, state, batch)
train.Trainer.train_step = _slow_train_step
_eval_delay = float(os.environ.get("LLM_JAX_TEST_EVAL_DELAY", 0))
_evaluate = train.evaluate
def _slow_evaluate(eval_step, *args, **kwargs):
  def slow_step(params, batch):
    print("test: evaluating a batch", file=sys.stderr, flush=True)
    time.sleep(_eval_delay)
    return eval_step(params, batch)
  return _evaluate(slow_step, *args, **kwargs)
train.evaluate = _slow_evaluate
sys.argv[0] = "main.py"
runpy.run_path("main.py", run_name="__main__")
"""
_TIMEOUT = 300
# A restore that fails on a damaged checkpoint leaves orbax's other read coroutines to be
# garbage-collected later, which pytest reports as unraisable exceptions: expected here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# --- helpers ----------------------------------------------------------------------------------


def _write_corpus(root):
  """A few files of pseudo-words (seeded): enough text for a 256-piece tokenizer and 69 steps."""
  rng = np.random.default_rng(0)
  syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ba", "de", "fo", "gu", "ha", "ji",
               "pe", "qu", "ri", "so", "tu", "we"]
  words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(300)]

  def doc(n_lines):
    return "\n".join(" ".join(rng.choice(words, size=rng.integers(3, 10))).capitalize()
                     + str(rng.choice([".", ",", "!", "?"])) for _ in range(n_lines)) + "\n"

  for split, n_files, n_lines in (("train", 8, 60), ("val", 1, 40)):
    os.makedirs(os.path.join(root, split))
    for i in range(n_files):
      with open(os.path.join(root, split, f"{i}.txt"), "w", encoding="utf-8") as f:
        f.write(doc(n_lines))


@dataclasses.dataclass(frozen=True)
class Corpus:
  fields: dict  # config fields of the dataset, its data_dir and tokenizer
  jax_cache: str  # persistent compilation cache shared by the runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A tiny text: dataset; its tokenizer and token cache are built once here, before any run."""
  root = str(tmp_path_factory.mktemp("corpus"))
  _write_corpus(os.path.join(root, "text"))
  c = Corpus(fields=dict(dataset=f"text:{root}/text/train", validation=f"{root}/text/val/*.txt",
                         data_dir=os.path.join(root, "data"),
                         tokenizer_path=os.path.join(root, "tokenizer.model")),
             jax_cache=os.path.join(root, "jax_cache"))
  data_lib.build(_cfg(c), None, 0, 1)
  return c


def _cfg(corpus, **overrides):
  return config.load(BASE_CONFIG, **{**TINY, **corpus.fields, **overrides})


def _command(workdir, corpus, mode="train", slow=False, **overrides):
  fields = {**TINY, **corpus.fields, **overrides}
  flags = [f"--config.{k}={v}" for k, v in fields.items()]
  head = [sys.executable, "-c", _SLOW_MAIN] if slow else [sys.executable, "main.py"]
  return head + [f"--config={BASE_CONFIG}", f"--workdir={workdir}", f"--mode={mode}"] + flags


def _env(corpus, devices=None, delay=None, eval_delay=None):
  env = helpers.child_env(devices)
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2",
             JAX_COMPILATION_CACHE_DIR=corpus.jax_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  if delay is not None:
    env["LLM_JAX_TEST_STEP_DELAY"] = str(delay)
  if eval_delay is not None:
    env["LLM_JAX_TEST_EVAL_DELAY"] = str(eval_delay)
  return env


def _run(workdir, corpus, mode="train", devices=None, **overrides):
  """Runs main.py to the end; returns (exit code, stdout + stderr)."""
  p = subprocess.run(_command(workdir, corpus, mode, **overrides), cwd=ROOT,
                     env=_env(corpus, devices), capture_output=True, text=True,
                     timeout=_TIMEOUT, check=False)
  return p.returncode, p.stdout + p.stderr


def _start_slow(workdir, corpus, log_path, delay=0.15, eval_delay=None, **overrides):
  log = open(log_path, "w", encoding="utf-8")  # a file, not a pipe: nothing blocks on a full pipe
  return subprocess.Popen(_command(workdir, corpus, slow=True, **overrides), cwd=ROOT,
                          env=_env(corpus, delay=delay, eval_delay=eval_delay), stdout=log,
                          stderr=subprocess.STDOUT), log


def _end(proc, log):
  if proc.poll() is None:  # a failed test leaves no run behind (a stopped one included)
    proc.kill()
    proc.wait(timeout=60)
  log.close()


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _wait_for(condition, proc, log_path, timeout=_TIMEOUT):
  deadline = time.time() + timeout
  while not condition():
    if proc.poll() is not None:
      pytest.fail(f"the run ended (exit {proc.returncode}) before the awaited point:\n"
                  + _read(log_path)[-3000:])
    if time.time() > deadline:
      proc.kill()
      pytest.fail("timed out waiting for the run")
    time.sleep(0.02)


def _ckpt_entries(workdir):
  d = checkpoint.checkpoint_dir(workdir)
  return sorted(os.listdir(d)) if os.path.isdir(d) else []


def _steps_on_disk(workdir):
  """Step directories under their final name: orbax renames a step's tmp dir once complete."""
  return sorted(int(n) for n in _ckpt_entries(workdir) if n.isdigit())


def _train_records(workdir, key="train/loss"):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [(r["step"], r[key]) for r in map(json.loads, f) if key in r]


def _one_device_trainer(cfg):
  # One device whatever this test process has, so every batch size divides the mesh.
  return train.Trainer(cfg, 1, mesh=sharding.make_mesh(cfg, jax.devices()[:1]))


def _resume(workdir, cfg, caplog, level=logging.WARNING):
  """(trainer, state) of `cfg` resuming `workdir` through the Checkpointer (its log into caplog)."""
  trainer = _one_device_trainer(cfg)
  ckpt = checkpoint.Checkpointer(workdir, cfg, steps_per_epoch=69)
  try:
    with caplog.at_level(level):
      return trainer, ckpt.restore_or_init(trainer, data_lib.build(cfg, workdir).train_iter())
  finally:
    ckpt.close()


def _load(workdir, cfg, step=None):
  trainer = _one_device_trainer(cfg)
  params, got, saved_cfg, _ = checkpoint.load_params(
      workdir, trainer.abstract_params, trainer.param_shardings, step)
  return jax.device_get(params), got, saved_cfg


def _resumed_at(output):
  m = re.search(r"resumed at step (\d+)", output)
  assert m, output[-3000:]
  return int(m.group(1))


@pytest.fixture(scope="module")
def pool():
  """Runs that no other run waits for go in the background, two at a time, beside the rest."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as executor:
    yield executor


@pytest.fixture(scope="module")
def reference(corpus, sharded, diverged, tmp_path_factory):
  """The uninterrupted run: its workdir, loss per step and final params.

  Asking for `sharded` and `diverged` starts those runs in the background alongside this one.
  """
  del sharded, diverged
  workdir = str(tmp_path_factory.mktemp("reference"))
  rc, out = _run(workdir, corpus)
  assert rc == 0, out[-3000:]
  records = _train_records(workdir)
  assert [s for s, _ in records] == list(range(1, N + 1))  # one record per step, no repeats
  params, step, _ = _load(workdir, _cfg(corpus))
  assert step == N
  return dict(workdir=workdir, loss=dict(records), params=params)


def _assert_same_training(workdir, reference, corpus):
  """Every logged loss equals the reference's at its step, all N steps, and the same params."""
  records = _train_records(workdir)
  assert {s for s, _ in records} == set(range(1, N + 1))
  for s, loss in records:  # a killed part's steps are logged again after the resume: both agree
    assert loss == reference["loss"][s], (s, loss, reference["loss"][s])
  params, step, _ = _load(workdir, _cfg(corpus))
  assert step == N
  helpers.assert_bitwise_equal(params, reference["params"])


# --- resume == uninterrupted ------------------------------------------------------------------


def _steps_being_written(workdir):
  """Steps whose write is in progress: orbax writes into <step>.orbax-checkpoint-tmp*."""
  return [int(m.group(1)) for m in map(re.compile(r"(\d+)\.orbax-checkpoint-tmp").match,
                                       _ckpt_entries(workdir)) if m]


def test_sigkill_mid_write_and_restart_equals_uninterrupted_run(corpus, reference, tmp_path):
  workdir = str(tmp_path / "run")
  log_path = tmp_path / "killed.log"
  proc, log = _start_slow(workdir, corpus, log_path)
  try:
    # Kill while a checkpoint after step N/2 is being written: freeze the process as soon as its
    # tmp directory shows, and kill it if the write is still unfinished (else let it go on).
    while True:
      _wait_for(lambda: any(s > N // 2 for s in _steps_being_written(workdir)), proc, log_path)
      proc.send_signal(signal.SIGSTOP)
      if any(s > N // 2 for s in _steps_being_written(workdir)):
        break
      proc.send_signal(signal.SIGCONT)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    _end(proc, log)
  assert proc.returncode == -signal.SIGKILL
  steps, cut_short = _steps_on_disk(workdir), _steps_being_written(workdir)
  assert N // 2 in steps and N not in steps and max(cut_short) > max(steps)

  # Atomic writes: the manager reports only complete steps, and each of them restores.
  cfg = _cfg(corpus)
  reader = checkpoint._manager(workdir, read_only=True)  # pylint: disable=protected-access
  try:
    assert list(reader.all_steps()) == steps
  finally:
    reader.close()
  for s in steps:
    assert _load(workdir, cfg, s)[1] == s

  rc, out = _run(workdir, corpus)
  assert rc == 0, out[-3000:]
  assert _resumed_at(out) == max(steps)
  _assert_same_training(workdir, reference, corpus)
  assert not _steps_being_written(workdir)  # the killed write's leftovers are cleaned up


def test_sigterm_saves_current_step_exits_zero_and_resumes(corpus, reference, tmp_path):
  workdir = str(tmp_path / "run")
  log_path = tmp_path / "terminated.log"
  # save_steps beyond the run: the only checkpoint before the end is the one SIGTERM asks for.
  fields = dict(save_steps=1000)
  proc, log = _start_slow(workdir, corpus, log_path, **fields)
  try:
    metrics_path = os.path.join(workdir, "metrics.jsonl")  # complete lines: 3 steps logged
    _wait_for(lambda: os.path.exists(metrics_path) and _read(metrics_path).count("\n") >= 3,
              proc, log_path)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
  finally:
    _end(proc, log)
  out = _read(log_path)
  assert proc.returncode == 0, out[-3000:]
  m = re.search(r"stopped by a signal at step (\d+)", out)
  assert m, out[-3000:]
  stopped = int(m.group(1))
  assert 3 <= stopped < N
  assert _steps_on_disk(workdir) == [stopped]
  assert max(s for s, _ in _train_records(workdir)) == stopped  # saved at the step it reached
  params, step, _ = _load(workdir, _cfg(corpus))
  assert step == stopped

  rc, out = _run(workdir, corpus, **fields)
  assert rc == 0, out[-3000:]
  assert _resumed_at(out) == stopped
  _assert_same_training(workdir, reference, corpus)


def test_sigterm_during_an_evaluation_saves_that_step_within_seconds_and_resumes(
    corpus, reference, tmp_path):
  # The evaluation at step 8 takes a second per batch: the signal lands in the middle of it.
  workdir = str(tmp_path / "run")
  log_path = tmp_path / "terminated.log"
  fields = dict(save_steps=1000, eval_steps=8)
  proc, log = _start_slow(workdir, corpus, log_path, delay=0.05, eval_delay=1.0, **fields)
  try:
    _wait_for(lambda: "test: evaluating a batch" in _read(log_path), proc, log_path)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    took = time.monotonic() - sent
  finally:
    _end(proc, log)
  out = _read(log_path)
  assert proc.returncode == 0, out[-3000:]
  assert took < 10, took  # the bound: a preempted VM has about 30 s
  assert "stopped by a signal at step 8" in out, out[-3000:]
  assert _steps_on_disk(workdir) == [8]
  assert max(s for s, _ in _train_records(workdir)) == 8  # not a step more
  assert not [s for s, _ in _train_records(workdir, "eval/loss")]  # the cut-short one not logged

  rc, out = _run(workdir, corpus, **fields)
  assert rc == 0, out[-3000:]
  assert _resumed_at(out) == 8
  _assert_same_training(workdir, reference, corpus)
  assert [s for s, _ in _train_records(workdir, "eval/loss")] == [16]


def test_sigterm_during_the_final_evaluation_saves_the_last_step_and_the_rerun_evaluates_it(
    corpus, reference, tmp_path):
  # The report: SIGTERM in the final evaluation (of the whole validation split) went on
  # evaluating for minutes. Now the evaluation stops at its next batch, the last step is saved,
  # and the same command runs the final evaluation it missed and nothing else.
  workdir = str(tmp_path / "run")
  log_path = tmp_path / "terminated.log"
  fields = dict(save_steps=1000)  # eval_steps=0: the only evaluation is the final one
  proc, log = _start_slow(workdir, corpus, log_path, delay=0.02, eval_delay=1.0, **fields)
  try:
    _wait_for(lambda: "test: evaluating a batch" in _read(log_path), proc, log_path)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    took = time.monotonic() - sent
  finally:
    _end(proc, log)
  out = _read(log_path)
  assert proc.returncode == 0 and took < 10, (took, out[-3000:])
  assert f"stopped by a signal at step {N}" in out, out[-3000:]
  assert _steps_on_disk(workdir) == [N]
  assert not [s for s, _ in _train_records(workdir, "eval/loss")]

  rc, out = _run(workdir, corpus, **fields)
  assert rc == 0, out[-3000:]
  assert _resumed_at(out) == N and f"step {N}: eval loss" in out, out[-3000:]
  _assert_same_training(workdir, reference, corpus)
  assert (_train_records(workdir, "eval/loss")
          == _train_records(reference["workdir"], "eval/loss"))  # the same final evaluation


def test_readers_beside_a_saving_run_load_only_complete_checkpoints(corpus, reference, tmp_path):
  # What --mode=eval, sample and export do first (loader.load), in a loop against a live run
  # saving every 4 steps: each load succeeds, and the params of every step it got equal, to the
  # bit, that step's checkpoint in the uninterrupted reference run (the same steps).
  from llm_jax import loader
  workdir = str(tmp_path / "run")
  cfg = _cfg(corpus)
  proc, log = _start_slow(workdir, corpus, tmp_path / "live.log", delay=0.4)
  seen = {}
  try:
    while proc.poll() is None:
      if not _steps_on_disk(workdir):
        time.sleep(0.05)
        continue
      loaded = loader.load(workdir, cfg)
      seen.setdefault(loaded.step, jax.device_get(loaded.params))
  finally:
    _end(proc, log)
  assert proc.returncode == 0, _read(tmp_path / "live.log")[-3000:]
  kept = set(_steps_on_disk(reference["workdir"]))
  assert len(seen) >= 2 and set(seen) & kept, (sorted(seen), sorted(kept))
  for step, params in seen.items():
    if step in kept:
      helpers.assert_bitwise_equal(params, _load(reference["workdir"], cfg, step)[0])


# --- damaged checkpoints ----------------------------------------------------------------------


def _truncate_largest_file(directory):
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def test_damaged_latest_checkpoint_falls_back_to_previous(corpus, reference, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference["workdir"], workdir)
  latest, previous = _steps_on_disk(workdir)[-1], _steps_on_disk(workdir)[-2]
  assert latest == N
  damaged = os.path.join(checkpoint.checkpoint_dir(workdir), str(latest))
  _truncate_largest_file(os.path.join(damaged, "params"))
  cfg = _cfg(corpus)

  with caplog.at_level(logging.WARNING):
    params, step, _ = _load(workdir, cfg)
  assert step == previous
  assert damaged in caplog.text and "damaged" in caplog.text
  helpers.assert_bitwise_equal(params, _load(reference["workdir"], cfg, previous)[0])

  # Training resumes from the previous step, sets the damaged one aside and writes that step
  # again: the run still ends exactly where the uninterrupted one did.
  rc, out = _run(workdir, corpus)
  assert rc == 0, out[-3000:]
  assert damaged in out
  assert _resumed_at(out) == previous
  assert os.path.isdir(os.path.join(workdir, "damaged_checkpoints", str(latest)))
  params, step, _ = _load(workdir, cfg)
  assert step == N
  helpers.assert_bitwise_equal(params, reference["params"])


# --- resharding -------------------------------------------------------------------------------


SHARDED = dict(num_train_steps=4, save_steps=2, eval_steps=2, micro_batch_size=8,
               mesh_shape="(1,8,1)")


@pytest.fixture(scope="module")
def sharded(corpus, pool, tmp_path_factory):
  """In the background: a run on 8 devices (params over fsdp), then --mode=eval of its step 2 on
  4 devices with another mesh. A future of (workdir, (rc, output) of each)."""
  workdir = str(tmp_path_factory.mktemp("sharded"))

  def runs():
    trained = _run(workdir, corpus, devices=8, **SHARDED)
    evaluated = _run(workdir, corpus, mode="eval", devices=4,
                     **{**SHARDED, "mesh_shape": "(2,2,1)", "checkpoint_step": 2})
    return workdir, trained, evaluated
  return pool.submit(runs)


def test_checkpoint_from_8_devices_restores_on_4_and_1_with_same_eval_loss(corpus, sharded):
  workdir, (rc, out), (rc_eval, out_eval) = sharded.result()
  assert rc == 0, out[-3000:]
  assert "'fsdp': 8" in out  # the run's mesh, as it printed it
  assert _steps_on_disk(workdir) == [2, 4]
  with open(os.path.join(checkpoint.checkpoint_dir(workdir), "4", "params", "_sharding")) as f:
    saved_specs = [json.loads(v)["partition_spec"] for v in json.load(f).values()]
  assert any("fsdp" in spec for spec in saved_specs)  # saved from shards, not a replicated copy
  eval_loss = dict(_train_records(workdir, "eval/loss"))
  assert set(eval_loss) == {2, 4}

  # 4 devices, another mesh, an older step chosen with checkpoint_step: through --mode=eval.
  assert rc_eval == 0, out_eval[-3000:]
  m = re.search(r"eval of checkpoint 2 .*?: loss ([0-9.]+)", out_eval)
  assert m, out_eval[-3000:]
  assert abs(float(m.group(1)) - eval_loss[2]) <= 1e-4  # printed with 4 decimals

  # 1 device (this process), the latest step.
  cfg = _cfg(corpus, **{**SHARDED, "mesh_shape": (-1, 1, 1)})
  trainer = _one_device_trainer(cfg)
  params, step, _, _ = checkpoint.load_params(workdir, trainer.abstract_params,
                                              trainer.param_shardings)
  assert step == 4
  ev = trainer.evaluate(params, data_lib.build(cfg, workdir).eval_batches(), cfg.eval_batches)
  np.testing.assert_allclose(ev["loss"], eval_loss[4], rtol=2e-5)


# --- what is kept -----------------------------------------------------------------------------


def _tiny_state(value):
  return train.TrainState(step=jnp.asarray(value, jnp.int32),
                          params={"w": jnp.full((3,), value, jnp.float32)},
                          opt_state={"mu": jnp.zeros((3,), jnp.float32)},
                          rng=jax.random.key(value))


def test_keeps_best_and_latest_across_restarts(corpus, tmp_path):
  workdir = str(tmp_path / "run")
  cfg = _cfg(corpus, max_to_keep=2)
  data_iter = iter(grain.MapDataset.range(100).to_iter_dataset())
  eval_loss = {1: 3.0, 2: 1.0, 3: 2.0, 5: 2.5, 9: 0.5}  # steps 4, 6, 7, 8: saved without an eval
  saved = []

  def expected():  # the 2 most recent, and the lowest eval loss among the saved steps
    best = min((s for s in saved if s in eval_loss), key=eval_loss.get)
    return sorted(set(saved[-2:]) | {best})

  def save_steps(ckpt, steps):
    for s in steps:
      if s in eval_loss:
        ckpt.record_eval(s, eval_loss[s])
      ckpt.save(s, _tiny_state(s), data_iter)
      ckpt.wait()
      saved.append(s)
      assert list(ckpt.mngr.all_steps()) == expected(), s
      assert _steps_on_disk(workdir) == expected()

  def run(steps):  # one run's Checkpointer
    ckpt = checkpoint.Checkpointer(workdir, cfg, steps_per_epoch=100)
    try:
      save_steps(ckpt, steps)
    finally:
      ckpt.close()

  run([1, 2, 3, 4, 5, 6])
  assert _steps_on_disk(workdir) == [2, 5, 6]
  run([7, 8, 9])  # a new run in the same workdir still knows step 2 is the best
  assert _steps_on_disk(workdir) == [8, 9]


# --- config changes ---------------------------------------------------------------------------


def test_incompatible_config_is_refused_and_compatible_change_is_logged(corpus, reference,
                                                                        tmp_path, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference["workdir"], workdir)
  before = sorted(os.listdir(checkpoint.checkpoint_dir(workdir)))

  rc, out = _run(workdir, corpus, d_model=48)
  assert rc == 2, out[-3000:]
  assert "error: the config changes the model's shape" in out and "d_model: 32 -> 48" in out
  assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == before  # nothing touched

  _, state = _resume(workdir, _cfg(corpus, learning_rate=1e-3), caplog, logging.INFO)
  assert "learning_rate: 0.003 -> 0.001" in caplog.text
  assert int(state.step) == N
  helpers.assert_bitwise_equal(jax.device_get(state.params), reference["params"])


def _saved_run(corpus, workdir, steps=(2, 4), **overrides):
  """A workdir with checkpoints at `steps` of random params and a used optimizer state (Adam
  moments non-zero), saved by the project's Checkpointer without training (nothing compiles)."""
  cfg = _cfg(corpus, **overrides)
  trainer = _one_device_trainer(cfg)
  it = data_lib.build(cfg, workdir).train_iter()
  ckpt = checkpoint.Checkpointer(workdir, cfg, steps_per_epoch=69)
  try:
    for s in steps:
      params = helpers.random_params(trainer.abstract_params, seed=s)
      opt_state = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x,
                               trainer.tx.init(params))
      while it.get_state()["next_index"] < s:  # the position a run at step s is at
        next(it)
      ckpt.save(s, train.TrainState(step=jnp.asarray(s, jnp.int32), params=params,
                                    opt_state=opt_state, rng=jax.random.key(s)), it)
  finally:
    ckpt.close()
  return cfg


def _files(directory):
  return {os.path.join(d, f): os.path.getsize(os.path.join(d, f))
          for d, _, fs in os.walk(directory) for f in fs}


def _schedule_counts(opt_state):
  """(Adam's step counts, the schedule's step counts) of an optax state."""
  adam, sched = [], []
  for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, (optax.ScaleByAdamState, optax.ScaleByScheduleState))):
    if isinstance(node, optax.ScaleByAdamState):
      adam.append(int(node.count))
    elif isinstance(node, optax.ScaleByScheduleState):
      sched.append(int(node.count))
  return adam, sched


@pytest.mark.parametrize("change", [
    dict(max_grad_norm=0.0, num_train_steps=40),  # clipping's state leaves the optimizer tree
    dict(grad_accum="multisteps", gradient_accumulation_steps=2, micro_batch_size=2),
])
def test_changed_optimizer_resumes_healthy_checkpoint_with_fresh_optimizer_state(
    corpus, tmp_path, caplog, change):
  workdir = str(tmp_path / "run")
  saved_cfg = _saved_run(corpus, workdir)
  saved = _load(workdir, saved_cfg)[0]
  before = _files(workdir)
  trainer, state = _resume(workdir, _cfg(corpus, **change), caplog)
  # Never called damaged, never moved: the checkpoint files are as they were.
  assert "damaged" not in caplog.text
  assert not os.path.exists(os.path.join(workdir, "damaged_checkpoints"))
  assert _files(workdir) == before
  # What matches is restored exactly; the optimizer state is this config's, fresh, with the
  # learning-rate schedule at the restored step.
  assert int(state.step) == 4
  helpers.assert_bitwise_equal(jax.device_get(state.params), saved)
  np.testing.assert_array_equal(jax.random.key_data(state.rng),
                                jax.random.key_data(jax.random.key(4)))
  assert jax.tree.structure(state) == jax.tree.structure(trainer.abstract_state())
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert moments and all(not np.any(np.asarray(x)) for x in moments)
  adam, sched = _schedule_counts(state.opt_state)
  assert adam == [0] and sched == [4]
  # The warning names the fields that changed the optimizer, what was kept and the way back,
  # and nothing else (num_train_steps changes the schedule's length, not the state's tree).
  text = caplog.text
  assert "NEW optimizer state" in text and "Restored: params, step, rng" in text
  if "max_grad_norm" in change:
    assert "max_grad_norm: 1.0 -> 0.0" in text and "--config.max_grad_norm=1.0" in text
    assert "--config.num_train_steps" not in text
  else:
    assert "--config.grad_accum='scan'" in text
    assert "--config.gradient_accumulation_steps=1" in text


def test_schedule_free_resumes_its_trained_params_whatever_the_optimizer_now(corpus, tmp_path,
                                                                             caplog):
  """Schedule-free saves its average as `params` (what eval and sample read) and the params it
  trains beside its state: a resume continues from the trained ones, also with another optimizer
  (whose state then starts afresh)."""
  workdir = str(tmp_path / "run")
  cfg = _cfg(corpus, optimizer="schedule_free_adamw", lr_decay="constant")
  trainer = _one_device_trainer(cfg)
  it = data_lib.build(cfg, workdir).train_iter()
  trained = helpers.random_params(trainer.abstract_params, seed=1)
  averaged = helpers.random_params(trainer.abstract_params, seed=2)
  ckpt = checkpoint.Checkpointer(workdir, cfg, steps_per_epoch=69)
  try:
    while it.get_state()["next_index"] < 2:
      next(it)
    ckpt.save(2, train.TrainState(step=jnp.asarray(2, jnp.int32), params=trained,
                                  opt_state=trainer.tx.init(trained), rng=jax.random.key(2)),
              it, params=averaged)
  finally:
    ckpt.close()
  helpers.assert_bitwise_equal(_load(workdir, cfg)[0], jax.device_get(averaged))
  for now in (cfg, _cfg(corpus)):  # the same optimizer, then AdamW
    _, state = _resume(workdir, now, caplog)
    assert int(state.step) == 2
    helpers.assert_bitwise_equal(jax.device_get(state.params), jax.device_get(trained))
  assert "NEW optimizer state" in caplog.text and "optimizer" in caplog.text.split(
      "NEW optimizer state", 1)[1]
  assert "damaged" not in caplog.text


def test_damaged_newer_and_changed_older_checkpoint(corpus, tmp_path, caplog, monkeypatch):
  workdir = str(tmp_path / "run")
  saved_cfg = _saved_run(corpus, workdir)
  older = _load(workdir, saved_cfg, 2)[0]
  _truncate_largest_file(os.path.join(checkpoint.checkpoint_dir(workdir), "4", "params"))
  cfg = _cfg(corpus, max_grad_norm=0.0)
  trainer = _one_device_trainer(cfg)
  data_iter = data_lib.build(cfg, workdir).train_iter()
  ckpt = checkpoint.Checkpointer(workdir, cfg, steps_per_epoch=69)
  try:
    with caplog.at_level(logging.WARNING):
      state = ckpt.restore_or_init(trainer, data_iter)
    # The damaged step is set aside; the healthy older one, only changed, is used and kept.
    assert int(state.step) == 2 and data_iter.get_state() == {"next_index": 2}
    helpers.assert_bitwise_equal(jax.device_get(state.params), older)
    assert os.path.isdir(os.path.join(workdir, "damaged_checkpoints", "4"))
    assert _steps_on_disk(workdir) == [2]
    assert "NEW optimizer state" in caplog.text
    # A data position saved by another number of processes is taken from the step instead.
    fresh = data_lib.build(cfg, workdir).train_iter()
    resume.position_at(fresh, 2)
    np.testing.assert_array_equal(next(fresh)["inputs"], next(data_iter)["inputs"])
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    params_target, train_target = resume.targets(trainer)
    plan = resume.plan(ckpt.mngr, 2, cfg, params_target, train_target)
    assert plan.data == resume.DATA_FROM_STEP
  finally:
    ckpt.close()


# --- divergence -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diverged(corpus, pool, tmp_path_factory):
  """In the background: a run saving every step, plain SGD with a learning rate of 10 x step:
  its state after step 1 is sane (saved; eval loss about 6.8 from 5.6) and after step 2 absurd.
  A future of (workdir, the step it stopped at)."""
  workdir = str(tmp_path_factory.mktemp("diverged"))

  def run():
    rc, out = _run(workdir, corpus, optimizer="sgd", momentum=0.0, learning_rate=1e4,
                   warmup_steps=1000, lr_decay="constant", max_grad_norm=0.0, save_steps=1,
                   num_train_steps=30)
    assert rc == 1, out[-3000:]
    m = re.search(r"training stopped: (?:loss is \S+|loss exploded to \S+|parameters became "
                  r"NaN/Inf) at step (\d+)", out)
    assert m, out[-3000:]
    return workdir, int(m.group(1))
  return pool.submit(run)


def test_diverged_run_saves_nothing_of_the_diverged_state(corpus, diverged):
  workdir, stopped = diverged.result()
  steps = _steps_on_disk(workdir)
  assert steps and stopped >= 2
  assert max(steps) < stopped  # the step it diverged at was due a save (save_steps=1)
  # What was saved is sane: finite params whose validation loss is nowhere near the explosion
  # threshold (the state after the first absurd update would be far past it).
  cfg = _cfg(corpus)
  first_loss = _train_records(workdir)[0][1]
  trainer = _one_device_trainer(cfg)
  batches = list(data_lib.build(cfg, workdir).eval_batches(cfg.eval_batches))
  for s in steps:
    params, _, _ = _load(workdir, cfg, s)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), s
    loss = trainer.evaluate(params, batches)["loss"]
    assert loss < 2 * first_loss < cfg.loss_explosion_factor * first_loss, (s, loss)


# --- loading for eval and sampling ------------------------------------------------------------


def test_load_params_chooses_steps_and_names_what_is_missing(corpus, reference, tmp_path):
  cfg = _cfg(corpus)
  steps = _steps_on_disk(reference["workdir"])
  assert steps == [N - 8, N - 4, N]  # max_to_keep=3
  params_latest, step, saved_cfg = _load(reference["workdir"], cfg)
  assert step == N and saved_cfg["d_model"] == 32
  helpers.assert_bitwise_equal(params_latest, reference["params"])
  params_older, step, _ = _load(reference["workdir"], cfg, N - 8)
  assert step == N - 8
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_older),
                                                      jax.tree.leaves(params_latest)))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"checkpoint_step=3 .*available: \[8, 12, 16\]"):
    _load(reference["workdir"], cfg, 3)
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .*train first"):
    _load(str(tmp_path / "empty"), cfg)


def test_sample_mode_loads_the_chosen_checkpoint(corpus, reference):
  rc, out = _run(reference["workdir"], corpus, mode="sample", checkpoint_step=N - 4,
                 max_new_tokens=4, do_sample=False)
  assert rc == 0, out[-3000:]
  assert f"# checkpoint {N - 4} from {reference['workdir']}" in out
