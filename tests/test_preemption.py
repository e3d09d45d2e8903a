"""SIGTERM in every phase of a real main.py process (llm_jax/preemption.py).

Each phase test runs main.py through `_PAUSING_MAIN`, which wraps one function of the phase so
that the process announces it is there and sleeps: the signal lands in the middle of the phase
whatever the machine's speed, after the phase's writing has begun where it writes. Then: the
process ends within 10 s (a preempted VM has about 30 s), with exit 0 for training (a rerun
continues) and 128 + 15 for the other modes, and leaves nothing half-written (the writers build
under a temporary name renamed when complete: llm_jax/files.py). A training run stopped between
steps or mid-evaluation saves and resumes exactly: tests/test_checkpoint.py. The watcher test
holds the main thread in native code, as an XLA compile or a device computation does.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import helpers  # tests/helpers.py

import main
from configs import base
from llm_jax import checkpoint
from llm_jax import config
from llm_jax import data as data_lib
from llm_jax import hf
from llm_jax import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "configs", "base.py")
GPT2 = os.path.join(ROOT, "tests", "fixtures", "hf", "gpt2")
TINY = dict(vocab_size=128, vocab_multiple=64, byte_fallback=False, d_model=32, n_heads=2,
            n_layers=1, max_seq_len=16, micro_batch_size=4, num_train_steps=2, eval_steps=0,
            sample_every_eval=False)
BOUND_S = 10  # the bound from the signal to the end of the process
_MARK = "test: paused in the phase"
_PAUSING_MAIN = f"""
import importlib, os, runpy, sys, time
module, name, when = os.environ["LLM_JAX_TEST_PAUSE"].split(":")
owner = importlib.import_module(module)
*path, name = name.split(".")  # a function, or a method: Class.method
for part in path:
  owner = getattr(owner, part)
real = getattr(owner, name)
def paused(*args, **kwargs):
  if when == "before":
    print({_MARK!r}, file=sys.stderr, flush=True)
    time.sleep(60)
  out = real(*args, **kwargs)
  if when == "after":  # the phase has written this much: the rest is cut off
    print({_MARK!r}, file=sys.stderr, flush=True)
    time.sleep(60)
  return out
setattr(owner, name, paused)
study = os.environ.get("LLM_JAX_TEST_STUDY")
if study:  # python -m experiments.<study>
  runpy.run_module(study, run_name="__main__", alter_sys=True)
