"""llm_jax entry point.

    python main.py --config=configs/default.py --workdir=runs/default                 # train
    python main.py --config=configs/default.py --workdir=runs/default --mode=eval
    python main.py --config=configs/default.py --workdir=runs/default --mode=sample --prompt="ROMEO:"
    python main.py --config=configs/small.py --mode=estimate [--compile]
    python main.py --config=configs/finetune.py --workdir=runs/ft --config.init_from=runs/default \
        --config.dataset='text:/data/mine/*.txt'                                        # fine-tune
    python main.py --config=configs/finetune.py --workdir=runs/ft --mode=export \
        --config.export_dir=runs/merged
    python main.py --mode=import --config.hf_path=/models/gpt2 --workdir=runs/gpt2   # Hugging Face
    python main.py --mode=export --workdir=runs/gpt2 --config.hf_export_dir=out/gpt2_hf
    python main.py --config=configs/large.py --mode=compile --config.compile_topology=v5p-128
    python main.py --config=configs/default.py --workdir=runs/default --mode=serve     # OpenAI API
    python main.py --mode=tasks --workdir=runs/default        # downstream tasks (lm-eval scoring)
    python main.py --config=configs/finetune.py --workdir=runs/sft --config.init_from=runs/default \
        --config.objective=sft --config.dataset=chats.jsonl          # chat tuning (README)
    python main.py --mode=chat --workdir=runs/sft [--conversation=conv.json]   # talk to it
    python main.py --config=configs/small.py --mode=compile --config.compile_topology=h100  # .[cuda]
    python main.py --config=configs/default.py --config.learning_rate=3e-4 ...          # any field

Exit codes (llm_jax/errors.py): 0 done, 1 training diverged, 2 bad config or input (or the
workdir is held by another training run), 3 out of memory, 4 internal error (a bug: traceback).
"""

import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from llm_jax import errors
from llm_jax import preemption

_DEFAULT_CONFIG = "configs/default.py"
# No default here: config_flags would load it (and apply the overrides) at import time, out of
# reach of the error handling; _parse adds --config=_DEFAULT_CONFIG when it is not given.
_CONFIG = config_flags.DEFINE_config_file("config", None, f"Config file (default "
                                          f"{_DEFAULT_CONFIG}).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, tokenizer, metrics.")
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "eval", "sample", "estimate", "compile", "import", "export",
                           "serve", "tasks", "chat"],
                          "What to do.")
_COMPILE = flags.DEFINE_bool("compile", False,
                             "With --mode=estimate: also print --mode=compile's report (one train "
                             "step compiled for these devices or --config.compile_topology).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt(s) for --mode=sample (repeatable).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None,
                                   "File of prompts for --mode=sample, separated by blank lines.")
_INTERACTIVE = flags.DEFINE_bool("interactive", False, "--mode=sample: read prompts in a loop.")
_CONVERSATION = flags.DEFINE_string("conversation", None,
                                    "--mode=chat: reply to this JSON conversation ({\"messages\": "
                                    "[...]}) and print the reply alone on stdout.")
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


def _choose_platform(cfg):
  """Keeps jax off a TPU backend that is not here (topology.choose_platform); before any backend."""
  from llm_jax import topology
  for_slice = bool(cfg.compile_topology) and (_MODE.value == "compile" or _COMPILE.value)
  topology.choose_platform(compile_for_slice=for_slice)


def _enable_compilation_cache(cfg):
  """Persist compiled programs beside the dataset cache: a rerun, resume or sample skips compiles."""
  import jax
  if cfg.compile_topology and (_MODE.value == "compile" or _COMPILE.value):
    return  # compile-only TPU programs cannot be loaded back (no TPU here): they would only fill it
  from llm_jax import config
  jax.config.update("jax_compilation_cache_dir", os.path.join(config.cache_dir(cfg), "jax"))


def _initialize_distributed():
  """Joins the multi-process runtime before anything touches a device (a no-op on one host)."""
  from llm_jax import sharding
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  mode=_DISTRIBUTED.value)


# --- flags -------------------------------------------------------------------------------------


def _config_path(argv) -> str:
  values = [a.split("=", 1)[1] for a in argv if a.startswith(("--config=", "-config="))]
  return values[-1] if values else _DEFAULT_CONFIG


