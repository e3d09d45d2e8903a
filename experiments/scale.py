"""Scale study: model size at a fixed number of training tokens, with fitted power laws (the
cheat sheet's "scale models").

    python -m experiments.scale --out=results/scale                       # d_model 32 .. 160 on CPU
    python -m experiments.scale --out=results/scale --d_models=64,128,256 --head_dim=64
    python -m experiments.scale --out=results/scale_gpu --scale=gpu       # d_model 128 .. 768

Shapes follow one rule, so a single number sets the size: n_heads = n_layers = d_model / head_dim
(head_dim 32 on cpu, 64 on gpu; d_ff = 4 d_model). Every run trains the same steps on the same
batches. Two fits, each a straight line in log-log space (least squares on log L):
  L(N) = a * N^-alpha   (N = parameters outside the embeddings, as Kaplan et al. 2020 count them)
  L(C) = b * C^-beta    (C = training FLOPs = llm_jax.metrics.flops_per_token * tokens)
with L the final validation loss in nats per token; beside them each size's downstream task
score (the built-in tasks' centred CORE-style aggregate of its final checkpoint, through
--mode=tasks' harness) against N. A pure power law has no irreducible-loss
term: over a small range of sizes it is the usual local description; over a wide one the curve
bends towards a floor the straight line does not have.
"""

import os
import time

from absl import flags
import numpy as np

from experiments import common
from experiments import depth
from llm_jax import metrics as metrics_lib
from llm_jax import sizing

_D_MODELS = flags.DEFINE_list("d_models", None, "scale: d_model values (default: the --scale "
                              "preset's, 32,64,96,128,160 on cpu)")
_HEAD_DIM = flags.DEFINE_integer("head_dim", None, "scale: n_heads = n_layers = d_model / head_dim "
                                 "(default: the preset's, 32 on cpu, 64 on gpu)")

# The model shape comes from d_model and head_dim; each preset's other fields as the sweeps'.
PRESETS = {
    "cpu": {"config": dict(common.SWEEP_CPU, eval_steps=50), "d_models": (32, 64, 96, 128, 160),
            "head_dim": 32},
    "gpu": {"config": dict(common.SWEEP_GPU, eval_steps=250),
            "d_models": (128, 256, 384, 512, 768), "head_dim": 64},
}


def fit_power_law(x, y) -> tuple[float, float]:
  """(a, alpha) of y = a * x^-alpha, least squares on log y against log x."""
  slope, intercept = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
  return float(np.exp(intercept)), float(-slope)


def configs(base, d_models, head_dim: int) -> dict:
  """{d_model: finalized config} of the sweep: n_heads = n_layers = d_model / head_dim."""
  cfgs = {}
  for d in d_models:
    if d % head_dim:
      raise common.StudyError(f"--d_models value {d} is not a multiple of --head_dim={head_dim}")
    k = d // head_dim
    cfgs[d] = common.finalize(base, d_model=d, n_heads=k, n_layers=k, n_kv_heads=None, d_k=None,
                              d_v=None, d_ff=None)
  return cfgs


