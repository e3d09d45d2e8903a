"""Shared plumbing of the studies: flags, study configs, run-or-skip, the report and figures.

A study is one command:

    python -m experiments.<study> --out=results/<study> [--scale=gpu] [--config=FILE]
        [--config.<field>=VALUE ...] [study flags]

Its config is the --config file (configs/default.py unless given), then the study's preset for
--scale, then the --config.<field> overrides: the user's word wins over the preset. Each training
run of a sweep is an ordinary llm_jax workdir under --out, trained by `train.run` (the checkpoints,
metrics.jsonl and loss_curves.png of main.py), so rerunning the same command skips the finished
runs and an interrupted one resumes through the Trainer's normal resume. A run counts as finished
when it left both its final checkpoint and the final evaluation in its metrics.jsonl.

Everything a study shows lands in --out: report.md (what was measured, a markdown table, the
figures, the exact command, the machine and the date), the PNGs (matplotlib's object API on the
Agg canvas, as llm_jax/metrics.py draws), results.json (the rows and what else the study
computed) and figures.json (the data of every panel and series, read back from the figures).
"""

import dataclasses
import datetime
import functools
import json
import math
import os
import shlex
import sys
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import ml_collections
import numpy as np
import optax
from ml_collections import config_flags

from llm_jax import checkpoint as ckpt_lib
from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import files
from llm_jax import loader
from llm_jax import metrics as metrics_lib
from llm_jax import model as model_lib
from llm_jax import preemption
from llm_jax import topology
from llm_jax import train

_FLAGS = {}  # the flags every study shares: defined by run_main (not on import: main.py's
# --config, --workdir and --prompt would clash with them in a process that imports both)


def define_flags() -> None:
  """Defines --out, --config, --scale, --prompt and --workdir (once)."""
  if _FLAGS:
    return
  _FLAGS["out"] = flags.DEFINE_string(
      "out", None, "Study directory: one workdir per run, report.md, results.json and the PNGs. "
      "Rerunning the same command resumes it.")
  _FLAGS["config"] = config_flags.DEFINE_config_file(
      "config", "configs/default.py", "Config file the study starts from (then the --scale "
      "preset, then --config.<field> overrides).", lock_config=True)
  _FLAGS["scale"] = flags.DEFINE_enum(
      "scale", "cpu", ["cpu", "gpu"], "Preset sizes: cpu = about 10 minutes on 2 CPU cores; "
      "gpu = larger models and longer runs for one accelerator.")
  _FLAGS["prompt"] = flags.DEFINE_string(
      "prompt", None, "sampling: the prompt every sample continues (default: a fresh document); "
      "attention: the text whose attention maps are drawn (default: a line of Romeo and Juliet). "
      "\\n is a newline.")
  _FLAGS["workdir"] = flags.DEFINE_string(
      "workdir", None, "sampling, embeddings, attention: study this trained run (e.g. "
      "runs/default, trained with the same --config) instead of training one in <out>/model.")


class StudyError(errors.UserError):
  """Bad input or a failed run: the study stops with `error: <message>` (exit code 2)."""


# ------------------------------------------------------------------------------------ Configs

# The sweeps' runs on 2 CPU cores: the --config's model (configs/default.py: 1.2M parameters),
# 300 steps, a few capped evaluations and checkpoints, no sampled lines.
SWEEP_CPU = dict(num_train_steps=300, warmup_steps=30, eval_steps=100, eval_batches=8,
                 save_steps=100, log_every=10, sample_every_eval=False)
# One accelerator: d_model 512 (d_ff 4x, whatever the --config sets), 8 layers (27M parameters),
# context 256, batch 64, bf16 with fused attention, 3,000 steps.
GPU = dict(d_model=512, n_heads=8, n_layers=8, d_ff=None, max_seq_len=256, micro_batch_size=64,
           vocab_size=4096, learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=200,
           num_train_steps=3000, eval_steps=500, eval_batches=20, save_steps=500, log_every=50,
           dtype="bfloat16", use_flash_attention=True)
SWEEP_GPU = dict(GPU, sample_every_eval=False)
# The trained-model studies (sampling, embeddings, attention) train the --config as it is on cpu
# (configs/default.py: the model `make train` gives), unless --workdir names a trained run.
MODEL_PRESETS = {"cpu": {}, "gpu": dict(GPU, max_new_tokens=200)}


def scale() -> str:
  return _FLAGS["scale"].value