def _config_fields(argv) -> list[str] | None:
  """Fields of the config file named in argv; None if it cannot be loaded."""
  from llm_jax import config
  try:
    return list(config.load_unchecked(_config_path(argv)).keys())
  except Exception:  # pylint: disable=broad-except  (reported by the caller)
    return None


def _bad_config_file(e: Exception, argv) -> str:
  path = _config_path(argv)
  file = path.split(":", 1)[0]
  if not os.path.exists(file):
    return f"--config={path}: no such file (configs/*.py lists the shipped configs)"
  if os.path.isdir(file):
    return f"--config={path} is a directory: give a config file, e.g. configs/default.py"
  cause = e.__cause__ or e
  detail = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
  return (f"--config={path} could not be loaded ({type(cause).__name__}: {detail}); it must "
          f"define get_config() returning an ml_collections.ConfigDict, as configs/base.py does")


def _parse(argv) -> list[str]:
  """absl's flag parsing, with each bad flag, config file or config field a UserError."""
  from llm_jax import config
  if not any(re.match(r"-{1,2}config(=|$)", a) for a in argv[1:]):
    argv = [argv[0], f"--config={_DEFAULT_CONFIG}"] + list(argv[1:])
  sys.argv = list(argv)  # config_flags reads its overrides from sys.argv
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.keys()  # the file loads lazily: load it now
  except flags.Error as e:
    text = str(e)
    m = re.match(r"Unknown command line flag 'config\.([\w.]+)'", text)
    if m:  # ml_collections raises this for a field of a config that failed to load
      fields = _config_fields(argv)
      if fields is None:
        raise errors.UserError(_bad_config_file(e, argv)) from None
      raise errors.UserError(config.unknown_field(m.group(1), fields)) from None
    raise errors.UserError(f"{text} (main.py --helpfull lists every flag; configs/base.py every "
                           f"config field)") from None
  except (AttributeError, KeyError) as e:  # --config.<field> names no field, or a broken file
    fields = _config_fields(argv)
    names = [a.split("=", 1)[0].split(".", 1)[1] for a in argv if re.match(r"-{1,2}config\.", a)]
    unknown = [n for n in names if fields is not None and n.split(".")[0] not in fields]
    if not unknown:
      raise errors.UserError(_bad_config_file(e, argv)) from None
    raise errors.UserError(config.unknown_field(unknown, fields)) from None
  except Exception as e:  # pylint: disable=broad-except  (the config file: missing, broken)
    raise errors.UserError(_bad_config_file(e, argv)) from None
  return rest


def _flags_parser(argv):
  """app.run's parser: a bad flag is one `error:` line and exit code 2, not absl's usage dump."""
  try:
    return _parse(argv)
  except errors.UserError as e:
    errors.report(str(e))
    sys.exit(errors.BAD_INPUT)


def _flag_warnings(mode: str) -> list[str]:
  """Flags given for another mode: they would do nothing here."""
  used = {"compile": ("estimate",), "prompt": ("sample",), "prompt_file": ("sample",),
          "interactive": ("sample",), "conversation": ("chat",),
          "workdir": ("train", "eval", "sample", "import", "export", "serve", "tasks", "chat")}
  return [f"--{name} does nothing in --mode={mode} (it is for --mode={'/'.join(modes)})"
          for name, modes in used.items() if flags.FLAGS[name].present and mode not in modes]


# --- modes -------------------------------------------------------------------------------------


def _need_workdir():
  if not _WORKDIR.value:
    raise errors.UserError(f"--workdir is required for --mode={_MODE.value} (e.g. "
                           f"--workdir=runs/default)")
  return _WORKDIR.value


def _read_prompt_file(path: str) -> list[str]:
  if not os.path.exists(path):
    raise errors.UserError(f"--prompt_file={path} does not exist")
  if os.path.isdir(path):
    raise errors.UserError(f"--prompt_file={path} is a directory: give a text file of prompts "
                           f"separated by blank lines")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise errors.UserError(f"--prompt_file={path} is not UTF-8 text (invalid byte at offset "
                           f"{e.start}): re-encode it as UTF-8, e.g. iconv -t utf-8") from None
  except OSError as e:
    raise errors.UserError(f"--prompt_file={path} cannot be read ({e.strerror})") from None
  prompts = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
  if not prompts:
    raise errors.UserError(f"--prompt_file={path} holds no prompt: write prompts separated by "
                           f"blank lines")
  return prompts


