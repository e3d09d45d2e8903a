"""Shared test helpers."""

import os

import jax
import jax.numpy as jnp
import numpy as np

# Tiny models compile for much longer than they run: the tests compile with LLVM's cheap passes
# (conftest.py sets it for this process; child processes get it from child_env).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def use_fast_compile() -> None:
  """Adds FAST_COMPILE to this process's XLA_FLAGS (before any jax backend starts)."""
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                   FAST_COMPILE]))


def run_check_script(name: str, timeout: int) -> dict:
  """Runs tests/<name> (a script that sets its own device count) in a child process; the JSON
  its last line prints."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = child_env()
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  p = subprocess.run([sys.executable, os.path.join(root, "tests", name)], cwd=root, env=env,
                     capture_output=True, text=True, timeout=timeout, check=False)
  assert p.returncode == 0, p.stderr[-4000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


def child_env(devices: int | None = None) -> dict:
  """os.environ for a child process: XLA_FLAGS is FAST_COMPILE (whatever this process was given),
  with `devices` host CPU devices when asked."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = FAST_COMPILE + (
      f" --xla_force_host_platform_device_count={devices}" if devices else "")
  return env


def random_params(shapes, seed=0, std=0.05):
  """Random params of the given abstract shapes, drawn in numpy (no init compile).

  Norm scales are ones and biases zeros; other leaves are normal with `std`, a number or a
  function (key-path string, shape) -> number. New buffers each call (train steps donate them).
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return jnp.ones(s.shape, s.dtype)
    if name.endswith("['bias']"):
      return jnp.zeros(s.shape, s.dtype)
    sd = std(name, s.shape) if callable(std) else std
    return jnp.asarray(sd * rng.normal(size=s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def write_corpus(root, train_files=4, lines=60, val_lines=30):
  """A seeded text: corpus of pseudo-words, <root>/train/<i>.txt and <root>/val/0.txt: enough
  for a 128-piece tokenizer (byte_fallback off) and a few dozen rows of 16 tokens."""
  rng = np.random.default_rng(0)
  syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ba", "de", "fo", "gu"]
  words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(200)]
  for split, n_files, n_lines in (("train", train_files, lines), ("val", 1, val_lines)):
    os.makedirs(os.path.join(root, split))
    for i in range(n_files):
      with open(os.path.join(root, split, f"{i}.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(" ".join(rng.choice(words, size=rng.integers(3, 10))).capitalize() + "."
                          for _ in range(n_lines)) + "\n")


def assert_bitwise_equal(a, b):
  """Two trees of arrays have the same structure, dtypes and values, to the bit."""
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and np.array_equal(x, y)


def saved_run(root: str, tiny: dict, step: int = 4) -> dict:
  """A workdir with a tokenizer and one checkpoint (`step`) of random params, as training leaves
  it, made without training (nothing compiles): {"root", "workdir", "fields"} (JSON), where
  fields are `tiny` plus a text: dataset of write_corpus under root."""
  from llm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from llm_jax import config  # pylint: disable=g-import-not-at-top
  from llm_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from llm_jax import sharding  # pylint: disable=g-import-not-at-top
  from llm_jax import train  # pylint: disable=g-import-not-at-top
  write_corpus(os.path.join(root, "text"))
  fields = {**tiny, "dataset": f"text:{root}/text/train", "validation": f"{root}/text/val/*.txt",
            "data_dir": os.path.join(root, "data")}
  base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "base.py")
  cfg = config.load(base, **fields)
  workdir = os.path.join(root, "run")
  data = data_lib.build(cfg, workdir, 0, 1)
  trainer = train.Trainer(cfg, cfg.num_train_steps,
                          mesh=sharding.make_mesh(cfg, jax.devices()[:1]))
  params = random_params(trainer.abstract_params)
  state = train.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                           opt_state=trainer.tx.init(params), rng=jax.random.key(0))
  ckpt = checkpoint.Checkpointer(workdir, cfg, data.steps_per_epoch,
                                 os.path.join(workdir, "tokenizer.model"))
  try:
    ckpt.save(step, state, data.train_iter())
  finally:
    ckpt.close()
  return {"root": root, "workdir": workdir, "fields": fields}