def out_dir() -> str:
  if not _FLAGS["out"].value:
    raise StudyError("--out is required: the directory for the study's runs, report and PNGs "
                     "(e.g. --out=results/depth)")
  return _FLAGS["out"].value


def workdir_flag() -> str | None:
  return _FLAGS["workdir"].value


def prompt_flag(default: str) -> str:
  prompt = _FLAGS["prompt"].value
  return default if prompt is None else prompt.replace("\\n", "\n")


def study_config(preset: dict) -> ml_collections.ConfigDict:
  """The --config file, then `preset`, then the --config.<field> overrides (not finalized).

  Also turns on the persistent compilation cache beside the data cache, as main.py does.
  """
  cfg = ml_collections.ConfigDict(_FLAGS["config"].value.to_dict())
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  for k, v in {**preset, **overrides}.items():
    cfg[k] = v
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(config_lib.cache_dir(cfg), "jax"))
  return cfg


def finalize(base: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  """`base` with `fields` set, validated and completed (config.finalize); StudyError if invalid."""
  cfg = ml_collections.ConfigDict(base.to_dict())
  for k, v in fields.items():
    if k not in cfg:
      raise StudyError(f"unknown config field {k!r}: see configs/base.py")
    cfg[k] = v
  try:
    cfg = config_lib.finalize(cfg)
  except config_lib.ConfigError as e:
    where = ", ".join(f"{k}={v}" for k, v in fields.items())
    raise StudyError(f"{e}" + (f"\n(in the run with {where})" if where else "")
                     + "\n(fix the --config.<field> overrides or the study flags)") from None
  if cfg.num_train_steps is None:
    raise StudyError("num_train_steps=None: a study compares runs of a fixed number of steps; "
                     "set --config.num_train_steps")
  return cfg


def number_list(values: Sequence[str] | None, default: Sequence, flag: str, cast=float) -> list:
  """A comma-separated flag's values (default when unset); StudyError names the flag."""
  if not values:
    return list(default)
  try:
    return [cast(v) for v in values]
  except ValueError:
    raise StudyError(f"--{flag}={','.join(values)}: expected {cast.__name__} values, e.g. "
                     f"--{flag}={','.join(map(str, default))}") from None


def size_list(values: Sequence[str] | None, default: Sequence[int], flag: str) -> list[int]:
  """number_list of ints >= 1 (sizes: layers, context lengths, widths)."""
  out = number_list(values, default, flag, int)
  if not out or min(out) < 1:
    raise StudyError(f"--{flag}={','.join(values)}: every value must be >= 1")
  return out


# ---------------------------------------------------------------------------- Runs and models


@dataclasses.dataclass
class Run:
  """One finished training run of a sweep."""
  name: str  # the workdir's name under --out
  workdir: str
  cfg: ml_collections.ConfigDict
  reused: bool  # finished by an earlier invocation: not trained now
  wall_s: float  # wall time of train.run, summed over the invocations that trained it
  records: list[dict]  # metrics.jsonl, one record per (step, split): the last one written wins

  @property
  def final_eval(self) -> dict:
    """The final evaluation (whole validation split): {"loss": ..., "bits_per_char": ...}."""
    rec = self.at(self.cfg.num_train_steps, "eval/loss")
    return {k[len("eval/"):]: v for k, v in rec.items() if k.startswith("eval/")}

  def at(self, step: int, key: str) -> dict:
    for r in self.records:
      if r["step"] == step and key in r:
        return r
    raise StudyError(f"{self.workdir}: its metrics.jsonl has no {key} at step {step} (a run "
                     f"trained with other settings, or cut short): give --out a new "
                     f"directory, or delete that run to train it again")

  def series(self, key: str) -> tuple[list[int], list[float]]:
    pairs = sorted((r["step"], r[key]) for r in self.records if key in r)
    return [s for s, _ in pairs], [v for _, v in pairs]

  def median(self, key: str) -> float:
    """Median of a train metric over the logged steps (the first, which compiled, is an outlier
    the median ignores)."""
    _, values = self.series(key)
    return float(np.median(values)) if values else math.nan


def _records(workdir: str) -> list[dict]:
  """metrics.jsonl with each (step, train/eval) record kept once: a resumed run logs again the
  steps after its last checkpoint, and the later record is the one that counts."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  latest = {}
  for r in metrics_lib.read_metrics(path):
    split = "eval" if any(k.startswith("eval/") for k in r) else "train"
    latest[(r["step"], split)] = r
  return [latest[k] for k in sorted(latest)]


def is_finished(workdir: str, steps: int) -> bool:
  """The run left its final checkpoint (orbax names the directory only once it is complete) and
  the final evaluation in metrics.jsonl."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints", str(steps))):
    return False
  return any(r["step"] == steps and "eval/loss" in r for r in _records(workdir))