def _stop_id(cfg, tok):
  if cfg.stop_token is None:
    return None
  ids = tok.encode(cfg.stop_token)
  ids = [i for i in ids if tok.id_to_piece(i) != "\u2581"]  # a bare word-boundary marker
  if len(ids) != 1:
    raise errors.UserError(f"stop_token={cfg.stop_token!r} is {len(ids)} tokens for this "
                           f"tokenizer; it must be exactly one (e.g. a single character)")
  return ids[0]


def sample(cfg, workdir, prompts, interactive=False, overrides=None) -> int:
  """--mode=sample: continue each prompt from a trained checkpoint, printing as tokens arrive."""
  import jax
  from llm_jax import loader
  from llm_jax import sampling
  loaded = loader.load(workdir, cfg, step=cfg.checkpoint_step, asked=overrides or {})
  params, model_cfg, tok = loaded.params, loaded.model_cfg, loaded.tokenizer
  stop_id = _stop_id(cfg, tok)
  scfg = sampling.SamplingConfig.from_config(cfg)
  n = scfg.num_return_sequences
  rng = jax.random.key(cfg.seed)
  warned = []
  if loaded.quantization:
    print(f"# {loaded.quantization}", flush=True)
  print(f"# checkpoint {loaded.step} from {workdir}; do_sample={cfg.do_sample} temperature="
        f"{cfg.temperature} top_k={cfg.top_k} top_p={cfg.top_p} repetition_penalty="
        f"{cfg.repetition_penalty} num_beams={cfg.num_beams} max_new_tokens={cfg.max_new_tokens}"
        + (f" num_return_sequences={n}" if n > 1 else ""), flush=True)

  def run(batch):
    nonlocal rng
    rng, key = jax.random.split(rng)
    # An empty prompt starts a fresh document: the model saw EOS (and BOS, if it uses one)
    # before every document.
    ids = [tok.encode(p, add_bos=tok.add_bos) or [tok.eos_id] for p in batch]
    error, warning = sampling.context_problem(max(map(len, ids)), model_cfg, scfg,
                                              loaded.cfg.max_seq_len)
    if error:
      raise errors.UserError(error)
    if warning and not warned:  # once: a long session would repeat it for every prompt
      warned.append(warning)
      print(f"warning: {warning}", file=sys.stderr, flush=True)
    if len(batch) == 1 and cfg.num_beams == 1 and n == 1:
      print(batch[0], end="", flush=True)
      new_ids, shown = [], ""
      for chunk in sampling.generate_stream(params, model_cfg, ids, scfg, key,
                                            eos_id=tok.eos_ids, stop_id=stop_id):
        new_ids += chunk[0]
        text = tok.decode(new_ids)  # whole text so far: a chunk may split a multi-byte character
        print(text[len(shown):], end="", flush=True)
        shown = text
      print("\n", flush=True)
      return
    outs = sampling.generate(params, model_cfg, ids, scfg, key, eos_id=tok.eos_ids,
                             stop_id=stop_id)
    for i, out in enumerate(outs):
      head = f"# prompt {i // n + 1}, sample {i % n + 1}\n" if n > 1 else ""
      print(f"{head}{batch[i // n]}{tok.decode(out)}\n" + "-" * 40, flush=True)

  if prompts:
    run(prompts)
  if interactive:
    print("# enter a prompt (empty line: a fresh document; Ctrl-D to quit)", flush=True)
    for line in sys.stdin:
      try:
        run([line.rstrip("\n").replace("\\n", "\n")])
      except errors.UserError as e:  # a prompt too long for the model: say so, take the next
        errors.report(str(e))
  elif not prompts:
    run([""])
  return errors.OK


def import_hf(workdir) -> int:
  """--mode=import: a local Hugging Face model directory -> an llm_jax workdir (step 0)."""
  from llm_jax import hf
  raw = _CONFIG.value
  if not raw.hf_path:
    raise errors.UserError("--mode=import needs --config.hf_path=<a local Hugging Face model "
                           "directory>")
  out = hf.import_to_workdir(raw, raw.hf_path, workdir, _overrides())
  c = out["config"]
  print(f"imported {out['model_type']} from {raw.hf_path} ({out['params'] / 1e6:.1f}M params, "
        f"{'/'.join(out['dtypes'])} -> {c.param_dtype}; d_model {c.d_model}, {c.n_layers} layers, "
        f"vocab {c.vocab_size}, context {c.max_seq_len}; tokenizer {out['tokenizer'].kind}, eos "
        f"{out['tokenizer'].eos_ids}) into {workdir}\n"
        f"  sample:    python main.py --mode=sample --workdir={workdir} --prompt='Hello'\n"
        f"  fine-tune: python main.py --config.init_from={workdir} --workdir=<new dir> ...\n"
        f"  export:    python main.py --mode=export --workdir={workdir} "
        f"--config.hf_export_dir=<dir>", flush=True)
  return errors.OK


