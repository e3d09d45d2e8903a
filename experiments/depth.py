"""Depth study: n_layers at a fixed token budget (the cheat sheet's "adjust model depth").

    python -m experiments.depth --out=results/depth                  # n_layers 1, 2, 4, 8 on CPU
    python -m experiments.depth --out=results/depth --layers=2,6 --config.num_train_steps=600
    python -m experiments.depth --out=results/depth_gpu --scale=gpu  # 2, 4, 8, 16 layers, d_model 512

Every run has the same config but n_layers, so all see the same batches (same tokens, same order).
Reports the final evaluation (loss, bits per character over the whole validation split), the
downstream task score of the final checkpoint (the built-in tasks' centred CORE-style aggregate,
through --mode=tasks' harness; --config.tasks / tasks_limit choose them), the wall time and step
time, the parameters; plots the loss curves of all depths on one axes, bits per character
against wall time, and the task score against depth.
"""

import os
import time

from absl import flags

from experiments import common
from llm_jax import sizing

_LAYERS = flags.DEFINE_list("layers", None, "depth: n_layers values (default: the --scale "
                            "preset's, 1,2,4,8 on cpu)")

PRESETS = {"cpu": {"config": common.SWEEP_CPU, "layers": (1, 2, 4, 8)},
           "gpu": {"config": common.SWEEP_GPU, "layers": (2, 4, 8, 16)}}


def param_counts(cfg) -> tuple[int, int]:
  """(all parameters, parameters outside the embeddings), exact, nothing allocated."""
  breakdown = sizing.param_breakdown(sizing.param_shapes(cfg))
  total = sum(breakdown.values())
  return total, total - breakdown.get("embeddings", 0)


def configs(base, layers) -> dict:
  """{n_layers: finalized config} of the sweep (every error before any run)."""
  return {n: common.finalize(base, n_layers=n) for n in layers}


def study(base, out: str, layers, command_line: str = "") -> common.Result:
  started = time.time()
  cfgs = configs(base, layers)
  common.check_tasks(next(iter(cfgs.values())))
  runs, rows = [], []
  for n, cfg in cfgs.items():
    run = common.train_or_skip(cfg, os.path.join(out, f"layers_{n}"))
    ev = run.final_eval
    total, non_embedding = param_counts(cfg)
    runs.append(run)
    tasks = common.task_scores(run)
    rows.append({"n_layers": n, "params": total, "non-embedding params": non_embedding,
                 "eval loss": ev["loss"], "bits/char": ev["bits_per_char"],
                 "accuracy": ev["accuracy"], "task core": tasks.pop("task core"),
                 "wall s": run.wall_s, "s/step": run.median("train/step_time_s"),
                 "tokens/s": run.median("train/tokens_per_s"), "run": run.name,
                 "tasks": tasks})

  cfg0 = next(iter(cfgs.values()))
  tokens = cfg0.num_train_steps * cfg0.batch_size * cfg0.block_size
  fig, (ax_curve, ax_cost, ax_tasks) = common.figure(3, title=(
      f"Depth at a fixed budget of {tokens:,} tokens (d_model {cfg0.d_model}, context "
      f"{cfg0.block_size}, batch {cfg0.batch_size})"))
  for i, (run, row) in enumerate(zip(runs, rows)):
    color = f"C{i}"
    steps, loss = run.series("train/loss")
    ax_curve.plot(steps, loss, "-", color=color, alpha=0.45, linewidth=1,
                  label=f"L={row['n_layers']}, train")
    steps, loss = run.series("eval/loss")
    ax_curve.plot(steps, loss, "o-", color=color, markersize=4,
                  label=f"L={row['n_layers']}, eval")
  # The first steps fall from log(vocab); the axis shows the range where the depths differ.
  first_evals = [run.series("eval/loss")[1][0] for run in runs]
  lowest = min(min(run.series(k)[1]) for run in runs for k in ("train/loss", "eval/loss"))
  ax_curve.set_ylim(lowest - 0.05 * (max(first_evals) - lowest), 1.15 * max(first_evals))
  common.style(ax_curve, "Loss during training (the first steps off the top)",
               "optimizer step", "cross-entropy (nats/token)", legend=7)
  walls = [r["wall s"] for r in rows]
  bpc = [r["bits/char"] for r in rows]
  ax_cost.plot(walls, bpc, "o-", color="C0", label="final eval (whole validation split)")
  for r in rows:
    ax_cost.annotate(f"L={r['n_layers']}\n{r['params'] / 1e6:.2f}M params",
                     (r["wall s"], r["bits/char"]), textcoords="offset points", xytext=(5, 4),
                     fontsize=7)
  ax_cost.margins(x=0.2, y=0.15)  # room for the labels
  common.style(ax_cost, "Quality against training time", "training wall time (s)",
               "validation bits per character", legend=7)

  depths = [r["n_layers"] for r in rows]
  ax_tasks.plot(depths, [r["task core"] for r in rows], "o-", color="C2",
                label="task score (mean centred accuracy)")
  ax_tasks.axhline(0.0, color="0.5", linewidth=0.8, linestyle=":", label="chance")
  ax_tasks.set_xticks(depths)
  common.style(ax_tasks, f"Downstream task score ({len(rows[0]['tasks'])} tasks)", "n_layers",
               "CORE-style score (0 = chance, 1 = all right)", xlog=False, legend=7)

  best = min(rows, key=lambda r: r["bits/char"])
  top = max(rows, key=lambda r: r["task core"])
  intro = (f"`n_layers` in {{{', '.join(map(str, layers))}}}, everything else equal: "
           f"{cfg0.num_train_steps} steps of {cfg0.batch_size} x {cfg0.block_size} tokens "
           f"({tokens:,} tokens, the same batches for every depth), d_model {cfg0.d_model}, "
           f"{cfg0.n_heads} heads, learning rate {cfg0.learning_rate:g}. The loss is the final "
           f"evaluation over the whole validation split. Lowest bits per character: "
           f"{best['n_layers']} layers ({best['bits/char']:.3f}). The task score is the "
           f"CORE-style aggregate of the final checkpoint on {', '.join(rows[0]['tasks'])} "
           f"(each task's headline accuracy centred by its chance level, then averaged; "
           f"`--mode=tasks` scores the same): highest at {top['n_layers']} layers "
           f"({top['task core']:.3f}).")
  columns = ["n_layers", "params", "non-embedding params", "eval loss", "bits/char", "accuracy",
             "task core", "wall s", "s/step", "tokens/s", "run"]
  return common.write_report(
      out, title="Depth: n_layers at a fixed token budget", intro=intro, columns=columns,
      rows=rows, figures={"depth.png": fig},
      captions={"depth.png": "Left: train loss (faint) and eval loss (dots) against step, one "
                             "colour per depth. Right: final validation bits per character "
                             "against training wall time (compile and evaluations included). "
                             "Third: the final checkpoint's downstream task score."},
      runs=runs, command_line=command_line, started=started)


def main(argv):
  del argv
  preset = PRESETS[common.scale()]
  base = common.study_config(preset["config"])
  layers = common.size_list(_LAYERS.value, preset["layers"], "layers")
  study(base, common.out_dir(), layers, common.command("depth"))


if __name__ == "__main__":
  common.run_main(main)
