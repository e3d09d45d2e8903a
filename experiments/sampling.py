"""Sampling study: a temperature x top_k x top_p x repetition_penalty grid on one trained model
(the cheat sheet's "optimize sampling").

    python -m experiments.sampling --out=results/sampling               # trains <out>/model first
    python -m experiments.sampling --out=results/sampling --workdir=runs/default
    python -m experiments.sampling --out=results/sampling --workdir=runs/default \\
        --temperatures=0.5,1.0 --top_ks=0,10 --top_ps=1.0 --repetition_penalties=1.0,1.5

Every setting draws --samples continuations of the same prompt (a fresh document by default)
with llm_jax.sampling.generate, the same key for every setting. Measured per setting, on the
decoded text's whitespace-separated words:
  distinct-n       unique n-grams / all n-grams, pooled over the setting's samples (Li et al. 2016)
  repetition rate  share of a sample's word bigrams that repeat an earlier one in the same
                   sample, averaged over samples (Welleck et al. 2019's seq-rep-n with n = 2:
                   a few dozen words rarely repeat a 4-gram)
  mean length      new tokens per sample (EOS included when produced)
  perplexity       exp(mean -log p) of the sampled tokens under the model itself (temperature 1,
                   no filtering): lower = what the model finds likely
Greedy decoding and held-out validation text of the same length, scored the same way, are
reference rows.
"""

import itertools
import json
import os
import time

from absl import flags
import jax
import numpy as np

from experiments import common
from llm_jax import data as data_lib
from llm_jax import sampling as sampling_lib

_TEMPERATURES = flags.DEFINE_list("temperatures", None, "sampling: temperature values "
                                  "(default 0.7,1.0,1.3)")
_TOP_KS = flags.DEFINE_list("top_ks", None, "sampling: top_k values, 0 = off (default 0,40)")
_TOP_PS = flags.DEFINE_list("top_ps", None, "sampling: top_p values, 1.0 = off (default 1.0,0.9)")
_REPETITION_PENALTIES = flags.DEFINE_list("repetition_penalties", None, "sampling: "
                                          "repetition_penalty values, 1.0 = off (default 1.0,1.3)")
_SAMPLES = flags.DEFINE_integer("samples", 16, "sampling: samples drawn per setting")

GRID = {"temperature": (0.7, 1.0, 1.3), "top_k": (0, 40), "top_p": (1.0, 0.9),
        "repetition_penalty": (1.0, 1.3)}
REP_N = 2  # the n of the repetition rate


def ngrams(words, n):
  return list(zip(*(words[i:] for i in range(n))))


def distinct(texts, n) -> float:
  """Unique word n-grams / all word n-grams, pooled over `texts` (nan without any n-gram)."""
  grams = [g for t in texts for g in ngrams(t.split(), n)]
  return len(set(grams)) / len(grams) if grams else float("nan")


def repetition_rate(texts, n=REP_N) -> float:
  """Mean over texts of the share of word n-grams that repeat an earlier n-gram of the text."""
  rates = []
  for t in texts:
    grams = ngrams(t.split(), n)
    if grams:
      rates.append(1.0 - len(set(grams)) / len(grams))
  return float(np.mean(rates)) if rates else float("nan")


def perplexity_of(model: common.Model, prompts, continuations, shape) -> float:
  """exp(mean -log p(token | its prompt and the tokens before it)) of the continuations' tokens
  under the model, pooled over them. Rows are padded to `shape` = (rows, tokens) so that one
  compile serves every call."""
  inputs = np.zeros(shape, np.int32)
  targets = np.zeros_like(inputs)
  weights = np.zeros(shape, np.float32)
  for row, (prompt, cont) in enumerate(zip(prompts, continuations)):
    seq = (list(prompt) + list(cont))[:shape[1] + 1]
    inputs[row, :len(seq) - 1] = seq[:-1]
    targets[row, :len(seq) - 1] = seq[1:]
    weights[row, len(prompt) - 1:len(seq) - 1] = 1.0
  nll = common.token_nll(model.model_cfg, model.params, inputs, targets)
  return float(np.exp((nll * weights).sum() / max(weights.sum(), 1.0)))