_WALL_FILE = "study_wall_time.json"


def _wall(workdir: str) -> float:
  try:
    with open(os.path.join(workdir, _WALL_FILE), encoding="utf-8") as f:
      return float(json.load(f)["seconds"])
  except (OSError, ValueError, KeyError):
    return 0.0


def train_or_skip(cfg, workdir: str, overrides: dict | None = None) -> Run:
  """Trains `cfg` in `workdir` with train.run unless a finished run is there already.

  An unfinished workdir (an interrupted study) resumes from its latest checkpoint. overrides:
  the fields a command line would have given (a fine-tune's asked context fields win over its
  base's: loader.with_model_fields).
  """
  name = os.path.basename(os.path.normpath(workdir))
  steps = cfg.num_train_steps
  if is_finished(workdir, steps):
    print(f"{name}: finished earlier, reusing {workdir}", flush=True)
    return Run(name, workdir, cfg, True, _wall(workdir), _records(workdir))
  print(f"{name}: training {steps} steps in {workdir}", flush=True)
  t0 = time.perf_counter()
  code = train.run(cfg, workdir, overrides)
  os.makedirs(workdir, exist_ok=True)
  files.write_text(os.path.join(workdir, _WALL_FILE),
                   json.dumps({"seconds": _wall(workdir) + time.perf_counter() - t0}))
  preemption.check()  # the run stopped on a signal (its step is saved): so does the study
  if code != 0:
    raise StudyError(f"the run in {workdir} failed (exit code {code}; its message is above). "
                     f"Fix the config and rerun the same command: finished runs are kept")
  if not is_finished(workdir, steps):
    raise StudyError(f"the run in {workdir} stopped before step {steps} (interrupted); rerun "
                     f"the same command to resume it")
  return Run(name, workdir, cfg, False, _wall(workdir), _records(workdir))


def check_tasks(cfg) -> None:
  """The downstream tasks a study scores (cfg.tasks; the built-in play tasks when empty) read and
  checked: bad task input is a StudyError before any run trains."""
  from llm_jax.evals import harness  # pylint: disable=g-import-not-at-top
  try:
    harness.prepare(cfg)
  except errors.UserError as e:
    raise StudyError(str(e)) from None


def task_scores(run: Run) -> dict:
  """{"task core": the CORE-style aggregate, <task>: its headline metric} of the run's final
  checkpoint: the tasks of run.cfg (the built-in ones by default; tasks_limit caps them) through
  --mode=tasks' own harness (llm_jax.evals.harness.score)."""
  from llm_jax.evals import harness  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(run.cfg.to_dict())
  cfg.checkpoint_step = cfg.num_train_steps
  try:
    scored = harness.score(cfg, run.workdir, progress=False)
  except errors.UserError as e:
    raise StudyError(f"tasks of {run.workdir}: {e}") from None
  out = {"task core": scored.core}
  for name, r in scored.results.items():
    if r["headline"]:
      out[name] = r["metrics"][r["headline"]]
  return out


@dataclasses.dataclass
class Model:
  """A trained model to study: its config, model config, params, tokenizer and run."""
  cfg: ml_collections.ConfigDict
  model_cfg: model_lib.ModelConfig
  params: Any
  tokenizer: Any
  step: int
  workdir: str
  run: Run | None  # None when it came from --workdir


def trained_model(cfg, out: str, workdir: str | None = None) -> Model:
  """The run in `workdir` (an existing checkpoint, read only), or one trained in <out>/model."""
  run = None
  if workdir is None:
    workdir = os.path.join(out, "model")
    run = train_or_skip(cfg, workdir)
  try:
    loaded = load_checkpoint(cfg, workdir)
  except ckpt_lib.CheckpointError as e:
    raise StudyError(f"--workdir={workdir}: {e}") from None
  return Model(loaded.cfg, loaded.model_cfg, loaded.params, loaded.tokenizer, loaded.step,
               workdir, run)


def load_checkpoint(cfg, workdir: str) -> loader.Loaded:
  """A run's latest checkpoint (cfg.checkpoint_step's) through the project's one loader: its
  cfg with the checkpoint's model fields, model_cfg, params, tokenizer and step. No optimizer
  or Trainer: model_lib.build(model_cfg) is the model, model_lib.init_params a fresh init."""
  return loader.load(workdir, cfg, step=cfg.checkpoint_step)


