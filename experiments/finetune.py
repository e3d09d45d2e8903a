"""Custom data and fine-tuning: from scratch, full fine-tuning, LoRA three ways, at equal steps.

    python -m experiments.finetune --out=results/finetune                  # Python's docs, on CPU
    python -m experiments.finetune --out=results/finetune --workdir=runs/default \\
        --data='text:/data/mine/*.txt' --validation='/data/held_out/*.txt'  # your text, your model
    python -m experiments.finetune --out=results/finetune_gpu --scale=gpu

The cheat sheet's "train on custom data" and "fine-tune pretrained models". Five runs on the same
new text, each `--steps` optimizer steps of the same batches, with the base model's tokenizer
(so losses compare token for token):

- scratch: the base's architecture, randomly initialised (the --config's own learning rate);
- full: every weight, starting from the base (init_from, lora_r=0, AdamW at 3e-4);
- lora: rank-8 adapters on every projection of the frozen base (configs/finetune.py's recipe);
- lora+tables: the same adapters, and the whole embedding (and an untied head) trained beside
  them (lora_train_embeddings);
- lora+tokens: the same adapters, and the embedding (and untied head) rows of the new text's
  vocabulary_size / 16 most frequent tokens (lora_trainable_tokens), the other rows frozen.

The base is --workdir (a trained run), or the --config trained on its own dataset in <out>/model
(configs/default.py: the model `make train` gives, on Shakespeare). --data is the new text
(a `text:` glob or directory); without it, the 79 topics of Python's own reference documentation
(the standard library's pydoc_data) are written to <out>/data, 4 of them held out for validation:
text of another kind than plays. Reports the first evaluation (the base on the new text, before
any update), the final one, the trained parameters, the checkpoint's size and the time; plots
the eval curves.
"""

import os
import time

from absl import flags

from configs import finetune as finetune_config
import numpy as np

from experiments import common
from llm_jax import checkpoint as ckpt_lib
from llm_jax import data as data_lib

_DATA = flags.DEFINE_string("data", None, "finetune: the new text, text:<dir or glob> (default: "
                            "Python's reference documentation, written to <out>/data)")
_VALIDATION = flags.DEFINE_string("validation", None, "finetune: held-out text for --data, a "
                                  "glob (default: validation_fraction of --data's documents)")
_STEPS = flags.DEFINE_integer("steps", None, "finetune: optimizer steps of each run (default: "
                              "the --scale preset's, 200 on cpu)")

PRESETS = {"cpu": {"steps": 200, "eval_steps": 25}, "gpu": {"steps": 1000, "eval_steps": 100}}
# configs/finetune.py's LoRA recipe (its fields that differ from configs/base.py), for the
# fine-tuning runs; the steps and evaluations are the study's.
_SCHEDULE = ("num_train_steps", "eval_steps", "save_steps", "log_every", "eval_batches",
             "max_new_tokens", "micro_batch_size", "batch_size")  # the batches: the --config's
# Its optimizer too (AdamW), whatever the --config trains with: LoRA refuses Muon.
LORA = {k: v for k, v in finetune_config.get_config().items()
        if k not in _SCHEDULE and (k == "optimizer" or v != finetune_config.base.get_config()[k])}
FULL = dict(LORA, lora_r=0, learning_rate=3e-4, min_learning_rate=3e-5)


