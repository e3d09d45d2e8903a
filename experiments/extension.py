"""Context extension, the context study's sequel: a model trained at context 128 run at 512 with
each RoPE scaling, as it is and after a brief fine-tune at 512.

    python -m experiments.extension --out=results/extension                  # 2 CPU cores
    python -m experiments.extension --out=results/extension --trained_len=256 --extend_to=1024

1. Trains the --config at max_seq_len = --trained_len (configs/default.py's 128) in <out>/base.
2. Evaluates it on rows of --extend_to tokens (the whole validation split) with no scaling and
   with linear, dynamic (NTK) and YaRN scaling by factor extend_to / trained_len, the original
   length trained_len: the loss at each position, past the trained length included.
3. Fine-tunes it at --extend_to for --finetune_steps steps with each scaling (a full fine-tune
   from the base, init_from; the same tokens per step), and evaluates each the same way.
The scalings are the config's rope_scaling fields (README: Long context), asked as a command line
would ask them: the loader then takes them (and max_seq_len) from the run's config rather than
from the checkpoint.
"""

import os
import time

from absl import flags
import numpy as np

from experiments import common
from llm_jax import data as data_lib
from llm_jax import loader

_TRAINED = flags.DEFINE_integer("trained_len", 128, "extension: the context the base trains at")
_EXTEND = flags.DEFINE_integer("extend_to", 512, "extension: the context it is run and "
                               "fine-tuned at (a multiple of --trained_len)")
_FT_STEPS = flags.DEFINE_integer("finetune_steps", 60, "extension: steps of each fine-tune")

SCALINGS = ("none", "linear", "dynamic", "yarn")
BIN = 32  # positions per point of the loss-by-position curves


def scaling_fields(kind: str, trained: int, extend: int) -> dict:
  """The rope_scaling fields of one scaling for running a `trained`-token model at `extend`."""
  fields = {"rope_scaling": kind}
  if kind != "none":
    fields["rope_scaling_factor"] = extend / trained
  if kind in ("dynamic", "yarn"):
    fields["rope_original_max_len"] = trained
  return fields