def study(base, out: str, d_models, head_dim: int, command_line: str = "") -> common.Result:
  started = time.time()
  cfgs = configs(base, d_models, head_dim)
  common.check_tasks(next(iter(cfgs.values())))
  runs, rows, curves = [], [], {}
  for d, cfg in cfgs.items():
    run = common.train_or_skip(cfg, os.path.join(out, f"d_{d}"))
    runs.append(run)
    total, non_embedding = depth.param_counts(cfg)
    tokens_per_step = cfg.batch_size * cfg.block_size
    fpt = metrics_lib.flops_per_token(cfg, metrics_lib.count_params(sizing.param_shapes(cfg)))
    steps, losses = run.series("eval/loss")
    curves[d] = (np.asarray(steps) * tokens_per_step * fpt, np.asarray(losses))
    ev = run.final_eval
    tasks = common.task_scores(run)
    rows.append({"d_model": d, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                 "params": total, "non-embedding params": non_embedding,
                 "train FLOPs": fpt * tokens_per_step * cfg.num_train_steps,
                 "eval loss": ev["loss"], "bits/char": ev["bits_per_char"],
                 "task core": tasks.pop("task core"), "wall s": run.wall_s, "run": run.name,
                 "tasks": tasks})

  n = np.array([r["non-embedding params"] for r in rows], float)
  c = np.array([r["train FLOPs"] for r in rows], float)
  loss = np.array([r["eval loss"] for r in rows], float)
  fits = {}
  if len(rows) >= 2:
    fits["N"] = fit_power_law(n, loss)
    fits["C"] = fit_power_law(c, loss)

  cfg0 = next(iter(cfgs.values()))
  tokens = cfg0.num_train_steps * cfg0.batch_size * cfg0.block_size
  fig, (ax_n, ax_c, ax_t) = common.figure(3, title=(
      f"Model size at a fixed {tokens:,} training tokens (n_heads = n_layers = d_model / "
      f"{head_dim})"))
  ax_n.plot(n, loss, "o", color="C0", label="final validation loss")
  for r, x, y in zip(rows, n, loss):
    ax_n.annotate(f"d={r['d_model']}", (x, y), textcoords="offset points", xytext=(4, 4),
                  fontsize=7)
  if "N" in fits:
    a, alpha = fits["N"]
    xs = np.geomspace(n.min(), n.max(), 50)
    ax_n.plot(xs, a * xs**-alpha, "--", color="C3",
              label=f"fit L = {a:.3g} N^-{alpha:.3f}")
  common.style(ax_n, "Loss against parameters", "non-embedding parameters N (log scale)",
               "validation loss (nats/token, log scale)", xlog=True, ylog=True)
  for i, (d, (flops, losses)) in enumerate(curves.items()):
    ax_c.plot(flops, losses, "-", color=f"C{i}", alpha=0.5, linewidth=1,
              label=f"d={d} during training")
  ax_c.plot(c, loss, "ko", markersize=4, label="final validation loss")
  if "C" in fits:
    b, beta = fits["C"]
    xs = np.geomspace(c.min(), c.max(), 50)
    ax_c.plot(xs, b * xs**-beta, "--", color="C3", label=f"fit L = {b:.3g} C^-{beta:.4f}")
  common.style(ax_c, "Loss against training compute", "training FLOPs C (log scale)",
               "validation loss (nats/token, log scale)", xlog=True, ylog=True, legend=7)

  ax_t.plot(n, [r["task core"] for r in rows], "o-", color="C2",
            label="task score (mean centred accuracy)")
  ax_t.axhline(0.0, color="0.5", linewidth=0.8, linestyle=":", label="chance")
  common.style(ax_t, f"Downstream task score ({len(rows[0]['tasks'])} tasks)",
               "non-embedding parameters N (log scale)",
               "CORE-style score (0 = chance, 1 = all right)", xlog=True, legend=7)

  fit_text = "Too few sizes for a fit."
  if fits:
    (a, alpha), (b, beta) = fits["N"], fits["C"]
    fit_text = (f"Fitted power laws (least squares in log-log space over the {len(rows)} runs, "
                f"no irreducible-loss term): L(N) = {a:.4g} * N^-{alpha:.4f} and "
                f"L(C) = {b:.4g} * C^-{beta:.4f}, with L the final validation loss in nats, N "
                f"the non-embedding parameters and C the training FLOPs.")
  intro = (f"d_model in {{{', '.join(map(str, d_models))}}} with n_heads = n_layers = d_model / "
           f"{head_dim}, each trained {cfg0.num_train_steps} steps of {cfg0.batch_size} x "
           f"{cfg0.block_size} tokens (the same {tokens:,} tokens for all), learning rate "
           f"{cfg0.learning_rate:g}. Training FLOPs count 6 N + attention per token "
           f"(llm_jax.metrics.flops_per_token, the embeddings counted once). {fit_text} The "
           f"task score is the CORE-style aggregate of each final checkpoint on "
           f"{', '.join(rows[0]['tasks'])} (headline accuracies centred by their chance "
           f"levels, averaged; `--mode=tasks` scores the same).")
  columns = ["d_model", "n_layers", "n_heads", "params", "non-embedding params", "train FLOPs",
             "eval loss", "bits/char", "task core", "wall s", "run"]
  return common.write_report(
      out, title="Scale: loss against model size and compute", intro=intro, columns=columns,
      rows=rows, figures={"scale.png": fig},
      captions={"scale.png": "Left: final validation loss against non-embedding parameters, "
                             "log-log, with the fitted power law. Right: the validation loss of "
                             "each size during training against the FLOPs spent so far, the "
                             "final points and their power-law fit. Third: the final "
                             "checkpoints' downstream task score against N."},
      runs=runs, command_line=command_line, started=started, extra={"fits": fits})


def main(argv):
  del argv
  preset = PRESETS[common.scale()]
  base = common.study_config(preset["config"])
  d_models = common.size_list(_D_MODELS.value, preset["d_models"], "d_models")
  head_dim = _HEAD_DIM.value or preset["head_dim"]
  study(base, common.out_dir(), d_models, head_dim, common.command("scale"))


if __name__ == "__main__":
  common.run_main(main)