def pydoc_corpus(out: str) -> str:
  """Python's reference documentation (pydoc_data's topics) as <out>/data/pydoc/{train,val}/*.txt,
  every 20th topic held out; returns the dataset spec."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  root = os.path.join(out, "data", "pydoc")
  for i, (name, text) in enumerate(sorted(topics.topics.items())):
    split = "val" if i % 20 == 10 else "train"
    os.makedirs(os.path.join(root, split), exist_ok=True)
    path = os.path.join(root, split, f"{name}.txt")
    if not os.path.exists(path):
      with open(path, "w", encoding="utf-8") as f:
        f.write(text)
  return f"text:{root}/train"


def frequent_tokens(cfg, tokenizer, k: int) -> str:
  """The `k` most frequent ids of cfg's training text under `tokenizer` (no special ids), as
  lora_trainable_tokens takes them."""
  counts = np.bincount(data_lib.build(cfg, None, 0, 1, tokenizer=tokenizer).train_tokens,
                       minlength=cfg.vocab_size)
  for special in (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id):
    if 0 <= special < len(counts):
      counts[special] = 0
  return ",".join(str(i) for i in sorted(np.argsort(-counts, kind="stable")[:k].tolist()))


def _mib(directory: str) -> float:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory)
             for f in fs) / 2**20


def configs(base, model, data: str, validation: str, steps: int, eval_steps: int) -> dict:
  """{mode: finalized config} of the five runs (every error before any run)."""
  proto = getattr(model.tokenizer, "model_proto", None)
  if proto is None:
    raise common.StudyError(f"the base model in {model.workdir} has a Hugging Face tokenizer; "
                            f"the scratch run needs a sentencepiece one (an llm_jax-trained base)")
  tok_path = os.path.join(model.workdir, "tokenizer.model")
  if not os.path.exists(tok_path):  # the base read its tokenizer from tokenizer_path
    tok_path = model.cfg.tokenizer_path
  shared = dict(dataset=data, validation=validation, num_train_steps=steps, eval_steps=eval_steps,
                save_steps=steps, log_every=min(10, eval_steps), sample_every_eval=False,
                warmup_steps=min(LORA["warmup_steps"], steps // 2))
  # The scratch run: model.cfg, the --config with the base's model fields (as the loader took
  # them from its checkpoint), so the base's architecture with the --config's optimizer.
  tuned = dict(shared, init_from=model.workdir, tokenizer_path=None)
  full = common.finalize(base, **{**FULL, **tuned})
  tokens = frequent_tokens(full, model.tokenizer, max(1, full.vocab_size // 16))
  return {"scratch": common.finalize(model.cfg, **shared, tokenizer_path=tok_path),
          "full": full,
          "lora": common.finalize(base, **{**LORA, **tuned}),
          "lora+tables": common.finalize(base, **{**LORA, **tuned},
                                         lora_train_embeddings=True),
          "lora+tokens": common.finalize(base, **{**LORA, **tuned},
                                         lora_trainable_tokens=tokens)}


def study(base, out: str, data: str | None, steps: int, eval_steps: int,
          workdir: str | None = None, command_line: str = "",
          validation: str | None = None) -> common.Result:
  started = time.time()
  model = common.trained_model(common.finalize(base), out, workdir)
  if validation and not data:
    raise common.StudyError("--validation without --data: it is the held-out text of --data")
  validation = validation or ("" if data else base.validation)
  label = data
  if not data:
    data, label = pydoc_corpus(out), "Python's reference documentation"
    validation = os.path.join(os.path.dirname(data[len("text:"):]), "val", "*.txt")
  cfgs = configs(base, model, data, validation, steps, eval_steps)
  runs, rows = [], []
  for mode, cfg in cfgs.items():
    run = common.train_or_skip(cfg, os.path.join(out, mode))
    ev = run.final_eval
    first = run.series("eval/bits_per_char")
    first_loss = run.series("eval/loss")
    runs.append(run)
    rows.append({"run": mode, "trained params": ckpt_lib.param_count(run.workdir, steps),
                 "checkpoint MiB": _mib(os.path.join(run.workdir, "checkpoints", str(steps))),
                 "learning rate": cfg.learning_rate,
                 "bits/char at step 0": first[1][0] if first[0] and first[0][0] == 0 else None,
                 "eval loss at step 0": (first_loss[1][0] if first_loss[0]
                                         and first_loss[0][0] == 0 else None),
                 "eval loss": ev["loss"], "bits/char": ev["bits_per_char"],
                 "accuracy": ev["accuracy"], "wall s": run.wall_s,
                 "s/step": run.median("train/step_time_s")})

  cfg0 = cfgs["scratch"]
  fig, (ax_eval, ax_train) = common.figure(2, title=(
      f"New text ({label}) after a model of {model.cfg.dataset}: {steps} steps of "
      f"{cfg0.batch_size} x {cfg0.block_size} tokens each"))
  for i, run in enumerate(runs):
    ax_eval.plot(*run.series("eval/bits_per_char"), "o-", color=f"C{i}", markersize=4,
                 label=run.name)
    ax_train.plot(*run.series("train/loss"), "-", color=f"C{i}", linewidth=1, label=run.name)
  common.style(ax_eval, "Validation bits per character (step 0: before any update)",
               "optimizer step", "bits per character", legend=8)
  common.style(ax_train, "Training loss", "optimizer step", "cross-entropy (nats/token)",
               legend=8)
  by = {r["run"]: r for r in rows}
  targets = "every" if LORA["lora_targets"] == "all" else LORA["lora_targets"]

  def gain(mode):  # of the eval loss from the base's (full's step 0), as a fraction of full's
    start = by["full"]["eval loss at step 0"]
    return (start - by[mode]["eval loss"]) / (start - by["full"]["eval loss"])

  intro = (
      f"A base model ({model.workdir}, step {model.step}, trained on {model.cfg.dataset}) and "
      f"new text ({label if label == data else f'{label}: {data}'}). Five runs of {steps} "
      f"steps on the same batches, with the base's tokenizer: from scratch (the base's "
      f"architecture, random weights, learning rate "
      f"{cfg0.learning_rate:g}), full fine-tuning (every weight, learning rate "
      f"{FULL['learning_rate']:g}) and LoRA (rank {LORA['lora_r']} on the {targets} "
      f"projections, learning rate {LORA['learning_rate']:g}, the base frozen; alone, with the "
      f"whole embedding table trained beside it, and with the rows of the "
      f"{len(cfgs['lora+tokens'].lora_trainable_tokens.split(','))} most frequent tokens of the "
      f"new text trained). The base alone "
      f"scores {by['full']['bits/char at step 0']:.3f} bits per character on the new text; "
      f"after {steps} steps: scratch {by['scratch']['bits/char']:.3f}, full "
      f"{by['full']['bits/char']:.3f}, "
      + ", ".join(f"{m} {by[m]['bits/char']:.3f} ({gain(m):.0%} of full's gain, training "
                  f"{by[m]['trained params'] / by['full']['trained params']:.1%} of the "
                  f"parameters)" for m in ("lora", "lora+tables", "lora+tokens")) + ".")
  columns = ["run", "trained params", "checkpoint MiB", "learning rate", "eval loss at step 0",
             "eval loss", "bits/char at step 0", "bits/char", "accuracy", "wall s", "s/step"]
  return common.write_report(
      out, title="Custom data: from scratch, full fine-tuning and LoRA", intro=intro,
      columns=columns, rows=rows, figures={"finetune.png": fig},
      captions={"finetune.png": "Left: validation bits per character on the new text against "
                                "step; the fine-tuning runs start at the base model's score "
                                "(step 0), the scratch run at its first evaluation. Right: the "
                                "training loss of each run."},
      runs=runs, command_line=command_line, started=started,
      extra={"base": model.workdir, "data": data,
             "trainable_tokens": cfgs["lora+tokens"].lora_trainable_tokens})


def main(argv):
  del argv
  preset = PRESETS[common.scale()]
  base = common.study_config(common.MODEL_PRESETS[common.scale()])
  steps = _STEPS.value or preset["steps"]
  if steps < 2:
    raise common.StudyError(f"--steps={steps}: give at least 2")
  study(base, common.out_dir(), _DATA.value, steps, min(preset["eval_steps"], steps),
        workdir=common.workdir_flag(), command_line=common.command("finetune"),
        validation=_VALIDATION.value)


if __name__ == "__main__":
  common.run_main(main)