def export(cfg, workdir, overrides=None) -> int:
  """--mode=export: the run (LoRA adapters merged into its base) as a plain llm_jax checkpoint in
  export_dir (quantized with load_in_8bit / load_in_4bit), and/or in Hugging Face format in
  hf_export_dir. `overrides`: the fields given on the command line (the loader checks them against
  the run's)."""
  from llm_jax import checkpoint
  from llm_jax import loader
  if not cfg.export_dir and not cfg.hf_export_dir:
    raise errors.UserError("--mode=export needs --config.export_dir=<new dir> (a plain llm_jax "
                           "checkpoint, LoRA adapters merged) or --config.hf_export_dir=<new dir> "
                           "(Hugging Face format)")
  out = cfg.export_dir
  if out and (os.path.abspath(out) == os.path.abspath(workdir) or checkpoint.saved_steps(out)):
    raise errors.UserError(f"export_dir={out} already holds checkpoints (or is the workdir): "
                           f"choose a new directory; nothing was written")
  hf_out = cfg.hf_export_dir
  if hf_out and os.path.isdir(hf_out) and os.listdir(hf_out):
    raise errors.UserError(f"hf_export_dir={hf_out} exists and is not empty: export into a new "
                           f"directory; nothing was written")
  if hf_out:
    from llm_jax import hf
    for f in ("load_in_8bit", "load_in_4bit"):
      if cfg[f]:
        raise errors.UserError(f"{f}=True with hf_export_dir: the Hugging Face export writes "
                               f"full-precision weights; unset {f} (export_dir alone can store "
                               f"quantized ones)")
    files = hf.export_workdir(cfg, workdir, hf_out, overrides or {})
    print(f"exported {workdir} to {hf_out} (Hugging Face format): {', '.join(files)}",
          flush=True)
  if out:
    path = loader.export(cfg, workdir, overrides or {})
    print(f"exported {workdir} to {path}: use --workdir={out} with --mode=sample, --mode=eval or "
          f"--config.init_from={out}", flush=True)
  return errors.OK


def _overrides() -> dict:
  """The --config.<field> values given on the command line."""
  return config_flags.get_override_values(flags.FLAGS["config"])


def _run(argv) -> int:
  """Everything after flag parsing; bad input raises errors.UserError."""
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
  _honour_omp_num_threads()
  if not flags.FLAGS["verbosity"].present:
    # Warnings and errors only unless asked (--verbosity=0 for INFO): the progress bar and printed
    # lines carry the run; orbax and jax log dozens of INFO lines per checkpoint.
    absl_logging.set_verbosity(absl_logging.WARNING)
  from llm_jax import config
  mode = _MODE.value
  given = list(_overrides())
  if mode == "import":  # the model fields come from config.json, not from --config
    workdir = _need_workdir()
    _choose_platform(_CONFIG.value)
    _initialize_distributed()
    return import_hf(workdir)
  try:
    cfg = config.finalize(_CONFIG.value, given=given)
  except config.ConfigError as e:
    raise errors.UserError(f"{e}\n(fix the config file or the --config.<field> overrides)"
                           ) from None
  problems, warnings = config.mode_problems(cfg, mode, given)
  for w in warnings + _flag_warnings(mode):
    print(f"warning: {w}", file=sys.stderr, flush=True)
  if problems:
    raise config.ConfigError(problems)
  if mode in ("eval", "sample", "export", "serve", "tasks", "chat"):
    from llm_jax import workdir as workdir_lib
    workdir_lib.check_readable(_need_workdir())
  prompts = []
  if mode == "sample":
    prompts = list(_PROMPT.value or [])
    if _PROMPT_FILE.value:
      prompts += _read_prompt_file(_PROMPT_FILE.value)
  workdir = None if mode in ("estimate", "compile") else _need_workdir()
  _choose_platform(cfg)
  _initialize_distributed()
  _enable_compilation_cache(cfg)
  if mode in ("estimate", "compile"):
    from llm_jax import sizing
    if mode == "estimate":
      print(sizing.report(cfg, sizing.estimate(cfg)), flush=True)
      if not _COMPILE.value:
        return errors.OK
      print(flush=True)
    return sizing.run_compile(cfg)
  from llm_jax import checkpoint
  from llm_jax import train
  if mode == "train":
    imported = checkpoint.imported_from(workdir)
    if imported:
      raise errors.UserError(
          f"--workdir={workdir} holds a model imported from {imported}, with no optimizer state: "
          f"fine-tune it into a new workdir with --config.init_from={workdir} "
          f"--workdir=<new dir>")
    return train.run(cfg, workdir, overrides=_overrides())
  if mode == "export":
    return export(cfg, workdir, _overrides())
  if mode == "eval":
    return train.evaluate_workdir(cfg, workdir, _overrides())
  if mode == "serve":
    from llm_jax.serve import api
    return api.run(cfg, workdir, _overrides())
  if mode == "tasks":
    from llm_jax.evals import harness
    return harness.run(cfg, workdir, _overrides())
  if mode == "chat":
    from llm_jax import chat_mode
    return chat_mode.run(cfg, workdir, _CONVERSATION.value, _stop_id, _overrides())
  return sample(cfg, workdir, prompts, interactive=_INTERACTIVE.value, overrides=_overrides())


