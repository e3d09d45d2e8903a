"""--mode=tasks: downstream tasks of a workdir's model, scored as lm-eval scores them.

    python main.py --mode=tasks --workdir=runs/default                      # the built-in tasks
    python main.py --mode=tasks --workdir=runs/x --config.tasks=hellaswag,arc_easy \\
        --config.tasks_dir=/data/evals --config.num_fewshot=5

Order: every task file is read, rendered and checked (`prepare`), and the model's tokenizer
encodes every request, before the model's weights are loaded and anything compiles; a bad task
is one `error:` line (exit 2) and nothing is written. Then each task is scored (engine.Scorer)
and the report written once, at the end, under <workdir>/tasks/step_<step>/: results.json
(per task: metrics, chance level, centred score, items, truncated requests; the CORE-style
aggregate; the step, the command), results.md (the printed table) and <task>.jsonl (per item:
context, choices, scores, prediction).
"""

import dataclasses
import json
import os
import sys
import time
import types

import jax

from llm_jax import errors
from llm_jax import sampling
from llm_jax.evals import builtin
from llm_jax.evals import engine
from llm_jax.evals import scoring
from llm_jax.evals import tasks as tasks_lib


@dataclasses.dataclass
class Prepared:
  task: tasks_lib.Task
  items: list
  path: str


def prepare(cfg) -> list[Prepared]:
  """Every task of cfg.tasks (the built-in ones when it is empty), read and checked."""
  spec = tasks_lib.parse_spec(cfg.tasks)
  if not spec:
    spec = [(n, None) for n in builtin.NAMES]
  seen, out = set(), []
  for name, path in spec:
    if name in seen:
      raise tasks_lib.TaskError(f"tasks: {name!r} is named twice")
    seen.add(name)
    if name in builtin.NAMES and path is None:
      task, items = builtin.load(name)
      pool, where = None, "built-in (held-out plays)"
    else:
      task, items, pool, where = tasks_lib.load(name, path, cfg.tasks_dir, builtin.NAMES)
    # requests built over every item, then cut: the few-shot draws of the first items are then
    # those of lm-eval's --limit (its pool is the whole split, its draws follow the items)
    tasks_lib.build(task, items, pool, cfg.num_fewshot)
    if cfg.tasks_limit:
      items = items[:cfg.tasks_limit]
    out.append(Prepared(task, items, where))
  return out


def _check_lengths(scorer, prepared) -> None:
  """Continuations the model's context cannot hold (lm-eval asserts): bad input, before any
  compile. Contexts are truncated from the left instead, and counted."""
  for p in prepared:
    if p.task.kind not in ("multiple_choice", "cloze"):
      continue
    for item in p.items:
      for ctx, cont in item.requests:
        n = len(scorer.encode_pair(ctx, cont, p.task.move_space)[1])
        if n > scorer.max_length or n == 0:
          raise tasks_lib.TaskError(
              f"task {p.task.name!r} ({p.path}): a continuation of {n} tokens "
              f"({cont[:60]!r}) {'is empty' if n == 0 else 'is longer than the context of '}"
              f"{'' if n == 0 else str(scorer.max_length) + ' tokens'}: it cannot be scored")


def _gen_config(cfg, given) -> sampling.SamplingConfig:
  """Greedy unless do_sample is given; lm-eval's max_gen_toks (256) unless max_new_tokens is."""
  over = {}
  if "do_sample" not in given:
    over["do_sample"] = False
  if "max_new_tokens" not in given:
    over["max_new_tokens"] = 256
  return sampling.SamplingConfig.from_config(cfg, **over)


