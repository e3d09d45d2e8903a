"""Context study: max_seq_len at a fixed number of tokens per step (the cheat sheet's "expand
context length").

    python -m experiments.context --out=results/context                 # 32, 64, 128, 256 on CPU
    python -m experiments.context --out=results/context --seq_lens=64,512 --tokens_per_step=4096
    python -m experiments.context --out=results/context_gpu --scale=gpu  # 128 .. 1024, d_model 512

Each run trains with context T = max_seq_len = block_size and T * micro_batch_size = the same
tokens per step, so every run sees the same number of tokens. For each run: the final
evaluation, the loss by position in the context (the model's own forward pass over the whole
validation split, mean cross-entropy at each position: a token late in a long context has more
to condition on), the training throughput, and XLA's memory analysis of one compiled train step.
"""

import os
import time

from absl import flags
import numpy as np

from experiments import common
from llm_jax import data as data_lib
from llm_jax import train

_SEQ_LENS = flags.DEFINE_list("seq_lens", None, "context: max_seq_len values (default: the "
                              "--scale preset's, 32,64,128,256 on cpu)")
_TOKENS_PER_STEP = flags.DEFINE_integer(
    "tokens_per_step", None, "context: tokens per optimizer step, the same for every context "
    "length (default: the config's batch_size * block_size)")

PRESETS = {"cpu": {"config": common.SWEEP_CPU, "seq_lens": (32, 64, 128, 256)},
           "gpu": {"config": common.SWEEP_GPU, "seq_lens": (128, 256, 512, 1024)}}
MIB = 1024**2