def main(argv) -> int:
  """Runs the mode; returns its exit code (llm_jax/errors.py): every failure is one `error:`
  line, and only a bug in llm_jax prints a traceback (exit code INTERNAL)."""
  if _MODE.value == "train":  # stopped by a signal in any phase, a rerun continues: exit 0
    preemption.stop_exit_code(errors.OK)
  try:
    code = _run(argv)
  except errors.UserError as e:
    code = errors.BAD_INPUT
    errors.report(str(e))
  except preemption.Preempted as e:  # a signal outside the training loop (which saves itself)
    code = e.exit_code
    print(f"stopped by {e.name} during --mode={_MODE.value}: "
                  + ("nothing trained since the last checkpoint was lost; run the same command "
                     "to continue" if _MODE.value == "train" else
                     "nothing half-written was left; run the same command again"),
          file=sys.stderr, flush=True)
  except Exception as e:  # pylint: disable=broad-except
    from llm_jax import files
    from llm_jax import train
    first = str(e).splitlines()[0] if str(e) else ""
    if files.is_full(e):  # a writer that does not say DiskFull itself (orbax in import, export)
      code = errors.BAD_INPUT
      errors.report(f"no space left on the disk: {first[:400]}. Free space (or point the path "
                    f"at a larger disk) and run the same command again")
    elif train.is_oom(e):
      code = errors.OOM
      errors.report(f"{train.OOM_ADVICE}\n({first[:300]})")
    else:
      code = errors.INTERNAL
      traceback.print_exc()
      errors.report(f"internal error ({type(e).__name__}): a bug in llm_jax, not in your input. "
                    f"Please report it with the traceback above and the command you ran")
  preemption.exiting(code)
  return code


def cli(argv) -> int:
  """main.py as a function, for tests: argv as sys.argv would be (argv[0] the program name).

  Parses the flags afresh on every call (config_flags reads its overrides from sys.argv and
  defines a flag per override, so both are reset), then returns main's exit code.
  """
  fv = flags.FLAGS
  fv.unparse_flags()
  for name in [n for n in fv if n.startswith(_CONFIG.name + ".")]:
    delattr(fv, name)
  # config_flags loads the file as module "<flag>_config" with load_module(), which would
  # re-execute it into the previous call's module object (keeping its other attributes).
  sys.modules.pop(f"{_CONFIG.name}_config", None)
  saved, sys.argv = sys.argv, list(argv)
  try:
    try:
      rest = _parse(list(argv))
    except errors.UserError as e:
      errors.report(str(e))
      return errors.BAD_INPUT
    return main(rest)
  finally:
    sys.argv = saved


if __name__ == "__main__":
  preemption.install()  # SIGTERM / SIGINT from here on: llm_jax/preemption.py
  app.run(main, flags_parser=_flags_parser)