def score_task(scorer, p: Prepared, scfg=None, rng=None) -> tuple[dict, list[dict]]:
  """(metrics, per-item records) of one prepared task."""
  task, items = p.task, p.items
  before = scorer.truncated
  recs = []
  if task.kind == "multiple_choice":
    flat = [r for it in items for r in it.requests]
    res = iter(scorer.loglikelihood(flat, desc=task.name, move_space=task.move_space))
    accs, norms = [], []
    for it in items:
      lls = [next(res)[0] for _ in it.requests]
      m = scoring.multiple_choice(lls, it.choices, it.gold)
      accs.append(m["acc"])
      norms.append(m["acc_norm"])
      recs.append({"context": it.requests[0][0] if not it.partial else "",
                   "choices": it.choices, "continuation": it.target if it.partial else None,
                   "scores": lls, "gold": it.gold, "pred": m["pred"], "pred_norm": m["pred_norm"],
                   "acc": m["acc"], "acc_norm": m["acc_norm"]})
    metrics = {"acc": scoring.mean(accs)}
    if "acc_norm" in task.metrics:
      metrics["acc_norm"] = scoring.mean(norms)
  elif task.kind == "cloze":
    res = scorer.loglikelihood([it.requests[0] for it in items], desc=task.name,
                              move_space=task.move_space)
    for it, (ll, greedy) in zip(items, res):
      recs.append({"context": it.requests[0][0], "target": it.target, "ll": ll,
                   "greedy": greedy})
    metrics = {"acc": scoring.mean(float(g) for _, g in res),
               "perplexity": scoring.perplexity([ll for ll, _ in res])}
  elif task.kind == "rolling":
    lls = scorer.loglikelihood_rolling([it.target for it in items], desc=task.name)
    words = [it.words if it.words is not None else scoring.count_words(it.target) for it in items]
    nbytes = [it.bytes if it.bytes is not None else scoring.count_bytes(it.target)
              for it in items]
    for it, ll, w, b in zip(items, lls, words, nbytes):
      recs.append({"text": it.target[:200], "ll": ll, "words": w, "bytes": b})
    metrics = scoring.rolling_metrics(lls, words, nbytes)
  else:
    outs = scorer.generate_until([it.requests[0] for it in items], task.until, scfg, rng,
                                 desc=task.name)
    metrics = {m: [] for m in task.metrics}
    ans = task.answer
    for it, text in zip(items, outs):
      rec = {"context": it.requests[0], "generation": text, "reference": it.target}
      if ans["filters"]:
        for (fname, (pattern, group)), metric in zip(ans["filters"].items(), task.metrics):
          got = scoring.regex_extract(text, pattern, group)
          em = scoring.exact_match(got, it.target, ans["regexes_to_ignore"], ans["ignore_case"],
                                   ans["ignore_punctuation"])
          rec[fname], rec[metric] = got, em
          metrics[metric].append(em)
      else:
        em = scoring.exact_match(text.strip(), it.target.strip())
        rec["exact_match"] = em
        metrics["exact_match"].append(em)
      recs.append(rec)
    metrics = {k: scoring.mean(v) for k, v in metrics.items()}
  return {"metrics": metrics, "truncated": scorer.truncated - before}, recs


def evaluate(scorer, prepared, scfg=None, rng=None) -> tuple[dict, dict]:
  """({task: result}, {task: per-item records}) with each result's chance and centred score."""
  results, records = {}, {}
  for p in prepared:
    r, recs = score_task(scorer, p, scfg, rng)
    chance = tasks_lib.chance(p.task, p.items)
    head = r["metrics"].get(p.task.headline) if p.task.headline else None
    results[p.task.name] = {
        "kind": p.task.kind, "items": len(p.items), "path": p.path, **r, "headline":
        p.task.headline, "chance": chance,
        "centred": None if head is None or chance is None else scoring.centred(head, chance)}
    records[p.task.name] = recs
  return results, records


class DuringTraining:
  """tasks_every: the tasks scored on the training params, as flat metrics for metrics.jsonl and
  TensorBoard ("tasks/<task>/<metric>", "tasks/core"). Made before training starts, so bad task
  input stops the run before a step; `start` checks the lengths once the tokenizer exists."""

  def __init__(self, cfg):
    self.cfg, self.prepared = cfg, prepare(cfg)
    self.scorer = self.scfg = None

  def start(self, trainer, tokenizer) -> None:
    model = types.SimpleNamespace(params=None, model_cfg=trainer.model_cfg, tokenizer=tokenizer,
                                  mesh=trainer.mesh, cfg=self.cfg)
    self.scorer = engine.Scorer(model, batch_size=self.cfg.tasks_batch_size, progress=False)
    _check_lengths(self.scorer, self.prepared)
    if any(p.task.kind == "generate" for p in self.prepared):
      self.scfg = _gen_config(self.cfg, {})
      for p in self.prepared:
        if p.task.kind == "generate":
          self.scorer.check_generation(p.task.until, self.scfg.max_new_tokens,
                                       f"task {p.task.name!r}")

  def __call__(self, params) -> tuple[dict, str]:
    """(flat metrics, a one-line summary) of `params` (what the model applies)."""
    self.scorer.params = params
    results, _ = evaluate(self.scorer, self.prepared, self.scfg, jax.random.key(self.cfg.seed))
    core = scoring.core_score(results)
    flat = {f"tasks/{name}/{k}": v for name, r in results.items() for k, v in r["metrics"].items()}
    if core is not None:
      flat["tasks/core"] = core
    heads = [f"{n} {r['headline']} {r['metrics'][r['headline']]:.3f}"
             for n, r in results.items() if r["headline"]]
    return flat, ", ".join(heads) + ("" if core is None else f"; core {core:.3f}")