@functools.lru_cache(maxsize=None)
def _nll_fn(model_cfg):
  model = model_lib.build(model_cfg)

  @jax.jit
  def nll(params, inputs_BT, targets_BT):
    logits_BTV = model.apply({"params": params}, inputs_BT)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  return nll


def token_nll(model_cfg, params, inputs_BT, targets_BT) -> np.ndarray:
  """[B, T] float32: -log p(target | inputs up to it) under the model's own forward pass."""
  return np.asarray(jax.device_get(_nll_fn(model_cfg)(params, inputs_BT, targets_BT)))


# ------------------------------------------------------------------------------------ Figures


def figure(n_panels: int, ncols: int | None = None, panel_size=(5.0, 3.6), title: str = ""):
  """(Figure, list of its axes): a grid of n_panels panels on the Agg canvas (no display)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  ncols = ncols or n_panels
  nrows = -(-n_panels // ncols)
  fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows + (0.4 if title else 0)),
               dpi=80)
  FigureCanvasAgg(fig)
  axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
  if title:
    fig.suptitle(title, fontsize=12)
  return fig, axes


def save_figure(fig, path: str) -> str:
  """Lays out (unless it has its own layout engine) and writes `fig` as a PNG; returns the path."""
  if fig.get_layout_engine() is None:
    fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, format="png")
  return path


def style(ax, title: str, xlabel: str, ylabel: str, *, xlog=None, ylog=None, legend=8):
  """Titles and labels a panel (with units), a light grid, log axes (True = base 10, or the
  base), and a legend of `legend` points (None: no legend)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  for log, set_scale, axis, lim in ((xlog, ax.set_xscale, ax.xaxis, ax.get_xlim),
                                    (ylog, ax.set_yscale, ax.yaxis, ax.get_ylim)):
    if log:
      set_scale("log", **({} if log is True else {"base": log}))
      lo, hi = lim()
      if hi < 10 * lo:  # less than a decade: 4.3, 4.4 ... rather than 4.3 x 10^0
        axis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
        axis.set_minor_formatter(ticker.FormatStrFormatter("%.3g"))
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  ax.grid(True, alpha=0.3)
  if legend:
    ax.legend(fontsize=legend)


# ------------------------------------------------------------------------------------- Report


def command(study: str, argv: Sequence[str] | None = None) -> str:
  """The command line that ran the study (sys.argv by default), quoted for a shell."""
  args = sys.argv[1:] if argv is None else list(argv)
  return " ".join(["python", "-m", f"experiments.{study}"] + [shlex.quote(a) for a in args])


def machine() -> str:
  """CPU model, core count, the jax devices and the load when the report was written."""
  cpu = "unknown CPU"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    import platform
    cpu = platform.processor() or cpu
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  kinds = {}
  for d in jax.devices():
    kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
  devices = ", ".join(f"{n} x {k}" for k, n in kinds.items())
  load = ""
  if hasattr(os, "getloadavg"):
    load = f"; load average {os.getloadavg()[0]:.1f} at the end"
  return (f"{cpu}, {os.cpu_count()} cores ({usable} usable); jax {jax.__version__} on "
          f"{devices}{load}")


