"""llm_jax entry point.

    python main.py --config=configs/default.py --workdir=runs/default                 # train
    python main.py --config=configs/default.py --workdir=runs/default --mode=eval
    python main.py --config=configs/default.py --workdir=runs/default --mode=sample --prompt="ROMEO:"
    python main.py --config=configs/small.py --mode=estimate [--compile]
    python main.py --config=configs/default.py --config.learning_rate=3e-4 ...          # any field
"""

import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, tokenizer, metrics.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample", "estimate"], "What to do.")
_COMPILE = flags.DEFINE_bool("compile", False,
                             "With --mode=estimate: also compile one train step on these devices "
                             "and print XLA's memory analysis (the 'will it fit' check).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt(s) for --mode=sample (repeatable).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None,
                                   "File of prompts for --mode=sample, separated by blank lines.")
_INTERACTIVE = flags.DEFINE_bool("interactive", False, "--mode=sample: read prompts in a loop.")


def _finalized():
  from llm_jax import config
  try:
    return config.finalize(_CONFIG.value)
  except config.ConfigError as e:
    sys.exit(f"error: {e}\n(fix the config file or the --config.<field> overrides)")


def _need_workdir():
  if not _WORKDIR.value:
    sys.exit(f"error: --workdir is required for --mode={_MODE.value} (e.g. --workdir=runs/default)")
  return _WORKDIR.value


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]} (flags are --name=value)")
  logging.getLogger("absl").setLevel(logging.INFO)
  cfg = _finalized()
  if _MODE.value == "estimate":
    from llm_jax import sizing
    est = sizing.estimate(cfg)
    compiled = sizing.compiled_memory(cfg) if _COMPILE.value else None
    print(sizing.report(cfg, est, compiled))
    return
  workdir = _need_workdir()
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  from llm_jax import train
  if _MODE.value == "train":
    sys.exit(train.run(cfg, workdir, overrides=overrides))
  if _MODE.value == "eval":
    sys.exit(train.evaluate_workdir(cfg, workdir))
  from llm_jax import sample_cli
  prompts = list(_PROMPT.value or [])
  if _PROMPT_FILE.value:
    if not os.path.exists(_PROMPT_FILE.value):
      sys.exit(f"error: --prompt_file={_PROMPT_FILE.value} does not exist")
    with open(_PROMPT_FILE.value, encoding="utf-8") as f:
      prompts += [p.strip("\n") for p in f.read().split("\n\n") if p.strip()]
  sys.exit(sample_cli.run(cfg, workdir, prompts, interactive=_INTERACTIVE.value))


if __name__ == "__main__":
  app.run(main)