def loss_by_position(cfg, workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """([T] mean cross-entropy in nats, [T] tokens counted) at each position of the context, over
  the whole validation split."""
  loaded = common.load_checkpoint(cfg, workdir)
  data = data_lib.build(cfg, workdir)
  nll_sum = np.zeros(cfg.block_size)
  count = np.zeros(cfg.block_size)
  for batch in data.eval_batches():
    nll_BT = common.token_nll(loaded.model_cfg, loaded.params, batch["inputs"],
                              batch["targets"])
    nll_sum += (nll_BT * batch["weights"]).sum(0)
    count += batch["weights"].sum(0)
  return nll_sum / np.maximum(count, 1), count


def configs(base, seq_lens, tokens_per_step: int | None = None) -> dict:
  """{max_seq_len: finalized config} of the sweep, each with tokens_per_step / T rows per step
  (default tokens_per_step: the base config's micro_batch_size * block_size)."""
  if tokens_per_step is None:
    b = common.finalize(base)
    tokens_per_step = b.micro_batch_size * b.block_size
  cfgs = {}
  for t in seq_lens:
    if tokens_per_step % t:
      raise common.StudyError(f"--tokens_per_step={tokens_per_step} is not a multiple of "
                              f"max_seq_len={t}: every run must see the same tokens per step")
    cfgs[t] = common.finalize(base, max_seq_len=t, block_size=t, max_position_embeddings=None,
                              micro_batch_size=tokens_per_step // t, batch_size=None)
  return cfgs


def octaves(curve_T, count_T) -> tuple[np.ndarray, np.ndarray]:
  """The per-position losses averaged (token-weighted) over octaves of the tokens seen, 1, 2-3,
  4-7, ..., the last octave ending at T (a lone last position would be a noisy point): a few
  hundred validation rows make single positions noisy. Returns (the mean tokens seen in each
  octave, its mean loss)."""
  t = len(curve_T)
  seen_T = np.arange(1, t + 1)
  octave_T = np.minimum(np.floor(np.log2(seen_T)), np.floor(np.log2(max(t - 1, 1)))).astype(int)
  seen, loss = [], []
  for o in np.unique(octave_T):
    w = count_T * (octave_T == o)
    seen.append((seen_T * w).sum() / w.sum())
    loss.append((curve_T * w).sum() / w.sum())
  return np.array(seen), np.array(loss)


def step_memory(cfg) -> dict:
  """XLA's memory analysis of the run's own train step (compiled ahead of time for this config
  and step count, so the persistent compilation cache usually has it): bytes per device."""
  m = train.Trainer(cfg, cfg.num_train_steps).lower_train_step().compile().memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)
  return {"peak": peak, "temp": m.temp_size_in_bytes}


def study(base, out: str, seq_lens, tokens_per_step: int | None = None,
          command_line: str = "") -> common.Result:
  started = time.time()
  cfgs = configs(base, seq_lens, tokens_per_step)
  cfg0 = next(iter(cfgs.values()))
  tokens_per_step = cfg0.micro_batch_size * cfg0.block_size
  runs, rows, curves, counts = [], [], {}, {}
  for t, cfg in cfgs.items():
    run = common.train_or_skip(cfg, os.path.join(out, f"seq_{t}"))
    runs.append(run)
    curves[t], counts[t] = loss_by_position(cfg, run.workdir)
    mem = step_memory(cfg)
    ev = run.final_eval
    quarter = max(1, t // 4)
    rows.append({"max_seq_len": t, "micro_batch": cfg.micro_batch_size, "eval loss": ev["loss"],
                 "bits/char": ev["bits_per_char"],
                 "loss @ pos 0-7": float(curves[t][:8].mean()),
                 "loss @ last 25%": float(curves[t][-quarter:].mean()),
                 "tokens/s": run.median("train/tokens_per_s"),
                 "s/step": run.median("train/step_time_s"),
                 "step peak MiB": mem["peak"] / MIB, "step temp MiB": mem["temp"] / MIB,
                 "run": run.name})

  fig, (ax_pos, ax_speed, ax_mem) = common.figure(3, title=(
      f"Context length at {tokens_per_step:,} tokens per step, {cfg0.num_train_steps} steps "
      f"(d_model {cfg0.d_model}, {cfg0.n_layers} layers)"))
  for i, t in enumerate(curves):
    seen, loss = octaves(curves[t], counts[t])
    ax_pos.plot(seen, loss, "o-", color=f"C{i}", markersize=4, label=f"T={t}")
  common.style(ax_pos, "Validation loss by position in the context",
               "tokens of context seen (mean of each octave 1, 2-3, 4-7, ...)",
               "cross-entropy (nats/token)", xlog=2)
  ts = [r["max_seq_len"] for r in rows]
  ax_speed.plot(ts, [r["tokens/s"] for r in rows], "o-", label="training throughput")
  common.style(ax_speed, "Throughput", "context length T (tokens)",
               "tokens per second (median step)", xlog=2)
  ax_speed.set_ylim(bottom=0)
  ax_mem.plot(ts, [r["step peak MiB"] for r in rows], "o-", label="peak (args + outputs + temps)")
  ax_mem.plot(ts, [r["step temp MiB"] for r in rows], "s--", label="temporaries (activations)")
  common.style(ax_mem, "Memory of one train step (XLA analysis)", "context length T (tokens)",
               "MiB per device", xlog=2)
  ax_mem.set_ylim(bottom=0)

  intro = (f"`max_seq_len` (= `block_size`) in {{{', '.join(map(str, seq_lens))}}} with "
           f"`micro_batch_size` = {tokens_per_step:,} / T, so every run trains on the same "
           f"{tokens_per_step * cfg0.num_train_steps:,} tokens ({cfg0.num_train_steps} steps). "
           f"Loss by position: the mean cross-entropy of the token at each position of a "
           f"validation row of T tokens, from the model's own forward pass over the whole "
           f"validation split. Memory: XLA's analysis of the compiled train step, per device: "
           f"peak = arguments + outputs + temporaries - donated (aliased) buffers.")
  columns = ["max_seq_len", "micro_batch", "eval loss", "bits/char", "loss @ pos 0-7",
             "loss @ last 25%", "tokens/s", "s/step", "step peak MiB", "step temp MiB", "run"]
  return common.write_report(
      out, title="Context length: max_seq_len at fixed tokens per step", intro=intro,
      columns=columns, rows=rows, figures={"context.png": fig},
      captions={"context.png": "Left: validation loss by how many tokens of context the "
                               "predicted token has (octaves, log scale), one curve per trained "
                               "context length: does a token with more context before it get a "
                               "lower loss? Middle: training tokens per second (median step). "
                               "Right: memory of the compiled train step."},
      runs=runs, command_line=command_line, started=started,
      extra={"curves": curves, "counts": counts})


def main(argv):
  del argv
  preset = PRESETS[common.scale()]
  base = common.study_config(preset["config"])
  seq_lens = common.size_list(_SEQ_LENS.value, preset["seq_lens"], "seq_lens")
  study(base, common.out_dir(), seq_lens, _TOKENS_PER_STEP.value, common.command("context"))


if __name__ == "__main__":
  common.run_main(main)