def fmt(v) -> str:
  """A table cell: 4 significant digits for floats, thousands separators for ints, a dash for
  None (not measured)."""
  if v is None:
    return "-"
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, (int, np.integer)):
    return f"{int(v):,}"
  if isinstance(v, (float, np.floating)):
    v = float(v)
    if not math.isfinite(v):
      return str(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
      return f"{v:.3e}"
    return f"{v:.4g}"
  return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[dict]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


@dataclasses.dataclass
class Result:
  """What a study returns: the table rows, its figures by file name, its runs and report path."""
  rows: list[dict]
  figures: dict  # PNG file name -> matplotlib Figure
  runs: list[Run]
  report: str
  extra: dict = dataclasses.field(default_factory=dict)  # what else a study computed (fits, ...)


def jsonable(v):
  """numpy arrays and scalars, tuples and non-string dict keys as plain JSON values."""
  if isinstance(v, dict):
    return {str(k): jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [jsonable(x) for x in v]
  if isinstance(v, np.ndarray):
    return jsonable(v.tolist())
  if isinstance(v, np.integer):
    return int(v)
  if isinstance(v, (float, np.floating)):
    return float(v) if math.isfinite(v) else str(float(v))
  return v


def describe_figure(fig) -> dict:
  """What a figure shows, read back from the Figure: its title and pixel size, and per panel the
  title, axis labels and scales, tick labels and every series (line x/y, scatter points, image
  array). Saved beside the PNGs as figures.json: the data behind each picture."""
  panels, colorbars = [], 0
  for ax in fig.axes:
    if ax.get_label() == "<colorbar>":
      colorbars += 1
      continue
    series = [{"kind": "line", "label": l.get_label(), "x": np.asarray(l.get_xdata(), float),
               "y": np.asarray(l.get_ydata(), float)} for l in ax.get_lines()]
    series += [{"kind": "scatter", "label": c.get_label(), "points": np.asarray(c.get_offsets())}
               for c in ax.collections]
    series += [{"kind": "image", "data": np.asarray(im.get_array())} for im in ax.images]
    panels.append({"title": ax.get_title(), "xlabel": ax.get_xlabel(),
                   "ylabel": ax.get_ylabel(), "xscale": ax.get_xscale(),
                   "yscale": ax.get_yscale(),
                   "xticklabels": [t.get_text() for t in ax.get_xticklabels()],
                   "yticklabels": [t.get_text() for t in ax.get_yticklabels()],
                   "series": series})
  w, h = fig.get_size_inches() * fig.dpi
  return jsonable({"title": fig.get_suptitle(), "size_px": [round(w), round(h)],
                   "panels": panels, "colorbars": colorbars})


def write_report(out: str, *, title: str, intro: str, columns: Sequence[str], rows: list[dict],
                 figures: dict, captions: dict, runs: Sequence[Run] = (), command_line: str,
                 sections: Sequence[str] = (), started: float | None = None,
                 extra: dict | None = None) -> Result:
  """Writes the PNGs, report.md, results.json and figures.json into `out`; returns the Result.

  figures: {file name: Figure}; captions: {file name: what the picture shows}; sections: more
  markdown after the table (sample texts, neighbour lists); started: time.time() at the start;
  extra: what else the study computed, saved in results.json beside the rows.
  """
  os.makedirs(out, exist_ok=True)
  for name, fig in figures.items():
    save_figure(fig, os.path.join(out, name))
  trained = sum(not r.reused for r in runs)
  lines = [f"# {title}", "", intro, "", "```", command_line, "```", "",
           f"- machine: {machine()}",
           f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"]
  if started is not None:
    lines.append(f"- this invocation took {time.time() - started:.0f} s")
  if runs:
    lines.append(f"- runs: {len(runs)} ({trained} trained now, {len(runs) - trained} finished "
                 f"earlier and reused); training wall time {sum(r.wall_s for r in runs):.0f} s "
                 f"in all")
  lines += ["", markdown_table(columns, rows), ""]
  for name in figures:
    lines += [f"![{name}]({name})", "", captions.get(name, ""), ""]
  lines += list(sections)
  path = os.path.join(out, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines).rstrip() + "\n")
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(jsonable({"command": command_line, "columns": list(columns), "rows": rows,
                        "extra": extra or {}}), f)
  with open(os.path.join(out, "figures.json"), "w", encoding="utf-8") as f:
    json.dump({name: describe_figure(fig) for name, fig in figures.items()}, f)
  print(f"wrote {path}", flush=True)
  return Result(rows, figures, list(runs), path, dict(extra or {}))


# --------------------------------------------------------------------------------- Entry point


def guarded(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """`main` with the studies' conventions: warnings only unless --verbosity is given, and bad
  input (a StudyError) ends with `error: ...` on stderr and exit code 2."""

  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:
      absl_logging.set_verbosity(absl_logging.WARNING)
    try:
      if len(argv) > 1:
        raise StudyError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
      main(argv)
    except (StudyError, errors.UserError) as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(errors.BAD_INPUT)
    except preemption.Preempted as e:  # a run's training saved its step: a rerun resumes
      print(f"stopped by {e.name}: finished runs are kept and an interrupted one resumes; run "
            f"the same command to continue", file=sys.stderr, flush=True)
      preemption.exiting(e.exit_code)
      sys.exit(e.exit_code)

  return wrapped


def run_main(main: Callable[[list[str]], None]) -> None:
  """The entry point of `python -m experiments.<study>`: app.run(guarded(main))."""
  define_flags()
  preemption.install()  # SIGTERM / SIGINT in every phase of the study
  preemption.stop_exit_code(errors.OK)  # finished runs are kept, an interrupted one resumes
  topology.choose_platform()  # before any jax backend starts
  app.run(guarded(main))