else:
  sys.argv[0] = "main.py"
  runpy.run_path("main.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def text(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("text"))
  helpers.write_corpus(root)
  return dict(dataset=f"text:{root}/train", validation=f"{root}/val/*.txt")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """A workdir holding the tiny GPT-2 fixture, imported in-process."""
  workdir = str(tmp_path_factory.mktemp("imported"))
  hf.import_to_workdir(base.get_config(), GPT2, workdir)
  return workdir


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A workdir with one checkpoint (random params, nothing trained or compiled) and its text,
  shared by the reading phases (eval, sample, tasks, the studies given --workdir)."""
  return helpers.saved_run(str(tmp_path_factory.mktemp("saved")), TINY)


def _on_saved(saved, mode, *extra, **fields):
  return ([f"--config={BASE_CONFIG}", f"--workdir={saved['workdir']}", f"--mode={mode}", *extra]
          + [f"--config.{k}={v}" for k, v in {**saved["fields"], **fields}.items()])


def _stop_in_phase(tmp_path, pause: str, args: list[str], study: str = "",
                   sig=signal.SIGTERM) -> tuple[int, float, str]:
  """Runs main.py (or `python -m <study>`) with `args`, paused at `pause`
  (module:function:before|after); sends `sig` there. Returns (exit code, seconds from the
  signal to the end, output)."""
  log_path = tmp_path / "run.log"
  env = helpers.child_env()
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2",
             LLM_JAX_TEST_PAUSE=pause, LLM_JAX_TEST_STUDY=study)
  with open(log_path, "w", encoding="utf-8") as log:
    proc = subprocess.Popen([sys.executable, "-c", _PAUSING_MAIN] + args, cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 300
      while _MARK not in log_path.read_text(encoding="utf-8"):
        if proc.poll() is not None or time.monotonic() > deadline:
          pytest.fail(f"the run ended (exit {proc.poll()}) before the phase:\n"
                      + log_path.read_text(encoding="utf-8")[-3000:])
        time.sleep(0.05)
      sent = time.monotonic()
      proc.send_signal(sig)
      proc.wait(timeout=60)
      took = time.monotonic() - sent
      if os.environ.get("LLM_JAX_TEST_TIMINGS"):  # the README's figures: signal to exit
        with open(os.environ["LLM_JAX_TEST_TIMINGS"], "a", encoding="utf-8") as f:
          f.write(f"{pause} {study} {sig.name} {took:.2f}\n")
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return proc.returncode, took, log_path.read_text(encoding="utf-8")


def _tree(directory) -> list[str]:
  return sorted(os.path.relpath(os.path.join(r, f), directory)
                for r, ds, fs in os.walk(directory) for f in fs + ds) if os.path.isdir(
                    directory) else []


def _train_args(text, tmp_path):
  fields = {**TINY, **text, "data_dir": str(tmp_path / "data")}
  return ([f"--config={BASE_CONFIG}", f"--workdir={tmp_path / 'run'}", "--mode=train"]
          + [f"--config.{k}={v}" for k, v in fields.items()])


def _complete_caches(tokens_dir) -> list:
  return [p for p in os.listdir(tokens_dir) if os.path.exists(tokens_dir / p / "meta.json")] \
      if os.path.isdir(tokens_dir) else []


def test_kill_9_mid_token_cache_leaves_nothing_that_loads_and_the_rebuild_is_whole(text, tmp_path):
  """Killed after the first unit's shards: no cache a run would trust, the finished unit kept in
  <key>.partial, nothing half-written; the next run continues from it to the same bytes as a
  build never interrupted."""
  rc, _, out = _stop_in_phase(tmp_path, "llm_jax.tokens:run_job:after",
                              _train_args(text, tmp_path), sig=signal.SIGKILL)
  assert rc == -signal.SIGKILL, out[-3000:]
  tokens = tmp_path / "data" / "tokens"
  assert not _complete_caches(tokens)
  partial = [p for p in os.listdir(tokens) if p.endswith(".partial")]
  assert len(partial) == 1
  left = os.listdir(tokens / partial[0])
  assert "unit-00000.json" in left and not [p for p in left if p.startswith(".tmp-")], left
  cfg = config.load(BASE_CONFIG, **{**TINY, **text, "data_dir": str(tmp_path / "data")})
  got = data_lib.build(cfg, str(tmp_path / "run"))  # the next run, with no cleanup
  fresh = data_lib.build(config.load(BASE_CONFIG, **{**TINY, **text,
                                                     "data_dir": str(tmp_path / "fresh")}),
                         str(tmp_path / "fresh_run"))
  built = _complete_caches(tokens)
  assert len(built) == 1 and not [p for p in os.listdir(tokens) if p.endswith(".partial")]
  want_dir = tmp_path / "fresh" / "tokens" / _complete_caches(tmp_path / "fresh" / "tokens")[0]
  names = sorted(p for p in os.listdir(want_dir) if p.endswith((".bin", ".docs")))
  assert names and names == sorted(p for p in os.listdir(tokens / built[0])
                                   if p.endswith((".bin", ".docs")))
  for name in names:  # the same bytes as a build never interrupted
    assert (tokens / built[0] / name).read_bytes() == (want_dir / name).read_bytes()
  assert got.steps_per_epoch == fresh.steps_per_epoch


@pytest.mark.parametrize("phase,pause", [
    ("dataset", "llm_jax.sources:plan_units:after"),  # files listed and checked, none tokenized
    ("tokenizer", "llm_jax.data:_corpus_sample:after"),  # read; SentencePiece not yet run
    ("tokens", "llm_jax.tokens:run_job:after"),  # the first unit tokenized, not the second
])
def test_signal_in_a_training_build_phase_exits_zero_and_keeps_nothing_partial(
    text, tmp_path, phase, pause):
  rc, took, out = _stop_in_phase(tmp_path, pause, _train_args(text, tmp_path))
  assert rc == 0 and took < BOUND_S, (rc, took, out[-3000:])
  assert "stopped by SIGTERM during --mode=train" in out, out[-3000:]
  data = _tree(tmp_path / "data")
  assert not [p for p in data if ".tmp-" in p], data  # nothing half-written anywhere
  assert not _complete_caches(tmp_path / "data" / "tokens")
  if phase == "dataset":
    assert not [p for p in data if p.startswith("tokens")], data
  elif phase == "tokenizer":  # neither the cached tokenizer nor the workdir's
    assert not [p for p in data if p.endswith(".model")], data
    assert not os.path.exists(tmp_path / "run" / "tokenizer.model")
  else:  # the tokenizer is whole; of the token cache only whole finished units, to resume from
    assert [p for p in data if p.startswith("tokenizers") and p.endswith(".model")], data
    assert [p for p in data if p.endswith(os.path.join(".partial", "unit-00000.json"))], data
  assert not checkpoint.saved_steps(str(tmp_path / "run"))


def test_signal_in_a_study_stops_it_cleanly_and_writes_no_report(text, tmp_path):
  out = tmp_path / "depth"
  fields = {**TINY, **text, "data_dir": str(tmp_path / "data")}
  rc, took, log = _stop_in_phase(
      tmp_path, "llm_jax.tokens:run_job:after",
      [f"--config={BASE_CONFIG}", f"--out={out}", "--layers=1"]
      + [f"--config.{k}={v}" for k, v in fields.items()], study="experiments.depth")
  assert rc == 0 and took < BOUND_S, (rc, took, log[-3000:])
  assert "stopped by SIGTERM" in log, log[-3000:]
  assert not (out / "report.md").exists()
  assert not _complete_caches(tmp_path / "data" / "tokens")


def test_signal_during_beam_search_ends_the_process(imported, tmp_path):
  rc, took, out = _stop_in_phase(tmp_path, "llm_jax.sampling:decode:before", [
      f"--workdir={imported}", "--mode=sample", "--prompt=Hello", "--prompt=Hi",
      "--config.num_beams=2", "--config.do_sample=False", "--config.max_new_tokens=4"])
  assert rc == 128 + signal.SIGTERM and took < BOUND_S, (rc, took, out[-3000:])
  assert "stopped by SIGTERM during --mode=sample" in out, out[-3000:]


def test_signal_during_plain_sampling_ends_the_process(saved, tmp_path):
  # One prompt, sampled: the streaming loop (a jitted chunk of tokens per call).
  rc, took, out = _stop_in_phase(tmp_path, "llm_jax.sampling:generate_stream:before",
                                 _on_saved(saved, "sample", "--prompt=Kalo", max_new_tokens=4))
  assert rc == 128 + signal.SIGTERM and took < BOUND_S, (rc, took, out[-3000:])
  assert "stopped by SIGTERM during --mode=sample" in out, out[-3000:]


def test_sigint_during_mode_eval_ends_the_process(saved, tmp_path):
  rc, took, out = _stop_in_phase(tmp_path, "llm_jax.train:evaluate:before",
                                 _on_saved(saved, "eval"), sig=signal.SIGINT)
  assert rc == 128 + signal.SIGINT and took < BOUND_S, (rc, took, out[-3000:])
  assert "stopped by SIGINT during --mode=eval" in out, out[-3000:]


def test_signal_during_mode_tasks_scoring_ends_the_process_and_writes_no_results(saved, tmp_path):
  task = tmp_path / "mine.jsonl"
  task.write_text("".join(f'{{"context": "Kalo {i}", "choices": ["mine", "ruvi"], "label": 0}}\n'
                          for i in range(8)), encoding="utf-8")
  rc, took, out = _stop_in_phase(tmp_path, "llm_jax.evals.engine:Scorer.score_tokens:before",
                                 _on_saved(saved, "tasks", tasks=f"mine={task}"))
  assert rc == 128 + signal.SIGTERM and took < BOUND_S, (rc, took, out[-3000:])
  assert "stopped by SIGTERM during --mode=tasks" in out, out[-3000:]
  assert not [p for p in os.listdir(saved["workdir"]) if "task" in p], os.listdir(saved["workdir"])


# The studies of experiments/ that analyse a trained model, stopped in that phase: after reading
# a given --workdir's model (attention, embeddings) and while decoding (sampling). Their training
# phase is every study's: common.train_or_skip -> train.run, stopped in
# test_signal_in_a_study_stops_it_cleanly_and_writes_no_report (depth) and the training tests.
_STUDY_PHASES = {
    "attention": ("experiments.common:trained_model:after", True, []),
    "embeddings": ("experiments.common:trained_model:after", True, []),
    "sampling": ("llm_jax.sampling:generate:before", True, []),
}


def test_every_study_takes_the_signals_and_trains_through_the_one_loop():
  # What the signal tests above rely on, for the studies not run there (context, scale,
  # finetune, and any new one): python -m experiments.<study> enters through common.run_main (preemption.install,
  # exit 0 on a signal, guarded) and trains only through common.train_or_skip (train.run).
  import ast  # pylint: disable=import-outside-toplevel
  studies = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments"))
                   if f.endswith(".py") and f not in ("__init__.py", "common.py"))
  assert len(studies) >= 7, studies
  for study in studies:
    with open(os.path.join(ROOT, "experiments", f"{study}.py"), encoding="utf-8") as f:
      tree = ast.parse(f.read())
    entry = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert len(entry) == 1 and ast.unparse(entry[0].body) == "common.run_main(main)", study
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not {"train.run", "train_lib.run"} & calls, study  # (common.train_or_skip does)


@pytest.mark.parametrize("study", sorted(_STUDY_PHASES))
def test_signal_in_every_study_stops_it_with_exit_0_and_no_report(saved, tmp_path, study):
  pause, reads_workdir, extra = _STUDY_PHASES[study]
  out = tmp_path / study
  fields = {**saved["fields"], "data_dir": str(tmp_path / "data")}
  args = ([f"--config={BASE_CONFIG}", f"--out={out}"]
          + ([f"--workdir={saved['workdir']}"] if reads_workdir else []) + extra
          + [f"--config.{k}={v}" for k, v in fields.items()])
  rc, took, log = _stop_in_phase(tmp_path, pause, args, study=f"experiments.{study}")
  assert rc == 0 and took < BOUND_S, (rc, took, log[-3000:])
  assert "stopped by SIGTERM" in log, log[-3000:]
  assert not (out / "report.md").exists()


def test_signal_during_import_writes_no_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  rc, took, out = _stop_in_phase(tmp_path, "llm_jax.checkpoint:save_params:before", [
      f"--workdir={workdir}", "--mode=import", f"--config.hf_path={GPT2}"])
  assert rc == 128 + signal.SIGTERM and took < BOUND_S, (rc, took, out[-3000:])
  assert not checkpoint.saved_steps(str(workdir))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signal_mid_export_leaves_no_partial_export_and_a_rerun_works(imported, tmp_path, sig):
  out_dir = tmp_path / "hf"
  args = [f"--workdir={imported}", "--mode=export", f"--config.hf_export_dir={out_dir}"]
  rc, took, out = _stop_in_phase(tmp_path, "safetensors.numpy:save_file:after", args, sig=sig)
  assert rc == (128 + sig if sig == signal.SIGTERM else -sig), (rc, out[-3000:])
  assert took < BOUND_S, took
  # The weights were written (under a temporary name), the rest not: no export_dir. SIGTERM
  # removes the temporary directory; after kill -9 it stays, under a name nothing reads.
  assert not out_dir.exists()
  leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
  assert len(leftovers) == (sig == signal.SIGKILL), leftovers
  assert main.cli(["main.py"] + args) == 0  # the same command again, no cleanup
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out_dir))


def test_killed_import_leftovers_do_not_block_the_rerun(tmp_path):
  # What a kill -9 mid-save leaves: orbax's tmp directory of step 0, never renamed.
  workdir = str(tmp_path / "run")
  os.makedirs(os.path.join(checkpoint.checkpoint_dir(workdir), "0.orbax-checkpoint-tmp-1"))
  hf.import_to_workdir(base.get_config(), GPT2, workdir)
  assert checkpoint.saved_steps(workdir) == [0]


def _wait_in_sleep_syscall(pid):
  """Until the main thread of `pid` is blocked in (clock_)nanosleep (x86-64 or arm64 numbers)."""
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline:
    with open(f"/proc/{pid}/syscall", encoding="ascii") as f:
      if f.read().split()[0] in ("35", "230", "101", "115"):
        return
    time.sleep(0.01)
  pytest.fail("the child never reached its sleep")


def test_a_main_thread_stuck_in_native_code_is_ended_after_the_grace_period(tmp_path):
  # SIGTERM blocked in the main thread: it sits in libc's sleep() as in a long XLA call, and only
  # the watcher thread (started before the mask) sees the signal.
  code = textwrap.dedent("""
      import ctypes, signal, sys
      from llm_jax import preemption
      preemption.install()
      signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
      print("ready", flush=True)
      ctypes.CDLL(None).sleep(60)
      sys.exit(3)  # not reached
  """)
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline() == "ready\n"
    _wait_in_sleep_syscall(proc.pid)  # Python would still run the handler before it gets there
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 128 + signal.SIGTERM, err
  assert preemption.GRACE_S <= took < BOUND_S, took
  assert "still busy" in err, err
