"""llm_jax entry point.

    python main.py --config=configs/default.py --workdir=runs/default                 # train
    python main.py --config=configs/default.py --workdir=runs/default --mode=eval
    python main.py --config=configs/default.py --workdir=runs/default --mode=sample --prompt="ROMEO:"
    python main.py --config=configs/small.py --mode=estimate [--compile]
    python main.py --config=configs/finetune.py --workdir=runs/ft --config.init_from=runs/default \
        --config.dataset='text:/data/mine/*.txt'                                        # fine-tune
    python main.py --config=configs/finetune.py --workdir=runs/ft --mode=export \
        --config.export_dir=runs/merged
    python main.py --config=configs/default.py --config.learning_rate=3e-4 ...          # any field
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, tokenizer, metrics.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample", "estimate", "export"],
                          "What to do.")
_COMPILE = flags.DEFINE_bool("compile", False,
                             "With --mode=estimate: also compile one train step on these devices "
                             "and print XLA's memory analysis (the 'will it fit' check).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt(s) for --mode=sample (repeatable).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None,
                                   "File of prompts for --mode=sample, separated by blank lines.")
_INTERACTIVE = flags.DEFINE_bool("interactive", False, "--mode=sample: read prompts in a loop.")
# Multi-host (one process per host, the same command everywhere; see launch.sh).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs outside SLURM "
                                   "and TPU VM pods (which are detected automatically).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (with "
                                      "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's rank, 0 .. "
                                   "num_processes - 1 (with --coordinator_address).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed.initialize(): auto = when SLURM (srun, > 1 "
                                 "task), a multi-host TPU VM or Open MPI is detected; on = always "
                                 "(jax auto-detects the cluster; launch.sh tpu passes it); off = "
                                 "never (unless the three flags above are given).")


def _honour_omp_num_threads():
  """OMP_NUM_THREADS=n pins this process to n cores, so XLA's CPU thread pools size to n.

  XLA does not read OMP_NUM_THREADS itself; it sizes its pools from the schedulable CPUs.
  Must run before jax initialises its backend.
  """
  n = os.environ.get("OMP_NUM_THREADS", "")
  if n.isdigit() and int(n) > 0 and hasattr(os, "sched_setaffinity"):
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[:int(n)])


def _enable_compilation_cache(cfg):
  """Persist compiled programs beside the dataset cache: a rerun, resume or sample skips compiles."""
  import jax
  from llm_jax import config
  jax.config.update("jax_compilation_cache_dir", os.path.join(config.cache_dir(cfg), "jax"))


def _initialize_distributed():
  """Joins the multi-process runtime before anything touches a device (a no-op on one host)."""
  from llm_jax import sharding
  try:
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    mode=_DISTRIBUTED.value)
  except ValueError as e:
    sys.exit(f"error: {e}")


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


def _stop_id(cfg, tok):
  if cfg.stop_token is None:
    return None
  ids = tok.encode(cfg.stop_token)
  ids = [i for i in ids if tok.id_to_piece(i) != "\u2581"]  # a bare word-boundary marker
  if len(ids) != 1:
    sys.exit(f"error: stop_token={cfg.stop_token!r} is {len(ids)} tokens for this tokenizer; it "
             f"must be exactly one (e.g. a single character)")
  return ids[0]


def sample(cfg, workdir, prompts, interactive=False, overrides=None) -> int:
  """--mode=sample: continue each prompt from a trained checkpoint, printing as tokens arrive."""
  import jax
  from llm_jax import checkpoint
  from llm_jax import loader
  from llm_jax import sampling
  try:
    loaded = loader.load(workdir, cfg, step=cfg.checkpoint_step, asked=overrides or {})
  except (checkpoint.CheckpointError, ValueError) as e:
    print(f"error: {e}", flush=True)
    return 2
  params, model_cfg, tok = loaded.params, loaded.model_cfg, loaded.tokenizer
  stop_id = _stop_id(cfg, tok)
  rng = jax.random.key(cfg.seed)
  if loaded.quantization:
    print(f"# {loaded.quantization}", flush=True)
  print(f"# checkpoint {loaded.step} from {workdir}; do_sample={cfg.do_sample} temperature="
        f"{cfg.temperature} top_k={cfg.top_k} top_p={cfg.top_p} repetition_penalty="
        f"{cfg.repetition_penalty} num_beams={cfg.num_beams} max_new_tokens={cfg.max_new_tokens}",
        flush=True)

  def run(batch):
    nonlocal rng
    rng, key = jax.random.split(rng)
    # An empty prompt starts a fresh document: the model saw EOS before every document.
    ids = [tok.encode(p) or [tok.eos_id] for p in batch]
    if len(batch) == 1 and cfg.num_beams == 1:
      print(batch[0], end="", flush=True)
      new_ids, shown = [], ""
      for chunk in sampling.generate_stream(params, model_cfg, ids, cfg, key,
                                            eos_id=tok.eos_id, stop_id=stop_id):
        new_ids += chunk[0]
        text = tok.decode(new_ids)  # whole text so far: a chunk may split a multi-byte character
        print(text[len(shown):], end="", flush=True)
        shown = text
      print("\n", flush=True)
      return
    outs = sampling.generate(params, model_cfg, ids, cfg, key, eos_id=tok.eos_id,
                             stop_id=stop_id)
    for p, out in zip(batch, outs):
      print(f"{p}{tok.decode(out)}\n" + "-" * 40, flush=True)

  if prompts:
    run(prompts)
  if interactive:
    print("# enter a prompt (empty line: a fresh document; Ctrl-D to quit)", flush=True)
    for line in sys.stdin:
      run([line.rstrip("\n").replace("\\n", "\n")])
  elif not prompts:
    run([""])
  return 0


def export(cfg, workdir, overrides) -> int:
  """--mode=export: a run (LoRA adapters merged into its base) as a plain checkpoint, of
  quantized weights with load_in_8bit / load_in_4bit."""
  from llm_jax import checkpoint
  from llm_jax import loader
  out = cfg.export_dir
  if not out:
    print("error: --mode=export needs --config.export_dir (a new directory, e.g. runs/merged)")
    return 2
  if os.path.abspath(out) == os.path.abspath(workdir) or os.path.isdir(
      checkpoint.checkpoint_dir(out)):
    print(f"error: export_dir={out} already holds checkpoints (or is the workdir): choose a new "
          f"directory, nothing was written")
    return 2
  try:
    path = loader.export(cfg, workdir, overrides)
  except (checkpoint.CheckpointError, ValueError) as e:
    print(f"error: {e}", flush=True)
    return 2
  print(f"exported {workdir} to {path}: use --workdir={out} with --mode=sample, --mode=eval or "
        f"--config.init_from={out}", flush=True)
  return 0


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]} (flags are --name=value)")
  _honour_omp_num_threads()
  if not flags.FLAGS["verbosity"].present:
    # Warnings and errors only unless asked (--verbosity=0 for INFO): the progress bar and printed
    # lines carry the run; orbax and jax log dozens of INFO lines per checkpoint.
    absl_logging.set_verbosity(absl_logging.WARNING)
  _initialize_distributed()
  cfg = _finalized()
  _enable_compilation_cache(cfg)
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
    sys.exit(train.evaluate_workdir(cfg, workdir, overrides))
  if _MODE.value == "export":
    sys.exit(export(cfg, workdir, overrides))
  prompts = list(_PROMPT.value or [])
  if _PROMPT_FILE.value:
    if not os.path.exists(_PROMPT_FILE.value):
      sys.exit(f"error: --prompt_file={_PROMPT_FILE.value} does not exist")
    with open(_PROMPT_FILE.value, encoding="utf-8") as f:
      prompts += [p.strip("\n") for p in f.read().split("\n\n") if p.strip()]
  sys.exit(sample(cfg, workdir, prompts, interactive=_INTERACTIVE.value, overrides=overrides))


if __name__ == "__main__":
  app.run(main)