def measure(texts, ids, perplexity: float) -> dict:
  """The table's measures of one setting's samples (decoded texts and their token ids)."""
  return {"distinct-1": distinct(texts, 1), "distinct-2": distinct(texts, 2),
          "distinct-3": distinct(texts, 3), "repetition rate": repetition_rate(texts),
          "mean length": float(np.mean([len(r) for r in ids])), "perplexity": perplexity}


def held_out(model: common.Model, n_rows: int, n_tokens: int):
  """n_rows windows of n_tokens tokens of the validation split, evenly spaced, each with the
  token before it as its prompt."""
  stream = data_lib.build(model.cfg, model.workdir).validation_tokens
  starts = np.linspace(1, len(stream) - n_tokens - 1, n_rows).astype(int)
  return [[int(stream[s - 1])] for s in starts], [stream[s:s + n_tokens].tolist() for s in starts]


def study(base, out: str, *, grid=None, samples: int = 16, prompt: str = "",
          workdir: str | None = None, command_line: str = "") -> common.Result:
  started = time.time()
  grid = dict(GRID if grid is None else grid)
  cfg = common.finalize(base)
  model = common.trained_model(cfg, out, workdir)
  tok, n_new = model.tokenizer, cfg.max_new_tokens
  prompt_ids = tok.encode(prompt) or [tok.eos_id]
  rng = jax.random.key(cfg.seed)

  def generate(rows, **knobs):
    return sampling_lib.generate(model.params, model.model_cfg, [prompt_ids] * rows, cfg,
                                 rng, tok.eos_id, **knobs)

  shape = (samples, max(len(prompt_ids), 1) + n_new)  # every scoring call: one compile

  def score(prompts, ids):
    texts = [tok.decode(r) for r in ids]
    return measure(texts, ids, perplexity_of(model, prompts, ids, shape)), texts

  rows, all_samples = [], []
  names = ("temperature", "top_k", "top_p", "repetition_penalty")
  for values in itertools.product(*(grid[n] for n in names)):
    knobs = dict(zip(names, values))
    ids = generate(samples, do_sample=True, **knobs)
    measured, texts = score([prompt_ids] * samples, ids)
    rows.append({"decoding": "sample", **knobs, **measured})
    all_samples.append({**knobs, "prompts": [prompt_ids] * samples, "ids": ids, "texts": texts})
    print(f"sampled {knobs}: distinct-2 {measured['distinct-2']:.3f}, perplexity "
          f"{measured['perplexity']:.2f}", flush=True)
  ids = generate(1, do_sample=False)
  measured, texts = score([prompt_ids], ids)
  reference = [{"decoding": "greedy", **measured}]
  all_samples.append({"decoding": "greedy", "prompts": [prompt_ids], "ids": ids, "texts": texts})
  prompts, ids = held_out(model, samples, n_new)
  measured, texts = score(prompts, ids)
  reference.append({"decoding": "held-out text", **measured})
  all_samples.append({"decoding": "held-out text", "prompts": prompts, "ids": ids,
                      "texts": texts})
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "samples.jsonl"), "w", encoding="utf-8") as f:
    for s in all_samples:
      f.write(json.dumps(s) + "\n")

  fig = _figure(rows, reference, cfg, samples)
  sections = ["## Samples", "",
              f"The first sample of a few settings (prompt {prompt!r}; every sample is in "
              f"samples.jsonl):", ""]
  shown = [s for s in all_samples if s.get("decoding")]
  for t in grid["temperature"]:
    plain = [s for s in all_samples if s.get("temperature") == t and s["top_k"] == 0
             and s["top_p"] == 1.0 and s["repetition_penalty"] == 1.0]
    shown += plain[:1] or [s for s in all_samples if s.get("temperature") == t][:1]
  for s in shown:
    label = s.get("decoding") or ", ".join(f"{n} {s[n]}" for n in names)
    text = s["texts"][0] if s.get("decoding") == "held-out text" else prompt + s["texts"][0]
    sections += [f"**{label}**", "", "```", text.strip()[:500], "```", ""]
  intro = (f"{len(rows)} settings ({' x '.join(str(len(grid[n])) for n in names)} values of "
           f"temperature, top_k, top_p, repetition_penalty), {samples} samples of "
           f"{n_new} new tokens each, from the model in {model.workdir} (step {model.step}). "
           f"Distinct-n and the repetition rate count whitespace-separated words; perplexity is "
           f"the model's own (temperature 1, no filtering) of the sampled tokens: low = likely "
           f"text, high = text the model itself finds surprising. The last two rows are "
           f"references: greedy decoding, and {samples} windows of held-out text.")
  columns = ["decoding", *names, "distinct-1", "distinct-2", "distinct-3", "repetition rate",
             "mean length", "perplexity"]
  return common.write_report(
      out, title="Sampling: temperature, top-k, top-p and repetition penalty", intro=intro,
      columns=columns, rows=rows + reference, figures={"sampling.png": fig},
      captions={"sampling.png": "Left: quality against diversity, one point per setting (the "
                                "model's perplexity of its own samples against distinct-2), "
                                "lines join temperatures of one filter setting; greedy decoding "
                                "and held-out text for reference. Right: the repetition rate "
                                "against temperature."},
      runs=[model.run] if model.run else [], command_line=command_line, sections=sections,
      started=started)