def table(results: dict, core: float | None) -> str:
  """The markdown table of the results."""
  lines = ["| task | items | metric | value | chance | centred |", "|---|---|---|---|---|---|"]
  for name, r in results.items():
    for k, v in r["metrics"].items():
      head = k == r["headline"]
      lines.append(f"| {name} | {r['items']} | {k} | {v:.4f} | "
                   f"{'' if not head or r['chance'] is None else f'{r['chance']:.4f}'} | "
                   f"{'' if not head or r['centred'] is None else f'{r['centred']:.4f}'} |")
  lines.append(f"| **CORE-style aggregate** | | mean centred | "
               f"{'n/a' if core is None else f'{core:.4f}'} | | |")
  return "\n".join(lines)


def write_report(out_dir: str, report: dict, records: dict, md: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  for name, recs in records.items():
    with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
      for r in recs:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
  with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
    f.write(md + "\n")
  with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)


@dataclasses.dataclass
class Scored:
  """What `score` gives: the model it loaded, its scorer, and the results."""
  loaded: object
  scorer: engine.Scorer
  results: dict  # task -> its result (evaluate)
  records: dict  # task -> per-item records
  core: float | None
  seconds: float


def score(cfg, workdir: str, given=None, progress: bool = True) -> Scored:
  """The tasks of cfg (the built-in ones when cfg.tasks is empty) scored on the checkpoint of
  `workdir` (cfg.checkpoint_step's, else the latest): every task read and checked before the
  model loads (bad input: TaskError, nothing compiled)."""
  from llm_jax import loader  # pylint: disable=import-outside-toplevel
  given = dict(given or {})
  prepared = prepare(cfg)  # bad task input stops here: no model loaded, nothing compiled
  loaded = loader.load(workdir, cfg, step=cfg.checkpoint_step, asked=given)
  scorer = engine.Scorer(loaded, batch_size=cfg.tasks_batch_size, progress=progress)
  _check_lengths(scorer, prepared)
  scfg = None
  if any(p.task.kind == "generate" for p in prepared):
    scfg = _gen_config(cfg, given)
    for p in prepared:
      if p.task.kind == "generate":
        scorer.check_generation(p.task.until, scfg.max_new_tokens, f"task {p.task.name!r}")
  if loaded.quantization and progress:
    print(f"# {loaded.quantization}", flush=True)
  start = time.perf_counter()
  results, records = evaluate(scorer, prepared, scfg, jax.random.key(cfg.seed))
  return Scored(loaded, scorer, results, records, scoring.core_score(results),
                time.perf_counter() - start)


def run(cfg, workdir: str, overrides=None) -> int:
  """--mode=tasks (the module docstring)."""
  s = score(cfg, workdir, overrides)
  loaded, scorer, results, core = s.loaded, s.scorer, s.results, s.core
  md = table(results, core)
  truncated = sum(r["truncated"] for r in results.values())
  report = {"workdir": os.path.abspath(workdir), "step": loaded.step,
            "command": " ".join(sys.argv), "num_fewshot": cfg.num_fewshot, "tasks": results,
            "core": core, "compiles": scorer.compiles, "truncated": truncated,
            "seconds": s.seconds}
  out_dir = os.path.join(workdir, "tasks", f"step_{loaded.step}")
  write_report(out_dir, report, s.records, md)
  print(f"tasks of checkpoint {loaded.step} in {workdir} ({cfg.num_fewshot}-shot, "
        f"{scorer.compiles} compiled shapes, {report['seconds']:.1f}s)\n{md}", flush=True)
  if truncated:
    print(f"warning: {truncated} request(s) were longer than the model's context of "
          f"{scorer.max_length} tokens and were truncated from the left (as lm-eval does)",
          file=sys.stderr, flush=True)
  print(f"wrote {out_dir}/results.json, results.md and per-item <task>.jsonl", flush=True)
  return errors.OK