def configs(base, trained: int, extend: int, finetune_steps: int) -> dict:
  """{"base": the run at `trained`, kind: the config at `extend` with that scaling (a fine-tune
  of the base when finetune_steps, else only evaluated)}, all at the base's tokens per step."""
  if extend % trained or extend <= trained:
    raise common.StudyError(f"--extend_to={extend} must be a multiple of --trained_len="
                            f"{trained}, larger than it")
  b = common.finalize(base, max_seq_len=trained, block_size=trained, max_position_embeddings=None)
  rows = b.micro_batch_size * trained // extend
  if rows < 1:
    raise common.StudyError(f"micro_batch_size={b.micro_batch_size} rows of {trained} tokens are "
                            f"less than one row of {extend}: raise --config.micro_batch_size")
  out = {"base": b}
  for kind in SCALINGS:
    out[kind] = common.finalize(
        base, max_seq_len=extend, block_size=extend, max_position_embeddings=None,
        micro_batch_size=rows, batch_size=None, num_train_steps=finetune_steps,
        warmup_steps=min(b.warmup_steps, max(1, finetune_steps // 5)),
        eval_steps=finetune_steps, save_steps=finetune_steps,
        **scaling_fields(kind, trained, extend))
  return out


def _asked(cfg) -> dict:
  """The context fields as a command line asking for them (loader.with_model_fields)."""
  return {f: cfg[f] for f in ("max_seq_len",) + loader.ROPE_FIELDS}


def loss_by_position(cfg, workdir: str) -> np.ndarray:
  """[block_size] mean cross-entropy (nats) at each position over the validation split, of the
  model in `workdir` run with cfg's context fields."""
  loaded = loader.load(workdir, cfg, asked=_asked(cfg))
  data = data_lib.build(loaded.cfg, workdir, tokenizer=loaded.tokenizer)
  nll_sum, count = np.zeros(cfg.block_size), np.zeros(cfg.block_size)
  for batch in data.eval_batches():
    nll_BT = common.token_nll(loaded.model_cfg, loaded.params, batch["inputs"], batch["targets"])
    nll_sum += (nll_BT * batch["weights"]).sum(0)
    count += batch["weights"].sum(0)
  return nll_sum / np.maximum(count, 1)


def _binned(curve_T):
  t = len(curve_T) // BIN * BIN
  return np.arange(t // BIN) * BIN + BIN / 2, curve_T[:t].reshape(-1, BIN).mean(1)


def study(base, out: str, trained: int = 128, extend: int = 512, finetune_steps: int = 60,
          command_line: str = "") -> common.Result:
  started = time.time()
  cfgs = configs(base, trained, extend, finetune_steps)
  base_run = common.train_or_skip(cfgs["base"], os.path.join(out, "base"))
  runs, rows, zero, tuned = [base_run], [], {}, {}
  for kind in SCALINGS:
    cfg = cfgs[kind]
    zero[kind] = loss_by_position(cfg, base_run.workdir)
    if finetune_steps:
      ft = common.finalize(cfg, init_from=base_run.workdir, tokenizer_path=None)
      run = common.train_or_skip(ft, os.path.join(out, f"finetune_{kind}"), overrides=_asked(ft))
      runs.append(run)
      tuned[kind] = loss_by_position(cfg, run.workdir)
    row = {"rope_scaling": kind, **{k: v for k, v in scaling_fields(kind, trained, extend).items()
                                    if k != "rope_scaling"}}
    for name, curves in (("as trained", zero), ("fine-tuned", tuned)):
      if kind in curves:
        row[f"{name} @ 0-{trained - 1}"] = float(curves[kind][:trained].mean())
        row[f"{name} @ {trained}-{extend - 1}"] = float(curves[kind][trained:].mean())
    rows.append(row)

  panels = 2 if finetune_steps else 1
  fig, axes = common.figure(panels, title=(
      f"A model trained at context {trained} run at {extend} ({cfgs['base'].num_train_steps} "
      f"steps, d_model {cfgs['base'].d_model}, {cfgs['base'].n_layers} layers)"))
  for ax, (name, curves) in zip(axes, (("as trained", zero), (
      f"after {finetune_steps} steps of fine-tuning at {extend}", tuned))):
    for i, kind in enumerate(SCALINGS):
      x, y = _binned(curves[kind])
      ax.plot(x, y, "o-", color=f"C{i}", markersize=3, label=kind)
    ax.axvline(trained, color="gray", linestyle=":", label=f"trained context {trained}")
    common.style(ax, f"Loss by position, {name}", f"position in the row (mean of {BIN})",
                 "cross-entropy (nats/token)")

  intro = (f"The base trains at max_seq_len={trained} ({cfgs['base'].num_train_steps} steps), "
           f"then runs on validation rows of {extend} tokens with each `rope_scaling` (factor "
           f"{extend // trained}, original length {trained} for dynamic and YaRN): the mean "
           f"cross-entropy at the trained positions and past them. Fine-tuned: {finetune_steps} "
           f"steps at {extend} from the base with the same scaling and tokens per step.")
  columns = ["rope_scaling", "rope_scaling_factor", "rope_original_max_len"] + [
      f"{name} @ {r}" for name in ("as trained", "fine-tuned")
      for r in (f"0-{trained - 1}", f"{trained}-{extend - 1}") if finetune_steps or
      name == "as trained"]
  return common.write_report(
      out, title=f"Context extension: trained at {trained}, run at {extend}", intro=intro,
      columns=columns, rows=rows, figures={"extension.png": fig},
      captions={"extension.png": f"Validation loss by position in rows of {extend} tokens, "
                                 f"averaged over {BIN} positions; the dotted line is the "
                                 f"trained context. Left: the base as trained; right: after "
                                 f"the brief fine-tune at {extend} with each scaling."},
      runs=runs, command_line=command_line, started=started,
      extra={"as_trained": zero, "fine_tuned": tuned})


def main(argv):
  del argv
  base = common.study_config(common.SWEEP_CPU if common.scale() == "cpu" else common.SWEEP_GPU)
  study(base, common.out_dir(), _TRAINED.value, _EXTEND.value, _FT_STEPS.value,
        common.command("extension"))


if __name__ == "__main__":
  common.run_main(main)