def _figure(rows, reference, cfg, samples):
  fig, (ax_q, ax_rep) = common.figure(2, title=(
      f"Sampling settings, {samples} samples of {cfg.max_new_tokens} tokens each"))
  combos = sorted({(r["top_k"], r["top_p"], r["repetition_penalty"]) for r in rows})
  markers = "osD^v<>ph*"
  for i, (k, p, rp) in enumerate(combos):
    pts = sorted((r for r in rows if (r["top_k"], r["top_p"], r["repetition_penalty"])
                  == (k, p, rp)), key=lambda r: r["temperature"])
    label = f"top_k {k or 'off'}, top_p {p:g}, rep. penalty {rp:g}"
    look = dict(color=f"C{i}", marker=markers[i % len(markers)], markersize=5, linewidth=1)
    ax_q.plot([r["perplexity"] for r in pts], [r["distinct-2"] for r in pts], label=label,
              **look)
    for r in pts:
      ax_q.annotate(f"T={r['temperature']:g}", (r["perplexity"], r["distinct-2"]),
                    textcoords="offset points", xytext=(3, 3), fontsize=6, color=f"C{i}")
    ax_rep.plot([r["temperature"] for r in pts], [r["repetition rate"] for r in pts],
                label=label, **look)
  for ref, look in zip(reference, (dict(marker="X", color="k"), dict(marker="*", color="red"))):
    ax_q.plot([ref["perplexity"]], [ref["distinct-2"]], linestyle="none", markersize=11,
              label=ref["decoding"], **look)
  common.style(ax_q, "Quality against diversity",
               "model's perplexity of its samples (log scale; lower = more likely)",
               "distinct-2 (unique word bigrams / all)", xlog=True, legend=6)
  common.style(ax_rep, "Repetition within a sample", "temperature",
               f"repeated word {REP_N}-grams (share)", legend=6)
  return fig


def main(argv):
  del argv
  base = common.study_config(common.MODEL_PRESETS[common.scale()])
  grid = {"temperature": common.number_list(_TEMPERATURES.value, GRID["temperature"],
                                            "temperatures"),
          "top_k": common.number_list(_TOP_KS.value, GRID["top_k"], "top_ks", int),
          "top_p": common.number_list(_TOP_PS.value, GRID["top_p"], "top_ps"),
          "repetition_penalty": common.number_list(
              _REPETITION_PENALTIES.value, GRID["repetition_penalty"], "repetition_penalties")}
  for name, values in grid.items():
    for v in values:
      common.finalize(base, **{name: v})  # each value checked as the config field it sets
  study(base, common.out_dir(), grid=grid, samples=_SAMPLES.value,
        prompt=common.prompt_flag(""), workdir=common.workdir_flag(),
        command_line=common.command("sampling"))


if __name__ == "__main__":
  common.run_main(main)
